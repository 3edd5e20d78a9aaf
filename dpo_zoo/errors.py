"""Errors meant for the user: the CLI prints their message without a traceback.

Each carries everything needed to act on it: the file, row and field for data; the key for config;
the differing field for a cache miss; the step and batch for a non-finite loss.
"""

from .losses.base import LossConfigError, LossInputError


class UserError(Exception):
    """Base of errors whose message is the whole story."""


class DataError(UserError, ValueError):
    """Bad input data: the message names file, row and field."""


class CacheError(UserError):
    """A prepared set is missing, incomplete, corrupt, or was made with other settings (names which)."""


class ModelError(UserError, ValueError):
    """A model folder or built-in model cannot be used; the message names the path and what to do."""


class TrainingError(UserError):
    """Training cannot go on: a non-finite loss or gradient (with step and batch), a failed preflight."""


# Loss configuration and input errors are the user's to fix too; the CLI prints them plainly.
USER_ERRORS = (UserError, LossConfigError, LossInputError)
