"""A reference model partitioned across the prep processes (DeepSpeed ZeRO-3 inference, ``prep.zero3``).

Each of the W processes keeps 1/W of every parameter. The model is partitioned while it loads (built
under ``deepspeed.zero.Init``, its weights streamed in one module at a time: :func:`load_partitioned`),
so no process ever holds all of it at once; during a forward pass each layer's full weights are gathered
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
    """DeepSpeed ZeRO-3 for a frozen model. No parameter is kept whole after its layer ran (persistence
    threshold, live-parameter budget, reuse distance and prefetch all 0): each layer is gathered just
    before it runs and released after, so a process holds its partition plus one layer."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0,
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }


def load_partitioned(path: Path, dtype: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The causal LM of ``path``, partitioned over the process group as it loads; in eval mode.

    The model is built under ``deepspeed.zero.Init`` (each parameter partitioned as it is created),
    then its weights are streamed from the safetensors files one module at a time: the module's
    parameters are gathered, rank 0 copies their values from the files (read tensor by tensor, never
    the whole checkpoint), and DeepSpeed partitions them again from rank 0's values. So no process
    ever holds more than its partition plus one module. (``transformers``' own ZeRO-3 loading reads the
    whole checkpoint into rank 0's memory.)"""
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from dpo_zoo.model.loading import check_safetensors_folder, torch_dtype

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    _return_freed_memory()
    files = [Path(path) / name for name in check_safetensors_folder(path)]
    config = zero3_inference_config(torch_dtype(dtype))
    registered = HfDeepSpeedConfig(config)  # while alive, transformers builds models under zero.Init
    model_config = AutoConfig.from_pretrained(str(path), trust_remote_code=bool(trust_remote_code))
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch_dtype(dtype),
                                             trust_remote_code=bool(trust_remote_code))
    _stream_weights(model, files)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    del registered
    return engine.module.eval()


def _stream_weights(model: torch.nn.Module, files: List[Path]) -> None:
    """Copy the checkpoint's values into the partitioned ``model``, module by module (see
    :func:`load_partitioned`). A parameter the checkpoint lacks is an error naming it, unless it is
    tied to one already loaded (an output layer sharing the input embeddings)."""
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    from dpo_zoo.errors import ModelError

    rank = dist.get_rank()
    where: Dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as opened:
            where.update((key, file) for key in opened.keys())
    seen: set = set()
    for prefix, module in model.named_modules():
        own = [(f"{prefix}.{name}" if prefix else name, p) for name, p in module.named_parameters(recurse=False)]
        own = [(name, p) for name, p in own if id(p) not in seen]  # a tied parameter loads once
        missing = [name for name, _ in own if name not in where]
        if missing:
            raise ModelError(f"{files[0].parent}: the checkpoint has no tensor '{missing[0]}' for the model's "
                             f"parameter of that name, so it cannot be loaded partitioned (prep.zero3)")
        buffers = [(f"{prefix}.{name}" if prefix else name, b) for name, b in module.named_buffers(recurse=False)]
        buffers = [(key, b) for key, b in buffers if key in where and b is not None]  # persistent, saved
        if not own and not buffers:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0), torch.no_grad():
            if rank == 0:
                for name, param in own:
                    param.copy_(_read_tensor(where[name], name))
        seen.update(id(p) for _, p in own)
        for key, buffer in buffers:  # buffers are not partitioned: every rank reads its own copy
            with torch.no_grad():
                buffer.copy_(_read_tensor(where[key], key))


def _read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file. The file is opened for this read alone: safetensors maps the
    file into memory, and pages read through a mapping count as the process's resident memory for as
    long as it stays open."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as opened:
        return opened.get_tensor(key).clone()


def _return_freed_memory() -> None:
    """Have glibc give large freed blocks back to the system at once. Each layer's gathered weights
    are freed after use; by default glibc raises its mmap threshold after such frees and then keeps
    later ones in its heap, so the process's resident memory would grow as if the whole model were
    held. A fixed 1 MiB threshold keeps every tensor of that size or more in its own mapping."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


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
