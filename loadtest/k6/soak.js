// soak.js: a steady, long run at a modest rate, to find slow leaks (memory, connections, Redis
// keys), latency creep and rare failures. Each task is followed to its final state by default.
//
// Knobs (-e NAME=value or environment):
//   BASE_URL        API base URL                                   http://127.0.0.1:8080
//   RATE            tasks per second                               5
//   DURATION        test length                                    30m
//   MODE            e2e (enqueue + poll) or enqueue (POST only)    e2e
//   E2E_P95_MS      e2e_latency p95 threshold                      10000
//   E2E_P99_MS      e2e_latency p99 threshold                      30000
//   PROMPT_SIZE, POLL_MS, E2E_TIMEOUT, MIN_E2E_SUCCESS, ENQUEUE_P95_MS, ENQUEUE_P99_MS,
//   MAX_FAILED_RATE, EXPECT_LATENCY_MS, VUS, MAX_VUS, SUMMARY_JSON as in e2e.js
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

const RATE = envNum('RATE', 5);
const DURATION = envStr('DURATION', '30m');
const MODE = envStr('MODE', 'e2e');
if (MODE !== 'enqueue' && MODE !== 'e2e') throw new Error(`MODE must be enqueue or e2e, got ${MODE}`);
const VUS = envInt(
  'VUS',
  vusFor(RATE, MODE === 'e2e' ? envNum('EXPECT_LATENCY_MS', 1000) / 1000 : 0.2),
);

const thresholds = MODE === 'e2e' ? e2eThresholds(RATE * seconds(DURATION)) : enqueueThresholds(RATE * seconds(DURATION));
if (MODE === 'e2e') thresholds.e2e_latency.push(`p(99)<${envNum('E2E_P99_MS', 30000)}`);

export const options = {
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      rate: Math.round(RATE * 100),
      timeUnit: '100s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: envInt('MAX_VUS', Math.max(VUS * 4, Math.ceil(RATE * (MODE === 'e2e' ? Math.min(E2E_TIMEOUT, 30) : 1)))),
      gracefulStop: MODE === 'e2e' ? `${Math.ceil(E2E_TIMEOUT) + 5}s` : '10s',
    },
  },
  thresholds,
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  if (MODE === 'e2e') enqueueAndWait();
  else enqueue();
}

export function handleSummary(data) {
  return summary(data, `soak.js (${RATE}/s for ${DURATION}, ${MODE})`);
}
