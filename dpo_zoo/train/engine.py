"""The DeepSpeed engine the trainer steps: its config (batch sizes, clipping, precision and ZeRO from
``train.*``, over an optional ``train.deepspeed.config_file``), the optimizer, the learning-rate
schedule, and checkpoint loading that never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import json
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
    ds["bf16"] = {"enabled": deepspeed_bf16(cfg)}
    ds.setdefault("zero_allow_untested_optimizer", True)
    if "offload_optimizer" in zero:
        # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam, built from this section.
        ds.setdefault("optimizer", {
            "type": "AdamW",
            "params": {"lr": t.learning_rate, "weight_decay": t.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        })
    return ds


def deepspeed_bf16(cfg) -> bool:
    """Whether ``train.precision=bfloat16`` uses DeepSpeed's bf16 mode (bf16 weights in the module, fp32
    master copies inside DeepSpeed's optimizer): only with ZeRO-3, where partitioned bf16 weights halve
    what each rank holds and gathers. Otherwise the module keeps fp32 weights and the forward runs under
    :func:`forward_precision` (``torch.autocast``). Why not DeepSpeed's mode everywhere: it moves every
    parameter or gradient between its bf16 and fp32 copies about five times a step; profiled on
    SmolLM2-135M full fine-tuning on 2 CPU threads that was a quarter of a bf16 step, more than the
    forward's attention, while autocast casts each weight once per forward."""
    if cfg.train.precision != "bfloat16":
        return False
    stage = cfg.train.deepspeed.zero_stage
    if stage is None and cfg.train.deepspeed.config_file:
        stage = json.loads(Path(cfg.train.deepspeed.config_file).read_text()).get("zero_optimization", {}).get("stage")
    return stage == 3


def forward_precision(cfg, device: torch.device):
    """A factory of the context the policy's (and a live reference's) forward and the loss run in: bf16
    autocast for ``train.precision=bfloat16`` outside DeepSpeed's own bf16 mode (:func:`deepspeed_bf16`),
    else none. Decided once here (the DeepSpeed file is read at most once), entered every micro-batch.
    Under autocast the linear layers' matrix products take bf16 inputs (fp32 weights cast once per
    forward, the gradient cast back to fp32 for the optimizer); norms, softmax normalisers and the loss
    stay fp32. The backward pass runs outside it, as torch recommends."""
    if cfg.train.precision != "bfloat16" or deepspeed_bf16(cfg):
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# train.lr_schedule -> the name `transformers.get_scheduler` knows it by. Every schedule warms up
# linearly over train.warmup_steps (so `constant` is transformers' constant_with_warmup).
SCHEDULES = {
    "constant": "constant_with_warmup",
    "linear": "linear",
    "cosine": "cosine",
    "cosine_with_min_lr": "cosine_with_min_lr",
    "warmup_stable_decay": "warmup_stable_decay",
}


def schedule(t, total_steps: int):
    """``optimizer -> LambdaLR`` for ``train.lr_schedule`` over ``total_steps`` optimizer steps, built by
    ``transformers.get_scheduler``: the rate of step ``k`` (0-based) is the peak times the schedule's
    factor at ``k``; after warm-up, linear and cosine reach 0 at ``total_steps``, ``cosine_with_min_lr``
    and ``warmup_stable_decay`` reach ``train.min_lr_ratio`` × peak (the latter holds the peak until its
    last ``train.decay_steps`` steps). Its state dict holds numbers only (reloads with ``weights_only``)."""
    from transformers import get_scheduler

    extra: Dict[str, Any] = {}
    if t.lr_schedule == "cosine_with_min_lr":
        extra = {"min_lr_rate": float(t.min_lr_ratio or 0.0)}
    elif t.lr_schedule == "warmup_stable_decay":
        extra = {"num_decay_steps": int(t.decay_steps), "min_lr_ratio": float(t.min_lr_ratio or 0.0)}
    return lambda optimizer: get_scheduler(SCHEDULES[t.lr_schedule], optimizer, num_warmup_steps=int(t.warmup_steps),
                                           num_training_steps=total_steps, scheduler_specific_kwargs=extra)


def build_engine(cfg, policy, world_size: int, total_steps: int):
    """The DeepSpeed engine over ``policy``: AdamW (or DeepSpeed's own with ZeRO-Offload) and the
    learning-rate schedule over ``total_steps``. Use it inside the launcher environment
    (:func:`dpo_zoo.parallel.process_group.launcher_environment`): DeepSpeed reads ``LOCAL_RANK``."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size)
    params = [p for p in policy.parameters() if p.requires_grad]
    if "optimizer" in ds_config:
        optimizer = None
    else:
        # torch's fused AdamW kernel (CPU and CUDA): the same update as the per-tensor loop in one pass
        # over each parameter, its gradient and its two moments (on CPU the per-tensor loop is torch's default).
        optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                                      fused=True)
    engine, _, _, _ = deepspeed.initialize(
        model=policy,
        model_parameters=params,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=schedule(cfg.train, total_steps),
    )
    _use_safe_checkpoint_loading(engine)
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # One process, no partitioning: DeepSpeed's gradient all-reduce would only copy every gradient
        # into flat buckets and back (a sum over one rank, divided by 1).
        engine.enable_backward_allreduce = False
    return engine


def _use_safe_checkpoint_loading(engine) -> None:
    """DeepSpeed loads its checkpoint files with ``weights_only=False`` (full unpickling). Swap in an
    engine that loads with ``weights_only=True`` and allows only the few DeepSpeed types its files hold."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from dpo_zoo.model.safe_load import safe_torch_load

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    current = engine.checkpoint_engine
    if isinstance(current, TorchCheckpointEngine):
        safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
        safe.__dict__.update(current.__dict__)
        engine.checkpoint_engine = safe
