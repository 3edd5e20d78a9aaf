"""Loading ``torch.save`` files without unpickling arbitrary objects.

DeepSpeed writes its checkpoints with ``torch.save`` and reads them back with ``weights_only=False``,
which would run any code a tampered checkpoint carries. We read them with ``weights_only=True`` and
allow only the plain DeepSpeed value types those files are known to hold (enums and small config
records); anything else is refused with torch's own error naming the type.
"""

from __future__ import annotations

from typing import Any, List


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


def safe_torch_load(path, map_location=None):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's own value types allowed."""
    import torch

    with torch.serialization.safe_globals(_allowed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)
