#!/usr/bin/env bash
# Several machines listed in a hostfile (one line per node: "<hostname> slots=<processes>"), each with
# this repo and its .venv at the same path, and a filesystem they all see:
#   HOSTFILE=launch/hostfile bash launch/multi_node.sh configs/experiments/hh_smollm2.yaml loss=dpo train.deepspeed.config_file=launch/ds_zero3.json
#   HOSTFILE=launch/hostfile bash launch/multi_node.sh prep configs/experiments/hh_smollm2.yaml
# The first argument may name the command (train, the default, or prep).
#
# Two ways to start the nodes:
# - ssh (default): run this once, on the first node; DeepSpeed reaches the others by passwordless ssh.
# - no ssh: run this on every node, with NODE_RANK=<the node's line in the hostfile, from 0> and
#   MASTER_ADDR=<an address of node 0 the others reach> (and the same MASTER_PORT everywhere). Each node
#   then starts only its own processes (DeepSpeed's --no_ssh --node_rank).
# On CPU (DS_ACCELERATOR=cpu) the processes talk over gloo; where a machine has several interfaces, set
# GLOO_SOCKET_IFNAME to the one that reaches the other nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE="${HOSTFILE:-launch/hostfile}"
[ -f "$HOSTFILE" ] || { echo "no hostfile at $HOSTFILE (see launch/hostfile.example)" >&2; exit 2; }
COMMAND=train
case "${1:-}" in train|prep) COMMAND="$1"; shift ;; esac
args=(--hostfile "$HOSTFILE")
[ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
[ -n "${MASTER_PORT:-}" ] && args+=(--master_port "$MASTER_PORT")
if [ -n "${NODE_RANK:-}" ]; then
  [ -n "${MASTER_ADDR:-}" ] || { echo "NODE_RANK is set (no ssh): set MASTER_ADDR to node 0's address too" >&2; exit 2; }
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
exec deepspeed "${args[@]}" --module dpo_zoo.cli "$COMMAND" "$@"
