"""Peak memory per prep process with the reference model whole and partitioned (``prep.zero3``).

Start it with two processes, once with ``prep.zero3=true`` and once without, on the same model:

    deepspeed --num_gpus 2 bench/sharded_reference_memory.py model.name_or_path=M data.train_path=D ... prep.zero3=true

Each rank prints the parameter bytes it holds (ZeRO-3: its partition; else the whole model), the
model's full parameter bytes, and its peak resident memory (``ru_maxrss``), which also counts the
Python, torch and DeepSpeed runtime every process carries whatever the model: run it on a tiny model
too and subtract, to get what the model itself costs. Commands and figures:
bench/results/sharded_reference_memory.md.
"""

import os
import resource
import sys


from dpo_zoo.config import load_config
from dpo_zoo.cache.prep import run_prep


def main(overrides):
    overrides = [o for o in overrides if not o.startswith("--local_rank")]
    run_prep(load_config([], overrides))
    rank = os.environ.get("RANK", "0")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[memory] rank {rank}: peak resident {peak_mib:,.0f} MiB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
