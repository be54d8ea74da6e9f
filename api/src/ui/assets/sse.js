// Server-Sent Events over fetch(): EventSource cannot send an Authorization header, so the console
// reads the stream itself. SseParser turns text chunks (split anywhere, even inside a line or a
// CRLF) into events as the WHATWG spec does for the fields agentq sends: event, data, id, and
// comments (":CLOSED" is the api ending a stream early, so the reader reconnects). No DOM here:
// tests/ui/sse.test.mjs runs it under node.

export class SseParser {
  constructor() {
    this.buf = '';
    this.reset();
    this.lastId = null;
  }

  reset() {
    this.event = '';
    this.data = [];
    this.id = null;
  }

  // Feeds one chunk; returns the events it completed: {event, data, id} or {comment}.
  push(chunk) {
    this.buf += chunk;
    const out = [];
    for (;;) {
      const nl = this.buf.search(/[\r\n]/);
      if (nl < 0) break;
      // a CR at the very end may be the first half of a CRLF still on its way
      if (this.buf[nl] === '\r' && nl === this.buf.length - 1) break;
      const line = this.buf.slice(0, nl);
      const skip = this.buf[nl] === '\r' && this.buf[nl + 1] === '\n' ? 2 : 1;
      this.buf = this.buf.slice(nl + skip);
      const ev = this.line(line);
      if (ev) out.push(ev);
    }
    return out;
  }

  line(line) {
    if (line === '') {
      if (this.id !== null) this.lastId = this.id;
      const ev = this.data.length
        ? { event: this.event || 'message', data: this.data.join('\n'), id: this.id }
        : null;
      this.reset();
      return ev;
    }
    if (line.startsWith(':')) return { comment: line.slice(1).trim() };
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.event = value;
    else if (field === 'data') this.data.push(value);
    else if (field === 'id' && !value.includes('\0')) this.id = value;
    return null;
  }
}

// Reads `url` as an event stream until a terminal event (`done` or `error`), the server's 404,
// or `signal` aborts; reconnects after a drop with Last-Event-ID, backing off up to 10 s.
// `headers()` gives the request headers (the token); `on(ev)` gets every event; `onState(s)`
// hears 'open', 'retry', 'end'. Returns how the stream ended: 'done', 'gone', 'auth', 'aborted'.
export async function readEvents(url, { headers, on, onState = () => {}, signal }) {
  let lastId = null;
  let wait = 500;
  while (!signal.aborted) {
    const parser = new SseParser();
    try {
      const h = { Accept: 'text/event-stream', ...headers() };
      if (lastId) h['Last-Event-ID'] = lastId;
      const r = await fetch(url, { headers: h, signal, cache: 'no-store', credentials: 'omit' });
      if (r.status === 401) return 'auth';
      if (r.status === 404) return 'gone';
      if (!r.ok || !r.body) throw new Error(`HTTP ${r.status}`);
      onState('open');
      wait = 500;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const ev of parser.push(value)) {
          if (ev.comment !== undefined) continue;
          on(ev);
          if (ev.event === 'done' || ev.event === 'error') {
            onState('end');
            return 'done';
          }
        }
        if (parser.lastId) lastId = parser.lastId;
      }
    } catch (e) {
      if (signal.aborted) return 'aborted';
    }
    if (parser.lastId) lastId = parser.lastId;
    onState('retry');
    await new Promise((res) => setTimeout(res, wait));
    wait = Math.min(wait * 2, 10000);
  }
  return 'aborted';
}
