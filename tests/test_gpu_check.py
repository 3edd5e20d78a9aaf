"""bench/gpu_check.sh --device cpu: the GPU check's code end to end on CPU with tiny shapes (a dry run).

The packages the check would install from ./wheelhouse are present here, so the script skips that step.
What is checked is the one JSON it prints: both model shapes, packed-vs-padded agreement in bf16 with
its fp32 yardstick, throughput, memory and MFU per trainer, and TRL named or said to be missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu_prints_one_json(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--workdir", str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)  # the whole of stdout is the one JSON object
    assert set(report["models"]) == {"smollm2-360m", "qwen2.5-0.5b"}
    assert report["tiny_shapes"] is True and report["peak"]["bf16_flops"] > 0
    for entry in report["models"].values():
        check = entry["agreement"]
        assert check["loss_padded_fp32"] == pytest.approx(0.6931, abs=0.05)  # reference sums 0.5 off: near ln 2
        packed = check["packed_vs_padded_bf16"]["segments"]
        assert packed["agree"] is True and packed["grad_cosine"] > 0.999
        assert 0 < check["bf16_vs_fp32_padded"]["token_logp_max_abs"] < 0.1
        runs = entry["throughput"]["trainers"]
        assert runs["dpo_zoo"]["tokens_per_s"] > 0 and runs["dpo_zoo_live"]["peak_memory_mb"] > 0
        trl_there = report["versions"]["trl"] != "trl not available"
        assert ("trl_precompute" in runs) == trl_there and ("trl" in runs) == (not trl_there)
        mfu = entry["throughput"]["mfu"]
        assert mfu["flops_per_token"] > 6 * mfu["matmul_parameters"]  # attention FLOPs on top of 6N
        for trainer, figure in mfu["per_trainer"].items():
            assert 0 < figure["mfu"] < 1
            assert figure["achieved_tflops"] == pytest.approx(
                runs[trainer]["tokens_per_s"] * mfu["flops_per_token"] / 1e12, rel=0.01, abs=1e-4)
