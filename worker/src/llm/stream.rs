//! The LLM call, streamed: the same one request with `stream: true`, its content handed to a
//! [`DeltaSink`] as it arrives.
//!
//! The chunks are accumulated into the parts of the completion a non-streamed call would have
//! read, which [`wire::reply`] then reads as it reads a completion's: a streamed reply and a
//! non-streamed one mean the same usage, refusal, tool calls, finish reason and failures.

use std::pin::Pin;
use std::time::Instant;

use agentq_common::chat::ChatParams;
use agentq_common::task::{Message, Usage};
use async_openai::types::chat::ChatCompletionStreamOptions;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
use tokio::time::Instant as TokioInstant;

use super::{strip_url, too_large, truncate, wire, Call, Llm, LlmFailure, Outcome, Reported};

/// Where a streamed answer's text goes as it arrives (the run writes it to the task's event
/// stream, batched).
pub trait DeltaSink: Send {
    /// The next piece of the answer's content, in order.
    fn push(&mut self, text: &str) -> impl std::future::Future<Output = ()> + Send;
    /// When the sink wants `flush` called even if no chunk arrives (its batching timer), if it
    /// holds unflushed text.
    fn due(&self) -> Option<tokio::time::Instant>;
    fn flush(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

impl Llm {
    /// `chat`, with `stream: true` and `stream_options.include_usage`; content deltas go to
    /// `sink` as they arrive.
    ///
    /// The sink is flushed whenever it is due while the next chunk is awaited, never at the end:
    /// what it still holds is the caller's to flush.
    pub async fn chat_streamed<D: DeltaSink>(
        &self,
        model: &str,
        messages: &[Message],
        params: &ChatParams,
        sink: &mut D,
    ) -> Call {
        let start = Instant::now();
        let mut reported = Reported::default();
        let mut reached = false;
        let outcome = tokio::time::timeout(
            self.timeout,
            self.call_streamed(model, messages, params, sink, &mut reported, &mut reached),
        )
        .await;
        self.account(model, start, outcome, reported, reached)
    }

    async fn call_streamed<D: DeltaSink>(
        &self,
        model: &str,
        messages: &[Message],
        params: &ChatParams,
        sink: &mut D,
        reported: &mut Reported,
        reached: &mut bool,
    ) -> Outcome {
        let body = self.request(model, messages, params).and_then(|mut r| {
            r.stream = Some(true);
            // Without it a stream reports no usage at all; with it, one last chunk does.
            r.stream_options = Some(ChatCompletionStreamOptions {
                include_usage: Some(true),
                ..Default::default()
            });
            serde_json::to_vec(&r)
        });
        let mut response = match self.send(body, reported, reached).await {
            Ok(r) => r,
            Err(f) => return (None, Err(f)),
        };
        if !is_event_stream(&response) {
            // A server that ignores `stream` answers the whole completion at once.
            let (usage, result) = self.read_whole(&mut response, model).await;
            if let Ok(r) = &result {
                if !r.content.is_empty() {
                    sink.push(&r.content).await;
                }
            }
            return (usage, result);
        }
        // the lane stays taken until the stream's last event is read
        let super::Answer { response, lane } = response;
        let outcome = self.read_events(response, model, sink).await;
        drop(lane);
        outcome
    }

    async fn read_events<D: DeltaSink>(
        &self,
        response: reqwest::Response,
        model: &str,
        sink: &mut D,
    ) -> Outcome {
        let limit = self.max_response_bytes;
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return (None, Err(too_large(limit)));
        }
        let mut response = response;
        // The cap bounds what is held, as for a body read whole: the answer accumulated so far
        // (counted by `Answer`) and what the parser holds before it makes a whole event (its
        // `held`). SSE framing (~200 bytes a chunk) is not held, so it does not count: a
        // streamed answer fits wherever the same answer non-streamed would.
        let mut sse = Sse::default();
        let mut answer = Answer::default();
        let mut may_flush = true;
        // The sink's flush deadline: one timer, made when a wait first needs it and re-armed
        // only when the deadline moves. A `sleep_until` made per event was a timer-wheel insert
        // and removal per chunk; events a read brought together are taken without any wait.
        let mut timer: Option<(Pin<Box<tokio::time::Sleep>>, Option<TokioInstant>)> = None;
        loop {
            let due = if may_flush { sink.due() } else { None };
            let next = if sse.has_ready() {
                // a flush already due still goes first, as in the wait below
                if due.is_some_and(|at| at <= TokioInstant::now()) {
                    sink.flush().await;
                    may_flush = false;
                    continue;
                }
                Ok(sse.take())
            } else {
                match due {
                    Some(at) => {
                        let (sleep, armed) = timer.get_or_insert_with(|| {
                            (Box::pin(tokio::time::sleep_until(at)), Some(at))
                        });
                        if *armed != Some(at) {
                            sleep.as_mut().reset(at);
                            *armed = Some(at);
                        }
                        tokio::select! {
                            // a due flush goes first, so text is flushed on time even when
                            // chunks keep coming
                            biased;
                            () = sleep.as_mut() => {
                                // fired: re-armed before it is awaited again
                                *armed = None;
                                sink.flush().await;
                                // a sink still due right after its flush waits for the next
                                // chunk instead of spinning
                                may_flush = false;
                                continue;
                            }
                            next = sse.next(&mut response, limit) => next,
                        }
                    }
                    None => sse.next(&mut response, limit).await,
                }
            };
            may_flush = true;
            let event = match next {
                Ok(Some(event)) => event,
                Ok(None) => return answer.end(model, limit, None),
                Err(BodyError::Http(e)) => return answer.end(model, limit, Some(&e)),
                Err(BodyError::TooLarge) => return (answer.usage(), Err(too_large(limit))),
                Err(BodyError::NotUtf8(e)) => {
                    return (answer.usage(), Err(not_events(&e.to_string())))
                }
            };
            // Other event types (pings, vendors' extras) carry no part of the answer.
            if event.kind == Kind::Other {
                continue;
            }
            if event.data.trim() == "[DONE]" {
                return answer.finish(model, limit);
            }
            let chunk = match Chunk::read(&event) {
                Ok(c) => c,
                Err(f) => return (answer.usage(), Err(f)),
            };
            // An upstream that fails mid-answer (a proxy's relay) says so in an error object.
            if !chunk.error.is_null() {
                return (
                    answer.usage(),
                    Err(wire::classify_error_object(&chunk.error)),
                );
            }
            let added = answer.add(chunk);
            if answer.held > limit {
                return (answer.usage(), Err(too_large(limit)));
            }
            if let Some(text) = answer.content.get(added..).filter(|t| !t.is_empty()) {
                sink.push(text).await;
            }
        }
    }
}

/// The parts of a chunk the answer is made of. Every other key (`id`, `object`, `created`,
/// `system_fingerprint`, vendors' extras) is skipped unread instead of being built into a map:
/// parsing whole chunks into `Value`s cost ~8,000 instructions a chunk, a fifth of the worker's
/// CPU per task. `choices`, in every chunk, is read into the few typed parts the answer takes
/// (building it as a `Value` tree was still ~6 % of the worker's CPU in a drain); the other parts
/// are rare or small and stay `Value`s. Every part reads leniently: one of an unexpected type
/// reads as absent, as a `Value` lookup would.
#[derive(Default, serde::Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Value,
    #[serde(default)]
    usage: Value,
    /// The error object of an upstream that failed mid-answer (`null`: none).
    #[serde(default)]
    error: Value,
    #[serde(default)]
    choices: lenient::Choices,
}

/// Lenient typed reads of a chunk's `choices`: each visitor takes the JSON type it expects and
/// skips anything else (consuming it unread), so a server's odd chunk reads as the `Value` code
/// read it: a choice that is no object is no choice, a `finish_reason` that is no string is none.
mod lenient {
    use std::fmt;

    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;
    use serde_json::Value;

    /// Skips a value of any type.
    fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    /// Implements a visitor's methods for every JSON type it does not take: the value is
    /// consumed and reads as `$none`.
    macro_rules! other_types {
        ($none:expr; $($skip:ident),*) => {
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> { Ok($none) }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> { Ok($none) }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($none) }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($none) }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($none) }
            $(other_types!(@ $skip $none);)*
        };
        (@ u64 $none:expr) => {
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($none) }
        };
        (@ str $none:expr) => {
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($none) }
        };
        (@ seq $none:expr) => {
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq)?;
                Ok($none)
            }
        };
        (@ map $none:expr) => {
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map)?;
                Ok($none)
            }
        };
    }

    /// A string, or none.
    pub struct Str(pub Option<String>);

    impl<'de> Deserialize<'de> for Str {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Str;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("anything")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Str, E> {
                    Ok(Str(Some(v.to_owned())))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Str, E> {
                    Ok(Str(Some(v)))
                }
                other_types!(Str(None); u64, seq, map);
            }
            d.deserialize_any(V)
        }
    }

    /// An unsigned integer, or none (`Value::as_u64`: a negative or fractional number is none).
    pub struct U64(pub Option<u64>);

    impl<'de> Deserialize<'de> for U64 {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = U64;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("anything")
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<U64, E> {
                    Ok(U64(Some(v)))
                }
                other_types!(U64(None); str, seq, map);
            }
            d.deserialize_any(V)
        }
    }

    /// A choice's delta: the parts the answer is made of.
    #[derive(Default)]
    pub struct Delta {
        /// A string, or (some servers) an array of content parts.
        pub content: Value,
        pub refusal: Option<String>,
        /// Rare (a tool call's pieces): kept as sent.
        pub tool_calls: Value,
    }

    /// One choice of a chunk.
    #[derive(Default)]
    pub struct Choice {
        pub index: Option<u64>,
        /// `None`: absent or not a string (`Some("")` is a server's "not yet").
        pub finish_reason: Option<String>,
        pub delta: Option<Delta>,
    }

    /// The chunk's choices: those of its `choices` array that are objects.
    #[derive(Default)]
    pub struct Choices(pub Vec<Choice>);

    impl<'de> Deserialize<'de> for Choices {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Choices;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("anything")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                    let mut out = Vec::new();
                    while let Some(c) = seq.next_element::<Obj<Choice>>()? {
                        out.extend(c.0);
                    }
                    Ok(Choices(out))
                }
                other_types!(Choices::default(); u64, str, map);
            }
            d.deserialize_any(V)
        }
    }

    /// An object read key by key into `T`, or none when the value is no object.
    struct Obj<T>(Option<T>);

    /// What an [`Obj`] is read into: one key's value at a time (a key given twice: the last
    /// one counts, as in a `Value` map).
    trait FromKeys: Default {
        fn read<'de, A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error>;
    }

    impl FromKeys for Choice {
        fn read<'de, A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error> {
            match key {
                Key::Index => self.index = map.next_value::<U64>()?.0,
                Key::FinishReason => self.finish_reason = map.next_value::<Str>()?.0,
                Key::Delta => self.delta = map.next_value::<Obj<Delta>>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }

    impl FromKeys for Delta {
        fn read<'de, A: MapAccess<'de>>(&mut self, key: Key, map: &mut A) -> Result<(), A::Error> {
            match key {
                Key::Content => self.content = map.next_value()?,
                Key::Refusal => self.refusal = map.next_value::<Str>()?.0,
                Key::ToolCalls => self.tool_calls = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }

    impl<'de, T: FromKeys> Deserialize<'de> for Obj<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: FromKeys> Visitor<'de> for V<T> {
                type Value = Obj<T>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("anything")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Obj<T>, A::Error> {
                    let mut out = T::default();
                    while let Some(key) = map.next_key::<Key>()? {
                        out.read(key, &mut map)?;
                    }
                    Ok(Obj(Some(out)))
                }
                other_types!(Obj(None); u64, str, seq);
            }
            d.deserialize_any(V(std::marker::PhantomData))
        }
    }

    /// The keys read from a choice and its delta; any other is `Other` (no string kept).
    #[derive(Deserialize)]
    #[serde(field_identifier, rename_all = "snake_case")]
    enum Key {
        Index,
        FinishReason,
        Delta,
        Content,
        Refusal,
        ToolCalls,
        #[serde(other)]
        Other,
    }
}

impl Chunk {
    fn read(event: &Event) -> Result<Self, LlmFailure> {
        let data = &event.data;
        // a derived struct would also read a JSON array, which is no chunk
        if !data.trim_start().starts_with('{') {
            let why = match serde_json::from_str::<serde::de::IgnoredAny>(data) {
                Ok(_) => "not an object".to_owned(),
                Err(e) => e.to_string(),
            };
            return Err(not_a_chunk(&why, data));
        }
        if event.kind == Kind::Error {
            // a proxy's `error` event: its object is the error, or holds it under `error`
            let mut v: Value =
                serde_json::from_str(data).map_err(|e| not_a_chunk(&e.to_string(), data))?;
            let error = match v.get_mut("error").filter(|e| !e.is_null()) {
                Some(e) => e.take(),
                None => v,
            };
            return Ok(Self {
                error,
                ..Self::default()
            });
        }
        serde_json::from_str(data).map_err(|e| not_a_chunk(&e.to_string(), data))
    }
}

/// Counts the bytes written to it.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Why the body stream stopped early: the transport failed, the cap was passed, or a line was
/// not UTF-8.
enum BodyError {
    Http(reqwest::Error),
    TooLarge,
    NotUtf8(std::str::Utf8Error),
}

/// The kinds of event a chat stream has: the answer's chunks come as `message` (the default), a
/// proxy's failure may come as `error`, anything else (pings, vendors' extras) is skipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Kind {
    #[default]
    Message,
    Error,
    Other,
}

impl Kind {
    fn of(name: &str) -> Self {
        match name {
            // an empty `event:` field leaves the default type, as the spec says
            "" | "message" => Self::Message,
            "error" => Self::Error,
            _ => Self::Other,
        }
    }
}

/// One whole server-sent event.
#[derive(Debug, PartialEq, Eq)]
struct Event {
    kind: Kind,
    data: String,
}

/// The server-sent events of a body, parsed as the WHATWG spec says (lines end with CRLF, LF or
/// CR; a blank line ends an event; `data` lines are joined with LF; comments, `id`, `retry` and
/// unknown fields are skipped; an event without data is none), fed chunk by chunk.
///
/// It replaces eventsource-stream, whose nom parser copied the rest of its buffer at every line
/// and checked each character twice: ~60,000 instructions per call, 17 % of the worker's CPU per
/// drained task (loadtest/bench/README.md, "Memory and CPU per call in flight").
#[derive(Default)]
struct Sse {
    /// The bytes of a line not yet ended.
    line: Vec<u8>,
    /// The last byte fed ended a line with CR: a LF first in the next chunk belongs to it.
    after_cr: bool,
    /// A line was read (a byte order mark is skipped only before the first).
    started: bool,
    kind: Kind,
    data: String,
    /// Whole events not yet taken.
    ready: std::collections::VecDeque<Event>,
}

impl Sse {
    /// Bytes held that are not yet part of an event taken: the line not yet ended and the data
    /// of the event not yet ended.
    fn held(&self) -> usize {
        self.line.len() + self.data.len()
    }

    /// A whole event is parsed and not yet taken.
    fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The next event already parsed, if any.
    fn take(&mut self) -> Option<Event> {
        self.ready.pop_front()
    }

    /// The next whole event of the body; `None` at its end (an event the body did not end is
    /// dropped, as the spec says). Cancel-safe: a chunk is parsed in the poll that reads it.
    async fn next(
        &mut self,
        response: &mut reqwest::Response,
        limit: usize,
    ) -> Result<Option<Event>, BodyError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            match response.chunk().await.map_err(BodyError::Http)? {
                Some(chunk) => {
                    self.feed(&chunk).map_err(BodyError::NotUtf8)?;
                    if self.held() > limit {
                        return Err(BodyError::TooLarge);
                    }
                }
                None => return Ok(None),
            }
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), std::str::Utf8Error> {
        if std::mem::take(&mut self.after_cr) {
            if let [b'\n', rest @ ..] = bytes {
                bytes = rest;
            }
        }
        // memchr: a streamed answer is mostly JSON between line ends, scanned a word at a time
        while let Some(at) = memchr::memchr2(b'\n', b'\r', bytes) {
            if self.line.is_empty() {
                self.end_line(&bytes[..at])?;
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&bytes[..at]);
                let ended = self.end_line(&line);
                // the buffer is kept for the next line
                line.clear();
                self.line = line;
                ended?;
            }
            let cr = bytes[at] == b'\r';
            bytes = &bytes[at + 1..];
            if cr {
                match bytes {
                    [b'\n', rest @ ..] => bytes = rest,
                    [] => self.after_cr = true,
                    _ => {}
                }
            }
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self, line: &[u8]) -> Result<(), std::str::Utf8Error> {
        let mut line = line;
        if !std::mem::replace(&mut self.started, true) {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            let kind = std::mem::take(&mut self.kind);
            if !self.data.is_empty() {
                let mut data = std::mem::take(&mut self.data);
                data.pop(); // the LF after the last data line
                self.ready.push_back(Event { kind, data });
            }
            return Ok(());
        }
        let line = std::str::from_utf8(line)?;
        if line.starts_with(':') {
            return Ok(()); // a comment
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.kind = Kind::of(value),
            "data" => {
                // one allocation per event's data in the usual case of one `data` line
                self.data.reserve(value.len() + 1);
                self.data.push_str(value);
                self.data.push('\n');
            }
            _ => {}
        }
        Ok(())
    }
}

fn is_event_stream(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

fn not_events(why: &str) -> LlmFailure {
    LlmFailure::Permanent {
        outcome: "bad_response",
        message: truncate(format!("llm stream is not server-sent events ({why})"), 200),
    }
}

fn not_a_chunk(why: &str, data: &str) -> LlmFailure {
    let head = truncate(data.chars().take(120).collect(), 120);
    LlmFailure::Permanent {
        outcome: "bad_response",
        message: format!("llm stream event is not a chat completion chunk ({why}): {head}"),
    }
}

/// A string field, or absent when missing, empty or of another type.
fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Appends content, a string or (as some servers send) an array of content parts, as wire.rs
/// reads it, to `to`; returns how many bytes it added.
fn push_content(to: &mut String, v: &Value) -> usize {
    let before = to.len();
    match v {
        Value::String(s) => to.push_str(s),
        Value::Array(parts) => {
            for t in parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
            {
                to.push_str(t);
            }
        }
        _ => {}
    }
    to.len() - before
}

/// One tool call, from its pieces.
#[derive(Default)]
struct ToolCall {
    index: Option<u64>,
    id: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    arguments: String,
}

impl ToolCall {
    /// The call as a completion's `tool_calls` item (its `Serialize`, in `rebuilt`, is the one
    /// shape both this and the rebuilt answer's size use).
    fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// The answer so far, from the chunks read. Fields of an unexpected type read as absent, as in
/// wire.rs.
#[derive(Default)]
struct Answer {
    model: Option<String>,
    content: String,
    refusal: String,
    tool_calls: Vec<ToolCall>,
    finish_reason: Option<String>,
    /// A `finish_reason: ""` was seen: kept verbatim when no named reason follows (the
    /// non-streamed reply of such a server says `""` too).
    empty_reason: bool,
    /// The last usage object seen (OpenAI's own chunk with `choices: []`; some servers repeat a
    /// running total in every chunk).
    usage: Option<Value>,
    /// Bytes of answer held, against the response cap.
    held: usize,
}

impl Answer {
    /// Adds a chunk; returns where its content starts in `content` (what follows is the chunk's,
    /// for the sink).
    fn add(&mut self, chunk: Chunk) -> usize {
        let start = self.content.len();
        if self.model.is_none() {
            self.model = chunk
                .model
                .as_str()
                .filter(|m| !m.is_empty())
                .map(str::to_owned);
        }
        if chunk.usage.is_object() {
            self.usage = Some(chunk.usage);
        }
        for choice in chunk.choices.0 {
            // n = 1: the answer is choice 0; one that numbers its choice oddly is read as it.
            if choice.index.is_some_and(|i| i != 0) {
                continue;
            }
            // "" and null mean "not yet" in some servers' chunks; only a named reason ends.
            match choice.finish_reason {
                Some(reason) if !reason.is_empty() => self.finish_reason = Some(reason),
                Some(_) => self.empty_reason = true,
                None => {}
            }
            let Some(delta) = choice.delta else {
                continue;
            };
            self.held += push_content(&mut self.content, &delta.content);
            if let Some(piece) = delta.refusal {
                self.held += piece.len();
                self.refusal.push_str(&piece);
            }
            if let Some(pieces) = delta.tool_calls.as_array() {
                for piece in pieces {
                    self.merge_call(piece);
                }
            }
        }
        start
    }

    /// A piece of a tool call: the call is found by `index`; its id, type and name come from its
    /// first piece that has them, its arguments are the pieces' concatenation.
    fn merge_call(&mut self, piece: &Value) {
        let index = piece.get("index").and_then(Value::as_u64);
        let id = text(piece, "id");
        let at = match (index, id) {
            (Some(i), _) => self.tool_calls.iter().position(|c| c.index == Some(i)),
            // No index (a server that sends each call whole): a new id is a new call, a piece
            // without one continues the last call.
            (None, Some(id)) => self
                .tool_calls
                .iter()
                .position(|c| c.id.as_deref() == Some(id)),
            (None, None) => self.tool_calls.len().checked_sub(1),
        };
        let at = at.unwrap_or_else(|| {
            self.tool_calls.push(ToolCall {
                index,
                ..Default::default()
            });
            self.tool_calls.len() - 1
        });
        let call = &mut self.tool_calls[at];
        let function = piece.get("function");
        for (field, value) in [
            (&mut call.id, id),
            (&mut call.kind, text(piece, "type")),
            (&mut call.name, function.and_then(|f| text(f, "name"))),
        ] {
            if let (None, Some(v)) = (&field, value) {
                self.held += v.len();
                *field = Some(v.to_owned());
            }
        }
        match function.and_then(|f| f.get("arguments")) {
            Some(Value::String(a)) => {
                self.held += a.len();
                call.arguments.push_str(a);
            }
            // arguments sent as a JSON object: kept as its text, the type the wire promises
            Some(v @ Value::Object(_)) => {
                let a = v.to_string();
                self.held += a.len();
                call.arguments.push_str(&a);
            }
            _ => {}
        }
    }

    /// The usage seen so far, read as wire.rs reads a completion's.
    fn usage(&self) -> Option<Usage> {
        self.usage.clone().and_then(wire::usage_of)
    }

    /// The body ended, cleanly or not (`error`): complete if a finish reason was seen (some
    /// servers send no `[DONE]`; a usage chunk still to come is all that is lost).
    fn end(self, model: &str, limit: usize, error: Option<&reqwest::Error>) -> Outcome {
        if self.finish_reason.is_some() {
            return self.finish(model, limit);
        }
        let message = match error {
            Some(e) => format!(
                "llm stream ended before the answer was complete: {}",
                strip_url(e)
            ),
            None => format!(
                "llm stream ended before the answer was complete (no finish_reason after {} \
                 bytes of answer)",
                self.held
            ),
        };
        (
            self.usage(),
            Err(LlmFailure::Transient {
                outcome: "connection_error",
                message,
            }),
        )
    }

    /// The answer as the non-streamed completion it stands for, read by wire.rs: its parts go
    /// to [`wire::reply`] as a completion's would, and its size is that of the body a
    /// non-streamed call would have read (serialized into a counter, never written out).
    fn finish(self, model: &str, limit: usize) -> Outcome {
        let reason = self
            .finish_reason
            .or_else(|| self.empty_reason.then(String::new));
        let mut size = ByteCount(0);
        let counted = serde_json::to_writer(
            &mut size,
            &rebuilt::Completion {
                choices: [rebuilt::Choice {
                    index: 0,
                    message: rebuilt::Message {
                        role: "assistant",
                        content: Some(self.content.as_str()).filter(|c| !c.is_empty()),
                        refusal: Some(self.refusal.as_str()).filter(|r| !r.is_empty()),
                        tool_calls: &self.tool_calls,
                    },
                    finish_reason: reason.as_deref(),
                }],
                model: self.model.as_deref(),
                usage: self.usage.as_ref(),
            },
        );
        if let Err(e) = counted {
            // unreachable (strings and a Value into a counter), but not worth a panic
            return (
                None,
                Err(LlmFailure::Permanent {
                    outcome: "bad_response",
                    message: format!("llm stream does not rebuild: {e}"),
                }),
            );
        }
        let usage = self.usage.and_then(wire::usage_of);
        if size.0 > limit {
            // the same answer non-streamed would have been refused as too large
            return (usage, Err(too_large(limit)));
        }
        let tool_calls = (!self.tool_calls.is_empty())
            .then(|| self.tool_calls.iter().map(ToolCall::to_json).collect());
        let parsed = wire::reply(
            wire::Reply {
                usage,
                model: self.model,
                finish_reason: reason,
                content: Some(self.content),
                refusal: Some(self.refusal),
                tool_calls,
            },
            model,
        );
        (parsed.usage, parsed.result)
    }
}

/// The completion a streamed answer stands for, as the JSON a non-streamed call would have read
/// (only its size is taken: `Answer::finish`). Keys are those of the completion wire.rs reads;
/// the order does not change the size.
mod rebuilt {
    use serde::ser::{SerializeMap, Serializer};
    use serde::Serialize;
    use serde_json::Value;

    #[derive(Serialize)]
    pub struct Completion<'a> {
        pub choices: [Choice<'a>; 1],
        #[serde(skip_serializing_if = "Option::is_none")]
        pub model: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub usage: Option<&'a Value>,
    }

    #[derive(Serialize)]
    pub struct Choice<'a> {
        pub index: u8,
        pub message: Message<'a>,
        pub finish_reason: Option<&'a str>,
    }

    #[derive(Serialize)]
    pub struct Message<'a> {
        pub role: &'static str,
        /// `null` when there is none, as in a non-streamed reply
        pub content: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub refusal: Option<&'a str>,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        pub tool_calls: &'a [super::ToolCall],
    }

    /// A call's JSON, as a completion's `tool_calls` item has it: `{"id", "type", "function":
    /// {"name", "arguments"}}`, `type` "function" unless a piece named another.
    impl Serialize for super::ToolCall {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            #[derive(Serialize)]
            struct Function<'a> {
                #[serde(skip_serializing_if = "Option::is_none")]
                name: Option<&'a str>,
                arguments: &'a str,
            }
            let mut m = s.serialize_map(None)?;
            if let Some(id) = &self.id {
                m.serialize_entry("id", id)?;
            }
            m.serialize_entry("type", self.kind.as_deref().unwrap_or("function"))?;
            m.serialize_entry(
                "function",
                &Function {
                    name: self.name.as_deref(),
                    arguments: &self.arguments,
                },
            )?;
            m.end()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures::StreamExt;

    use agentq_common::config::MaxTokensParam;
    use agentq_common::metrics::WorkerMetrics;
    use agentq_common::task::TaskResult;
    use secrecy::SecretString;
    use serde_json::json;

    use super::super::LlmSettings;
    use super::*;

    /// What the test server answers: a content type, the body's parts (each sent after its
    /// pause), and whether the connection then breaks instead of ending.
    #[derive(Clone)]
    struct Reply {
        status: u16,
        content_type: &'static str,
        parts: Vec<(Duration, Vec<u8>)>,
        cut: bool,
    }

    impl Reply {
        fn sse(events: &[String]) -> Self {
            Self {
                status: 200,
                content_type: "text/event-stream; charset=utf-8",
                parts: events
                    .iter()
                    .map(|e| (Duration::ZERO, e.clone().into_bytes()))
                    .collect(),
                cut: false,
            }
        }

        fn json(body: &Value) -> Self {
            Self {
                status: 200,
                content_type: "application/json",
                parts: vec![(Duration::ZERO, body.to_string().into_bytes())],
                cut: false,
            }
        }
    }

    struct Server {
        llm: Llm,
        /// The request bodies received, in order.
        requests: Arc<Mutex<Vec<Value>>>,
    }

    async fn serve(reply: Reply, max_response_bytes: usize) -> Server {
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let handler = move |body: axum::body::Bytes| {
            let reply = reply.clone();
            let seen = Arc::clone(&seen);
            async move {
                let request = serde_json::from_slice(&body).unwrap_or(Value::Null);
                seen.lock().expect("not poisoned").push(request);
                let parts = futures::stream::iter(reply.parts).then(|(pause, part)| async move {
                    tokio::time::sleep(pause).await;
                    Ok::<_, std::io::Error>(part)
                });
                let cut = futures::stream::iter(
                    reply
                        .cut
                        .then(|| Err(std::io::Error::other("connection cut"))),
                );
                axum::response::Response::builder()
                    .status(reply.status)
                    .header("content-type", reply.content_type)
                    .body(axum::body::Body::from_stream(parts.chain(cut)))
                    .expect("a response")
            }
        };
        let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("an address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let llm = Llm::new(
            LlmSettings {
                base_url: &format!("http://{addr}/v1"),
                api_key: &SecretString::from("sk-test".to_owned()),
                timeout: Duration::from_secs(1),
                prices: HashMap::new(),
                default_model: "m",
                max_response_bytes,
                max_tokens: 0,
                max_tokens_param: MaxTokensParam::MaxTokens,
                known_models: Default::default(),
                http: agentq_common::config::LlmHttp::Auto,
                http2_streams: 100,
                concurrency: 1,
            },
            WorkerMetrics::new(),
        )
        .expect("builds");
        Server { llm, requests }
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Seen {
        Push(String),
        Flush,
    }

    /// Records what it is handed and when; when `batch` is set, wants a flush that long after
    /// the first unflushed push.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<(TokioInstant, Seen)>,
        batch: Option<Duration>,
        due: Option<TokioInstant>,
    }

    impl Recorder {
        fn kinds(&self) -> Vec<Seen> {
            self.seen.iter().map(|(_, s)| s.clone()).collect()
        }

        fn pushes(&self) -> Vec<String> {
            self.seen
                .iter()
                .filter_map(|(_, s)| match s {
                    Seen::Push(t) => Some(t.clone()),
                    Seen::Flush => None,
                })
                .collect()
        }
    }

    impl DeltaSink for Recorder {
        async fn push(&mut self, text: &str) {
            let now = TokioInstant::now();
            self.seen.push((now, Seen::Push(text.to_owned())));
            if let Some(batch) = self.batch {
                self.due.get_or_insert(now + batch);
            }
        }

        fn due(&self) -> Option<TokioInstant> {
            self.due
        }

        async fn flush(&mut self) {
            self.seen.push((TokioInstant::now(), Seen::Flush));
            self.due = None;
        }
    }

    fn chunk(delta: Value, finish_reason: Option<&str>) -> String {
        let chunk = json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-x", "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
            "usage": null
        });
        format!("data: {chunk}\n\n")
    }

    fn usage_chunk(usage: Value) -> String {
        let chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-x", "choices": [], "usage": usage});
        format!("data: {chunk}\n\n")
    }

    const DONE: &str = "data: [DONE]\n\n";

    fn usage() -> Value {
        json!({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 1}})
    }

    fn completion(message: Value, finish_reason: &str) -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-x",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": usage()})
    }

    async fn streamed(server: &Server, sink: &mut Recorder) -> Call {
        server
            .llm
            .chat_streamed("m", &[Message::user("hi")], &ChatParams::default(), sink)
            .await
    }

    /// The same reply, asked for without streaming.
    async fn plain(reply: &Value) -> (Option<Usage>, Result<TaskResult, LlmFailure>) {
        let server = serve(Reply::json(reply), 1 << 20).await;
        let call = server
            .llm
            .chat("m", &[Message::user("hi")], &ChatParams::default())
            .await;
        (call.usage, call.result)
    }

    #[tokio::test]
    async fn streamed_content_reads_as_the_same_reply_non_streamed() {
        let events = [
            chunk(json!({"role": "assistant", "content": ""}), None),
            chunk(json!({"content": "Hel"}), None),
            chunk(json!({"content": "lo, wörld"}), None),
            // content as parts, as some servers send it
            chunk(json!({"content": [{"type": "text", "text": "!"}]}), None),
            chunk(json!({}), Some("stop")),
            usage_chunk(usage()),
            DONE.to_owned(),
        ];
        // the body arrives in 7-byte pieces: lines, events and a UTF-8 character split across
        // reads
        let body = events.concat().into_bytes();
        let mut reply = Reply::sse(&[]);
        reply.parts = body
            .chunks(7)
            .map(|c| (Duration::ZERO, c.to_vec()))
            .collect();
        let server = serve(reply, 1 << 20).await;
        let mut sink = Recorder::default();
        let call = streamed(&server, &mut sink).await;
        assert!(call.reached);
        let result = call.result.clone().expect("a result");
        assert_eq!(result.content, "Hello, wörld!");
        assert_eq!(result.finish_reason.as_deref(), Some("stop"));
        assert_eq!(result.model, "gpt-x");
        assert_eq!(sink.pushes(), ["Hel", "lo, wörld", "!"]);
        let expected = plain(&completion(
            json!({"role": "assistant", "content": "Hello, wörld!"}),
            "stop",
        ))
        .await;
        assert_eq!((call.usage, call.result), expected);
        assert_eq!(expected.0.map(|u| u.cached_tokens), Some(Some(4)));
        // one request, the one `chat` sends, asking for a stream and its usage
        let requests = server.requests.lock().expect("not poisoned").clone();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0]["stream"], true);
        assert_eq!(
            requests[0]["stream_options"],
            json!({"include_usage": true})
        );
        assert_eq!(
            requests[0]["messages"],
            json!([{"role": "user", "content": "hi"}])
        );
    }

    #[tokio::test]
    async fn tool_calls_streamed_in_pieces_reassemble() {
        let piece = |index: u64, call: Value| {
            let mut call = call;
            call["index"] = index.into();
            chunk(json!({"tool_calls": [call]}), None)
        };
        let events = [
            chunk(json!({"role": "assistant", "content": null}), None),
            piece(
                0,
                json!({"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}),
            ),
            piece(0, json!({"function": {"arguments": "{\"city\":"}})),
            piece(
                1,
                json!({"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{\"tz\""}}),
            ),
            piece(0, json!({"function": {"arguments": "\"Paris\"}"}})),
            piece(1, json!({"function": {"arguments": ":\"CET\"}"}})),
            chunk(json!({}), Some("tool_calls")),
            usage_chunk(usage()),
            DONE.to_owned(),
        ];
        let server = serve(Reply::sse(&events), 1 << 20).await;
        let mut sink = Recorder::default();
        let call = streamed(&server, &mut sink).await;
        let calls = json!([
            {"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{\"tz\":\"CET\"}"}}
        ]);
        let result = call.result.clone().expect("a result");
        assert_eq!(result.tool_calls, Some(calls.clone()));
        assert_eq!(result.finish_reason.as_deref(), Some("tool_calls"));
        assert!(sink.pushes().is_empty());
        let expected = plain(&completion(
            json!({"role": "assistant", "content": null, "tool_calls": calls}),
            "tool_calls",
        ))
        .await;
        assert_eq!((call.usage, call.result), expected);
    }

    #[tokio::test]
    async fn a_streamed_refusal_is_a_refusal() {
        let events = [
            chunk(
                json!({"role": "assistant", "content": null, "refusal": ""}),
                None,
            ),
            chunk(json!({"refusal": "I can't"}), None),
            chunk(json!({"refusal": " help with that."}), None),
            chunk(json!({}), Some("stop")),
            usage_chunk(usage()),
            DONE.to_owned(),
        ];
        let server = serve(Reply::sse(&events), 1 << 20).await;
        let call = streamed(&server, &mut Recorder::default()).await;
        let result = call.result.clone().expect("a result");
        assert_eq!(result.refusal.as_deref(), Some("I can't help with that."));
        assert_eq!(result.content, "");
        let expected = plain(&completion(
            json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}),
            "stop",
        ))
        .await;
        assert_eq!((call.usage, call.result), expected);
    }

    #[tokio::test]
    async fn usage_is_read_from_its_own_chunk_or_a_running_one() {
        // a stream that ends after its finish reason, without [DONE] (some servers), and whose
        // usage rides on the content chunks (vLLM's continuous usage): the last one counts
        let with_usage = |delta: Value, finish: Option<&str>, completion: u32| {
            let mut c: Value =
                serde_json::from_str(chunk(delta, finish).trim_start_matches("data: ").trim_end())
                    .expect("json");
            c["usage"] = json!({"prompt_tokens": 3, "completion_tokens": completion});
            format!("data: {c}\n\n")
        };
        let events = [
            with_usage(json!({"content": "a"}), None, 1),
            with_usage(json!({"content": "b"}), Some("length"), 2),
        ];
        let server = serve(Reply::sse(&events), 1 << 20).await;
        let call = streamed(&server, &mut Recorder::default()).await;
        let usage = call.usage.expect("usage");
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens
            ),
            (3, 2, 5)
        );
        let result = call.result.expect("a result");
        assert_eq!(result.usage, usage);
        assert_eq!(
            (result.content.as_str(), result.finish_reason.as_deref()),
            ("ab", Some("length"))
        );
    }

    #[tokio::test]
    async fn an_error_mid_stream_is_classified_and_keeps_the_usage() {
        let mut first = chunk(json!({"content": "Hi"}), None);
        first = first.replace(
            "\"usage\":null",
            "\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}",
        );
        let events = [
            first.clone(),
            "data: {\"error\": {\"message\": \"upstream overloaded\", \"type\": \"server_error\"}}\n\n"
                .to_owned(),
        ];
        let server = serve(Reply::sse(&events), 1 << 20).await;
        let mut sink = Recorder::default();
        let call = streamed(&server, &mut sink).await;
        let f = call.result.expect_err("a failure");
        assert!(
            matches!(
                f,
                LlmFailure::Transient {
                    outcome: "upstream_error",
                    ..
                }
            ),
            "{f:?}"
        );
        assert!(f.message().contains("upstream overloaded"));
        assert_eq!(call.usage.map(|u| u.prompt_tokens), Some(4));
        assert_eq!(sink.pushes(), ["Hi"]);
        // an `error` event whose data is the error object itself
        let events = [
            first,
            "event: error\ndata: {\"message\": \"slow down\", \"type\": \"rate_limit_error\"}\n\n"
                .to_owned(),
        ];
        let server = serve(Reply::sse(&events), 1 << 20).await;
        let call = streamed(&server, &mut Recorder::default()).await;
        assert!(matches!(call.result, Err(LlmFailure::RateLimited { .. })));
    }

    #[tokio::test]
    async fn a_stream_cut_before_its_finish_is_a_connection_error() {
        let events = [
            chunk(json!({"content": "Once upon"}), None),
            chunk(json!({"content": " a time"}), None),
        ];
        for cut in [false, true] {
            let mut reply = Reply::sse(&events);
            reply.cut = cut;
            let server = serve(reply, 1 << 20).await;
            let mut sink = Recorder::default();
            let call = streamed(&server, &mut sink).await;
            let f = call.result.expect_err("a failure");
            assert!(
                matches!(
                    f,
                    LlmFailure::Transient {
                        outcome: "connection_error",
                        ..
                    }
                ),
                "cut {cut}: {f:?}"
            );
            assert!(
                f.message()
                    .starts_with("llm stream ended before the answer was complete"),
                "{}",
                f.message()
            );
            assert!(!f.message().contains("127.0.0.1"), "{}", f.message());
            // what arrived was still shown as it came (a cut connection may lose what the
            // server had not yet written)
            let pushes = sink.pushes();
            assert_eq!(pushes[0], "Once upon");
            assert!(cut || pushes.len() == 2, "{pushes:?}");
        }
    }

    #[tokio::test]
    async fn an_answer_not_streamed_is_read_whole_and_pushed_once() {
        let reply = completion(
            json!({"role": "assistant", "content": "all at once"}),
            "stop",
        );
        let server = serve(Reply::json(&reply), 1 << 20).await;
        let mut sink = Recorder::default();
        let call = streamed(&server, &mut sink).await;
        assert_eq!(sink.pushes(), ["all at once"]);
        assert_eq!((call.usage, call.result), plain(&reply).await);
        // a failure pushes nothing
        let server = serve(Reply::json(&json!({"choices": []})), 1 << 20).await;
        let mut sink = Recorder::default();
        let call = streamed(&server, &mut sink).await;
        assert_eq!(call.result.expect_err("bad").outcome(), "bad_response");
        assert!(sink.seen.is_empty());
    }

    /// Three content chunks, the last with the finish reason, then `[DONE]`: each a part of the
    /// body, sent at once.
    fn three_pieces() -> Reply {
        Reply::sse(&[
            chunk(json!({"content": "first"}), None),
            chunk(json!({"content": " second"}), None),
            chunk(json!({"content": " third"}), Some("stop")),
            DONE.to_owned(),
        ])
    }

    /// Streams `three_pieces` as `reply` sends them into a sink batching for `batch`; returns the
    /// sink.
    async fn read_three(reply: Reply, batch: Duration) -> Recorder {
        let server = serve(reply, 1 << 20).await;
        let mut sink = Recorder {
            batch: Some(batch),
            ..Default::default()
        };
        let call = streamed(&server, &mut sink).await;
        assert_eq!(call.result.expect("a result").content, "first second third");
        sink
    }

    /// `three_pieces` pushed, with a flush between each two.
    fn flushed_between_pieces() -> Vec<Seen> {
        vec![
            Seen::Push("first".into()),
            Seen::Flush,
            Seen::Push(" second".into()),
            Seen::Flush,
            Seen::Push(" third".into()),
        ]
    }

    #[tokio::test]
    async fn a_slow_stream_is_flushed_while_waiting() {
        // two waits, each longer than the batching: the flush timer fires in both (it is one
        // timer, armed again after it fired)
        let mut reply = three_pieces();
        reply.parts[1].0 = Duration::from_millis(200);
        reply.parts[2].0 = Duration::from_millis(200);
        let sink = read_three(reply, Duration::from_millis(50)).await;
        // flushed while waiting for " second" and " third"; the rest is the caller's to flush
        assert_eq!(sink.kinds(), flushed_between_pieces());
        for (push, flush) in [(0, 1), (2, 3)] {
            let waited = sink.seen[flush].0 - sink.seen[push].0;
            assert!(
                waited >= Duration::from_millis(50) && waited < Duration::from_millis(150),
                "flushed {waited:?} after push {push}"
            );
        }
        assert!(sink.due.is_some(), "the last push is left unflushed");
    }

    #[tokio::test]
    async fn a_due_flush_goes_before_events_that_came_together() {
        // every event in one part of the body (one read): no wait, yet the sink, due at once
        // after each push, is flushed before the next event is handed over
        let mut reply = three_pieces();
        let whole: Vec<u8> = reply.parts.iter().flat_map(|(_, b)| b.clone()).collect();
        reply.parts = vec![(Duration::ZERO, whole)];
        let sink = read_three(reply, Duration::ZERO).await;
        let mut expected = flushed_between_pieces();
        // due before the `[DONE]` event was taken
        expected.push(Seen::Flush);
        assert_eq!(sink.kinds(), expected);
    }

    #[tokio::test]
    async fn the_response_cap_bounds_what_is_held() {
        // an answer over the cap
        let piece = "x".repeat(100);
        let mut events: Vec<String> = (0..20)
            .map(|_| chunk(json!({"content": piece}), None))
            .collect();
        events.push(chunk(json!({}), Some("stop")));
        let server = serve(Reply::sse(&events), 1024).await;
        let mut sink = Recorder::default();
        let call = streamed(&server, &mut sink).await;
        let f = call.result.expect_err("too large");
        assert!(
            matches!(
                f,
                LlmFailure::Permanent {
                    outcome: "too_large",
                    ..
                }
            ),
            "{f:?}"
        );
        assert!(f.message().contains("AGENTQ_MAX_RESPONSE_BYTES"));
        assert!(sink.pushes().len() < 11, "reading stopped at the cap");
        // one endless event, never completed
        let huge = format!(
            "data: {{\"choices\": [{{\"delta\": {{\"content\": \"{}",
            "y".repeat(4096)
        );
        let server = serve(Reply::sse(&[huge]), 1024).await;
        let call = streamed(&server, &mut Recorder::default()).await;
        assert_eq!(call.result.expect_err("too large").outcome(), "too_large");
        // many small chunks: their framing is not held, so it does not count
        let mut events: Vec<String> = (0..30)
            .map(|_| chunk(json!({"content": "ab"}), None))
            .collect();
        events.push(chunk(json!({}), Some("stop")));
        events.push(DONE.to_owned());
        assert!(events.concat().len() > 1024);
        let server = serve(Reply::sse(&events), 1024).await;
        let call = streamed(&server, &mut Recorder::default()).await;
        assert_eq!(call.result.expect("fits").content, "ab".repeat(30));
    }

    #[tokio::test]
    async fn odd_streams_fail_as_bad_responses_and_statuses_as_in_chat() {
        let server = serve(Reply::sse(&["data: not json\n\n".to_owned()]), 1 << 20).await;
        let call = streamed(&server, &mut Recorder::default()).await;
        let f = call.result.expect_err("bad");
        assert!(
            matches!(
                f,
                LlmFailure::Permanent {
                    outcome: "bad_response",
                    ..
                }
            ),
            "{f:?}"
        );
        // comments and other event types are skipped; [DONE] alone is an empty answer
        let server = serve(
            Reply::sse(&[
                ": keep-alive\n\n".to_owned(),
                "event: ping\ndata: x\n\n".to_owned(),
                DONE.to_owned(),
            ]),
            1 << 20,
        )
        .await;
        let call = streamed(&server, &mut Recorder::default()).await;
        assert_eq!(call.result.expect_err("empty").outcome(), "empty_response");
        // a non-2xx answer is classified as `chat` classifies it
        let mut reply = Reply::json(&json!({"error": {"message": "down"}}));
        reply.status = 503;
        let server = serve(reply, 1 << 20).await;
        let call = streamed(&server, &mut Recorder::default()).await;
        assert!(call.reached);
        let f = call.result.expect_err("a 503");
        assert_eq!(f.outcome(), "server_error");
        assert!(
            f.message().starts_with("llm answered 503: "),
            "{}",
            f.message()
        );
    }

    #[tokio::test]
    async fn the_whole_stream_is_bounded_by_the_timeout() {
        let mut reply = Reply::sse(&[
            chunk(json!({"content": "slow"}), None),
            chunk(json!({}), Some("stop")),
        ]);
        reply.parts[1].0 = Duration::from_millis(1500);
        let server = serve(reply, 1 << 20).await;
        let call = streamed(&server, &mut Recorder::default()).await;
        assert!(call.reached);
        let f = call.result.expect_err("timed out");
        assert_eq!(
            f,
            LlmFailure::Transient {
                outcome: "timeout",
                message: "llm call timed out after 1s".into()
            }
        );
    }

    /// The run spawns its calls: the streamed call must be `Send` like `chat`.
    /// Events as `Sse` reads them from `body` cut into pieces at `cuts`, and as eventsource-stream
    /// (the parser it replaced) reads them: the same, for every way of cutting the body.
    type Events = Vec<(Kind, String)>;

    fn both_parsers(body: &[u8], cuts: &[usize]) -> (Events, Events) {
        let mut pieces = Vec::new();
        let mut at = 0;
        for &c in cuts.iter().chain([body.len()].iter()) {
            let c = c.clamp(at, body.len());
            pieces.push(body[at..c].to_vec());
            at = c;
        }
        let mut sse = Sse::default();
        for p in &pieces {
            sse.feed(p).expect("utf-8");
        }
        let ours = sse.ready.drain(..).map(|e| (e.kind, e.data)).collect();
        // eventsource-stream panics on a byte order mark (it slices inside the character), so it
        // reads the body without one, whole
        let pieces = match body.strip_prefix(b"\xEF\xBB\xBF") {
            Some(rest) => vec![rest.to_vec()],
            None => pieces,
        };
        let stream = futures::stream::iter(pieces.into_iter().map(Ok::<_, std::io::Error>));
        let theirs = futures::executor::block_on(
            eventsource_stream::Eventsource::eventsource(stream)
                .map(|e| {
                    let e = e.expect("parses");
                    (Kind::of(&e.event), e.data)
                })
                .collect::<Vec<_>>(),
        );
        (ours, theirs)
    }

    /// Odd chunks read as the `Value` lookups before the typed `choices` read them: a part of
    /// an unexpected type is absent, never an error, and nothing else in the chunk is lost.
    #[test]
    fn odd_choices_read_leniently() {
        fn read(chunks: &[&str]) -> (String, Option<String>, bool, String, usize) {
            let mut answer = Answer::default();
            for data in chunks {
                let event = Event {
                    kind: Kind::Message,
                    data: (*data).to_owned(),
                };
                let chunk = Chunk::read(&event).unwrap_or_else(|_| panic!("{data} reads"));
                answer.add(chunk);
            }
            let calls = answer.tool_calls.len();
            (
                answer.content,
                answer.finish_reason,
                answer.empty_reason,
                answer.refusal,
                calls,
            )
        }
        let none = (String::new(), None, false, String::new(), 0);
        for odd in [
            r#"{"choices": null}"#,
            r#"{"choices": {"delta": {"content": "x"}}}"#,
            r#"{"choices": "x"}"#,
            r#"{"choices": [1, "x", null, [{"delta": {"content": "x"}}]]}"#,
            r#"{"choices": [{"delta": "x"}]}"#,
            r#"{"choices": [{"delta": {"content": 7, "refusal": ["x"], "tool_calls": {}}}]}"#,
            r#"{"choices": [{"index": 1, "delta": {"content": "x"}, "finish_reason": "stop"}]}"#,
            r#"{"choices": [{"finish_reason": 3}, {"finish_reason": {"a": [1]}}]}"#,
        ] {
            assert_eq!(read(&[odd]), none, "{odd}");
        }
        // an index that is no unsigned integer counts as choice 0, as `as_u64` read it
        assert_eq!(
            read(&[
                r#"{"choices": [{"index": -1, "delta": {"content": "a"}}]}"#,
                r#"{"choices": [{"index": 0.0, "delta": {"content": "b"}}]}"#,
                r#"{"choices": [{"index": "1", "delta": {"content": [{"text": "c"}, {"x": 1}]}}]}"#,
            ])
            .0,
            "abc"
        );
        // unknown keys at every level are skipped, escapes are read, the last of a key given
        // twice counts, "" is "not yet" until a named reason comes
        assert_eq!(
            read(&[
                r#"{"id": "x", "object": {"deep": [1, {"a": null}]}, "choices": [{"logprobs": {"content": [{"token": "a"}]}, "delta": {"role": "assistant", "content": "one\n\"two\"", "extra": [1]}, "finish_reason": ""}]}"#,
                r#"{"choices": [{"delta": {"content": "a", "content": "b", "refusal": "no"}, "finish_reason": "stop", "finish_reason": "length"}]}"#,
            ]),
            (
                "one\n\"two\"b".to_owned(),
                Some("length".to_owned()),
                true,
                "no".to_owned(),
                0
            )
        );
        assert_eq!(
            read(&[
                r#"{"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}}]}"#
            ])
            .4,
            1
        );
    }

    #[test]
    fn the_sse_parser_reads_what_eventsource_stream_read() {
        let bodies: [&[u8]; 9] = [
            b"data: {\"a\":1}\n\ndata: [DONE]\n\n",
            b"\xEF\xBB\xBFdata: bom\r\n\r\ndata:no space\r\rdata:  two spaces\r\n\n",
            b": comment\nevent: ping\ndata: x\n\nevent: error\ndata: {\"error\":{}}\n\n",
            b"data: one\ndata: two\n\ndata\n\ndata:\n\nid: 7\nretry: 10\n\n",
            b"event:\ndata: default type\n\nevent: message\ndata: m\n\nfield without colon\n\n",
            b"data: \xC3\xA9t\xC3\xA9 \xE2\x9C\x93\n\ndata: not ended",
            b"data: cr only\r\rdata: lf\n\n\n\n\ndata: last\r\n\r\n",
            b"event: x\n\ndata: kind reset after a blank line\n\n",
            b"",
        ];
        for body in bodies {
            // whole, then cut at every place, then cut at every pair of places
            let (ours, theirs) = both_parsers(body, &[]);
            assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(body));
            for i in 0..=body.len() {
                let (ours, theirs) = both_parsers(body, &[i]);
                assert_eq!(
                    ours,
                    theirs,
                    "{:?} cut at {i}",
                    String::from_utf8_lossy(body)
                );
                for j in i..=body.len() {
                    let (ours, _) = both_parsers(body, &[i, j]);
                    assert_eq!(
                        ours,
                        theirs,
                        "{:?} cut at {i}, {j}",
                        String::from_utf8_lossy(body)
                    );
                }
            }
        }
        // a line that is not UTF-8 is refused, whole or cut
        let mut sse = Sse::default();
        assert!(sse.feed(b"data: \xFF\n\n").is_err());
        let mut sse = Sse::default();
        sse.feed(b"data: \xC3")
            .expect("half a character is not yet a line");
        sse.feed(b"\xA9\n\n").expect("the rest of it");
        assert_eq!(
            sse.ready.pop_front().map(|e| e.data).as_deref(),
            Some("\u{e9}")
        );
        // what is held: the line not ended and the event's data, not what was taken
        let mut sse = Sse::default();
        sse.feed(b"data: abc\n\ndata: de\ndata: f").expect("utf-8");
        assert_eq!(sse.held(), "de\n".len() + "data: f".len());
    }

    #[test]
    fn the_streamed_call_is_send() {
        fn send<T: Send>(_: &T) {}
        let llm = Llm::new(
            LlmSettings {
                base_url: "http://127.0.0.1:9",
                api_key: &SecretString::from(String::new()),
                timeout: Duration::from_secs(1),
                prices: HashMap::new(),
                default_model: "m",
                max_response_bytes: 1024,
                max_tokens: 0,
                max_tokens_param: MaxTokensParam::MaxTokens,
                known_models: Default::default(),
                http: agentq_common::config::LlmHttp::Auto,
                http2_streams: 100,
                concurrency: 1,
            },
            WorkerMetrics::new(),
        )
        .expect("builds");
        let mut sink = Recorder::default();
        let messages = [Message::user("hi")];
        let params = ChatParams::default();
        send(&llm.chat_streamed("m", &messages, &params, &mut sink));
    }
}
