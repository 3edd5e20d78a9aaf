"""The loss registry: every registered loss, one file per family; the maths, sources and
defaults of each are in ``docs/loss_maths.md`` (generated from the docstrings by ``python -m dpo_zoo.docs``).

Use a loss from tensors::

    from dpo_zoo.losses import compute_loss
    out = compute_loss("sampo", policy_chosen_token_logps=..., ..., seed=0, beta=0.1)

or build one for repeated use with :func:`build_loss`. Third-party losses register with
:func:`register_loss` and are found through the ``dpo_zoo.losses`` entry-point group or an import
path (``loss.plugin=pkg.module`` in a config).
"""

from .base import NEED_FIELDS, POLICY_NEEDS, Loss, LossConfigError, LossInputError, LossOutput, Need, PairBatch
from .registry import (
    RegisteredLoss,
    build_loss,
    check_inputs,
    compute_loss,
    describe_needs,
    get_loss_entry,
    load_loss_plugin,
    register_loss,
    registered_losses,
)

# Importing a family registers its names.
from . import dpo  # noqa: E402,F401
from . import f_dpo  # noqa: E402,F401
from . import is_daa  # noqa: E402,F401
from . import sampo  # noqa: E402,F401
from . import h_dpo  # noqa: E402,F401
from . import ra_dpo  # noqa: E402,F401
from . import tie_dpo  # noqa: E402,F401
from . import robust  # noqa: E402,F401
from . import discopop  # noqa: E402,F401
from . import pointwise  # noqa: E402,F401
from . import apo  # noqa: E402,F401
from . import aot  # noqa: E402,F401
from . import length  # noqa: E402,F401
from . import sft  # noqa: E402,F401
from . import reference_free  # noqa: E402,F401
from . import mixture  # noqa: E402,F401  (names a+b+...: mixtures of the above)

__all__ = [
    "NEED_FIELDS",
    "POLICY_NEEDS",
    "Loss",
    "LossConfigError",
    "LossInputError",
    "LossOutput",
    "Need",
    "PairBatch",
    "RegisteredLoss",
    "build_loss",
    "check_inputs",
    "compute_loss",
    "describe_needs",
    "get_loss_entry",
    "load_loss_plugin",
    "register_loss",
    "registered_losses",
]
