//! End-to-end tests of the mock over real loopback HTTP.

// Panicking on unexpected test data is exactly what a test should do.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime};

use agentq_mock_llm::{spawn, MockConfig, MockLlm};
use async_openai::error::ApiError;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
    CreateChatCompletionRequestArgs, CreateChatCompletionResponse, FinishReason,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn start(config: MockConfig) -> (String, String, MockLlm) {
    let (base, mock) = spawn(config).await.unwrap();
    assert!(
        base.starts_with("http://127.0.0.1:") && base.ends_with("/v1"),
        "{base}"
    );
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
        "temperature": 0.2,
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

/// The `type` of an OpenAI error envelope (the exact envelopes per status
/// are checked in `wire.rs`).
async fn error_type(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.unwrap();
    let error = body["error"].as_object().unwrap();
    let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    body["error"]["type"].as_str().unwrap().to_owned()
}

/// async-openai's own request and response types (its HTTP client is not
/// needed: the workspace builds it with the types only).
#[tokio::test]
async fn async_openai_parses_a_completion() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-test")
        .messages([
            ChatCompletionRequestSystemMessageArgs::default()
                .content("be brief")
                .build()
                .unwrap()
                .into(),
            ChatCompletionRequestUserMessageArgs::default()
                .content("hello  mock world")
                .build()
                .unwrap()
                .into(),
        ])
        .build()
        .unwrap();

    let resp = client
        .post(format!("{base}/chat/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let response: CreateChatCompletionResponse = resp.json().await.unwrap();

    assert!(response.id.starts_with("chatcmpl-"), "{}", response.id);
    assert_eq!(response.object, "chat.completion");
    assert_eq!(response.model, "gpt-test");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(u64::from(response.created).abs_diff(now) < 60);
    let choice = &response.choices[0];
    assert_eq!(choice.index, 0);
    assert_eq!(
        choice.message.content.as_deref(),
        Some("echo: hello  mock world")
    );
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    let usage = response.usage.unwrap();
    assert_eq!(usage.prompt_tokens, 5, "be brief + hello mock world");
    assert_eq!(usage.completion_tokens, 4);
    assert_eq!(usage.total_tokens, 9);
    assert_eq!(mock.calls("hello  mock world"), 1);
}

#[tokio::test]
async fn async_openai_surfaces_scripted_errors_as_api_errors() {
    #[derive(serde::Deserialize)]
    struct Wrapped {
        error: ApiError,
    }
    let (base, _, _) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-test")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("bad [[fail:422:*]]")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let resp = client
        .post(format!("{base}/chat/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let e = resp.json::<Wrapped>().await.unwrap().error;
    assert_eq!(e.r#type.as_deref(), Some("invalid_request_error"));
    assert!(e.message.contains("scripted failure 422"), "{e}");
}

#[tokio::test]
async fn raw_shape_and_content_parts() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{base}/chat/completions"))
        .json(&json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "earlier question"},
                {"role": "assistant", "content": null},
                {"role": "user", "content": [{"type": "text", "text": "parts prompt"}]},
            ],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "m");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "echo: parts prompt"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["choices"][0]
        .as_object()
        .unwrap()
        .contains_key("logprobs"));
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7})
    );
    assert_eq!(mock.calls("parts prompt"), 1);
    assert_eq!(mock.calls("earlier question"), 0);
}

#[tokio::test]
async fn malformed_requests_are_400_and_uncounted() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    for body in [
        "not json".to_owned(),
        json!({"model": "m"}).to_string(),
        json!({"model": "m", "messages": []}).to_string(),
        json!({"model": "m", "messages": [{"role": "user", "content": 5}]}).to_string(),
    ] {
        let resp = client
            .post(format!("{base}/chat/completions"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_type(resp).await, "invalid_request_error");
    }
    assert_eq!(mock.total_calls(), 0);

    // A typo in a marker must fail loudly rather than silently succeed.
    let resp = chat(&client, &base, "x [[fail:5OO:1]]").await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn models_healthz_and_unknown_routes() {
    let (base, root, _) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let models: Value = client
        .get(format!("{base}/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        models,
        json!({"object": "list", "data": [{"id": "mock-gpt", "object": "model", "created": 0, "owned_by": "agentq"}]})
    );
    let health = client.get(format!("{root}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok");
    let missing = client.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_type(missing).await, "invalid_request_error");
}

#[tokio::test]
async fn fail_first_n_calls_then_succeed() {
    let (base, root, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let prompt = "flaky [[fail:500:2]]";
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let resp = chat(&client, &base, prompt).await;
        let status = resp.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            assert_eq!(error_type(resp).await, "server_error");
        }
        statuses.push(status.as_u16());
    }
    assert_eq!(statuses, [500, 500, 200]);
    assert_eq!(mock.calls(prompt), 3);
    assert_eq!(mock.total_calls(), 3);

    let url = reqwest::Url::parse_with_params(&format!("{root}/_mock/calls"), [("prompt", prompt)])
        .unwrap();
    let count: Value = client.get(url).send().await.unwrap().json().await.unwrap();
    assert_eq!(count, json!({"prompt": prompt, "count": 3}));

    let always = "down [[fail:503:*]]";
    for _ in 0..3 {
        assert_eq!(
            chat(&client, &base, always).await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}

#[tokio::test]
async fn rate_limit_with_retry_after_seconds() {
    let (base, _, _) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let prompt = "limited [[fail:429:1:7]]";
    let resp = chat(&client, &base, prompt).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"].to_str().unwrap(), "7");
    assert_eq!(error_type(resp).await, "requests");
    assert_eq!(chat(&client, &base, prompt).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn rate_limit_with_retry_after_http_date() {
    let (base, _, _) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let resp = chat(&client, &base, "limited [[fail:429:1:date:5]]").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let header = resp.headers()["retry-after"].to_str().unwrap().to_owned();
    let at = httpdate::parse_http_date(&header).unwrap();
    let ahead = at.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        ahead >= Duration::from_secs(4) && ahead <= Duration::from_secs(6),
        "{header} is {ahead:?} ahead"
    );
}

#[tokio::test]
async fn hang_until_the_client_gives_up() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let send = |prompt: &'static str| {
        client
            .post(format!("{base}/chat/completions"))
            .json(&chat_body(prompt))
            .send()
    };
    let err = send("stuck [[hang]]").await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    let err = send("stuck once [[hang:1]]").await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(
        send("stuck once [[hang:1]]").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(mock.calls("stuck once [[hang:1]]"), 2);
}

#[tokio::test]
async fn drop_closes_the_connection_without_a_response() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let send = |prompt: &'static str| {
        client
            .post(format!("{base}/chat/completions"))
            .json(&chat_body(prompt))
            .send()
    };
    // Warm the pool so the drop happens on a reused keep-alive connection too.
    assert_eq!(send("warm").await.unwrap().status(), StatusCode::OK);

    for prompt in ["gone [[drop:2]]", "gone [[drop:2]]", "always gone [[drop]]"] {
        let err = send(prompt).await.unwrap_err();
        assert!(err.status().is_none(), "{err:?}");
        assert!(!err.is_timeout(), "{err:?}");
        assert!(err.is_request(), "{err:?}");
    }
    assert_eq!(
        send("gone [[drop:2]]").await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(mock.calls("gone [[drop:2]]"), 3);
    assert_eq!(send("warm").await.unwrap().status(), StatusCode::OK);
}

/// A client that gives up before the answer (a timeout during a `[[sleep]]`
/// or a `[[hang]]`) is counted as aborted, at once and without the journal;
/// answered calls and `[[drop]]`s are not; reset clears the count.
#[tokio::test]
async fn calls_the_client_gave_up_on_are_counted_as_aborted() {
    let (base, root, mock) = start(MockConfig::default()).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let aborted = |client: reqwest::Client| {
        let url = format!("{root}/_mock/calls");
        async move {
            let v: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            v["aborted"].as_u64().unwrap()
        }
    };
    let settled = |n: u64| {
        let mock = mock.clone();
        async move {
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
    };
    assert_eq!(
        chat(&client, &base, "answered").await.status(),
        StatusCode::OK
    );
    assert!(client
        .post(format!("{base}/chat/completions"))
        .json(&chat_body("closed by the mock [[drop]]"))
        .send()
        .await
        .is_err());
    assert_eq!(aborted(client.clone()).await, 0);

    let err = impatient
        .post(format!("{base}/chat/completions"))
        .json(&chat_body("slow [[sleep:5000]]"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    settled(1).await;
    let err = impatient
        .post(format!("{base}/chat/completions"))
        .json(&chat_body("stuck [[hang]]"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    settled(2).await;
    assert_eq!(aborted(client.clone()).await, 2);
    assert_eq!(mock.calls("slow [[sleep:5000]]"), 1);

    let resp = client
        .post(format!("{root}/_mock/reset"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(mock.aborted(), 0);
    assert_eq!(aborted(client).await, 0);
}

#[tokio::test]
async fn sleep_marker_and_global_latency_delay_answers() {
    let (base, _, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();

    let started = Instant::now();
    assert_eq!(
        chat(&client, &base, "slow [[sleep:200]]").await.status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(200));

    mock.set_latency(Duration::from_millis(150));
    let started = Instant::now();
    assert_eq!(chat(&client, &base, "plain").await.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));

    let started = Instant::now();
    assert_eq!(
        chat(&client, &base, "slower [[sleep:100]]").await.status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn error_rate_one_fails_everything() {
    let (base, root, mock) = start(MockConfig {
        error_rate: 1.0,
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    for _ in 0..5 {
        let resp = chat(&client, &base, "unlucky").await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error_type(resp).await, "server_error");
    }
    assert_eq!(mock.calls("unlucky"), 5);

    mock.set_error_rate(0.0);
    assert_eq!(
        chat(&client, &base, "unlucky").await.status(),
        StatusCode::OK
    );

    let config: Value = client
        .post(format!("{root}/_mock/config"))
        .json(&json!({"error_rate": 1.0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        config,
        json!({"latency_ms": 0, "error_rate": 1.0, "stream_rate": 0, "rpm": null, "tpm": null})
    );
    assert_eq!(
        chat(&client, &base, "unlucky").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

#[tokio::test]
async fn api_key_is_enforced_on_v1_only() {
    let (base, root, mock) = start(MockConfig {
        api_key: Some("secret".into()),
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    let post = |key: Option<&str>| {
        let req = client
            .post(format!("{base}/chat/completions"))
            .json(&chat_body("guarded"));
        match key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
        .send()
    };

    let resp = post(None).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_type(resp).await, "invalid_request_error");
    assert_eq!(
        post(Some("wrong")).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(post(Some("secret")).await.unwrap().status(), StatusCode::OK);
    assert_eq!(mock.total_calls(), 1, "rejected calls are not counted");

    let models = client.get(format!("{base}/models")).send().await.unwrap();
    assert_eq!(models.status(), StatusCode::UNAUTHORIZED);
    let health = client.get(format!("{root}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let calls = client
        .get(format!("{root}/_mock/calls"))
        .send()
        .await
        .unwrap();
    assert_eq!(calls.status(), StatusCode::OK);
}

#[tokio::test]
async fn control_endpoints_count_configure_and_reset() {
    let (base, root, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let odd = "a b&c=d ü?";
    for prompt in ["a", "a", odd] {
        assert_eq!(chat(&client, &base, prompt).await.status(), StatusCode::OK);
    }
    let get_json = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };

    assert_eq!(
        get_json(format!("{root}/_mock/calls")).await,
        json!({"total": 3, "by_prompt": {"a": 2, odd: 1}, "quota_rejections": 0, "blocked_rejections": 0, "aborted": 0,
            "connections": 1, "http2_connections": 0, "http2_requests": 0})
    );
    let url =
        reqwest::Url::parse_with_params(&format!("{root}/_mock/calls"), [("prompt", odd)]).unwrap();
    assert_eq!(
        get_json(url.to_string()).await,
        json!({"prompt": odd, "count": 1})
    );

    let resp = client
        .post(format!("{root}/_mock/config"))
        .json(&json!({"latency_ms": 40}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        get_json(format!("{root}/_mock/config")).await,
        json!({"latency_ms": 40, "error_rate": 0.0, "stream_rate": 0, "rpm": null, "tpm": null})
    );
    let started = Instant::now();
    assert_eq!(chat(&client, &base, "a").await.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(40));
    for bad in [
        json!({"error_rate": 1.5}),
        json!({"latency": 5}),
        json!({"rpm": -1}),
        json!({"tpm": "many"}),
        json!({"stream_rate": 1.5}),
    ] {
        let resp = client
            .post(format!("{root}/_mock/config"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
    }

    let resp = client
        .post(format!("{root}/_mock/reset"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert_eq!(mock.total_calls(), 0);
    assert_eq!(mock.calls("a"), 0);
    assert_eq!(
        get_json(format!("{root}/_mock/calls")).await,
        json!({"total": 0, "by_prompt": {}, "quota_rejections": 0, "blocked_rejections": 0, "aborted": 0,
            "connections": 0, "http2_connections": 0, "http2_requests": 0})
    );
    // Reset keeps scripted windows usable again from call 1.
    mock.set_latency(Duration::ZERO);
    let prompt = "again [[fail:500:1]]";
    assert_eq!(
        chat(&client, &base, prompt).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(chat(&client, &base, prompt).await.status(), StatusCode::OK);
    mock.reset();
    assert_eq!(
        chat(&client, &base, prompt).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

#[tokio::test]
async fn recording_keeps_request_bodies_in_order() {
    let (base, root, mock) = start(MockConfig {
        record: true,
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    chat(&client, &base, "first").await;
    chat(&client, &base, "second [[fail:500:*]]").await;
    let recorded = mock.requests();
    assert_eq!(
        recorded,
        vec![chat_body("first"), chat_body("second [[fail:500:*]]")]
    );
    let over_http: Value = client
        .get(format!("{root}/_mock/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http, Value::Array(recorded));

    client
        .post(format!("{root}/_mock/reset"))
        .send()
        .await
        .unwrap();
    assert!(mock.requests().is_empty());

    let (base, _, plain) = start(MockConfig::default()).await;
    chat(&client, &base, "first").await;
    assert!(plain.requests().is_empty());
}

/// Polls until every journaled call has ended (a client going away is seen by
/// the server a moment later).
async fn journal_settled(mock: &MockLlm) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.journal_open() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} calls never ended",
            mock.journal_open()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn journal_records_when_each_call_ended_and_how() {
    use agentq_mock_llm::CallOutcome;
    let (base, _, mock) = start(MockConfig {
        journal: true,
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    assert_eq!(chat(&client, &base, "plain").await.status(), StatusCode::OK);
    let flaky = "flaky [[fail:503:1]]";
    assert_eq!(
        chat(&client, &base, flaky).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(chat(&client, &base, flaky).await.status(), StatusCode::OK);
    let dropped = client
        .post(format!("{base}/chat/completions"))
        .json(&chat_body("dropped [[drop]]"))
        .send()
        .await;
    assert!(dropped.is_err(), "[[drop]] closes the connection");

    // Clients that give up: the call ends when they do, not when the mock would have answered.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for prompt in ["hangs [[hang]]", "slow [[sleep:5000]]"] {
        let r = impatient
            .post(format!("{base}/chat/completions"))
            .json(&chat_body(prompt))
            .send()
            .await;
        assert!(r.is_err(), "{prompt}: the client timed out");
    }

    // A client process that dies mid-call: its socket closes without a word.
    let killed = "killed client [[hang]]";
    let body = serde_json::to_vec(&chat_body(killed)).unwrap();
    let addr = base
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &body)
        .await
        .unwrap();
    while mock.calls(killed) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let closed_at = Instant::now();
    drop(stream);
    journal_settled(&mock).await;

    let journal = mock.journal();
    let find = |prompt: &str, call: u64| {
        journal
            .iter()
            .find(|r| r.prompt == prompt && r.call == call)
            .unwrap_or_else(|| panic!("{prompt} call {call} not journaled: {journal:?}"))
            .clone()
    };
    assert_eq!(journal.len(), 7, "{journal:?}");
    assert_eq!(find("plain", 1).outcome, CallOutcome::Status(200));
    assert_eq!(find(flaky, 1).outcome, CallOutcome::Status(503));
    assert_eq!(find(flaky, 2).outcome, CallOutcome::Status(200));
    assert!(find(flaky, 1).end <= find(flaky, 2).start);
    assert!(!find(flaky, 1).overlaps(&find(flaky, 2)));
    assert_eq!(find("dropped [[drop]]", 1).outcome, CallOutcome::Dropped);
    let hang = find("hangs [[hang]]", 1);
    assert_eq!(hang.outcome, CallOutcome::Hung);
    let slow = find("slow [[sleep:5000]]", 1);
    assert_eq!(slow.outcome, CallOutcome::Cancelled);
    for r in [&hang, &slow] {
        let took = r.end - r.start;
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{r:?} ended when the client gave up: {took:?}"
        );
    }
    let k = find(killed, 1);
    assert_eq!(k.outcome, CallOutcome::Hung);
    assert!(k.end >= closed_at && k.end - closed_at < Duration::from_secs(1));
    assert_eq!(mock.journal_evicted(), 0);

    mock.reset();
    assert!(mock.journal().is_empty());
}

/// `[[call:NAME:ARGS]]` scripts a tool-using model: it asks for the tools (all at once) until
/// the conversation ends with their results, then answers quoting them; a conversation out of
/// order gets OpenAI's 400 for it.
#[tokio::test]
async fn scripted_tool_calls_and_strict_tool_order() {
    let (base, _, _mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let prompt = r#"sum it [[call:add:{"a":2,"b":3}]][[call:echo]]"#;
    let post = |messages: Value| {
        let client = client.clone();
        let url = format!("{base}/chat/completions");
        async move {
            client
                .post(url)
                .json(&json!({"model": "m", "messages": messages}))
                .send()
                .await
                .unwrap()
        }
    };
    let first = post(json!([{"role": "user", "content": prompt}])).await;
    assert_eq!(first.status(), StatusCode::OK);
    let first: CreateChatCompletionResponse = first.json().await.unwrap();
    let choice = &first.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let raw = serde_json::to_value(&choice.message).unwrap();
    let calls = raw["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["id"], "call_1_0");
    assert_eq!(calls[0]["function"]["name"], "add");
    assert_eq!(calls[0]["function"]["arguments"], r#"{"a":2,"b":3}"#);
    assert_eq!(calls[1]["function"]["arguments"], "{}");

    let assistant = json!({"role": "assistant", "content": null, "tool_calls": calls});
    let answered = post(json!([
        {"role": "user", "content": prompt},
        assistant,
        {"role": "tool", "tool_call_id": "call_1_1", "content": "hi"},
        {"role": "tool", "tool_call_id": "call_1_0", "content": "5"},
    ]))
    .await;
    assert_eq!(answered.status(), StatusCode::OK);
    let answered: Value = answered.json().await.unwrap();
    assert_eq!(answered["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        answered["choices"][0]["message"]["content"],
        "tool results: hi; 5"
    );

    // one call left unanswered, then a result with no call before it
    let missing = post(json!([
        {"role": "user", "content": prompt},
        assistant,
        {"role": "tool", "tool_call_id": "call_1_0", "content": "5"},
    ]))
    .await;
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    let body: Value = missing.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("did not have response messages: call_1_1"),
        "{body}"
    );
    assert_eq!(body["error"]["param"], "messages");
    let orphan = post(json!([
        {"role": "user", "content": "x"},
        {"role": "tool", "tool_call_id": "call_9", "content": "5"},
    ]))
    .await;
    assert_eq!(orphan.status(), StatusCode::BAD_REQUEST);
    let bad_marker = post(json!([{"role": "user", "content": "[[call:no spaces]]"}])).await;
    assert_eq!(bad_marker.status(), StatusCode::BAD_REQUEST);
}

/// One port answers HTTP/2 with prior knowledge (h2c) as well as HTTP/1.1; the streams of one
/// connection are independent: a `[[drop]]` resets its own stream only, and the calls around it
/// answer on the same connection. The stream limit is announced (calls past it wait their turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_multiplexes_calls_on_one_connection() {
    let (base, _, mock) = start(MockConfig {
        latency: Duration::from_millis(200),
        h2_max_streams: 4,
        ..MockConfig::default()
    })
    .await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let calls = (0..8).map(|i| {
        let h2 = h2.clone();
        let base = base.clone();
        async move {
            let prompt = if i == 3 {
                "dropped [[drop]]".to_owned()
            } else {
                format!("p{i}")
            };
            let sent = h2
                .post(format!("{base}/chat/completions"))
                .json(&chat_body(&prompt))
                .send()
                .await;
            (i, sent)
        }
    });
    let started = Instant::now();
    for (i, sent) in futures::future::join_all(calls).await {
        if i == 3 {
            let e = sent.expect_err("a dropped call is reset, not answered");
            assert!(!e.is_connect(), "{e}");
            continue;
        }
        let resp = sent.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("echo: p{i}")
        );
    }
    // 8 calls at 4 streams a connection on one connection: two rounds of the latency
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(mock.total_calls(), 8);
    assert_eq!(mock.http2_requests(), 8);
    assert_eq!(mock.http2_connections(), 1);
    assert_eq!(mock.connections(), 1);
    // HTTP/1.1 on the same port still works and is not counted as HTTP/2
    let resp = chat(&reqwest::Client::new(), &base, "one").await;
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(mock.http2_requests(), 8);
    assert_eq!(mock.connections(), 2);
}
