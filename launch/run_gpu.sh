#!/usr/bin/env bash
# Multi-node GPU launcher: run once per node; one process per node drives all its GPUs.
#
# usage: launch/run_gpu.sh --coordinator HOST:PORT --num-nodes N --node-rank R
#            --gpus-per-node G --config CFG --workdir WD [--mode MODE] [--dry-run]
#            [-- MAIN_ARGS...]
#        launch/run_gpu.sh --slurm --coordinator-port PORT --gpus-per-node G
#            --config CFG --workdir WD [--mode MODE] [--dry-run] [-- MAIN_ARGS...]
#
#   --coordinator HOST:PORT  address of node 0, reachable from every node (required)
#   --num-nodes N            number of nodes (= processes) in the job (required)
#   --node-rank R            this node's index, 0..N-1 (required; 0 hosts the coordinator)
#   --gpus-per-node G        GPUs each process must see (required; checked against
#                            CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`, before starting)
#   --config CFG             configs/<name>.py[:variant] (required; same on every node)
#   --workdir WD             run directory shared by all nodes (required)
#   --mode MODE              adm_jax.main mode (default train; try --mode compile first)
#   --slurm                  take N, R and HOST from SLURM_NNODES, SLURM_NODEID and the
#                            first host of `scontrol show hostnames $SLURM_JOB_NODELIST`;
#                            then --coordinator-port PORT is required and --coordinator,
#                            --num-nodes, --node-rank are not accepted. Start one task
#                            per node: srun --ntasks-per-node=1 launch/run_gpu.sh --slurm ...
#   --dry-run                print the command ("+ " first, pasteable), run nothing
#                            (with --slurm, scontrol is still queried)
#   -- MAIN_ARGS             passed on to adm_jax.main
#
# Execs: python3 -m adm_jax.main --config=CFG --workdir=WD --mode=MODE
#   --coordinator_address=HOST:PORT --num_processes=N --process_id=R MAIN_ARGS...
# CUDA_VISIBLE_DEVICES is left as it is (unset: all GPUs of the node).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_opts "coordinator coordinator-port num-nodes node-rank gpus-per-node config workdir mode" \
  "slurm" "$@"
if [[ -n ${OPT[slurm]} ]]; then
  for o in coordinator num-nodes node-rank; do
    if [[ -n ${OPT[$o]} ]]; then die "--$o comes from SLURM with --slurm; drop it"; fi
  done
  require coordinator-port gpus-per-node config workdir
  need_int coordinator-port "${OPT[coordinator-port]}"
  for v in SLURM_NNODES SLURM_NODEID SLURM_JOB_NODELIST; do
    if [[ -z ${!v:-} ]]; then die "--slurm: $v is not set (run under srun/sbatch)"; fi
  done
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  if ((${#HOSTS[@]} == 0)) || [[ -z ${HOSTS[0]} ]]; then
    die "--slurm: scontrol show hostnames '$SLURM_JOB_NODELIST' gave no host"
  fi
  OPT[coordinator]=${HOSTS[0]}:${OPT[coordinator-port]}
  OPT[num-nodes]=$SLURM_NNODES
  OPT[node-rank]=$SLURM_NODEID
else
  if [[ -n ${OPT[coordinator-port]} ]]; then die "--coordinator-port is for --slurm; give --coordinator HOST:PORT"; fi
  require coordinator num-nodes node-rank gpus-per-node config workdir
fi
if [[ ! ${OPT[coordinator]} =~ ^[^:]+:[0-9]+$ ]]; then
  die "--coordinator must be HOST:PORT, got '${OPT[coordinator]}'"
fi
for o in num-nodes node-rank gpus-per-node; do need_int "$o" "${OPT[$o]}"; done
if ((10#${OPT[num-nodes]} < 1 || 10#${OPT[gpus-per-node]} < 1)); then
  die "--num-nodes and --gpus-per-node must be at least 1"
fi
if ((10#${OPT[node-rank]} >= 10#${OPT[num-nodes]})); then
  die "--node-rank ${OPT[node-rank]} is not below --num-nodes ${OPT[num-nodes]}"
fi

if ((!DRY_RUN)); then  # the process must see exactly G GPUs
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -ra VISIBLE <<<"$CUDA_VISIBLE_DEVICES"
    SEEN=${#VISIBLE[@]} FROM="CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi >/dev/null; then
    SEEN=$(nvidia-smi -L | grep -c '^GPU ' || true) FROM="nvidia-smi -L"
  else
    die "cannot count this node's GPUs: no CUDA_VISIBLE_DEVICES and no nvidia-smi"
  fi
  if ((SEEN != 10#${OPT[gpus-per-node]})); then
    die "--gpus-per-node ${OPT[gpus-per-node]}, but $FROM shows $SEEN"
  fi
fi

run_exec python3 -m adm_jax.main --config="${OPT[config]}" --workdir="${OPT[workdir]}" \
  --mode="${OPT[mode]:-train}" --coordinator_address="${OPT[coordinator]}" \
  --num_processes="${OPT[num-nodes]}" --process_id="${OPT[node-rank]}" "${EXTRA_ARGS[@]}"
