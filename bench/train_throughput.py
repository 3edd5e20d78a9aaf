"""Training throughput and peak memory: dpo_zoo's trainer against TRL's ``DPOTrainer``, like for like.

    python bench/train_throughput.py --pairs 64 --micro-batch 4 --steps 8 --max-length 256 --threads 2 \\
        --out bench/results/train_throughput.json

Three trainers are run, each in a fresh subprocess of its own (so each peak RSS belongs to one trainer),
one after the other in the same invocation, on the same model, pairs, batches, precision and threads:

* **dpo_zoo**: :func:`dpo_zoo.train.trainer.train` with ``train.reference=cache``: reference log-probs read
  from the prepared set, no reference model in memory; each micro-batch packed into one row, each
  prompt once, no padding (``model.padding_free``, the default). The set is built first by
  :func:`dpo_zoo.cache.prep.run_prep` in its own subprocess; that time is reported on its own (``prep``),
  never inside the training figure.
* **dpo_zoo_live** (optional): the same with ``train.reference=live`` (a second copy of the model run
  without gradients every step, packed the same way).
* **dpo_zoo_padded** (optional): the same as ``dpo_zoo`` with ``model.padding_free=false``: each
  micro-batch run as its padded ``[2B, L]`` block, as before packing; the in-run measure of what
  packing brings.
* **trl_live**: TRL's ``DPOTrainer`` with its live reference model (a second copy of the model, run
  without gradients every step).
* **trl_precompute**: TRL's ``DPOTrainer`` with ``precompute_ref_log_probs=True``: one reference pass
  over the data set in the constructor (timed and reported on its own, as ``precompute``), then no
  reference model during training.

**Same work.** TRL is given exactly the token ids of dpo_zoo's prepared set (``prompt_ids`` =
``chosen_input_ids[:chosen_completion_start]``, which the rejected side shares, checked per pair;
``chosen_ids`` / ``rejected_ids`` = the completions), in the order in which dpo_zoo's trainer visits
the pairs (its seeded permutation), read by TRL sequentially. TRL 1.16 has no entry point for
pre-tokenized data, so a subclass returns the data set unchanged from ``_prepare_dataset`` (the
tokenization TRL would do before training, never part of a step); everything else, collator
included, is TRL's own. Both trainers then run full fine-tuning of the same fp32 weights with
micro-batch ``--micro-batch``, gradient accumulation 1, DPO sigmoid loss with beta 0.1, AdamW (torch's,
``torch.optim.AdamW(fused=True)``: TRL's default ``adamw_torch_fused`` and dpo_zoo's, weight decay 0, betas 0.9/0.999, eps 1e-8) at ``--lr`` with a linear decay and
no warm-up, gradient clipping at 1.0, no gradient checkpointing, no logging, evaluation or saving
during training on TRL's side (dpo_zoo writes its per-step ``logs.jsonl`` line, as it always does),
``torch.set_num_threads(--threads)`` (and OMP/MKL threads) in every process. The tokens of every step
(real and padded) are recorded on both sides and the run is marked NOT like-for-like if any differ; the
per-step losses are compared too (both are ln 2 at step 1, where policy = reference).

**What is timed.** Every step ends with the optimizer step; its end is stamped (wall clock and this
process's CPU time) by a hook: for TRL a ``TrainerCallback.on_step_end``, for dpo_zoo a wrapper of the
DeepSpeed engine's ``step`` installed from this script (the trainer itself is unchanged). The first
``--warmup`` steps are not timed. Throughput = tokens of the timed steps / wall time from the end of
the last warm-up step to the end of the last step, i.e. everything a trainer does per step: fetching
and collating the batch, forward, loss, backward, clipping, optimizer and scheduler, its own per-step
metrics and logging. Tokens are input tokens: prompt + completion of both sides, padding excluded
(``attention_mask.sum()``), the quantity dpo_zoo logs as ``tokens_per_second``. Also reported:
tokens per CPU-second over the same span (on a machine shared with other work the wall clock partly
measures the neighbours; CPU time is what the process itself spent), and "in-step" throughput over
each trainer's own step interval (dpo_zoo: batch indices to optimizer step, collation included;
TRL: ``on_step_begin`` to ``on_step_end``, which starts after its data loader has produced the batch).

**Memory.** Peak RSS is ``VmHWM`` of ``/proc/self/status`` at the end of the worker process: model
loading, the optimizer state, TRL's precompute pass and the training steps all count. The peak of the
training steps alone is also given (the high-water mark is reset through ``/proc/self/clear_refs``
just before the first step). On a GPU, ``torch.cuda.max_memory_allocated`` is reported as well and
is the figure the memory ratio uses there.

With ``--repeats N`` the three trainers run N times each, in rotating order; each one's fastest run
(by wall-clock throughput) is reported, all runs are kept in the JSON.

Tokens are the same count for every trainer (the padded block's real tokens, prompts counted twice):
the ratios are ratios of time for the same work. What each trainer's model actually ran over is
reported as "positions computed" (dpo_zoo: the packed rows' lengths).

Targets (issue 14), by ``--preprocessor``: HH-RLHF: dpo_zoo / TRL-live throughput >= 2.5,
dpo_zoo / TRL-precompute >= 2.0, dpo_zoo / TRL-live peak memory <= 0.6; VADER (short prompts):
dpo_zoo / TRL-precompute >= 1.5.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# The measured subprocesses (bench/ is on sys.path when this script runs).
from train_workers import worker_dpo_zoo, worker_prep, worker_trl

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"  # shipped, MIT
TRAINERS = ("dpo_zoo", "dpo_zoo_live", "dpo_zoo_padded", "trl_live", "trl_precompute")
DEFAULT_TRAINERS = ("dpo_zoo", "trl_live", "trl_precompute")
# Issue 14's targets, by data set: HH-RLHF has long prompts (computed once per pair by dpo_zoo); the
# VADER movie-review pairs (--preprocessor vader) have short ones, so only padding is saved there.
TARGETS = {
    "hh_rlhf": {
        "throughput_vs_trl_live": (">=", 2.5),
        "throughput_vs_trl_precompute": (">=", 2.0),
        "peak_memory_vs_trl_live": ("<=", 0.6),
    },
    "vader": {
        "throughput_vs_trl_precompute": (">=", 1.5),
    },
}
# Variables a launcher (torchrun, deepspeed, accelerate) may have left behind: a worker must be a plain
# one-process run, so none of them is passed on.
LAUNCHER_VARS = re.compile(
    r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|GROUP_WORLD_SIZE|ROLE_RANK|ROLE_WORLD_SIZE|"
    r"ROLE_NAME|NODE_RANK|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_.*|TORCH_NCCL_.*|OMPI_.*|PMI_.*|SLURM_PROCID|"
    r"ACCELERATE_.*|CROSS_RANK|CROSS_SIZE|LOCAL_SIZE)$"
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in model name or a local model folder")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="preference data file (default: HH-RLHF harmless test)")
    parser.add_argument("--preprocessor", default="hh_rlhf", help="dpo_zoo preprocessor for --data (hh_rlhf, vader, ...)")
    parser.add_argument("--pairs", type=int, default=64, help="pairs to prepare (and to precompute for TRL)")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per step (2x sequences), both trainers")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones (at least 1)")
    parser.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens per sequence")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="default: half of --max-length")
    parser.add_argument("--ref-batch", type=int, default=8, help="pairs per reference-pass batch (prep and TRL precompute)")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads in every process")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--lr", type=float, default=5e-7)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--repeats", type=int, default=1, help="runs per trainer (rotating order); the fastest is reported")
    parser.add_argument("--trainers", default=",".join(DEFAULT_TRAINERS),
                        help="comma-separated subset of " + ",".join(TRAINERS)
                        + " (dpo_zoo_live: train.reference=live; dpo_zoo_padded: model.padding_free=false)")
    parser.add_argument("--workdir", default=None, help="keep prepared set, runs and worker logs here (default: a temp folder)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file (and a .md table beside it)")
    parser.add_argument("--profile", action="store_true",
                        help="also run torch.profiler over the timed steps and write each trainer's table of ops "
                             "by self CPU time to <workdir>/runs/<trainer>-<repeat>.profile.txt (slows the steps: "
                             "read the shares, not the throughput, of a profiled run)")
    # Internal: one worker process.
    parser.add_argument("--worker", default=None, choices=("prep",) + TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        if args.warmup < 1:
            parser.error("--warmup must be at least 1: the timed span starts at the end of the last warm-up step")
        if args.steps < 1 or args.micro_batch < 1 or args.pairs < 1 or args.threads < 1 or args.repeats < 1:
            parser.error("--steps, --micro-batch, --pairs, --threads and --repeats must be positive")
        unknown = set(args.trainers.split(",")) - set(TRAINERS)
        if unknown:
            parser.error(f"unknown trainer(s) {sorted(unknown)}; choose from {', '.join(TRAINERS)}")
    return args


def run_worker_main(args) -> int:
    spec = json.loads(Path(args.spec).read_text())
    started = time.perf_counter()
    if args.worker == "prep":
        result = worker_prep(spec)
    elif args.worker.startswith("dpo_zoo"):
        result = worker_dpo_zoo(spec, padding_free=args.worker != "dpo_zoo_padded",
                                reference="live" if args.worker == "dpo_zoo_live" else "cache")
    else:
        result = worker_trl(spec, precompute=args.worker == "trl_precompute")
    result["worker_s"] = round(time.perf_counter() - started, 3)
    Path(args.result).write_text(json.dumps(result, indent=1))
    return 0


# ==================================================================== orchestration


def worker_env(spec: Dict[str, Any]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not LAUNCHER_VARS.match(k)}
    threads = str(spec["threads"])
    env.update(
        OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(Path(spec["workdir"]) / "hf_datasets"),
        DS_ACCELERATOR="cpu" if spec["device"] == "cpu" else "cuda",
        PYTHONUNBUFFERED="1",
    )
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_worker(role: str, spec: Dict[str, Any], tag: str) -> Dict[str, Any]:
    workdir = Path(spec["workdir"])
    spec_path, result_path, log_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json", workdir / f"{tag}.log"
    spec_path.write_text(json.dumps(spec, indent=1))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--spec", str(spec_path),
               "--result", str(result_path)]
    print(f"== {tag}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=worker_env(spec), cwd=str(workdir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log.write(line)
            if line.startswith(("[bench]", "[prep]", "[dpo-zoo")):
                print("   " + line.rstrip(), flush=True)
        code = process.wait()
    if code != 0 or not result_path.exists():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"worker {tag} failed (exit {code}); last lines of {log_path}:\n{tail}")
    result = json.loads(result_path.read_text())
    result["process_s"] = round(time.perf_counter() - started, 3)
    return result


def summarize_run(result: Dict[str, Any], warmup: int) -> Dict[str, Any]:
    """Throughput figures of one trainer run from its step records (see the module docstring)."""
    steps = result["steps"]
    timed = steps[warmup:]
    before = steps[warmup - 1]
    tokens = sum(s["tokens"] for s in timed)
    span = timed[-1]["end_wall"] - before["end_wall"]
    cpu = timed[-1]["end_cpu"] - before["end_cpu"]
    in_step = sum(s["end_wall"] - s["begin_wall"] for s in timed)
    periods = [round(b["end_wall"] - a["end_wall"], 3) for a, b in zip(steps, steps[1:])]
    timed_periods = sorted(periods[warmup - 1 :])
    median = timed_periods[len(timed_periods) // 2] if len(timed_periods) % 2 else \
        (timed_periods[len(timed_periods) // 2 - 1] + timed_periods[len(timed_periods) // 2]) / 2
    out = {
        "tokens_per_s": round(tokens / span, 2),
        "tokens_per_cpu_s": round(tokens / cpu, 2) if cpu > 0 else None,
        "tokens_per_s_in_step": round(tokens / in_step, 2),
        "timed_steps": len(timed),
        "timed_tokens": tokens,
        "timed_padded_tokens": sum(s["padded_tokens"] for s in timed),
        # What the model actually ran over: the packed rows' lengths for dpo_zoo (each prompt once, no
        # padding), the padded block for the others (``padded_tokens``).
        "timed_computed_positions": sum(s.get("computed_positions", s["padded_tokens"]) for s in timed),
        "timed_wall_s": round(span, 3),
        "timed_cpu_s": round(cpu, 3),
        "median_step_s": round(median, 3),
        "step_period_s": periods,  # end of step k-1 to end of step k, k = 2..; the first `warmup - 1` untimed
        "step_in_step_s": [round(s["end_wall"] - s["begin_wall"], 3) for s in steps],
        "tokens_per_step": [s["tokens"] for s in steps],
        "padded_tokens_per_step": [s["padded_tokens"] for s in steps],
        "loss_per_step": [s.get("loss") for s in steps],
        "threads_seen": sorted({s["threads"] for s in steps}),
        "load_average_timed": round(sum(s.get("load_average", 0.0) for s in timed) / len(timed), 2),
        "rss_after_step_mb": [s["rss_mb"] for s in steps],
        "peak_rss_mb": result["peak_rss_mb"],
        "peak_rss_training_mb": result.get("peak_rss_training_mb"),
        "rss_before_training_mb": result.get("rss_before_training_mb"),
        "rss_after_imports_mb": result.get("rss_after_imports_mb"),
        "setup_s": result.get("setup_s"),
        "process_s": result.get("process_s"),
    }
    for key in ("gpu_peak_mb", "gpu_peak_training_mb", "precompute", "reference_model_in_memory", "optimizer"):
        if key in result:
            out[key] = result[key]
    if steps and steps[0].get("logged_tokens_per_second") is not None:
        out["logged_tokens_per_second"] = [round(s["logged_tokens_per_second"], 2) for s in steps]
    return out


def ratio_entry(name: str, value: Optional[float], targets: Dict[str, Any]) -> Dict[str, Any]:
    if name not in targets:
        return {"value": None if value is None else round(value, 3), "target": "(none for this data)", "pass": None}
    op, target = targets[name]
    if value is None:
        return {"value": None, "target": f"{op} {target}", "pass": None}
    ok = value >= target if op == ">=" else value <= target
    return {"value": round(value, 3), "target": f"{op} {target}", "pass": ok}


def markdown(figures: Dict[str, Any]) -> str:
    runs, s = figures["trainers"], figures["settings"]
    names = [t for t in TRAINERS if t in runs]
    heads = {"dpo_zoo": "dpo_zoo (cache)", "dpo_zoo_live": "dpo_zoo live ref", "dpo_zoo_padded": "dpo_zoo padded (cache)", "trl_live": "TRL live ref",
             "trl_precompute": "TRL precomputed ref"}

    def row(label, fn):
        cells = []
        for name in names:
            try:
                value = fn(name, runs[name])
            except (KeyError, TypeError):
                value = None
            cells.append("–" if value is None else str(value))
        return f"| {label} | " + " | ".join(cells) + " |"

    def ref_pass(name, r):
        if name == "dpo_zoo_live":
            return "every step (packed)"
        if name.startswith("dpo_zoo"):
            return f"{figures['prep']['prep_s']:.1f} s (prep, end to end)"
        if name == "trl_precompute":
            return f"{r['precompute']['s']:.1f} s (precompute pass)"
        return "every step"

    gpu = s["device"] == "cuda"
    lines = [
        f"Model `{s['model']}`, {s['precision']} on {s['device']} ({s['threads']} threads), "
        f"{s['micro_batch']} pairs/step, {s['warmup']} warm-up + {s['steps']} timed steps, "
        f"max length {s['max_length']}, {figures['prep']['pairs']} prepared pairs.",
        "",
        "| | " + " | ".join(heads[n] for n in names) + " |",
        "|---|" + "---:|" * len(names),
        row("tokens/s (wall, timed steps)", lambda n, r: f"{r['tokens_per_s']:.1f}"),
        row("tokens per CPU-second", lambda n, r: f"{r['tokens_per_cpu_s']:.1f}"),
        row("tokens/s in-step", lambda n, r: f"{r['tokens_per_s_in_step']:.1f}"),
        row("median step (s)", lambda n, r: f"{r['median_step_s']:.2f}"),
        row("timed tokens (padded)", lambda n, r: f"{r['timed_tokens']} ({r['timed_padded_tokens']})"),
        row("positions computed, timed steps", lambda n, r: r["timed_computed_positions"]),
        row("peak RSS, process (MB)", lambda n, r: f"{r['peak_rss_mb']:.0f}"),
        row("peak RSS, training steps (MB)", lambda n, r: f"{r['peak_rss_training_mb']:.0f}"),
        row("RSS before first step (MB)", lambda n, r: f"{r['rss_before_training_mb']:.0f}"),
    ]
    if gpu:
        lines.append(row("peak GPU allocated (MB)", lambda n, r: f"{r['gpu_peak_mb']:.0f}"))
    lines += [
        row("reference log-probs", ref_pass),
        row("setup before first step (s)", lambda n, r: f"{r['setup_s']:.1f}"),
        row("1-min load average, timed steps", lambda n, r: f"{r['load_average_timed']:.1f}"),
        "",
        "| ratio | value | target | result |",
        "|---|---:|---:|---|",
    ]
    for name, entry in figures["ratios"].items():
        verdict = "–" if entry["pass"] is None else ("PASS" if entry["pass"] else "FAIL")
        value = "–" if entry["value"] is None else f"{entry['value']:.3f}"
        lines.append(f"| {name} | {value} | {entry['target']} | {verdict} |")
    for name, value in figures["other_ratios"].items():
        lines.append(f"| {name} | {'–' if value is None else f'{value:.3f}'} | (no target) | |")
    check = figures["like_for_like"]
    lines += ["", f"Like for like: {'yes' if check['ok'] else 'NO'} — {check['detail']}"]
    return "\n".join(lines) + "\n"


def like_for_like(summaries: Dict[str, Dict[str, Any]], threads: int) -> Dict[str, Any]:
    problems, notes = [], []
    names = list(summaries)
    first = summaries[names[0]]
    for name in names[1:]:
        if summaries[name]["tokens_per_step"] != first["tokens_per_step"]:
            problems.append(f"tokens per step differ: {names[0]} {first['tokens_per_step']} vs {name} "
                            f"{summaries[name]['tokens_per_step']}")
        if summaries[name]["padded_tokens_per_step"] != first["padded_tokens_per_step"]:
            problems.append(f"padded tokens per step differ between {names[0]} and {name}")
    for name, summary in summaries.items():
        if summary["threads_seen"] != [threads]:
            problems.append(f"{name} ran with {summary['threads_seen']} threads, not {threads}")
    losses = {n: s["loss_per_step"] for n, s in summaries.items()}
    if "dpo_zoo" in losses and all(v is not None for l in losses.values() for v in l):
        diffs = {n: max(abs(a - b) for a, b in zip(losses["dpo_zoo"], l)) for n, l in losses.items() if n != "dpo_zoo"}
        if diffs:
            notes.append("max |loss difference| per step vs dpo_zoo: " + ", ".join(f"{n} {d:.2e}" for n, d in diffs.items()))
    detail = "; ".join(problems) if problems else (
        f"identical tokens per step ({first['tokens_per_step']}) and padded shapes in every trainer, "
        f"{threads} threads seen in each")
    if notes:
        detail += "; " + "; ".join(notes)
    return {"ok": not problems, "detail": detail, "problems": problems}


def portable_path(path: str) -> str:
    """A data path as recorded in results: relative to the repository when inside it (results are
    committed, so they must not carry the path of the machine they were measured on)."""
    resolved = Path(path).expanduser().resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker_main(args)

    total_steps = args.warmup + args.steps
    data = str(Path(args.data).expanduser().resolve()) if args.preprocessor != "vader" or Path(args.data).exists() else args.data
    model = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    temp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="train_throughput_")
        workdir = Path(temp.name)
    spec = {
        "model": model, "data": data, "preprocessor": args.preprocessor, "pairs": args.pairs,
        "micro_batch": args.micro_batch, "warmup": args.warmup, "steps": args.steps, "total_steps": total_steps,
        "max_length": args.max_length, "max_prompt_length": args.max_prompt_length or args.max_length // 2,
        "ref_batch": args.ref_batch, "threads": args.threads, "device": args.device, "precision": args.precision,
        "lr": args.lr, "beta": args.beta, "seed": args.seed, "workdir": str(workdir),
        "prepared_dir": str(workdir / "prepared"), "profile": args.profile,
    }
    started = time.perf_counter()
    try:
        prep = run_worker("prep", spec, "prep")
        print(f"   prep: {prep['pairs']} pairs, {prep['tokens']:,} tokens, {prep['prep_s']:.1f} s", flush=True)
        if prep["pairs"] < total_steps * args.micro_batch:
            print(f"   note: {total_steps} steps x {args.micro_batch} pairs > {prep['pairs']} pairs: "
                  "both trainers go round the data more than once", flush=True)
        spec["prepared_path"] = prep["path"]
        chosen = [t for t in TRAINERS if t in args.trainers.split(",")]
        runs: Dict[str, List[Dict[str, Any]]] = {t: [] for t in chosen}
        for repeat in range(args.repeats):
            order = chosen[repeat % len(chosen):] + chosen[: repeat % len(chosen)]
            for trainer in order:
                tag = f"{trainer}-{repeat + 1}"
                result = run_worker(trainer, {**spec, "run_dir": str(workdir / "runs" / tag)}, tag)
                summary = summarize_run(result, args.warmup)
                runs[trainer].append(summary)
                print(f"   {trainer}: {summary['tokens_per_s']:.1f} tokens/s wall, "
                      f"{summary['tokens_per_cpu_s']:.1f} tokens/CPU-s, peak RSS {summary['peak_rss_mb']:.0f} MB",
                      flush=True)
    finally:
        if temp is not None:
            temp.cleanup()

    best = {t: max(r, key=lambda s: s["tokens_per_s"]) for t, r in runs.items()}
    for t, summary in best.items():
        summary["runs"] = [{k: r[k] for k in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mb", "timed_wall_s")}
                           for r in runs[t]]
        summary["peak_rss_mb_max_over_runs"] = max(r["peak_rss_mb"] for r in runs[t])

    def ratio(a, b, key):
        if a in best and b in best and best[b].get(key):
            return best[a][key] / best[b][key]
        return None

    memory_key = "gpu_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    targets = TARGETS.get(args.preprocessor, {})
    ratios = {
        "throughput_vs_trl_live": ratio_entry("throughput_vs_trl_live", ratio("dpo_zoo", "trl_live", "tokens_per_s"),
                                              targets),
        "throughput_vs_trl_precompute": ratio_entry("throughput_vs_trl_precompute",
                                                    ratio("dpo_zoo", "trl_precompute", "tokens_per_s"), targets),
        "peak_memory_vs_trl_live": ratio_entry("peak_memory_vs_trl_live", ratio("dpo_zoo", "trl_live", memory_key),
                                               targets),
    }
    extra_ratios = {
        "throughput_packed_vs_padded": ratio("dpo_zoo", "dpo_zoo_padded", "tokens_per_s"),
        "throughput_live_vs_trl_live": ratio("dpo_zoo_live", "trl_live", "tokens_per_s"),
        "peak_rss_live_vs_trl_live": ratio("dpo_zoo_live", "trl_live", "peak_rss_mb"),
        "peak_rss_packed_vs_padded": ratio("dpo_zoo", "dpo_zoo_padded", "peak_rss_mb"),
        "cpu_throughput_vs_trl_live": ratio("dpo_zoo", "trl_live", "tokens_per_cpu_s"),
        "cpu_throughput_vs_trl_precompute": ratio("dpo_zoo", "trl_precompute", "tokens_per_cpu_s"),
        "training_peak_rss_vs_trl_live": ratio("dpo_zoo", "trl_live", "peak_rss_training_mb"),
        "peak_rss_vs_trl_precompute": ratio("dpo_zoo", "trl_precompute", "peak_rss_mb"),
    }
    import platform

    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("trl", "deepspeed", "accelerate", "datasets"):
        try:
            versions[package] = __import__(package).__version__
        except Exception:  # a missing optional package only leaves its version out
            versions[package] = None
    figures = {
        "what": "training throughput (input tokens/s over timed steps, wall clock) and peak RSS per trainer; see "
                "bench/train_throughput.py's docstring",
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {**{k: v for k, v in spec.items() if k not in ("workdir", "prepared_dir", "prepared_path")},
                     "data": portable_path(spec["data"])},
        "memory_ratio_uses": memory_key,
        # The prepared set lived in a work folder that is gone: record where inside it, not this machine's path.
        "prep": {**prep, "path": str(Path(prep["path"]).relative_to(workdir))
                 if Path(prep["path"]).is_relative_to(workdir) else prep["path"]},
        "trainers": best,
        "ratios": ratios,
        "other_ratios": {k: (round(v, 3) if v is not None else None) for k, v in extra_ratios.items()},
        "like_for_like": like_for_like(best, args.threads),
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "platform": platform.platform(),
                    "versions": versions},
        "total_s": round(time.perf_counter() - started, 1),
    }
    table = markdown(figures)
    print()
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if figures["like_for_like"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
