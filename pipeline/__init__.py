"""any2seg-pipeline's application layer: the `pipeline` command, the ablation runner, help
and failure messages, on top of the `any2seg` library and the `stages` packages."""

from any2seg import __version__

__all__ = ["__version__"]
