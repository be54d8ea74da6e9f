#!/usr/bin/env bash
# Runs agentq end to end on this machine: installs redis-server if missing, builds, starts a private
# Redis, the mock LLM, the API and a worker, sends sample tasks over HTTP, shows progress, prints the
# results and figures, and shuts everything down. Usage: bash scripts/demo.sh
# Point it at a real OpenAI-compatible API instead of the mock with
#   OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-... AGENTQ_MODEL=gpt-4o-mini bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_redis
ensure_cmd curl curl
bin=${CARGO_TARGET_DIR:-target}/debug
if [ ! -x "$bin/agentq-api" ]; then
  echo "==> first build: cargo compiles about 200 crates, which takes several minutes (8-10 on a"
  echo "    2-core machine); later runs reuse it and start in seconds. Cargo's progress follows."
fi
echo "==> building (cargo build --bins)"
cargo build --bins

run=$(mktemp -d "${TMPDIR:-/tmp}/agentq-demo.XXXXXX")
pids=()
cleanup() {
  local code=$?
  echo
  echo "==> shutting down"
  stop_in_order "${pids[@]}"
  [ "$code" = 0 ] || { echo "demo failed; logs in $run"; exit "$code"; }
  rm -rf "$run"
  echo "done."
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis_port=$(free_port); api_port=$(free_port); worker_port=$(free_port); llm_port=$(free_port)
echo "==> redis-server on 127.0.0.1:$redis_port (private, nothing persisted)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$run" \
  --stream-node-max-bytes 512 \
  >"$run/redis.log" 2>&1 &
pids+=($!)

mock=""
if [ -z "${OPENAI_BASE_URL:-}" ]; then
  mock=1
  echo "==> mock LLM on 127.0.0.1:$llm_port (1 s latency, recording requests)"
  MOCK_LLM_LISTEN=127.0.0.1:$llm_port MOCK_LLM_LATENCY_MS=1000 MOCK_LLM_RECORD=1 "$bin/agentq-mock-llm" >"$run/mock.log" 2>&1 &
  pids+=($!)
  export OPENAI_BASE_URL=http://127.0.0.1:$llm_port/v1 OPENAI_API_KEY=sk-demo AGENTQ_MODEL=${AGENTQ_MODEL:-mock-gpt}
  wait_http "http://127.0.0.1:$llm_port/healthz"
fi
export REDIS_URL=redis://127.0.0.1:$redis_port AGENTQ_RETRY_BASE_MS=200 AGENTQ_RETRY_MAX_MS=2000 AGENTQ_HEARTBEAT_SECS=5

# Server-side tools: the reference MCP server from npm, declared to agentq as "everything" (only
# with the mock, whose [[call:...]] marker plays a model that asks for tools).
mcp=""
if [ -n "$mock" ] && command -v node >/dev/null 2>&1 \
  && bash tests/peers/mcp/install.sh >"$run/mcp-install.log" 2>&1; then
  mcp_port=$(free_port)
  echo "==> MCP server (@modelcontextprotocol/server-everything, Streamable HTTP) on 127.0.0.1:$mcp_port"
  PORT=$mcp_port node tests/peers/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js streamableHttp \
    >"$run/mcp.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 100); do
    (echo >"/dev/tcp/127.0.0.1/$mcp_port") 2>/dev/null && break
    sleep 0.1
  done
  export AGENTQ_MCP_SERVERS="{\"everything\": {\"url\": \"http://127.0.0.1:$mcp_port/mcp\"}}"
  mcp=1
else
  echo "==> (no MCP server: needs the mock LLM and Node.js with npm; the MCP task is skipped)"
fi

echo "==> agentq-api on 127.0.0.1:$api_port, agentq-worker (concurrency 4) probes on 127.0.0.1:$worker_port"
# Auth on, as in production: a fresh admin token for this run only (never printed).
admin_token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "    auth: on (AGENTQ_AUTH=on; a one-run admin token, a tenant \"demo\" with its own token)"
AGENTQ_AUTH=on AGENTQ_ADMIN_TOKEN=$admin_token AGENTQ_LISTEN=127.0.0.1:$api_port "$bin/agentq-api" >"$run/api.log" 2>&1 &
pids=("$!" "${pids[@]}")
AGENTQ_LISTEN=127.0.0.1:$worker_port WORKER_CONCURRENCY=4 "$bin/agentq-worker" >"$run/worker.log" 2>&1 &
pids=("$!" "${pids[@]}")
api=http://127.0.0.1:$api_port
wait_http "$api/readyz"
wait_http "http://127.0.0.1:$worker_port/readyz"

echo "==> tenants and tokens"
echo "    a task sent without a token is refused: HTTP $(command curl -sS -o /dev/null -w '%{http_code}' -X POST "$api/v1/tasks" -H 'content-type: application/json' -d '{"prompt": "hi"}')"
command curl -fsS -X POST "$api/v1/admin/tenants" -H "Authorization: Bearer $admin_token" \
  -H 'content-type: application/json' -d '{"id": "demo", "weight": 1, "quotas": {"enqueue_rate": 50}}' >/dev/null
tenant_token=$(command curl -fsS -X POST "$api/v1/admin/tenants/demo/tokens" -H "Authorization: Bearer $admin_token" \
  -H 'content-type: application/json' -d '{}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
echo "    tenant demo created by the admin, with a token shown once (agentq_<id>_...); every call below uses it"
other=$(command curl -fsS -X POST "$api/v1/tasks" -H "Authorization: Bearer $admin_token" \
  -H 'content-type: application/json' -d '{"prompt": "The operator'"'"'s own task"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "    another tenant's task is invisible: GET $other with the demo token -> HTTP $(command curl -sS -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $tenant_token" "$api/v1/tasks/$other")"
# every request to the api from here on carries the tenant's token
curl() { command curl -H "Authorization: Bearer $tenant_token" "$@"; }
# (and the Python snippets' requests, through AGENTQ_TOKEN)
export AGENTQ_TOKEN=$tenant_token

post() { curl -fsS -X POST "$api/v1/tasks" -H 'content-type: application/json' "$@"; }
id_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'; }

echo "==> sending sample tasks"
ids=()
for q in "Summarise the plot of Hamlet in one line" "Write a haiku about queues" \
         "Name three uses of Redis" "Explain backoff with jitter" "Translate 'good morning' to French" \
         "What is KEDA?" "Give a tip for on-call engineers" "Why do tasks need idempotency?"; do
  ids+=("$(post -d "{\"prompt\": \"$q\"}" | id_of)")
done
ids+=("$(post -d '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}], "metadata": {"ticket": "T-1"}}' | id_of)")
# agent memory: the second task sees the first exchange
ids+=("$(post -d '{"prompt": "My favourite colour is teal", "agent_id": "demo-agent"}' | id_of)")
# a flaky upstream when talking to the mock: two 503s, then success (retried with backoff)
ids+=("$(post -d '{"prompt": "Flaky upstream [[fail:503:2]]"}' | id_of)")
# a permanent error: one call, then the dead-letter set
ids+=("$(post -d '{"prompt": "Bad request [[fail:400]]"}' | id_of)")
# idempotency: the same key twice gives the same task
a=$(post -H 'Idempotency-Key: demo-order-1' -d '{"prompt": "Charge order 1"}' | id_of)
b=$(post -H 'Idempotency-Key: demo-order-1' -d '{"prompt": "Charge order 1"}' | id_of)
echo "    Idempotency-Key demo-order-1 -> $a, again -> $b ($([ "$a" = "$b" ] && echo same task || echo DIFFERENT))"
ids+=("$a")
# a bad request is refused with a JSON error naming the field, and writes nothing
echo "    bad request: $(curl -sS -X POST "$api/v1/tasks" -H 'content-type: application/json' -d '{"prompt": 42}')"
# the agent's second task waits in the agent's lane until the first is done, then sees its exchange
ids+=("$(post -d '{"prompt": "What is my favourite colour?", "agent_id": "demo-agent"}' | id_of)")

if [ -n "$mock" ]; then
  echo "==> agents with tools"
  # a server-side tool over MCP: the model asks for get-sum, the worker calls the MCP server,
  # records the step and calls the model again with the result
  if [ -n "$mcp" ]; then
    ids+=("$(post -d '{"prompt": "What is 2 + 3? [[call:everything__get-sum:{\"a\": 2, \"b\": 3}]]", "mcp": ["everything"]}' | id_of)")
    echo "    MCP task ${ids[-1]}: the model may call the MCP server's tools (everything__*)"
  fi
  # a client-side tool: the task waits in requires_action (no worker slot held) for our result
  tool_id=$(post -d '{"prompt": "Weather in Paris? [[call:get_weather:{\"city\": \"Paris\"}]]", "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}' | id_of)
  ids+=("$tool_id")
  python3 - "$api" "$tool_id" <<'PY'
import json, sys, time, urllib.request
_o = urllib.request.build_opener(); _o.addheaders = [("Authorization", "Bearer " + __import__("os").environ["AGENTQ_TOKEN"])]; urllib.request.install_opener(_o)
api, tid = sys.argv[1], sys.argv[2]
get = lambda path: json.load(urllib.request.urlopen(api + path, timeout=5))
for _ in range(120):
    t = get("/v1/tasks/" + tid)
    if t["status"] == "requires_action":
        break
    time.sleep(0.25)
calls = t["required_action"]["submit_tool_outputs"]["tool_calls"]
for c in calls:
    print("    client-side tool task %s: requires_action, the model called %s(%s)"
          % (tid, c["function"]["name"], c["function"]["arguments"]))
outputs = [{"tool_call_id": c["id"], "output": "18 C and sunny"} for c in calls]
req = urllib.request.Request(api + "/v1/tasks/" + tid + "/tool_outputs", method="POST",
                             data=json.dumps({"tool_outputs": outputs}).encode(),
                             headers={"content-type": "application/json"})
print("    POST /v1/tasks/%s/tool_outputs -> %s" % (tid, json.load(urllib.request.urlopen(req, timeout=5))))
PY
fi

echo "==> streaming (GET /v1/tasks/{id}/events, Server-Sent Events): one task's answer as it is written"
# with the mock, 12 words a second so the text visibly arrives in pieces (a real model streams itself)
pace=""; [ -n "$mock" ] && pace=" [[stream_rate:12]]"
sid=$(post -d "{\"prompt\": \"Stream this answer to the terminal one piece at a time, as a model writes it.$pace\"}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
ids+=("$sid")
curl -fsSN "$api/v1/tasks/$sid/events" | python3 -u -c '
import json, sys
event, midline = None, False
def say(s):
    global midline
    print(("\n" if midline else "") + "    " + s)
    midline = False
for line in sys.stdin:
    line = line.rstrip("\n")
    if line.startswith("event:"):
        event = line[6:].strip()
    elif line.startswith("data:"):
        d = json.loads(line[5:])
        if event == "delta":
            if not midline:
                sys.stdout.write("    ")
            sys.stdout.write(d["text"]); sys.stdout.flush()
            midline = True
        elif event == "status":
            say("[status %s%s]" % (d["status"], " attempt %d" % d["attempt"] if "attempt" in d else ""))
        elif event == "attempt_started" and midline:
            say("[attempt %d starts over]" % d["attempt"])
        elif event in ("done", "error"):
            say("[%s: %s]" % (event, d.get("status")))
'

echo "==> the OpenAI-compatible front door (POST /v1/chat/completions): any OpenAI SDK pointed at $api/v1"
python3 - "$api" "${AGENTQ_MODEL:-gpt-4o-mini}" "${mock:-}" <<'PY'
import json, sys, urllib.request
_o = urllib.request.build_opener(); _o.addheaders = [("Authorization", "Bearer " + __import__("os").environ["AGENTQ_TOKEN"])]; urllib.request.install_opener(_o)
api, model, mock = sys.argv[1], sys.argv[2], sys.argv[3]
pace = " [[stream_rate:12]]" if mock else ""
def call(body):
    req = urllib.request.Request(api + "/v1/chat/completions", method="POST",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)
r = call({"model": model, "messages": [{"role": "user", "content": "Say hello through the queue"}]})
c = json.load(r)
print("    %s -> %r (task %s, %d tokens)" % (c["object"], c["choices"][0]["message"]["content"],
                                           r.headers["x-agentq-task-id"], c["usage"]["total_tokens"]))
r = call({"model": model, "stream": True,
          "messages": [{"role": "user", "content": "Stream this one as OpenAI chunks." + pace}]})
sys.stdout.write("    stream: ")
for line in r:
    line = line.decode().strip()
    if not line.startswith("data: "):
        continue
    if line == "data: [DONE]":
        print("  [DONE]")
        break
    chunk = json.loads(line[6:])
    for ch in chunk.get("choices", []):
        sys.stdout.write(ch["delta"].get("content") or ""); sys.stdout.flush()
PY

echo "==> workflows (POST /v1/workflows): a chain, a fan-out with a join, a planner and its workers"
python3 - "$api" "${mock:-}" <<'PY'
import json, sys, time, urllib.request
_o = urllib.request.build_opener(); _o.addheaders = [("Authorization", "Bearer " + __import__("os").environ["AGENTQ_TOKEN"])]; urllib.request.install_opener(_o)
api, mock = sys.argv[1], sys.argv[2] == "1"
def call(method, path, body=None):
    req = urllib.request.Request(api + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=10))
# the planner's answer must be {"subtasks": [...]}; the mock says it verbatim, a real model is asked
plan = ('[[say:{"subtasks": [{"prompt": "List two facts about the Moon"}, '
        '{"prompt": "List two facts about tides"}]}]]' if mock else
        'Answer only with JSON {"subtasks": [{"prompt": "..."}]}: two research questions about tides.')
shapes = {
    "chain": {"nodes": [
        {"id": "research", "prompt": "Name one cause of ocean tides"},
        {"id": "write", "depends_on": ["research"], "prompt": "Write one sentence using: {{nodes.research.output}}"},
        {"id": "edit", "depends_on": ["write"], "prompt": "Shorten: {{nodes.write.output}}"}]},
    "fan-out": {"nodes": [{"id": "part%d" % i, "prompt": "Summarise chapter %d" % i} for i in range(1, 6)]
        + [{"id": "join", "depends_on": ["part%d" % i for i in range(1, 6)],
            "prompt": "Combine these summaries: {{parents}}"}]},
    "plan": {"nodes": [
        {"id": "plan", "kind": "plan", "max_children": 5, "prompt": "Plan the research on tides " + plan},
        {"id": "report", "depends_on": ["plan"], "prompt": "Write the report from: {{parents}}"}]},
}
ids = {name: call("POST", "/v1/workflows", body)["id"] for name, body in shapes.items()}
for name, wid in ids.items():
    print("    %-8s %s" % (name, wid))
bad = urllib.request.Request(api + "/v1/workflows", method="POST", headers={"content-type": "application/json"},
    data=json.dumps({"nodes": [{"id": "a", "depends_on": ["b"], "prompt": "x"},
                               {"id": "b", "depends_on": ["a"], "prompt": "y"}]}).encode())
try:
    urllib.request.urlopen(bad, timeout=10)
except urllib.error.HTTPError as e:
    print("    a cycle is refused: %d %s" % (e.code, e.read().decode()))
for name, wid in ids.items():
    for _ in range(240):
        w = call("GET", "/v1/workflows/" + wid)
        if w["status"] != "running":
            break
        time.sleep(0.5)
    print("    %s: %s, %d nodes, %d calls, $%.6f" % (name, w["status"], len(w["nodes"]), w["usage"]["calls"], w["cost"]))
    for n in w["nodes"]:
        out = (n.get("output") or n.get("error") or "").replace("\n", " ")
        print("      %-10s %-9s %s" % (n["id"], n["status"], out[:80]))
PY

echo "==> progress (GET /v1/queues/default and GET /v1/tasks/{id}, every 0.5 s)"
python3 - "$api" "${ids[@]}" <<'PY'
import json, sys, time, urllib.request
_o = urllib.request.build_opener(); _o.addheaders = [("Authorization", "Bearer " + __import__("os").environ["AGENTQ_TOKEN"])]; urllib.request.install_opener(_o)
api, ids = sys.argv[1], sys.argv[2:]
get = lambda path: json.load(urllib.request.urlopen(api + path, timeout=5))
for _ in range(240):
    q = get("/v1/queues/default")
    states = [get("/v1/tasks/" + i)["status"] for i in ids]
    done = sum(s in ("succeeded", "failed", "cancelled") for s in states)
    print("    pending=%d inflight=%d retrying=%d dead=%d workers=%d  finished %d/%d"
          % (q["pending"], q["inflight"], q["retrying"], q["dead"], q["workers"], done, len(ids)), flush=True)
    if done == len(ids):
        break
    time.sleep(0.5)
PY

echo "==> results (GET /v1/tasks/{id})"
for id in "${ids[@]}"; do curl -fsS "$api/v1/tasks/$id"; echo; done | python3 -c '
import json, sys
for line in sys.stdin:
    t = json.loads(line)
    out = (t["result"] or {}).get("content") or t.get("error") or ""
    steps = " steps=%d" % t["steps"] if t.get("steps", 0) > 1 else ""
    print("  %-9s attempts=%d%s  %s" % (t["status"], t["attempts"], steps, out[:90].replace("\n", " ")))'

echo "==> dead letters (GET /v1/queues/default/dead)"
curl -fsS "$api/v1/queues/default/dead" | python3 -c '
import json,sys
for t in json.load(sys.stdin)["tasks"]: print("  %s  %s" % (t["id"], (t["error"] or "")[:80]))'

echo "==> figures (worker /metrics)"
curl -fsS "http://127.0.0.1:$worker_port/metrics" | grep -E '^agentq_(tasks_total|llm_requests_total|llm_tokens_total|llm_cost_dollars_total|mcp_calls_total)' | sed 's/^/  /'
if curl -fsS "http://127.0.0.1:$llm_port/_mock/calls" >/dev/null 2>&1; then
  echo "==> agent memory: what the LLM received for 'What is my favourite colour?'"
  curl -fsS "http://127.0.0.1:$llm_port/_mock/requests" | python3 -c '
import json,sys
for r in json.load(sys.stdin):
    if r["messages"][-1]["content"] == "What is my favourite colour?":
        for m in r["messages"]: print("  %-9s %s" % (m["role"], m["content"]))'

  echo "  mock LLM calls: $(curl -fsS "http://127.0.0.1:$llm_port/_mock/calls" | python3 -c 'import json,sys; print(json.load(sys.stdin)["total"])')"
fi
