"""The loss contract: what a loss needs, what it is given, what it returns, and the registry.

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
import importlib
import inspect
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple, Type

import torch

from ..errors import LossConfigError, LossInputError  # defined with the other user errors
from .options import OPTION_KEYS, LossOptions, ReferenceSync, wpo_weights


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


# ==================================================================== the registry


@dataclass(frozen=True)
class RegisteredLoss:
    """One name in the registry: a loss class plus the hyperparameters this name presets."""

    name: str
    cls: Type[Loss]
    presets: Mapping[str, Any]
    summary: str

    def defaults(self) -> Dict[str, Any]:
        """Every hyperparameter of this name with its default (class defaults, then the presets)."""
        out = {}
        for f in fields(self.cls.Config):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        out.update(self.presets)
        return out

    def build(self, **hparams: Any) -> Loss:
        options = {k: hparams.pop(k) for k in list(hparams) if k in OPTION_KEYS}
        known = {f.name for f in fields(self.cls.Config)}
        unknown = sorted(set(hparams) - known)
        if unknown:
            raise LossConfigError(
                f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for loss '{self.name}'; "
                f"known: {', '.join(sorted(known))}"
            )
        values = {**self.presets, **hparams}
        wrong = hparam_type_problems(self.cls.Config, values)
        if wrong:
            raise LossConfigError(
                f"loss '{self.name}': " + "; ".join(f"`{key}`: {problem}" for key, problem in wrong.items())
            )
        try:
            config = self.cls.Config(**values)
        except (TypeError, ValueError) as err:
            raise LossConfigError(f"loss '{self.name}': {err}") from None
        loss = self.cls(config)
        loss.name = self.name
        return apply_options(loss, options)

    # The same interface as a mixture's entry (dpo_zoo.losses.mixture.MixtureEntry), which config and
    # compare use without asking which kind of entry they hold.
    def expand_shared(self, hparams: Mapping[str, Any]) -> Dict[str, Any]:
        """The hyperparameters as this entry keys them (a plain loss: unchanged)."""
        return dict(hparams)

    def type_problems(self, values: Mapping[str, Any]) -> Dict[str, str]:
        return {**hparam_type_problems(self.cls.Config, values), **hparam_type_problems(LossOptions, values)}

    def components(self, hparams: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
        """The parts a mixture is made of, with their hyperparameters (a plain loss: none)."""
        return []


def apply_options(loss: Loss, values: Mapping[str, Any]) -> Loss:
    """``loss`` with the options in ``values`` (keys of :class:`LossOptions`), checked."""
    if not values:
        return loss
    wrong = hparam_type_problems(LossOptions, values)
    if wrong:
        raise LossConfigError(f"loss '{loss.name}': " + "; ".join(f"`{k}`: {p}" for k, p in wrong.items()))
    try:
        options = LossOptions(**values)
    except (TypeError, ValueError) as err:
        raise LossConfigError(f"loss '{loss.name}': {err}") from None
    return loss.set_options(options)


# What each declared hyperparameter type accepts, and how an error names it. A bool is not taken for a
# number (``True`` is an ``int`` to Python, but ``beta=true`` is a mistake), and an int is a fine float.
_TYPE_NAMES = {float: "a number (float)", int: "an integer", bool: "a boolean (true or false)", str: "a string"}


def _accepts(kind: Any, value: Any) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (bool, str):
        return isinstance(value, kind)
    return True  # a type this check does not know: left to the Config's own validation


def hparam_type_problems(config_cls: type, values: Mapping[str, Any]) -> Dict[str, str]:
    """``{name: "expected <type>, got <value> (<its type>)"}`` for each value in ``values`` that is not
    of the type its field in the ``config_cls`` dataclass declares (``Optional[X]`` also accepts
    ``None``). Checked before the dataclass is built, so ``beta="abc"`` is named as a wrong type
    rather than failing inside a range check."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # a plugin's annotation that does not resolve: its Config validates on its own
        return {}
    problems = {}
    for name, value in values.items():
        if name not in hints:
            continue
        kinds = [hints[name]]
        if typing.get_origin(hints[name]) is typing.Union:
            kinds = [k for k in typing.get_args(hints[name]) if k is not type(None)]
            if value is None:
                continue
        if len(kinds) != 1 or kinds[0] not in _TYPE_NAMES or _accepts(kinds[0], value):
            continue
        expected = _TYPE_NAMES[kinds[0]] + (" or null" if hints[name] is not kinds[0] else "")
        problems[name] = f"expected {expected}, got {value!r} ({type(value).__name__})"
    return problems


_REGISTRY: Dict[str, RegisteredLoss] = {}
_PLUGINS_LOADED = False


def register_loss(name: str, summary: str = "", **presets: Any) -> Callable[[Type[Loss]], Type[Loss]]:
    """Class decorator: register ``cls`` under ``name``, optionally with preset hyperparameters.

    Stack it to register variants of one class (e.g. ``tdpo`` is ``ra_dpo`` with ``risk="kl"``)::

        @register_loss("tdpo", risk="kl")
        @register_loss("ra_dpo")
        class RaDPOLoss(Loss): ...
    """

    def decorate(cls: Type[Loss]) -> Type[Loss]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"loss name '{name}' is already registered by {_REGISTRY[name].cls.__name__}")
        known = {f.name for f in fields(cls.Config)}
        bad = sorted(set(presets) - known)
        if bad:
            raise ValueError(f"presets {bad} of '{name}' are not hyperparameters of {cls.__name__}")
        first_line = (summary or (inspect.getdoc(cls) or "").split("\n")[0]).strip()
        _REGISTRY[name] = RegisteredLoss(name=name, cls=cls, presets=dict(presets), summary=first_line)
        cls.Config(**presets)  # fail at import time if a preset is out of range
        return cls

    return decorate


def _load_plugins() -> None:
    """Third-party losses: modules named by the ``dpo_zoo.losses`` entry-point group are imported
    (each registers itself with :func:`register_loss`)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="dpo_zoo.losses"):
        ep.load()


def load_loss_plugin(path: str) -> None:
    """Import a module (``pkg.mod``) or an object (``pkg.mod:Obj``) that registers losses."""
    module, _, attr = path.partition(":")
    mod = importlib.import_module(module)
    if attr:
        getattr(mod, attr)


# Names built on demand rather than registered (``a+b``: dpo_zoo.losses.mixture adds its resolver here):
# each resolver returns an entry for a name it recognises, else None.
_NAME_RESOLVERS: List[Callable[[str, Callable[[str], RegisteredLoss]], Optional[RegisteredLoss]]] = []


def add_name_resolver(resolver: Callable[[str, Callable[[str], RegisteredLoss]], Optional[RegisteredLoss]]) -> None:
    """Let ``resolver(name, lookup)`` build entries for names that are not registered one by one."""
    if resolver not in _NAME_RESOLVERS:
        _NAME_RESOLVERS.append(resolver)


def registered_losses() -> Dict[str, RegisteredLoss]:
    _load_plugins()
    return dict(_REGISTRY)


def get_loss_entry(name: str) -> RegisteredLoss:
    """The registry entry of ``name``; ``a+b+...`` is a mixture of registered losses
    (:mod:`dpo_zoo.losses.mixture`), built on demand with the same interface."""
    _load_plugins()
    for resolve in _NAME_RESOLVERS:
        entry = resolve(name, get_loss_entry)
        if entry is not None:
            return entry
    if name not in _REGISTRY:
        raise LossConfigError(f"unknown loss '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_loss(name: str, **hparams: Any) -> Loss:
    """The loss registered as ``name`` with hyperparameters ``hparams`` (validated)."""
    return get_loss_entry(name).build(**hparams)


def check_inputs(loss: Loss, batch: PairBatch) -> None:
    """Raise a :class:`LossInputError` naming the first required tensor that is missing.

    Derivable views count as present (e.g. sequence log-probs from token log-probs and masks).
    """
    who = f"loss '{loss.name or type(loss).__name__}'"
    for need in sorted(loss.requires, key=lambda n: n.value):
        try:
            if need is Need.SEQUENCE_LOGPS:
                models = ("policy", "reference") if loss.needs_reference else ("policy",)
                for model in models:
                    for side in ("chosen", "rejected"):
                        batch.sequence_logps(model, side)
            elif need is Need.TOKEN_LOGPS:
                models = ("policy", "reference") if loss.needs_reference else ("policy",)
                for model in models:
                    for side in ("chosen", "rejected"):
                        batch.token_logps(model, side)
                batch.mask("chosen"), batch.mask("rejected")
            elif need is Need.VOCAB_LOGPS:
                for side in ("chosen", "rejected"):
                    batch.get(f"policy_{side}_vocab_logps", who)
                    batch.get(f"{side}_labels", who)
                    batch.mask(side)
                    if loss.needs_reference and not batch.has(f"reference_{side}_vocab_logps"):
                        if not batch.has(f"reference_{side}_topk_logps"):
                            raise LossInputError(
                                f"needs `reference_{side}_vocab_logps` (or its top-k: "
                                f"`reference_{side}_topk_logps` with `reference_{side}_topk_ids`)"
                            )
                        batch.get(f"reference_{side}_topk_ids", who)
            elif need is Need.GENERATOR:
                if batch.generator is None and batch.seed is None:
                    raise LossInputError("needs `generator` (a torch.Generator) or `seed` (an int)")
            else:
                for name in NEED_FIELDS[need]:
                    batch.get(name, who)
        except LossInputError as err:
            message = str(err)
            if not message.startswith(who):
                message = f"{who} {message}"
            raise LossInputError(message) from None


def compute_loss(name: str, **tensors_and_hparams: Any) -> LossOutput:
    """Functional entry point for people who already have log-probs.

    Keyword arguments named like :class:`PairBatch` fields are tensors; every other keyword is a
    hyperparameter of the loss, by its documented name. Example::

        out = compute_loss("dpo", policy_chosen_logps=pc, policy_rejected_logps=pr,
                           reference_chosen_logps=rc, reference_rejected_logps=rr, beta=0.1)
        out.losses.mean().backward()
    """
    batch_fields = set(PairBatch.field_names())
    tensors = {k: v for k, v in tensors_and_hparams.items() if k in batch_fields}
    hparams = {k: v for k, v in tensors_and_hparams.items() if k not in batch_fields}
    loss = build_loss(name, **hparams)
    batch = PairBatch(**_as_tensors(tensors))
    check_shapes(batch)
    check_inputs(loss, batch)
    return loss(batch)


# Inputs that are not tensors: everything else given as a list, a NumPy array or a number is converted.
_NOT_TENSORS = ("generator", "seed")


def _as_tensors(values: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key in _NOT_TENSORS or value is None or isinstance(value, torch.Tensor):
            out[key] = value
            continue
        try:
            out[key] = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise LossInputError(f"`{key}`: expected a tensor (or a list / array of numbers), got "
                                 f"{type(value).__name__} ({err})") from None
    return out


def check_shapes(batch: PairBatch) -> None:
    """Raise a :class:`LossInputError` naming the tensors whose shapes disagree: every tensor has the
    pair dimension ``B`` first; pair-level values are ``[B]``; per-token values, labels and masks of a
    side share ``[B, T]``; vocabulary and top-k tensors are ``[B, T, ·]`` of their side."""
    shapes = {name: tuple(getattr(batch, name).shape) for name in PairBatch.field_names()
              if name not in _NOT_TENSORS and isinstance(getattr(batch, name), torch.Tensor)}
    if not shapes:
        return
    first = next(iter(shapes))
    if any(len(shape) == 0 for shape in shapes.values()):
        scalar = next(n for n, shape in shapes.items() if len(shape) == 0)
        raise LossInputError(f"`{scalar}` is a scalar; every input has the pair dimension first ([B] or [B, ...])")
    pairs = shapes[first][0]
    for name, shape in shapes.items():
        if shape[0] != pairs:
            raise LossInputError(f"`{name}` has {shape[0]} pairs (shape {list(shape)}) but `{first}` has {pairs} "
                                 f"(shape {list(shapes[first])}); all inputs describe the same B pairs")
        per_token = "token_logps" in name or name.endswith(("_mask", "_labels", "_log_sq_mass")) or "_topk_" in name \
            or "_vocab_" in name or name.endswith("_rest_logmass")
        expected_dims = 3 if ("_vocab_" in name or "_topk_" in name) else 2 if per_token else 1
        if len(shape) != expected_dims:
            raise LossInputError(f"`{name}` has shape {list(shape)}; expected {expected_dims} dimensions "
                                 f"({'[B]' if expected_dims == 1 else '[B, T]' if expected_dims == 2 else '[B, T, V or k]'})")
    for side in ("chosen", "rejected"):
        side_shapes = {n: shape[:2] for n, shape in shapes.items() if f"_{side}_" in f"_{n}_" and len(shape) >= 2}
        if len(set(side_shapes.values())) > 1:
            listing = ", ".join(f"`{n}` {list(shapes[n])}" for n in side_shapes)
            raise LossInputError(f"the {side} side's per-token inputs disagree on [B, T]: {listing}")
        for kind, names in (("vocabulary", (f"policy_{side}_vocab_logps", f"reference_{side}_vocab_logps")),
                            ("top-k", (f"reference_{side}_topk_logps", f"reference_{side}_topk_ids"))):
            present = [n for n in names if n in shapes]
            if len({shapes[n] for n in present}) > 1:
                listing = ", ".join(f"`{n}` {list(shapes[n])}" for n in present)
                raise LossInputError(f"the {side} side's {kind} inputs disagree in shape: {listing}")


def describe_needs(entry: RegisteredLoss) -> List[str]:
    """Human-readable needs of a registered name (optional ones in brackets)."""
    cls = entry.cls
    out = [n.value for n in sorted(cls.requires, key=lambda n: n.value)]
    out += [f"[{n.value}]" for n in sorted(cls.optional, key=lambda n: n.value)]
    if not cls(cls.Config(**entry.presets)).needs_reference:
        out.append("no reference")
    return out


def check_beta(beta: float) -> None:
    """β > 0, shared by every loss with a β (here, below every family, so that no family imports another
    for it)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
