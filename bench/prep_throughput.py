"""Prep throughput against a bare forward pass of the same model over the same batches.

    python bench/prep_throughput.py --model smollm2-135m-instruct --pairs 64

What is timed, on the same tokenized pairs, cut into the same shards and length-grouped batches:

* **bare forward**: ``model(input_ids, attention_mask)`` under ``torch.inference_mode()`` for every
  batch, nothing else: the floor any reference pass pays;
* **prep**: what ``dpo-zoo prep`` does per shard after tokenization: the reference pass
  (:func:`dpo_zoo.prep.reference_pass`, i.e. ``completion_logps`` per batch), building the Arrow table,
  writing the shard and its sidecar atomically (fsync'd), and finally the manifest with the full
  coverage check.

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


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import data_prep
    from dpo_zoo.cache_format import Layout
    from dpo_zoo.cache_writer import PreparedSetWriter, build_shard_table, plan_shards, shard_token_counts
    from dpo_zoo.config import load_config
    from dpo_zoo.models import load_model, load_tokenizer, resolve_model_path
    from dpo_zoo.prep import plan_batches, reference_pass

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
    padded = sum(b.input_ids.numel() for b in batches)
    device = torch.device("cpu")
    layout = Layout(topk=args.topk)

    shard_batches = [plan_batches(shard, args.batch_size, tokenizer.pad_token_id) for shard in shards]

    def clocked(work):
        begin, cpu = time.perf_counter(), time.process_time()
        work()
        return time.perf_counter() - begin, time.process_time() - cpu

    def bare_forward(index: int):
        with torch.inference_mode():
            for batch in shard_batches[index]:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

    def prep_shard(writer, index: int):
        references = reference_pass(model, shards[index], batch_size=args.batch_size, topk=args.topk,
                                    pad_id=tokenizer.pad_token_id, device=device)
        writer.write(index, build_shard_table(shards[index], references, layout), shard_token_counts(shards[index]))

    # Warm-up: the first forward of a process allocates and picks kernels.
    with torch.inference_mode():
        model(input_ids=batches[-1].input_ids, attention_mask=batches[-1].attention_mask, use_cache=False)

    totals = {"bare": [0.0, 0.0], "prep": [0.0, 0.0]}
    runs, cache_bytes = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            target = Path(tmp) / f"run{repeat}"
            writer = PreparedSetWriter(target, {"bench": True}, plan_shards([r.pair.id for r in rows], args.shard_size), layout)
            run = {"bare": [0.0, 0.0], "prep": [0.0, 0.0]}
            prepare = clocked(writer.prepare_directory)
            run["prep"] = [run["prep"][0] + prepare[0], run["prep"][1] + prepare[1]]
            for index in range(len(shards)):
                order = ("bare", "prep") if (index + repeat) % 2 == 0 else ("prep", "bare")
                for what in order:
                    took = clocked((lambda: bare_forward(index)) if what == "bare" else (lambda: prep_shard(writer, index)))
                    run[what] = [run[what][0] + took[0], run[what][1] + took[1]]
            finish = clocked(lambda: writer.finalize(split="bench"))
            run["prep"] = [run["prep"][0] + finish[0], run["prep"][1] + finish[1]]
            cache_bytes = sum(p.stat().st_size for p in target.glob("shard-*.arrow"))
            for what in totals:
                totals[what] = [totals[what][0] + run[what][0], totals[what][1] + run[what][1]]
            runs.append(run)
            print(f"  run {repeat + 1}/{args.repeats}: bare {run['bare'][0]:.2f} s wall / {run['bare'][1]:.2f} s cpu, "
                  f"prep {run['prep'][0]:.2f} s wall / {run['prep'][1]:.2f} s cpu", flush=True)

    total_tokens = tokens * args.repeats
    (bare, bare_cpu), (prepared, prep_cpu) = totals["bare"], totals["prep"]
    figures = {
        "model": args.model,
        "pairs": len(rows),
        "tokens": tokens,
        "padded_tokens": padded,
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
        "runs": runs,
        "cache_bytes": cache_bytes,
        "bytes_per_token": round(cache_bytes / tokens, 2),
    }
    print()
    print(f"{len(rows)} pairs, {tokens:,} tokens ({padded:,} with padding) in {len(batches)} batches, "
          f"{len(shards)} shards; {figures['threads']} threads, {args.dtype}, topk={args.topk}")
    print(f"totals over {args.repeats} repeat(s):")
    print(f"{'':<14} {'wall s':>9} {'tokens/s':>10} {'cpu s':>9} {'tokens/cpu-s':>13}")
    for label, wall, cpu in (("bare forward", bare, bare_cpu), ("prep", prepared, prep_cpu)):
        print(f"{label:<14} {wall:>9.2f} {total_tokens / wall:>10,.0f} {cpu:>9.2f} {total_tokens / cpu:>13,.0f}")
    print(f"prep / bare throughput: {figures['ratio']:.3f} by wall clock, {figures['ratio_cpu']:.3f} by CPU time "
          "(target >= 0.9)")
    print(f"cache: {cache_bytes:,} bytes = {figures['bytes_per_token']:.2f} bytes/token")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
