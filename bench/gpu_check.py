"""One GPU check of dpo_zoo, no network needed: ``bash bench/gpu_check.sh`` (which installs what is missing
from ``./wheelhouse`` and runs this), about 5 to 8 minutes on one H100; prints ONE JSON object.

    bash bench/gpu_check.sh                       # on the GPU machine
    bash bench/gpu_check.sh --device cpu          # the same code end to end on CPU, tiny shapes (a dry run)
    bash bench/gpu_check.sh --peak-tflops 989     # when the GPU's name is not in PEAK_BF16_TFLOPS

Models: random weights (seeded) in the shapes of SmolLM2-360M and Qwen2.5-0.5B (:data:`SHAPES`, config
dicts written here), with SmolLM2's tokenizer from ``bench/assets/smollm2_tokenizer`` (shipped in the
repository). Data: the first pairs of HH-RLHF harmless-base test (``data/hh_rlhf``, shipped). Random
weights change no cost: the figures are about speed, memory and numerical agreement, not quality.

Per model the JSON holds:

``agreement``
    bf16, one batch of ``--check-pairs`` pairs: the packed path (each pair one [prompt | chosen | rejected]
    segment, :mod:`dpo_zoo.model.packing`, per attention mode: ``segments``, and ``flex`` on a GPU)
    against the padded ``[2B, L]`` block, for per-token completion log-probs, per-completion sums, the
    DPO loss (sigmoid, beta 0.1, Rafailov et al. 2023 eq. 7, against fixed reference sums) and every
    parameter's gradient: max |difference|, and for gradients the relative L2 difference and cosine.
    The yardstick is the same padded computation in fp32 vs bf16 (``bf16_vs_fp32_padded``): the packed
    path is stated to agree when each of its differences is at most twice bf16's own rounding error.
``throughput``
    ``bench/train_throughput.py`` run on the model in bf16 (``--device cuda --precision bf16``):
    dpo_zoo with the reference cache and with a live reference, TRL's ``DPOTrainer`` live and with
    precomputed reference log-probs when TRL is installed ("trl not available" otherwise), all on exactly
    the same token ids; tokens/s, peak GPU memory (``torch.cuda.max_memory_allocated``) and per-step
    losses per trainer.
``mfu``
    Model FLOPs utilisation per trainer: training FLOPs per input token = ``6·N`` (N = parameters in
    matrix products, the LM head included, the embedding lookup not) + causal attention
    ``6·n_layers·d_attn·Σn²/Σn`` (QKᵀ and AV, forward + backward, over the sequence lengths ``n`` of
    the prepared set, prompts counted in each sequence as in the padded layout), times tokens/s, over
    the device's dense bf16 peak (:data:`PEAK_BF16_TFLOPS` by device name, ``--peak-tflops`` to
    override; on CPU the bf16 matmul rate measured by ``bench/matmul_peak.py`` in the same run). The
    same FLOPs per token for every trainer, so MFU ratios are throughput ratios; a live reference's own
    forward pass and the positions packing skips are not counted (not model FLOPs of training).

``--budget-s`` (default 420) bounds the run: a model's throughput runs are skipped, and said to be, once
the budget is spent.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))
from matmul_peak import matmul_parameters, training_flops_per_token  # noqa: E402  (bench/ on the path)
TOKENIZER = BENCH / "assets" / "smollm2_tokenizer"
DATA = REPO / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"

# Published configs (HuggingFaceTB/SmolLM2-360M, Qwen/Qwen2.5-0.5B), as config dicts.
SHAPES: Dict[str, Dict[str, Any]] = {
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49152,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
                         sliding_window=32768, max_window_layers=21),
}
# --device cpu: the same families, shrunk (the tokenizer's vocabulary kept, so its ids stay valid).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=49152)
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; matched as a
# lower-case substring of torch.cuda.get_device_name(), first match wins (so longer names come first).
PEAK_BF16_TFLOPS: List[Tuple[str, float]] = [
    ("gh200", 989.0), ("h200", 989.0), ("h100 nvl", 835.0), ("h100 pcie", 756.0), ("h100", 989.0),
    ("h800", 989.0), ("b200", 2250.0), ("b100", 1750.0), ("a100", 312.0), ("a800", 312.0),
    ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0), ("a10g", 70.0), ("a10", 125.0), ("a6000", 155.0),
    ("rtx 4090", 165.0), ("rtx 3090", 71.0), ("mi300x", 1307.0), ("mi250x", 383.0),
]


def say(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def model_config(name: str, tiny: bool):
    from transformers import AutoConfig

    shape = dict(SHAPES[name])
    if tiny:
        shape.update(TINY)
    model_type = shape.pop("model_type")
    return AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)


def build_model(name: str, tiny: bool, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = model_config(name, tiny)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def read_pairs(limit: int) -> List[Tuple[str, str, str]]:
    """(prompt, chosen, rejected) of the first ``limit`` HH-RLHF pairs: the prompt ends at the last
    ``"\\n\\nAssistant:"`` of the shared prefix (the layout dpo_zoo's hh_rlhf preprocessor reads)."""
    out = []
    with gzip.open(DATA, "rt") as f:
        for line in f:
            row = json.loads(line)
            chosen, rejected = row["chosen"], row["rejected"]
            cut = chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:")
            if cut < len("\n\nAssistant:") or chosen[:cut] != rejected[:cut]:
                continue
            out.append((chosen[:cut], chosen[cut:], rejected[cut:]))
            if len(out) == limit:
                break
    return out


def check_batch(tokenizer, pairs, max_length: int, device):
    """Right-padded ``[2B, L]`` ids, mask and completion starts: chosen rows, then rejected rows."""
    prompt_max = max_length // 2
    rows, starts = [], []
    for side in (1, 2):
        for pair in pairs:
            prompt = tokenizer(pair[0], add_special_tokens=False).input_ids[-prompt_max:]
            completion = tokenizer(pair[side], add_special_tokens=False).input_ids[: max_length - len(prompt)]
            rows.append(prompt + completion)
            starts.append(len(prompt))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device), torch.tensor(starts, device=device)


def dpo_loss(sums: torch.Tensor, ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7): mean of −log σ(β[(π_c − ref_c) − (π_r − ref_r)])."""
    n = sums.shape[0] // 2
    margin = (sums[:n] - ref[:n]) - (sums[n:] - ref[n:])
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def one_pass(model, batch, ref, padding_free: bool, attention: str = "segments"):
    """Token log-probs, sums, loss and the flat fp32 gradient of one forward + backward."""
    from dpo_zoo.model import packing
    from dpo_zoo.model.logps import completion_logps

    ids, mask, starts = batch
    packing.set_attention(model, attention)
    model.zero_grad(set_to_none=True)
    out = completion_logps(model, ids, mask, starts, pairs=ids.shape[0] // 2, padding_free=padding_free)
    sums = out.sums()
    loss = dpo_loss(sums, ref)
    loss.backward()
    grad = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return {"tokens": out.token_logps.detach().float(), "mask": out.mask.bool(), "sums": sums.detach().float(),
            "loss": float(loss.detach()), "grad": grad}


def differences(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, float]:
    mask = a["mask"] & b["mask"]
    grad_diff = (a["grad"] - b["grad"]).norm() / b["grad"].norm().clamp_min(1e-30)
    cosine = torch.nn.functional.cosine_similarity(a["grad"].double(), b["grad"].double(), dim=0)
    return {
        "token_logp_max_abs": float((a["tokens"] - b["tokens"]).abs()[mask].max()),
        "completion_sum_max_abs": float((a["sums"] - b["sums"]).abs().max()),
        "loss_abs": abs(a["loss"] - b["loss"]),
        "grad_max_abs": float((a["grad"] - b["grad"]).abs().max()),
        "grad_rel_l2": float(grad_diff),
        "grad_cosine": float(cosine),
    }


def agreement(name: str, tiny: bool, tokenizer, device, pairs: int, max_length: int) -> Dict[str, Any]:
    """bf16 packed (per attention mode) vs bf16 padded, with fp32 padded vs bf16 padded as the yardstick."""
    batch = check_batch(tokenizer, read_pairs(pairs), max_length, device)
    fp32 = build_model(name, tiny).to(device)
    with torch.no_grad():
        from dpo_zoo.model.logps import completion_logps

        ref = completion_logps(fp32, *batch, pairs=pairs, padding_free=False).sums().float()
    ref = ref - 0.5  # fixed reference sums a little off the policy's, so the loss is not exactly ln 2
    exact = one_pass(fp32, batch, ref, padding_free=False)
    del fp32
    bf16 = build_model(name, tiny).to(device, torch.bfloat16)
    padded = one_pass(bf16, batch, ref, padding_free=False)
    yardstick = differences(padded, exact)
    modes = ["segments"] + (["flex"] if device.type == "cuda" else [])
    out: Dict[str, Any] = {
        "pairs": pairs, "tokens": int(batch[1].sum()), "completion_tokens": int(padded["mask"].sum()),
        "loss_padded_bf16": padded["loss"], "loss_padded_fp32": exact["loss"],
        "bf16_vs_fp32_padded": yardstick, "packed_vs_padded_bf16": {},
    }
    for mode in modes:
        try:
            packed = one_pass(bf16, batch, ref, padding_free=True, attention=mode)
        except Exception as err:  # flex needs torch.compile's GPU backend; a failure is reported, not fatal
            out["packed_vs_padded_bf16"][mode] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        diff = differences(packed, padded)
        worse = [k for k in ("token_logp_max_abs", "completion_sum_max_abs", "loss_abs", "grad_rel_l2")
                 if diff[k] > 2 * yardstick[k] + 1e-6]
        diff["agree"] = not worse
        diff["statement"] = (
            f"packed ({mode}) agrees with padded within bf16 rounding: every difference <= 2x bf16's own error "
            "against fp32" if not worse else f"packed ({mode}) differs from padded by more than 2x bf16's "
            f"rounding error in {', '.join(worse)}")
        out["packed_vs_padded_bf16"][mode] = diff
    out["agree"] = all(d.get("agree", False) for d in out["packed_vs_padded_bf16"].values())
    del bf16
    return out


def peak_flops(device, override_tflops: Optional[float], threads: int) -> Dict[str, Any]:
    if override_tflops:
        return {"bf16_flops": override_tflops * 1e12, "source": "--peak-tflops"}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS:
            if key in name.lower():
                return {"bf16_flops": tflops * 1e12, "source": f"table: {key!r} in {name!r} (dense bf16 data sheet)"}
        return {"bf16_flops": None, "source": f"{name!r} is not in the table; pass --peak-tflops"}
    from matmul_peak import measure

    measured = measure(size=2048, seconds=1.0, threads=threads)
    return {"bf16_flops": measured["bf16_gflops"] * 1e9, "source": "measured: bench/matmul_peak.py",
            "matmul_peak": measured}


def sequence_stats(workdir: Path, prep: Dict[str, Any]) -> Dict[str, float]:
    """Σn and Σn² over the prepared sequences (chosen and rejected, prompts in each)."""
    from dpo_zoo.cache.reader import PreparedSet

    prepared = PreparedSet.open(workdir / prep["path"])
    rows = prepared.rows(list(range(len(prepared))), columns=["chosen_input_ids", "rejected_input_ids"])
    lengths = [len(r[c]) for r in rows for c in ("chosen_input_ids", "rejected_input_ids")]
    return {"sequences": len(lengths), "sum_n": sum(lengths), "sum_n2": sum(n * n for n in lengths)}


def throughput(name: str, tiny: bool, model, tokenizer, args, workdir: Path, trl_ok: bool, peak: Dict[str, Any]):
    folder = workdir / f"model-{name}"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    trainers = ["dpo_zoo", "dpo_zoo_live"] + (["trl_live", "trl_precompute"] if trl_ok else [])
    out_json = workdir / f"throughput-{name}.json"
    command = [sys.executable, str(BENCH / "train_throughput.py"), "--model", str(folder), "--pairs", str(args.pairs),
               "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--max-length", str(args.max_length), "--threads", str(args.threads), "--device", args.device,
               "--precision", "bf16", "--trainers", ",".join(trainers), "--workdir", str(workdir / f"tt-{name}"),
               "--out", str(out_json)]
    log = workdir / f"throughput-{name}.log"
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO)).returncode
    if not out_json.exists():
        tail = log.read_text().splitlines()[-25:]
        return {"error": f"bench/train_throughput.py exited {code}", "log_tail": tail}
    figures = json.loads(out_json.read_text())
    stats = sequence_stats(workdir / f"tt-{name}", figures["prep"])
    config = model.config
    d_attn = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    n = matmul_parameters(model)
    per_token = training_flops_per_token(n, config.num_hidden_layers, d_attn, stats["sum_n"], stats["sum_n2"])
    memory_key = "gpu_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    runs, mfu = {}, {}
    for trainer, r in figures["trainers"].items():
        runs[trainer] = {"tokens_per_s": r["tokens_per_s"], "peak_memory_mb": r.get(memory_key),
                         "peak_memory_is": memory_key, "median_step_s": r["median_step_s"],
                         "positions_computed": r["timed_computed_positions"], "timed_tokens": r["timed_tokens"],
                         "loss_per_step": r["loss_per_step"]}
        achieved = r["tokens_per_s"] * per_token
        mfu[trainer] = {"achieved_tflops": round(achieved / 1e12, 4),
                        "mfu": round(achieved / peak["bf16_flops"], 4) if peak.get("bf16_flops") else None}
    if not trl_ok:
        runs["trl"] = "trl not available"

    def ratio(a, b, key):
        ra, rb = runs.get(a), runs.get(b)
        if isinstance(ra, dict) and isinstance(rb, dict) and ra.get(key) and rb.get(key):
            return round(ra[key] / rb[key], 3)
        return None

    return {
        "trainers": runs,
        "ratios": {"tokens_per_s_dpo_zoo_vs_trl_precompute": ratio("dpo_zoo", "trl_precompute", "tokens_per_s"),
                   "tokens_per_s_dpo_zoo_live_vs_trl_live": ratio("dpo_zoo_live", "trl_live", "tokens_per_s"),
                   "peak_memory_dpo_zoo_vs_trl_precompute": ratio("dpo_zoo", "trl_precompute", "peak_memory_mb"),
                   "peak_memory_dpo_zoo_live_vs_trl_live": ratio("dpo_zoo_live", "trl_live", "peak_memory_mb")},
        "like_for_like": figures["like_for_like"]["detail"],
        "prep_s": figures["prep"]["prep_s"],
        "mfu": {"per_trainer": mfu, "flops_per_token": per_token, "matmul_parameters": n,
                "attention_flops_per_token": per_token - 6 * n, "sequences": stats, "peak": peak},
        "settings": {k: figures["settings"][k] for k in ("pairs", "micro_batch", "warmup", "steps", "max_length",
                                                        "precision", "device", "threads")},
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated subset of " + ", ".join(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default on --device cpu)")
    parser.add_argument("--check-pairs", type=int, default=None, help="pairs in the agreement batch")
    parser.add_argument("--pairs", type=int, default=None, help="pairs prepared for the throughput runs")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs on cuda, 2 on cpu)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak (TFLOP/s)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip remaining throughput runs after this")
    parser.add_argument("--no-throughput", action="store_true", help="agreement only")
    parser.add_argument("--workdir", default=None, help="keep models, prepared sets and logs here")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.tiny = args.tiny or cpu
    defaults = dict(check_pairs=4, pairs=8, micro_batch=2, steps=1, warmup=1, max_length=64, threads=2) if cpu else \
        dict(check_pairs=8, pairs=64, micro_batch=8, steps=6, warmup=2, max_length=512, threads=os.cpu_count() or 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.models.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch; run with --device cpu for the dry run")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from dpo_zoo.model.loading import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    try:
        import trl

        trl_version: Optional[str] = trl.__version__
    except Exception:
        trl_version = None
    peak = peak_flops(device, args.peak_tflops, args.threads)
    temp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="gpu_check_")
        workdir = Path(temp.name)
    report: Dict[str, Any] = {
        "what": "bench/gpu_check.py: bf16 packed-vs-padded agreement, dpo_zoo vs TRL throughput, memory and MFU",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "tiny_shapes": args.tiny,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "trl": trl_version or "trl not available",
                     "deepspeed": _version("deepspeed")},
        "peak": peak,
        "models": {},
    }
    try:
        for name in args.models.split(","):
            say(f"{name}: agreement")
            entry: Dict[str, Any] = {}
            model = build_model(name, args.tiny)
            entry["parameters"] = sum(p.numel() for p in model.parameters())
            entry["matmul_parameters"] = matmul_parameters(model)
            entry["agreement"] = agreement(name, args.tiny, tokenizer, device, args.check_pairs, args.max_length)
            if args.device == "cuda":
                torch.cuda.empty_cache()
            spent = time.perf_counter() - started
            if args.no_throughput:
                entry["throughput"] = "skipped: --no-throughput"
            elif spent > args.budget_s:
                entry["throughput"] = f"skipped: {spent:.0f} s spent of the {args.budget_s:.0f} s budget"
            else:
                say(f"{name}: throughput (bench/train_throughput.py, bf16)")
                entry["throughput"] = throughput(name, args.tiny, model, tokenizer, args, workdir,
                                                 trl_version is not None, peak)
            report["models"][name] = entry
            del model
    finally:
        if temp is not None:
            temp.cleanup()
    report["agree"] = all(m["agreement"]["agree"] for m in report["models"].values())
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1, default=float)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _version(package: str) -> Optional[str]:
    try:
        return __import__(package).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
