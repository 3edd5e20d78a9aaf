"""A reference model partitioned across the prep processes (DeepSpeed ZeRO-3 inference, ``prep.zero3``).

Each of the W processes keeps 1/W of every parameter. The model is partitioned while it loads
(``transformers`` builds it under ``deepspeed.zero.Init`` when a ZeRO-3 config is registered), so no
process ever holds all of it at once; during a forward pass each layer's full weights are gathered
just before the layer runs and released after it (ZeRO-3's parameter hooks). The values are those of
the unsharded model: the gathered weights are the original ones, bit for bit, and each process runs
its own batches, so the cache is the one a single process writes.

The price is lockstep: a gather is a collective, so every process must run the same number of forward
passes. :class:`Lockstep` counts this process's passes, and after its own batches
:meth:`Lockstep.finish` runs one-token passes until it has run as many as the busiest process.

Training uses the same partitioning for its live reference when the policy trains under ZeRO-3 on
several processes (:func:`partitioned_reference_wanted`): the reference then costs each process 1/W of
its weights, as the policy's parameters do. Every rank runs the same micro-batches per step, so training
is in lockstep by construction; the held-out evaluation, where ranks may hold different numbers of
batches, is evened out by :func:`lockstep_batches`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch


def zero3_inference_config(dtype: torch.dtype) -> Dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


def load_partitioned(path: Path, dtype: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of ``path``, partitioned over the process group as it loads; in eval mode."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from .models import load_model, torch_dtype

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    config = zero3_inference_config(torch_dtype(dtype))
    registered = HfDeepSpeedConfig(config)  # while alive, from_pretrained loads under zero.Init
    model = load_model(path, dtype, trust_remote_code=trust_remote_code)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    del registered
    return engine.module.eval()


def partitioned_reference_wanted(zero_stage: int, world_size: int, lora: bool, moving: bool) -> bool:
    """Whether a live reference is loaded partitioned: when the policy itself trains under ZeRO-3 on
    several processes. Not with LoRA (the reference is the policy with its adapter off, already
    partitioned with it) and not for a reference that moves (TR-DPO: the soft update writes whole
    tensors into it)."""
    return zero_stage == 3 and world_size > 1 and not lora and not moving


def lockstep_batches(n_rows: int, batch_size: int, rank: int, world_size: int,
                     lockstep: bool) -> List[Tuple[int, bool]]:
    """This rank's held-out batches as ``(first row, counted)``: rank r takes the batches starting at
    rows r·b, (r + W)·b, … With ``lockstep`` (a ZeRO-3 model: every forward pass gathers parameters
    with the other ranks) a rank with fewer batches than rank 0 re-runs its first batch, or the set's
    first one, uncounted, until it has as many; their results are discarded."""
    mine = list(range(rank * batch_size, n_rows, world_size * batch_size))
    schedule = [(start, True) for start in mine]
    if lockstep:
        most = len(range(0, n_rows, world_size * batch_size))
        filler = mine[0] if mine else 0
        schedule += [(filler, False)] * (most - len(mine))
    return schedule


def held_bytes(model: torch.nn.Module) -> Tuple[int, int]:
    """(bytes of parameters this process holds, bytes of the whole model's parameters)."""
    held = full = 0
    for p in model.parameters():
        size = p.element_size()
        full += getattr(p, "ds_numel", p.numel()) * size
        held += (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * size
    return held, full


class Lockstep:
    """Counts the forward passes of ``model`` so every process can run the same number.

    ``own_passes_planned``: the batches this process will run. The busiest process's count is agreed
    here, before any pass: a collective of its own cannot run while another process is in a pass."""

    def __init__(self, model: torch.nn.Module, own_passes_planned: int):
        import torch.distributed as dist

        most = torch.tensor([own_passes_planned], dtype=torch.int64)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        self.most = int(most.item())
        self.model = model
        self.passes = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.passes += 1

    def finish(self, pad_id: int, device: torch.device) -> int:
        """After this process's batches: one-token passes until it has run as many as the busiest
        process. Returns how many it added."""
        added = 0
        token = torch.tensor([[pad_id]], device=device)
        with torch.no_grad():
            while self.passes < self.most:
                self.model(input_ids=token, attention_mask=torch.ones_like(token))
                added += 1
        self.handle.remove()
        return added
