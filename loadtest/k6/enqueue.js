// enqueue.js: constant arrival rate of POST /v1/tasks. Measures the API's intake only; the
// workers drain the queue behind it (loadtest/run.sh checks that every accepted task finished).
//
// Knobs (-e NAME=value or environment):
//   BASE_URL        API base URL                                   http://127.0.0.1:8080
//   RATE            tasks per second                               20
//   DURATION        test length                                    30s
//   PROMPT_SIZE     characters per prompt                          200
//   VUS / MAX_VUS   pre-allocated / maximum VUs                    derived from RATE
//   ENQUEUE_P95_MS / ENQUEUE_P99_MS   POST latency thresholds      300 / 1000
//   MAX_FAILED_RATE allowed share of failed requests               0.01
//   SUMMARY_JSON    also write k6's summary data to this file
import { enqueue, enqueueThresholds, envInt, envNum, envStr, seconds, summary, vusFor } from './lib.js';

const RATE = envNum('RATE', 20);
const DURATION = envStr('DURATION', '30s');
const VUS = envInt('VUS', vusFor(RATE, 0.2));

export const options = {
  scenarios: {
    enqueue: {
      executor: 'constant-arrival-rate',
      rate: Math.round(RATE * 100),
      timeUnit: '100s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: envInt('MAX_VUS', VUS * 4),
    },
  },
  thresholds: enqueueThresholds(RATE * seconds(DURATION)),
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  enqueue();
}

export function handleSummary(data) {
  return summary(data, `enqueue.js (${RATE}/s for ${DURATION})`);
}
