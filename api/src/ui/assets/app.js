// agentq web console (README "Web console"). One module, no framework, no build step.
//
// Rules this file keeps:
// - Everything shown comes from the public /v1 API with the user's token, so the console can do
//   nothing the token may not. The token lives in sessionStorage (this tab, this session) and
//   goes out only as an Authorization header: no cookie, so no cross-site request carries it.
// - Data is put into the page with DOM APIs and text nodes only (h() below): never innerHTML, so a
//   prompt holding <script> or "><img onerror=...> is shown as the text it is.
// - Live parts (task events, workflow events) read SSE through fetch (sse.js); counts poll.
//   Every page's timers and streams stop when the page changes (one AbortController per page).

import { readEvents } from './sse.js';

const TOKEN_KEY = 'agentq.token';
const RECENT_WF_KEY = 'agentq.workflows';
const MAX_EVENTS_SHOWN = 300;

const $ = (sel) => document.querySelector(sel);
const state = { authOff: false, queues: [], defaultQueue: 'default', page: null };

// ---- DOM helpers: strings become text nodes, attributes are set one by one ----

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  add(el, kids);
  return el;
}

function s(tag, attrs, ...kids) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  setAttrs(el, attrs);
  add(el, kids);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.setAttribute('class', v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
}

function add(el, kids) {
  for (const k of kids.flat(Infinity)) {
    if (k === null || k === undefined || k === false) continue;
    el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
}

// append / replace the children: null, undefined and false are skipped, arrays flattened (the DOM's
// own append would turn them into the text "null")
const app = (el, ...kids) => add(el, kids);
function put(el, ...kids) {
  el.replaceChildren();
  add(el, kids);
}

// A link to one of the console's own pages: the parts are encoded, so no data makes a URL.
const route = (...parts) => '#/' + parts.map((p) => encodeURIComponent(p)).join('/');
const link = (text, ...parts) => h('a', { href: route(...parts) }, text);
const query = (page, params) => {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v) q.set(k, v);
  const qs = q.toString();
  return '#/' + page + (qs ? '?' + qs : '');
};

const clip = (t, n) => (t.length > n ? t.slice(0, n - 1) + '…' : t);
const dash = (v) => (v === null || v === undefined || v === '' ? '—' : v);
const num = (v) => (typeof v === 'number' ? v.toLocaleString('en-US') : dash(v));
const usd = (v) => (typeof v === 'number' ? '$' + (v < 0.01 && v > 0 ? v.toPrecision(3) : v.toFixed(4)) : '—');
const when = (t) => (t ? new Date(t).toLocaleString() : '—');

const SYMBOL = {
  queued: '○', blocked: '⏸', running: '▶', retrying: '↻', requires_action: '?',
  succeeded: '✓', failed: '✗', cancelled: '⊘', skipped: '↷',
};
const FINAL = new Set(['succeeded', 'failed', 'cancelled', 'skipped']);

// A status is a word and a symbol; the colour class only repeats it.
function badge(status) {
  return h('span', { class: `badge s-${status}`, 'data-status': status }, `${SYMBOL[status] || '•'} ${status}`);
}

function notice(text, kind = '') {
  return h('p', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, text);
}

function table(headers, rows, opts = {}) {
  return h('div', { class: 'table-wrap' },
    h('table', opts,
      h('thead', {}, h('tr', {}, headers.map((c) =>
        typeof c === 'string' ? h('th', { scope: 'col' }, c) : h('th', { scope: 'col', class: c.cls }, c.text)))),
      h('tbody', {}, rows)));
}

function setLive(text) {
  $('#live').textContent = text;
}

// ---- API ----

class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

const token = () => sessionStorage.getItem(TOKEN_KEY);
const authHeaders = () => (token() ? { Authorization: 'Bearer ' + token() } : {});

async function api(path, { method = 'GET', body, signal } = {}) {
  const headers = authHeaders();
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, {
    method, headers, signal, cache: 'no-store', credentials: 'omit',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON: shown as text below */ }
  if (r.status === 401 && !state.authOff) {
    signOut('The api refused the token (401). Sign in again.');
    throw new ApiError(401, 'unauthorized');
  }
  if (!r.ok) {
    const e = data && data.error;
    const msg = (e && e.message) || text || r.statusText;
    throw new ApiError(r.status, `${r.status}: ${msg}${e && e.field ? ` (field ${e.field})` : ''}`, e && e.field);
  }
  return data;
}

// Runs fn now and then every ms until the page changes; a failed round shows its error and the
// next round tries again.
async function every(ms, fn, signal, onError) {
  while (!signal.aborted) {
    try {
      await fn();
    } catch (e) {
      if (signal.aborted) return;
      if (onError) onError(e);
    }
    await new Promise((res) => {
      const t = setTimeout(res, ms);
      signal.addEventListener('abort', () => { clearTimeout(t); res(); }, { once: true });
    });
  }
}

// The confirm step of every destructive button: a modal dialog, answered true or false.
function confirmDialog(text) {
  const dlg = $('#confirm');
  $('#confirm-text').textContent = text;
  return new Promise((res) => {
    dlg.addEventListener('close', () => res(dlg.returnValue === 'ok'), { once: true });
    dlg.returnValue = '';
    dlg.showModal();
  });
}

// ---- sign in / out ----

async function probe(t) {
  const r = await fetch('/v1/queues', {
    headers: t ? { Authorization: 'Bearer ' + t } : {}, cache: 'no-store', credentials: 'omit',
  });
  if (r.status === 401) return { ok: false };
  if (r.status === 429) return { ok: false, why: 'Too many failed sign-ins from this address: wait a minute.' };
  if (!r.ok) return { ok: false, why: `The api answered ${r.status}.` };
  return { ok: true, queues: await r.json() };
}

function learnQueues(q) {
  state.queues = q.queues.map((x) => x.queue);
  state.defaultQueue = q.default_queue || state.queues[0] || 'default';
}

function showLogin(message) {
  $('#view').hidden = true;
  put($('#view'));
  $('#nav').hidden = true;
  $('#logout').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = message || '';
  setLive('');
  $('#token').focus();
}

function showApp() {
  $('#login').hidden = true;
  $('#view').hidden = false;
  $('#nav').hidden = false;
  $('#logout').hidden = state.authOff;
  render();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.page) state.page.abort();
  state.page = null;
  showLogin(message);
}

async function boot() {
  $('#login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const t = $('#token').value.trim();
    $('#login-error').textContent = '';
    const p = await probe(t).catch(() => ({ ok: false, why: 'The api cannot be reached.' }));
    if (!p.ok) {
      $('#login-error').textContent = p.why || 'That token was refused.';
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, t);
    $('#token').value = '';
    learnQueues(p.queues);
    showApp();
  });
  $('#logout').addEventListener('click', () => signOut('Signed out.'));
  window.addEventListener('hashchange', () => { if (!$('#view').hidden) render(); });
  // auth off: the api answers without a token, and no login is needed
  const open = await probe(null).catch(() => ({ ok: false }));
  if (open.ok) {
    state.authOff = true;
    sessionStorage.removeItem(TOKEN_KEY);
    learnQueues(open.queues);
    return showApp();
  }
  if (token()) {
    const p = await probe(token()).catch(() => ({ ok: false }));
    if (p.ok) {
      learnQueues(p.queues);
      return showApp();
    }
    sessionStorage.removeItem(TOKEN_KEY);
  }
  showLogin();
}

// ---- router ----

const PAGES = {
  queues: pageQueues, tasks: pageTasks, task: pageTask, dead: pageDead,
  workflows: pageWorkflows, workflow: pageWorkflow, usage: pageUsage,
};
const NAV_OF = { task: 'tasks', workflow: 'workflows' };

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, qs] = raw.split('?');
  const parts = path.split('/').map((p) => { try { return decodeURIComponent(p); } catch { return p; } });
  return { page: parts[0] || 'queues', arg: parts[1], params: new URLSearchParams(qs || '') };
}

async function render() {
  if (state.page) state.page.abort();
  const ctl = new AbortController();
  state.page = ctl;
  const { page, arg, params } = parseHash();
  const fn = PAGES[page];
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.dataset.page === (NAV_OF[page] || page)) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const view = $('#view');
  put(view);
  view.dataset.page = page;
  setLive('');
  if (!fn) {
    app(view, h('h1', {}, 'Not found'), h('p', {}, 'No such page. ', link('Queues', 'queues')));
    return;
  }
  try {
    await fn(view, arg, params, ctl.signal);
  } catch (e) {
    if (!ctl.signal.aborted && !(e instanceof ApiError && e.status === 401)) app(view, notice(String(e.message || e), 'error'));
  }
}

function queueSelect(name, selected) {
  return h('select', { id: name, name },
    state.queues.map((q) => h('option', { value: q, selected: q === selected }, q)));
}

// ---- queues ----

async function pageQueues(view, _arg, _params, signal) {
  app(view, h('h1', {}, 'Queues'));
  const queues = h('div', { id: 'queues' });
  const ups = h('div', { id: 'upstreams' });
  const err = h('div');
  app(view, err, queues, h('h2', {}, 'Upstreams and the flow limiter'), ups);
  await every(2000, async () => {
    // the last minute's LLM calls and spend per queue come from the usage report (a tenant's
    // token: its own calls), the queue's counts from GET /v1/queues
    const [q, u, use] = await Promise.all([
      api('/v1/queues', { signal }),
      api('/v1/upstreams', { signal }).catch((e) => e),
      api('/v1/usage?group_by=queue&window=1m', { signal }).catch((e) => e),
    ]);
    learnQueues(q);
    const perQueue = new Map((use instanceof Error ? [] : use.groups).map((g) => [g.key, g]));
    put(queues, ...q.queues.map((x) => queueCard(x, perQueue.get(x.queue))));
    put(ups, u instanceof Error ? notice(u.message, 'error') : upstreamTable(u.upstreams));
    put(err);
    setLive(`live · updated ${new Date().toLocaleTimeString()}`);
  }, signal, (e) => put(err, notice(e.message, 'error')));
}

function queueCard(q, used) {
  const stat = (k, v, href) => h('div', { class: 'stat', 'data-stat': k },
    h('div', { class: 'n' }, href ? h('a', { href }, num(v)) : num(v)), h('div', { class: 'k' }, k));
  return h('section', { class: 'card', 'data-queue': q.queue },
    h('h2', {}, 'Queue ', h('span', { class: 'mono' }, q.queue), ' ',
      h('a', { href: query('tasks', { queue: q.queue }), class: 'muted' }, '(tasks)')),
    h('div', { class: 'grid' },
      stat('pending', q.pending, query('tasks', { queue: q.queue, status: 'queued' })),
      stat('in flight', q.inflight, query('tasks', { queue: q.queue, status: 'running' })),
      stat('retrying', q.retrying, query('tasks', { queue: q.queue, status: 'retrying' })),
      stat('throttled', q.throttled),
      stat('waiting for tools', q.requires_action),
      stat('dead', q.dead, query('dead', { queue: q.queue })),
      stat('workers', q.workers),
      stat('created / min', q.created_last_minute),
      stat('LLM calls / min', used ? used.calls : 0),
      stat('spend / min', usd(used ? used.cost_usd : 0))));
}

function upstreamTable(ups) {
  if (!ups || !ups.length) return notice('No upstreams configured.');
  const lim = (l) => (l ? `${dash(l.rpm)} rpm · ${dash(l.tpm)} tpm · ${dash(l.concurrency)} conc.` : '—');
  const use = (u) => (u ? `${num(u.requests)} req · ${num(u.tokens)} tok · ${num(u.concurrency)} in flight` : '—');
  const rows = [];
  for (const u of ups) {
    rows.push(h('tr', {},
      h('td', {}, h('strong', {}, u.name), u.implicit ? h('span', { class: 'muted' }, ' (implicit)') : null,
        h('div', { class: 'muted id' }, dash(u.base_url))),
      h('td', {}, 'upstream'), h('td', {}, lim(u.limits)), h('td', {}, use(u.usage)),
      h('td', {}, u.blocked_until ? `blocked until ${when(u.blocked_until)}` : 'open')));
    for (const m of u.model_states || []) {
      const learned = m.learned && (m.learned.rpm || m.learned.tpm)
        ? ` (learned ${dash(m.learned.rpm)} rpm / ${dash(m.learned.tpm)} tpm)` : '';
      rows.push(h('tr', {},
        h('td', {}, ''), h('td', { class: 'mono' }, m.model), h('td', {}, lim(m.limits) + learned),
        h('td', {}, use(m.usage)), h('td', {}, m.blocked_until ? `blocked until ${when(m.blocked_until)}` : 'open')));
    }
  }
  return table(['upstream', 'model', 'limits', 'this minute', 'state'], rows);
}

// ---- tasks ----

async function pageTasks(view, _arg, params, signal) {
  const queue = params.get('queue') || state.defaultQueue;
  const status = params.get('status') || '';
  const agent = params.get('agent') || '';
  app(view, h('h1', {}, 'Tasks'));
  const form = h('form', { class: 'filters', id: 'task-search' },
    h('div', {}, h('label', { for: 'f-id' }, 'Task id'),
      h('input', { id: 'f-id', name: 'id', placeholder: 'default.0193…', size: 30, spellcheck: 'false' })),
    h('div', {}, h('label', { for: 'f-queue' }, 'Queue'), queueSelect('f-queue', queue)),
    h('div', {}, h('label', { for: 'f-status' }, 'Status'),
      h('select', { id: 'f-status', name: 'status' },
        ['', 'queued', 'running', 'retrying', 'requires_action', 'succeeded', 'failed', 'cancelled']
          .map((st) => h('option', { value: st, selected: st === status }, st || 'any')))),
    h('div', {}, h('label', { for: 'f-agent' }, 'Agent'),
      h('input', { id: 'f-agent', name: 'agent', value: agent, spellcheck: 'false' })),
    h('button', { type: 'submit' }, 'Search'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const id = $('#f-id').value.trim();
    if (id) { location.hash = route('task', id); return; }
    location.hash = query('tasks', { queue: $('#f-queue').value, status: $('#f-status').value, agent: $('#f-agent').value.trim() });
  });
  const err = h('div');
  const body = h('tbody', { id: 'task-rows' });
  const more = h('button', { type: 'button', class: 'quiet', hidden: true }, 'Older tasks');
  app(view, form, err,
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'task'), h('th', {}, 'status'), h('th', {}, 'agent'),
        h('th', { class: 'hide-narrow' }, 'tenant'), h('th', { class: 'num hide-narrow' }, 'attempts'),
        h('th', { class: 'hide-narrow' }, 'created'), h('th', { class: 'hide-narrow' }, 'error'))),
      body)),
    h('p', {}, more));
  const row = (t) => h('tr', { 'data-id': t.id },
    h('td', { class: 'id' }, link(t.id, 'task', t.id)), h('td', {}, badge(t.status)),
    h('td', { class: 'mono' }, dash(t.agent_id)), h('td', { class: 'hide-narrow' }, dash(t.tenant)),
    h('td', { class: 'num hide-narrow' }, `${t.attempts}/${t.max_attempts}`),
    h('td', { class: 'hide-narrow' }, when(t.created_at)),
    h('td', { class: 'err hide-narrow', title: t.error || null }, t.error ? clip(t.error, 140) : '—'));
  const url = (cursor) => '/v1/tasks?' + new URLSearchParams(Object.entries({
    queue, status, agent, limit: '50', cursor: cursor || '',
  }).filter(([, v]) => v)).toString();
  let cursor = null;
  let paged = false;
  more.addEventListener('click', async () => {
    paged = true;
    const page = await api(url(cursor), { signal }).catch((e) => { put(err, notice(e.message, 'error')); return null; });
    if (!page) return;
    app(body, ...page.tasks.map(row));
    cursor = page.next_cursor;
    more.hidden = !cursor;
  });
  // the first page refreshes itself until the user pages further back
  await every(3000, async () => {
    if (paged) return;
    const page = await api(url(null), { signal });
    put(body, ...page.tasks.map(row));
    if (!page.tasks.length) app(body, h('tr', {}, h('td', { colspan: 7, class: 'muted' },
      page.next_cursor ? 'None among the newest tasks looked at: try older ones.' : 'No tasks match.')));
    cursor = page.next_cursor;
    more.hidden = !cursor;
    put(err);
    setLive(`live · updated ${new Date().toLocaleTimeString()}`);
  }, signal, (e) => put(err, notice(e.message, 'error')));
}

// ---- one task, and its live view ----

function contentText(content) {
  if (content === null || content === undefined) return '';
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content.map((p) => (p.type === 'text' ? p.text : p.type === 'image_url'
      ? `[image: ${p.image_url && p.image_url.url ? String(p.image_url.url).slice(0, 120) : ''}]` : `[${p.type}]`)).join('\n');
  }
  return JSON.stringify(content);
}

function messageView(m) {
  const calls = (m.tool_calls || []).map((c) => h('div', { class: 'tool-call' },
    h('span', { class: 'muted' }, 'tool call '), h('code', {}, c.function ? c.function.name : c.type),
    h('pre', { class: 'text' }, c.function ? c.function.arguments : JSON.stringify(c))));
  const text = contentText(m.content);
  return h('div', { class: 'msg' },
    h('div', { class: 'role' }, m.role, m.tool_call_id ? ` · result of ${m.tool_call_id}` : ''),
    text ? h('pre', { class: 'text' }, text) : null, calls);
}

async function pageTask(view, id, _params, signal) {
  if (!id) { location.hash = '#/tasks'; return; }
  app(view, h('h1', {}, 'Task ', h('span', { class: 'id', id: 'task-id' }, id)));
  const actions = h('div', { class: 'row' });
  const msg = h('div');
  const record = h('div', { id: 'record' });
  const liveText = h('pre', { class: 'text', id: 'live-text', 'aria-live': 'off' });
  const liveState = h('span', { id: 'live-state', class: 'muted' }, 'connecting…');
  const events = h('ol', { class: 'events', id: 'events' });
  const transcript = h('div', { id: 'transcript' });
  const input = h('div', { id: 'task-input' });
  app(view, actions, msg, record,
    h('section', { class: 'card', id: 'live-view' }, h('h2', {}, 'Live ', liveState),
      h('p', { class: 'muted' }, 'The answer as it streams (the current attempt and step):'), liveText,
      h('details', {}, h('summary', {}, 'Events'), events)),
    h('section', { class: 'card' }, h('h2', {}, 'Transcript'), transcript));

  let task = null;
  const load = async () => {
    task = await api(`/v1/tasks/${encodeURIComponent(id)}?include=steps,input`, { signal });
    drawRecord(task);
  };
  const drawRecord = (t) => {
    put(actions, 
      FINAL.has(t.status) ? null : h('button', { type: 'button', class: 'danger', id: 'cancel', onclick: cancel }, 'Cancel task'),
      t.workflow ? h('a', { href: route('workflow', t.workflow.workflow_id) }, `Workflow ${t.workflow.workflow_id} (node ${t.workflow.node})`) : null,
      t.status === 'failed' ? h('a', { href: query('dead', { queue: t.queue }) }, 'Dead letters of this queue') : null);
    const u = t.usage;
    put(record, h('section', { class: 'card' }, h('dl', { class: 'kv' },
      h('dt', {}, 'status'), h('dd', { id: 'task-status' }, badge(t.status)),
      h('dt', {}, 'queue'), h('dd', { class: 'mono' }, t.queue),
      h('dt', {}, 'agent'), h('dd', { class: 'mono' }, dash(t.agent_id)),
      h('dt', {}, 'tenant'), h('dd', {}, dash(t.tenant)),
      h('dt', {}, 'attempts'), h('dd', {}, `${t.attempts} of ${t.max_attempts}`,
        t.rate_limited ? ` · ${t.rate_limited} rate-limited` : '', t.throttled ? ` · throttled ${t.throttled}×` : ''),
      h('dt', {}, 'created'), h('dd', {}, when(t.created_at)),
      h('dt', {}, 'started'), h('dd', {}, when(t.started_at)),
      h('dt', {}, 'finished'), h('dd', {}, when(t.finished_at)),
      h('dt', {}, 'usage'), h('dd', { id: 'task-usage' }, u
        ? `${num(u.prompt_tokens)} prompt + ${num(u.completion_tokens)} completion tokens in ${num(u.calls)} call(s)` : '—'),
      h('dt', {}, 'cost'), h('dd', {}, usd(t.cost)),
      t.result ? [h('dt', {}, 'model'), h('dd', { class: 'mono' }, dash(t.result.model), t.result.upstream ? ` via ${t.result.upstream}` : '')] : null,
      t.metadata ? [h('dt', {}, 'metadata'), h('dd', {}, h('pre', { class: 'text', id: 'task-metadata' }, JSON.stringify(t.metadata, null, 1)))] : null)),
    h('section', { class: 'card' }, h('h2', {}, 'Input'), input),
    t.error ? h('section', { class: 'card' }, h('h2', {}, 'Error', t.error_code ? ` (${t.error_code})` : ''),
      h('pre', { class: 'text error', id: 'task-error' }, t.error)) : null,
    t.result ? h('section', { class: 'card' }, h('h2', {}, 'Result'),
      h('pre', { class: 'text', id: 'task-result' }, t.result.content || (t.result.refusal ? `refusal: ${t.result.refusal}` : ''))) : null,
    t.required_action ? h('section', { class: 'card' }, h('h2', {}, 'Waiting for tool outputs'),
      h('pre', { class: 'text' }, JSON.stringify(t.required_action.submit_tool_outputs.tool_calls, null, 1))) : null);
    // what was asked: the request's messages (a body's prompt and system became messages)
    const asked = (t.input && Array.isArray(t.input.messages)) ? t.input.messages : [];
    put(input, ...(asked.length ? asked.map(messageView) : [h('p', { class: 'muted' }, 'No input recorded.')]));
    const msgs = t.transcript || [];
    put(transcript, ...(msgs.length ? msgs.map(messageView) : [h('p', { class: 'muted' }, 'No steps recorded yet.')]));
  };
  const cancel = async () => {
    if (!(await confirmDialog(`Cancel task ${id}? A running call is aborted.`))) return;
    try {
      await api(`/v1/tasks/${encodeURIComponent(id)}`, { method: 'DELETE', signal });
      put(msg, notice('Task cancelled.'));
    } catch (e) {
      put(msg, notice(e.message, 'error'));
    }
    await load().catch(() => {});
  };
  await load();
  setLive('live');

  // the live view: the rule of README "Streaming": the answer is the delta text after the last
  // attempt_started, of the last step
  let step = null;
  let refresh = null;
  const later = () => { clearTimeout(refresh); refresh = setTimeout(() => load().catch(() => {}), 300); };
  const logEvent = (ev) => {
    app(events, h('li', {}, h('code', {}, ev.event), ' ', ev.data.length > 300 ? ev.data.slice(0, 300) + '…' : ev.data));
    while (events.childElementCount > MAX_EVENTS_SHOWN) events.firstElementChild.remove();
  };
  const ended = await readEvents(`/v1/tasks/${encodeURIComponent(id)}/events`, {
    headers: authHeaders,
    signal,
    onState: (st) => { liveState.textContent = st === 'open' ? '· streaming' : st === 'retry' ? '· reconnecting…' : '· ended'; },
    on: (ev) => {
      logEvent(ev);
      let d = {};
      try { d = JSON.parse(ev.data); } catch { return; }
      if (ev.event === 'attempt_started') { liveText.textContent = ''; step = null; }
      if (ev.event === 'delta') {
        if (step !== null && d.step !== step) liveText.textContent = '';
        step = d.step;
        app(liveText, document.createTextNode(d.text || ''));
      }
      if (ev.event === 'status' && d.status) {
        const st = $('#task-status');
        if (st) put(st, badge(d.status));
        if (d.status !== 'running') later();
      }
      if (ev.event === 'usage') {
        const el = $('#task-usage');
        if (el) el.textContent = `${num(d.prompt_tokens)} prompt + ${num(d.completion_tokens)} completion tokens in ${num(d.calls)} call(s) · ${usd(d.cost_usd)}`;
      }
      if (ev.event === 'done' || ev.event === 'error') later();
    },
  });
  if (ended === 'auth') signOut('The api refused the token (401). Sign in again.');
  if (ended === 'gone') liveState.textContent = '· no event stream (expired)';
}

// ---- dead letters ----

async function pageDead(view, _arg, params, signal) {
  const queue = params.get('queue') || state.defaultQueue;
  app(view, h('h1', {}, 'Dead letters'));
  const pick = queueSelect('d-queue', queue);
  pick.addEventListener('change', () => { location.hash = query('dead', { queue: pick.value }); });
  const selected = new Set();
  const count = h('span', { id: 'selected-count' }, '0');
  const redriveSel = h('button', { type: 'button', id: 'redrive-selected', disabled: true }, 'Redrive selected (', count, ')');
  const redriveAll = h('button', { type: 'button', id: 'redrive-all', class: 'quiet' }, 'Redrive all listed');
  const msg = h('div', { id: 'dead-msg' });
  const body = h('tbody', { id: 'dead-rows' });
  const all = h('input', { type: 'checkbox', id: 'select-all', 'aria-label': 'select every listed task' });
  app(view, h('div', { class: 'row' }, h('div', {}, h('label', { for: 'd-queue' }, 'Queue'), pick), redriveSel, redriveAll), msg,
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, all), h('th', {}, 'task'), h('th', { class: 'hide-narrow' }, 'died'),
        h('th', { class: 'num hide-narrow' }, 'attempts'), h('th', { class: 'hide-narrow' }, 'error'))), body)));
  let listed = [];
  const sync = () => {
    for (const id of [...selected]) if (!listed.includes(id)) selected.delete(id);
    count.textContent = String(selected.size);
    redriveSel.disabled = selected.size === 0;
    redriveAll.disabled = listed.length === 0;
    all.checked = listed.length > 0 && selected.size === listed.length;
  };
  all.addEventListener('change', () => {
    for (const id of listed) if (all.checked) selected.add(id); else selected.delete(id);
    for (const cb of body.querySelectorAll('input[type=checkbox]')) cb.checked = all.checked;
    sync();
  });
  const load = async () => {
    const d = await api(`/v1/queues/${encodeURIComponent(queue)}/dead?limit=200`, { signal });
    listed = d.tasks.map((t) => t.id);
    put(body, ...d.tasks.map((t) => {
      const cb = h('input', { type: 'checkbox', 'aria-label': `select ${t.id}`, checked: selected.has(t.id) });
      cb.addEventListener('change', () => { if (cb.checked) selected.add(t.id); else selected.delete(t.id); sync(); });
      // on a phone the error goes under the id (its own column is hidden)
      return h('tr', { 'data-id': t.id }, h('td', {}, cb),
        h('td', { class: 'id' }, link(t.id, 'task', t.id),
          h('div', { class: 'show-narrow muted' }, `${num(t.attempts)} attempt(s) · ${t.error ? clip(t.error, 120) : 'no error'}`)),
        h('td', { class: 'hide-narrow' }, when(t.died_at)), h('td', { class: 'num hide-narrow' }, num(t.attempts)),
        h('td', { class: 'err hide-narrow', title: t.error || null }, t.error ? clip(t.error, 200) : '—'));
    }));
    if (!d.tasks.length) app(body, h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No dead letters in this queue.')));
    sync();
    setLive(`live · updated ${new Date().toLocaleTimeString()}`);
  };
  const redrive = async (ids) => {
    const n = ids.length;
    if (!(await confirmDialog(`Redrive ${n} dead task${n === 1 ? '' : 's'}? They go back to pending with fresh attempts.`))) return;
    try {
      const r = await api(`/v1/queues/${encodeURIComponent(queue)}/dead/redrive`, { method: 'POST', body: { ids }, signal });
      put(msg, notice(`Redriven: ${r.redriven}. Dropped (record gone): ${r.dropped}.`));
      selected.clear();
    } catch (e) {
      put(msg, notice(e.message, 'error'));
    }
    await load().catch(() => {});
  };
  redriveSel.addEventListener('click', () => redrive([...selected]));
  redriveAll.addEventListener('click', () => redrive([...listed]));
  await every(4000, load, signal, (e) => put(msg, notice(e.message, 'error')));
}

// ---- workflows ----

function rememberWorkflow(id) {
  let list = [];
  try { list = JSON.parse(sessionStorage.getItem(RECENT_WF_KEY) || '[]'); } catch { list = []; }
  list = [id, ...list.filter((x) => x !== id)].slice(0, 20);
  sessionStorage.setItem(RECENT_WF_KEY, JSON.stringify(list));
}

async function pageWorkflows(view) {
  app(view, h('h1', {}, 'Workflows'));
  const form = h('form', { class: 'filters', id: 'wf-open' },
    h('div', {}, h('label', { for: 'wf-id' }, 'Workflow id'), h('input', { id: 'wf-id', size: 40, spellcheck: 'false', required: true })),
    h('button', { type: 'submit' }, 'Open'));
  form.addEventListener('submit', (ev) => { ev.preventDefault(); location.hash = route('workflow', $('#wf-id').value.trim()); });
  let list = [];
  try { list = JSON.parse(sessionStorage.getItem(RECENT_WF_KEY) || '[]'); } catch { list = []; }
  app(view, form, h('p', { class: 'muted' }, 'A task that belongs to a workflow links to it too.'),
    list.length ? [h('h2', {}, 'Opened in this tab'), h('ul', {}, list.map((id) => h('li', { class: 'id' }, link(id, 'workflow', id))))] : null);
}

// Layered layout: a node's layer is one more than its deepest parent's (depends_on, and the plan
// that spawned it), so every edge points down.
function layout(nodes) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const parents = (n) => [...(n.depends_on || []), ...(n.spawned_by ? [n.spawned_by] : [])].filter((p) => byId.has(p));
  const depth = new Map();
  const visit = (n, seen) => {
    if (depth.has(n.id)) return depth.get(n.id);
    if (seen.has(n.id)) return 0; // a cycle cannot be stored, but never loop on one
    seen.add(n.id);
    const d = Math.max(-1, ...parents(n).map((p) => visit(byId.get(p), seen))) + 1;
    depth.set(n.id, d);
    return d;
  };
  for (const n of nodes) visit(n, new Set());
  const layers = [];
  for (const n of nodes) (layers[depth.get(n.id)] ||= []).push(n);
  return { layers, parents };
}

function graphSvg(wf) {
  const W = 170, H = 62, GX = 24, GY = 46, PAD = 12;
  const { layers, parents } = layout(wf.nodes);
  const widest = Math.max(1, ...layers.map((l) => l.length));
  const width = PAD * 2 + widest * W + (widest - 1) * GX;
  const height = PAD * 2 + layers.length * H + (layers.length - 1) * GY;
  const pos = new Map();
  layers.forEach((layer, d) => {
    const row = layer.length * W + (layer.length - 1) * GX;
    const x0 = (width - row) / 2;
    layer.forEach((n, i) => pos.set(n.id, { x: x0 + i * (W + GX), y: PAD + d * (H + GY) }));
  });
  const edges = [];
  for (const n of wf.nodes) {
    const b = pos.get(n.id);
    for (const p of parents(n)) {
      const a = pos.get(p);
      const x1 = a.x + W / 2, y1 = a.y + H, x2 = b.x + W / 2, y2 = b.y;
      const my = (y1 + y2) / 2;
      edges.push(s('path', { class: 'edge', d: `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2 - 6}`, 'marker-end': 'url(#arrow)' }));
    }
  }
  const boxes = wf.nodes.map((n) => {
    const { x, y } = pos.get(n.id);
    const cls = `node s-${n.status}${n.status === 'blocked' || n.kind === 'plan' ? ' dashed' : ''}`;
    const inner = [
      s('title', {}, `${n.id}: ${n.status}${n.error ? ' — ' + n.error : ''}`),
      s('rect', { x, y, width: W, height: H, rx: 8 }),
      s('text', { x: x + 10, y: y + 18, 'font-weight': 600 }, clip(n.id + (n.kind === 'plan' ? ' (plan)' : ''), 22)),
      s('text', { x: x + 10, y: y + 36 }, `${SYMBOL[n.status] || '•'} ${n.status}`),
      s('text', { x: x + 10, y: y + 53 }, n.cost ? usd(n.cost) : FINAL.has(n.status) ? 'no cost' : 'no cost yet'),
    ];
    const g = n.task_id
      ? s('a', { href: route('task', n.task_id), class: cls, 'data-node': n.id, 'aria-label': `node ${n.id}, ${n.status}: open its task` }, inner)
      : s('g', { class: cls, 'data-node': n.id }, inner);
    return g;
  });
  return s('svg', { class: 'graph', id: 'wf-graph', viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': `workflow graph, ${wf.nodes.length} nodes`, width },
  s('defs', {}, s('marker', { id: 'arrow', viewBox: '0 0 10 10', refX: 5, refY: 5, markerWidth: 6, markerHeight: 6, orient: 'auto-start-reverse' },
    s('path', { d: 'M 0 0 L 10 5 L 0 10 z', fill: 'currentColor' }))),
  edges, boxes);
}

async function pageWorkflow(view, id, _params, signal) {
  if (!id) { location.hash = '#/workflows'; return; }
  rememberWorkflow(id);
  app(view, h('h1', {}, 'Workflow ', h('span', { class: 'id' }, id)));
  const head = h('div');
  const graph = h('div', { id: 'graph' });
  const nodes = h('div');
  const msg = h('div');
  app(view, msg, head, graph, h('h2', {}, 'Nodes'), nodes);
  const cancel = async () => {
    if (!(await confirmDialog(`Cancel workflow ${id}? Every node not final is cancelled.`))) return;
    try {
      await api(`/v1/workflows/${encodeURIComponent(id)}`, { method: 'DELETE', signal });
      put(msg, notice('Workflow cancelled.'));
    } catch (e) { put(msg, notice(e.message, 'error')); }
    await load().catch(() => {});
  };
  const load = async () => {
    const wf = await api(`/v1/workflows/${encodeURIComponent(id)}`, { signal });
    put(head, h('section', { class: 'card' }, h('dl', { class: 'kv' },
      h('dt', {}, 'status'), h('dd', { id: 'wf-status' }, badge(wf.status)),
      h('dt', {}, 'queue'), h('dd', { class: 'mono' }, wf.queue),
      h('dt', {}, 'created'), h('dd', {}, when(wf.created_at)),
      h('dt', {}, 'finished'), h('dd', {}, when(wf.finished_at)),
      h('dt', {}, 'cost'), h('dd', {}, usd(wf.cost), wf.max_cost_usd ? ` of at most ${usd(wf.max_cost_usd)}` : ''),
      wf.error ? [h('dt', {}, 'error'), h('dd', { class: 'error' }, wf.error)] : null),
    wf.status === 'running' ? h('p', {}, h('button', { type: 'button', class: 'danger', onclick: cancel }, 'Cancel workflow')) : null));
    put(graph, graphSvg(wf));
    // the node's name links to its task, so the long task id can give way on a phone
    put(nodes, table(['node', 'status', { text: 'cost', cls: 'num' }, { text: 'task', cls: 'hide-narrow' }, { text: 'error', cls: 'hide-narrow' }],
      wf.nodes.map((n) => h('tr', { 'data-node': n.id },
        h('td', { class: 'mono' }, n.task_id ? link(n.id, 'task', n.task_id) : n.id, n.kind === 'plan' ? ' (plan)' : ''),
        h('td', {}, badge(n.status)), h('td', { class: 'num' }, usd(n.cost)),
        h('td', { class: 'id hide-narrow' }, dash(n.task_id)),
        h('td', { class: 'err hide-narrow', title: n.error || null }, n.error ? clip(n.error, 200) : '—')))));
  };
  await load();
  setLive('live');
  let t = null;
  const ended = await readEvents(`/v1/workflows/${encodeURIComponent(id)}/events`, {
    headers: authHeaders, signal,
    onState: (st) => setLive(st === 'open' ? 'live · streaming' : st === 'retry' ? 'reconnecting…' : 'ended'),
    on: () => { clearTimeout(t); t = setTimeout(() => load().catch(() => {}), 250); },
  });
  if (ended === 'auth') signOut('The api refused the token (401). Sign in again.');
  if (ended === 'done') setTimeout(() => load().catch(() => {}), 300);
}

// ---- usage and budgets ----

function barChart(groups) {
  const top = groups.slice(0, 12);
  const max = Math.max(...top.map((g) => g.cost_usd), 1e-12);
  const LABEL = 150, BAR = 320, ROW = 26;
  const height = Math.max(1, top.length) * ROW + 8;
  return s('svg', { class: 'chart', id: 'usage-chart', viewBox: `0 0 ${LABEL + BAR + 110} ${height}`, width: LABEL + BAR + 110, role: 'img',
    'aria-label': 'spend by group, bar chart' },
  top.map((g, i) => {
    const y = 4 + i * ROW;
    const w = Math.max(1, (g.cost_usd / max) * BAR);
    const key = g.key.length > 22 ? g.key.slice(0, 21) + '…' : g.key;
    return s('g', {}, s('title', {}, `${g.key}: ${usd(g.cost_usd)}`),
      s('text', { x: LABEL - 6, y: y + 16, 'text-anchor': 'end' }, key),
      s('rect', { class: 'bar', x: LABEL, y: y + 3, width: w, height: ROW - 8, rx: 3 }),
      s('text', { x: LABEL + w + 6, y: y + 16 }, usd(g.cost_usd)));
  }));
}

async function pageUsage(view, _arg, params, signal) {
  const groupBy = params.get('group_by') || 'agent';
  const windowV = params.get('window') || '1h';
  app(view, h('h1', {}, 'Budgets and usage'));
  const gb = h('select', { id: 'u-group' }, ['agent', 'model', 'queue', 'tenant'].map((g) => h('option', { value: g, selected: g === groupBy }, g)));
  const wn = h('select', { id: 'u-window' }, ['15m', '1h', '6h', '24h', '7d', '30d'].map((w) => h('option', { value: w, selected: w === windowV }, w)));
  const go = () => { location.hash = query('usage', { group_by: gb.value, window: wn.value }); };
  gb.addEventListener('change', go);
  wn.addEventListener('change', go);
  const total = h('p', { id: 'usage-total' });
  const chart = h('div');
  const tbl = h('div');
  const budgets = h('div', { id: 'budgets' });
  const err = h('div');
  app(view, h('div', { class: 'row' }, h('div', {}, h('label', { for: 'u-group' }, 'Spend by'), gb),
    h('div', {}, h('label', { for: 'u-window' }, 'over the last'), wn)), err, total,
  h('div', { class: 'split' }, h('section', { class: 'card' }, chart), tbl), h('h2', {}, 'Budgets'), budgets);
  await every(5000, async () => {
    const [u, b] = await Promise.all([
      api(`/v1/usage?group_by=${encodeURIComponent(groupBy)}&window=${encodeURIComponent(windowV)}`, { signal }).catch((e) => e),
      api('/v1/budgets', { signal }).catch((e) => e),
    ]);
    if (u instanceof Error) {
      put(err, notice(u.message, 'error'));
      put(total); put(chart); put(tbl);
    } else {
      put(err);
      total.textContent = `${usd(u.total_cost_usd)} spent over the last ${u.window}, by ${u.group_by}.`;
      put(chart, u.groups.length ? barChart(u.groups) : notice('No spend in this window.'));
      put(tbl, table([u.group_by, { text: 'cost', cls: 'num' }, { text: 'calls', cls: 'num' }, { text: 'prompt', cls: 'num' }, { text: 'completion', cls: 'num' }],
        u.groups.map((g) => h('tr', {}, h('td', { class: 'mono' }, g.key), h('td', { class: 'num' }, usd(g.cost_usd)),
          h('td', { class: 'num' }, num(g.calls)), h('td', { class: 'num' }, num(g.prompt_tokens)), h('td', { class: 'num' }, num(g.completion_tokens))))));
    }
    put(budgets, b instanceof Error ? notice(b.message, 'error') : !b.budgets.length ? notice('No budgets set (PUT /v1/budgets/{scope}).')
      : table(['scope', 'window', { text: 'limit', cls: 'num' }, { text: 'spent', cls: 'num' }, { text: 'reserved', cls: 'num' }, 'used'],
        b.budgets.map((x) => {
          const used = x.limit_usd > 0 ? Math.min(1, x.spent_usd / x.limit_usd) : 0;
          return h('tr', {}, h('td', { class: 'mono' }, x.scope), h('td', {}, `${x.window} ${x.mode}`),
            h('td', { class: 'num' }, usd(x.limit_usd)), h('td', { class: 'num' }, usd(x.spent_usd)), h('td', { class: 'num' }, usd(x.reserved_usd)),
            h('td', {}, h('meter', { min: 0, max: 1, value: used, title: `${Math.round(used * 100)}%` }), ` ${Math.round(used * 100)}%`));
        })));
    setLive(`live · updated ${new Date().toLocaleTimeString()}`);
  }, signal, (e) => put(err, notice(e.message, 'error')));
}

boot();
