"""The shared library both stages read: configuration, data sets and decoding, the teacher
cache store, metrics, the generated sample, errors and progress. It imports no stage and
nothing of the `pipeline` application on top."""

__version__ = "0.1.0"
