"""What guards a long training run against the faults of a shared machine: a second writer of the
same run folder, a stop signal, a host out of memory. Each becomes a :class:`~dpo_zoo.errors.UserError`
that says what happened and what to do, on every rank.

* **One writer per folder.** Rank 0 takes the folder's :class:`~dpo_zoo.files.WriterLock` and tells
  the others whether it got it, so every rank refuses together (naming the first writer's pid, host
  and command) instead of some of them waiting in a collective.
* **Stop signals.** :func:`stop_agreed` turns one rank's SIGTERM into every rank's stop at the same
  step (a launcher forwards a signal to its processes, but not at the same instant); the trainer then
  saves a verified checkpoint of the finished step and raises :class:`~dpo_zoo.errors.StoppedError`
  (:mod:`dpo_zoo.stopping`).
* **Non-finite gradients.** :class:`GradientWatch` (the trainer stops on the step and batch).
* **Out of memory.** An allocator failure (CPU: ``DefaultCPUAllocator: can't allocate memory``; CUDA:
  ``torch.OutOfMemoryError``; Python's ``MemoryError``) becomes a :class:`~dpo_zoo.errors.TrainingError`
  naming the settings to lower. The kernel's OOM killer cannot be caught: it ends the process with
  SIGKILL (exit 137) and no message; the checkpoints written before it are kept.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch

from dpo_zoo.errors import StoppedError, TrainingError, WriterLockError
from dpo_zoo.files import WriterLock
from dpo_zoo.stopping import GracefulStop


@contextlib.contextmanager
def writer_lock(folder: Path, is_main: bool, world_size: int, command: str) -> Iterator[Optional[WriterLock]]:
    """Hold ``folder``'s writer lock for the block (rank 0 holds it; the refusal reaches every rank)."""
    lock, refusal = None, None
    if is_main:
        try:
            lock = WriterLock(folder, command=command).acquire()
        except WriterLockError as err:
            refusal = str(err)
        if lock is not None and lock.note:
            print(f"[dpo-zoo] {lock.note}", flush=True)
    if world_size > 1:
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise WriterLockError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def stop_agreed(stop: GracefulStop, world_size: int) -> bool:
    """Whether any rank was asked to stop (a max over the ranks; every rank adopts the stop)."""
    if world_size == 1:
        return stop.requested
    flag = torch.tensor([stop.signum or 0], dtype=torch.int64)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and not stop.requested:
        stop.request(int(flag.item()))
    return bool(flag.item())


def stopped(stop: GracefulStop, step: int, max_steps: int, checkpoint: Path) -> StoppedError:
    """The error a stopped run ends with, once the checkpoint of ``step`` is written and verified."""
    return StoppedError(stop.message(f"saved and verified the checkpoint of step {step} of {max_steps} at "
                                     f"{checkpoint}"), stop.signum or 15)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError) or isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


class OutOfMemoryGuard:
    """``with guard:`` around the training loop; set ``guard.step`` as it goes. An allocator failure
    inside becomes a :class:`TrainingError` naming the step and the settings that lower the memory."""

    def __init__(self, train_cfg, checkpoint_root: Path):
        self.train_cfg = train_cfg
        self.checkpoint_root = checkpoint_root
        self.step = 0

    def __enter__(self) -> "OutOfMemoryGuard":
        return self

    def __exit__(self, kind, err, trace) -> bool:
        if err is None or not _is_out_of_memory(err):
            return False
        t = self.train_cfg
        hints = [f"lower train.micro_batch_size (now {t.micro_batch_size}; raise train.gradient_accumulation_steps "
                 "by the same factor to keep the pairs per step)"]
        if not t.gradient_checkpointing:
            hints.append("set train.gradient_checkpointing=true")
        if not t.lora.enabled:
            hints.append("train LoRA adapters (train.lora.enabled=true)")
        hints.append("or shorten rows (prep.max_length, then prep again)")
        found = sorted(self.checkpoint_root.glob("step-*")) if self.checkpoint_root.is_dir() else []
        kept = f"; the checkpoints in {self.checkpoint_root} are kept" if found else ""
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"out of memory in training step {self.step + 1} ({first_line[:200]}): "
                            f"{'; '.join(hints)}{kept}") from None


class GradientWatch:
    """Flags a non-finite gradient of any trainable parameter, checked once per backward.

    Each parameter's hook adds the sum of its gradient to one running total on the device (no host
    sync per parameter, no per-element mask): a NaN or infinity anywhere makes the total non-finite,
    which :meth:`check` reads. (A float32 sum can also overflow, which takes gradient entries beyond
    ~1e30 — a divergence reported the same way.)
    """

    def __init__(self, params):
        self.finite = None
        self.handles = [p.register_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, grad):
        total = grad.sum(dtype=torch.float32)
        self.finite = total if self.finite is None else self.finite + total
        return grad

    def check(self) -> bool:
        ok = True if self.finite is None else bool(torch.isfinite(self.finite).item())
        self.finite = None
        return ok

    def __enter__(self) -> "GradientWatch":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
