# shellcheck shell=bash
# Shared by loadtest/bench/run.sh and loadtest/bench/cluster.sh: the processes a benchmark starts
# (recorded, stopped in order on exit), the ERR trap that names a failed command, and waits.
# Source it after setting WORK (the round's log folder) and BENCH_NAME (the script's name in
# messages); set KEEP to keep the logs of a run that passed.
#
# Only recorded pids are signalled, never a process group or a name, so a benchmark started from
# CI or another script cannot hit its caller.

PIDS=()
bench_cleanup() {
  local rc=$? pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ -n ${WORK:-} ]]; then
    if [[ $rc -eq 0 && -z ${KEEP:-} ]]; then rm -rf "$WORK"; else echo "$BENCH_NAME: logs kept in $WORK" >&2; fi
  fi
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM
# A command that fails under `set -e` says which one it was (a smoke in CI once stopped with no
# word between two phases); -E carries the trap into functions.
set -E
trap 'rc_err=$?; echo "$BENCH_NAME: line $LINENO: \"$BASH_COMMAND\" failed with exit $rc_err" >&2' ERR

spawn() { # NAME CMD... ; sets SPAWNED
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  SPAWNED=$!
  PIDS+=("$SPAWNED")
}

stop() { # PID: SIGTERM and wait for it
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

wait_http() { # URL
  for _ in $(seq 200); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$BENCH_NAME: $1 did not come up" >&2; return 1
}
