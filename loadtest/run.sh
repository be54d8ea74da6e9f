#!/usr/bin/env bash
# Runs one k6 scenario against a private local agentq stack and checks that no task was lost.
#
#   loadtest/run.sh SCENARIO [options] [-- extra k6 args]
#
# SCENARIO: enqueue | e2e | spike | soak, or a path to a k6 script.
# Options (each also settable through the environment variable in brackets):
#   --workers N         agentq-worker processes                      [WORKERS, 2]
#   --concurrency N     WORKER_CONCURRENCY of each worker            [WORKER_CONCURRENCY, 16]
#   --latency MS        mock LLM latency per call                    [MOCK_LATENCY_MS, 200]
#   --error-rate R      mock LLM share of 500 answers (0..1)         [MOCK_ERROR_RATE, 0]
#   --max-failed N      tasks allowed to end "failed"                [MAX_FAILED, 0]
#   --drain-timeout S   wait this long for the queue to drain        [DRAIN_TIMEOUT, 120]
#   --debug | --release binaries from target/debug (preferred when present) or target/release
#                       (built when missing)                         [PROFILE, release]
#   -e NAME=VALUE       passed to k6 (RATE, DURATION, PROMPT_SIZE, ... see loadtest/README.md);
#                       the scripts also read these from the environment.
#
# Prints k6's summary, then the queue's own figures (accepted, succeeded, failed, dead, LLM
# calls); exits non-zero when k6 crossed a threshold (99), a task was lost or too many failed (1).
# Everything it starts is stopped on exit, Ctrl-C or SIGTERM. Logs: loadtest/out/<scenario>-<time>/.
set -uo pipefail
# shellcheck source=loadtest/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

[[ $# -ge 1 ]] || usage 2
SCENARIO="$1"
shift
case "$SCENARIO" in
  -h | --help) usage 0 ;;
  enqueue | e2e | spike | soak) SCRIPT="$LT_ROOT/loadtest/k6/$SCENARIO.js" ;;
  *.js) SCRIPT="$(cd "$(dirname "$SCENARIO")" && pwd)/$(basename "$SCENARIO")" ;;
  *) echo "unknown scenario: $SCENARIO" >&2; usage 2 ;;
esac
[[ -f "$SCRIPT" ]] || { echo "no such script: $SCRIPT" >&2; exit 2; }

WORKERS="${WORKERS:-2}"
CONC="${WORKER_CONCURRENCY:-16}"
LATENCY="${MOCK_LATENCY_MS:-200}"
ERROR_RATE="${MOCK_ERROR_RATE:-0}"
MAX_FAILED="${MAX_FAILED:-0}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-120}"
PROFILE="${PROFILE:-release}"
K6_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --concurrency) CONC="$2"; shift 2 ;;
    --latency) LATENCY="$2"; shift 2 ;;
    --error-rate) ERROR_RATE="$2"; shift 2 ;;
    --max-failed) MAX_FAILED="$2"; shift 2 ;;
    --drain-timeout) DRAIN_TIMEOUT="$2"; shift 2 ;;
    --debug) PROFILE=debug; shift ;;
    --release) PROFILE=release; shift ;;
    -e) K6_ARGS+=(-e "$2"); shift 2 ;;
    --) shift; K6_ARGS+=("$@"); break ;;
    -h | --help) usage 0 ;;
    *) echo "unknown option: $1" >&2; usage 2 ;;
  esac
done

lt_init "$(basename "$SCRIPT" .js)"
# shellcheck disable=SC2119 # no extra pip packages
lt_ensure_venv
lt_ensure_redis
lt_bins "$PROFILE"
lt_start_stack "$LATENCY" "$ERROR_RATE"
lt_start_workers "$WORKERS" "$CONC"

START=$SECONDS
lt_run_k6 "$SCRIPT" "${K6_ARGS[@]}"
lt_verify "$DRAIN_TIMEOUT" "$MAX_FAILED"
VERIFY_RC=$?
lt_log "done in $((SECONDS - START))s: k6 exit $K6_RC, queue check $([[ $VERIFY_RC -eq 0 ]] && echo ok || echo FAILED)"
if [[ $K6_RC -ne 0 ]]; then exit "$K6_RC"; fi
exit "$VERIFY_RC"
