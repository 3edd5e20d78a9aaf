"""The machine's measured matmul peak: the denominator of the FLOP-utilisation figures.

    python bench/matmul_peak.py [--size 2048] [--threads N] [--device cpu|cuda] [--seconds 2]

Times ``torch.mm`` of two ``size × size`` matrices (2·size³ FLOPs each) in float32 and bfloat16, with
the threads torch uses (``torch.get_num_threads()``, or ``--threads``), repeated for about ``--seconds``
after one warm-up product, and reports the best rate over 3 rounds in GFLOP/s. Importable:
:func:`measure` is what ``bench/train_throughput.py`` and ``bench/gpu_check.py`` call, so the fraction
of peak they report uses a peak measured in the same run, on the same (possibly shared) machine.

On a shared machine the figure is what this process could get at that moment; it is a ceiling for a
training step only in the sense that a step's large matmuls run the same kernels.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Dict, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 2.0, device: str = "cpu",
                  rounds: int = 3) -> float:
    """Best of ``rounds`` rates of ``size × size`` by ``size × size`` products in ``dtype``, GFLOP/s."""
    dev = torch.device(device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dev, dtype)
    b = torch.randn(size, size, generator=generator).to(dev, dtype)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: kernel selection, packing buffers
    _sync(dev)
    started = time.perf_counter()
    torch.mm(a, b, out=out)
    _sync(dev)
    one = max(time.perf_counter() - started, 1e-6)
    per_round = max(1, int(seconds / rounds / one))
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(per_round):
            torch.mm(a, b, out=out)
        _sync(dev)
        elapsed = time.perf_counter() - started
        best = max(best, 2.0 * size**3 * per_round / elapsed / 1e9)
    return best


def measure(size: int = 2048, seconds: float = 2.0, device: str = "cpu", threads: Optional[int] = None,
            dtypes=("fp32", "bf16")) -> Dict[str, object]:
    """``{"fp32_gflops": .., "bf16_gflops": .., "size": .., "threads": .., "device": ..}``."""
    if threads is not None:
        torch.set_num_threads(threads)
    out: Dict[str, object] = {"size": size, "threads": torch.get_num_threads(), "device": device}
    for name in dtypes:
        out[f"{name}_gflops"] = round(matmul_gflops(DTYPES[name], size, seconds, device), 1)
    return out


def matmul_parameters(model) -> int:
    """N of 6·N·tokens: weights used in matrix products (the decoder's linear layers and the LM head; a
    tied head counts once, as the head; the embedding lookup, norms and biases are not matmuls)."""
    total = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    return total + model.get_output_embeddings().weight.numel()


def model_matmul_parameters(model_path) -> Dict[str, int]:
    """:func:`matmul_parameters` and the attention shape of the model in ``model_path``, built on the meta
    device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    heads = config.num_attention_heads
    return {"matmul_parameters": matmul_parameters(model), "layers": config.num_hidden_layers,
            "d_attn": heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)}


def training_flops_per_token(matmul_params: int, layers: int, d_attn: int, sum_n: float, sum_n2: float) -> float:
    """Training FLOPs per input token: ``6·N`` (forward 2N, backward 4N; Kaplan et al. 2020) plus causal
    attention ``6·layers·d_attn·Σn²/Σn``: QKᵀ and AV cost ``2·2·n²·d / 2`` forward over a causal
    sequence of ``n`` tokens (half the square), ×3 with the backward pass; averaged per token over
    sequences of lengths ``n`` (prompts counted in each sequence, as in the padded layout)."""
    return 6.0 * matmul_params + 6.0 * layers * d_attn * (sum_n2 / sum_n if sum_n else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=2.0, help="about how long each dtype is timed")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.size, args.seconds, args.device, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
