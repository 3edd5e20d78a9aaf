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


# What the CLI prints plainly: every error above, and bad data.
USER_ERRORS = (UserError, DataError)

__all__ = ["CacheError", "CheckpointError", "CompareError", "DataError", "LossConfigError", "LossInputError", "ModelError", "TrainingError",
           "USER_ERRORS", "UserError"]
