#!/usr/bin/env bash
# Run `python3 -m adm_jax.main` with the same config on every worker of a TPU slice.
#
# usage: launch/run_tpu.sh --project P --zone Z --name N --config CFG --workdir WD
#            [--mode MODE] [--repo-dir DIR] [--python PY] [--dry-run] [-- MAIN_ARGS...]
#
#   --project P      GCP project (required)
#   --zone Z         zone of the TPU (required)
#   --name N         TPU name (required)
#   --config CFG     config, relative to the checkout: configs/<name>.py[:variant] (required)
#   --workdir WD     run directory shared by all workers, normally gs://BUCKET/RUN (required)
#   --mode MODE      adm_jax.main mode (default train). --mode compile compiles every
#                    step for the slice's own chips and prints per-device HBM use
#   --repo-dir DIR   checkout made by setup_tpu.sh (default ~/adm_jax)
#   --python PY      interpreter on the VMs (default python3; as given to setup_tpu.sh)
#   --dry-run        print the gcloud command ("+ " first, pasteable), run nothing
#   -- MAIN_ARGS     passed on to adm_jax.main, e.g. -- --config.train.steps=1000
#
# One `gcloud compute tpus tpu-vm ssh N --worker=all --command="cd DIR && PY -m
# adm_jax.main --config=CFG --workdir=WD --mode=MODE MAIN_ARGS..."`. adm_jax.main calls
# jax.distributed.initialize() itself on TPU VMs, so nothing is passed for it. SIGTERM
# (preemption, maintenance) makes every process save at an agreed step and exit 0;
# rerunning the same command resumes from WD/checkpoints.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_opts "project zone name config workdir mode repo-dir python" "" "$@"
require project zone name config workdir
DIR=${OPT[repo-dir]:-\~/adm_jax}
PY=${OPT[python]:-python3}
MAIN=(-m adm_jax.main --config="${OPT[config]}" --workdir="${OPT[workdir]}"
  --mode="${OPT[mode]:-train}" "${EXTRA_ARGS[@]}")
REMOTE="cd $(remote_path "$DIR") && $(remote_path "$PY") $(quote "${MAIN[@]}")"

run gcloud compute tpus tpu-vm ssh "${OPT[name]}" --project="${OPT[project]}" --zone="${OPT[zone]}" \
  --worker=all --command="$REMOTE"
