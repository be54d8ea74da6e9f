// Shared helpers for the agentq k6 scripts: settings from __ENV, the two API calls, the
// enqueue-then-poll loop and a small text summary (k6's jslib textSummary needs the internet).
//
// Every setting is read from __ENV (`k6 run -e RATE=50 ...` or the process environment).

import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';

// ---------------------------------------------------------------------------------------------
// Settings

export function envStr(name, def) {
  const v = __ENV[name];
  return v === undefined || v === '' ? def : v;
}

export function envNum(name, def) {
  const v = __ENV[name];
  if (v === undefined || v === '') return def;
  const n = Number(v);
  if (!Number.isFinite(n)) throw new Error(`${name} must be a number, got ${JSON.stringify(v)}`);
  return n;
}

export function envInt(name, def) {
  return Math.round(envNum(name, def));
}

/** "30s", "2m", "1h30m", "500ms" or a bare number of seconds -> seconds. */
export function seconds(d) {
  if (typeof d === 'number') return d;
  const s = String(d).trim();
  if (/^\d+(\.\d+)?$/.test(s)) return Number(s);
  let total = 0;
  let matched = '';
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let m;
  while ((m = re.exec(s)) !== null) {
    const n = Number(m[1]);
    total += m[2] === 'ms' ? n / 1000 : m[2] === 's' ? n : m[2] === 'm' ? n * 60 : n * 3600;
    matched += m[0];
  }
  if (matched !== s) throw new Error(`bad duration ${JSON.stringify(d)}`);
  return total;
}

export const BASE_URL = envStr('BASE_URL', 'http://127.0.0.1:8080').replace(/\/+$/, '');
/** Characters of prompt text per task. */
export const PROMPT_SIZE = envInt('PROMPT_SIZE', 200);
/** Optional queue name (the API's default queue when empty). */
export const QUEUE = envStr('QUEUE', '');
/** e2e: how often a task is polled, and how long to wait for a final state. */
export const POLL_MS = envInt('POLL_MS', 250);
export const E2E_TIMEOUT = seconds(envStr('E2E_TIMEOUT', '60s'));
/** Threshold knobs (milliseconds, ratios). */
export const ENQUEUE_P95_MS = envNum('ENQUEUE_P95_MS', 300);
export const ENQUEUE_P99_MS = envNum('ENQUEUE_P99_MS', 1000);
export const E2E_P95_MS = envNum('E2E_P95_MS', 10000);
export const MAX_FAILED_RATE = envNum('MAX_FAILED_RATE', 0.01);
export const MIN_E2E_SUCCESS = envNum('MIN_E2E_SUCCESS', 0.99);

const HEADERS = { 'Content-Type': 'application/json' };
if (__ENV.AUTH_TOKEN) HEADERS.Authorization = `Bearer ${__ENV.AUTH_TOKEN}`;

// ---------------------------------------------------------------------------------------------
// Metrics

/** Tasks the API accepted with 202 (run.sh compares it with what Redis holds afterwards). */
export const tasksAccepted = new Counter('tasks_accepted');
/** Enqueue-to-final-state time, e2e mode only. */
export const e2eLatency = new Trend('e2e_latency', true);
/** Share of e2e tasks that ended "succeeded" within E2E_TIMEOUT. */
export const e2eSuccess = new Rate('e2e_success');
/** e2e tasks still not final when E2E_TIMEOUT ran out. */
export const e2eTimeouts = new Counter('e2e_timeouts');

export const FINAL = ['succeeded', 'failed', 'cancelled'];

// ---------------------------------------------------------------------------------------------
// Thresholds (k6 exits 99 when one is crossed)

/** Enqueue health: failed requests, POST latency, checks; and no iterations dropped for lack of VUs. */
export function enqueueThresholds(expectedIterations) {
  const t = {
    http_req_failed: [`rate<${MAX_FAILED_RATE}`],
    'http_req_duration{name:POST /v1/tasks}': [`p(95)<${ENQUEUE_P95_MS}`, `p(99)<${ENQUEUE_P99_MS}`],
    checks: ['rate>0.99'],
  };
  if (expectedIterations !== undefined) {
    // A dropped iteration is a task k6 wanted to send but had no free VU for: the API was too slow.
    const allowed = Math.max(1, Math.floor(expectedIterations * 0.01));
    t.dropped_iterations = [`count<=${allowed}`];
  }
  return t;
}

export function e2eThresholds(expectedIterations) {
  return Object.assign(enqueueThresholds(expectedIterations), {
    e2e_success: [`rate>${MIN_E2E_SUCCESS}`],
    e2e_latency: [`p(95)<${E2E_P95_MS}`],
  });
}

// ---------------------------------------------------------------------------------------------
// Requests

const WORDS = ['queue', 'worker', 'token', 'retry', 'model', 'agent', 'lease', 'drain', 'spike', 'load'];

/**
 * A prompt of `size` characters (at least 8). Ten variants only: the mock LLM counts calls per
 * distinct prompt, and unique prompts would grow that map without limit.
 */
export function makePrompt(size) {
  let s = 'Load test task: summarise.';
  let i = __ITER % WORDS.length;
  while (s.length < size) s += ' ' + WORDS[i++ % WORDS.length];
  return s.length > Math.max(size, 8) ? s.slice(0, Math.max(size, 8)) : s;
}

/** POST /v1/tasks. Returns the task id, or null when the API did not answer 202 with an id. */
export function enqueue(prompt) {
  const body = { prompt: prompt === undefined ? makePrompt(PROMPT_SIZE) : prompt };
  if (QUEUE) body.queue = QUEUE;
  const res = http.post(`${BASE_URL}/v1/tasks`, JSON.stringify(body), {
    headers: HEADERS,
    tags: { name: 'POST /v1/tasks' },
  });
  let id = null;
  if (res.status === 202) {
    try {
      id = res.json('id') || null;
    } catch (_) {
      id = null;
    }
  }
  check(res, {
    'enqueue: 202': (r) => r.status === 202,
    'enqueue: has id': () => id !== null,
  });
  if (id !== null) tasksAccepted.add(1);
  return id;
}

/** GET /v1/tasks/{id}. Returns the parsed task or null. */
export function getTask(id) {
  const res = http.get(`${BASE_URL}/v1/tasks/${encodeURIComponent(id)}`, {
    headers: HEADERS,
    tags: { name: 'GET /v1/tasks/{id}' },
  });
  if (res.status !== 200) {
    check(res, { 'poll: 200': (r) => r.status === 200 });
    return null;
  }
  try {
    return res.json();
  } catch (_) {
    return null;
  }
}

/** One e2e iteration: enqueue, poll until a final state or E2E_TIMEOUT, record latency and outcome. */
export function enqueueAndWait() {
  const start = Date.now();
  const id = enqueue();
  if (id === null) {
    e2eSuccess.add(false);
    return;
  }
  const deadline = start + E2E_TIMEOUT * 1000;
  let status = 'queued';
  while (Date.now() < deadline) {
    sleep(POLL_MS / 1000);
    const task = getTask(id);
    if (task === null) continue;
    status = task.status;
    if (FINAL.includes(status)) break;
  }
  const ok = status === 'succeeded';
  if (FINAL.includes(status)) {
    e2eLatency.add(Date.now() - start, { status });
  } else {
    e2eTimeouts.add(1);
  }
  e2eSuccess.add(ok);
  check(status, { 'e2e: succeeded': (s) => s === 'succeeded' });
}

/** VUs an arrival-rate scenario needs: rate x time one iteration takes, with headroom. */
export function vusFor(rate, iterationSeconds) {
  return Math.max(2, Math.ceil(rate * iterationSeconds * 1.5) + 2);
}

// ---------------------------------------------------------------------------------------------
// Summary

function fmtMs(v) {
  if (v === undefined || v === null) return '-';
  if (v >= 1000) return `${(v / 1000).toFixed(2)}s`;
  return `${v.toFixed(1)}ms`;
}

function trendLine(label, m) {
  if (!m || !m.values || m.values.count === 0) return null;
  const v = m.values;
  return `  ${label.padEnd(28)} avg=${fmtMs(v.avg)} p50=${fmtMs(v.med)} p90=${fmtMs(v['p(90)'])} p95=${fmtMs(v['p(95)'])} p99=${fmtMs(v['p(99)'])} max=${fmtMs(v.max)}`;
}

/**
 * handleSummary body: a short text report on stdout, and the full data as JSON to SUMMARY_JSON
 * when set (run.sh reads tasks_accepted from it).
 */
export function summary(data, title) {
  const m = data.metrics;
  const val = (name, key) => (m[name] && m[name].values ? m[name].values[key] : undefined);
  const dur = data.state.testRunDurationMs / 1000;
  const lines = [];
  lines.push('');
  lines.push(`== k6 ${title} against ${BASE_URL} (${dur.toFixed(1)}s) ==`);
  const accepted = val('tasks_accepted', 'count') || 0;
  const reqs = val('http_reqs', 'count') || 0;
  const failed = val('http_req_failed', 'rate');
  lines.push(
    `  tasks accepted (202)         ${accepted} (${(accepted / Math.max(dur, 0.001)).toFixed(1)}/s)`,
  );
  lines.push(
    `  http requests                ${reqs}, failed ${failed === undefined ? '-' : (failed * 100).toFixed(2) + '%'}`,
  );
  const dropped = val('dropped_iterations', 'count');
  if (dropped !== undefined) lines.push(`  dropped iterations           ${dropped}`);
  const vusMax = val('vus_max', 'max');
  if (vusMax !== undefined) lines.push(`  VUs (max allocated)          ${vusMax}`);
  for (const [label, name] of [
    ['POST /v1/tasks', 'http_req_duration{name:POST /v1/tasks}'],
    ['GET /v1/tasks/{id}', 'http_req_duration{name:GET /v1/tasks/{id}}'],
    ['e2e_latency', 'e2e_latency'],
  ]) {
    const l = trendLine(label, m[name]);
    if (l) lines.push(l);
  }
  const succ = val('e2e_success', 'rate');
  if (succ !== undefined) {
    lines.push(
      `  e2e_success                  ${(succ * 100).toFixed(2)}% (${val('e2e_success', 'passes')}/${
        val('e2e_success', 'passes') + val('e2e_success', 'fails')
      }), timeouts ${val('e2e_timeouts', 'count') || 0}`,
    );
  }
  const checks = val('checks', 'rate');
  if (checks !== undefined) lines.push(`  checks passed                ${(checks * 100).toFixed(2)}%`);
  lines.push('  thresholds:');
  let crossed = 0;
  for (const name of Object.keys(m).sort()) {
    const th = m[name].thresholds;
    if (!th) continue;
    for (const expr of Object.keys(th)) {
      const ok = th[expr].ok;
      if (!ok) crossed++;
      lines.push(`    ${ok ? 'ok  ' : 'FAIL'} ${name} ${expr}`);
    }
  }
  lines.push(crossed === 0 ? '  all thresholds passed' : `  ${crossed} threshold(s) crossed: k6 exits 99`);
  lines.push('');
  const out = { stdout: lines.join('\n') + '\n' };
  if (__ENV.SUMMARY_JSON) out[__ENV.SUMMARY_JSON] = JSON.stringify(data, null, 1);
  return out;
}
