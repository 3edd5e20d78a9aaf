"""The process group: a launcher's (torchrun, deepspeed) or, for a plain ``python`` run, a one-process
group of our own, started without leaving launcher variables behind in ``os.environ``."""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Dict, Iterator, Tuple

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a launcher (torchrun, deepspeed) sets for each process, and DeepSpeed reads.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextlib.contextmanager
def launcher_environment() -> Iterator[None]:
    """The launcher's variables while DeepSpeed reads them (joining the process group, and while an
    engine lives: ZeRO-3 reads ``LOCAL_RANK`` on every forward). Under a launcher they are set already
    and nothing changes; a plain ``python`` run gets a one-process group on a free local port, and the
    caller's ``os.environ`` is restored afterwards."""
    if "RANK" in os.environ:
        yield
        return
    saved = {name: os.environ.get(name) for name in LAUNCHER_VARIABLES}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def launcher_world_size() -> int:
    """The number of processes the launcher started (1 for a plain ``python`` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float = 1800.0) -> Tuple[int, int, int]:
    """Join torch.distributed through DeepSpeed (gloo on CPU); a plain `python` run is world 1.
    ``timeout_s``: how long a collective waits for every rank (``train.distributed_timeout_s``).
    Returns (rank, world size, local rank)."""
    from . import peers

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if not torch.distributed.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
        with launcher_environment():
            deepspeed.init_distributed(dist_backend=backend, timeout=peers.timeout(timeout_s))
            peers.record_addresses()
    return (
        torch.distributed.get_rank(),
        torch.distributed.get_world_size(),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def mean_over_ranks(values: Dict[str, float], world_size: int) -> Dict[str, float]:
    """The mean of each value over the ranks of the process group (the values themselves on one rank)."""
    if world_size == 1 or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(tensor)
    return {k: v / world_size for k, v in zip(keys, tensor.tolist())}
