"""The DeepSpeed engine the trainer steps: its config (batch sizes, clipping, precision and ZeRO from
``train.*``, over an optional ``train.deepspeed.config_file``), the optimizer, the learning-rate
schedule, and checkpoint loading that never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

import torch


def deepspeed_config(cfg, world_size: int) -> Dict[str, Any]:
    t = cfg.train
    ds: Dict[str, Any] = {}
    if t.deepspeed.config_file:
        ds = json.loads(Path(t.deepspeed.config_file).read_text())
    ds.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        train_batch_size=t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        gradient_clipping=t.max_grad_norm,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    zero = dict(ds.get("zero_optimization", {}))
    if t.deepspeed.zero_stage is not None or "stage" not in zero:
        zero["stage"] = t.deepspeed.zero_stage or 0
    if t.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if t.deepspeed.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    ds["zero_optimization"] = zero
    ds["bf16"] = {"enabled": t.precision == "bfloat16"}
    ds.setdefault("zero_allow_untested_optimizer", True)
    if "offload_optimizer" in zero:
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam, built from this section.
        ds.setdefault("optimizer", {
            "type": "AdamW",
            "params": {"lr": t.learning_rate, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        })
    return ds


class LinearWarmupSchedule:
    """LR factor: linear warm-up over ``warmup_steps``, then constant, linear or cosine decay to 0 at
    ``max_steps``. A plain object (not a lambda) so the scheduler's state dict holds only numbers and
    reloads with ``weights_only=True``."""

    def __init__(self, warmup_steps: int, max_steps: int, kind: str):
        self.warmup_steps, self.max_steps, self.kind = warmup_steps, max_steps, kind

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(cfg, policy, world_size: int):
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    params = [p for p in policy.parameters() if p.requires_grad]
    if "optimizer" in ds_config:
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    t = cfg.train
    schedule = LinearWarmupSchedule(t.warmup_steps, t.max_steps, t.lr_schedule)
    engine, _, _, _ = deepspeed.initialize(
        model=policy,
        model_parameters=params,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    _use_safe_checkpoint_loading(engine)
    return engine


def _use_safe_checkpoint_loading(engine) -> None:
    """DeepSpeed loads its checkpoint files with ``weights_only=False`` (full unpickling). Swap in an
    engine that loads with ``weights_only=True`` and allows only the few DeepSpeed types its files hold."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from .safe_load import safe_torch_load

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    current = engine.checkpoint_engine
    if isinstance(current, TorchCheckpointEngine):
        safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
        safe.__dict__.update(current.__dict__)
        engine.checkpoint_engine = safe
