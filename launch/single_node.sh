#!/usr/bin/env bash
# One machine, several GPUs:
#   bash launch/single_node.sh configs/experiments/vader_smollm2.yaml loss=sampo train.deepspeed.config_file=launch/ds_zero2.json
#   bash launch/single_node.sh prep configs/experiments/vader_smollm2.yaml
# The first argument may name the command (train, the default, or prep). NUM_GPUS (default: all
# visible) sets the process count; MASTER_PORT the rendezvous port (default DeepSpeed's, 29500). Each
# process trains on its slice of every step's pairs; DeepSpeed averages the gradients, so results match
# a one-process run with a micro-batch NUM_GPUS times larger.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND=train
case "${1:-}" in train|prep) COMMAND="$1"; shift ;; esac
NUM_GPUS="${NUM_GPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
exec deepspeed --num_gpus "$NUM_GPUS" ${MASTER_PORT:+--master_port "$MASTER_PORT"} --module dpo_zoo.cli "$COMMAND" "$@"
