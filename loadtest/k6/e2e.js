// e2e.js: constant arrival rate of tasks, each one enqueued and then polled until it is final.
// Custom metrics: e2e_latency (Trend, enqueue to final state), e2e_success (Rate of "succeeded").
//
// Knobs (-e NAME=value or environment):
//   BASE_URL        API base URL                                   http://127.0.0.1:8080
//   RATE            tasks per second                               10
//   DURATION        test length                                    30s
//   PROMPT_SIZE     characters per prompt                          200
//   POLL_MS         poll interval of GET /v1/tasks/{id}            250
//   E2E_TIMEOUT     give up on a task after                        60s
//   E2E_P95_MS      e2e_latency p95 threshold                      10000
//   MIN_E2E_SUCCESS e2e_success threshold                          0.99
//   EXPECT_LATENCY_MS  expected e2e time, sizes the VU pool        1000
//   VUS / MAX_VUS   pre-allocated / maximum VUs                    derived
//   ENQUEUE_P95_MS / ENQUEUE_P99_MS / MAX_FAILED_RATE / SUMMARY_JSON as in enqueue.js
import {
  E2E_TIMEOUT,
  e2eThresholds,
  enqueueAndWait,
  envInt,
  envNum,
  envStr,
  seconds,
  summary,
  vusFor,
} from './lib.js';

const RATE = envNum('RATE', 10);
const DURATION = envStr('DURATION', '30s');
const VUS = envInt('VUS', vusFor(RATE, envNum('EXPECT_LATENCY_MS', 1000) / 1000));

export const options = {
  scenarios: {
    e2e: {
      executor: 'constant-arrival-rate',
      rate: Math.round(RATE * 100),
      timeUnit: '100s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      // Enough VUs to keep arriving while tasks wait up to E2E_TIMEOUT.
      maxVUs: envInt('MAX_VUS', Math.max(VUS, Math.ceil(RATE * Math.min(E2E_TIMEOUT, 30)))),
      gracefulStop: `${Math.ceil(E2E_TIMEOUT) + 5}s`,
    },
  },
  thresholds: e2eThresholds(RATE * seconds(DURATION)),
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  enqueueAndWait();
}

export function handleSummary(data) {
  return summary(data, `e2e.js (${RATE}/s for ${DURATION})`);
}
