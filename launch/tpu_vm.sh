#!/usr/bin/env bash
# TPU VM lifecycle for tlflax runs (Cloud TPU, gcloud CLI).
#
#   launch/tpu_vm.sh create  NAME [ACCELERATOR=v4-8] [VERSION=tpu-ubuntu2204-base]
#   launch/tpu_vm.sh status  NAME
#   launch/tpu_vm.sh setup   NAME            # install tlflax + jax[tpu] on every worker
#   launch/tpu_vm.sh run     NAME CONFIG WORKDIR [--config.key=value ...]   # detached
#   launch/tpu_vm.sh sweep   NAME CONFIG WORKDIR_PREFIX KEY V1 [V2 ...]      # detached, in turn
#   launch/tpu_vm.sh logs    NAME RUN [WORKER=0]   # follow ~/tlflax-logs/RUN.log on a worker
#   launch/tpu_vm.sh stop    NAME RUN              # stop RUN on every worker
#   launch/tpu_vm.sh delete  NAME
#
# Environment: ZONE (default us-central2-b), PROJECT (default: gcloud's), DRY_RUN=1 prints
# the commands instead of running them.
#   Capacity: SPOT=1 (spot VM), QUEUED=1 (a queued resource named NAME: create waits in the
#   queue, status shows its state, delete removes it with its VM), with QUEUED=1 also
#   GUARANTEED=1, RESERVED=1, BEST_EFFORT=1 (gcloud alpha), VALID_UNTIL=6h (give up after).
#   Code: setup ships `git archive TLFLAX_REF` (default HEAD: committed files only, never
#   .venv or runs/) of this checkout; TLFLAX_GIT=URL clones URL at TLFLAX_REF on the workers
#   instead. Either way the workers get ~/tlflax (configs included) and `pip install` it.
#   Runs: RUN (default: WORKDIR's last component) names the log ~/tlflax-logs/RUN.log and
#   the pid file on every worker. Every host runs the same command with
#   train.distributed=True; WORKDIR must be gs:// (or a filesystem every host sees), where
#   the hosts write one checkpoint together, and where a stopped or preempted run resumes
#   when the same `run` is given again.
set -euo pipefail

ZONE=${ZONE:-us-central2-b}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO=$(cd "$(dirname "$0")/.." && pwd)
LOGS='~/tlflax-logs'

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q' "$1"; shift; printf ' %q' "$@"; echo; else "$@"; fi
}
tpu() { run gcloud compute tpus "$@" --zone="$ZONE" $PROJECT_FLAG; }
ssh_on() { tpu tpu-vm ssh "$1" --worker="$2" --command="$3"; }
ssh_all() { ssh_on "$1" all "$2"; }
q() { printf '%q' "$1"; }
quote() { [ $# -eq 0 ] || printf ' %q' "$@"; }  # each arg, with a leading space
need() { [ "$1" -ge "$2" ] || { echo "launch/tpu_vm.sh $cmd: $3" >&2; exit 2; }; }

capacity_flags() {  # flags shared by tpu-vm create and queued-resources create
  [ "${SPOT:-0}" = 1 ] && printf '%s\n' --spot
  [ "${QUEUED:-0}" = 1 ] || return 0
  [ "${GUARANTEED:-0}" = 1 ] && printf '%s\n' --guaranteed
  [ "${RESERVED:-0}" = 1 ] && printf '%s\n' --reserved
  [ "${BEST_EFFORT:-0}" = 1 ] && printf '%s\n' --best-effort
  [ -n "${VALID_UNTIL:-}" ] && printf '%s\n' --valid-until-duration="$VALID_UNTIL"
  return 0
}

create() {
  local name=$1 accel=${2:-v4-8} version=${3:-tpu-ubuntu2204-base} flags
  if [ "${QUEUED:-0}" != 1 ] && [ -n "${GUARANTEED:-}${RESERVED:-}${BEST_EFFORT:-}${VALID_UNTIL:-}" ]; then
    echo "launch/tpu_vm.sh create: GUARANTEED / RESERVED / BEST_EFFORT / VALID_UNTIL apply to" \
      "queued resources only; add QUEUED=1 (or drop them)" >&2
    exit 2
  fi
  mapfile -t flags < <(capacity_flags)
  if [ "${QUEUED:-0}" != 1 ]; then
    tpu tpu-vm create "$name" --accelerator-type="$accel" --version="$version" "${flags[@]}"
  elif [ "${BEST_EFFORT:-0}" = 1 ]; then  # --best-effort exists in gcloud alpha only
    run gcloud alpha compute tpus queued-resources create "$name" --node-id="$name" \
      --accelerator-type="$accel" --runtime-version="$version" "${flags[@]}" \
      --zone="$ZONE" $PROJECT_FLAG
  else
    tpu queued-resources create "$name" --node-id="$name" --accelerator-type="$accel" \
      --runtime-version="$version" "${flags[@]}"
  fi
}

setup() {
  local name=$1 ref=${TLFLAX_REF:-HEAD} install
  install="python3 -m pip install -q -U pip && python3 -m pip install -q ~/tlflax 'jax[tpu]'"
  if [ -n "${TLFLAX_GIT:-}" ]; then
    ssh_all "$name" "rm -rf ~/tlflax && git clone -q $(q "$TLFLAX_GIT") ~/tlflax \
&& git -C ~/tlflax checkout -q $(q "$ref") && $install"
    return
  fi
  run mkdir -p "$REPO/dist"
  run git -C "$REPO" archive --format=tar.gz --output="$REPO/dist/tlflax-src.tar.gz" "$ref"
  tpu tpu-vm scp "$REPO/dist/tlflax-src.tar.gz" "$name":~/tlflax-src.tar.gz --worker=all
  ssh_all "$name" "rm -rf ~/tlflax && mkdir -p ~/tlflax \
&& tar -xzf ~/tlflax-src.tar.gz -C ~/tlflax && $install"
}

detach() {  # NAME RUN COMMAND: COMMAND in ~/tlflax on every worker, in the background
  local name=$1 run_name=$2
  # `a && b & c` would put a and b in the background too: end the list first.
  ssh_all "$name" "mkdir -p $LOGS && cd ~/tlflax || exit 1; PATH=\$HOME/.local/bin:\$PATH \
setsid nohup bash -c $(q "$3") > $LOGS/$run_name.log 2>&1 < /dev/null & \
echo \$! > $LOGS/$run_name.pid"
  echo "logs: launch/tpu_vm.sh logs $name $run_name; stop: launch/tpu_vm.sh stop $name $run_name" >&2
}

train_cmd() {  # CONFIG WORKDIR [ARGS...] -> the documented command, quoted for a shell
  local config=$1 workdir=$2; shift 2
  echo "tlflax train --config $(q "$config") --workdir $(q "$workdir")\
 --config.train.distributed=True$(quote "$@")"
}

cmd=${1:-}; shift || true
case "$cmd" in
  create) need $# 1 "give NAME"; create "$@" ;;
  status)
    need $# 1 "give NAME"
    if [ "${QUEUED:-0}" = 1 ]; then tpu queued-resources describe "$1"; else tpu tpu-vm describe "$1"; fi ;;
  setup) need $# 1 "give NAME"; setup "$1" ;;
  run)
    need $# 3 "give NAME CONFIG WORKDIR [--config.key=value ...]"
    name=$1 config=$2 workdir=$3; shift 3
    detach "$name" "${RUN:-$(basename "$workdir")}" "$(train_cmd "$config" "$workdir" "$@")" ;;
  sweep)
    need $# 5 "give NAME CONFIG WORKDIR_PREFIX KEY V1 [V2 ...]"
    name=$1 config=$2 prefix=$3 key=$4; shift 4
    runs=()
    for value in "$@"; do
      runs+=("$(train_cmd "$config" "${prefix}_${key//./_}_${value}" "--config.$key=$value")")
    done
    detach "$name" "${RUN:-$(basename "$prefix")_${key//./_}}" "$(IFS=';'; echo "${runs[*]}")" ;;
  logs)
    need $# 2 "give NAME RUN [WORKER]"
    ssh_on "$1" "${3:-0}" "tail -n 200 -F $LOGS/$2.log" ;;
  stop)
    need $# 2 "give NAME RUN"
    ssh_all "$1" "kill -TERM -- -\$(cat $LOGS/$2.pid) && rm -f $LOGS/$2.pid" ;;
  delete)
    need $# 1 "give NAME"
    if [ "${QUEUED:-0}" = 1 ]; then
      tpu queued-resources delete "$1" --force --quiet
    else
      tpu tpu-vm delete "$1" --quiet
    fi ;;
  *)
    sed -n '2,28p' "$0"; exit 2 ;;
esac
