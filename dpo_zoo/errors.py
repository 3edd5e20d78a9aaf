"""Errors meant for the user: the CLI prints their message without a traceback.

Each carries everything needed to act on it: the file, row and field for data; the key for config;
the differing field for a cache miss; the step and batch for a non-finite loss.

This module imports nothing of dpo_zoo (and nothing heavy): every other module may import it. Bad
input data is :class:`data_prep.errors.DataError` (data_prep is the layer below and cannot import
dpo_zoo); it is re-exported here.
"""

from data_prep.errors import DataError


class UserError(Exception):
    """Base of errors whose message is the whole story."""


class CacheError(UserError):
    """A prepared set is missing, incomplete, corrupt, or was made with other settings (names which)."""


class ModelError(UserError, ValueError):
    """A model folder or built-in model cannot be used; the message names the path and what to do."""


class CheckpointError(UserError):
    """No training checkpoint can be resumed from (each one found and what failed), or one just
    written does not verify."""


class TrainingError(UserError):
    """Training cannot go on: a non-finite loss or gradient (with step and batch), a failed preflight."""


class CompareError(UserError, ValueError):
    """A subject and the held-out set cannot be compared (names the folder, the file and the field)."""


class StudyError(UserError, ValueError):
    """A study file or study output that cannot be used; the message names the key or file."""


class LossInputError(UserError, ValueError):
    """A tensor a loss needs is missing or malformed; the message names it."""


class LossConfigError(UserError, ValueError):
    """A hyperparameter is unknown or out of range; the message names it."""


class DiskFullError(UserError):
    """A write ran out of space (ENOSPC, or a quota: EDQUOT). The message names the file, the bytes
    it needed or had written, and what is free; nothing half-written is left under the target's name
    (every write goes to a temporary name beside it and is renamed only when complete)."""

    def __init__(self, path, *, needed=None, written=None, free=None, what: str = ""):
        self.path, self.needed, self.written, self.free = str(path), needed, written, free
        parts = []
        if needed is not None:
            parts.append(f"needed {needed:,} bytes")
        if written is not None:
            parts.append(f"{written:,} bytes written before the disk filled")
        if free is not None:
            parts.append(f"{free:,} bytes free")
        detail = f" ({'; '.join(parts)})" if parts else ""
        super().__init__(f"disk full writing {self.path}{detail}{': ' + what if what else ''}. Nothing "
                         "half-written was kept; free some space (or choose another folder) and run the same "
                         "command again: what was finished is kept and the rest is redone")

    def __reduce__(self):  # picklable (broadcast between ranks, multiprocessing)
        return (_rebuild_disk_full, (self.args[0],))


def _rebuild_disk_full(message: str) -> "DiskFullError":
    err = DiskFullError.__new__(DiskFullError)
    Exception.__init__(err, message)
    return err


class WriterLockError(UserError):
    """Another live process writes to the same folder (a train's ``train.output_dir`` or a prep's
    ``prep.output_dir``); the message names its pid, host, start time and command."""


class StoppedError(UserError):
    """The run stopped on SIGTERM/SIGINT after saving what it had finished (the message says where and
    how to resume). ``exit_code``: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, signum: int = 15):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


# What the CLI prints plainly: every error above, and bad data.
USER_ERRORS = (UserError, DataError)

__all__ = ["CacheError", "CheckpointError", "CompareError", "DataError", "DiskFullError", "LossConfigError", "LossInputError", "ModelError", "TrainingError",
           "StoppedError", "USER_ERRORS", "UserError", "WriterLockError"]
