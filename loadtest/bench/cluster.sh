#!/usr/bin/env bash
# agentq on one redis-server against a 3-master Redis Cluster (issue 19): the same workload over
# 3 queues, each queue's hash tag on its own master in the cluster.
#
#   loadtest/bench/cluster.sh           3 rounds (single, cluster, cluster, single, single, cluster),
#                                       ~4 minutes after the build; writes loadtest/bench/results-cluster.json
#   loadtest/bench/cluster.sh --smoke   1 short round, small N (CI); ~40 s after the build;
#                                       writes loadtest/out/bench/results-cluster-smoke.json (gitignored)
#
# Options: --no-build (use the binaries in $AGENTQ_BENCH_BIN_DIR, default target/release),
#          --rounds N, --out FILE, --keep (keep the logs in loadtest/out/bench/).
# Environment: BENCH_CLUSTER_N (tasks per queue for the drain; 20000, 2000 with --smoke),
#          BENCH_CLUSTER_SECS (wrk seconds; 10, 3 with --smoke).
#
# Each mode, each round:
#   enqueue  a fresh api (AGENTQ_QUEUES=q_a,q_b,q_c; cluster: REDIS_CLUSTER_NODES and
#            AGENTQ_ENQUEUE_REPLICAS=0, the cluster has no replicas), wrk 2 threads x 64 connections
#            POST /v1/tasks for BENCH_CLUSTER_SECS, the body's queue rotating over the 3 queues:
#            req/s, Redis CPU (utime+stime of every redis-server, /proc) per enqueued task, summed
#            and per node; the tasks queued are counted from GET /v1/queues/<q>.
#   drain    N tasks per queue queued through the api (POST /v1/tasks/batch, 1000 per request),
#            each queue's pending list renamed aside, 3 workers started (one per queue,
#            WORKER_CONCURRENCY=64, mock LLM 0 ms) and ready, CPU read, the lists renamed back,
#            then polled (LLEN pending + ZCARD active per queue on its node) until empty; every
#            task record must be final and succeeded. tasks/s over first started_at to last
#            finished_at; Redis CPU per drained task (sum and per node), worker CPU per task.
# Exit: 0 ok; 1 broken (an HTTP error, a lost or failed task, a process that did not start).
# Traffic goes to 127.0.0.1 only; every process started here is stopped on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MODE=full
BUILD=1
ROUNDS=""
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --no-build) BUILD=0 ;;
    --rounds) ROUNDS=$2; shift ;;
    --out) OUT=$2; shift ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "cluster.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
  shift
done
if [[ $MODE == smoke ]]; then
  ROUNDS=${ROUNDS:-1}; N=${BENCH_CLUSTER_N:-2000}; SECS=${BENCH_CLUSTER_SECS:-3}
  OUT=${OUT:-$ROOT/loadtest/out/bench/results-cluster-smoke.json}
else
  ROUNDS=${ROUNDS:-3}; N=${BENCH_CLUSTER_N:-20000}; SECS=${BENCH_CLUSTER_SECS:-10}
  OUT=${OUT:-$HERE/results-cluster.json}
fi
WRK_THREADS=2; WRK_CONNS=64; CONC=64; MASTERS=3
BIN=${AGENTQ_BENCH_BIN_DIR:-$ROOT/target/release}
export AGENTQ_AUTH=off # private stacks on loopback; the load generators send no token

# shellcheck source=loadtest/lib.sh
source "$ROOT/loadtest/lib.sh"
LT_NAME=bench-cluster
log() { printf '[bench-cluster %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

need_apt=()
for t in wrk redis-server redis-cli curl; do
  command -v "$t" >/dev/null || need_apt+=("$t")
done
if [[ ${#need_apt[@]} -gt 0 ]]; then
  pk=(); for t in "${need_apt[@]}"; do case $t in redis-cli) pk+=(redis-tools) ;; *) pk+=("$t") ;; esac; done
  if [[ $(id -u) -eq 0 ]]; then
    log "installing ${pk[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pk[@]}" >/dev/null
  else
    echo "cluster.sh: missing ${need_apt[*]} (apt-get install -y ${pk[*]})" >&2; exit 69
  fi
fi
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON; else lt_ensure_pip "$LT_REDIS_PY"; fi # the redis client, in .venv
C="$PY $HERE/cluster.py"

if [[ $BUILD -eq 1 ]]; then
  log "cargo build --release --bins"
  (cd "$ROOT" && cargo build --release --bins)
fi
for b in agentq-api agentq-worker agentq-mock-llm; do
  [[ -x $BIN/$b ]] || { echo "cluster.sh: $BIN/$b missing (build first or drop --no-build)" >&2; exit 66; }
done
ulimit -n 65536 2>/dev/null || true
T_START=$(date +%s)

WORK=$ROOT/loadtest/out/bench/cluster-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$WORK"
RUNS_FILE=$WORK/runs.jsonl
: > "$RUNS_FILE"

# ---- processes: every pid started here, stopped on exit (lib.sh) ----
BENCH_NAME=cluster.sh
# shellcheck source=loadtest/bench/lib.sh
source "$HERE/lib.sh"
wait_ping() {
  for _ in $(seq 100); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "cluster.sh: redis on $1 did not come up" >&2; return 1
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# ---- (A) one redis-server, (B) 3 cluster-enabled redis-servers, no replicas ----
# stream-node-max-bytes 512: the README's setting for agentq, as run.sh uses
REDIS_OPTS=(--bind 127.0.0.1 --save "" --appendonly no --daemonize no --stream-node-max-bytes 512)
SPORT=$($C freeport)
spawn redis-single redis-server --port "$SPORT" "${REDIS_OPTS[@]}"
SINGLE_PID=$SPAWNED
wait_ping "$SPORT"
CPORTS=(); CPIDS=()
for k in $(seq "$MASTERS"); do
  p=$($C freeport)
  mkdir -p "$WORK/node-$p"
  spawn "redis-node-$p" redis-server --port "$p" --dir "$WORK/node-$p" --cluster-enabled yes \
    --cluster-config-file nodes.conf "${REDIS_OPTS[@]}"
  CPORTS+=("$p"); CPIDS+=("$SPAWNED")
  wait_ping "$p"
done
create=(); for p in "${CPORTS[@]}"; do create+=("127.0.0.1:$p"); done
redis-cli --cluster create "${create[@]}" --cluster-replicas 0 --cluster-yes > "$WORK/cluster-create.log" 2>&1
$C cluster-ok "${CPORTS[@]}" >/dev/null
SEEDS=$(printf 'redis://127.0.0.1:%s,' "${CPORTS[@]}"); SEEDS=${SEEDS%,}
# 3 queues whose hash tags land on the 3 masters, one each
PICK=$($C pick-queues "$MASTERS" "${CPORTS[@]}")
CSPEC=$(echo "$PICK" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["spec"])')
QUEUES=$(echo "$CSPEC" | sed 's/@[0-9]*//g')
SSPEC=$(echo "$QUEUES" | tr ',' '\n' | sed "s/\$/@$SPORT/" | paste -sd,)
IFS=',' read -r -a QLIST <<< "$QUEUES"
SINGLE_NODES="$SPORT:$SINGLE_PID"
CLUSTER_NODES=$(for k in "${!CPORTS[@]}"; do printf '%s:%s,' "${CPORTS[$k]}" "${CPIDS[$k]}"; done); CLUSTER_NODES=${CLUSTER_NODES%,}
log "single redis :$SPORT; cluster masters ${CPORTS[*]}; queues $CSPEC ($(echo "$PICK" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["slots"])'))"

MPORT=$($C freeport)
spawn mock env MOCK_LLM_LISTEN=127.0.0.1:$MPORT MOCK_LLM_LATENCY_MS=0 "$BIN/agentq-mock-llm"
MOCK_PID=$SPAWNED
for _ in $(seq 100); do grep -q listening "$WORK/mock.log" && break; sleep 0.05; done
grep -q listening "$WORK/mock.log" || { echo "cluster.sh: the mock LLM did not start" >&2; exit 1; }

# the wrk script: every request a POST /v1/tasks, its queue rotating over the 3 queues
LUA_Q=$(printf '"%s",' "${QLIST[@]}"); LUA_Q=${LUA_Q%,}
cat > "$WORK/post.lua" <<EOF
local queues = {$LUA_Q}
local i = 0
wrk.method = "POST"
wrk.path = "/v1/tasks"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  return wrk.format(nil, nil, nil, '{"prompt":"hello from the bench","queue":"' .. queues[(i % #queues) + 1] .. '"}')
end
EOF

GIT_COMMIT=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=$(git -C "$ROOT" status --porcelain -- common api worker 2>/dev/null | grep -c . || true)
read -r LA1 LA5 LA15 < <(loadavg)
cat > "$WORK/meta.json" <<EOF
{"mode": "$MODE",
 "machine": {"cores": $(nproc), "cpu_model": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//; s/"//g')",
  "kernel": "$(uname -r)", "loadavg_start": [$LA1, $LA5, $LA15],
  "redis": "$(redis-server --version | awk '{print $3}' | cut -d= -f2)", "wrk": "$(wrk -v 2>&1 | head -1 | awk '{print $2}' || true)"},
 "git": {"commit": "$GIT_COMMIT", "uncommitted_files_in_code": $GIT_DIRTY},
 "settings": {"rounds": $ROUNDS, "order": "single,cluster on odd rounds; cluster,single on even rounds",
  "wrk_seconds": $SECS, "wrk_threads": $WRK_THREADS, "wrk_connections": $WRK_CONNS,
  "drain_tasks_per_queue": $N, "worker_concurrency": $CONC, "workers": ${#QLIST[@]}, "mock_llm_latency_ms": 0,
  "cluster_masters": $MASTERS, "cluster_replicas": 0, "cluster_enqueue_replicas": 0,
  "queues": "$QUEUES", "cluster_queue_nodes": "$CSPEC", "queue_slots": $(echo "$PICK" | "$PY" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["slots"]))'),
  "redis_opts": "${REDIS_OPTS[*]}"}}
EOF
log "mode=$MODE rounds=$ROUNDS N=$N/queue wrk ${SECS}s; load average $LA1 $LA5 $LA15; logs in $WORK"

API=""; API_PID=""
start_api() { # MODE
  local aport; aport=$($C freeport)
  API=http://127.0.0.1:$aport
  if [[ $1 == single ]]; then
    spawn "api-$1" env AGENTQ_LISTEN=127.0.0.1:$aport REDIS_URL=redis://127.0.0.1:$SPORT AGENTQ_QUEUES="$QUEUES" "$BIN/agentq-api"
  else
    spawn "api-$1" env AGENTQ_LISTEN=127.0.0.1:$aport REDIS_CLUSTER_NODES="$SEEDS" AGENTQ_ENQUEUE_REPLICAS=0 \
      AGENTQ_QUEUES="$QUEUES" "$BIN/agentq-api"
  fi
  API_PID=$SPAWNED
  wait_http "$API/readyz"
}

WPIDS=()
start_workers() { # MODE
  local q wport redis_env
  WPIDS=()
  if [[ $1 == single ]]; then redis_env=(REDIS_URL=redis://127.0.0.1:$SPORT)
  else redis_env=(REDIS_CLUSTER_NODES="$SEEDS" AGENTQ_ENQUEUE_REPLICAS=0); fi
  for q in "${QLIST[@]}"; do
    wport=$($C freeport)
    spawn "worker-$1-$q" env AGENTQ_LISTEN=127.0.0.1:$wport "${redis_env[@]}" AGENTQ_QUEUE="$q" \
      OPENAI_BASE_URL=http://127.0.0.1:$MPORT/v1 OPENAI_API_KEY=bench AGENTQ_MODEL=mock-gpt \
      WORKER_CONCURRENCY=$CONC "$BIN/agentq-worker"
    WPIDS+=("$SPAWNED")
    wait_http "http://127.0.0.1:$wport/readyz"
  done
}

flush_mode() { # MODE
  if [[ $1 == single ]]; then $C flush "$SPORT" >/dev/null; else $C flush "${CPORTS[@]}" >/dev/null; fi
}

run_mode() { # MODE ROUND
  local m=$1 i=$2 spec nodes npids c0 c1 before after la0 la1 q fillj waitj wpids p
  if [[ $m == single ]]; then spec=$SSPEC; nodes=$SINGLE_NODES; npids=("$SINGLE_PID")
  else spec=$CSPEC; nodes=$CLUSTER_NODES; npids=("${CPIDS[@]}"); fi
  # -- enqueue --
  flush_mode "$m"
  start_api "$m"
  for q in "${QLIST[@]}"; do
    for _ in $(seq 10); do
      curl -fsS -o /dev/null -H 'Content-Type: application/json' -d "{\"prompt\":\"warm\",\"queue\":\"$q\"}" "$API/v1/tasks"
    done
  done
  before=$($C counts "$API" "$spec")
  la0=$(loadavg)
  c0=$($C cpu "${npids[@]}" "$API_PID")
  wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${SECS}s" --latency -s "$WORK/post.lua" "$API" > "$WORK/wrk-$m-$i.txt" 2>&1
  c1=$($C cpu "${npids[@]}" "$API_PID")
  la1=$(loadavg)
  after=$($C counts "$API" "$spec")
  $C emit-enqueue "$RUNS_FILE" "$m" "$i" "$spec" "$nodes" "$API_PID" "$SECS" "$WORK/wrk-$m-$i.txt" \
    "$c0" "$c1" "$before" "$after" "$la0" "$la1" >/dev/null
  log "$($C summary "$RUNS_FILE")"
  # -- drain --
  flush_mode "$m"
  fillj=$($C fill "$API" "$spec" "$N")
  stop "$API_PID"
  $C stage "$spec" out >/dev/null
  start_workers "$m"
  sleep 0.5 # the workers' start-up settles before the CPU is read
  la0=$(loadavg)
  wpids=$(IFS=,; echo "${WPIDS[*]}")
  # one process: CPU read, the lists renamed back, polled until empty, CPU read again
  waitj=$($C drain "$spec" "$N" 300 "${npids[@]}" "${WPIDS[@]}" "$MOCK_PID")
  la1=$(loadavg)
  for p in "${WPIDS[@]}"; do stop "$p"; done
  $C emit-drain "$RUNS_FILE" "$m" "$i" "$spec" "$nodes" "$wpids" "$MOCK_PID" "$N" "$fillj" "$waitj" \
    "$la0" "$la1" >/dev/null
  log "$($C summary "$RUNS_FILE")"
  flush_mode "$m"
}

for i in $(seq "$ROUNDS"); do
  if (( i % 2 == 1 )); then order=(single cluster); else order=(cluster single); fi
  for m in "${order[@]}"; do run_mode "$m" "$i"; done
done

mkdir -p "$(dirname "$OUT")"
rc=0
$C report "$RUNS_FILE" "$OUT" "$WORK/meta.json" "$N" || rc=$?
echo "took $(( $(date +%s) - T_START )) s"
exit "$rc"
