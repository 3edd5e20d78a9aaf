"""Two "nodes" on one machine, started through ``launch/multi_node.sh``.

Each node is a network namespace with its own address (10.77.0.1 and 10.77.0.2 on a veth pair that
joins only those two namespaces); in each, the DeepSpeed launcher runs with the shared hostfile,
``--no_ssh`` and ``--node_rank`` and starts that node's one process; the two talk over gloo on the
CPU, through the veth pair as two machines would through their network. Creating namespaces needs root
and ``ip netns``; without them the tests skip and say so. The namespaces (named uniquely per test)
are deleted afterwards, and any process still running in them is killed first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NODE_ADDRESSES = ("10.77.0.1", "10.77.0.2")
MASTER_PORT = 29500  # the namespaces are new: nothing else listens in them
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "HOSTFILE")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


class TwoNodes:
    """Two namespaces joined by a veth pair, and the processes started in them."""

    def __init__(self, tag: str, workdir: Path):
        self.namespaces = [f"dz{tag}n{i}" for i in range(2)]
        self.interfaces = [f"dz{tag}v{i}" for i in range(2)]  # <= 15 characters, as Linux requires
        self.hostfile = workdir / "hostfile"
        self.hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []

    def create(self) -> None:
        a, b = self.namespaces
        va, vb = self.interfaces
        steps = [("netns", "add", a), ("netns", "add", b),
                 ("link", "add", va, "type", "veth", "peer", "name", vb),
                 ("link", "set", va, "netns", a), ("link", "set", vb, "netns", b)]
        for ns, iface, address in zip(self.namespaces, self.interfaces, NODE_ADDRESSES):
            steps += [("-n", ns, "addr", "add", f"{address}/24", "dev", iface),
                      ("-n", ns, "link", "set", iface, "up"), ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                raise RuntimeError(f"`ip {' '.join(step)}` failed: {result.stderr.strip()}")

    def destroy(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for ns in self.namespaces:  # deleting a namespace deletes the veth end inside it (and its peer)
            _ip("netns", "del", ns)

    def env(self, node: int) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
        env.update(
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])),
            DS_ACCELERATOR="cpu",
            HOSTFILE=str(self.hostfile),
            NODE_RANK=str(node),
            MASTER_ADDR=NODE_ADDRESSES[0],
            MASTER_PORT=str(MASTER_PORT),
            GLOO_SOCKET_IFNAME=self.interfaces[node],
        )
        return env

    def start(self, args, name: str) -> list[subprocess.Popen]:
        """``bash launch/multi_node.sh <args>`` on both nodes; output in ``<workdir>/<name>-node<i>.log``."""
        started = []
        for node, ns in enumerate(self.namespaces):
            log = open(self.workdir / f"{name}-node{node}.log", "w")
            started.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, "bash", str(REPO / "launch" / "multi_node.sh"), *args],
                env=self.env(node), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
            log.close()
        self.processes += started
        return started

    def log(self, name: str, node: int) -> str:
        return (self.workdir / f"{name}-node{node}.log").read_text()

    def run(self, args, name: str, timeout: float = 600) -> None:
        """Both nodes to the end; both must succeed."""
        processes = self.start(args, name)
        deadline = time.monotonic() + timeout
        for node, process in enumerate(processes):
            process.wait(timeout=max(1, deadline - time.monotonic()))
        for node, process in enumerate(processes):
            assert process.returncode == 0, f"node {node} failed:\n{self.log(name, node)[-4000:]}"


@pytest.fixture
def two_nodes(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("two nodes on one machine need network namespaces, which need root")
    if shutil.which("ip") is None or _ip("netns", "list").returncode != 0:
        pytest.skip("two nodes on one machine need `ip netns` (iproute2)")
    nodes = TwoNodes(uuid.uuid4().hex[:6], tmp_path)
    try:
        nodes.create()
    except RuntimeError as error:
        nodes.destroy()
        pytest.skip(f"cannot create network namespaces here: {error}")
    yield nodes
    nodes.destroy()


def step_losses(out_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, open(Path(out_dir) / "logs.jsonl")) if "loss" in r]


def one_process(command: str, args, timeout: float = 600) -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["DS_ACCELERATOR"] = "cpu"
    result = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", command, *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def final_weights(run_dir: Path) -> dict:
    """The final model as `transformers` loads it (a plain folder, whatever ZeRO stage trained it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.float_sensitive
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_nodes_train_like_one_process(two_nodes, tiny_prepared, tmp_path, zero_stage):
    """2 nodes × micro-batch 1 see the pairs of 1 process × micro-batch 2 in every step, and DeepSpeed
    averages the two gradients: per-step losses agree to 1e-6 and the final weights (gathered from the
    ZeRO-3 partitions into a plain `transformers` folder) to float32 rounding of the gradient sums."""
    common = list(tiny_prepared) + ["train.max_steps=3", f"train.deepspeed.zero_stage={zero_stage}",
                                    "train.learning_rate=1e-4"]
    two_nodes.run(["train", *common, "train.micro_batch_size=1", f"train.output_dir={tmp_path / 'two'}"], "train")
    assert "world=2" in two_nodes.log("train", 0) and f"zero={zero_stage}" in two_nodes.log("train", 0)
    one_process("train", [*common, "train.micro_batch_size=2", f"train.output_dir={tmp_path / 'one'}"])

    assert step_losses(tmp_path / "two") == pytest.approx(step_losses(tmp_path / "one"), abs=1e-6)
    two, one = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert two.keys() == one.keys()
    for name in one:
        # Adam moves each weight by about lr per step whatever the gradient's scale; the two runs'
        # gradients differ only by the order of float32 sums, which moves a weight far less than lr.
        assert (two[name] - one[name]).abs().max().item() <= 1e-6, name


@pytest.mark.slow
def test_two_nodes_prep_writes_the_one_process_cache(two_nodes, tiny_model_dir, tmp_path):
    """Node r computes shards r, r+2, ...; rank 0 writes the manifest. The cache equals one process's:
    the same shards, byte for byte (each shard is computed from the same rows in the same batches)."""
    from tiny import tiny_overrides, write_hh_slice

    data_file = write_hh_slice(tmp_path / "hh.jsonl")
    common = ["prep.shard_size=16"]  # 4 train shards: both nodes compute some
    two_nodes.run(["prep", *tiny_overrides(tiny_model_dir, data_file, tmp_path / "two"), *common], "prep")
    one_process("prep", tiny_overrides(tiny_model_dir, data_file, tmp_path / "one") + common)

    for split in ("train", "heldout"):
        two = json.loads((tmp_path / "two" / split / "manifest.json").read_text())
        one = json.loads((tmp_path / "one" / split / "manifest.json").read_text())
        assert two["layout"]["world_size"] == 2 and one["layout"]["world_size"] == 1
        for manifest in (two, one):  # when and how it was computed; everything else must match
            manifest.pop("created"), manifest["layout"].pop("world_size")
        assert two == one
        assert len(two["shards"]) >= (2 if split == "train" else 1)
        for shard in two["shards"]:
            assert (tmp_path / "two" / split / shard["file"]).read_bytes() == \
                (tmp_path / "one" / split / shard["file"]).read_bytes()
    written_by = {json.loads(p.read_text())["written_by"]["rank"] for p in (tmp_path / "two" / "train").glob("shard-*.json")}
    assert written_by == {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_lost_node_stops_the_other_and_the_rerun_resumes(two_nodes, tiny_prepared, tmp_path, zero_stage):
    """Node 1 is killed (its launcher and process, as a machine that dies) during training, after the
    step-2 checkpoint. Node 0 stops within the collective timeout with a message naming rank 1 and the
    last checkpoint; the same command, run again on both nodes, resumes there and ends with weights
    identical to an uninterrupted run's (the same computation: same ranks, same batches). One process
    cannot resume that checkpoint: another world size is a clear error."""
    timeout_s = 60
    common = ["train", *tiny_prepared, "train.max_steps=10", "train.save_every=2", "train.micro_batch_size=1",
              f"train.deepspeed.zero_stage={zero_stage}", "train.learning_rate=1e-4",
              f"train.distributed_timeout_s={timeout_s}"]
    two_nodes.run([*common, f"train.output_dir={tmp_path / 'whole'}"], "whole")

    out = tmp_path / "cut"
    node0, node1 = two_nodes.start([*common, f"train.output_dir={out}"], "cut")
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "latest").exists():
        assert node0.poll() is None and node1.poll() is None, two_nodes.log("cut", 0)[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 600 s"
        time.sleep(0.05)
    os.killpg(node1.pid, signal.SIGKILL)
    killed = time.monotonic()
    node1.wait()
    node0.wait(timeout=timeout_s + 120)
    stopped_after = time.monotonic() - killed
    log = two_nodes.log("cut", 0)
    assert node0.returncode != 0, log[-3000:]
    assert not (out / "final").exists(), "the run ended before node 1 was killed: nothing was lost"
    assert stopped_after < timeout_s + 30, f"node 0 took {stopped_after:.0f} s to stop"
    assert "a peer process stopped responding (rank 1 at 10.77.0.2)" in log, log[-3000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert f"Last checkpoint: {out / 'checkpoints' / tag}" in log

    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"DS_ACCELERATOR": "cpu"}
    alone = subprocess.run([sys.executable, "-m", "dpo_zoo.cli", *common, "train.micro_batch_size=2",
                            f"train.output_dir={out}"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    said = alone.stdout + alone.stderr
    assert alone.returncode != 0 and "was written by 2 processes and this run has 1" in said, said[-2000:]

    two_nodes.run([*common, f"train.output_dir={out}"], "again")
    assert f"resumed from" in two_nodes.log("again", 0)
    whole, resumed = final_weights(tmp_path / "whole"), final_weights(out)
    assert all(torch_equal(whole[name], resumed[name]) for name in whole)
    print(f"node 0 stopped {stopped_after:.1f} s after node 1 was killed (resumed from {tag})")


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)
