"""Loading ``torch.save`` files without unpickling arbitrary objects.

DeepSpeed writes its checkpoints with ``torch.save`` and reads them back with ``weights_only=False``,
which would run any code a tampered checkpoint carries. We read them with ``weights_only=True`` and
allow only the plain DeepSpeed value types those files are known to hold (enums and small config
records); anything else is refused with torch's own error naming the type.
"""

from __future__ import annotations

import re
from typing import Any, List

from dpo_zoo.errors import UserError


def _allowed_globals() -> List[Any]:
    allowed: List[Any] = []
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:  # pragma: no cover - deepspeed is an install requirement
        pass
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler

        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed.append(fragment_address)
    except ImportError:  # pragma: no cover
        pass
    return allowed


def safe_torch_load(path, map_location=None, mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's own value types allowed.

    A file holding any other pickled object raises :class:`RefusedPickleError` naming the file and the
    object; nothing of it is run. (torch's own message would advise loading with ``weights_only=False``,
    the one thing not to do with a file that may have been tampered with.) ``mmap=True`` maps the
    tensors instead of reading them: a cheap full check of a file's structure and objects.
    """
    import pickle

    import torch

    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            raise RefusedPickleError(path, refused_object(err)) from None


class RefusedPickleError(UserError):
    """A ``torch.save`` file holds a pickled object that safe loading does not allow."""

    def __init__(self, path, what: str):
        self.path, self.what = path, what
        super().__init__(
            f"{path}: holds a pickled object that safe loading does not allow ({what}); the file is damaged "
            "or possibly tampered with, and nothing in it was run"
        )


def refused_object(err: Exception) -> str:
    """The object an ``UnpicklingError`` of ``weights_only`` loading names (e.g. ``posix.system``)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else "an object of a type that is not allowed"
