#!/usr/bin/env bash
# Runs every check agentq has, installing what is missing: formatting, clippy, unit and end-to-end
# tests (real redis-server, real binaries, the mock LLM, and the third-party LiteLLM proxy and aimock
# as LLM servers), API fuzzing (schemathesis), the deploy checks, the k6 smoke, the autoscaling replay
# and a benchmark smoke. Usage: bash scripts/test.sh
# Each step runs even when an earlier one failed; the exit code is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

echo "==> agentq test suite. A first run compiles the workspace several times (clippy, debug"
echo "    binaries, tests, release binaries for the benchmark smoke) and installs its tools into"
echo "    .venv and .tools: expect about 30 minutes on a 2-core machine, most of it cargo, whose"
echo "    progress is shown. Later runs reuse the builds."
ensure_redis
ensure_cmd curl curl
# A clean clone compiles everything once: incremental caches would only take disk (a CI runner ran
# out of it mid-build), so they are off unless the caller asks for them.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
disk_free() { df -Pk . | awk 'NR == 2 { printf "%.1f GiB free", $4 / 1048576 }'; }
echo "    disk: $(disk_free) here at the start"
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest

passed=0 failed=0 failures=()
step() { # step NAME CMD...
  local name=$1; shift
  local t0=$SECONDS
  echo
  echo "==> $name"
  if "$@"; then
    passed=$((passed + 1))
    echo "<== $name: ok ($((SECONDS - t0)) s; $(disk_free))"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "<== $name: FAILED ($((SECONDS - t0)) s; $(disk_free))"
  fi
}

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy -D warnings" cargo clippy --workspace --all-targets --locked -- -D warnings
step "build binaries" cargo build --workspace --bins --locked
step "cargo deny (licenses, bans, sources)" bash scripts/cargo-deny.sh
step "third-party peers for the tests (LiteLLM proxy and the openai SDK, aimock, the reference MCP server, the openai Node SDK, k6)" \
  bash -c 'bash tests/peers/litellm/install.sh && bash tests/peers/aimock/install.sh && bash tests/peers/mcp/install.sh && bash tests/peers/openai-node/install.sh && bash tests/peers/k6/install.sh'
step "unit and end-to-end tests (nextest)" cargo nextest run --workspace --locked --no-fail-fast
# The same suite with every test's Redis a one-node Redis Cluster and the binaries in cluster
# mode (tests/src/lib.rs, cluster_sweep): Redis then refuses any script or command whose keys span
# two slots, as a real cluster would. Left out: the ACL and TLS tests and the password test, which
# configure Redis through REDIS_URL itself (users, TLS, requirepass), the 2 MB maxmemory test (a
# cluster node's own structures take about that) and tests/tests/cluster.rs (real clusters of
# their own, run above). The seeded chaos test runs here too (a fresh seed each run, printed on
# failure).
step "end-to-end suite in cluster mode (one-node Redis Cluster, AGENTQ_TEST_REDIS=cluster)" \
  env AGENTQ_TEST_REDIS=cluster cargo nextest run -p agentq-tests --locked --no-fail-fast \
  -E 'not (binary(acl) | binary(cluster) | test(=password_protected_tls_redis_works_and_the_password_stays_out_of_logs) | test(=redis_out_of_memory_gets_503_and_paid_results_still_land))'
step "API fuzzing (schemathesis vs /openapi.json)" bash scripts/schemathesis.sh
step "web console in headless Chromium (Playwright)" bash scripts/ui-test.sh
step "deploy checks (helm, CRDs, checkov, hadolint, KEDA keys)" bash deploy/check.sh
step "deploy checks from a copy with nothing beside it (no ../shared)" bash scripts/fresh-copy-check.sh
step "k6 smoke (enqueue.js, e2e.js, chat.js)" bash loadtest/smoke.sh
step "autoscaling replay (compressed)" bash loadtest/autoscale/run.sh --ci
step "autoscaling replay under a provider quota (compressed)" bash loadtest/autoscale/run.sh --ci --scenario quota
step "benchmark smoke" bash loadtest/bench/run.sh --smoke
step "flow limiter benchmark smoke (grants: every call counted, no lease left)" bash loadtest/bench/run.sh --limiter --smoke --no-build

echo
if [ "$failed" -gt 0 ]; then
  printf 'failed step: %s\n' "${failures[@]}"
fi
echo "steps: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
