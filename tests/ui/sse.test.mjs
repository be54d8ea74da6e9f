// The console's SSE parser (api/src/ui/assets/sse.js) under node: `node --test tests/ui/`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SseParser } from '../../api/src/ui/assets/sse.js';

const stream = 'event: status\ndata: {"status":"running"}\nid: 1-0\n\n'
  + ': heartbeat\n\n'
  + 'event: delta\r\ndata: {"text":"a b"}\r\nid: 2-0\r\n\r\n'
  + 'data: line1\ndata: line2\n\n'
  + 'event: done\ndata:{"status":"succeeded"}\nid: 3-0\n\n';

const want = [
  { event: 'status', data: '{"status":"running"}', id: '1-0' },
  { comment: 'heartbeat' },
  { event: 'delta', data: '{"text":"a b"}', id: '2-0' },
  { event: 'message', data: 'line1\nline2', id: null },
  { event: 'done', data: '{"status":"succeeded"}', id: '3-0' },
];

test('whole stream', () => {
  const p = new SseParser();
  assert.deepEqual(p.push(stream), want);
  assert.equal(p.lastId, '3-0');
});

test('every split point gives the same events', () => {
  for (let i = 0; i <= stream.length; i++) {
    const p = new SseParser();
    const got = [...p.push(stream.slice(0, i)), ...p.push(stream.slice(i))];
    assert.deepEqual(got, want, `split at ${i}`);
  }
});

test('one character at a time', () => {
  const p = new SseParser();
  const got = [];
  for (const c of stream) got.push(...p.push(c));
  assert.deepEqual(got, want);
});

test('an unfinished event is not dispatched, and its id is not the last one', () => {
  const p = new SseParser();
  assert.deepEqual(p.push('id: 9-0\ndata: x\n'), []);
  assert.equal(p.lastId, null);
  assert.deepEqual(p.push('\n'), [{ event: 'message', data: 'x', id: '9-0' }]);
  assert.equal(p.lastId, '9-0');
});
