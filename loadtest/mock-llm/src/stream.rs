//! Streamed answers (`"stream": true`): the 200 a non-streamed call would
//! get, sent as OpenAI's `chat.completion.chunk` server-sent events, paced at
//! a token rate, with the mid-stream faults `[[cut]]`, `[[midfail]]` and
//! `[[stall]]`.
//!
//! The chunks are derived from the non-streamed body itself, so every reply
//! shape streams exactly its content, ids, finish reason and usage without a
//! second copy of each shape. They are produced one at a time as the client
//! reads, so a long echo never sits in memory as thousands of chunks.
//!
//! Counting: once the handler returns the 200, the body carries the call's
//! journal entry and an abort guard. A client that goes away mid-stream makes
//! hyper drop the body, and the guard counts the call as aborted, as the
//! handler's guard does before the answer; a stream that reached its end (or
//! a fault the mock itself scripted) is not aborted.

use std::io;

use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::Response;
use serde_json::{json, Map, Value};
use tokio::time::{Duration, Instant};

use crate::api::HANG;
use crate::journal::JournalEntry;
use crate::markers::{StreamFault, StreamFaultKind};
use crate::{CallOutcome, MockLlm};

const DONE: &[u8] = b"data: [DONE]\n\n";

/// What OpenAI-compatible servers send once the 200 is out and the upstream
/// fails: an error event, then the end of the body.
const MID_STREAM_ERROR: &[u8] = br#"data: {"error":{"message":"upstream failed mid-stream","type":"server_error","code":"server_error"}}

"#;

/// How to stream one answer.
pub(crate) struct Options {
    /// Content chunks per second; 0: as fast as the client reads.
    pub(crate) rate: u64,
    pub(crate) fault: Option<StreamFault>,
    /// `stream_options.include_usage`.
    pub(crate) include_usage: bool,
}

/// The streamed form of the non-streamed answer `body`. The journal `entry`
/// ends when the stream does.
pub(crate) fn respond(
    mock: &MockLlm,
    body: &Value,
    options: Options,
    entry: Option<JournalEntry>,
) -> Response {
    let body = if let Some(error) = body.get("error") {
        // `[[reply:error200]]`: a provider that fails before its first token
        // sends the error object as the only event, and no `[DONE]`. It is
        // all there at once, so the call is answered right now.
        if let Some(entry) = entry {
            entry.finish(CallOutcome::Status(200));
        }
        Body::from(event(&json!({ "error": error })))
    } else {
        let streamer = Streamer {
            chunks: Chunks::new(body, options.include_usage),
            rate: options.rate,
            fault: options.fault,
            tokens: 0,
            origin: None,
            guard: Guard {
                mock: mock.clone(),
                entry,
                done: false,
            },
            over: false,
        };
        Body::from_stream(futures::stream::unfold(streamer, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        }))
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `data: <json>\n\n`.
fn event(value: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    // A `Value` always serializes (its keys are strings), and into a Vec
    // nothing can fail to write.
    let _ = serde_json::to_writer(&mut out, value);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Counts the call as aborted if the body is dropped before the stream ended
/// or the mock cut it: hyper drops the body when the client goes away.
struct Guard {
    mock: MockLlm,
    /// Dropped unfinished with the guard, it records the call as `Cancelled`
    /// (or `Hung` during a stall).
    entry: Option<JournalEntry>,
    done: bool,
}

impl Guard {
    fn finish(&mut self, outcome: CallOutcome) {
        self.done = true;
        if let Some(entry) = self.entry.take() {
            entry.finish(outcome);
        }
    }

    fn stalling(&mut self) {
        if let Some(entry) = self.entry.as_mut() {
            entry.hanging();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.mock.count_aborted();
        }
    }
}

/// Hands out the chunks with the rate and the fault applied.
struct Streamer {
    chunks: Chunks,
    rate: u64,
    fault: Option<StreamFault>,
    /// Content chunks sent so far.
    tokens: u64,
    /// When the role chunk went out: token `i` is due `i / rate` after it,
    /// so sleeps do not add up their overshoot.
    origin: Option<Instant>,
    guard: Guard,
    over: bool,
}

impl Streamer {
    async fn next(&mut self) -> Option<Result<Bytes, io::Error>> {
        if self.over {
            return None;
        }
        let started = self.chunks.started();
        let chunk = self.chunks.next()?;
        if let Some(fault) = self.fault.filter(|_| started) {
            // After the role chunk, the first chunk that is no token is the
            // finish chunk: a K beyond the content fires there, so a faulty
            // stream always lacks its finish reason and `[DONE]`.
            if self.tokens >= fault.after || !chunk.token {
                return Some(self.fire(fault.kind).await);
            }
        }
        let origin = *self.origin.get_or_insert_with(Instant::now);
        if chunk.token {
            if self.rate > 0 {
                let due = u128::from(self.tokens) * 1_000_000_000 / u128::from(self.rate);
                let due = Duration::from_nanos(u64::try_from(due).unwrap_or(u64::MAX));
                // `checked_add` only guards against a platform whose clock
                // cannot hold centuries ahead; then the token goes out at once.
                if let Some(due) = origin.checked_add(due) {
                    if due > Instant::now() {
                        tokio::time::sleep_until(due).await;
                    }
                }
            }
            self.tokens += 1;
        }
        if self.chunks.over() {
            // Answered once the last chunk is handed over: hyper may never
            // poll the body again if the client leaves right after `[DONE]`.
            self.over = true;
            self.guard.finish(CallOutcome::Status(200));
        }
        Some(Ok(chunk.bytes))
    }

    async fn fire(&mut self, kind: StreamFaultKind) -> Result<Bytes, io::Error> {
        self.over = true;
        let cut = || io::Error::new(io::ErrorKind::ConnectionAborted, "mock: stream cut");
        match kind {
            StreamFaultKind::Cut => {
                // The mock's own doing, like `[[drop]]`: not an abort.
                self.guard.finish(CallOutcome::Dropped);
                // A body error makes hyper close the connection without the
                // chunked terminator, so the client sees a truncated body;
                // but hyper drops what it has not flushed yet, and it only
                // flushes once the body is pending: pend once, so the K
                // chunks before the cut do reach the client.
                tokio::task::yield_now().await;
                Err(cut())
            }
            StreamFaultKind::MidFail => {
                self.guard.finish(CallOutcome::Status(200));
                Ok(Bytes::from_static(MID_STREAM_ERROR))
            }
            StreamFaultKind::Stall => {
                // A client that gives up now is counted as aborted and
                // journaled as `Hung`, as during a `[[hang]]`.
                self.guard.stalling();
                tokio::time::sleep(HANG).await;
                self.guard.finish(CallOutcome::Dropped);
                Err(cut())
            }
        }
    }
}

/// One chunk to send, and whether it carries a token: a piece of content,
/// refusal or tool call (what the rate paces and `K` counts), not the role,
/// finish or usage chunk.
struct Chunk {
    bytes: Bytes,
    token: bool,
}

enum Phase {
    Role,
    Content(usize),
    Refusal(usize),
    ToolHead(usize),
    ToolArgs(usize, usize),
    Finish,
    Usage,
    Done,
    Over,
}

struct ToolCall {
    id: Value,
    kind: Value,
    name: Value,
    arguments: String,
}

/// The chunks of one answer, in OpenAI's order: the role, content pieces,
/// refusal pieces, each tool call's name then argument pieces, an empty
/// delta with the finish reason, the usage chunk if asked for, `[DONE]`.
struct Chunks {
    /// Top-level fields every chunk repeats (`id`, `created`, `model`, a Groq
    /// answer's extras), with `object: "chat.completion.chunk"`.
    head: Map<String, Value>,
    /// The choice's fields besides its message (`index`, `logprobs`; a sparse
    /// answer has none).
    choice: Map<String, Value>,
    finish_reason: Value,
    /// `None` when the answer's content is null.
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<ToolCall>,
    /// The answer's usage, when the client asked for it (`include_usage`)
    /// and the answer has one (`no_usage` has none): then every chunk
    /// carries `"usage": null` and a last chunk carries this.
    usage: Option<Value>,
    phase: Phase,
}

impl Chunks {
    fn new(body: &Value, include_usage: bool) -> Self {
        let empty = Map::new();
        let top = body.as_object().unwrap_or(&empty);
        let mut head = Map::new();
        for (key, value) in top {
            match key.as_str() {
                "choices" | "usage" => {}
                "object" => {
                    head.insert(key.clone(), json!("chat.completion.chunk"));
                }
                _ => {
                    head.insert(key.clone(), value.clone());
                }
            }
        }
        let first = top
            .get("choices")
            .and_then(|c| c.get(0))
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let choice = first
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "message" | "finish_reason"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let message = first.get("message");
        let field = |name: &str| message.and_then(|m| m.get(name));
        let content = match field("content") {
            Some(Value::String(s)) => Some(s.clone()),
            // `[[reply:parts]]`: deltas are strings, so the parts' text.
            Some(Value::Array(parts)) => Some(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect(),
            ),
            _ => None,
        };
        let tool_calls = field("tool_calls")
            .and_then(Value::as_array)
            .map(|calls| {
                calls
                    .iter()
                    .map(|c| ToolCall {
                        id: c.get("id").cloned().unwrap_or(Value::Null),
                        kind: c.get("type").cloned().unwrap_or(Value::Null),
                        name: c.pointer("/function/name").cloned().unwrap_or(Value::Null),
                        arguments: c
                            .pointer("/function/arguments")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            head,
            choice,
            finish_reason: first.get("finish_reason").cloned().unwrap_or(Value::Null),
            content,
            refusal: field("refusal").and_then(Value::as_str).map(str::to_owned),
            tool_calls,
            usage: top.get("usage").filter(|_| include_usage).cloned(),
            phase: Phase::Role,
        }
    }

    /// Whether the role chunk is out.
    fn started(&self) -> bool {
        !matches!(self.phase, Phase::Role)
    }

    /// Whether `[DONE]` is out.
    fn over(&self) -> bool {
        matches!(self.phase, Phase::Over)
    }

    fn next(&mut self) -> Option<Chunk> {
        loop {
            match self.phase {
                Phase::Role => {
                    self.phase = Phase::Content(0);
                    // null, not "", when the answer's content is null (tool
                    // calls, refusal, empty), as OpenAI does, so the deltas
                    // add up to exactly the non-streamed message.
                    let content = if self.content.is_some() {
                        json!("")
                    } else {
                        Value::Null
                    };
                    let delta = json!({"role": "assistant", "content": content});
                    return Some(self.chunk(delta, false, false));
                }
                Phase::Content(at) => {
                    let text = self.content.as_deref().unwrap_or_default();
                    match piece_end(text, at, false) {
                        Some(end) => {
                            self.phase = Phase::Content(end);
                            let delta = json!({"content": &text[at..end]});
                            return Some(self.chunk(delta, true, false));
                        }
                        None => self.phase = Phase::Refusal(0),
                    }
                }
                Phase::Refusal(at) => {
                    let text = self.refusal.as_deref().unwrap_or_default();
                    match piece_end(text, at, false) {
                        Some(end) => {
                            self.phase = Phase::Refusal(end);
                            let delta = json!({"refusal": &text[at..end]});
                            return Some(self.chunk(delta, true, false));
                        }
                        None => self.phase = Phase::ToolHead(0),
                    }
                }
                Phase::ToolHead(k) => match self.tool_calls.get(k) {
                    Some(call) => {
                        self.phase = Phase::ToolArgs(k, 0);
                        let delta = json!({"tool_calls": [{
                            "index": k,
                            "id": call.id,
                            "type": call.kind,
                            "function": {"name": call.name, "arguments": ""},
                        }]});
                        return Some(self.chunk(delta, true, false));
                    }
                    None => self.phase = Phase::Finish,
                },
                Phase::ToolArgs(k, at) => {
                    let args = self.tool_calls.get(k).map_or("", |c| c.arguments.as_str());
                    match piece_end(args, at, true) {
                        Some(end) => {
                            self.phase = Phase::ToolArgs(k, end);
                            let delta = json!({"tool_calls": [{
                                "index": k,
                                "function": {"arguments": &args[at..end]},
                            }]});
                            return Some(self.chunk(delta, true, false));
                        }
                        None => self.phase = Phase::ToolHead(k + 1),
                    }
                }
                Phase::Finish => {
                    self.phase = Phase::Usage;
                    return Some(self.chunk(json!({}), false, true));
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    if let Some(usage) = &self.usage {
                        let mut chunk = self.head.clone();
                        chunk.insert("choices".into(), json!([]));
                        chunk.insert("usage".into(), usage.clone());
                        return Some(Chunk {
                            bytes: event(&Value::Object(chunk)),
                            token: false,
                        });
                    }
                }
                Phase::Done => {
                    self.phase = Phase::Over;
                    return Some(Chunk {
                        bytes: Bytes::from_static(DONE),
                        token: false,
                    });
                }
                Phase::Over => return None,
            }
        }
    }

    /// A chunk with this `delta`, carrying a token or not; `finish` gives it
    /// the finish reason.
    fn chunk(&self, delta: Value, token: bool, finish: bool) -> Chunk {
        let mut choice = self.choice.clone();
        choice.insert("delta".into(), delta);
        let reason = if finish {
            self.finish_reason.clone()
        } else {
            Value::Null
        };
        choice.insert("finish_reason".into(), reason);
        let mut chunk = self.head.clone();
        chunk.insert("choices".into(), json!([choice]));
        if self.usage.is_some() {
            chunk.insert("usage".into(), Value::Null);
        }
        Chunk {
            bytes: event(&Value::Object(chunk)),
            token,
        }
    }
}

/// End of the "token" of `text` that starts at byte `start` (`None` when the
/// text is used up): a word with the whitespace after it, so the pieces add
/// up to exactly `text` (whitespace before the first word joins it). With
/// `punctuation`, runs of letters/digits and runs of other characters are
/// tokens of their own, as a model emits JSON arguments: `{"`, `city`, `":"`.
fn piece_end(text: &str, start: usize, punctuation: bool) -> Option<usize> {
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Space,
        Word,
        Mark,
    }
    let class = |c: char| {
        if c.is_whitespace() {
            Class::Space
        } else if !punctuation || c.is_alphanumeric() || c == '_' {
            Class::Word
        } else {
            Class::Mark
        }
    };
    let rest = text.get(start..).filter(|r| !r.is_empty())?;
    let mut chars = rest.char_indices().peekable();
    while chars.next_if(|&(_, c)| class(c) == Class::Space).is_some() {}
    if let Some(&(_, first)) = chars.peek() {
        let token = class(first);
        while chars.next_if(|&(_, c)| class(c) == token).is_some() {}
        while chars.next_if(|&(_, c)| class(c) == Class::Space).is_some() {}
    }
    let end = chars.peek().map_or(rest.len(), |&(i, _)| i);
    Some(start + end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str, punctuation: bool) -> Vec<&str> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(end) = piece_end(text, at, punctuation) {
            out.push(&text[at..end]);
            at = end;
        }
        out
    }

    #[test]
    fn words_keep_their_whitespace_and_add_up() {
        assert_eq!(
            pieces("echo: hello  mock\tworld\n", false),
            ["echo: ", "hello  ", "mock\t", "world\n"]
        );
        assert_eq!(pieces("  lead é ü", false), ["  lead ", "é ", "ü"]);
        assert_eq!(pieces("   ", false), ["   "]);
        assert!(pieces("", false).is_empty());
    }

    #[test]
    fn arguments_split_at_json_punctuation() {
        assert_eq!(
            pieces(r#"{"city": "Paris", "n": 1}"#, true),
            [
                r#"{""#, "city", r#"": "#, r#"""#, "Paris", r#"", "#, r#"""#, "n", r#"": "#, "1",
                "}"
            ]
        );
        for text in [r#"{"a":[1,2,{"b":"x y"}]}"#, "{}", " ü{é}", "a\n\n"] {
            assert_eq!(pieces(text, true).concat(), text);
            assert_eq!(pieces(text, false).concat(), text);
        }
    }

    fn chunks_of(body: Value, include_usage: bool) -> Vec<String> {
        let mut chunks = Chunks::new(&body, include_usage);
        let mut out = Vec::new();
        while let Some(c) = chunks.next() {
            out.push(String::from_utf8_lossy(&c.bytes).into_owned());
        }
        assert!(chunks.over());
        out
    }

    #[test]
    fn a_completion_streams_role_pieces_finish_usage_done() {
        let body = json!({
            "id": "chatcmpl-7", "object": "chat.completion", "created": 5, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "a b"},
                         "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        });
        let events = chunks_of(body.clone(), true);
        let parsed: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| {
                let json = e
                    .strip_prefix("data: ")
                    .and_then(|e| e.strip_suffix("\n\n"));
                serde_json::from_str(json.unwrap_or_default()).unwrap_or(Value::Null)
            })
            .collect();
        let head = |d: Value, f: Value| {
            json!({"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 5,
                   "model": "m", "usage": null,
                   "choices": [{"index": 0, "delta": d, "finish_reason": f, "logprobs": null}]})
        };
        assert_eq!(
            parsed,
            [
                head(json!({"role": "assistant", "content": ""}), Value::Null),
                head(json!({"content": "a "}), Value::Null),
                head(json!({"content": "b"}), Value::Null),
                head(json!({}), json!("stop")),
                json!({"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 5,
                       "model": "m", "choices": [], "usage": body["usage"]}),
            ]
        );
        assert_eq!(events.last().map(String::as_str), Some("data: [DONE]\n\n"));
        // Without include_usage: no usage field and no usage chunk.
        let plain = chunks_of(body, false);
        assert_eq!(plain.len(), 5);
        assert!(plain.iter().all(|e| !e.contains("usage")));
    }
}
