#!/usr/bin/env bash
# Autoscaling replay: KEDA + HPA rules from the Helm chart played against real agentq-worker
# processes while k6 spike.js runs (see loadtest/autoscale/replay.py and loadtest/README.md).
#
#   loadtest/autoscale/run.sh [--ci] [options] [-- extra replay.py args]
#
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
# floor, every scaled-down worker exited 0) and no accepted task was lost or failed.
set -uo pipefail
# shellcheck source=loadtest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

CI_MODE=0
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

if ((CI_MODE)); then
  lt_init autoscale-ci
  SCALE="${SCALE:-15}"
  REPLAY_ARGS=(--scale-down-window 5 --cooldown 5 --pod-start 0.3)
  SPIKE=(-e BASE_RATE=4 -e SPIKE_RATE=80 -e QUIET=5s -e RAMP=2s -e SPIKE_DURATION=10s -e QUIET_AFTER=5s)
  PROFILE="${PROFILE:-debug}"
  TITLE="agentq autoscaling replay (--ci: chart durations / $SCALE, scale-down window 5 s)"
else
  lt_init autoscale
  SCALE="${SCALE:-6}"
  REPLAY_ARGS=(--pod-start 1)
  SPIKE=(-e BASE_RATE=5 -e SPIKE_RATE=150 -e QUIET=20s -e RAMP=2s -e SPIKE_DURATION=40s -e QUIET_AFTER=100s)
  PROFILE="${PROFILE:-any}"
  TITLE="agentq autoscaling replay: chart defaults, time / $SCALE, spike 5 -> 150 tasks/s, mock LLM ${LATENCY} ms"
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

# Debug builds on a shared 2-core machine: POST latency thresholds are loose; correctness is strict.
export ENQUEUE_P95_MS="${ENQUEUE_P95_MS:-500}" ENQUEUE_P99_MS="${ENQUEUE_P99_MS:-2000}"
export SUMMARY_JSON="$LT_OUT/k6-summary.json" BASE_URL="$API_URL"

"$PY" "$LT_ROOT/loadtest/autoscale/replay.py" \
  --chart "$LT_ROOT/deploy/helm/agentq" ${HELM:+--helm "$HELM"} "${VALUES[@]}" "${SETS[@]}" \
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

lt_verify 60 0
VERIFY_RC=$?
echo
echo "== autoscale$( ((CI_MODE)) && echo ' --ci'): replay $([[ $REPLAY_RC -eq 0 ]] && echo ok || echo "FAILED ($REPLAY_RC)"), queue check $([[ $VERIFY_RC -eq 0 ]] && echo ok || echo FAILED), $((SECONDS - START))s in all =="
((REPLAY_RC == 0 && VERIFY_RC == 0))
