#!/usr/bin/env bash
# agentq benchmark suite (issue 7): the local stack (release binaries, a private redis-server)
# under four loads. Prints a table and writes a JSON file of medians plus every run.
#
#   loadtest/bench/run.sh            full: 3 runs per phase, ~3 minutes; writes loadtest/bench/results.json
#   loadtest/bench/run.sh --smoke    1 short run per phase, ~20 s after the build (CI);
#                                    writes loadtest/out/bench/results-smoke.json (gitignored)
#
# Options: --no-build (use the binaries in $AGENTQ_BENCH_BIN_DIR, default target/release),
#          --runs N, --out FILE, --keep (leave the logs of this run in loadtest/out/bench/),
#          --strict (exit 2 when a median misses its target; by default only a broken run fails).
# Exit: 0 ok; 1 broken (an HTTP error, a lost or failed task, a process that did not start);
#       2 with --strict, a target missed. Targets are not enforced by default: this machine is shared.
# Phases:  1 enqueue over HTTP (wrk, 64 connections) and redis-benchmark's raw EVAL limit;
#          2 worker drain of pre-queued tasks (mock LLM 0 ms, concurrency 64);
#          3 wide fan-out (mock LLM 2 s, concurrency 1000);
#          4 queue latency at a paced, moderate rate.
# Traffic goes to 127.0.0.1 only; every process started here is stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MODE=full
BUILD=1
RUNS=""
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --no-build) BUILD=0 ;;
    --runs) RUNS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    --strict) export BENCH_STRICT=1 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
  shift
done

if [[ $MODE == smoke ]]; then
  RUNS=${RUNS:-1}
  WRK_SECS=2; RB_N=20000; DRAIN_N=2000; FAN_N=2000; LAT_RATE=100; LAT_SECS=2
  OUT=${OUT:-$ROOT/loadtest/out/bench/results-smoke.json}
else
  RUNS=${RUNS:-3}
  WRK_SECS=10; RB_N=200000; DRAIN_N=20000; FAN_N=10000; LAT_RATE=200; LAT_SECS=10
  OUT=${OUT:-$HERE/results.json}
fi
WRK_CONNS=64; WRK_THREADS=2; RB_CLIENTS=50
DRAIN_CONC=64; FAN_CONC=1000; FAN_LATENCY_MS=2000
BIN=${AGENTQ_BENCH_BIN_DIR:-$ROOT/target/release}
# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"
LT_NAME=bench
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON # must have the redis package ($LT_REDIS_PY)
else
  lt_ensure_pip "$LT_REDIS_PY" # .venv at the repo root, shared with deploy/ and the other load tests
fi
B="$PY $HERE/bench.py"
T_START=$(date +%s)
# 1000 concurrent LLM calls need ~2000 sockets between the worker and the mock
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# ---- tools ----
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-benchmark >/dev/null || need_apt+=(redis-tools)
command -v curl >/dev/null || need_apt+=(curl)
if [[ ${#need_apt[@]} -gt 0 ]]; then
  log "installing ${need_apt[*]}"
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "run.sh: missing ${need_apt[*]} (apt-get install -y ${need_apt[*]})" >&2; exit 69
  fi
fi
command -v "$PY" >/dev/null || { echo "run.sh: $PY not found" >&2; exit 69; }

if [[ $BUILD -eq 1 ]]; then
  log "cargo build --release --bins (a first release build takes several minutes; cargo's progress follows)"
  (cd "$ROOT" && cargo build --release --bins)
fi
for b in agentq-api agentq-worker agentq-mock-llm; do
  [[ -x $BIN/$b ]] || { echo "run.sh: $BIN/$b missing (build first or drop --no-build)" >&2; exit 66; }
done

WORK=$ROOT/loadtest/out/bench/run-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$WORK"
RUNS_FILE=$WORK/runs.jsonl
: > "$RUNS_FILE"
TCK=$(getconf CLK_TCK)

# ---- processes: every pid started here, stopped on exit ----
PIDS=()
cleanup() {
  local rc=$? pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ -n ${WORK:-} ]]; then
    if [[ $rc -eq 0 && -z ${KEEP:-} ]]; then rm -rf "$WORK"; else echo "run.sh: logs kept in $WORK" >&2; fi
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
  echo "run.sh: $1 did not come up" >&2; return 1
}

cpu_s() { # PID -> CPU seconds (utime+stime) from /proc/PID/stat, as a decimal
  local line rest
  read -r line < "/proc/$1/stat"
  rest=${line##*) }
  # shellcheck disable=SC2086
  set -- $rest
  awk -v t=$(( ${12} + ${13} )) -v h="$TCK" 'BEGIN { printf "%.3f", t / h }'
}

minus() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

port() { $B freeport; }

# ---- the stack ----
RPORT=$(port)
spawn redis redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no
REDIS_PID=$SPAWNED
for _ in $(seq 100); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
RCLI=(redis-cli -p "$RPORT")
REDIS_URL=redis://127.0.0.1:$RPORT

M0PORT=$(port)
spawn mock0 env MOCK_LLM_LISTEN=127.0.0.1:$M0PORT MOCK_LLM_LATENCY_MS=0 "$BIN/agentq-mock-llm"
MOCK0_PID=$SPAWNED
M2PORT=$(port)
spawn mock2s env MOCK_LLM_LISTEN=127.0.0.1:$M2PORT MOCK_LLM_LATENCY_MS=$FAN_LATENCY_MS "$BIN/agentq-mock-llm"
MOCK2_PID=$SPAWNED

APORT=$(port)
API=http://127.0.0.1:$APORT
spawn api env AGENTQ_LISTEN=127.0.0.1:$APORT REDIS_URL="$REDIS_URL" "$BIN/agentq-api"
API_PID=$SPAWNED
wait_http "$API/healthz"
wait_http "$API/readyz"
for m in mock0 mock2s; do
  for _ in $(seq 100); do grep -q listening "$WORK/$m.log" && break; sleep 0.05; done
  grep -q listening "$WORK/$m.log" || { echo "run.sh: $m did not start" >&2; exit 1; }
done

WORKER_PID=""; WORKER_URL=""
start_worker() { # CONCURRENCY MOCK_PORT
  local wport
  wport=$(port)
  spawn worker env AGENTQ_LISTEN=127.0.0.1:$wport REDIS_URL="$REDIS_URL" \
    OPENAI_BASE_URL=http://127.0.0.1:$2/v1 OPENAI_API_KEY=bench AGENTQ_MODEL=mock-gpt \
    WORKER_CONCURRENCY="$1" "$BIN/agentq-worker"
  WORKER_PID=$SPAWNED
  WORKER_URL=http://127.0.0.1:$wport
}

reset_redis() { "${RCLI[@]}" FLUSHALL >/dev/null; }

GIT_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(git -C "$ROOT" status --porcelain -- common api worker 2>/dev/null | grep -c . || true)
read -r LA1 LA5 LA15 < <(loadavg)
cat > "$WORK/meta.json" <<EOF
{"machine": {"cores": $(nproc), "cpu_model": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/"//g')",
  "mem_mib": $(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 )), "kernel": "$(uname -r)",
  "loadavg_start": [$LA1, $LA5, $LA15], "redis": "$(redis-server --version | awk '{print $3}' | cut -d= -f2)",
  "wrk": "$(wrk -v 2>&1 | head -1 | awk '{print $2}')"},
 "git": {"commit": "$GIT_COMMIT", "uncommitted_files_in_code": $GIT_DIRTY},
 "settings": {"wrk_seconds": $WRK_SECS, "wrk_connections": $WRK_CONNS, "wrk_threads": $WRK_THREADS,
  "redis_benchmark_requests": $RB_N, "redis_benchmark_clients": $RB_CLIENTS,
  "drain_tasks": $DRAIN_N, "drain_concurrency": $DRAIN_CONC,
  "fanout_tasks": $FAN_N, "fanout_concurrency": $FAN_CONC, "fanout_llm_latency_ms": $FAN_LATENCY_MS,
  "latency_rate_per_s": $LAT_RATE, "latency_seconds": $LAT_SECS}}
EOF
log "mode=$MODE runs=$RUNS cores=$(nproc) load average: $LA1 $LA5 $LA15; logs in $WORK"

# ---- 1. enqueue over HTTP, and the raw Redis EVAL limit ----
cat > "$WORK/post.lua" <<'EOF'
wrk.method = "POST"
wrk.path = "/v1/tasks"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt":"hello from the bench"}'
EOF
phase_enqueue() {
  local i=$1 a0 r0 a1 r1 wrkj rbj la
  reset_redis
  la=$(loadavg)
  for _ in $(seq 20); do curl -fsS -o /dev/null -H 'Content-Type: application/json' -d '{"prompt":"warm"}' "$API/v1/tasks"; done
  a0=$(cpu_s "$API_PID"); r0=$(cpu_s "$REDIS_PID")
  wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WRK_SECS}s" --latency -s "$WORK/post.lua" "$API" > "$WORK/wrk-$i.txt" 2>&1 &
  local wrkpid=$! wcpu=0
  # sample wrk's own CPU just before it exits
  while kill -0 "$wrkpid" 2>/dev/null; do
    wcpu=$(cpu_s "$wrkpid" 2>/dev/null || echo "$wcpu"); sleep 0.2
  done
  wait "$wrkpid"
  a1=$(cpu_s "$API_PID"); r1=$(cpu_s "$REDIS_PID")
  wrkj=$($B wrk "$WORK/wrk-$i.txt")
  local pending
  pending=$("${RCLI[@]}" LLEN 'agentq:{default}:pending')
  reset_redis
  redis-benchmark -p "$RPORT" -c "$RB_CLIENTS" -n "$RB_N" -r 1000000 --csv \
    EVAL "redis.call('HSET',KEYS[1],'a',ARGV[1]) redis.call('LPUSH',KEYS[2],ARGV[1]) return 1" 2 'k:__rand_int__' l v \
    > "$WORK/rb-$i.csv" 2>/dev/null
  rbj=$($B rbench "$WORK/rb-$i.csv")
  $B emit "$RUNS_FILE" enqueue run="$i" wrk="$wrkj" rb="$rbj" api_cpu_s="$(minus "$a1" "$a0")" \
    redis_cpu_s="$(minus "$r1" "$r0")" wrk_cpu_s="$wcpu" queued_after="$pending" \
    loadavg="\"$la\"" >/dev/null
  log "enqueue run $i: $($B summary "$RUNS_FILE")"
}

# ---- 2. worker drain / 3. fan-out: pre-queued tasks, one worker ----
phase_drain() { # NAME RUN N CONCURRENCY MOCK_PORT MOCK_PID
  local name=$1 i=$2 n=$3 conc=$4 mport=$5 mpid=$6 m0 r0 w1 m1 r1 rec hwm la loadj
  reset_redis
  loadj=$($B load "$RPORT" "$n" "$ROOT/common/src/queue/enqueue.lua")
  la=$(loadavg)
  m0=$(cpu_s "$mpid"); r0=$(cpu_s "$REDIS_PID")
  start_worker "$conc" "$mport"
  rec=$($B wait "$RPORT" "$n" 300)
  w1=$(cpu_s "$WORKER_PID"); m1=$(cpu_s "$mpid"); r1=$(cpu_s "$REDIS_PID")
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$WORKER_PID/status")
  stop "$WORKER_PID"
  $B emit "$RUNS_FILE" "$name" run="$i" tasks="$n" concurrency="$conc" load="$loadj" rec="$rec" \
    worker_cpu_s="$w1" mock_cpu_s="$(minus "$m1" "$m0")" redis_cpu_s="$(minus "$r1" "$r0")" \
    worker_vmhwm_kib="$hwm" loadavg="\"$la\"" >/dev/null
  log "$name run $i: $($B summary "$RUNS_FILE")"
}

# ---- 4. queue latency at a moderate paced rate ----
phase_latency() {
  local i=$1 pacej waitsj histj la
  reset_redis
  start_worker "$DRAIN_CONC" "$M0PORT"
  wait_http "$WORKER_URL/readyz"
  sleep 0.3
  la=$(loadavg)
  pacej=$($B pace "$API" "$LAT_RATE" "$LAT_SECS")
  $B wait "$RPORT" "$(( LAT_RATE * LAT_SECS ))" 60 >/dev/null
  waitsj=$($B waits "$RPORT")
  histj=$($B hist "$WORKER_URL/metrics" agentq_queue_wait_seconds)
  stop "$WORKER_PID"
  $B emit "$RUNS_FILE" latency run="$i" pace="$pacej" waits="$waitsj" hist="$histj" loadavg="\"$la\"" >/dev/null
  log "latency run $i: $($B summary "$RUNS_FILE")"
}

for i in $(seq "$RUNS"); do phase_enqueue "$i"; done
for i in $(seq "$RUNS"); do phase_drain drain "$i" "$DRAIN_N" "$DRAIN_CONC" "$M0PORT" "$MOCK0_PID"; done
for i in $(seq "$RUNS"); do phase_drain fanout "$i" "$FAN_N" "$FAN_CONC" "$M2PORT" "$MOCK2_PID"; done
for i in $(seq "$RUNS"); do phase_latency "$i"; done

$B report "$RUNS_FILE" "$OUT" "$MODE" "$RUNS" "$WORK/meta.json"
echo "took $(( $(date +%s) - T_START )) s"
