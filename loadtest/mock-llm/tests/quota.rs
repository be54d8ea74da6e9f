//! Quota mode and the 429 storm over real loopback HTTP.
//!
//! Header values are checked exactly: the journal's arrivals carry the very
//! `Instant`s the quota used, so each expected reset is computable.

// Panicking on unexpected test data is exactly what a test should do.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use agentq_mock_llm::{spawn, CallOutcome, MockConfig, MockLlm, QuotaStatus, Rejection};
use reqwest::StatusCode;
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

async fn start(config: MockConfig) -> (String, String, MockLlm) {
    let (base, mock) = spawn(config).await.unwrap();
    let root = base.trim_end_matches("/v1").to_owned();
    (base, root, mock)
}

async fn post(client: &reqwest::Client, base: &str, body: &Value) -> reqwest::Response {
    client
        .post(format!("{base}/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A system message of 2 words and the prompt: usage is `2 + words(prompt)`
/// prompt tokens and `1 + words(prompt)` completion tokens.
async fn chat(client: &reqwest::Client, base: &str, prompt: &str) -> reqwest::Response {
    let body = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": prompt},
        ],
    });
    post(client, base, &body).await
}

fn header(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

/// Milliseconds of a Go duration (`0s`, `20ms`, `1.5s`, `1m0s`, `1h2m3.5s`).
fn go_ms(s: &str) -> u64 {
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or_else(|| panic!("no unit in {s:?}"));
        let number: f64 = rest[..n].parse().unwrap();
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += number
            * match &rest[..u] {
                "h" => 3_600_000.0,
                "m" => 60_000.0,
                "s" => 1000.0,
                "ms" => 1.0,
                unit => panic!("unit {unit:?} in {s:?}"),
            };
        rest = &rest[u..];
    }
    total.round() as u64
}

/// What the mock reports for `d`: whole milliseconds, rounded up.
fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap()
}

/// The quota's view of the call of `prompt` (each test prompt is used once).
fn arrived(mock: &MockLlm, prompt: &str) -> Instant {
    mock.arrivals()
        .iter()
        .find(|a| a.prompt == prompt)
        .unwrap_or_else(|| panic!("{prompt} did not arrive"))
        .start
}

/// Checks `x-ratelimit-{limit,remaining,reset}-{kind}` exactly.
fn assert_limit(resp: &reqwest::Response, kind: &str, limit: u64, remaining: u64, reset: Duration) {
    let h = |what: &str| header(resp, &format!("x-ratelimit-{what}-{kind}"));
    assert_eq!(h("limit"), Some(limit.to_string()), "limit-{kind}");
    assert_eq!(
        h("remaining"),
        Some(remaining.to_string()),
        "remaining-{kind}"
    );
    let got = h("reset").unwrap_or_else(|| panic!("no reset-{kind}"));
    assert_eq!(go_ms(&got), ceil_ms(reset), "reset-{kind} {got:?}");
}

fn assert_no_limit(resp: &reqwest::Response, kind: &str) {
    for what in ["limit", "remaining", "reset"] {
        let name = format!("x-ratelimit-{what}-{kind}");
        assert_eq!(header(resp, &name), None, "{name}");
    }
}

/// The error envelope of a rate-limit 429, returning its message.
async fn rate_limit_error(resp: reqwest::Response, kind: &str) -> String {
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["param"], Value::Null, "{body}");
    body["error"]["message"].as_str().unwrap().to_owned()
}

/// Three per minute: the fourth call is refused until the first leaves, and
/// then only one more fits, as the second and third still count (a sliding
/// window, not a fixed minute). Takes a little over a minute of real time.
#[tokio::test]
async fn rpm_holds_over_an_exact_sliding_minute() {
    let (base, _, mock) = start(MockConfig {
        rpm: Some(3),
        journal: true,
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();

    let a = chat(&client, &base, "A").await;
    assert_eq!(a.status(), StatusCode::OK);
    assert_limit(&a, "requests", 3, 2, MINUTE);
    assert_eq!(header(&a, "x-ratelimit-reset-requests").unwrap(), "1m0s");
    assert_no_limit(&a, "tokens");
    let t_a = arrived(&mock, "A");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = chat(&client, &base, "B").await;
    assert_eq!(b.status(), StatusCode::OK);
    assert_limit(&b, "requests", 3, 1, t_a + MINUTE - arrived(&mock, "B"));
    let c = chat(&client, &base, "C").await;
    assert_eq!(c.status(), StatusCode::OK);
    assert_limit(&c, "requests", 3, 0, t_a + MINUTE - arrived(&mock, "C"));

    let d = chat(&client, &base, "D").await;
    let wait = t_a + MINUTE - arrived(&mock, "D");
    assert_limit(&d, "requests", 3, 0, wait);
    let reset = header(&d, "x-ratelimit-reset-requests").unwrap();
    let message = rate_limit_error(d, "requests").await;
    assert_eq!(
        message,
        format!(
            "Rate limit reached for gpt-test in organization org-mock on requests per min (RPM): \
             Limit 3, Used 3, Requested 1. Please try again in {reset}. Visit \
             https://platform.openai.com/account/rate-limits to learn more."
        )
    );
    assert_eq!(mock.quota_rejections(), 1);
    assert_eq!(
        mock.quota_status().requests,
        3,
        "a refused call is not counted"
    );
    let rejected: Vec<(String, Option<Rejection>)> = mock
        .arrivals()
        .into_iter()
        .map(|a| (a.prompt, a.rejected))
        .collect();
    assert_eq!(
        rejected,
        [
            ("A".into(), None),
            ("B".into(), None),
            ("C".into(), None),
            ("D".into(), Some(Rejection::Rpm))
        ]
    );
    let journal = mock.journal();
    let d_record = journal.iter().find(|r| r.prompt == "D").unwrap();
    assert_eq!(d_record.outcome, CallOutcome::Status(429));
    assert_eq!(d_record.start, arrived(&mock, "D"));

    // Just after A leaves the window one call fits; B and C still count.
    let until_a_leaves = (t_a + MINUTE).saturating_duration_since(Instant::now());
    tokio::time::sleep(until_a_leaves + Duration::from_millis(20)).await;
    let t_b = arrived(&mock, "B");
    let e = chat(&client, &base, "E").await;
    assert_eq!(e.status(), StatusCode::OK);
    assert_limit(&e, "requests", 3, 0, t_b + MINUTE - arrived(&mock, "E"));
    let f = chat(&client, &base, "F").await;
    let wait = t_b + MINUTE - arrived(&mock, "F");
    assert!(wait < Duration::from_millis(1500), "{wait:?}");
    assert_limit(&f, "requests", 3, 0, wait);
    rate_limit_error(f, "requests").await;
    assert_eq!(mock.quota_rejections(), 2);
}

/// Tokens are the `usage` the mock reports, counted at arrival; a call that
/// fits in what is left still gets in, a scripted fault bypasses the quota,
/// and a call larger than the whole quota is "too large".
#[tokio::test]
async fn tpm_counts_the_reported_usage() {
    let (base, _, mock) = start(MockConfig {
        tpm: Some(20),
        journal: true,
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();

    // 2 + 3 prompt tokens, "echo: one two three" is 4: 9 a call.
    let first = chat(&client, &base, "one two three").await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_limit(&first, "tokens", 20, 11, MINUTE);
    assert_no_limit(&first, "requests");
    let body: Value = first.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 9);
    let t1 = mock.arrivals()[0].start;

    let second = chat(&client, &base, "one two three").await;
    assert_eq!(second.status(), StatusCode::OK);
    let t2 = mock.arrivals()[1].start;
    assert_limit(&second, "tokens", 20, 2, t1 + MINUTE - t2);

    let third = chat(&client, &base, "one two three").await;
    let t3 = mock.arrivals()[2].start;
    // 18 used + 9 > 20: 7 must go, which the first call's 9 free.
    assert_limit(&third, "tokens", 20, 2, t1 + MINUTE - t3);
    let reset = header(&third, "x-ratelimit-reset-tokens").unwrap();
    let message = rate_limit_error(third, "tokens").await;
    assert_eq!(
        message,
        format!(
            "Rate limit reached for gpt-test in organization org-mock on tokens per min (TPM): \
             Limit 20, Used 18, Requested 9. Please try again in {reset}. Visit \
             https://platform.openai.com/account/rate-limits to learn more."
        )
    );
    assert_eq!(mock.arrivals()[2].rejected, Some(Rejection::Tpm));

    // An empty prompt alone: 1 prompt token (the minimum) + "echo:" = 2.
    let tiny = post(
        &client,
        &base,
        &json!({"messages": [{"role": "user", "content": ""}]}),
    )
    .await;
    assert_eq!(tiny.status(), StatusCode::OK);
    let t4 = mock.arrivals()[3].start;
    assert_limit(&tiny, "tokens", 20, 0, t1 + MINUTE - t4);
    let body: Value = tiny.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 2);

    // Scripted faults are answered as scripted, unchecked and uncounted.
    let scripted = chat(&client, &base, "[[fail:503:1]] x").await;
    assert_eq!(scripted.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_no_limit(&scripted, "tokens");
    assert_eq!(mock.arrivals()[4].rejected, None);

    let long = vec!["w"; 30].join(" ");
    let too_large = chat(&client, &base, &long).await;
    let message = rate_limit_error(too_large, "tokens").await;
    assert_eq!(
        message,
        "Request too large for gpt-test in organization org-mock on tokens per min (TPM): \
         Limit 20, Requested 63. The input or output tokens must be reduced in order to run \
         successfully. Visit https://platform.openai.com/account/rate-limits to learn more."
    );

    assert_eq!(mock.quota_rejections(), 2);
    assert_eq!(
        mock.quota_status(),
        QuotaStatus {
            rpm: None,
            tpm: Some(20),
            requests: 3,
            tokens: 20
        }
    );
}

/// `block_for`: every call is a 429 (markers too, even `[[hang]]`) saying
/// how long is left, journaled as refused by the storm, and not counted by the
/// quota; then calls are served again.
#[tokio::test]
async fn block_for_is_a_429_storm_until_it_ends() {
    let (base, _, mock) = start(MockConfig {
        rpm: Some(100),
        journal: true,
        ..MockConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    assert_eq!(
        chat(&client, &base, "before").await.status(),
        StatusCode::OK
    );

    let set = Instant::now();
    mock.block_for(Duration::from_millis(1200));
    assert!(mock.block_remaining() > Duration::ZERO);
    for prompt in ["during", "[[fail:500]] during", "[[hang]] during"] {
        let resp = tokio::time::timeout(Duration::from_secs(5), chat(&client, &base, prompt))
            .await
            .unwrap_or_else(|_| panic!("{prompt} was not answered at once"));
        assert_eq!(
            header(&resp, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        let reset = go_ms(&header(&resp, "x-ratelimit-reset-requests").unwrap());
        let left = Duration::from_millis(1200).saturating_sub(set.elapsed());
        assert!(
            reset > 0 && reset <= 1200 && reset >= ceil_ms(left),
            "{reset}"
        );
        let retry_after: u64 = header(&resp, "retry-after").unwrap().parse().unwrap();
        assert_eq!(
            retry_after,
            reset.div_ceil(1000),
            "whole seconds, rounded up"
        );
        rate_limit_error(resp, "requests").await;
    }
    assert_eq!(mock.blocked_rejections(), 3);
    assert_eq!(mock.quota_rejections(), 0);
    assert_eq!(
        mock.quota_status().requests,
        1,
        "storm calls are not counted"
    );
    let arrivals = mock.arrivals();
    assert_eq!(arrivals.len(), 4);
    assert!(arrivals[1..]
        .iter()
        .all(|a| a.rejected == Some(Rejection::Blocked)));
    let times = mock.call_times();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    let journal = mock.journal();
    assert!(journal
        .iter()
        .filter(|r| r.prompt.ends_with("during"))
        .all(|r| r.outcome == CallOutcome::Status(429)));

    while mock.block_remaining() > Duration::ZERO {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(set.elapsed() >= Duration::from_millis(1200));
    let after = chat(&client, &base, "after").await;
    assert_eq!(after.status(), StatusCode::OK);
    assert_eq!(
        header(&after, "x-ratelimit-remaining-requests").as_deref(),
        Some("98")
    );
}

/// The same from another process: `POST /_mock/block?ms=N`, `ms=0` ending it.
#[tokio::test]
async fn block_over_http() {
    let (base, root, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let block = |q: &'static str| {
        let client = client.clone();
        let url = format!("{root}/_mock/block{q}");
        async move { client.post(url).send().await.unwrap() }
    };

    let resp = block("?ms=60000").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let state: Value = resp.json().await.unwrap();
    let left = state["block_remaining_ms"].as_u64().unwrap();
    assert!((59_000..=60_000).contains(&left), "{state}");
    let storm = chat(&client, &base, "x").await;
    assert_eq!(storm.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&storm, "retry-after").as_deref(), Some("60"));
    assert_no_limit(&storm, "tokens");

    let state: Value = block("?ms=0").await.json().await.unwrap();
    assert_eq!(state["block_remaining_ms"], 0);
    assert_eq!(state["blocked_rejections"], 1);
    assert_eq!(chat(&client, &base, "x").await.status(), StatusCode::OK);
    assert_eq!(mock.blocked_rejections(), 1);

    for bad in ["", "?ms=soon", "?ms=-1"] {
        assert_eq!(block(bad).await.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
}

/// Quota set and cleared at runtime over `/_mock/config`, watched on
/// `/_mock/quota` and `/_mock/calls`; every admitted answer carries the
/// headers (a reply shape, an `error_rate` 500), none once it is off.
#[tokio::test]
async fn quota_over_http_controls() {
    let (base, root, mock) = start(MockConfig::default()).await;
    let client = reqwest::Client::new();
    let get_json = |path: &'static str| {
        let client = client.clone();
        let url = format!("{root}{path}");
        async move {
            let resp = client.get(url).send().await.unwrap();
            resp.json::<Value>().await.unwrap()
        }
    };
    let set_config = |body: Value| {
        let client = client.clone();
        let url = format!("{root}/_mock/config");
        async move {
            let resp = client.post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{body}");
            resp.json::<Value>().await.unwrap()
        }
    };

    let config = set_config(json!({"rpm": 2, "tpm": 1000})).await;
    assert_eq!(
        config,
        json!({"latency_ms": 0, "error_rate": 0.0, "stream_rate": 0, "rpm": 2, "tpm": 1000})
    );

    let shaped = chat(&client, &base, "[[reply:tool_calls]] hi").await;
    assert_eq!(shaped.status(), StatusCode::OK);
    // 2 + 2 prompt tokens (the marker is a word), 3 completion tokens.
    assert_limit(&shaped, "requests", 2, 1, MINUTE);
    assert_limit(&shaped, "tokens", 1000, 993, MINUTE);
    let body: Value = shaped.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 7);

    mock.set_error_rate(1.0);
    let failed = chat(&client, &base, "hi").await;
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        header(&failed, "x-ratelimit-remaining-requests").as_deref(),
        Some("0"),
        "an admitted call counts even if it then fails"
    );
    mock.set_error_rate(0.0);
    let refused = chat(&client, &base, "hi").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&refused, "x-ratelimit-remaining-tokens").as_deref(),
        Some("988")
    );

    let quota = get_json("/_mock/quota").await;
    assert_eq!(
        quota,
        json!({"rpm": 2, "tpm": 1000, "requests": 2, "tokens": 12,
               "quota_rejections": 1, "blocked_rejections": 0, "block_remaining_ms": 0})
    );
    assert_eq!(get_json("/_mock/calls").await["quota_rejections"], 1);

    // null lifts one limit and keeps the other; 0 lifts it too.
    let config = set_config(json!({"rpm": null})).await;
    assert_eq!(
        (config["rpm"].clone(), config["tpm"].clone()),
        (Value::Null, json!(1000))
    );
    let tokens_only = chat(&client, &base, "hi").await;
    assert_eq!(tokens_only.status(), StatusCode::OK);
    assert_no_limit(&tokens_only, "requests");
    assert_eq!(
        header(&tokens_only, "x-ratelimit-remaining-tokens").as_deref(),
        Some("983")
    );
    set_config(json!({"tpm": 0})).await;
    let free = chat(&client, &base, "hi").await;
    assert_eq!(free.status(), StatusCode::OK);
    assert_no_limit(&free, "requests");
    assert_no_limit(&free, "tokens");

    // The Rust API does the same; reset clears the window and the counters.
    mock.set_quota(Some(1), None);
    assert_eq!(get_json("/_mock/config").await["rpm"], 1);
    assert_eq!(
        chat(&client, &base, "hi").await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the window kept what it admitted while limited"
    );
    let resp = client
        .post(format!("{root}/_mock/reset"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    let quota = get_json("/_mock/quota").await;
    assert_eq!(
        (
            quota["requests"].clone(),
            quota["quota_rejections"].clone(),
            quota["rpm"].clone()
        ),
        (json!(0), json!(0), json!(1))
    );
    assert_eq!(chat(&client, &base, "hi").await.status(), StatusCode::OK);
}
