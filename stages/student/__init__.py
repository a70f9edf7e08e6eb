"""Stage two: the Any2Seg student, its losses, training, evaluation and CodeAlign."""
