"""User-facing errors.

Anything the user can fix (a missing folder, a bad CSV, a wrong artifact) raises `UserError`
with one sentence that names the file or value and says what to do. The CLI prints that
sentence and exits with code 2; anything else is an internal error (exit code 1).
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped a run after it wrote a checkpoint; rerunning resumes it.

    Attributes:
        exit_code: 130 for SIGINT, 143 for SIGTERM (128 + the signal number).
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
