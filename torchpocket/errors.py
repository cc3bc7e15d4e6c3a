"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a flag, a file, a name). Never a bug."""


class UnsupportedModel(UserError):
    """A learner cannot handle this architecture (it says which part and why)."""


class CandidateError(Exception):
    """A learner cannot build or score this one policy (the search records a failed trial and goes on).

    Anything else raised while scoring a candidate is a bug or an environment problem and stops the run."""


class OutOfMemory(UserError):
    """The machine ran out of memory; the message says what to lower."""


class RunCrashed(Exception):
    """An unexpected error stopped a run; its traceback is in the run directory's ``log.txt``."""

    def __init__(self, message: str, *, log: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.log, self.exit_code = log, exit_code


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run: the run directory is consistent and ``--resume`` continues it."""

    def __init__(self, run_dir: str, trials: int) -> None:
        super().__init__(f"interrupted after {trials} trials; resume with: python run.py --resume {run_dir}")
        self.run_dir, self.trials = run_dir, trials
