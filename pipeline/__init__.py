"""any2seg-pipeline: offline teacher caching and Any2Seg student training."""

__version__ = "0.1.0"
