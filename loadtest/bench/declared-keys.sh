#!/usr/bin/env bash
# What declaring enqueue.lua's four reached keys costs Redis (issue 19, docs/architecture.md
# "Declared keys"): the same release script (fair.lua + enqueue_item.lua + enqueue.lua), called
# with the two KEYS it read by position before (task, pending) and with the six it is given now
# (+ the tenant's line, ring, tenants, recent), 200,000 EVALSHA per round, rounds interleaved, on a
# private redis-server (FLUSHALLed between rounds). Prints INFO commandstats' usec_per_call.
# Usage: loadtest/bench/declared-keys.sh [rounds]   (needs redis-server, redis-cli, redis-benchmark)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS="${1:-5}"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --save '' --appendonly no --daemonize yes >/dev/null
trap 'redis-cli -p "$PORT" SHUTDOWN NOSAVE >/dev/null 2>&1 || true' EXIT
for _ in 1 2 3 4 5 6 7 8 9 10; do redis-cli -p "$PORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
SHA=$(redis-cli -p "$PORT" SCRIPT LOAD "$(cat common/src/queue/fair.lua common/src/queue/enqueue_item.lua common/src/queue/enqueue.lua)")
B='agentq:{q}:'
run() {
  redis-cli -p "$PORT" CONFIG RESETSTAT >/dev/null
  redis-benchmark -p "$PORT" -n 200000 -c 8 -q EVALSHA "$SHA" "$@" \
    x q 1764950400000 1 '{"messages":[{"role":"user","content":"hi"}]}' 3600 0 0 '' '' >/dev/null
  redis-cli -p "$PORT" INFO commandstats | grep '^cmdstat_evalsha:' | grep -o 'usec_per_call=[0-9.]*' | cut -d= -f2
}
echo "round,two_keys_us,six_keys_us"
for r in $(seq 1 "$ROUNDS"); do
  two=$(run 2 "${B}task:x" "${B}pending")
  six=$(run 6 "${B}task:x" "${B}pending" "${B}pending:default" "${B}ring" "${B}tenants" "${B}recent")
  echo "$r,$two,$six"
  redis-cli -p "$PORT" FLUSHALL >/dev/null
done
