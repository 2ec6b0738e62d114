#!/usr/bin/env bash
# TPU VM lifecycle for tlflax runs (Cloud TPU, gcloud CLI).
#
#   launch/tpu_vm.sh create  NAME [ACCELERATOR=v4-8] [VERSION=tpu-ubuntu2204-base]
#   launch/tpu_vm.sh setup   NAME            # copy the repo, install tlflax[tpu] on every host
#   launch/tpu_vm.sh run     NAME CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_vm.sh sweep   NAME CONFIG WORKDIR_PREFIX KEY V1 [V2 ...]   # one run per value
#   launch/tpu_vm.sh delete  NAME
#
# Environment: ZONE (default us-central2-b), PROJECT (default: gcloud's), DRY_RUN=1 prints
# the commands instead of running them. Multi-host slices run the same command on every
# host (--worker=all) with train.distributed=True; WORKDIR must be on a filesystem every
# host sees (NFS / Filestore / a gcsfuse mount) so that they write one checkpoint together.
set -euo pipefail

ZONE=${ZONE:-us-central2-b}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$1" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$2"; }

cmd=${1:-}; shift || true
case "$cmd" in
  create)
    name=$1 accel=${2:-v4-8} version=${3:-tpu-ubuntu2204-base}
    run gcloud compute tpus tpu-vm create "$name" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$accel" --version="$version" ;;
  setup)
    name=$1
    repo=$(cd "$(dirname "$0")/.." && pwd)
    run gcloud compute tpus tpu-vm scp --recurse "$repo" "$name":~/tlflax --zone="$ZONE" \
      $PROJECT_FLAG --worker=all
    ssh_all "$name" "cd ~/tlflax && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
      && .venv/bin/pip install -q -e . 'jax[tpu]'" ;;
  run)
    name=$1 config=$2 workdir=$3; shift 3
    ssh_all "$name" "cd ~/tlflax && .venv/bin/tlflax train --config $config --workdir $workdir \
      --config.train.distributed=True $*" ;;
  sweep)
    name=$1 config=$2 prefix=$3 key=$4; shift 4
    for value in "$@"; do
      ssh_all "$name" "cd ~/tlflax && .venv/bin/tlflax train --config $config \
        --workdir ${prefix}_${key//./_}_${value} --config.train.distributed=True --config.$key=$value"
    done ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$1" --zone="$ZONE" $PROJECT_FLAG --quiet ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
