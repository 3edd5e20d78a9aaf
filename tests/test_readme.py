"""The README cannot rot: every command in its bash blocks is run here (in a reduced form: the tiny
model, a few pairs, outputs in a temporary folder) or is named with the test that exercises it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# Commands exercised elsewhere (or here by a test below), by their first words.
EXERCISED = {
    "make demo": "test_demo_script_end_to_end (launch/demo.sh, reduced)",
    "make test": ".ci/run runs it on every submission",
    "dpo-zoo prep configs/experiments/hh_smollm2.yaml": "test_readme_prep_train_compare",
    "dpo-zoo train configs/experiments/hh_smollm2.yaml loss=sampo loss.beta=0.05": "test_readme_prep_train_compare",
    "dpo-zoo compare runs/demo/dpo runs/demo/sampo runs/demo/tie_dpo --data prepared/demo/heldout": "test_demo_script_end_to_end",
    "dpo-zoo compare runs/demo/dpo --data prepared/demo/heldout --losses all": "test_readme_prep_train_compare",
    "dpo-zoo study configs/experiments/sentiment_frontier.yaml": "tests/test_study.py (the same study, reduced; the config loads)",
    "dpo-zoo study configs/experiments/exact_benchmark.yaml": "tests/test_exact_benchmark.py (a tiny exact study end to end) "
        "and tests/test_study.py (the shipped exact configs load)",
    "dpo-zoo study configs/experiments/sentiment_powered.yaml": "tests/test_study.py (the config loads with its design)",
    "bash launch/single_node.sh": "tests/test_distributed.py (2 processes under this script's launcher command)",
    "HOSTFILE=launch/hostfile bash launch/multi_node.sh": "tests/test_multi_node.py (two nodes in network namespaces, train and prep)",
    "NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=launch/hostfile bash launch/multi_node.sh": "tests/test_multi_node.py (how each node is started there)",
    "sbatch --nodes=2 launch/slurm.sbatch": "tests/test_launch.py (under stand-ins for scontrol and srun)",
    "dpo-zoo compare runs/demo/dpo runs/demo/sampo --data prepared/demo/heldout --config compare.judge=":
        "tests/test_win_rate.py (compare with a module:function judge, against the reference and a baseline run)",
    "dpo-zoo compare runs/a runs/b --data prepared/x/heldout --config compare.judge=": "tests/test_win_rate.py "
        "(a model-folder judge; a baseline run named by compare.judge_baseline)",
    "dpo-zoo compare runs/a --data prepared/x/heldout --config 'compare.judge=http": "tests/test_win_rate.py "
        "(the endpoint judge against a server on 127.0.0.1)",
    "dpo-zoo doctor": "tests/test_doctor.py (runs and prepared sets built to show each check, through the CLI)",
}


def bash_commands(text):
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                commands.append(line)
    return commands


def test_every_readme_command_is_exercised():
    for command in bash_commands(README):
        assert any(command.startswith(known) for known in EXERCISED), f"README command without a test: {command}"


def test_every_config_and_file_named_in_the_readme_exists():
    for path in set(re.findall(r"(?:configs|launch|docs|bench)/[\w./{},-]+\.(?:yaml|json|sh|sbatch|md)", README)):
        if "{" in path:
            stem, choices, rest = re.match(r"(.*)\{(.*?)\}(.*)", path).groups()
            paths = [stem + c + rest for c in choices.split(",")]
        else:
            paths = [path]
        for p in paths:
            assert (REPO / p).exists(), p


def clean_env():
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def cli(*args, cwd=REPO):
    result = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", *args], cwd=cwd, env=clean_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_readme_prep_train_compare(tiny_model_dir, tmp_path):
    """The README's prep / verify / train / compare --losses all, on its own config, reduced."""
    reduced = [
        f"model.name_or_path={tiny_model_dir}", "data.max_train_pairs=12", "data.max_heldout_pairs=4",
        f"prep.output_dir={tmp_path / 'prepared'}", "prep.progress=false", "prep.topk=4",
        f"train.output_dir={tmp_path / 'runs' / '${loss.name}'}", "train.max_steps=1", "train.progress=false",
        "train.micro_batch_size=2", f"compare.output_dir={tmp_path / 'report'}", "compare.kl_prompts=2",
        "compare.kl_max_new_tokens=4", "compare.progress=false",
    ]
    config = "configs/experiments/hh_smollm2.yaml"
    cli("prep", config, *reduced)
    assert "cache hit" in cli("prep", config, *reduced)
    cli("prep", config, *reduced, "--verify")
    cli("train", config, "loss=sampo", "loss.beta=0.05", *reduced)
    out = cli("compare", str(tmp_path / "runs" / "sampo"), "--data", str(tmp_path / "prepared" / "heldout"),
              "--losses", "all", "--config", config, *reduced)
    assert "sampo" in out and (tmp_path / "report" / "report.html").exists()


@pytest.mark.slow
def test_demo_script_end_to_end(tiny_model_dir, tmp_path):
    """launch/demo.sh (what `make demo` runs after set-up) on the tiny model: prep, three trainings,
    compare; a second run reuses the cache, the trained runs and the report."""
    reduced = [
        f"model.name_or_path={tiny_model_dir}", "data.max_train_pairs=16", "data.max_heldout_pairs=8",
        f"prep.output_dir={tmp_path / 'prepared'}", "prep.progress=false",
        f"train.output_dir={tmp_path / 'runs' / '${loss.name}'}", "train.max_steps=2", "train.eval_every=0",
        "train.progress=false", f"compare.output_dir={tmp_path / 'report'}", "compare.kl_prompts=2",
        "compare.kl_max_new_tokens=4", "compare.progress=false",
    ]
    env = {**clean_env(), "DPO_ZOO_SKIP_SETUP": "1", "PYTHON": sys.executable}
    first = subprocess.run(["bash", "launch/demo.sh", *reduced], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for loss in ("dpo", "sampo", "tie_dpo"):
        assert (tmp_path / "runs" / loss / "final" / "adapter_model.safetensors").exists()
    assert (tmp_path / "report" / "report.html").exists()
    assert first.stdout.rstrip().endswith(f"report: {tmp_path / 'report' / 'report.html'}")
    second = subprocess.run(["bash", "launch/demo.sh", *reduced], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "cache hit" in second.stdout and second.stdout.count("already trained") == 3
    assert "already holds this comparison" in second.stdout and "| dpo | dpo | cache |" in second.stdout


def test_launch_scripts_parse_and_fail_clearly(tmp_path):
    for script in ("single_node.sh", "multi_node.sh", "slurm.sbatch", "demo.sh", "setup_env.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "launch" / script)]).returncode == 0, script
    missing = subprocess.run(["bash", "launch/multi_node.sh", "configs/experiments/hh_smollm2.yaml"], cwd=REPO,
                             env={**clean_env(), "HOSTFILE": str(tmp_path / "nope")}, capture_output=True, text=True)
    assert missing.returncode == 2 and "no hostfile" in missing.stderr
    slurm = (REPO / "launch" / "slurm.sbatch").read_text()
    assert "RANK=$SLURM_PROCID" in slurm and "-m dpo_zoo.cli train" in slurm


def test_readme_loss_example_registers_and_computes():
    """The 'Add your own loss' example runs as written and plugs into compute_loss."""
    import torch

    from dpo_zoo.losses import compute_loss, registry

    code = re.search(r"## Add your own loss\n\n```python\n(.*?)```", README, re.S).group(1)
    try:
        exec(compile(code, "README.md", "exec"), {})
        out = compute_loss(
            "margin_dpo", margin=0.5, beta=0.5,
            policy_chosen_logps=torch.tensor([-10.0]), policy_rejected_logps=torch.tensor([-15.0]),
            reference_chosen_logps=torch.tensor([-12.0]), reference_rejected_logps=torch.tensor([-14.0]),
        )
        # β h = 0.5 × 3 = 1.5; minus the margin 0.5 → −log σ(1.0) = log(1 + e^{−1}) = 0.31326169
        assert out.losses.item() == pytest.approx(0.3132616875182228, rel=1e-6)
    finally:
        registry._REGISTRY.pop("margin_dpo", None)


def test_readme_counts_the_registry_right():
    from dpo_zoo.losses import registered_losses

    claimed = re.search(r"(\d+) registered names", README)
    assert claimed and int(claimed.group(1)) == len(registered_losses())
