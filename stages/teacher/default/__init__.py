"""The embedded default teacher: small LanguageBind-format teachers for the generated sample,
random (`folders.write_default_teacher`) or fitted on it (`fit.fit_default_teacher`).

No real-data path uses this package; stage one reads what it writes with the same loader
as real LanguageBind folders. Modules: folders (the on-disk format), config (FitConfig),
data, model (LoRA, encoders, losses), quality, fit (the two phases, teacher.json).
"""

# where `pipeline fit-teacher` writes the default teacher, and the default of teacher.root
# (params.yaml, dvc.yaml and the Makefile are checked against it:
# tests/application/test_defaults.py)
FOLDER = "data/sample-teacher"
