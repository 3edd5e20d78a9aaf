"""Options any loss takes: TRL's trainer options that change the objective, whatever the loss.

Set them beside a loss's hyperparameters (``loss=dpo loss.use_weighting=true``; on a mixture they apply
to the whole sum, ``loss=dpo+sft loss.sync_ref_model=true``). They are TRL's names and defaults
(``DPOConfig`` of TRL 1.16), and a resolved config lists only those that were set.

* ``use_weighting`` (WPO; Zhou et al., *WPO: Enhancing RLHF with Weighted Preference Optimization*,
  EMNLP 2024, arXiv:2406.11827, Eq. 2). Each pair's loss is multiplied by ``w(y_w) · w(y_l)`` with

      w(y) = exp( (1/|y|) Σ_t [ log π_θ(y_t|x, y_<t) − log Σ_v π_θ(v|x, y_<t)² ] )

  (TRL's "aligned" weight: the per-token probability relative to the policy's own expected
  probability, averaged in log space over the completion), computed without gradient. It asks the
  batch for the policy's per-token ``log Σ_v π_θ(v)²`` (the need `squared_prob_mass`), which the
  one log-prob path computes from the logits it already has.
* ``sync_ref_model``, ``ref_model_mixup_alpha`` (α, 0.6), ``ref_model_sync_steps`` (τ, 512)
  (TR-DPO; Gorbatovski et al., *Learn Your Reference Model for Real Good Alignment*,
  arXiv:2404.09656). Every τ optimizer steps the reference becomes ``α·π_θ + (1−α)·π_ref``
  (a soft update of every parameter). The loss then declares a reference that moves
  (`Loss.reference_sync`): the trainer runs it live (a cache of fixed reference log-probs is
  refused, as TRL refuses ``precompute_ref_log_probs``), keeps a separate copy (not possible with
  LoRA, whose reference is the adapter-free base: refused, as in TRL), applies the update and stores
  the reference's weights in each checkpoint so a resumed run continues from the same reference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
import torch


@dataclass(frozen=True)
class LossOptions:
    """The options of one loss (see the module docstring); all off by default."""

    use_weighting: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    def __post_init__(self):
        if not (isinstance(self.ref_model_mixup_alpha, (int, float)) and 0.0 <= self.ref_model_mixup_alpha <= 1.0):
            raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}")
        if not (isinstance(self.ref_model_sync_steps, int) and self.ref_model_sync_steps >= 1):
            raise ValueError(f"ref_model_sync_steps must be an integer >= 1, got {self.ref_model_sync_steps}")


OPTION_KEYS = tuple(f.name for f in fields(LossOptions))


@dataclass(frozen=True)
class ReferenceSync:
    """A reference that moves during training: every ``every`` optimizer steps,
    ``π_ref ← alpha · π_θ + (1 − alpha) · π_ref`` parameter by parameter (TR-DPO's soft update)."""

    alpha: float
    every: int

    def due(self, steps_done: int) -> bool:
        """Whether the update follows optimizer step number ``steps_done`` (1-based, as TRL's global_step)."""
        return steps_done > 0 and steps_done % self.every == 0


def wpo_weights(batch) -> torch.Tensor:
    """``w(y_w) · w(y_l)`` per pair [B] (see the module docstring), detached, in at least float32."""
    weight = None
    for side in ("chosen", "rejected"):
        with torch.no_grad():
            tokens = batch.token_logps("policy", side).detach()
            squared = batch.get(f"policy_{side}_log_sq_mass", "use_weighting (WPO)").detach()
            mask = batch.mask(side).bool()
            dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
            aligned = torch.where(mask, tokens.to(dtype) - squared.to(dtype), torch.zeros((), dtype=dtype))
            side_weight = torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1).to(dtype))
        weight = side_weight if weight is None else weight * side_weight
    return weight


def soft_update(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """``reference ← alpha · policy + (1 − alpha) · reference`` in place, parameter by parameter,
    matched by name (a reference of another architecture is an error naming the first mismatch).
    Under ZeRO-3 the policy's partitioned parameters are gathered first."""
    policy_params = dict(policy.named_parameters())
    reference_params = dict(reference.named_parameters())
    if policy_params.keys() != reference_params.keys():
        missing = sorted(set(policy_params) ^ set(reference_params))
        raise ValueError(f"cannot sync the reference: its parameters differ from the policy's (first: {missing[0]})")
    gathered = _gathered(list(policy_params.values()))
    with gathered, torch.no_grad():
        for name, target in reference_params.items():
            source = policy_params[name].detach().to(device=target.device, dtype=target.dtype)
            target.mul_(1.0 - alpha).add_(source, alpha=alpha)


def _gathered(params):
    """DeepSpeed's gather of ZeRO-3 partitioned parameters (a no-op context for ordinary ones)."""
    import contextlib

    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

