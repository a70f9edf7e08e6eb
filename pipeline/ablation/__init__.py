"""`pipeline ablate`: plans of DVC experiments, run as seeds x rows, with a paired report."""
