"""The process group: a launcher's (torchrun, deepspeed) or, for a plain ``python`` run, a one-process
group of our own, started without leaving launcher variables behind in ``os.environ`` (training);
and prep's workers (:class:`Processes`: one, or several under a launcher, sharing the shards)."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from typing import Any, Dict, Iterator, List, Tuple

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
    from dpo_zoo.parallel import peers

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


class Processes:
    """This process's place among the prep workers (one, or several under torchrun/deepspeed)."""

    def __init__(self, single: bool = False) -> None:
        """``single=True``: this process alone, whatever the environment says."""
        self.world = 1 if single else int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0 if single else int(os.environ.get("RANK", "0"))
        self.local_rank = 0 if single else int(os.environ.get("LOCAL_RANK", "0"))
        self._owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # gloo: prep needs only barriers and a broadcast, on CPU or GPU alike. The timeout
                # covers the longest reference pass a rank may wait through at a barrier.
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
                self._owned = True
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """``value`` as computed on rank 0, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def my_shards(self, n_shards: int) -> List[int]:
        return list(range(self.rank, n_shards, self.world))

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def close(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
