//! The real wire's odd corners, over loopback HTTP: every rate-limit header
//! form, OpenAI's error envelopes, the `[[reply:KIND]]` shapes, and what the
//! mock records of each request (`Authorization`, `max_tokens`).

// Panicking on unexpected test data is exactly what a test should do.
#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use agentq_mock_llm::{spawn, MockConfig, MockLlm, RequestRecord};
use async_openai::error::ApiError;
use async_openai::types::chat::{
    ChatCompletionMessageToolCalls, CreateChatCompletionResponse, FinishReason,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Every header a scripted failure may set.
const HINT_HEADERS: [&str; 8] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-remaining-tokens",
    "llm_provider-retry-after",
    "anthropic-ratelimit-requests-reset",
];

async fn start(config: MockConfig) -> (String, String, MockLlm) {
    let (base, mock) = spawn(config).await.unwrap();
    let root = base.trim_end_matches("/v1").to_owned();
    (base, root, mock)
}

fn chat_body(prompt: &str) -> Value {
    json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": prompt},
        ],
    })
}

async fn chat(client: &reqwest::Client, base: &str, prompt: &str) -> reqwest::Response {
    client
        .post(format!("{base}/chat/completions"))
        .json(&chat_body(prompt))
        .send()
        .await
        .unwrap()
}

/// The rate-limit headers a response carries, sorted by name.
fn hint_headers(resp: &reqwest::Response) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = HINT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = resp.headers().get(*name)?;
            Some(((*name).to_owned(), value.to_str().unwrap().to_owned()))
        })
        .collect();
    found.sort();
    found
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = expected
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn rate_limit_header_forms() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("[[fail:429:1]]", &[]),
        ("[[fail:429:1:7]]", &[("retry-after", "7")]),
        ("[[fail:429:1:ms:250]]", &[("retry-after-ms", "250")]),
        ("[[fail:429:1:ms:1.5]]", &[("retry-after-ms", "1.5")]),
        (
            "[[fail:429:1:reset:6m0s]]",
            &[
                ("x-ratelimit-reset-requests", "6m0s"),
                ("x-ratelimit-remaining-requests", "0"),
            ],
        ),
        (
            "[[fail:429:1:reset:250ms]]",
            &[
                ("x-ratelimit-reset-requests", "250ms"),
                ("x-ratelimit-remaining-requests", "0"),
            ],
        ),
        (
            "[[fail:429:1:reset_tokens:1s]]",
            &[
                ("x-ratelimit-reset-tokens", "1s"),
                ("x-ratelimit-remaining-tokens", "0"),
            ],
        ),
        (
            "[[fail:429:1:litellm:2]]",
            &[("llm_provider-retry-after", "2")],
        ),
        ("[[fail:429:1:raw:0]]", &[("retry-after", "0")]),
        ("[[fail:429:1:raw:1e+300]]", &[("retry-after", "1e+300")]),
        ("[[fail:429:1:raw:-5]]", &[("retry-after", "-5")]),
        (
            "[[fail:429:1:raw:soon-ish]]",
            &[("retry-after", "soon-ish")],
        ),
        (
            "[[fail:429:1:raw:Sun, 06 Nov 1994 08:49:37 GMT]]",
            &[("retry-after", "Sun, 06 Nov 1994 08:49:37 GMT")],
        ),
        ("[[fail:429:1:raw:]]", &[("retry-after", "")]),
        (
            "[[fail:429:1:ms:100:litellm:9:reset:1s:reset_tokens:2m0s:raw:x:y]]",
            &[],
        ),
        ("[[fail:503:1:4]]", &[("retry-after", "4")]),
    ];
    for (i, (marker, expected)) in cases.iter().enumerate() {
        let prompt = format!("case {i} {marker}");
        let resp = chat(&client, &base, &prompt).await;
        let want_status: u16 = marker[7..10].parse().unwrap();
        assert_eq!(resp.status().as_u16(), want_status, "{marker}");
        let got = hint_headers(&resp);
        if i == cases.len() - 2 {
            // The combined form: each header once, `raw` taking the rest.
            assert_eq!(
                got,
                pairs(&[
                    ("retry-after-ms", "100"),
                    ("retry-after", "x:y"),
                    ("llm_provider-retry-after", "9"),
                    ("x-ratelimit-reset-requests", "1s"),
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-tokens", "2m0s"),
                    ("x-ratelimit-remaining-tokens", "0"),
                ]),
                "{marker}"
            );
        } else {
            assert_eq!(got, pairs(expected), "{marker}");
        }
        let body: Value = resp.json().await.unwrap();
        if want_status == 429 {
            let message = body["error"]["message"].as_str().unwrap().to_owned();
            assert_eq!(
                body,
                json!({"error": {
                    "message": message,
                    "type": "requests",
                    "param": null,
                    "code": "rate_limit_exceeded",
                }}),
                "{marker}"
            );
            assert!(message.contains("scripted failure 429 on call 1"), "{body}");
        }
        // The window was one call.
        assert_eq!(chat(&client, &base, &prompt).await.status(), StatusCode::OK);
        assert_eq!(mock.calls(&prompt), 2);
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ` (days_from_civil, the
/// inverse of what the mock computes, so this is an independent check).
fn parse_rfc3339_utc(s: &str) -> u64 {
    assert_eq!(s.len(), 20, "{s}");
    assert!(&s[4..5] == "-" && &s[7..8] == "-" && &s[10..11] == "T" && s.ends_with('Z'));
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let (hh, mm, ss) = (n(11..13), n(14..16), n(17..19));
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).unwrap()
}

#[tokio::test]
async fn anthropic_reset_is_an_rfc3339_time_ahead() {
    let (base, _, _) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), 0);
    assert_eq!(parse_rfc3339_utc("2000-03-01T00:00:01Z"), 951_868_801);
    let resp = chat(&client, &base, "anth [[fail:429:1:anthropic:30]]").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = hint_headers(&resp);
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert_eq!(headers[0].0, "anthropic-ratelimit-requests-reset");
    let at = parse_rfc3339_utc(&headers[0].1);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 29..=now + 31).contains(&at),
        "{} is {} s ahead",
        headers[0].1,
        at.saturating_sub(now)
    );
}

#[tokio::test]
async fn malformed_new_markers_are_400() {
    let (base, _, _) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    for bad in [
        "[[fail:429:1:ms:soon]]",
        "[[fail:429:1:reset:5]]",
        "[[fail:429:1:reset_tokens:1d]]",
        "[[fail:429:1:litellm:-1]]",
        "[[fail:429:1:raw]]",
        "[[fail:429:1:anthropic:x]]",
        "[[fail:429:1:7:date:3]]",
        "[[fail:429:1:header:x]]",
        "[[reply:nope]]",
        "[[reply:empty:soon]]",
        "[[reply]]",
    ] {
        let resp = chat(&client, &base, &format!("bad {bad}")).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(body["error"]["code"], Value::Null, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("invalid mock marker [["), "{message}");
    }
}

/// Checks `body` is exactly OpenAI's error envelope with this type, code and
/// param, and that async-openai's `ApiError` reads it.
fn envelope(body: &Value, kind: &str, code: Option<&str>, param: Option<&str>) {
    #[derive(serde::Deserialize)]
    struct Wrapped {
        error: ApiError,
    }
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{body}");
    assert_eq!(
        body,
        &json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
    );
    let parsed: Wrapped = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(parsed.error.code.as_deref(), code);
}

#[tokio::test]
async fn error_envelopes_follow_openai_per_status() {
    let (base, root, _) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    for (status, kind, code) in [
        (400, "invalid_request_error", None),
        (401, "invalid_request_error", Some("invalid_api_key")),
        (
            403,
            "request_forbidden",
            Some("unsupported_country_region_territory"),
        ),
        (404, "invalid_request_error", Some("model_not_found")),
        (408, "server_error", Some("timeout")),
        (409, "invalid_request_error", None),
        (413, "invalid_request_error", None),
        (422, "invalid_request_error", None),
        (429, "requests", Some("rate_limit_exceeded")),
        (500, "server_error", None),
        (502, "server_error", None),
        (503, "server_error", None),
        (504, "server_error", None),
        (529, "server_error", None),
    ] {
        let resp = chat(&client, &base, &format!("status [[fail:{status}]]")).await;
        assert_eq!(resp.status().as_u16(), status);
        let body: Value = resp.json().await.unwrap();
        envelope(&body, kind, code, None);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("scripted failure {status} on call 1")),
            "{body}"
        );
    }

    // Not scripted: unknown route, wrong method, empty messages, bad JSON.
    let resp = client.post(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body: Value = resp.json().await.unwrap();
    envelope(&body, "invalid_request_error", None, None);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Invalid URL (POST /v1/nope)"));
    let resp = client
        .get(format!("{base}/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    envelope(
        &resp.json().await.unwrap(),
        "invalid_request_error",
        None,
        None,
    );
    let resp = client
        .post(format!("{base}/chat/completions"))
        .json(&json!({"model": "m", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    envelope(
        &resp.json().await.unwrap(),
        "invalid_request_error",
        Some("empty_array"),
        Some("messages"),
    );
    let resp = client
        .post(format!("{base}/chat/completions"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    envelope(
        &resp.json().await.unwrap(),
        "invalid_request_error",
        None,
        None,
    );

    // Random failures (error_rate) are plain 500s.
    let resp = client
        .post(format!("{root}/_mock/config"))
        .json(&json!({"error_rate": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = chat(&client, &base, "unlucky").await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    envelope(&resp.json().await.unwrap(), "server_error", None, None);

    // Authentication: a wrong key has a code, a missing one does not (as OpenAI).
    let (base, _, _) = start(MockConfig {
        api_key: Some("k".into()),
        ..MockConfig::default()
    })
    .await;
    let post = || {
        client
            .post(format!("{base}/chat/completions"))
            .json(&chat_body("guarded"))
    };
    let resp = post().bearer_auth("wrong").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    envelope(
        &resp.json().await.unwrap(),
        "invalid_request_error",
        Some("invalid_api_key"),
        None,
    );
    let resp = post().send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    envelope(
        &resp.json().await.unwrap(),
        "invalid_request_error",
        None,
        None,
    );
}

/// Word counts of `chat_body(prompt)`: ("be brief" + prompt, "echo: " + prompt).
fn usage_of(prompt: &str) -> (u64, u64) {
    let words = prompt.split_whitespace().count() as u64;
    (2 + words, 1 + words)
}

async fn reply(client: &reqwest::Client, base: &str, prompt: &str) -> Value {
    let resp = chat(client, base, prompt).await;
    assert_eq!(resp.status(), StatusCode::OK, "{prompt}");
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    resp.json().await.unwrap()
}

/// `body` without the fields that change per call (`id`, `created`, the
/// tool call's and Groq's ids), after checking they look right.
fn stable(mut body: Value) -> Value {
    let obj = body.as_object_mut().unwrap();
    if let Some(id) = obj.remove("id") {
        assert!(id.as_str().unwrap().starts_with("chatcmpl-"), "{id}");
    }
    if let Some(created) = obj.remove("created") {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(created.as_u64().unwrap().abs_diff(now) < 60, "{created}");
    }
    if let Some(x_groq) = obj.get_mut("x_groq") {
        let id = x_groq.as_object_mut().unwrap().remove("id").unwrap();
        assert!(id.as_str().unwrap().starts_with("req_mock_"), "{id}");
    }
    if let Some(calls) = body["choices"][0]["message"].get_mut("tool_calls") {
        let id = calls[0].as_object_mut().unwrap().remove("id").unwrap();
        assert!(id.as_str().unwrap().starts_with("call_mock_"), "{id}");
    }
    body
}

#[tokio::test]
async fn reply_shapes() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let completion = |message: Value, finish: &str, usage: Value| {
        json!({
            "object": "chat.completion",
            "model": "gpt-test",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
            "usage": usage,
        })
    };
    let usage = |prompt: &str| {
        let (p, c) = usage_of(prompt);
        json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
    };
    let echo = |prompt: &str| format!("echo: {prompt}");

    let p = "weather in Paris? [[reply:tool_calls]]";
    assert_eq!(
        stable(reply(&client, &base, p).await),
        completion(
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            }]}),
            "tool_calls",
            usage(p)
        )
    );

    let p = "something bad [[reply:refusal]]";
    assert_eq!(
        stable(reply(&client, &base, p).await),
        completion(
            json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}),
            "stop",
            usage(p)
        )
    );

    let p = "think hard [[reply:empty]]";
    assert_eq!(
        stable(reply(&client, &base, p).await),
        completion(
            json!({"role": "assistant", "content": null}),
            "length",
            usage(p)
        )
    );

    let p = "fast one [[reply:groq]]";
    let body = stable(reply(&client, &base, p).await);
    let (pt, ct) = usage_of(p);
    assert_eq!(body["service_tier"], "on_demand", "{body}");
    assert_eq!(body["x_groq"], json!({}), "{body}");
    assert!(body["system_fingerprint"].is_string(), "{body}");
    let u = &body["usage"];
    assert_eq!(
        (
            &u["prompt_tokens"],
            &u["completion_tokens"],
            &u["total_tokens"]
        ),
        (&json!(pt), &json!(ct), &json!(pt + ct)),
        "{body}"
    );
    for timing in ["queue_time", "prompt_time", "completion_time", "total_time"] {
        assert!(u[timing].is_f64(), "{timing}: {body}");
    }
    assert_eq!(body["choices"][0]["message"]["content"], echo(p));
    assert_eq!(body["choices"][0]["finish_reason"], "stop");

    let p = "terse server [[reply:sparse]]";
    let (pt, ct) = usage_of(p);
    assert_eq!(
        reply(&client, &base, p).await,
        json!({
            "object": "chat.completion",
            "model": null,
            "choices": [{"message": {"role": "assistant", "content": echo(p)}, "finish_reason": "eos_token"}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct},
        })
    );

    let p = "uncounted [[reply:no_usage]]";
    let body = stable(reply(&client, &base, p).await);
    assert!(body.get("usage").is_none(), "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], echo(p));

    assert_eq!(
        reply(&client, &base, "busy [[reply:error200]]").await,
        json!({"error": {"message": "upstream overloaded", "type": "server_error", "code": "overloaded"}})
    );
    assert_eq!(
        reply(&client, &base, "busy [[reply:error200_rate]]").await,
        json!({"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": 429}})
    );

    let p = "again and again [[reply:cached]]";
    let (pt, ct) = usage_of(p);
    assert_eq!(
        stable(reply(&client, &base, p).await),
        completion(
            json!({"role": "assistant", "content": echo(p)}),
            "stop",
            json!({
                "prompt_tokens": pt,
                "completion_tokens": ct,
                "total_tokens": pt + ct,
                "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 2,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            })
        )
    );

    let p = "in parts [[reply:parts]]";
    assert_eq!(
        stable(reply(&client, &base, p).await),
        completion(
            json!({"role": "assistant", "content": [{"type": "text", "text": echo(p)}]}),
            "stop",
            usage(p)
        )
    );
    assert_eq!(mock.total_calls(), 10);
}

#[tokio::test]
async fn reply_windows_combine_with_faults() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let p = "seq [[fail:500:1]][[reply:empty:2]][[reply:tool_calls:3]]";
    let resp = chat(&client, &base, p).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body = reply(&client, &base, p).await;
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    let body = reply(&client, &base, p).await;
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{body}");
    let body = reply(&client, &base, p).await;
    assert_eq!(body["choices"][0]["finish_reason"], "stop", "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        format!("echo: {p}")
    );
    assert_eq!(mock.calls(p), 4);

    // A reply marker does not stop a scripted fault, nor the other way round.
    let p = "[[reply:refusal]] then [[fail:429:1:ms:10]]";
    let resp = chat(&client, &base, p).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after-ms"], "10");
    let body = reply(&client, &base, p).await;
    assert_eq!(
        body["choices"][0]["message"]["refusal"],
        "I can't help with that."
    );
}

/// A call parsed with async-openai's response type, as a strict client does.
async fn openai_call(
    base: &str,
    prompt: &str,
) -> Result<CreateChatCompletionResponse, serde_json::Error> {
    let resp = chat(&reqwest::Client::new(), base, prompt).await;
    assert_eq!(resp.status(), StatusCode::OK, "{prompt}");
    serde_json::from_slice(&resp.bytes().await.unwrap())
}

/// The OpenAI shapes parse with OpenAI's own types (async-openai); the
/// others break a strict client exactly as issue 11 describes.
#[tokio::test]
async fn a_strict_client_takes_the_openai_shapes_and_chokes_on_the_rest() {
    let (base, _, _) = start(MockConfig::default()).await;

    let r = openai_call(&base, "w [[reply:tool_calls]]").await.unwrap();
    let choice = &r.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    assert_eq!(choice.message.content, None);
    match choice.message.tool_calls.as_deref() {
        Some([ChatCompletionMessageToolCalls::Function(call)]) => {
            assert_eq!(call.function.name, "get_weather");
            assert_eq!(call.function.arguments, r#"{"city":"Paris"}"#);
        }
        other => panic!("{other:?}"),
    }

    let r = openai_call(&base, "r [[reply:refusal]]").await.unwrap();
    assert_eq!(
        r.choices[0].message.refusal.as_deref(),
        Some("I can't help with that.")
    );
    assert_eq!(r.choices[0].message.content, None);

    let r = openai_call(&base, "e [[reply:empty]]").await.unwrap();
    assert_eq!(r.choices[0].finish_reason, Some(FinishReason::Length));
    assert_eq!(r.choices[0].message.content, None);

    let r = openai_call(&base, "c [[reply:cached]]").await.unwrap();
    let usage = r.usage.unwrap();
    assert_eq!(usage.prompt_tokens_details.unwrap().cached_tokens, Some(3));
    assert_eq!(
        usage.completion_tokens_details.unwrap().reasoning_tokens,
        Some(2)
    );

    let r = openai_call(&base, "n [[reply:no_usage]]").await.unwrap();
    assert!(r.usage.is_none());

    for kind in ["groq", "sparse", "parts", "error200", "error200_rate"] {
        let prompt = format!("strict [[reply:{kind}]]");
        let parsed = openai_call(&base, &prompt).await;
        assert!(parsed.is_err(), "{kind}: a strict client parsed {parsed:?}");
    }
}

#[tokio::test]
async fn records_show_authorization_and_max_tokens() {
    let (base, root, mock) = start(MockConfig {
        record: true,
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    let post = |body: Value| client.post(format!("{base}/chat/completions")).json(&body);
    let with = |prompt: &str, extra: Value| {
        let mut body = chat_body(prompt);
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let sent = [
        with("capped", json!({"max_tokens": 4096})),
        with("completion cap", json!({"max_completion_tokens": 50})),
        with("uncapped", json!({})),
        with("odd cap", json!({"max_tokens": "lots"})),
    ];
    post(sent[0].clone())
        .bearer_auth("sk-1")
        .send()
        .await
        .unwrap();
    post(sent[1].clone()).send().await.unwrap();
    // What a client with an empty key sends; HTTP drops the trailing space.
    post(sent[2].clone())
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();
    post(sent[3].clone()).send().await.unwrap();
    post(sent[0].clone()).send().await.unwrap();

    let records = mock.request_records();
    /// prompt, call, Authorization, max_tokens, max_completion_tokens
    type Seen<'a> = (&'a str, u64, Option<&'a str>, Option<u64>, Option<u64>);
    let view: Vec<Seen<'_>> = records
        .iter()
        .map(|r| {
            (
                r.prompt.as_str(),
                r.call,
                r.authorization.as_deref(),
                r.max_tokens,
                r.max_completion_tokens,
            )
        })
        .collect();
    assert_eq!(
        view,
        [
            ("capped", 1, Some("Bearer sk-1"), Some(4096), None),
            ("completion cap", 1, None, None, Some(50)),
            ("uncapped", 1, Some("Bearer"), None, None),
            ("odd cap", 1, None, None, None),
            ("capped", 2, None, Some(4096), None),
        ]
    );
    assert_eq!(records[3].body["max_tokens"], "lots");
    let bodies: Vec<Value> = records.iter().map(|r| r.body.clone()).collect();
    assert_eq!(mock.requests(), bodies);
    assert_eq!(bodies[..4], sent);

    let over_http: Value = client
        .get(format!("{root}/_mock/request_records"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http.as_array().unwrap().len(), 5);
    assert_eq!(
        over_http[0],
        json!({
            "prompt": "capped",
            "call": 1,
            "authorization": "Bearer sk-1",
            "max_tokens": 4096,
            "max_completion_tokens": null,
            "body": sent[0],
        })
    );
    assert_eq!(over_http[1]["authorization"], Value::Null);

    mock.reset();
    assert!(mock.request_records().is_empty());

    // Off: nothing is kept.
    let (base, _, plain) = start(MockConfig::default()).await;
    chat(&client, &base, "first").await;
    assert!(plain.request_records().is_empty());

    // A request the api key turns away is not recorded; an accepted one is.
    let (base, _, guarded) = start(MockConfig {
        api_key: Some("k".into()),
        record: true,
        ..MockConfig::default()
    })
    .await;
    let guarded_post = || {
        client
            .post(format!("{base}/chat/completions"))
            .json(&chat_body("g"))
    };
    assert_eq!(
        guarded_post().send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        guarded_post()
            .bearer_auth("k")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let records: Vec<RequestRecord> = guarded.request_records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].authorization.as_deref(), Some("Bearer k"));
}
