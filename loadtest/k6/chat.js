// chat.js: the OpenAI-compatible front door, POST /v1/chat/completions. Each call is a task the
// api enqueues and waits for (a worker must be running): the answer is `chat.completion` JSON, or
// with "stream": true OpenAI's `chat.completion.chunk` events ending `data: [DONE]`.
// Custom metrics: chat_latency (Trend, a waited call), chat_stream_latency (Trend, a streamed call
// to its [DONE]), chat_stream_first_byte (Trend, time to the first chunk), call_ok (Rate),
// tasks_accepted (Counter of answers naming their task in x-agentq-task-id, which run.sh compares
// with the task records in Redis).
//
// Load models (one is chosen by the knobs given):
//   closed loop (default)   VUS calls in flight for DURATION: each VU sends a call, waits for its
//                           answer, sends the next
//   ITERATIONS=N            the same, but N calls in all shared by the VUS (the bench)
//   RATE=R                  open loop: R calls per second for DURATION (constant arrival rate)
//
// MODE=task makes the same load the direct way, for comparison (loadtest/bench): POST /v1/tasks
// with the same messages and model, then GET /v1/tasks/{id}/events until the stream's terminal
// event (task_latency: the two requests' time). MODE=enqueue only posts the task (no wait).
//
// Knobs (-e NAME=value or environment):
//   BASE_URL        API base URL                                   http://127.0.0.1:8080
//   VUS             calls in flight (closed loop); pre-allocated VUs with RATE   4 (RATE: derived)
//   DURATION        test length                                    30s
//   ITERATIONS      a fixed number of calls instead of DURATION    unset
//   RATE            calls per second (open loop)                   unset
//   MAX_VUS         VUs the arrival rate may grow to               derived
//   STREAM_SHARE    share of calls with "stream": true (0..1)      0
//   MODEL           the request's model                            mock-gpt
//   MODE            chat | task | enqueue                          chat
//   PROMPT_SIZE     characters per prompt                          200
//   QUEUE           X-Agentq-Queue (chat) / queue field (task)     API default
//   WAIT_TIMEOUT    k6's timeout of one request                    120s
//   CALL_P95_MS / CALL_P99_MS   latency thresholds of a call       10000 / 30000
//   MAX_FAILED_RATE allowed share of failed calls (0: none)        0.01
//   AUTH_TOKEN, SUMMARY_JSON                                       as in enqueue.js
import http from 'k6/http';
import { check } from 'k6';
import { Rate, Trend } from 'k6/metrics';
import {
  BASE_URL,
  MAX_FAILED_RATE,
  PROMPT_SIZE,
  QUEUE,
  envInt,
  envNum,
  envStr,
  makePrompt,
  seconds,
  summary,
  tasksAccepted,
  vusFor,
} from './lib.js';

const MODE = envStr('MODE', 'chat');
if (!['chat', 'task', 'enqueue'].includes(MODE)) throw new Error(`MODE must be chat, task or enqueue, got ${MODE}`);
const MODEL = envStr('MODEL', 'mock-gpt');
const STREAM_SHARE = envNum('STREAM_SHARE', 0);
if (STREAM_SHARE < 0 || STREAM_SHARE > 1) throw new Error('STREAM_SHARE must be within 0..1');
const DURATION = envStr('DURATION', '30s');
const ITERATIONS = envInt('ITERATIONS', 0);
const RATE = envNum('RATE', 0);
const WAIT_TIMEOUT = envStr('WAIT_TIMEOUT', '120s');
const CALL_P95_MS = envNum('CALL_P95_MS', 10000);
const CALL_P99_MS = envNum('CALL_P99_MS', 30000);

const chatLatency = new Trend('chat_latency', true);
const streamLatency = new Trend('chat_stream_latency', true);
const streamFirstByte = new Trend('chat_stream_first_byte', true);
const taskLatency = new Trend('task_latency', true);
const callOk = new Rate('call_ok');

const HEADERS = { 'Content-Type': 'application/json' };
if (__ENV.AUTH_TOKEN) HEADERS.Authorization = `Bearer ${__ENV.AUTH_TOKEN}`;
const CHAT_HEADERS = Object.assign({}, HEADERS);
if (QUEUE) CHAT_HEADERS['X-Agentq-Queue'] = QUEUE;

function scenario() {
  if (RATE > 0) {
    const vus = envInt('VUS', vusFor(RATE, 1));
    return {
      executor: 'constant-arrival-rate',
      rate: Math.round(RATE * 100),
      timeUnit: '100s',
      duration: DURATION,
      preAllocatedVUs: vus,
      maxVUs: envInt('MAX_VUS', Math.max(vus, Math.ceil(RATE * 30))),
      gracefulStop: `${Math.ceil(seconds(WAIT_TIMEOUT)) + 5}s`,
    };
  }
  const vus = envInt('VUS', 4);
  if (ITERATIONS > 0) {
    return {
      executor: 'shared-iterations',
      vus,
      iterations: ITERATIONS,
      maxDuration: envStr('MAX_DURATION', '10m'),
    };
  }
  return {
    executor: 'constant-vus',
    vus,
    duration: DURATION,
    gracefulStop: `${Math.ceil(seconds(WAIT_TIMEOUT)) + 5}s`,
  };
}

const thresholds = {
  http_req_failed: [`rate<=${MAX_FAILED_RATE}`],
  call_ok: [`rate>=${1 - MAX_FAILED_RATE}`],
  checks: [`rate>=${1 - MAX_FAILED_RATE}`],
};
if (MODE === 'chat' && STREAM_SHARE < 1) thresholds.chat_latency = [`p(95)<${CALL_P95_MS}`, `p(99)<${CALL_P99_MS}`];
if (MODE === 'chat' && STREAM_SHARE > 0) thresholds.chat_stream_latency = [`p(95)<${CALL_P95_MS}`, `p(99)<${CALL_P99_MS}`];
if (MODE === 'task') thresholds.task_latency = [`p(95)<${CALL_P95_MS}`, `p(99)<${CALL_P99_MS}`];
if (RATE > 0) {
  const planned = RATE * seconds(DURATION);
  thresholds.dropped_iterations = [`count<=${Math.max(1, Math.floor(planned * 0.01))}`];
}

export const options = {
  scenarios: { chat: scenario() },
  thresholds,
  summaryTrendStats: ['count', 'avg', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

function messages() {
  return [{ role: 'user', content: makePrompt(PROMPT_SIZE) }];
}

function taskIdOf(res) {
  const id = res.headers['X-Agentq-Task-Id'];
  return id === undefined || id === '' ? null : id;
}

/** The `data:` payloads of an SSE body, in order. */
function sseData(body) {
  const out = [];
  for (const line of String(body || '').split('\n')) {
    if (line.startsWith('data:')) out.push(line.slice(5).replace(/^ /, '').replace(/\r$/, ''));
  }
  return out;
}

/** One waited call: 200 and a chat.completion with the assistant's text. */
function waitedCall(body) {
  const res = http.post(`${BASE_URL}/v1/chat/completions`, JSON.stringify(body), {
    headers: CHAT_HEADERS,
    tags: { name: 'POST /v1/chat/completions' },
    timeout: WAIT_TIMEOUT,
  });
  let obj = null;
  try {
    obj = res.status === 200 ? res.json() : null;
  } catch (_) {
    obj = null;
  }
  const id = taskIdOf(res);
  const ok = check(res, {
    'chat: 200': (r) => r.status === 200,
    'chat: object is chat.completion': () => obj !== null && obj.object === 'chat.completion',
    'chat: an assistant message': () =>
      obj !== null && Array.isArray(obj.choices) && obj.choices.length === 1 && obj.choices[0].message.role === 'assistant',
    'chat: x-agentq-task-id': () => id !== null,
  });
  if (id !== null) tasksAccepted.add(1);
  if (res.status === 200) chatLatency.add(res.timings.duration);
  return ok;
}

/** One streamed call: 200, text/event-stream, chunks of one completion, the last data [DONE]. */
function streamedCall(body) {
  body.stream = true;
  const res = http.post(`${BASE_URL}/v1/chat/completions`, JSON.stringify(body), {
    headers: CHAT_HEADERS,
    tags: { name: 'POST /v1/chat/completions (stream)' },
    timeout: WAIT_TIMEOUT,
  });
  const data = res.status === 200 ? sseData(res.body) : [];
  let chunksOk = data.length >= 2;
  let text = '';
  for (const d of data.slice(0, -1)) {
    let c = null;
    try {
      c = JSON.parse(d);
    } catch (_) {
      c = null;
    }
    if (c === null || c.object !== 'chat.completion.chunk') {
      chunksOk = false; // an error object ends a failed stream
      break;
    }
    if (c.choices && c.choices.length && c.choices[0].delta && c.choices[0].delta.content) text += c.choices[0].delta.content;
  }
  const id = taskIdOf(res);
  const ok = check(res, {
    'chat stream: 200': (r) => r.status === 200,
    'chat stream: text/event-stream': (r) => String(r.headers['Content-Type'] || '').startsWith('text/event-stream'),
    'chat stream: chat.completion.chunk events with text': () => chunksOk && text.length > 0,
    'chat stream: ends with [DONE]': () => data.length > 0 && data[data.length - 1] === '[DONE]',
    'chat stream: x-agentq-task-id': () => id !== null,
  });
  if (id !== null) tasksAccepted.add(1);
  if (res.status === 200) {
    streamLatency.add(res.timings.duration);
    streamFirstByte.add(res.timings.waiting);
  }
  return ok;
}

/** The direct way: POST /v1/tasks, then the task's event stream until its terminal event. */
function taskCall(wait) {
  const body = { messages: messages(), model: MODEL };
  if (QUEUE) body.queue = QUEUE;
  const post = http.post(`${BASE_URL}/v1/tasks`, JSON.stringify(body), {
    headers: HEADERS,
    tags: { name: 'POST /v1/tasks' },
  });
  let id = null;
  if (post.status === 202) {
    try {
      id = post.json('id') || null;
    } catch (_) {
      id = null;
    }
  }
  const accepted = check(post, { 'task: 202 with an id': (r) => r.status === 202 && id !== null });
  if (id !== null) tasksAccepted.add(1);
  if (!accepted || !wait) return accepted;
  const res = http.get(`${BASE_URL}/v1/tasks/${encodeURIComponent(id)}/events`, {
    headers: HEADERS,
    tags: { name: 'GET /v1/tasks/{id}/events' },
    timeout: WAIT_TIMEOUT,
  });
  // the stream ends after its terminal event: `event: done` with the result
  let done = null;
  if (res.status === 200) {
    const blocks = String(res.body || '').split('\n\n').filter((b) => b.trim() !== '');
    const last = blocks.length ? blocks[blocks.length - 1] : '';
    if (/^event: ?done$/m.test(last)) {
      try {
        done = JSON.parse(sseData(last).join('\n'));
      } catch (_) {
        done = null;
      }
    }
  }
  const ok = check(res, {
    'task events: 200': (r) => r.status === 200,
    'task events: end with done and its result': () =>
      done !== null && done.result !== undefined && typeof done.result.content === 'string',
  });
  if (res.status === 200) taskLatency.add(post.timings.duration + res.timings.duration);
  return ok;
}

export default function () {
  let ok;
  if (MODE === 'task' || MODE === 'enqueue') {
    ok = taskCall(MODE === 'task');
  } else {
    const body = { model: MODEL, messages: messages() };
    ok = STREAM_SHARE > 0 && Math.random() < STREAM_SHARE ? streamedCall(body) : waitedCall(body);
  }
  callOk.add(ok);
}

export function handleSummary(data) {
  const what =
    RATE > 0 ? `${RATE}/s for ${DURATION}` : ITERATIONS > 0 ? `${ITERATIONS} calls, ${envInt('VUS', 4)} VUs` : `${envInt('VUS', 4)} VUs for ${DURATION}`;
  const title = `chat.js (${MODE}${MODE === 'chat' ? `, stream share ${STREAM_SHARE}` : ''}, ${what})`;
  const out = summary(data, title);
  const m = data.metrics;
  const fmt = (v) => (v >= 1000 ? `${(v / 1000).toFixed(2)}s` : `${v.toFixed(1)}ms`);
  const lines = [];
  for (const [label, name] of [
    ['chat (waited)', 'chat_latency'],
    ['chat (stream, to [DONE])', 'chat_stream_latency'],
    ['chat (stream, first byte)', 'chat_stream_first_byte'],
    ['task (POST + events)', 'task_latency'],
  ]) {
    const t = m[name];
    if (!t || !t.values || !t.values.count) continue;
    const v = t.values;
    lines.push(
      `  ${label.padEnd(28)} n=${v.count} avg=${fmt(v.avg)} p50=${fmt(v.med)} p95=${fmt(v['p(95)'])} p99=${fmt(v['p(99)'])} max=${fmt(v.max)}`,
    );
  }
  const ok = m.call_ok && m.call_ok.values;
  if (ok) lines.push(`  calls ok                     ${ok.passes}/${ok.passes + ok.fails}`);
  out.stdout = out.stdout
    .replace('tasks accepted (202)', MODE === 'chat' ? 'tasks with an id    ' : 'tasks accepted (202)')
    .replace('  thresholds:\n', `${lines.join('\n')}\n  thresholds:\n`);
  return out;
}
