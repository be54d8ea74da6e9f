// spike.js: quiet, sudden burst, quiet again (ramping-arrival-rate). Made for watching the worker
// fleet scale out and back (loadtest/autoscale/run.sh replays KEDA + HPA against it).
//
//   rate ^        ______________
//        |       /              \
//        |______/                \__________
//        | QUIET  RAMP  SPIKE_DURATION RAMP  QUIET_AFTER
//
// Knobs (-e NAME=value or environment):
//   BASE_URL        API base URL                                   http://127.0.0.1:8080
//   BASE_RATE       tasks per second while quiet                   5
//   SPIKE_RATE      tasks per second at the top                    100
//   QUIET           quiet time before the spike                    30s
//   RAMP            ramp up and ramp down time                     5s
//   SPIKE_DURATION  time at SPIKE_RATE                             30s
//   QUIET_AFTER     quiet time after the spike                     = QUIET
//   MODE            enqueue (POST only; the backlog is checked by the runner) or
//                   e2e (each task also polled to a final state)   enqueue
//   PROMPT_SIZE, POLL_MS, E2E_TIMEOUT, E2E_P95_MS, MIN_E2E_SUCCESS, ENQUEUE_P95_MS,
//   ENQUEUE_P99_MS, MAX_FAILED_RATE, VUS, MAX_VUS, SUMMARY_JSON    as in enqueue.js / e2e.js
import {
  E2E_TIMEOUT,
  e2eThresholds,
  enqueue,
  enqueueAndWait,
  enqueueThresholds,
  envInt,
  envNum,
  envStr,
  seconds,
  summary,
  vusFor,
} from './lib.js';

const BASE_RATE = envNum('BASE_RATE', 5);
const SPIKE_RATE = envNum('SPIKE_RATE', 100);
const QUIET = envStr('QUIET', '30s');
const RAMP = envStr('RAMP', '5s');
const SPIKE_DURATION = envStr('SPIKE_DURATION', '30s');
const QUIET_AFTER = envStr('QUIET_AFTER', QUIET);
const MODE = envStr('MODE', 'enqueue');
if (MODE !== 'enqueue' && MODE !== 'e2e') throw new Error(`MODE must be enqueue or e2e, got ${MODE}`);

// Iterations the profile asks for (areas under the rate curve), for the dropped-iterations threshold.
const expected =
  BASE_RATE * seconds(QUIET) +
  (BASE_RATE + SPIKE_RATE) * seconds(RAMP) +
  SPIKE_RATE * seconds(SPIKE_DURATION) +
  BASE_RATE * seconds(QUIET_AFTER);

const perIteration = MODE === 'e2e' ? Math.min(E2E_TIMEOUT, 30) : 0.2;
const VUS = envInt('VUS', vusFor(SPIKE_RATE, MODE === 'e2e' ? 2 : 0.2));
const r = (x) => Math.round(x * 100); // timeUnit 100s: fractional rates allowed

export const options = {
  scenarios: {
    spike: {
      executor: 'ramping-arrival-rate',
      startRate: r(BASE_RATE),
      timeUnit: '100s',
      preAllocatedVUs: VUS,
      maxVUs: envInt('MAX_VUS', Math.max(VUS * 4, Math.ceil(SPIKE_RATE * perIteration))),
      stages: [
        { target: r(BASE_RATE), duration: QUIET },
        { target: r(SPIKE_RATE), duration: RAMP },
        { target: r(SPIKE_RATE), duration: SPIKE_DURATION },
        { target: r(BASE_RATE), duration: RAMP },
        { target: r(BASE_RATE), duration: QUIET_AFTER },
      ],
      gracefulStop: MODE === 'e2e' ? `${Math.ceil(E2E_TIMEOUT) + 5}s` : '10s',
    },
  },
  thresholds: MODE === 'e2e' ? e2eThresholds(expected) : enqueueThresholds(expected),
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  if (MODE === 'e2e') enqueueAndWait();
  else enqueue();
}

export function handleSummary(data) {
  return summary(
    data,
    `spike.js (${BASE_RATE}/s -> ${SPIKE_RATE}/s for ${SPIKE_DURATION} -> ${BASE_RATE}/s, ${MODE})`,
  );
}
