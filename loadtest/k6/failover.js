// failover.js: the enqueue load of issue 19's failover test (tests/tests/cluster.rs), which kills a
// Redis Cluster master while this runs. Each iteration enqueues one task and resends it with the
// same Idempotency-Key while the api answers 503 (it could not vouch for the write), up to
// RETRY_FOR; every answer is written as one JSON line to k6's console output
// (`--console-output=FILE`), so the test can check each acknowledged task afterwards.
// An iteration is never cut short (gracefulStop covers RETRY_FOR), so no 202 goes unrecorded.
//
// Knobs (-e NAME=value or environment):
//   BASE_URL     API base URL                                     http://127.0.0.1:8080
//   QUEUE        queue to enqueue on                              (the api's default)
//   VUS          concurrent clients                               4
//   DURATION     test length                                      20s
//   RETRY_FOR    how long one task is resent on 503               40s
//   PAUSE_MS     pause between a client's tasks                   10
import http from 'k6/http';
import exec from 'k6/execution';
import { sleep } from 'k6';
import { BASE_URL, QUEUE, envInt, envStr, seconds } from './lib.js';

const RETRY_FOR = seconds(envStr('RETRY_FOR', '40s'));
const PAUSE_MS = envInt('PAUSE_MS', 10);

export const options = {
  scenarios: {
    failover: {
      executor: 'constant-vus',
      vus: envInt('VUS', 4),
      duration: envStr('DURATION', '20s'),
      gracefulStop: `${RETRY_FOR + 10}s`,
    },
  },
};

function record(line) {
  console.log(JSON.stringify(line));
}

export default function () {
  const prompt = `fo-${exec.vu.idInTest}-${exec.vu.iterationInScenario}`;
  const body = { prompt };
  if (QUEUE) body.queue = QUEUE;
  const params = {
    headers: { 'Content-Type': 'application/json', 'Idempotency-Key': prompt },
    timeout: '10s',
  };
  const deadline = Date.now() + RETRY_FOR * 1000;
  for (;;) {
    const r = http.post(`${BASE_URL}/v1/tasks`, JSON.stringify(body), params);
    if (r.status === 202) {
      let id = '';
      try {
        id = r.json('id') || '';
      } catch (_) {
        // recorded with an empty id: the test treats that as a wrong answer
      }
      record({ prompt, status: 202, id, at: Date.now() });
      break;
    }
    if (r.status !== 503) {
      record({ prompt, status: r.status, body: String(r.body || r.error || '').slice(0, 300), at: Date.now() });
      break;
    }
    record({ prompt, status: 503, at: Date.now() });
    if (Date.now() >= deadline) break;
    sleep(0.1);
  }
  sleep(PAUSE_MS / 1000);
}
