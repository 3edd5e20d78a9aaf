"""Training checkpoints you can trust: written atomically, checksummed, verified before they are used.

Layout of ``<train.output_dir>/checkpoints``::

    step-0000100/                      one checkpoint: DeepSpeed's files for that step, and
        mp_rank_00_model_states.pt       module weights, LR scheduler, client state (the step)
        *_optim_states.pt                optimizer state (one file per rank under ZeRO)
        manifest.json                    written last inside the folder: format, step, the run's
                                         identity (resolved settings + prepared-set cache key, and
                                         the number of processes) and each file's bytes and sha256
    step-0000200/
    latest                             the tag of the newest verified checkpoint (DeepSpeed's own
                                       convention, so its tools such as zero_to_fp32.py find it)
    .incomplete-step-0000300/          a save in progress; never read, removed when the run restarts

**Saving step s.** Every rank writes through DeepSpeed's ``save_checkpoint`` into
``.incomplete-step-s``. Then the main rank flushes each file to disk and hashes it, writes
``manifest.json`` (itself atomically), and renames the folder to ``step-s``: the rename is atomic, so
a checkpoint exists whole or not at all, whenever the run is killed. It then reads the checkpoint back
and verifies it (below); only a verified checkpoint moves ``latest`` (an atomic replace), and only then
are older checkpoints beyond ``train.keep_checkpoints`` deleted (default: all are kept). Checkpoints of
later steps than ``s``, left by an earlier attempt, are never deleted by pruning; the run replaces each
when it saves that step again.

**Resuming.** The checkpoints are tried newest step first; the first that verifies is loaded, by its
tag (never through ``latest``, which might be the one that is damaged). Verifying a checkpoint means:
``manifest.json`` is readable and its step is the folder's; every file it lists is there with its
size and sha256; no file is there that it does not list (DeepSpeed loads by file-name pattern, so a
planted file could be read); and every ``torch.save`` file opens under safe loading
(``weights_only``, only DeepSpeed's own value types; memory-mapped, so tensors are not read in full).
A checkpoint that fails is reported, naming the file and what failed, and skipped. A checksum or size
mismatch, an unreadable file or a pickled object that safe loading refuses is called what it is: a
damaged or possibly tampered file. Nothing of a refused file runs, and no message suggests turning
safe loading off. When checkpoints exist and none verifies, the run stops with a
:class:`~dpo_zoo.errors.CheckpointError` listing each one and why. A checkpoint is resumed only if
its identity matches the run's settings and it was written by as many processes as the run has; the
trainer checks that (it is a question of the run, not of the files). Another number of processes is
refused: ZeRO splits the optimizer state per rank, and a step's pairs depend on the global batch.

The main rank does the verifying and tells the other ranks which tag to load, so every rank loads the
same checkpoint and every rank raises the same error.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from dpo_zoo.errors import CheckpointError, DiskFullError
from dpo_zoo.files import disk_full_as_error
from dpo_zoo.model.loading import _fsync_dir, atomic_write_bytes, sha256_path

FORMAT = "dpo_zoo.checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
INCOMPLETE_PREFIX = ".incomplete-"
REPLACED_PREFIX = ".replaced-"
TAG_PATTERN = re.compile(r"^step-(\d+)$")
# Files DeepSpeed writes with torch.save: each must also open under safe loading.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
DAMAGED = "damaged or possibly tampered with"


def tag_for(step: int) -> str:
    return f"step-{step:07d}"


@dataclass
class Verified:
    """A checkpoint that verified: its folder, tag, step and the identity its manifest records."""

    folder: Path
    tag: str
    step: int
    identity: Dict[str, Any]


# ==================================================================== saving


def save(engine, root: Path, step: int, identity: Dict[str, Any], run, keep: Optional[int] = None,
         extra_state: Optional[Dict[str, Any]] = None) -> Path:
    """Write the checkpoint of ``step`` atomically (see the module docstring); every rank calls it.

    ``run`` supplies ``is_main``, ``world_size`` and ``log``; ``extra_state`` (tensors, numbers) is stored
    beside the step and handed back by :func:`load`. Returns the checkpoint folder.
    """
    root = Path(root)
    tag = tag_for(step)
    temp_tag = INCOMPLETE_PREFIX + tag
    if run.is_main:
        root.mkdir(parents=True, exist_ok=True)
        _remove_tree(root / temp_tag)  # left by a save of this step that was killed
    _barrier(run)
    try:
        with disk_full_as_error(root / temp_tag, what=f"the checkpoint of step {step}"):
            engine.save_checkpoint(str(root), tag=temp_tag, client_state={**(extra_state or {}), "step": step},
                                   save_latest=False)
    except DiskFullError:
        _remove_tree(root / temp_tag)  # never left to look like a checkpoint; the earlier ones are kept
        raise

    def commit() -> None:  # on the main rank, once every rank's files are written
        temp = root / temp_tag
        manifest = build_manifest(temp, step, identity)
        atomic_write_bytes(temp / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        _replace_tree(temp, root / tag)
        _, problems = verify(root / tag)
        if problems:
            raise CheckpointError(
                f"the checkpoint just written to {root / tag} does not verify: {'; '.join(problems)}. "
                "The storage may be failing; the earlier checkpoints are kept"
            )
        atomic_write_bytes(root / LATEST, tag.encode())
        removed = prune(root, step, keep) if keep else []
        run.log({"event": "checkpoint", "step": step, "tag": tag, "removed": [p.name for p in removed]})

    _on_main_then_share(run, commit)
    return root / tag


def build_manifest(folder: Path, step: int, identity: Dict[str, Any]) -> Dict[str, Any]:
    """Flush every file of ``folder`` to disk and record its size and sha256, with the step and the
    run's identity."""
    files = {}
    for path in _files(folder):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_path(path)}
    return {"format": FORMAT, "step": step, "identity": identity, "files": files}


def prune(root: Path, step: int, keep: int) -> List[Path]:
    """Delete the checkpoints of steps before ``step`` beyond the ``keep - 1`` newest (the one of
    ``step``, just verified, is the ``keep``-th). Later steps are left alone. Returns what was deleted."""
    older = sorted((s, p) for s, p in checkpoint_folders(root) if s < step)
    doomed = [p for _, p in older[: max(0, len(older) - (keep - 1))]]
    for path in doomed:
        _remove_tree(path)
    return doomed


# ==================================================================== verifying and resuming


def checkpoint_folders(root: Path) -> List[Tuple[int, Path]]:
    """``(step, folder)`` of every finished checkpoint folder under ``root``, newest first."""
    found = []
    if Path(root).is_dir():
        for child in Path(root).iterdir():
            matched = TAG_PATTERN.match(child.name)
            if matched and child.is_dir():
                found.append((int(matched.group(1)), child))
    return sorted(found, reverse=True)


def verify(folder: Path) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """``(manifest, problems)``: each problem names the file and what failed; none means it verified."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return None, [f"{MANIFEST} is missing (the save did not finish, or an older dpo_zoo wrote it without one)"]
    try:
        manifest = json.loads(manifest_path.read_text())
        listed = manifest["files"]
        step = int(manifest["step"])
        if manifest.get("format") != FORMAT or not isinstance(listed, dict) or not isinstance(manifest["identity"], dict):
            raise ValueError("unknown format")
        for entry in listed.values():
            int(entry["bytes"]), str(entry["sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return None, [f"{MANIFEST} cannot be read ({type(err).__name__}: {err}): {DAMAGED}"]
    problems = []
    matched = TAG_PATTERN.match(folder.name)
    if matched and int(matched.group(1)) != step:
        problems.append(f"{MANIFEST} records step {step}, but the folder is {folder.name}: {DAMAGED}")
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder) if p.name != MANIFEST}
    for name in sorted(set(present) - set(listed)):
        problems.append(f"{name}: not listed in {MANIFEST} (a file added after the save): {DAMAGED}")
    for name, entry in sorted(listed.items()):
        path = present.get(name)
        if path is None:
            problems.append(f"{name}: missing")
        elif path.stat().st_size != int(entry["bytes"]):
            problems.append(f"{name}: {path.stat().st_size} bytes where {MANIFEST} records {entry['bytes']} "
                            f"(truncated or changed): {DAMAGED}")
        elif sha256_path(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from {MANIFEST}: {DAMAGED}")
        elif path.suffix in TORCH_SUFFIXES:
            problem = _safe_open_problem(path)
            if problem:
                problems.append(f"{name}: {problem}")
    return manifest, problems


def newest_verified(root: Path, run) -> Optional[Verified]:
    """The newest checkpoint under ``root`` that verifies, reporting each one skipped on the way;
    ``None`` when there is no checkpoint at all. A :class:`CheckpointError` listing every checkpoint
    and its problems when some exist and none verifies. Every rank calls it and gets the same answer."""

    def find() -> Optional[Verified]:
        for leftover in sorted(Path(root).glob(INCOMPLETE_PREFIX + "*")) + sorted(Path(root).glob(REPLACED_PREFIX + "*")):
            _remove_tree(leftover)
            _say(f"removed {leftover}: a checkpoint save that did not finish")
        rejected = []
        for step, folder in checkpoint_folders(root):
            manifest, problems = verify(folder)
            if not problems:
                return Verified(folder=folder, tag=folder.name, step=step, identity=manifest["identity"])
            rejected.append((folder, problems))
            for problem in problems:
                _say(f"checkpoint {folder} skipped: {problem}")
            run.log({"event": "checkpoint_skipped", "step": step, "folder": str(folder), "problems": problems})
        if rejected:
            listing = "\n".join(f"  - {folder}: {'; '.join(problems)}" for folder, problems in rejected)
            raise CheckpointError(
                f"no checkpoint in {root} can be resumed from:\n{listing}\n"
                "Set train.resume=false to train from step 0 and keep these folders for inspection, or "
                "train.overwrite=true to delete them and train from step 0"
            )
        return None

    return _on_main_then_share(run, find)


def load(engine, found: Verified) -> Dict[str, Any]:
    """Load a verified checkpoint into ``engine`` on every rank, by its tag; returns its client state
    (the step and what :func:`save` was given as ``extra_state``)."""
    try:
        path, client_state = engine.load_checkpoint(str(found.folder.parent), tag=found.tag)
    except CheckpointError:
        raise
    except Exception as err:  # verified a moment ago: the files changed since, or the storage fails
        raise CheckpointError(f"checkpoint {found.folder} verified but could not be loaded: {_describe(err)}") from None
    if path is None or int((client_state or {}).get("step", -1)) != found.step:
        raise CheckpointError(f"checkpoint {found.folder} verified but DeepSpeed found no state for step {found.step} in it")
    return dict(client_state)


# ==================================================================== helpers


def _safe_open_problem(path: Path) -> Optional[str]:
    """Why ``path`` does not open under safe loading (None when it does)."""
    from dpo_zoo.model.safe_load import RefusedPickleError, safe_torch_load

    try:
        safe_torch_load(path, map_location="cpu", mmap=True)
    except RefusedPickleError as err:
        return f"holds a pickled object that safe loading does not allow ({err.what}); nothing of it was run: {DAMAGED}"
    except Exception as err:  # a broken archive: torch raises RuntimeError, EOFError, ValueError ...
        return f"cannot be read as a PyTorch file ({_describe(err)}): {DAMAGED}"
    return None


def _describe(err: Exception) -> str:
    """The first line of a library error; torch's advice to load with ``weights_only=False`` is
    dropped, it is the wrong advice for a file that failed verification."""
    from dpo_zoo.model.safe_load import RefusedPickleError

    if isinstance(err, RefusedPickleError):
        return str(err)
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return type(err).__name__ if "weights_only" in first else first.split(". ")[0]


def _files(folder: Path) -> List[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def _replace_tree(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (atomic). An existing ``target`` (a checkpoint of this step
    from an earlier attempt) is first moved aside, and deleted once the new one is in place."""
    aside = None
    if target.exists():
        aside = target.with_name(REPLACED_PREFIX + target.name)
        _remove_tree(aside)
        os.replace(target, aside)
    os.replace(source, target)
    _fsync_dir(target.parent)
    if aside is not None:
        _remove_tree(aside)


def _remove_tree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _say(message: str) -> None:
    print(f"[dpo-zoo train] {message}", file=sys.stderr, flush=True)


def _barrier(run) -> None:
    if run.world_size > 1:
        import torch

        torch.distributed.barrier()


def _on_main_then_share(run, work: Callable[[], Any]) -> Any:
    """Run ``work`` on the main rank and give every rank its result, or raise its
    :class:`CheckpointError` (or file-system error) on every rank, so no rank waits for one that
    stopped."""
    result, error = None, None
    if run.is_main:
        try:
            result = work()
        except (CheckpointError, DiskFullError, OSError) as err:
            error = err if isinstance(err, (CheckpointError, DiskFullError)) else CheckpointError(f"checkpoint: {err}")
    if run.world_size > 1:
        import torch

        shared = [result, str(error) if error is not None else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        result, message = shared
        if message is not None and error is None:
            error = CheckpointError(message)
    if error is not None:
        raise error
    return result
