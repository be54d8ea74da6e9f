//! Reading a chat-completions reply tolerantly.
//!
//! OpenAI-compatible servers each bend the schema a little: Groq adds `service_tier: "on_demand"`,
//! llama.cpp says `finish_reason: "eos_token"`, some omit `created`, `choices[].index` or
//! `usage.total_tokens`, send `model: null`, or send content as an array of parts. A strict parse
//! (async-openai's response type) throws such a reply away after its tokens were paid for. Here
//! only the fields agentq uses are read, each on its own: a field of an unexpected type reads as
//! absent instead of failing the reply, unknown fields are ignored, and unknown enum values
//! (finish reasons) are kept as strings.

use agentq_common::task::{TaskResult, Usage};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::{truncate, LlmFailure, MAX_ERROR_BODY};

/// A field that reads as `None` when it is missing, `null`, or of a type we do not expect.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let v = Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// A token count: an integer, or a float some servers send (rounded); anything else is absent.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = Value::deserialize(d)?;
    let n = match &v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f.round() as u64)
        }),
        _ => None,
    };
    Ok(n.map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default, deserialize_with = "lenient")]
    choices: Option<Vec<Choice>>,
    #[serde(default, deserialize_with = "lenient")]
    model: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default, deserialize_with = "lenient")]
    index: Option<u64>,
    #[serde(default, deserialize_with = "lenient")]
    message: Option<WireMessage>,
    #[serde(default, deserialize_with = "lenient")]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default, deserialize_with = "lenient")]
    content: Option<Content>,
    #[serde(default, deserialize_with = "lenient")]
    refusal: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    tool_calls: Option<Vec<Value>>,
    /// Where LiteLLM moves fields it does not model, `refusal` among them.
    #[serde(default, deserialize_with = "lenient")]
    provider_specific_fields: Option<ProviderFields>,
}

#[derive(Deserialize)]
struct ProviderFields {
    #[serde(default, deserialize_with = "lenient")]
    refusal: Option<String>,
}

/// Message content: a string, or (as some servers send) an array of content parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

impl Content {
    fn into_text(self) -> String {
        match self {
            Content::Text(t) => t,
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        }
    }
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default, deserialize_with = "count")]
    prompt_tokens: Option<u32>,
    #[serde(default, deserialize_with = "count")]
    completion_tokens: Option<u32>,
    #[serde(default, deserialize_with = "count")]
    total_tokens: Option<u32>,
    #[serde(default, deserialize_with = "lenient")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, deserialize_with = "lenient")]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default, deserialize_with = "count")]
    cached_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default, deserialize_with = "count")]
    reasoning_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        let prompt = u.prompt_tokens.unwrap_or(0);
        let completion = u.completion_tokens.unwrap_or(0);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            // A total of 0 beside non-zero parts is a proxy's placeholder (LiteLLM writes 0 when
            // the upstream sent no total), not a count: read it as absent.
            total_tokens: u
                .total_tokens
                .filter(|t| *t > 0 || (prompt == 0 && completion == 0))
                .unwrap_or_else(|| prompt.saturating_add(completion)),
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
            reasoning_tokens: u.completion_tokens_details.and_then(|d| d.reasoning_tokens),
        }
    }
}

/// What a 2xx body said: the usage it reported (counted even when the reply is then refused), and
/// the result or why there is none.
pub struct Parsed {
    pub usage: Option<Usage>,
    pub result: Result<TaskResult, LlmFailure>,
}

/// Reads a 2xx chat-completions body. `model` is the requested model, used when the server
/// names none.
pub fn parse(body: &[u8], model: &str) -> Parsed {
    let completion: Completion = match serde_json::from_slice(body) {
        Ok(c) => c,
        Err(e) => {
            let head = truncate(
                String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned(),
                120,
            );
            return Parsed {
                usage: None,
                result: Err(LlmFailure::Permanent {
                    outcome: "bad_response",
                    message: format!("llm answer is not a chat completion ({e}): {head}"),
                }),
            };
        }
    };
    read(completion, model)
}

fn read(completion: Completion, model: &str) -> Parsed {
    let usage = completion.usage.map(Usage::from);
    let choices = completion.choices.unwrap_or_default();
    if choices.is_empty() {
        let result = match completion.error.filter(|e| !e.is_null()) {
            Some(error) => Err(classify_error_object(&error)),
            None => Err(LlmFailure::Permanent {
                outcome: "bad_response",
                message: "llm answer has no choices".to_owned(),
            }),
        };
        return Parsed { usage, result };
    }
    // The first choice by index (n = 1 is all agentq asks for), else the first listed.
    let mut choices = choices;
    let at = choices.iter().position(|c| c.index == Some(0)).unwrap_or(0);
    let choice = choices.swap_remove(at);
    let finish_reason = choice.finish_reason;
    let (content, refusal, tool_calls) = match choice.message {
        Some(m) => (
            m.content.map(Content::into_text),
            m.refusal
                .or_else(|| m.provider_specific_fields.and_then(|p| p.refusal)),
            m.tool_calls,
        ),
        None => (None, None, None),
    };
    reply(
        Reply {
            usage,
            model: completion.model,
            finish_reason,
            content,
            refusal,
            tool_calls,
        },
        model,
    )
}

/// The parts of a completion's first choice the result is made of, as read from the wire (a
/// streamed answer's, accumulated, are the same parts).
pub struct Reply {
    pub usage: Option<Usage>,
    /// The model the server named.
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub content: Option<String>,
    pub refusal: Option<String>,
    pub tool_calls: Option<Vec<Value>>,
}

/// The result a reply's parts make: empty parts are absent, and a reply with no content, refusal
/// or tool calls is an `empty_response`. `model` is the requested model, used when the server
/// names none.
pub fn reply(parts: Reply, model: &str) -> Parsed {
    let Reply {
        usage,
        model: named,
        finish_reason,
        content,
        refusal,
        tool_calls,
    } = parts;
    let content = content.filter(|c| !c.is_empty());
    let refusal = refusal.filter(|r| !r.is_empty());
    let tool_calls = tool_calls.filter(|t| !t.is_empty());
    if content.is_none() && refusal.is_none() && tool_calls.is_none() {
        return Parsed {
            usage,
            result: Err(LlmFailure::Permanent {
                outcome: "empty_response",
                message: format!(
                    "llm answer has no content, refusal or tool calls (finish_reason: {})",
                    finish_reason.as_deref().unwrap_or("none")
                ),
            }),
        };
    }
    let result = TaskResult {
        content: content.unwrap_or_default(),
        model: named
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| model.to_owned()),
        usage: usage.unwrap_or_default(),
        finish_reason,
        refusal,
        tool_calls: tool_calls.map(Value::Array),
        upstream: None,
        fallbacks: Vec::new(),
    };
    Parsed {
        usage,
        result: Ok(result),
    }
}

/// A usage object read as a completion's `usage` is (leniently: one that does not read is
/// absent).
pub fn usage_of(v: Value) -> Option<Usage> {
    serde_json::from_value::<WireUsage>(v).ok().map(Usage::from)
}

/// A 2xx whose body is an error object (`{"error": {...}}`), as proxies send when an upstream
/// failed after the status line was chosen. Classified by what it says: rate limits wait,
/// request errors are permanent, anything else (overloaded, upstream down, unknown) is transient
/// like a 5xx, since the same request usually succeeds later.
pub fn classify_error_object(error: &Value) -> LlmFailure {
    let message = match error {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| error.to_string()),
        other => other.to_string(),
    };
    let message = truncate(
        format!("llm answered 200 with an error: {message}"),
        MAX_ERROR_BODY,
    );
    let field = |k: &str| error.get(k);
    let words: String = ["type", "code", "status"]
        .iter()
        .filter_map(|k| field(k).and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_lowercase();
    let numbers: Vec<u64> = ["code", "status", "status_code"]
        .iter()
        .filter_map(|k| {
            field(k).and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
        })
        .collect();
    let rate_limited = numbers.contains(&429)
        || [
            "rate_limit",
            "rate limit",
            "ratelimit",
            "too_many_requests",
            "resource_exhausted",
        ]
        .iter()
        .any(|w| words.contains(w));
    if rate_limited {
        return LlmFailure::RateLimited {
            retry_after: None,
            message,
        };
    }
    let client = numbers
        .iter()
        .any(|n| matches!(n, 400 | 401 | 403 | 404 | 422))
        || [
            "invalid_request_error",
            "authentication_error",
            "permission_error",
            "not_found_error",
            "invalid_api_key",
            "context_length_exceeded",
        ]
        .iter()
        .any(|w| words.contains(w));
    if client {
        return LlmFailure::Permanent {
            outcome: "client_error",
            message,
        };
    }
    LlmFailure::Transient {
        outcome: "upstream_error",
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(body: Value) -> TaskResult {
        let p = parse(body.to_string().as_bytes(), "asked");
        p.result.expect("a result")
    }

    fn err(body: Value) -> LlmFailure {
        parse(body.to_string().as_bytes(), "asked")
            .result
            .expect_err("a failure")
    }

    #[test]
    fn groq_style_extra_fields_are_ignored() {
        let r = ok(json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "llama-3",
            "service_tier": "on_demand", "system_fingerprint": "fp_1", "x_groq": {"id": "req_1"},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                      "queue_time": 0.01, "prompt_time": 0.002}
        }));
        assert_eq!(r.content, "hi");
        assert_eq!(r.model, "llama-3");
        assert_eq!(r.finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            (
                r.usage.prompt_tokens,
                r.usage.completion_tokens,
                r.usage.total_tokens
            ),
            (5, 2, 7)
        );
    }

    #[test]
    fn sparse_replies_get_defaults() {
        let r = ok(json!({
            "model": null,
            "choices": [{"message": {"content": "x"}, "finish_reason": "eos_token"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4}
        }));
        assert_eq!(r.model, "asked");
        assert_eq!(r.finish_reason.as_deref(), Some("eos_token"));
        assert_eq!(r.usage.total_tokens, 7);
        let r = ok(json!({"choices": [{"message": {"content": "x"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 0}}));
        assert_eq!(r.usage.total_tokens, 7, "LiteLLM's placeholder 0 is summed");
        let r = ok(json!({"choices": [{"message": {"content": "x"}, "finish_reason": ""}]}));
        assert_eq!(r.finish_reason.as_deref(), Some(""));
        assert_eq!(r.usage, Usage::default());
        // fields of the wrong type read as absent
        let r = ok(
            json!({"model": 7, "choices": [{"index": "zero", "message": {"content": "x"},
            "finish_reason": 3}], "usage": {"prompt_tokens": "many", "completion_tokens": 2.6}}),
        );
        assert_eq!((r.model.as_str(), r.finish_reason), ("asked", None));
        assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (0, 3));
    }

    #[test]
    fn usage_details_are_kept() {
        let r = ok(
            json!({"choices": [{"message": {"content": "x"}}], "usage": {
            "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 2}}}),
        );
        assert_eq!(r.usage.cached_tokens, Some(3));
        assert_eq!(r.usage.reasoning_tokens, Some(2));
        let huge = ok(json!({"choices": [{"message": {"content": "x"}}],
            "usage": {"prompt_tokens": 1e30, "completion_tokens": -4}}));
        assert_eq!(huge.usage.prompt_tokens, u32::MAX);
        assert_eq!(huge.usage.completion_tokens, 0);
    }

    #[test]
    fn content_parts_are_joined() {
        let r = ok(json!({"choices": [{"message": {"content": [
            {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}
        ]}}]}));
        assert_eq!(r.content, "ab");
    }

    #[test]
    fn tool_calls_and_refusals_are_results() {
        let call = json!({"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}});
        let r = ok(
            json!({"choices": [{"message": {"content": null, "tool_calls": [call]},
            "finish_reason": "tool_calls"}]}),
        );
        assert_eq!(r.content, "");
        assert_eq!(r.tool_calls, Some(json!([call])));
        assert_eq!(r.finish_reason.as_deref(), Some("tool_calls"));
        let r = ok(
            json!({"choices": [{"message": {"content": null, "refusal": "I can't help with that."},
            "finish_reason": "stop"}]}),
        );
        assert_eq!(r.refusal.as_deref(), Some("I can't help with that."));
        assert_eq!(r.content, "");
        // LiteLLM relays a refusal under provider_specific_fields
        let r = ok(
            json!({"choices": [{"message": {"content": null, "refusal": null,
            "provider_specific_fields": {"refusal": "No."}}, "finish_reason": "stop"}]}),
        );
        assert_eq!(r.refusal.as_deref(), Some("No."));
    }

    #[test]
    fn an_empty_reply_is_named_and_its_tokens_still_count() {
        let body = json!({"choices": [{"message": {"content": null}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 100}});
        let p = parse(body.to_string().as_bytes(), "m");
        assert_eq!(p.usage.map(|u| u.completion_tokens), Some(100));
        let f = p.result.expect_err("empty");
        assert_eq!(f.outcome(), "empty_response");
        assert!(
            f.message().contains("finish_reason: length"),
            "{}",
            f.message()
        );
        assert_eq!(
            err(json!({"choices": [{"message": {"content": ""}}]})).outcome(),
            "empty_response"
        );
        assert_eq!(err(json!({"choices": [{}]})).outcome(), "empty_response");
    }

    #[test]
    fn not_a_completion_is_a_bad_response() {
        for body in [
            &b"<html>oops</html>"[..],
            b"[]",
            b"",
            b"{\"choices\": []}",
            b"{}",
        ] {
            let f = parse(body, "m").result.expect_err("bad");
            assert_eq!(
                f.outcome(),
                "bad_response",
                "{:?}",
                String::from_utf8_lossy(body)
            );
            assert!(matches!(f, LlmFailure::Permanent { .. }));
        }
    }

    #[test]
    fn an_error_in_a_200_is_classified_by_its_content() {
        let f = err(
            json!({"error": {"message": "upstream overloaded", "type": "server_error", "code": "overloaded"}}),
        );
        assert!(matches!(
            f,
            LlmFailure::Transient {
                outcome: "upstream_error",
                ..
            }
        ));
        assert!(f.message().contains("upstream overloaded"));
        let f = err(
            json!({"error": {"message": "Rate limit reached", "type": "rate_limit_error", "code": 429}}),
        );
        assert!(matches!(f, LlmFailure::RateLimited { .. }));
        let f = err(json!({"error": {"message": "slow down", "code": "429"}}));
        assert!(matches!(f, LlmFailure::RateLimited { .. }));
        let f = err(json!({"error": {"message": "bad key", "type": "authentication_error"}}));
        assert!(matches!(
            f,
            LlmFailure::Permanent {
                outcome: "client_error",
                ..
            }
        ));
        let f = err(json!({"error": {"message": "nope", "status": 404}}));
        assert!(matches!(f, LlmFailure::Permanent { .. }));
        let f = err(json!({"error": "plain text"}));
        assert!(matches!(f, LlmFailure::Transient { .. }));
        assert!(f.message().ends_with("plain text"));
        let long = "x".repeat(10_000);
        assert!(err(json!({"error": {"message": long}})).message().len() <= MAX_ERROR_BODY + 4);
    }
}
