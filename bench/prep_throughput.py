"""Prep throughput against a padded, batched bare forward pass of the same model.

    python bench/prep_throughput.py --model smollm2-135m-instruct --pairs 64

What is timed, on the same tokenized pairs cut into the same shards:

* **bare forward**: ``model(input_ids, attention_mask)`` under ``torch.inference_mode()``, nothing
  else, over padded batches of ``2 × --batch-size`` sequences grouped by length inside each shard
  (chosen and rejected sequences sorted together, the least padding a padded batch can have): what a
  padded reference pass costs at the least;
* **prep**: what ``dpo-zoo prep`` does per shard after tokenization: the reference pass
  (:func:`dpo_zoo.cache.prep.reference_pass`: batches of ``--batch-size`` pairs, each packed into one row
  with each prompt computed once and no padding, then ``completion_logps``), building the Arrow table,
  writing the shard and its sidecar atomically (fsync'd), and finally the manifest with the full
  coverage check;
* **prep, padded path**: the same with ``model.padding_free=false`` (each batch run as its padded
  ``[2B, L]`` block), which shows what packing itself brings.

Tokens are input tokens (prompt + completion, both sides, no padding). The two are interleaved shard
by shard (bare forward of shard 0, prep of shard 0, prep of shard 1, bare forward of shard 1, ...;
the order alternates so neither always runs on a warm cache), so a neighbour's load on a shared
machine falls on both alike, and the whole is repeated ``--repeats`` times; totals over all repeats
are reported. Two clocks are read: wall time, and the CPU time of this process (all its threads),
which on a busy machine is the steadier of the two. Data loading and tokenization are the same for
both and are reported separately. Cache size is the total bytes of the shards divided by the input
tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"  # shipped, MIT


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or a local model folder")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="preference data file (default: HH-RLHF harmless test)")
    parser.add_argument("--preprocessor", default="hh_rlhf")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per batch (2x sequences), as prep.batch_size")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--topk", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def padded_sequence_batches(shard, batch_size: int, pad_id: int):
    """The bare forward's batches: ``2 × batch_size`` sequences at a time, chosen and rejected sorted
    together by length, right-padded ``(input_ids, attention_mask)``."""
    import torch

    sequences = sorted((s for row in shard for s in (row.chosen_input_ids, row.rejected_input_ids)), key=len, reverse=True)
    batches = []
    for begin in range(0, len(sequences), 2 * batch_size):
        group = sequences[begin : begin + 2 * batch_size]
        input_ids = torch.full((len(group), len(group[0])), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for i, ids in enumerate(group):
            input_ids[i, : len(ids)] = torch.as_tensor(ids)
            attention_mask[i, : len(ids)] = 1
        batches.append((input_ids, attention_mask))
    return batches


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import data_prep
    from dpo_zoo.cache.format import Layout
    from dpo_zoo.cache.writer import PreparedSetWriter, build_shard_table, plan_shards, shard_token_counts
    from dpo_zoo.config import load_config
    from dpo_zoo.model.loading import load_model, load_tokenizer, resolve_model_path
    from dpo_zoo.cache.prep import plan_batches, reference_pass

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config([], [
        f"model.name_or_path={args.model}",
        f"data.preprocessor={args.preprocessor}",
        f"data.train_path={args.data}",
        "data.heldout_fraction=0.0",
        f"data.max_train_pairs={args.pairs}",
        "data.on_bad_row=skip",
    ])

    started = time.perf_counter()
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    splits = data_prep.load_splits(cfg.data)
    rows = data_prep.tokenize_pairs(
        tokenizer, splits.train, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
        truncation_mode="keep_end", chat_template="auto", on_bad_row="skip", drops=splits.drops,
    )
    load_seconds = time.perf_counter() - started
    model = load_model(model_path, args.dtype)
    shards = [rows[i : i + args.shard_size] for i in range(0, len(rows), args.shard_size)]
    batches = [batch for shard in shards for batch in plan_batches(shard, args.batch_size, tokenizer.pad_token_id)]
    tokens = sum(shard_token_counts(shard)["input"] for shard in shards)
    # What the packed reference pass runs over: per pair the prompt once and both completions.
    packed_positions = sum(len(r.chosen_input_ids) + len(r.rejected_input_ids) - r.chosen_completion_start
                           if r.chosen_completion_start == r.rejected_completion_start
                           and r.chosen_input_ids[: r.chosen_completion_start] == r.rejected_input_ids[: r.rejected_completion_start]
                           else len(r.chosen_input_ids) + len(r.rejected_input_ids) for r in rows)
    device = torch.device("cpu")
    layout = Layout(topk=args.topk)

    shard_batches = [padded_sequence_batches(shard, args.batch_size, tokenizer.pad_token_id) for shard in shards]
    padded = sum(b.numel() for batches in shard_batches for b, _ in batches)

    def clocked(work):
        begin, cpu = time.perf_counter(), time.process_time()
        work()
        return time.perf_counter() - begin, time.process_time() - cpu

    def bare_forward(index: int):
        with torch.inference_mode():
            for input_ids, attention_mask in shard_batches[index]:
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    def prep_shard(writer, index: int, padding_free: bool = True):
        references = reference_pass(model, shards[index], batch_size=args.batch_size, topk=args.topk,
                                    pad_id=tokenizer.pad_token_id, device=device, padding_free=padding_free)
        writer.write(index, build_shard_table(shards[index], references, layout), shard_token_counts(shards[index]))

    # Warm-up: the first forward of a process allocates and picks kernels.
    with torch.inference_mode():
        model(input_ids=batches[-1].input_ids, attention_mask=batches[-1].attention_mask, use_cache=False)

    totals = {"bare": [0.0, 0.0], "prep": [0.0, 0.0], "prep_padded": [0.0, 0.0]}
    runs, cache_bytes = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            writers = {}
            run = {what: [0.0, 0.0] for what in totals}
            for what in ("prep", "prep_padded"):
                writers[what] = PreparedSetWriter(Path(tmp) / f"{what}{repeat}", {"bench": True},
                                                  plan_shards([r.pair.id for r in rows], args.shard_size), layout)
                prepare = clocked(writers[what].prepare_directory)
                run[what] = [run[what][0] + prepare[0], run[what][1] + prepare[1]]
            for index in range(len(shards)):
                order = ("bare", "prep", "prep_padded")
                shift = (index + repeat) % 3  # rotate which goes first
                for what in order[shift:] + order[:shift]:
                    work = {"bare": lambda: bare_forward(index), "prep": lambda: prep_shard(writers["prep"], index),
                            "prep_padded": lambda: prep_shard(writers["prep_padded"], index, padding_free=False)}[what]
                    took = clocked(work)
                    run[what] = [run[what][0] + took[0], run[what][1] + took[1]]
            for what in ("prep", "prep_padded"):
                finish = clocked(lambda: writers[what].finalize(split="bench"))
                run[what] = [run[what][0] + finish[0], run[what][1] + finish[1]]
            cache_bytes = sum(p.stat().st_size for p in (Path(tmp) / f"prep{repeat}").glob("shard-*.arrow"))
            for what in totals:
                totals[what] = [totals[what][0] + run[what][0], totals[what][1] + run[what][1]]
            runs.append(run)
            print(f"  run {repeat + 1}/{args.repeats}: " + ", ".join(
                f"{what} {run[what][0]:.2f} s wall / {run[what][1]:.2f} s cpu" for what in run), flush=True)

    total_tokens = tokens * args.repeats
    (bare, bare_cpu), (prepared, prep_cpu) = totals["bare"], totals["prep"]
    padded_prep, padded_prep_cpu = totals["prep_padded"]
    figures = {
        "command": "python bench/prep_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
        "data": str(Path(args.data).resolve().relative_to(REPO_ROOT)) if Path(args.data).resolve().is_relative_to(REPO_ROOT) else Path(args.data).name,
        "pairs": len(rows),
        "tokens": tokens,
        "padded_tokens": padded,
        "packed_positions": packed_positions,
        "batches": len(batches),
        "shards": len(shards),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "topk": args.topk,
        "load_and_tokenize_s": round(load_seconds, 3),
        "repeats": args.repeats,
        "bare_forward_s": round(bare, 3),
        "prep_s": round(prepared, 3),
        "bare_tokens_per_s": round(total_tokens / bare, 1),
        "prep_tokens_per_s": round(total_tokens / prepared, 1),
        "ratio": round(bare / prepared, 3),
        "bare_cpu_s": round(bare_cpu, 3),
        "prep_cpu_s": round(prep_cpu, 3),
        "ratio_cpu": round(bare_cpu / prep_cpu, 3),
        "prep_padded_s": round(padded_prep, 3),
        "prep_padded_cpu_s": round(padded_prep_cpu, 3),
        "ratio_packed_vs_padded_prep": round(padded_prep / prepared, 3),
        "runs": runs,
        "cache_bytes": cache_bytes,
        "bytes_per_token": round(cache_bytes / tokens, 2),
    }
    print()
    print(f"{len(rows)} pairs, {tokens:,} tokens ({padded:,} in the bare forward's padded batches, "
          f"{packed_positions:,} positions packed) in {len(batches)} batches of pairs, "
          f"{len(shards)} shards; {figures['threads']} threads, {args.dtype}, topk={args.topk}")
    print(f"totals over {args.repeats} repeat(s):")
    print(f"{'':<14} {'wall s':>9} {'tokens/s':>10} {'cpu s':>9} {'tokens/cpu-s':>13}")
    for label, wall, cpu in (("bare forward", bare, bare_cpu), ("prep", prepared, prep_cpu),
                             ("prep, padded", padded_prep, padded_prep_cpu)):
        print(f"{label:<14} {wall:>9.2f} {total_tokens / wall:>10,.0f} {cpu:>9.2f} {total_tokens / cpu:>13,.0f}")
    print(f"prep / bare throughput: {figures['ratio']:.3f} by wall clock, {figures['ratio_cpu']:.3f} by CPU time "
          "(target >= 1.5)")
    print(f"prep packed / prep padded: {figures['ratio_packed_vs_padded_prep']:.3f} by wall clock")
    print(f"cache: {cache_bytes:,} bytes = {figures['bytes_per_token']:.2f} bytes/token")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
