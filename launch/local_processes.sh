#!/usr/bin/env bash
# Runs one bitbert_jax pipeline as N processes on this machine, joined the way a pod's hosts are:
# every process runs the same `python -m bitbert_jax.main` with its own --process_id and the
# coordinator on a free loopback port. Multi-host code paths on one CPU box (the tests use it).
#
#   launch/local_processes.sh --processes 2 --cpu-devices 2 -- \
#       --config=configs/xtc.py:task=mrpc,preset=smoke --workdir=runs/mh
#   DRY_RUN=1 launch/local_processes.sh ...   # print the commands instead of running them
#
# Exit status: 0 when every process succeeded, else the first failing one's (75: preempted, re-run
# the same command to resume). SIGTERM or SIGINT here goes on to every process.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_processes.sh [options] -- bitbert_jax.main flags

  --processes N       NUM_PROCESSES  processes to start (default: 2)
  --cpu-devices K     CPU_DEVICES    run on the CPU with K devices per process (JAX_PLATFORMS=cpu,
                                     --xla_force_host_platform_device_count=K); 0 (default):
                                     leave the platform to JAX
  --port PORT         PORT           coordinator port on 127.0.0.1 (default: a free one)
  --log-dir DIR       LOG_DIR        each process's output to DIR/process_I.log (default: this
                                     terminal)
  --python PY         PYTHON         interpreter (default: python3)
  --grace SECONDS     GRACE          after one process fails, how long the others get to stop on
                                     their own before they are killed (default: 30)
  --initialization-timeout S  INIT_TIMEOUT  seconds for all processes to join (default: 120)

  DRY_RUN=1   print every command instead of running it
EOF
}

die() { echo "local_processes.sh: $*" >&2; exit 2; }

NUM_PROCESSES=${NUM_PROCESSES:-2}
CPU_DEVICES=${CPU_DEVICES:-0}
PORT=${PORT:-}
LOG_DIR=${LOG_DIR:-}
PYTHON=${PYTHON:-python3}
GRACE=${GRACE:-30}
INIT_TIMEOUT=${INIT_TIMEOUT:-120}
DRY_RUN=${DRY_RUN:-0}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --processes) need_value "$@"; NUM_PROCESSES=$2; shift 2 ;;
    --cpu-devices) need_value "$@"; CPU_DEVICES=$2; shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --grace) need_value "$@"; GRACE=$2; shift 2 ;;
    --initialization-timeout) need_value "$@"; INIT_TIMEOUT=$2; shift 2 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
MAIN_FLAGS=("$@")
is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
is_int "$NUM_PROCESSES" && ((NUM_PROCESSES >= 1)) || die "--processes: >= 1, got $NUM_PROCESSES"
is_int "$CPU_DEVICES" || die "--cpu-devices: a count >= 0, got $CPU_DEVICES"
is_int "$GRACE" || die "--grace: seconds, got $GRACE"
is_int "$INIT_TIMEOUT" && ((INIT_TIMEOUT >= 1)) \
  || die "--initialization-timeout: seconds >= 1, got $INIT_TIMEOUT"
[[ -z $PORT ]] || { is_int "$PORT" && ((PORT > 0 && PORT < 65536)); } \
  || die "--port: 1..65535, got $PORT"
((${#MAIN_FLAGS[@]})) || die "no bitbert_jax.main flags after -- (at least --config and --workdir)"
for f in "${MAIN_FLAGS[@]}"; do
  case $f in
    --coordinator_address*|--num_processes*|--process_id*) die "$f: this script sets it" ;;
  esac
done

q() {  # shell-quote words readably: plain words as they are, others in single quotes
  local out='' a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "${out# }"
}
log() { echo "== $*" >&2; }

if [[ -z $PORT ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    PORT=PORT
  else  # a port the kernel just handed out; free again when the coordinator binds it
    PORT=$("$(command -v python3 || echo "$PYTHON")" -c \
      'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
fi
ENV=()
if ((CPU_DEVICES > 0)); then
  ENV=(JAX_PLATFORMS=cpu
       "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$CPU_DEVICES")
fi
command_of() {  # the command of process $1
  CMD=(env "${ENV[@]+"${ENV[@]}"}" "$PYTHON" -m bitbert_jax.main "${MAIN_FLAGS[@]}"
       --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES"
       --process_id="$1" --initialization_timeout="$INIT_TIMEOUT")
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    command_of "$i"
    echo "+ $(q "${CMD[@]}")${LOG_DIR:+ > $(q "$LOG_DIR/process_$i.log") 2>&1} &"
  done
  exit 0
fi

[[ -z $LOG_DIR ]] || mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {  # send $1 to every process still running
  local p
  for p in "${PIDS[@]}"; do kill -s "$1" "$p" 2>/dev/null || true; done
}
trap 'log "SIGTERM: passed on to every process"; stop_all TERM' TERM
trap 'log "SIGINT: passed on to every process"; stop_all TERM' INT
for ((i = 0; i < NUM_PROCESSES; i++)); do
  command_of "$i"
  if [[ -n $LOG_DIR ]]; then
    "${CMD[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  else
    "${CMD[@]}" &
  fi
  PIDS+=($!)
  log "process $i: pid $! ${LOG_DIR:+log $LOG_DIR/process_$i.log }$(q "${CMD[@]}")"
done

# Wait for all; once one fails, the rest get GRACE seconds (a dead peer blocks their collectives
# until JAX's heartbeat timeout) before they are killed.
STATUS=()
RC=0
failed_at=''
left=$NUM_PROCESSES
while ((left > 0)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -z ${STATUS[i]:-} ]] || continue
    kill -0 "${PIDS[i]}" 2>/dev/null && continue
    s=0
    wait "${PIDS[i]}" || s=$?
    STATUS[i]=$s
    left=$((left - 1))
    log "process $i exited with status $s"
    if ((s != 0 && RC == 0)); then
      RC=$s
      failed_at=$SECONDS
    fi
  done
  if [[ -n $failed_at ]] && ((left > 0 && SECONDS - failed_at >= GRACE)); then
    log "process(es) still running $GRACE s after a failure: killing them"
    stop_all KILL
    failed_at=''
  fi
  ((left == 0)) || sleep 1
done
exit "$RC"
