"""Loss mixtures: ``loss=dpo+sft`` is ``L_i = w_1 · L_dpo,i + w_2 · L_sft,i`` per pair.

A mixture is named by its parts joined with ``+`` (any registered names, TRL's among them, so TRL's
MPO, ``loss_type=["sigmoid", "bco_pair", "sft"]``, is ``loss=sigmoid+bco_pair+sft``). It is built by
the registry like any other name, so the trainer, the cache and compare treat it as one loss:

* **weights**: ``loss.weights=[1.0, 0.2]``, one finite number per part, in order (default all 1;
  TRL's ``loss_weights``). The per-pair loss is the weighted sum of the parts' per-pair losses, so
  the trainer's mean over pairs gives ``Σ_k w_k · mean_i L_k,i``, TRL's ``Σ_k w_k · L_k``.
* **hyperparameters per part**: ``loss.<part>.<key>=v`` (e.g. ``loss.dpo.beta=0.05``). A key without a
  part, ``loss.<key>=v`` (e.g. ``loss.beta=0.05``), is shared: it sets ``<key>`` on every part that has
  it, as TRL's one ``beta`` does, and is an error when no part has it. A part's own key wins over a
  shared one. The resolved config lists every part's keys as ``<part>.<key>``.
* **needs add up**: the mixture requires what any part requires; it needs the reference when any part
  does, takes a top-k reference only when every part does, and samples when any part samples.
* **outputs**: rewards and ``win_prob`` / ``tie_prob`` are the first part's (TRL too logs one reward,
  ``β·log-ratio``); ``loss/<part>`` carries each part's own (unweighted) per-pair loss, and each part's
  metrics are logged as ``<part>/<metric>``.
* **compare** scores a run trained on a mixture under the mixture and under each part alone (with the
  hyperparameters it had in the mixture), labelled ``<run>:<part>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .base import Loss, LossConfigError, LossOutput, PairBatch
from .registry import RegisteredLoss, add_name_resolver, apply_options, hparam_type_problems
from .options import OPTION_KEYS, LossOptions

SEPARATOR = "+"


def is_mixture_name(name: str) -> bool:
    return SEPARATOR in name


@dataclass
class MixtureConfig:
    """``weights``: one multiplier per part, in the order of the name (default 1 each)."""

    weights: List[float] = field(default_factory=list)


class MixtureLoss(Loss):
    """A weighted sum of registered losses, evaluated on one batch (see the module docstring)."""

    Config = MixtureConfig
    paper = "Mixture of registered losses (TRL's loss_type list with loss_weights)"

    def __init__(self, parts: Sequence[Tuple[str, Loss]], weights: Sequence[float]):
        super().__init__(MixtureConfig(weights=[float(w) for w in weights]))
        self.parts = list(parts)
        self.requires = frozenset().union(*(part.requires for _, part in self.parts))
        self.optional = frozenset().union(*(part.optional for _, part in self.parts)) - self.requires

    @property
    def needs_reference(self) -> bool:
        return any(part.needs_reference for _, part in self.parts)

    @property
    def accepts_topk_reference(self) -> bool:
        return all(part.accepts_topk_reference for _, part in self.parts)

    def components(self) -> List[Tuple[str, Loss]]:
        return list(self.parts)

    def forward(self, batch: PairBatch) -> LossOutput:
        total = None
        metrics: Dict[str, torch.Tensor] = {}
        first = None
        for (name, part), weight in zip(self.parts, self.config.weights):
            out = part(batch)
            first = out if first is None else first
            total = weight * out.losses if total is None else total + weight * out.losses
            metrics[f"loss/{name}"] = out.losses.detach()
            for key, value in out.metrics.items():
                metrics[f"{name}/{key.split('/', 1)[-1] if key.startswith('loss/') else key}"] = value
        for key in ("win_prob", "tie_prob"):
            if key in first.metrics:
                metrics[key] = first.metrics[key]
        return LossOutput(losses=total, chosen_rewards=first.chosen_rewards,
                          rejected_rewards=first.rejected_rewards, metrics=metrics)

    def __repr__(self) -> str:
        return f"MixtureLoss({', '.join(f'{w:g}×{p!r}' for (_, p), w in zip(self.parts, self.config.weights))})"


@dataclass(frozen=True)
class MixtureEntry:
    """The registry's view of ``a+b+...``: the same interface as a :class:`RegisteredLoss`
    (``defaults``, ``build``, ...), with hyperparameters keyed ``<part>.<key>``."""

    name: str
    parts: Tuple[RegisteredLoss, ...]
    cls: type = MixtureLoss
    presets: Mapping[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return "mixture of " + ", ".join(p.name for p in self.parts)

    def defaults(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"weights": [1.0] * len(self.parts)}
        for part in self.parts:
            out.update({f"{part.name}.{key}": value for key, value in part.defaults().items()})
        return out

    def expand_shared(self, hparams: Mapping[str, Any]) -> Dict[str, Any]:
        """Shared keys (no part prefix, not ``weights``) become ``<part>.<key>`` for every part that has
        the key; a part's own setting wins. Keys no part has are kept as they are (and reported as
        unknown by the caller)."""
        top_level = ("weights", *OPTION_KEYS)  # the mixture's own keys, not its parts'
        out = {k: v for k, v in hparams.items() if "." in k or k in top_level}
        for key, value in hparams.items():
            if "." in key or key in top_level:
                continue
            owners = [p.name for p in self.parts if key in p.defaults()]
            if not owners:
                out[key] = value
            for owner in owners:
                out.setdefault(f"{owner}.{key}", value)
        return out

    def type_problems(self, values: Mapping[str, Any]) -> Dict[str, str]:
        problems = {}
        if "weights" in values:
            weights = values["weights"]
            if not isinstance(weights, Sequence) or isinstance(weights, str) or len(weights) != len(self.parts) or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
                problems["weights"] = (f"expected a list of {len(self.parts)} finite numbers (one per part: "
                                       f"{', '.join(p.name for p in self.parts)}), got {weights!r}")
        for part, own in self._split(values):
            for key, problem in part.type_problems(own).items():
                problems[f"{part.name}.{key}"] = problem
        problems.update(hparam_type_problems(LossOptions, values))
        return problems

    def _split(self, values: Mapping[str, Any]) -> List[Tuple[RegisteredLoss, Dict[str, Any]]]:
        """Each part with the values keyed ``<its name>.<key>``, as ``{key: value}``."""
        out: List[Tuple[RegisteredLoss, Dict[str, Any]]] = []
        for part in self.parts:
            prefix = f"{part.name}."
            out.append((part, {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}))
        return out

    def components(self, hparams: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
        """``(part name, its hyperparameters)`` of each part, for scoring the parts on their own."""
        expanded = self.expand_shared(hparams)
        return [(part.name, own) for part, own in self._split(expanded)]

    def build(self, **hparams: Any) -> MixtureLoss:
        values = self.expand_shared(hparams)
        options = {k: values.pop(k) for k in list(values) if k in OPTION_KEYS}
        known = set(self.defaults())
        unknown = sorted(set(values) - known)
        if unknown:
            raise LossConfigError(
                f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for loss '{self.name}'; "
                f"known: weights, <part>.<key> ({', '.join(sorted(k for k in known if k != 'weights'))}) "
                "or a key of some part, shared by every part that has it"
            )
        wrong = self.type_problems(values)
        if wrong:
            raise LossConfigError(
                f"loss '{self.name}': " + "; ".join(f"`{key}`: {problem}" for key, problem in wrong.items())
            )
        weights = values.get("weights", [1.0] * len(self.parts))
        parts = [(part.name, part.build(**own)) for part, own in self._split(values)]
        loss = MixtureLoss(parts, weights)
        loss.name = self.name
        return apply_options(loss, options)


def mixture_entry(name: str, lookup) -> Optional[MixtureEntry]:
    """The entry of ``a+b+...`` (None for a name without ``+``); ``lookup`` finds a part's
    :class:`RegisteredLoss` by name."""
    if not is_mixture_name(name):
        return None
    names = [part.strip() for part in name.split(SEPARATOR)]
    if any(not part for part in names):
        raise LossConfigError(f"loss '{name}': an empty part in the mixture (write parts as a+b)")
    repeated = sorted({part for part in names if names.count(part) > 1})
    if repeated:
        raise LossConfigError(f"loss '{name}': {', '.join(repeated)} appears twice; a mixture names each part once "
                              "(weight it with loss.weights instead)")
    return MixtureEntry(name=SEPARATOR.join(names), parts=tuple(lookup(part) for part in names))


add_name_resolver(mixture_entry)
