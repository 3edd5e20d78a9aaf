"""The loss contract: what a loss needs, what it is given, and what it returns (the registry of names is
:mod:`dpo_zoo.losses.registry`).

A loss is a small class with a typed hyperparameter dataclass (``Config``) and one pure call::

    PairBatch -> LossOutput(losses[B], chosen_rewards[B], rejected_rewards[B], metrics)

Per-pair losses are returned; the caller reduces (mean by default; docs/loss_maths.md, conventions). A loss *declares* what it
needs (``requires`` / ``optional``, a set of :class:`Need`), and the trainer, the cache and compare read
those declarations; nothing outside ``dpo_zoo.losses`` asks which loss it has.

Tensor naming (the same for every loss, so any loss can be called the same way):

* sequence level ``[B]``: ``policy_chosen_logps``, ``policy_rejected_logps``,
  ``reference_chosen_logps``, ``reference_rejected_logps`` (log-probs *summed* over response tokens);
* token level ``[B,T]``: ``policy_chosen_token_logps`` ... ``reference_rejected_token_logps`` with
  ``chosen_mask`` / ``rejected_mask`` (1 on response tokens);
* vocabulary level ``[B,T,V]``: ``policy_chosen_vocab_logps`` ... ``reference_rejected_vocab_logps`` with
  ``chosen_labels`` / ``rejected_labels`` ``[B,T]``. The reference side may instead come as its top-k
  (``reference_chosen_topk_logps`` / ``reference_chosen_topk_ids`` ``[B,T,K]``, optionally
  ``reference_chosen_rest_logmass`` ``[B,T]``), which is what the on-disk cache stores;
* per pair: ``is_tie`` (bool), ``weight``, ``soft_label``, ``behavior_chosen_logps``,
  ``behavior_rejected_logps``;
* randomness: ``generator`` (a ``torch.Generator``) or ``seed``.

Coarser views are derived from finer ones when absent (vocab → token by gathering the labels,
token → sequence by a masked sum), so a caller that has per-token values never needs to sum them.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from ..errors import LossConfigError, LossInputError  # defined with the other user errors
from .options import LossOptions, ReferenceSync, wpo_weights


class Need(str, enum.Enum):
    """What a loss can ask of its caller. The trainer, the cache and compare read these."""

    SEQUENCE_LOGPS = "sequence_logps"  # summed log-probs, policy and reference, both responses
    TOKEN_LOGPS = "token_logps"  # per-token log-probs and response masks
    VOCAB_LOGPS = "vocab_logps"  # full-vocabulary log-probs (reference may be top-k) and labels
    TIES = "ties"  # per-pair tie flag
    WEIGHTS = "weights"  # per-pair weight
    SOFT_LABELS = "soft_labels"  # per-pair probability that chosen is preferred
    BEHAVIOR_LOGPS = "behavior_logps"  # summed log-probs of the policy that generated the data
    GENERATOR = "generator"  # a random generator (or seed)
    SQUARED_PROB_MASS = "squared_prob_mass"  # the policy's per-token log Σ_v π(v)² (WPO's weights)

    def __str__(self) -> str:  # for tables and error messages
        return self.value


# Which batch fields satisfy each need (the reference fields are dropped for reference-free losses).
NEED_FIELDS: Dict[Need, Tuple[str, ...]] = {
    Need.SEQUENCE_LOGPS: (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "reference_chosen_logps",
        "reference_rejected_logps",
    ),
    Need.TOKEN_LOGPS: (
        "policy_chosen_token_logps",
        "policy_rejected_token_logps",
        "reference_chosen_token_logps",
        "reference_rejected_token_logps",
        "chosen_mask",
        "rejected_mask",
    ),
    Need.VOCAB_LOGPS: (
        "policy_chosen_vocab_logps",
        "policy_rejected_vocab_logps",
        "reference_chosen_vocab_logps",
        "reference_rejected_vocab_logps",
        "chosen_labels",
        "rejected_labels",
        "chosen_mask",
        "rejected_mask",
    ),
    Need.TIES: ("is_tie",),
    Need.WEIGHTS: ("weight",),
    Need.SOFT_LABELS: ("soft_label",),
    Need.BEHAVIOR_LOGPS: ("behavior_chosen_logps", "behavior_rejected_logps"),
    Need.GENERATOR: ("generator",),
    Need.SQUARED_PROB_MASS: ("policy_chosen_log_sq_mass", "policy_rejected_log_sq_mass", "chosen_mask", "rejected_mask"),
}

# Needs the policy's own forward pass serves (never the prepared set, never the reference).
POLICY_NEEDS = frozenset({Need.SQUARED_PROB_MASS})


@dataclass
class PairBatch:
    """Everything a loss may read about a batch of ``B`` preference pairs (all fields optional).

    See the module docstring for the naming. Derived views (:meth:`token_logps`,
    :meth:`sequence_logps`) fill in coarser values from finer ones.
    """

    policy_chosen_logps: Optional[torch.Tensor] = None
    policy_rejected_logps: Optional[torch.Tensor] = None
    reference_chosen_logps: Optional[torch.Tensor] = None
    reference_rejected_logps: Optional[torch.Tensor] = None

    policy_chosen_token_logps: Optional[torch.Tensor] = None
    policy_rejected_token_logps: Optional[torch.Tensor] = None
    reference_chosen_token_logps: Optional[torch.Tensor] = None
    reference_rejected_token_logps: Optional[torch.Tensor] = None
    chosen_mask: Optional[torch.Tensor] = None
    rejected_mask: Optional[torch.Tensor] = None

    policy_chosen_vocab_logps: Optional[torch.Tensor] = None
    policy_rejected_vocab_logps: Optional[torch.Tensor] = None
    reference_chosen_vocab_logps: Optional[torch.Tensor] = None
    reference_rejected_vocab_logps: Optional[torch.Tensor] = None
    chosen_labels: Optional[torch.Tensor] = None
    rejected_labels: Optional[torch.Tensor] = None
    reference_chosen_topk_logps: Optional[torch.Tensor] = None
    reference_rejected_topk_logps: Optional[torch.Tensor] = None
    reference_chosen_topk_ids: Optional[torch.Tensor] = None
    reference_rejected_topk_ids: Optional[torch.Tensor] = None
    reference_chosen_rest_logmass: Optional[torch.Tensor] = None
    reference_rejected_rest_logmass: Optional[torch.Tensor] = None

    is_tie: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    soft_label: Optional[torch.Tensor] = None
    behavior_chosen_logps: Optional[torch.Tensor] = None
    behavior_rejected_logps: Optional[torch.Tensor] = None

    policy_chosen_log_sq_mass: Optional[torch.Tensor] = None  # [B,T]: log Σ_v π_θ(v|·)² per position
    policy_rejected_log_sq_mass: Optional[torch.Tensor] = None

    generator: Optional[torch.Generator] = None
    seed: Optional[int] = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def has(self, name: str) -> bool:
        return getattr(self, name) is not None

    def get(self, name: str, needed_by: str = "this loss") -> Any:
        """The field ``name``, or a :class:`LossInputError` that names it and who needs it."""
        value = getattr(self, name)
        if value is None:
            raise LossInputError(f"{needed_by} needs `{name}`, which was not given")
        return value

    @property
    def batch_size(self) -> int:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value.shape[0]
        raise LossInputError("the batch holds no tensors")

    # ---------------------------------------------------------------- derived views
    def token_logps(self, model: str, side: str) -> torch.Tensor:
        """Per-token log-probs ``[B,T]`` of ``model`` ∈ {policy, reference} on ``side`` ∈ {chosen,
        rejected}: given directly, or gathered from the vocabulary log-probs at the labels."""
        direct = getattr(self, f"{model}_{side}_token_logps")
        if direct is not None:
            return direct
        vocab = getattr(self, f"{model}_{side}_vocab_logps")
        labels = getattr(self, f"{side}_labels")
        if vocab is not None and labels is not None:
            mask = self.mask(side).bool()
            if bool((((labels < 0) | (labels >= vocab.shape[-1])) & mask).any()):
                raise LossInputError(
                    f"`{side}_labels` holds token ids outside [0, {vocab.shape[-1]}) (the vocabulary of "
                    f"`{model}_{side}_vocab_logps`) on response positions"
                )
            # Labels at padding may be -100 (the HF convention); any index is fine there, it is masked.
            safe = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)
            picked = vocab.gather(-1, safe).squeeze(-1)
            return torch.where(mask, picked, torch.zeros_like(picked))
        raise LossInputError(
            f"needs `{model}_{side}_token_logps` (or `{model}_{side}_vocab_logps` with `{side}_labels`), "
            "which was not given"
        )

    def mask(self, side: str) -> torch.Tensor:
        mask = getattr(self, f"{side}_mask")
        if mask is None:
            raise LossInputError(f"needs `{side}_mask` (1 on response tokens, 0 on prompt and padding)")
        return mask

    def sequence_logps(self, model: str, side: str) -> torch.Tensor:
        """Summed log-probs ``[B]``: given directly, or the masked sum of the per-token values."""
        direct = getattr(self, f"{model}_{side}_logps")
        if direct is not None:
            return direct
        try:
            tokens = self.token_logps(model, side)
            mask = self.mask(side)
        except LossInputError:
            raise LossInputError(
                f"needs `{model}_{side}_logps` (or per-token values to sum: "
                f"`{model}_{side}_token_logps` with `{side}_mask`), which was not given"
            ) from None
        # Sum in at least fp32 (bf16 sums of hundreds of tokens lose whole nats), and select rather
        # than multiply so a -inf at a padding position cannot turn into NaN.
        tokens = upcast(tokens)
        return torch.where(mask.bool(), tokens, torch.zeros_like(tokens)).sum(-1)

    def log_ratios(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``ℓ_θ(y_w), ℓ_θ(y_l)`` with ``ℓ_θ(y) = log π_θ(y|x) − log π_ref(y|x)`` (docs/loss_maths.md, conventions), in at least fp32."""
        chosen = upcast(self.sequence_logps("policy", "chosen")) - upcast(
            self.sequence_logps("reference", "chosen")
        )
        rejected = upcast(self.sequence_logps("policy", "rejected")) - upcast(
            self.sequence_logps("reference", "rejected")
        )
        return chosen, rejected

    def make_generator(self, device: torch.device) -> torch.Generator:
        """The batch's generator, or one seeded from ``seed`` (a clear error when neither is given)."""
        if self.generator is not None:
            return self.generator
        if self.seed is None:
            raise LossInputError("needs `generator` (a torch.Generator) or `seed` (an int), neither was given")
        generator = torch.Generator(device=device)
        generator.manual_seed(int(self.seed))
        return generator


def upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 inputs are computed in fp32; float64 stays float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass
class LossOutput:
    """Per-pair losses ``[B]``, detached implicit rewards ``[B]`` and metrics.

    ``metrics`` values are detached tensors: shape ``[]`` or ``[B]`` values are logged (averaged over
    pairs) under ``loss/<name>``-style keys; higher-rank values (e.g. SamPO's selection masks) are for
    the caller only.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


# ==================================================================== the loss base class


class Loss:
    """Base of every registered loss.

    Subclasses set ``Config`` (a dataclass of hyperparameters with defaults and a ``__post_init__``
    that validates them), ``requires`` and ``optional`` (sets of :class:`Need`), ``paper`` and
    ``arxiv``, and implement :meth:`forward`.
    """

    Config: ClassVar[type]
    requires: ClassVar[frozenset] = frozenset({Need.SEQUENCE_LOGPS})
    optional: ClassVar[frozenset] = frozenset()
    paper: ClassVar[str] = ""
    arxiv: ClassVar[str] = ""
    # Where the implementation follows the paper rather than the official code (for docs/losses.md).
    implementation_notes: ClassVar[str] = ""

    name: str = ""  # the registered name this instance was built under
    options: LossOptions = LossOptions()  # use_weighting, sync_ref_model, ... (dpo_zoo.losses.options)

    def __init__(self, config: Any = None, **hparams: Any):
        if config is None:
            config = self.Config(**hparams)
        elif hparams:
            config = dataclasses.replace(config, **hparams)
        self.config = config

    # A reference-free loss (SimPO, CPO, ORPO, SFT) sets this: its needs then ask only for the policy's
    # side of the log-prob fields, the trainer loads no reference model and reads no reference column
    # from the prepared set, and such a loss trains on a set prepared with ``prep.reference=false``.
    reference_free: ClassVar[bool] = False

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs at all (``not reference_free``; a loss whose
        answer depends on its hyperparameters overrides this property)."""
        return not self.reference_free

    @property
    def accepts_topk_reference(self) -> bool:
        """For vocabulary-level losses: whether the reference's top-k distribution (what the on-disk
        cache stores) can stand in for the full one. Losses that rank every vocabulary entry say no,
        and then train against a live reference."""
        return True

    def needed_fields(self) -> List[str]:
        """The batch fields this configured loss requires (reference fields dropped if reference-free)."""
        out: List[str] = []
        for need in self.requires:
            for name in NEED_FIELDS[need]:
                if not self.needs_reference and name.startswith("reference_"):
                    continue
                out.append(name)
        return out

    @property
    def reference_sync(self) -> Optional[ReferenceSync]:
        """A reference the trainer must move during training (TR-DPO, ``sync_ref_model``), or None."""
        if not self.options.sync_ref_model:
            return None
        return ReferenceSync(alpha=float(self.options.ref_model_mixup_alpha), every=int(self.options.ref_model_sync_steps))

    def set_options(self, options: LossOptions) -> "Loss":
        """Apply the loss-independent options; their needs join the loss's."""
        if options.sync_ref_model and not self.needs_reference:
            raise LossConfigError(f"loss '{self.name}': sync_ref_model moves the reference, but this loss reads none")
        self.options = options
        if options.use_weighting:
            self.requires = frozenset(self.requires) | {Need.SQUARED_PROB_MASS}
        return self

    def components(self) -> List[Tuple[str, "Loss"]]:
        """``(name, loss)`` of the parts this loss sums (a mixture); a plain loss has none."""
        return []

    def __call__(self, batch: PairBatch) -> LossOutput:
        out = self.forward(batch)
        if self.options.use_weighting:  # WPO: each pair's loss times w(y_w)·w(y_l), no gradient through w
            weights = wpo_weights(batch)
            out.losses = out.losses * weights.to(out.losses.dtype)
            out.metrics["wpo_weight"] = weights
        return out

    def forward(self, batch: PairBatch) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def check_beta(beta: float) -> None:
    """β > 0, shared by every loss with a β (here, below every family, so that no family imports another
    for it)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
