"""The benchmark scripts run as bench/README.md gives them, reduced to the tiny model and a few pairs.

Their figures on a tiny model say nothing about speed; what is checked is that each script runs end
to end and reports what it claims to (like-for-like checks, ratios, sizes), so the commands in the
benchmark README keep working. The screenshot script runs where a Chromium is installed.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(args, **kwargs):
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_prep_throughput_reports_both_paths_on_the_same_tokens(tiny_model_dir, tmp_path):
    out = tmp_path / "prep.json"
    printed = run(["bench/prep_throughput.py", "--model", str(tiny_model_dir), "--pairs", "8", "--batch-size", "4",
                   "--shard-size", "4", "--max-length", "96", "--max-prompt-length", "48", "--repeats", "1",
                   "--threads", "1", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert figures["pairs"] == 8 and figures["shards"] == 2 and figures["tokens"] > 0
    assert figures["ratio"] == pytest.approx(figures["bare_forward_s"] / figures["prep_s"], abs=0.01)  # rounded inputs
    assert 4 < figures["bytes_per_token"] < 40  # int32 ids + float32 log-probs + offsets + texts
    assert "prep / bare throughput" in printed


def _train_bench(tiny_model_dir, tmp_path, trainers):
    out = tmp_path / "train.json"
    run(["bench/train_throughput.py", "--model", str(tiny_model_dir), "--pairs", "12", "--micro-batch", "2",
         "--steps", "3", "--warmup", "1", "--max-length", "96", "--threads", "1", "--trainers", trainers,
         "--workdir", str(tmp_path / "work"), "--out", str(out)])
    figures = json.loads(out.read_text())
    assert (tmp_path / "train.md").is_file()
    return figures


@pytest.mark.slow
def test_train_throughput_times_dpo_zoo_steps(tiny_model_dir, tmp_path):
    figures = _train_bench(tiny_model_dir, tmp_path, "dpo_zoo,dpo_zoo_padded")
    ours, padded = figures["trainers"]["dpo_zoo"], figures["trainers"]["dpo_zoo_padded"]
    assert ours["timed_steps"] == 3 and ours["timed_tokens"] > 0 and ours["tokens_per_s"] > 0
    assert ours["timed_padded_tokens"] >= ours["timed_tokens"]
    assert ours["peak_rss_mb"] > 0
    # packed: each prompt once and no padding, so fewer positions than the input tokens; padded: the block
    assert ours["timed_computed_positions"] < ours["timed_tokens"]
    assert padded["timed_computed_positions"] == padded["timed_padded_tokens"]
    assert ours["loss_per_step"] == pytest.approx(padded["loss_per_step"], abs=1e-5)
    assert figures["other_ratios"]["throughput_packed_vs_padded"] is not None


@pytest.mark.slow
def test_train_throughput_against_trl_is_like_for_like(tiny_model_dir, tmp_path):
    pytest.importorskip("trl", reason="the TRL comparison needs the bench extra: pip install -e '.[bench]'")
    figures = _train_bench(tiny_model_dir, tmp_path, "dpo_zoo,trl_live,trl_precompute")
    assert set(figures["trainers"]) == {"dpo_zoo", "trl_live", "trl_precompute"}
    tokens = {name: t["timed_tokens"] for name, t in figures["trainers"].items()}
    assert len(set(tokens.values())) == 1, tokens  # the same token ids, in the same order
    assert figures["like_for_like"]["ok"]  # per-step tokens, padded shapes, losses and threads agree
    ratios = figures["ratios"]
    assert set(ratios) >= {"throughput_vs_trl_live", "throughput_vs_trl_precompute", "peak_memory_vs_trl_live"}
    ours, live = figures["trainers"]["dpo_zoo"], figures["trainers"]["trl_live"]
    assert ratios["throughput_vs_trl_live"]["value"] == pytest.approx(ours["tokens_per_s"] / live["tokens_per_s"], rel=0.02)


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="no Chromium installed (apt-get install -y chromium)")
@pytest.mark.slow
def test_screenshot_script_renders_a_report(tmp_path):
    report = tmp_path / "report.html"
    report.write_text("<html><body><h1>dpo_zoo compare</h1><table><tr><td>dpo</td><td>0.69</td></tr></table>"
                      "</body></html>")
    subprocess.run(["bash", "bench/screenshot_report.sh", str(report), str(tmp_path / "shot.png"), "800", "600"],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    png = (tmp_path / "shot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
