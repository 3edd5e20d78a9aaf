"""Several processes, one run: how long a process waits for its peers, and what it says when one is lost.

Every collective (gradient all-reduce or reduce-scatter, ZeRO-3 gathers, barriers) waits for all ranks.
When a node dies, the others learn it in one of two ways: the transport sees the connection close
(gloo: "Connection closed by peer [address]:port", at once when the peer's process is killed), or
nothing arrives until the process group's timeout (``train.distributed_timeout_s``; a node that hangs,
or a network that drops packets). Either way torch.distributed raises, and the surviving process would
print a backend traceback. :func:`lost_peer_as_error` turns that into a :class:`TrainingError` that
names the rank(s) that did not answer (from the peer address in the backend's message, matched to the
address each rank reported at start-up; all other ranks when the message names none, e.g. a timeout),
the last checkpoint on disk, and that running the same command again resumes from it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from dpo_zoo.errors import TrainingError

# rank -> "address (hostname)" of every rank, recorded once the process group is up.
_ADDRESSES: Dict[int, str] = {}
_ADDRESS_IN_MESSAGE = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]*:[0-9a-fA-F:]+)\]?:\d+")
# Phrases of the backends' errors when a peer is gone or silent (gloo, NCCL, the TCP store).
_LOST_PEER_PHRASES = ("connection closed by peer", "connection reset by peer", "timed out", "timeout",
                      "broken pipe", "gloo", "nccl", "socket", "connection refused")


def timeout(seconds: float) -> datetime.timedelta:
    """The process group's collective timeout (``train.distributed_timeout_s``)."""
    return datetime.timedelta(seconds=float(seconds))


def _own_address() -> str:
    """The address this process reaches the rendezvous (MASTER_ADDR) from: its node's address on the
    network the ranks share (no packet is sent; a UDP socket only picks the route)."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
            return s.getsockname()[0]
    except OSError:
        return "unknown"


def record_addresses() -> None:
    """Every rank's address, gathered once at start-up (a no-op for one process)."""
    import torch.distributed as dist

    _ADDRESSES.clear()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    mine = _own_address()
    gathered: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    _ADDRESSES.update({rank: str(address) for rank, address in enumerate(gathered)})


def _is_lost_peer(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(phrase in text for phrase in _LOST_PEER_PHRASES)


def lost_ranks(message: str, own_rank: int, world_size: int) -> List[int]:
    """The ranks a backend error points at: those whose recorded address appears in ``message``
    (ranks sharing a node share its address); all other ranks when it names no known address."""
    named = set(_ADDRESS_IN_MESSAGE.findall(message))
    ranks = [r for r, address in sorted(_ADDRESSES.items()) if address in named and r != own_rank]
    return ranks or [r for r in range(world_size) if r != own_rank]


def last_checkpoint(checkpoint_root: Path) -> str:
    """``<folder> (step N)`` of the newest verified checkpoint (its ``latest``), or that there is none."""
    latest = Path(checkpoint_root) / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        step = tag.rsplit("-", 1)[-1].lstrip("0") or "0"
        return f"{Path(checkpoint_root) / tag} (step {step}); run the same command again to resume from it"
    return (f"none in {checkpoint_root} (set train.save_every to checkpoint); running the same command "
            "again starts from step 0")


@contextlib.contextmanager
def lost_peer_as_error(checkpoint_root: Path) -> Iterator[None]:
    """Inside: a collective that fails because a peer died or stopped answering raises a
    :class:`TrainingError` naming the lost rank(s) and the last checkpoint (the backend's message
    is kept as the cause)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only a lost peer is translated; anything else re-raised as is
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1 and _is_lost_peer(err)):
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        ranks = lost_ranks(str(err), rank, world)
        where = ", ".join(f"rank {r}" + (f" at {_ADDRESSES[r]}" if r in _ADDRESSES else "") for r in ranks)
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise TrainingError(
            f"rank {rank} of {world}: a peer process stopped responding ({where}); the collective failed "
            f"with: {first_line[:300]}. Last checkpoint: {last_checkpoint(checkpoint_root)}"
        ) from err
