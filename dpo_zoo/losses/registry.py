"""The registry: every registered loss name, its hyperparameter checks, and the calls that build a loss
from a name (``build_loss``) or compute one from tensors (``compute_loss``).

The contract a loss implements (``Need``, ``PairBatch``, ``LossOutput``, ``Loss``) is in
:mod:`dpo_zoo.losses.base`; this module only keeps the names and checks what callers hand in.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

import torch

from ..errors import LossConfigError, LossInputError
from .base import NEED_FIELDS, Loss, LossOutput, Need, PairBatch
from .options import OPTION_KEYS, LossOptions


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
