"""``dpo-zoo prep``: raw preference data → tokenized pairs → reference log-probs → prepared sets.

    run_prep(cfg):  load_splits → tokenize (train and heldout) → reference pass per shard → shards →
                    manifest, into <prep.output_dir>/train and <prep.output_dir>/heldout, with
                    <prep.output_dir>/drops.json (the drop report) and config.yaml (the resolved config)

Relative paths in a config (``data.train_path``, ``data.heldout_path``, ``prep.output_dir``,
``prep.reference_logps_path``, a local ``model.name_or_path``, ``model.cache_dir``) resolve against
the **current working directory**, as they do for every command; the shipped experiment configs are
written to be run from the repository root.

**Cache.** Each split is looked up by its key (see :mod:`dpo_zoo.cache.reader`): a hit is reported
(``cache hit: <path>``) and left alone, so a second run of the same config takes seconds; a miss names
the differing fields and rebuilds; an interrupted prep resumes, recomputing only unfinished shards.

**Reference pass.** Inside one shard, the pairs are sorted by length and cut into batches of
``prep.batch_size`` pairs; each batch is one :func:`dpo_zoo.model.logps.completion_logps` call under
``torch.inference_mode()``, which packs the batch into one row without padding, each pair's prompt
computed once (``model.padding_free``; :mod:`dpo_zoo.model.packing`). Batches never cross
shards, so a shard's values depend only on the shard: a resumed or multi-process prep writes the same
bytes as a single uninterrupted one.

**Several processes.** Under ``torchrun`` / ``deepspeed`` (``WORLD_SIZE > 1``) torch.distributed is
initialised with gloo; rank ``r`` computes shards ``r, r + W, ...``; rank 0 checks everything and
writes the manifest after a barrier. Progress bars and messages come from rank 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data_prep.reference_logps import read_reference_file, references_from_file
from data_prep.schema import PairReference, PreferencePair, SideReference, TokenizedPair

from dpo_zoo.cache import format as S
from dpo_zoo.cache.reader import lookup, read_manifest, verify_prepared_set
from dpo_zoo.cache.format import Layout, digest
from dpo_zoo.cache.writer import PreparedSetWriter, build_shard_table, pairs_fingerprint, plan_shards, shard_token_counts
from dpo_zoo.parallel.process_group import Processes
from dpo_zoo.errors import CacheError, DataError, StoppedError, WriterLockError
from dpo_zoo.files import WriterLock
from dpo_zoo.stopping import GracefulStop
from dpo_zoo.model import packing
from dpo_zoo.model.logps import completion_logps
from dpo_zoo.model.loading import ResolvedModel, cache_root, load_model, load_tokenizer, resolve_model, tokenizer_fingerprint, weights_fingerprint
from dpo_zoo.staleness import describe

SPLITS = ("train", "heldout")


# ==================================================================== processes (dpo_zoo.parallel.process_group.Processes)


def say(processes: Processes, message: str) -> None:
    if processes.main:
        print(f"[prep] {message}", flush=True)


# ==================================================================== batches


@dataclass
class Batch:
    """One forward of the reference pass: ``members[b] = (row in shard, side)`` for row ``b``."""

    members: List[Tuple[int, str]]
    input_ids: torch.Tensor  # [N, L], right-padded
    attention_mask: torch.Tensor  # [N, L]
    completion_start: torch.Tensor  # [N]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def plan_batches(rows: Sequence[TokenizedPair], batch_size: int, pad_id: int) -> List[Batch]:
    """Batches of ``batch_size`` pairs, longest pairs first (so a batch too big for memory fails at
    once, not at the end), each as ``batch_size`` chosen rows followed by their rejected partners: the
    layout :func:`completion_logps` packs with each prompt computed once (``pairs=``)."""
    order = sorted(range(len(rows)), key=lambda i: (-(len(rows[i].chosen_input_ids) + len(rows[i].rejected_input_ids)), i))
    batches = []
    for begin in range(0, len(order), batch_size):
        group = order[begin : begin + batch_size]
        sequences = [(i, "chosen", rows[i].chosen_input_ids, rows[i].chosen_completion_start) for i in group]
        sequences += [(i, "rejected", rows[i].rejected_input_ids, rows[i].rejected_completion_start) for i in group]
        width = max(len(s[2]) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, (_, _, ids, _) in enumerate(sequences):
            input_ids[b, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[b, : len(ids)] = 1
        batches.append(Batch(
            members=[(s[0], s[1]) for s in sequences],
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_start=torch.as_tensor([s[3] for s in sequences], dtype=torch.long),
        ))
    return batches


def reference_pass(
    model: torch.nn.Module,
    rows: Sequence[TokenizedPair],
    *,
    batch_size: int,
    topk: int,
    pad_id: int,
    device: torch.device,
    padding_free: bool = True,
    on_batch: Optional[Callable[[Batch], None]] = None,
) -> List[PairReference]:
    """Reference values of ``rows`` (one shard): per-token log-probs, their sums and, with ``topk``,
    the top-k distribution per completion position, from one :func:`completion_logps` call per batch."""
    results: Dict[Tuple[int, str], SideReference] = {}
    for batch in plan_batches(rows, batch_size, pad_id):
        # no_grad rather than inference_mode for a ZeRO-3 partitioned model: its gathered weights are
        # written and freed in place around each layer, which inference tensors forbid.
        with torch.no_grad() if getattr(model, "ds_partitioned", False) else torch.inference_mode():
            out = completion_logps(
                model,
                batch.input_ids.to(device),
                batch.attention_mask.to(device),
                batch.completion_start.to(device),
                pairs=len(batch.members) // 2,
                padding_free=padding_free,
                topk=topk,
            )
        token_logps = out.token_logps.float().cpu().numpy()
        lengths = out.mask.sum(-1).cpu().numpy()
        topk_ids = out.topk_ids.to(torch.int32).cpu().numpy() if topk else None
        topk_logps = out.topk_logps.float().cpu().numpy() if topk else None
        rest = out.rest_logmass.float().cpu().numpy() if topk else None
        for b, member in enumerate(batch.members):
            n = int(lengths[b])
            values = token_logps[b, :n].copy()
            results[member] = SideReference(
                # The sum of the stored float32 values, in float64: sums and per-token values agree exactly.
                logps=float(values.astype(np.float64).sum()),
                token_logps=values,
                topk_ids=topk_ids[b, :n].copy() if topk else None,
                topk_logps=topk_logps[b, :n].copy() if topk else None,
                rest_logmass=rest[b, :n].copy() if topk else None,
            )
        if on_batch is not None:
            on_batch(batch)
    return [PairReference(chosen=results[(i, "chosen")], rejected=results[(i, "rejected")]) for i in range(len(rows))]


# ==================================================================== keys


def chat_template_key(setting: str, tokenizer: Any, pairs: Sequence[PreferencePair]) -> Tuple[str, Optional[str]]:
    """(the ``prep.chat_template`` setting as keyed, sha256 of the template actually applied or None).

    ``auto`` applies the tokenizer's template to conversational data only; ``none`` never applies
    one; any other string is the template itself (keyed by its hash, as ``custom``).
    """
    if setting == "none":
        return "none", None
    if setting == "auto":
        template = getattr(tokenizer, "chat_template", None)
        used = template if any(p.conversational for p in pairs) else None
        return "auto", None if used is None else digest(used)
    return "custom", digest(setting)


def cache_key(cfg: Any, *, split: str, pairs: Sequence[PreferencePair], tokenizer: Any, tokenizer_hash: str,
              reference: Dict[str, Any], data_source: Optional[Dict[str, Any]] = None,
              model_commit: Optional[str] = None) -> Dict[str, Any]:
    """The whole key of one split's prepared set: every setting its stored values depend on.

    ``data.on_bad_row`` is part of it: rows dropped at tokenization under ``skip`` (e.g. a completion
    truncated to nothing) must be reported again, as errors, by a later prep with ``error``, not hidden
    behind a cache hit. ``batch_size`` / ``shard_size`` change no value and are left out.
    ``data_source``: a Hub data set's identity and resolved commit (``LoadedSplits.origin``), so a
    moved revision is a miss that names it; files are keyed by content alone (no such field).
    ``model_commit`` (key field ``model_revision``): the commit a Hub model resolved to (``None`` for a
    local folder or a built-in model), so a ``main`` that moved is a miss that names it
    (``model_revision 3f2a1b0c… → 9d8e7f6a…``) even when the weights and tokenizer are unchanged.
    """
    data, prep = cfg.data, cfg.prep
    setting, template = chat_template_key(str(prep.chat_template), tokenizer, pairs)
    key = {
        "schema_version": S.SCHEMA_VERSION,
        "split": split,
        "reference_source": reference["source"],
        "model_weights": reference.get("model_weights"),
        "reference_file": reference.get("reference_file"),
        "dtype": str(prep.dtype) if reference["source"] == "model" else None,
        "topk": int(prep.topk),
        "tokenizer": tokenizer_hash,
        "chat_template": template,
        "chat_template_setting": setting,
        "max_length": int(prep.max_length),
        "max_prompt_length": None if prep.max_prompt_length is None else int(prep.max_prompt_length),
        "truncation_mode": str(prep.truncation_mode),
        "on_bad_row": str(data.on_bad_row),
        "preprocessor": str(data.preprocessor),
        "preprocessor_options": _plain(data.options),
        "column_map": _plain(data.columns),
        "split_settings": {
            "heldout_file": data.heldout_path is not None,
            "heldout_fraction": float(data.heldout_fraction),
            "max_pairs": data.max_train_pairs if split == "train" else data.max_heldout_pairs,
        },
        "data": pairs_fingerprint(pairs),
    }
    if data_source:
        key["data_source"] = dict(data_source)
    if model_commit:  # absent for local models, so their keys stay what they were
        key["model_revision"] = model_commit
    return key


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


# ==================================================================== the command


def run_prep(cfg: Any) -> Dict[str, Path]:
    """Prepare ``<prep.output_dir>/train`` and ``/heldout`` (see the module docstring); returns their paths.

    One writer per folder: a second prep into the same ``prep.output_dir`` is refused, naming the first
    (:class:`~dpo_zoo.files.WriterLock`). SIGTERM/SIGINT stop it after the shard in progress is written
    (:mod:`dpo_zoo.stopping`): finished shards are kept and the next prep computes only the rest."""
    processes = Processes()
    output_dir = Path(cfg.prep.output_dir).expanduser().resolve()
    lock, refusal = None, None
    try:
        if processes.main:
            try:
                lock = WriterLock(output_dir, command=f"dpo-zoo prep ({output_dir})").acquire()
            except WriterLockError as err:
                refusal = str(err)
        refusal = processes.from_main(refusal)
        if refusal is not None:
            raise WriterLockError(refusal)
        with GracefulStop("prep", cfg.train.stop_grace_s, unit="shard",
                          resume_hint="run the same command again: finished shards are kept") as stop:
            return _run_prep(cfg, processes, stop)
    finally:
        if lock is not None:
            lock.release()
        processes.close()


def _quietly(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` with the progress bars of ``datasets`` (a Hub data set's download and
    preparation) off, as prep.progress=false asks; restored afterwards."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return function(*args)
    finally:
        if was_on:
            datasets.enable_progress_bars()


@dataclass
class _Context:
    model: ResolvedModel
    tokenizer: Any
    splits: Any  # data_prep.LoadedSplits
    reference: Dict[str, Any]
    reference_file: Any
    keys: Dict[str, Dict[str, Any]]


def _load_context(cfg: Any, processes: Processes) -> _Context:
    import data_prep

    # Rank 0 first: a built-in model is converted (a Hub model downloaded) once, then the others find it
    # done, at the commit rank 0 resolved (a branch that moves meanwhile cannot split the ranks).
    model = resolve_model(cfg.model) if processes.main else None
    commit = processes.from_main(model.commit if model is not None else None)
    if model is None:
        model = resolve_model(cfg.model, commit=commit)
    model_path = model.path
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    generate = _reward_sampler(cfg, model_path, tokenizer) if cfg.data.preprocessor == "reward_pairs" else None
    if cfg.prep.progress:
        splits = data_prep.load_splits(cfg.data, generate)
    else:
        splits = _quietly(data_prep.load_splits, cfg.data, generate)
    reference_file = None
    if not cfg.prep.reference:
        # A set for reference-free losses: no reference model is loaded and no reference value stored.
        for key, value, why in (("prep.topk", cfg.prep.topk, "the reference model's top-k distribution"),
                                ("prep.reference_logps_path", cfg.prep.reference_logps_path, "a reference file")):
            if value:
                raise CacheError(
                    f"{key} = {value!r} asks for {why}, but prep.reference=false skips the reference pass; "
                    f"set {key} back to its default or prep.reference=true"
                )
        reference = {"source": "none"}
    elif cfg.prep.reference_logps_path:
        if cfg.prep.topk:
            raise CacheError(
                f"prep.topk = {cfg.prep.topk} needs the reference model's distribution, which a "
                "reference file (prep.reference_logps_path) cannot give; set prep.topk=0 or drop the file"
            )
        reference_file = read_reference_file(cfg.prep.reference_logps_path)
        reference = {"source": "file", "reference_file": reference_file.sha256}
    else:
        reference = {"source": "model", "model_weights": weights_fingerprint(model_path, memo_root=cache_root(cfg.model))}
    for warning in splits.warnings:
        say(processes, f"warning: {warning}")
    tokenizer_hash = tokenizer_fingerprint(tokenizer)
    keys = {
        split: cache_key(cfg, split=split, pairs=getattr(splits, split), tokenizer=tokenizer,
                         tokenizer_hash=tokenizer_hash, reference=reference,
                         data_source=getattr(splits, "origin", None), model_commit=model.commit)
        for split in SPLITS
    }
    return _Context(model, tokenizer, splits, reference, reference_file, keys)


def _reward_sampler(cfg: Any, model_path: Path, tokenizer: Any):
    """The sampler of the reward_pairs preprocessor: the reference model, its samples kept in
    ``<prep.output_dir>/generations`` (resumable shards; :mod:`dpo_zoo.rewards.sampling`)."""
    from dpo_zoo.rewards.sampling import ShardedSampler

    return ShardedSampler(model_path, tokenizer, weights=weights_fingerprint(model_path, memo_root=cache_root(cfg.model)),
                          tokenizer_hash=tokenizer_fingerprint(tokenizer),
                          work_dir=Path(cfg.prep.output_dir).expanduser() / "generations",
                          dtype=str(cfg.prep.dtype), progress=bool(cfg.prep.progress),
                          device="cuda" if torch.cuda.is_available() else "cpu")


def _tokenize(cfg: Any, context: _Context) -> Dict[str, List[TokenizedPair]]:
    import data_prep

    out = {}
    for split in SPLITS:
        out[split] = data_prep.tokenize_pairs(
            context.tokenizer,
            getattr(context.splits, split),
            max_length=int(cfg.prep.max_length),
            max_prompt_length=None if cfg.prep.max_prompt_length is None else int(cfg.prep.max_prompt_length),
            truncation_mode=str(cfg.prep.truncation_mode),
            chat_template=str(cfg.prep.chat_template),
            on_bad_row=str(cfg.data.on_bad_row),
            drops=context.splits.drops,
        )
        _check_rows(out[split], split)
    if not out["train"]:
        raise DataError(f"no training pairs left after tokenization.\n{context.splits.drops.summary()}")
    return out


def _check_rows(rows: Sequence[TokenizedPair], split: str) -> None:
    """What the reference pass relies on: unique ids, and on each side at least one prompt token (the
    first token has no context to be scored from) and at least one completion token."""
    seen: Dict[str, int] = {}
    for row in rows:
        pair = row.pair
        where = f"{pair.source_file or split}: row {pair.source_row} (id {pair.id!r})"
        if pair.id in seen:
            raise DataError(f"{where}: field `id` repeats an earlier pair of the {split} split")
        seen[pair.id] = 1
        for side, ids, start in (("chosen", row.chosen_input_ids, row.chosen_completion_start),
                                 ("rejected", row.rejected_input_ids, row.rejected_completion_start)):
            if start < 1:
                raise DataError(f"{where}: field `{side}`: the tokenized prompt is empty (completion starts at 0)")
            if start >= len(ids):
                raise DataError(f"{where}: field `{side}`: no completion tokens left after tokenization/truncation")


def _drop_summary(drops: Any) -> Dict[str, Any]:
    """The drop report without its per-row list (that stays in drops.json): totals, reasons, notes."""
    report = dict(drops.to_json())
    report.pop("dropped", None)
    return report


def _run_prep(cfg: Any, processes: Processes, stop: GracefulStop) -> Dict[str, Path]:
    from dpo_zoo.config import save_resolved

    started = time.time()
    output_dir = Path(cfg.prep.output_dir).expanduser().resolve()
    context = _load_context(cfg, processes)
    paths = {split: output_dir / split for split in SPLITS}

    # Rank 0 decides for everyone what each split needs (a lookup reads every shard once).
    states = processes.from_main(
        {split: lookup(paths[split], context.keys[split]) for split in SPLITS} if processes.main else None
    )
    for split in SPLITS:
        say(processes, states[split].message(paths[split]))
    if all(states[split].status == "hit" for split in SPLITS):
        say(processes, f"nothing to do ({time.time() - started:.1f} s)")
        return paths

    tokenized = _tokenize(cfg, context)
    if processes.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        context.splits.drops.write(output_dir / "drops.json")
        save_resolved(cfg, output_dir / "config.yaml")
        if context.splits.drops.total:
            say(processes, f"dropped {context.splits.drops.total} rows: {context.splits.drops.counts} "
                           f"(details in {output_dir / 'drops.json'})")

    model = None
    for split in SPLITS:
        if states[split].status == "hit":
            continue
        model = _build_split(cfg, processes, context, split, tokenized[split], paths[split], model, stop)
    say(processes, f"done in {time.time() - started:.1f} s: {output_dir}")
    return paths


def _build_split(cfg: Any, processes: Processes, context: _Context, split: str, rows: List[TokenizedPair],
                 path: Path, model: Any, stop: GracefulStop) -> Any:
    """Compute this rank's unfinished shards of one split; rank 0 then writes the manifest.
    Returns the reference model (loaded on first need, reused for the next split)."""
    key = context.keys[split]
    has_reference = context.reference["source"] != "none"
    layout = Layout(
        reference=has_reference,
        token_level=has_reference and (context.reference_file is None or context.reference_file.token_level),
        topk=int(cfg.prep.topk),
        behavior=bool(rows) and all(
            p.pair.extra.get("behavior_chosen_logps") is not None and p.pair.extra.get("behavior_rejected_logps") is not None
            for p in rows
        ),
    )
    shard_rows = [rows[i : i + cfg.prep.shard_size] for i in range(0, len(rows), cfg.prep.shard_size)]
    writer = PreparedSetWriter(path, key, plan_shards([r.pair.id for r in rows], cfg.prep.shard_size), layout)
    if processes.main:
        writer.prepare_directory()
    processes.barrier()

    mine = processes.my_shards(len(shard_rows))
    todo = [i for i in mine if writer.finished(i) is None]
    if len(todo) < len(mine):
        say(processes, f"{split}: {len(mine) - len(todo)} of {len(mine)} shards already done, kept")
    device = processes.device()
    pad_id = context.tokenizer.pad_token_id
    lockstep = None
    if cfg.prep.zero3 and processes.world > 1 and context.reference["source"] == "model" and not context.reference_file:
        # Partitioned across the processes: every process loads it and runs as many passes as the busiest.
        from dpo_zoo.model.sharded_reference import Lockstep, held_bytes, load_partitioned

        if model is None:
            model = load_partitioned(context.model.path, cfg.prep.dtype, cfg.model.trust_remote_code)
            model.ds_partitioned = True
            held, full = held_bytes(model)
            print(f"[prep] rank {processes.rank}: holds {held:,} of the reference's {full:,} parameter bytes "
                  "(prep.zero3)", flush=True)
        packing.set_attention(model, cfg.model.attention)
        lockstep = Lockstep(model, sum(len(plan_batches(shard_rows[i], cfg.prep.batch_size, pad_id)) for i in todo))
    elif todo and context.reference["source"] == "model" and model is None:
        model = load_model(context.model.path, cfg.prep.dtype, trust_remote_code=cfg.model.trust_remote_code)
        model.to(device)
        packing.set_attention(model, cfg.model.attention)

    from tqdm.auto import tqdm

    total_pairs = sum(len(shard_rows[i]) for i in todo)
    bar = tqdm(total=total_pairs, unit="pair", desc=f"prep {split}", dynamic_ncols=True,
               disable=not cfg.prep.progress or not processes.main)
    progress = {"sequences": 0, "tokens": 0, "started": time.time()}

    def on_batch(batch: Batch) -> None:
        progress["sequences"] += len(batch.members)
        progress["tokens"] += batch.tokens
        bar.update(progress["sequences"] // 2 - bar.n)
        elapsed = max(time.time() - progress["started"], 1e-9)
        bar.set_postfix_str(f"{progress['tokens'] / elapsed:,.0f} tok/s")

    try:
        for index in todo:
            shard = shard_rows[index]
            if not has_reference:
                references = None
                progress["sequences"] += 2 * len(shard)
                bar.update(progress["sequences"] // 2 - bar.n)
            elif context.reference_file is not None:
                references = references_from_file(context.reference_file, shard, split)
                progress["sequences"] += 2 * len(shard)
                bar.update(progress["sequences"] // 2 - bar.n)
            else:
                references = reference_pass(model, shard, batch_size=cfg.prep.batch_size, topk=int(cfg.prep.topk),
                                            padding_free=bool(cfg.model.padding_free),
                                            pad_id=pad_id, device=device, on_batch=on_batch)
            writer.write(index, build_shard_table(shard, references, layout), shard_token_counts(shard),
                         written_by={"rank": processes.rank, "world_size": processes.world})
            # A stop signal: after this shard, which is whole on disk. (Under prep.zero3 every rank must
            # run the same passes, so the split finishes first.)
            if stop.requested and lockstep is None:
                done = len(mine) - len(todo) + todo.index(index) + 1
                raise StoppedError(stop.message(f"{split}: {done} of {len(mine)} shards of this process are "
                                                f"written in {path}"), stop.signum)
    finally:
        bar.close()
    if lockstep is not None:
        lockstep.finish(pad_id, device)
    processes.barrier()
    if processes.main:
        writer.finalize(
            drops=_drop_summary(context.splits.drops),
            layout_info={"shard_size": int(cfg.prep.shard_size), "batch_size": int(cfg.prep.batch_size),
                         "world_size": processes.world},
            extra={
                "model": str(cfg.model.name_or_path),
                "model_path": str(context.model.path),
                "model_revision": context.model.revision,
                "model_commit": context.model.commit,
                "reference_logps_path": str(cfg.prep.reference_logps_path) if cfg.prep.reference_logps_path else None,
                "sources": list(getattr(context.splits, "sources", []) or []),
                "source_fingerprint": getattr(context.splits, "fingerprint", None),
                "data_source": getattr(context.splits, "origin", None) or None,
            },
            split=split,
        )
        tokens = sum(len(r.chosen_input_ids) + len(r.rejected_input_ids) for r in rows)
        elapsed = time.time() - progress["started"]
        say(processes, f"{split}: {len(rows)} pairs, {tokens:,} tokens, {len(shard_rows)} shards → {path} "
                       f"({elapsed:.1f} s)")
    processes.barrier()
    return model


# ==================================================================== --verify


def verify_prepared(cfg: Any) -> int:
    """``dpo-zoo prep --verify``: the full check of ``<output_dir>/train`` and ``/heldout`` (checksums,
    coverage, value lengths and sums), then whether their keys still match ``cfg``. Prints a summary;
    returns 0 when everything holds, 1 otherwise."""
    output_dir = Path(cfg.prep.output_dir).expanduser().resolve()
    failed = False
    manifests = {}
    for split in SPLITS:
        path = output_dir / split
        try:
            summary = verify_prepared_set(path)
        except CacheError as err:
            print(f"[verify] {split}: FAILED: {err}")
            failed = True
            continue
        manifests[split] = read_manifest(path)
        tokens = summary["tokens"]
        print(
            f"[verify] {split}: ok: {summary['pairs']} pairs, {summary['shards']} shards, "
            f"{tokens['input']:,} tokens ({tokens['completion']:,} completion), {summary['bytes']:,} bytes "
            f"({summary['bytes'] / max(tokens['input'], 1):.1f} bytes/token); provides {', '.join(summary['provides'])}"
        )
    if manifests:
        try:
            context = _load_context(cfg, Processes(single=True))
        except Exception as err:  # the data or model may be gone; the sets themselves were checked above
            print(f"[verify] key: not compared with the config ({type(err).__name__}: {err})")
        else:
            for split, manifest in manifests.items():
                differences = describe(manifest["key"], context.keys[split])
                if differences:
                    failed = True
                    print(f"[verify] {split}: key differs from the config: {'; '.join(differences)}")
                else:
                    print(f"[verify] {split}: key matches the config")
    print(f"[verify] {'FAILED' if failed else 'all checks passed'}: {output_dir}")
    return 1 if failed else 0

