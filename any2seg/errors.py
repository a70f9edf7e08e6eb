"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class PipelineError(Exception):
    """A mistake in input or configuration that the user can fix; the message says how."""


class DatasetError(PipelineError):
    """A dataset root, file or label that does not match the expected layout."""


class ReportedError(PipelineError):
    """A failure already reported where it happened (one rank of a multi-process launch);
    the command only exits with `exitcode`."""

    def __init__(self, exitcode: int = 1) -> None:
        super().__init__(f"exit code {exitcode}")
        self.exitcode = exitcode
