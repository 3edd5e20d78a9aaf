#!/usr/bin/env bash
# Several machines listed in a hostfile (one line per node: "<hostname> slots=<gpus>"), reached by
# passwordless ssh, each with this repo and its .venv at the same path:
#   HOSTFILE=launch/hostfile bash launch/multi_node.sh configs/experiments/hh_smollm2.yaml loss=dpo train.deepspeed.config_file=launch/ds_zero3.json
# Run `dpo-zoo prep` once first on a filesystem every node sees (the prepared set is read-only then).
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE="${HOSTFILE:-launch/hostfile}"
[ -f "$HOSTFILE" ] || { echo "no hostfile at $HOSTFILE (see launch/hostfile.example)" >&2; exit 2; }
exec deepspeed --hostfile "$HOSTFILE" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} --module dpo_zoo.cli train "$@"
