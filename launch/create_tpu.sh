#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice.
#
# usage: launch/create_tpu.sh --project P --zone Z --name N --accelerator-type T
#            --runtime-version V [--spot | --reserved | --reservation R] [--queued]
#            [--wait] [--dry-run]
#
#   --project P            GCP project (required; no default from gcloud config)
#   --zone Z               zone, e.g. us-east5-a (required)
#   --name N               TPU name; also the queued-resource id (required)
#   --accelerator-type T   e.g. v5p-8, v5p-64, v6e-8, v4-32 (required)
#   --runtime-version V    TPU software version, e.g. v2-alpha-tpuv5 (required)
#   --spot                 spot (preemptible) capacity
#   --reserved             your project's reserved capacity
#   --reservation R        a named reservation (gcloud alpha queued-resources only)
#   --queued               use a queued resource even for a single-host slice
#   --wait                 poll the queued resource until it is ACTIVE
#   --dry-run              print the gcloud commands (one per line, "+ " first), run nothing
#
# Rule: a slice is multi-VM when the number after the last dash of the accelerator
# type exceeds 8 (v5p-8, v4-8, v5litepod-8 and v6e-8 are single hosts; v5p-16 is not).
# Single-host slices use `gcloud compute tpus tpu-vm create`; multi-VM slices, --queued
# and --reservation use `gcloud compute tpus queued-resources create` followed by
# `queued-resources describe` (wait for state ACTIVE before setup_tpu.sh).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_opts "project zone name accelerator-type runtime-version reservation" \
  "spot reserved queued wait" "$@"
require project zone name accelerator-type runtime-version
no_extra_args
TYPE=${OPT[accelerator-type]}
SIZE=${TYPE##*-}
if [[ $TYPE != *-* || ! $SIZE =~ ^[0-9]+$ ]]; then
  die "cannot read the slice size from --accelerator-type=$TYPE (expected e.g. v5p-8, v5p-64)"
fi
N_CAPACITY=0
for o in spot reserved reservation; do if [[ -n ${OPT[$o]} ]]; then N_CAPACITY=$((N_CAPACITY + 1)); fi; done
if ((N_CAPACITY > 1)); then die "--spot, --reserved and --reservation are mutually exclusive"; fi
WHERE=(--project="${OPT[project]}" --zone="${OPT[zone]}")
CAPACITY=()
if [[ -n ${OPT[spot]} ]]; then CAPACITY=(--spot); fi
if [[ -n ${OPT[reserved]} ]]; then CAPACITY=(--reserved); fi

if ((10#$SIZE <= 8)) && [[ -z ${OPT[queued]}${OPT[reservation]} ]]; then
  if [[ -n ${OPT[wait]} ]]; then die "--wait applies to queued resources (tpu-vm create waits itself)"; fi
  run gcloud compute tpus tpu-vm create "${OPT[name]}" "${WHERE[@]}" \
    --accelerator-type="$TYPE" --version="${OPT[runtime-version]}" "${CAPACITY[@]}"
  exit 0
fi

QR=(gcloud compute tpus queued-resources)
if [[ -n ${OPT[reservation]} ]]; then
  QR=(gcloud alpha compute tpus queued-resources)   # --reservation is alpha-only
  CAPACITY=(--reservation="${OPT[reservation]}")
fi
run "${QR[@]}" create "${OPT[name]}" --node-id="${OPT[name]}" "${WHERE[@]}" \
  --accelerator-type="$TYPE" --runtime-version="${OPT[runtime-version]}" "${CAPACITY[@]}"
DESCRIBE=(gcloud compute tpus queued-resources describe "${OPT[name]}" "${WHERE[@]}")
if [[ -z ${OPT[wait]} ]]; then
  run "${DESCRIBE[@]}"
  if ((!DRY_RUN)); then
    echo "$PROG: the slice is usable once state is ACTIVE; check with the describe line above" >&2
  fi
  exit 0
fi
DESCRIBE+=(--format='value(state.state)')
if ((DRY_RUN)); then run "${DESCRIBE[@]}"; exit 0; fi
while :; do
  STATE=$(run "${DESCRIBE[@]}")
  echo "$PROG: ${OPT[name]}: $STATE" >&2
  case $STATE in
    ACTIVE) exit 0 ;;
    FAILED | SUSPENDED) exit 1 ;;
  esac
  sleep 30
done
