#!/usr/bin/env bash
# Install adm_jax at an exact git ref on every worker of a TPU VM / slice (idempotent).
#
# usage: launch/setup_tpu.sh --project P --zone Z --name N --repo URL --ref REF
#            [--repo-dir DIR] [--python PY] [--dry-run]
#
#   --project P       GCP project (required)
#   --zone Z          zone of the TPU (required)
#   --name N          TPU name (required)
#   --repo URL        git URL the workers clone (required)
#   --ref REF         commit, tag or branch to check out (required; a commit or tag is
#                     reproducible, a branch means origin/BRANCH as of this run)
#   --repo-dir DIR    checkout on each VM (default ~/adm_jax; relative = under $HOME);
#                     --workdir-on-vm DIR is the same option
#   --python PY       interpreter on the VMs (default python3). adm_jax needs Python
#                     3.11: if `python3 --version` on the VM says otherwise, pass e.g.
#                     --python python3.11 or a venv's '~/venv/bin/python'
#   --dry-run         print the gcloud command ("+ " first, pasteable), run nothing
#
# One `gcloud compute tpus tpu-vm ssh N --worker=all --command=...`; on each worker it
# clones DIR if missing (else sets origin to URL and fetches), checks out REF detached
# (discarding local edits there), runs `PY -m pip install -e ".[tpu]"` (the repo's pins,
# jax[tpu] included) and prints jax's version from `import adm_jax, jax`. Rerunning
# it is safe and is how a slice moves to a new REF.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_opts "project zone name repo ref repo-dir workdir-on-vm python" "" "$@"
require project zone name repo ref
no_extra_args
if [[ -n ${OPT[repo-dir]} && -n ${OPT[workdir-on-vm]} && ${OPT[repo-dir]} != "${OPT[workdir-on-vm]}" ]]; then
  die "--repo-dir and --workdir-on-vm name the same directory; give one"
fi
DIR=${OPT[repo-dir]:-${OPT[workdir-on-vm]:-\~/adm_jax}}
PY=${OPT[python]:-python3}

# shellcheck disable=SC2016  # $D, $U, $R, $P expand on the workers
STEPS=(
  "set -eu" "D=$(remote_path "$DIR")" "U=$(quote "${OPT[repo]}")" "R=$(quote "${OPT[ref]}")"
  "P=$(remote_path "$PY")"
  'if [ -d "$D/.git" ]; then git -C "$D" remote set-url origin "$U"; git -C "$D" fetch --force --tags origin; else git clone "$U" "$D"; fi'
  'git -C "$D" checkout --force --detach "$(git -C "$D" rev-parse --verify --quiet "origin/$R^{commit}" || git -C "$D" rev-parse --verify "$R^{commit}")"'
  'cd "$D"' '"$P" -m pip install -e ".[tpu]"'
  'cd /' '"$P" -c "import adm_jax, jax; print(jax.__version__)"'
)
printf -v REMOTE '%s; ' "${STEPS[@]}"

run gcloud compute tpus tpu-vm ssh "${OPT[name]}" --project="${OPT[project]}" --zone="${OPT[zone]}" \
  --worker=all --command="${REMOTE%; }"
