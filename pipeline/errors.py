"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class PipelineError(Exception):
    """A mistake in input or configuration that the user can fix; the message says how."""


class DatasetError(PipelineError):
    """A dataset root, file or label that does not match the expected layout."""
