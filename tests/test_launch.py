"""launch/slurm.sbatch under stand-ins for SLURM's tools (no SLURM here): ``scontrol`` expands the node
list, ``srun`` starts one task per (node, local rank) with the variables real srun sets, and the
interpreter records what each task was given. Checked: every task's rank, world size, local rank, the
rendezvous address (the job's first node) and the command line."""

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCONTROL = """#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && [ "$3" = "gpu-[07-08]" ] || { echo "unexpected: $*" >&2; exit 1; }
printf 'gpu-07\\ngpu-08\\n'
"""
# srun's own options start with --; the rest is the task's command. Tasks: SLURM_NNODES x 2.
SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$RECORD/srun-argv"
while [ "${1#--}" != "$1" ]; do shift; done
per_node=$(( SLURM_NTASKS / SLURM_NNODES ))
for (( task = 0; task < SLURM_NTASKS; task++ )); do
  SLURM_PROCID=$task SLURM_LOCALID=$(( task % per_node )) SLURM_NODEID=$(( task / per_node )) "$@" || exit 1
done
"""
PYTHON = """#!/usr/bin/env bash
python3 -c 'import json, os, sys; print(json.dumps({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}))' "$@" > "$RECORD/task-$SLURM_PROCID.json"
"""


def _tool(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_slurm_script_gives_each_task_its_rank_and_the_first_node_as_rendezvous(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir / "scontrol", SCONTROL)
    _tool(bin_dir / "srun", SRUN)
    python = _tool(tmp_path / "python", PYTHON)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", RECORD=str(tmp_path), PYTHON=str(python),
               SLURM_JOB_NODELIST="gpu-[07-08]", SLURM_NNODES="2", SLURM_NTASKS="4", SLURM_SUBMIT_DIR=str(REPO))
    args = ["configs/experiments/hh_smollm2.yaml", "loss=ra_dpo", "train.output_dir=runs/a b"]
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), *args], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    assert (tmp_path / "srun-argv").read_text().splitlines()[0] == "--kill-on-bad-exit=1"
    tasks = [json.loads((tmp_path / f"task-{i}.json").read_text()) for i in range(4)]
    assert [(t["RANK"], t["LOCAL_RANK"], t["WORLD_SIZE"]) for t in tasks] == [
        ("0", "0", "4"), ("1", "1", "4"), ("2", "0", "4"), ("3", "1", "4")]
    assert {(t["MASTER_ADDR"], t["MASTER_PORT"]) for t in tasks} == {("gpu-07", "29500")}
    assert all(t["argv"] == ["-m", "dpo_zoo.cli", "train", *args] for t in tasks)
