#!/usr/bin/env bash
# Autoscaling replay: KEDA + HPA rules from the Helm chart played against real agentq-worker
# processes while k6 spike.js runs (see loadtest/autoscale/replay.py and loadtest/README.md).
#
#   loadtest/autoscale/run.sh [--ci] [--scenario spike|quota] [options] [-- extra replay.py args]
#
#   --scenario spike   (default) queue-depth scaling under spike.js, no provider quota
#   --scenario quota   a spike against a provider quota worth about 2 workers: the mock LLM
#                      enforces --rpm (MOCK_LLM_RPM) and the chart's upstreams.config gives the
#                      limiter the same rpm (api and workers read it as AGENTQ_UPSTREAMS); spike
#                      --ci 4/s for 1 s -> 80/s for 12 s, default 5/s for 2 s -> 150/s for 40 s.
#                      Adds the quota checks: replicas stop rising once the limiter parks the excess
#                      (<= two scale-up steps from the floor), then the HPA asks for and runs <= 2 x
#                      the replicas the quota can use; completions >= 90 % of the quota while
#                      backlogged; mock 429s <= 1 % of calls
#   --rpm N            the quota scenario's requests per minute (2100 = 35 calls/s = 7 in flight
#                      at 200 ms = 2 workers of 4 slots)                                 [2100]
#   --ci               compressed for CI (under a minute): chart durations / 15 (polling 1 s, HPA
#                      sync 1 s, scale-down policy period 4 s), scale-down window 5 s, cooldown 5 s,
#                      pod start 0.3 s, spike 4/s -> 80/s for 10 s; binaries from target/debug
#                      when present
#   (default)          fuller run (about 3 minutes): durations / 6 (polling 2.5 s, HPA sync 2.5 s,
#                      scale-down window 50 s, 25 % per 10 s, grace 21.7 s), pod start 1 s, spike
#                      5/s -> 150/s for 40 s then 100 s at 5/s; binaries from target/release
#                      when present, else target/debug
#   --time-scale F     divide chart and controller durations by F
#   --set K=V, -f FILE chart values (default adds --set worker.concurrency=4: one worker = 4 slots
#                      = 20 tasks/s at 200 ms, so a laptop-sized spike needs several workers)
#   --latency MS       mock LLM latency                                   [MOCK_LATENCY_MS, 200]
#   --png PATH         where to write the chart (default: the run's output folder)
#   --debug|--release  binary profile (release is built when missing)
#   -e NAME=VALUE      spike.js knobs (BASE_RATE, SPIKE_RATE, QUIET, RAMP, SPIKE_DURATION, QUIET_AFTER)
#
# Exits 0 when the replay's checks hold (backlog cleared, replicas rose and came back to the
# floor, every scaled-down worker exited 0; under --scenario quota also the quota checks) and no
# accepted task was lost or failed.
set -uo pipefail
# shellcheck source=loadtest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }

CI_MODE=0
SCENARIO=spike
RPM=2100
SCALE=""
SETS=()
VALUES=()
LATENCY="${MOCK_LATENCY_MS:-200}"
PNG=""
PROFILE=""
K6_ENV=()
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ci) CI_MODE=1; shift ;;
    --scenario) SCENARIO="$2"; shift 2 ;;
    --rpm) RPM="$2"; shift 2 ;;
    --time-scale) SCALE="$2"; shift 2 ;;
    --set) SETS+=(--set "$2"); shift 2 ;;
    -f | --values) VALUES+=(-f "$(realpath "$2")"); shift 2 ;;
    --latency) LATENCY="$2"; shift 2 ;;
    --png) PNG="$(realpath -m "$2")"; shift 2 ;;
    --debug) PROFILE=debug; shift ;;
    --release) PROFILE=release; shift ;;
    -e) K6_ENV+=(-e "$2"); shift 2 ;;
    --) shift; EXTRA+=("$@"); break ;;
    -h | --help) usage 0 ;;
    *) echo "unknown option: $1" >&2; usage 2 ;;
  esac
done
((${#SETS[@]})) || SETS=(--set worker.concurrency=4)
[[ "$SCENARIO" == spike || "$SCENARIO" == quota ]] || { echo "--scenario: spike or quota, not $SCENARIO" >&2; exit 2; }
[[ "$RPM" =~ ^[1-9][0-9]*$ ]] || { echo "--rpm: a positive integer, not $RPM" >&2; exit 2; }

NAME=autoscale
[[ "$SCENARIO" == quota ]] && NAME=autoscale-quota
if ((CI_MODE)); then
  lt_init "$NAME-ci"
  SCALE="${SCALE:-15}"
  REPLAY_ARGS=(--scale-down-window 5 --cooldown 5 --pod-start 0.3)
  JITTER=0
  SPIKE=(-e BASE_RATE=4 -e SPIKE_RATE=80 -e QUIET=5s -e RAMP=2s -e SPIKE_DURATION=10s -e QUIET_AFTER=5s)
  PROFILE="${PROFILE:-debug}"
  TITLE="agentq autoscaling replay (--ci: chart durations / $SCALE, scale-down window 5 s)"
  if [[ "$SCENARIO" == quota ]]; then
    SPIKE=(-e BASE_RATE=4 -e SPIKE_RATE=80 -e QUIET=1s -e RAMP=1s -e SPIKE_DURATION=12s -e QUIET_AFTER=3s)
    TITLE="agentq autoscaling replay under a provider quota of $RPM rpm (--ci: chart durations / $SCALE)"
  fi
else
  lt_init "$NAME"
  SCALE="${SCALE:-6}"
  REPLAY_ARGS=(--pod-start 1)
  JITTER=0
  SPIKE=(-e BASE_RATE=5 -e SPIKE_RATE=150 -e QUIET=20s -e RAMP=2s -e SPIKE_DURATION=40s -e QUIET_AFTER=100s)
  PROFILE="${PROFILE:-any}"
  TITLE="agentq autoscaling replay: chart defaults, time / $SCALE, spike 5 -> 150 tasks/s, mock LLM ${LATENCY} ms"
  if [[ "$SCENARIO" == quota ]]; then
    SPIKE=(-e BASE_RATE=5 -e SPIKE_RATE=150 -e QUIET=2s -e RAMP=2s -e SPIKE_DURATION=40s -e QUIET_AFTER=100s)
    TITLE="agentq autoscaling replay under a provider quota: $RPM rpm, time / $SCALE, spike 5 -> 150 tasks/s, mock LLM ${LATENCY} ms"
  fi
fi

# The provider's quota is the scenario's: none for spike, RPM for quota (mock and limiter alike).
unset MOCK_LLM_RPM MOCK_RPM MOCK_LLM_TPM MOCK_TPM
if [[ "$SCENARIO" == quota ]]; then
  export MOCK_LLM_RPM="$RPM"
  # upstreams.config as an operator would give it: the mock's account, its rpm; the replay points
  # base_url at the local mock. User -f files come after and may override it.
  cat >"$LT_OUT/quota-values.yaml" <<EOF
llm:
  model: mock-gpt
upstreams:
  config:
    upstreams:
      - name: mock
        base_url: https://llm.example.invalid/v1
        api_key: env:OPENAI_API_KEY
        models: [mock-gpt]
        limits: {rpm: $RPM}
EOF
  VALUES=(-f "$LT_OUT/quota-values.yaml" "${VALUES[@]}")
  REPLAY_ARGS+=(--llm-latency-ms "$LATENCY" --pod-start-jitter "$JITTER")
fi

START=$SECONDS
lt_ensure_venv PyYAML matplotlib==3.11.2 "$LT_REDIS_PY"
lt_ensure_redis
lt_ensure_helm
lt_bins "$PROFILE"
if UT="$(cd "$LT_ROOT/loadtest/autoscale" && PYTHONDONTWRITEBYTECODE=1 "$PY" -m unittest -q test_replay 2>&1)"; then
  lt_log "scaling-rule unit tests: $(grep -o 'Ran [0-9]* tests' <<<"$UT"), OK"
else
  echo "$UT" >&2
  lt_die "the scaling-rule unit tests failed"
fi
lt_start_stack "$LATENCY" 0
CHART_ARGS=(--chart "$LT_ROOT/deploy/helm/agentq" ${HELM:+--helm "$HELM"} "${VALUES[@]}" "${SETS[@]}")
if [[ "$SCENARIO" == quota ]]; then
  # The api reads the upstreams file too (the chart mounts it into both). lt_start_stack started it
  # before the mock's address was known: write the file now and restart the api with it.
  API_PID=$LT_LAST_PID
  "$PY" "$LT_ROOT/loadtest/autoscale/replay.py" "${CHART_ARGS[@]}" --worker-bin "$BIN_DIR/agentq-worker" \
    --api-url "$API_URL" --mock-url "$MOCK_URL" --out "$LT_OUT" \
    --write-upstreams "$LT_OUT/upstreams.yaml" >"$LT_OUT/describe.txt" ||
    lt_die "could not render the upstreams file (see $LT_OUT/describe.txt)"
  kill -TERM "$API_PID" 2>/dev/null
  wait "$API_PID" 2>/dev/null
  AGENTQ_UPSTREAMS="$LT_OUT/upstreams.yaml" AGENTQ_LISTEN="${API_URL#http://}" \
    lt_spawn api "$LT_OUT/api.log" "$BIN_DIR/agentq-api"
  lt_wait_http "$API_URL/readyz" 30 agentq-api "$LT_LAST_PID"
  lt_log "provider quota: mock LLM and upstreams.config at $RPM rpm; api restarted with AGENTQ_UPSTREAMS"
fi

# Debug builds on a shared 2-core machine: POST latency thresholds are loose; correctness is strict.
export ENQUEUE_P95_MS="${ENQUEUE_P95_MS:-500}" ENQUEUE_P99_MS="${ENQUEUE_P99_MS:-2000}"
export SUMMARY_JSON="$LT_OUT/k6-summary.json" BASE_URL="$API_URL"

"$PY" "$LT_ROOT/loadtest/autoscale/replay.py" "${CHART_ARGS[@]}" \
  --time-scale "$SCALE" "${REPLAY_ARGS[@]}" \
  --worker-bin "$BIN_DIR/agentq-worker" --api-url "$API_URL" --mock-url "$MOCK_URL" \
  --out "$LT_OUT" ${PNG:+--png "$PNG"} --title "$TITLE" "${EXTRA[@]}" \
  -- "$K6" run --quiet --no-usage-report --no-color "${SPIKE[@]}" "${K6_ENV[@]}" \
  "$LT_ROOT/loadtest/k6/spike.js" &
REPLAY_PID=$!
LT_PIDS+=("$REPLAY_PID")
LT_NAMES+=(replay)
wait "$REPLAY_PID"
REPLAY_RC=$?

if [[ "$SCENARIO" == quota ]]; then
  curl -fsS --max-time 5 "$API_URL/v1/upstreams" >"$LT_OUT/upstreams-end.json" 2>/dev/null || true
  curl -fsS --max-time 5 "$MOCK_URL/_mock/quota" >"$LT_OUT/mock-quota-end.json" 2>/dev/null || true
fi
lt_verify 60 0
VERIFY_RC=$?
echo
echo "== autoscale$([[ "$SCENARIO" == quota ]] && echo ' --scenario quota')$( ((CI_MODE)) && echo ' --ci'): replay $([[ $REPLAY_RC -eq 0 ]] && echo ok || echo "FAILED ($REPLAY_RC)"), queue check $([[ $VERIFY_RC -eq 0 ]] && echo ok || echo FAILED), $((SECONDS - START))s in all =="
((REPLAY_RC == 0 && VERIFY_RC == 0))
