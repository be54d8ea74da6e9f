//! Streamed answers (`"stream": true`) over real loopback HTTP, read with a
//! real SSE parser (`eventsource-stream`, what async-openai and the worker
//! use): every shape adds up to its non-streamed answer, tool calls stream as
//! OpenAI streams them, usage comes last when asked for, the token rate, the
//! mid-stream faults and their call windows, and how streamed calls count.

// Panicking on unexpected test data is exactly what a test should do.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use agentq_mock_llm::{spawn, CallOutcome, MockConfig, MockLlm};
use async_openai::types::chat::CreateChatCompletionStreamResponse;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn start(config: MockConfig) -> (String, String, MockLlm) {
    let (base, mock) = spawn(config).await.unwrap();
    let root = base.trim_end_matches("/v1").to_owned();
    (base, root, mock)
}

fn body(prompt: &str, stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": prompt},
        ],
    });
    if stream {
        body["stream"] = json!(true);
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    body
}

async fn send(client: &reqwest::Client, base: &str, body: &Value) -> reqwest::Response {
    client
        .post(format!("{base}/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The non-streamed answer to `prompt`.
async fn whole(client: &reqwest::Client, base: &str, prompt: &str) -> Value {
    let resp = send(client, base, &body(prompt, false, false)).await;
    assert_eq!(resp.status(), StatusCode::OK, "{prompt}");
    resp.json().await.unwrap()
}

/// What a streamed answer delivered.
#[derive(Debug)]
struct Streamed {
    /// The `data` of every event, `[DONE]` included.
    data: Vec<String>,
    /// When each event arrived.
    at: Vec<Instant>,
    /// The transport error the body ended with (a cut connection), if any.
    error: Option<String>,
}

impl Streamed {
    /// The JSON events (all but `[DONE]`).
    fn chunks(&self) -> Vec<Value> {
        self.data
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    fn done(&self) -> bool {
        self.data.last().map(String::as_str) == Some("[DONE]")
    }

    /// The content pieces, in order.
    fn contents(&self) -> Vec<String> {
        self.chunks()
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .filter(|c| !c.is_empty())
            .collect()
    }
}

/// Reads a streamed answer to its end (or its transport error).
async fn read(resp: reqwest::Response) -> Streamed {
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut events = resp.bytes_stream().eventsource();
    let mut streamed = Streamed {
        data: Vec::new(),
        at: Vec::new(),
        error: None,
    };
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                streamed.data.push(event.data);
                streamed.at.push(Instant::now());
            }
            Err(e) => {
                streamed.error = Some(e.to_string());
                break;
            }
        }
    }
    streamed
}

async fn stream(client: &reqwest::Client, base: &str, prompt: &str, usage: bool) -> Streamed {
    read(send(client, base, &body(prompt, true, usage)).await).await
}

/// The message the deltas add up to, the way SDKs put it together.
#[derive(Debug, Default, PartialEq)]
struct Assembled {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Vec<Value>,
    finish_reason: Option<String>,
}

fn assemble(chunks: &[Value]) -> Assembled {
    let mut m = Assembled::default();
    for chunk in chunks {
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        let delta = &choice["delta"];
        if let Some(role) = delta["role"].as_str() {
            m.role = Some(role.to_owned());
        }
        if let Some(c) = delta["content"].as_str() {
            m.content.get_or_insert_with(String::new).push_str(c);
        }
        if let Some(r) = delta["refusal"].as_str() {
            m.refusal.get_or_insert_with(String::new).push_str(r);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let k = usize::try_from(call["index"].as_u64().unwrap()).unwrap();
            if k == m.tool_calls.len() {
                m.tool_calls.push(json!({
                    "id": call["id"],
                    "type": call["type"],
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }));
            }
            let piece = call["function"]["arguments"].as_str().unwrap();
            let args = &mut m.tool_calls[k]["function"]["arguments"];
            *args = json!(format!("{}{piece}", args.as_str().unwrap()));
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            m.finish_reason = Some(reason.to_owned());
        }
    }
    m
}

/// The non-streamed message in the same terms (content parts as their text).
fn expected(whole: &Value) -> Assembled {
    let message = &whole["choices"][0]["message"];
    let content = match &message["content"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(parts.iter().map(|p| p["text"].as_str().unwrap()).collect()),
        _ => None,
    };
    Assembled {
        role: Some("assistant".into()),
        content,
        refusal: message["refusal"].as_str().map(str::to_owned),
        tool_calls: message["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        finish_reason: whole["choices"][0]["finish_reason"]
            .as_str()
            .map(str::to_owned),
    }
}

/// Tool call ids name the call (`call_mock_<n>`, `call_<call>_<k>`), which
/// differs between the two calls compared.
fn without_ids(mut m: Assembled) -> Assembled {
    for call in &mut m.tool_calls {
        call["id"] = Value::Null;
    }
    m
}

/// Every shape of 200, streamed with `include_usage`, adds up to exactly its
/// non-streamed answer: content (one word and its whitespace per chunk),
/// refusal, tool calls, finish reason and usage; every chunk is a
/// `chat.completion.chunk` of the answer's id, model and creation time.
#[tokio::test]
async fn streamed_answers_add_up_to_the_non_streamed_ones() {
    let (base, root, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    for prompt in [
        "hello  mock\tworld ",
        r#"plan [[say:{"subtasks": [{"prompt": "a  b"}]}]]"#,
        "g [[reply:groq]]",
        "c [[reply:cached]]",
        "p [[reply:parts]]",
        "s [[reply:sparse]]",
        "n [[reply:no_usage]]",
        "r [[reply:refusal]]",
        "e [[reply:empty]]",
        "t [[reply:tool_calls]]",
        r#"w [[call:get_weather:{"city": "Paris"}]][[call:clock]]"#,
    ] {
        let whole = whole(&client, &base, prompt).await;
        let streamed = stream(&client, &base, prompt, true).await;
        assert!(streamed.done(), "{prompt}: {streamed:?}");
        assert_eq!(streamed.error, None, "{prompt}");
        let chunks = streamed.chunks();
        let got = assemble(&chunks);
        let want = expected(&whole);
        assert_eq!(without_ids(got), without_ids(want), "{prompt}");

        // The role chunk comes first, content "" (null when the answer's is).
        let first = &chunks[0]["choices"][0]["delta"];
        let null_content = whole["choices"][0]["message"]["content"].is_null();
        let role = if null_content {
            json!({"role": "assistant", "content": null})
        } else {
            json!({"role": "assistant", "content": ""})
        };
        assert_eq!(*first, role, "{prompt}");

        // Usage: every chunk null, then one more chunk with no choices and
        // the non-streamed usage; none at all when the answer has none.
        let (last, rest) = chunks.split_last().unwrap();
        match whole.get("usage") {
            Some(usage) => {
                assert_eq!(last["choices"], json!([]), "{prompt}");
                assert_eq!(last["usage"], *usage, "{prompt}");
                assert!(rest
                    .iter()
                    .all(|c| c["usage"].is_null() && c.as_object().unwrap().contains_key("usage")));
            }
            None => assert!(chunks.iter().all(|c| c.get("usage").is_none()), "{prompt}"),
        }
        // The finish chunk: an empty delta with the finish reason.
        let finish = &chunks[chunks.len() - 1 - usize::from(whole.get("usage").is_some())];
        assert_eq!(finish["choices"][0]["delta"], json!({}), "{prompt}");
        assert_eq!(
            finish["choices"][0]["finish_reason"], whole["choices"][0]["finish_reason"],
            "{prompt}"
        );
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .filter(|c| *c != finish)
            .all(|c| c["choices"][0]["finish_reason"].is_null()));

        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk", "{prompt}");
            for key in ["model", "system_fingerprint", "service_tier"] {
                assert_eq!(chunk.get(key), whole.get(key), "{prompt}: {key}");
            }
            // Ids and creation times differ per call, but all chunks of one
            // answer share them.
            for key in ["id", "created", "x_groq"] {
                match whole.get(key) {
                    Some(_) => assert_eq!(chunk[key], chunks[0][key], "{prompt}: {key}"),
                    None => assert!(chunk.get(key).is_none(), "{prompt}: {key}"),
                }
            }
            if let Some(choice) = chunk["choices"].get(0) {
                let indexed = whole["choices"][0].get("index").is_some();
                assert_eq!(choice.get("index").is_some(), indexed, "{prompt}");
            }
        }
        if prompt.starts_with("s ") {
            assert!(chunks.iter().all(|c| c["model"].is_null()));
        }
        if !prompt.starts_with("s ") && !prompt.starts_with("g ") {
            // What an SDK parses (Groq's service tier and the sparse shape
            // are beyond async-openai's types, streamed or not).
            for chunk in &chunks {
                serde_json::from_value::<CreateChatCompletionStreamResponse>(chunk.clone())
                    .unwrap_or_else(|e| panic!("{prompt}: {e}: {chunk}"));
            }
        }
    }

    // One "token" per chunk: a word and the whitespace after it.
    let prompt = "hello  mock\tworld ";
    let streamed = stream(&client, &base, prompt, false).await;
    assert_eq!(
        streamed.contents(),
        ["echo: ", "hello  ", "mock\t", "world "]
    );
    // Streamed calls count like any other: two per prompt.
    let calls: Value = client
        .get(format!("{root}/_mock/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls["total"], 23);
    assert_eq!(calls["by_prompt"][prompt], 3);
    assert_eq!(calls["aborted"], 0);
    assert_eq!(mock.calls("t [[reply:tool_calls]]"), 2);
}

/// Tool calls stream as OpenAI streams them: per call a chunk with its index,
/// id, type, name and empty arguments, then the arguments in pieces.
#[tokio::test]
async fn tool_calls_stream_as_openai_streams_them() {
    let (base, _, _mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();

    let prompt = r#"w [[call:get_weather:{"city": "Paris"}]][[call:clock]]"#;
    let whole = whole(&client, &base, prompt).await;
    let streamed = stream(&client, &base, prompt, false).await;
    let chunks = streamed.chunks();
    let deltas: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["delta"])
        .filter(|d| d.get("tool_calls").is_some())
        .collect();
    assert_eq!(
        *deltas[0],
        json!({"tool_calls": [{"index": 0, "id": "call_2_0", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]})
    );
    let pieces: Vec<&str> = deltas[1..]
        .iter()
        .take_while(|d| d["tool_calls"][0].get("id").is_none())
        .map(|d| {
            let call = &d["tool_calls"][0];
            assert_eq!(call.as_object().unwrap().len(), 2, "{d}");
            assert_eq!(call["index"], 0);
            call["function"]["arguments"].as_str().unwrap()
        })
        .collect();
    assert!(pieces.len() > 3, "arguments come in pieces: {pieces:?}");
    assert_eq!(pieces.concat(), r#"{"city": "Paris"}"#);
    let second = deltas[pieces.len() + 1];
    assert_eq!(
        *second,
        json!({"tool_calls": [{"index": 1, "id": "call_2_1", "type": "function",
                               "function": {"name": "clock", "arguments": ""}}]})
    );
    // Reassembled, they are the non-streamed calls of the same call number.
    let mut got = assemble(&chunks).tool_calls;
    for (k, call) in got.iter_mut().enumerate() {
        assert_eq!(call["id"], format!("call_2_{k}"));
        call["id"] = json!(format!("call_1_{k}"));
    }
    assert_eq!(
        got,
        *whole["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
    );

    // `[[reply:tool_calls]]`: the id follows the answer's own id.
    let streamed = stream(&client, &base, "t [[reply:tool_calls]]", false).await;
    let chunks = streamed.chunks();
    let n = chunks[0]["id"]
        .as_str()
        .unwrap()
        .strip_prefix("chatcmpl-")
        .unwrap();
    let calls = assemble(&chunks).tool_calls;
    assert_eq!(
        calls,
        [json!({"id": format!("call_mock_{n}"), "type": "function",
                "function": {"name": "get_weather", "arguments": r#"{"city":"Paris"}"#}})]
    );
    assert_eq!(
        assemble(&chunks).finish_reason.as_deref(),
        Some("tool_calls")
    );
}

/// Without `stream_options.include_usage` (absent, false or `{}`) there is no
/// `usage` at all; `"stream": false` or absent is the plain JSON answer.
#[tokio::test]
async fn usage_only_when_asked_and_json_unless_streaming() {
    let (base, _, _mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    for options in [None, Some(json!({"include_usage": false})), Some(json!({}))] {
        let mut request = body("u", true, false);
        if let Some(options) = options {
            request["stream_options"] = options;
        }
        let streamed = read(send(&client, &base, &request).await).await;
        assert!(streamed.done());
        assert!(streamed.chunks().iter().all(|c| c.get("usage").is_none()));
        assert!(streamed.chunks().iter().all(|c| c["choices"] != json!([])));
    }
    let mut request = body("u", false, false);
    request["stream"] = json!(false);
    let resp = send(&client, &base, &request).await;
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let whole: Value = resp.json().await.unwrap();
    assert_eq!(whole["choices"][0]["message"]["content"], "echo: u");
}

/// The rate paces content chunks (token `i` is due `i / rate` after the role
/// chunk), set at start, at runtime, by `/_mock/config` or per call; latency
/// and `[[sleep]]` come before the first chunk.
#[tokio::test]
async fn the_stream_rate_paces_tokens_after_the_latency() {
    let (base, root, mock) = start(MockConfig {
        stream_rate: 5,
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    // Ten tokens: "echo: " and nine words.
    let ten = "a b c d e f g h i";

    // The marker wins over the configured 5/s (which would take 1.8 s).
    let prompt = format!("{ten} [[stream_rate:100]]");
    let started = Instant::now();
    let streamed = stream(&client, &base, &prompt, false).await;
    let took = started.elapsed();
    assert_eq!(streamed.contents().len(), 11, "ten words and the marker");
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(1500),
        "11 tokens at 100/s: {took:?}"
    );
    let prompt = format!("{ten} [[stream_rate:0]]");
    let started = Instant::now();
    stream(&client, &base, &prompt, false).await;
    assert!(started.elapsed() < Duration::from_millis(1500));

    // At runtime, through the control endpoint.
    let config: Value = client
        .post(format!("{root}/_mock/config"))
        .json(&json!({"stream_rate": 100}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["stream_rate"], 100);
    let started = Instant::now();
    let streamed = stream(&client, &base, ten, false).await;
    let took = started.elapsed();
    assert_eq!(streamed.contents().len(), 10);
    assert!(
        took >= Duration::from_millis(90) && took < Duration::from_millis(1500),
        "10 tokens at 100/s: {took:?}"
    );
    // Chunks are spread over the stream, not sent in a burst at the end.
    let role = streamed.at[0];
    let fifth = streamed.at[5];
    assert!(
        fifth - role >= Duration::from_millis(35),
        "{:?}",
        fifth - role
    );

    // Latency and [[sleep]] delay the first chunk; then tokens at 100/s.
    mock.set_stream_rate(0);
    mock.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    let streamed = stream(&client, &base, "late [[sleep:100]]", false).await;
    assert!(streamed.at[0] - started >= Duration::from_millis(250));
    mock.set_latency(Duration::ZERO);
    assert!(streamed.done());
}

/// Polls until the mock has counted `n` aborted calls.
async fn aborted_settles(mock: &MockLlm, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.aborted() != n {
        assert!(
            Instant::now() < deadline,
            "aborted {} != {n}",
            mock.aborted()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls until every journaled call has ended.
async fn journal_settles(mock: &MockLlm) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.journal_open() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} calls open",
            mock.journal_open()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn outcomes(mock: &MockLlm, prompt: &str) -> Vec<CallOutcome> {
    let mut calls: Vec<_> = mock
        .journal()
        .into_iter()
        .filter(|r| r.prompt == prompt)
        .collect();
    calls.sort_by_key(|r| r.call);
    calls.into_iter().map(|r| r.outcome).collect()
}

fn journaled() -> MockConfig {
    MockConfig {
        journal: true,
        ..MockConfig::default()
    }
}

/// `[[cut:K]]`: K content chunks, then the connection closes: no finish
/// chunk, no `[DONE]`, a transport error; within its window only, and a K
/// beyond the content still withholds the finish. The mock's doing: not
/// aborted, journaled as dropped.
#[tokio::test]
async fn cut_closes_the_connection_after_k_chunks() {
    let (base, _, mock) = start(journaled()).await;
    let client = reqwest::Client::new();
    let prompt = "one two three four [[cut:2]]";
    let streamed = stream(&client, &base, prompt, true).await;
    assert!(streamed.error.is_some(), "{streamed:?}");
    assert!(!streamed.done());
    assert_eq!(streamed.contents(), ["echo: ", "one "]);
    assert_eq!(streamed.chunks().len(), 3, "role and two content chunks");

    let prompt = "one two [[cut:1:2]]";
    for call in 1..=3 {
        let streamed = stream(&client, &base, prompt, false).await;
        if call <= 2 {
            assert!(streamed.error.is_some(), "call {call}");
            assert_eq!(streamed.contents(), ["echo: "], "call {call}");
        } else {
            assert!(streamed.done() && streamed.error.is_none());
            assert_eq!(streamed.contents().concat(), format!("echo: {prompt}"));
        }
    }

    let prompt = "short [[cut:99]]";
    let streamed = stream(&client, &base, prompt, false).await;
    assert!(streamed.error.is_some());
    assert_eq!(streamed.contents().concat(), format!("echo: {prompt}"));
    assert!(streamed
        .chunks()
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));

    // Ignored without "stream": true.
    let answer = whole(&client, &base, "one two three four [[cut:2]]").await;
    assert_eq!(answer["choices"][0]["finish_reason"], "stop");

    journal_settles(&mock).await;
    assert_eq!(mock.aborted(), 0);
    assert_eq!(mock.calls("one two [[cut:1:2]]"), 3);
    assert_eq!(
        outcomes(&mock, "one two [[cut:1:2]]"),
        [
            CallOutcome::Dropped,
            CallOutcome::Dropped,
            CallOutcome::Status(200)
        ]
    );
}

/// `[[midfail:K]]`: K content chunks, then OpenAI's mid-stream error event
/// and a clean end of the body, without `[DONE]`.
#[tokio::test]
async fn midfail_sends_an_error_event_after_k_chunks() {
    let (base, _, mock) = start(journaled()).await;
    let client = reqwest::Client::new();
    let error = json!({"error": {"message": "upstream failed mid-stream",
                                 "type": "server_error", "code": "server_error"}});

    let streamed = stream(&client, &base, "a b c d e [[midfail:3]]", true).await;
    assert_eq!(streamed.error, None, "the body ends cleanly");
    assert!(!streamed.done());
    let chunks = streamed.chunks();
    assert_eq!(streamed.contents(), ["echo: ", "a ", "b "]);
    assert_eq!(chunks.len(), 5, "role, three content chunks, the error");
    assert_eq!(chunks[4], error);

    let prompt = "x [[midfail:0:1]]";
    let first = stream(&client, &base, prompt, false).await;
    assert_eq!(first.chunks().len(), 2, "role chunk, then the error");
    assert_eq!(first.chunks()[1], error);
    let second = stream(&client, &base, prompt, false).await;
    assert!(second.done());
    assert_eq!(second.contents().concat(), format!("echo: {prompt}"));

    journal_settles(&mock).await;
    assert_eq!(mock.aborted(), 0);
    assert_eq!(
        outcomes(&mock, prompt),
        [CallOutcome::Status(200), CallOutcome::Status(200)]
    );
}

/// `[[stall:K]]`: K content chunks, then silence with the connection open; a
/// client that gives up is counted as aborted and the call journaled as hung.
#[tokio::test]
async fn stall_goes_silent_after_k_chunks_until_the_client_leaves() {
    let (base, root, mock) = start(journaled()).await;
    let client = reqwest::Client::new();
    let prompt = "a b c d [[stall:2:1]]";
    let resp = send(&client, &base, &body(prompt, true, false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut events = resp.bytes_stream().eventsource();
    let mut data = Vec::new();
    for _ in 0..3 {
        data.push(events.next().await.unwrap().unwrap().data);
    }
    assert!(data[2].contains(r#""content":"a ""#), "{data:?}");
    let silence = tokio::time::timeout(Duration::from_millis(500), events.next()).await;
    assert!(silence.is_err(), "nothing after the stall: {silence:?}");
    assert_eq!(mock.journal_open(), 1, "the call is still in progress");
    drop(events);
    aborted_settles(&mock, 1).await;
    journal_settles(&mock).await;

    // Outside its window the stream completes.
    let streamed = stream(&client, &base, prompt, false).await;
    assert!(streamed.done());
    let calls: Value = client
        .get(format!("{root}/_mock/calls"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(calls["aborted"], 1);
    assert_eq!(calls["by_prompt"][prompt], 2);
    assert_eq!(
        outcomes(&mock, prompt),
        [CallOutcome::Hung, CallOutcome::Status(200)]
    );
}

/// A client that leaves mid-stream is counted as aborted (and journaled as
/// cancelled) like one that leaves before the answer; streams read to their
/// end are not.
#[tokio::test]
async fn a_client_leaving_mid_stream_is_counted_as_aborted() {
    let (base, _, mock) = start(journaled()).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        assert!(stream(&client, &base, "read to the end", true).await.done());
    }
    let slow = format!("{} [[stream_rate:20]]", "word ".repeat(40));
    let resp = send(&client, &base, &body(&slow, true, false)).await;
    let mut events = resp.bytes_stream().eventsource();
    for _ in 0..3 {
        events.next().await.unwrap().unwrap();
    }
    let left_at = Instant::now();
    drop(events);
    aborted_settles(&mock, 1).await;
    journal_settles(&mock).await;
    assert_eq!(outcomes(&mock, &slow), [CallOutcome::Cancelled]);
    let record = mock
        .journal()
        .into_iter()
        .find(|r| r.prompt == slow)
        .unwrap();
    assert!(record.end >= left_at && record.end - left_at < Duration::from_secs(1));
    assert_eq!(
        outcomes(&mock, "read to the end"),
        [CallOutcome::Status(200); 3]
    );
    assert_eq!(mock.calls(&slow), 1);
}

/// Faults that answer before any chunk keep their status with "stream": true
/// (`fail`, `drop`, the error rate, a malformed marker); `[[reply:error200]]`
/// streams its error object as the only event; quota headers come along.
#[tokio::test]
async fn faults_before_the_first_chunk_and_error_bodies() {
    let (base, _, mock) = start(MockConfig {
        rpm: Some(1000),
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();

    let resp = send(&client, &base, &body("f [[fail:503]]", true, true)).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["type"], "server_error");

    let dropped = client
        .post(format!("{base}/chat/completions"))
        .json(&body("d [[drop]]", true, false))
        .send()
        .await;
    assert!(dropped.is_err(), "[[drop]] closes without an answer");

    for bad in [
        "[[cut]]",
        "[[cut:x]]",
        "[[stall:1:2:3]]",
        "[[midfail:1:y]]",
        "[[stream_rate:fast]]",
    ] {
        let resp = send(&client, &base, &body(bad, true, false)).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        let error: Value = resp.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("invalid mock marker"),
            "{bad}: {message}"
        );
    }

    for kind in ["error200", "error200_rate"] {
        let prompt = format!("x [[reply:{kind}]]");
        let whole = whole(&client, &base, &prompt).await;
        let resp = send(&client, &base, &body(&prompt, true, true)).await;
        assert_eq!(
            resp.headers()["x-ratelimit-limit-requests"]
                .to_str()
                .unwrap(),
            "1000"
        );
        let streamed = read(resp).await;
        assert_eq!(streamed.error, None);
        assert_eq!(streamed.chunks(), [whole], "{kind}: one event, no [DONE]");
    }

    mock.set_error_rate(1.0);
    let resp = send(&client, &base, &body("r", true, false)).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    mock.set_error_rate(0.0);

    let resp = send(&client, &base, &body("ok", true, false)).await;
    assert_eq!(
        resp.headers()["x-ratelimit-limit-requests"]
            .to_str()
            .unwrap(),
        "1000"
    );
    assert!(read(resp).await.done());
    assert_eq!(mock.aborted(), 0);
}
