//! Markers scripted inside the last user message, e.g. `[[fail:503:2]]`.
//!
//! Markers are evaluated in the order they appear: `[[sleep:MS]]` markers add
//! up, the first `fail`/`hang`/`drop` marker whose call window covers the
//! current call number decides the fault, and the first `reply` marker whose
//! window covers it decides the shape of a successful answer. That lets one
//! prompt script a sequence such as "500 on call 1, 429 on call 2, then a
//! tool call" with `[[fail:500:1]][[fail:429:2]][[reply:tool_calls]]`.
//! Streamed answers have their own faults (`cut`, `midfail`, `stall`: the
//! first whose window covers the call decides) and a per-call token rate
//! (`stream_rate`, the first one counts).
//!
//! Marker arguments borrow from the prompt, so a plan allocates nothing
//! unless a `fail` marker carries rate-limit headers.

use std::time::Duration;

/// How many calls (1-based, per prompt) a marker applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    FirstCalls(u64),
    Always,
}

impl Window {
    fn covers(self, call: u64) -> bool {
        match self {
            Window::FirstCalls(n) => call <= n,
            Window::Always => true,
        }
    }
}

/// One rate-limit hint header a scripted failure carries. Values are
/// validated when the marker is parsed and sent verbatim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hint<'a> {
    /// `S`: `Retry-After: <seconds>`
    Seconds(u64),
    /// `date:S`: `Retry-After: <HTTP-date S seconds from now>`
    DateIn(u64),
    /// `raw:VALUE`: `Retry-After: VALUE`, whatever VALUE is.
    Raw(&'a str),
    /// `ms:MS`: `retry-after-ms: MS`
    Ms(&'a str),
    /// `reset:DUR`: `x-ratelimit-reset-requests: DUR` and
    /// `x-ratelimit-remaining-requests: 0`
    ResetRequests(&'a str),
    /// `reset_tokens:DUR`: `x-ratelimit-reset-tokens: DUR` and
    /// `x-ratelimit-remaining-tokens: 0`
    ResetTokens(&'a str),
    /// `litellm:S`: `llm_provider-retry-after: S`
    LiteLlm(&'a str),
    /// `anthropic:S`: `anthropic-ratelimit-requests-reset: <RFC 3339 time S
    /// seconds from now>`
    Anthropic(u64),
}

impl Hint<'_> {
    /// The header this hint sets, so a marker cannot set one twice.
    fn header(self) -> &'static str {
        match self {
            Hint::Seconds(_) | Hint::DateIn(_) | Hint::Raw(_) => "retry-after",
            Hint::Ms(_) => "retry-after-ms",
            Hint::ResetRequests(_) => "x-ratelimit-reset-requests",
            Hint::ResetTokens(_) => "x-ratelimit-reset-tokens",
            Hint::LiteLlm(_) => "llm_provider-retry-after",
            Hint::Anthropic(_) => "anthropic-ratelimit-requests-reset",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault<'a> {
    Fail { status: u16, hints: Vec<Hint<'a>> },
    Hang,
    Drop,
}

/// The shape of a successful (HTTP 200) answer, from `[[reply:KIND]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `content: null` and one `get_weather` function call.
    ToolCalls,
    /// `content: null` and a `refusal` string.
    Refusal,
    /// `content: null`, nothing else, `finish_reason: "length"`.
    Empty,
    /// Groq's extra fields (`service_tier`, `x_groq`, timing usage).
    Groq,
    /// No `id`, `created`, `index`, `total_tokens`; `model: null`;
    /// `finish_reason: "eos_token"`.
    Sparse,
    /// No `usage` object.
    NoUsage,
    /// A 200 whose body is an error object (upstream overloaded).
    Error200,
    /// A 200 whose body is a rate-limit error object (numeric code 429).
    Error200Rate,
    /// Usage with cached prompt tokens and reasoning tokens.
    Cached,
    /// Content as an array of content parts.
    Parts,
}

impl Reply {
    const KINDS: &'static str = "tool_calls, refusal, empty, groq, sparse, no_usage, error200, \
error200_rate, cached or parts";

    fn parse(kind: &str) -> Option<Self> {
        Some(match kind {
            "tool_calls" => Reply::ToolCalls,
            "refusal" => Reply::Refusal,
            "empty" => Reply::Empty,
            "groq" => Reply::Groq,
            "sparse" => Reply::Sparse,
            "no_usage" => Reply::NoUsage,
            "error200" => Reply::Error200,
            "error200_rate" => Reply::Error200Rate,
            "cached" => Reply::Cached,
            "parts" => Reply::Parts,
            _ => return None,
        })
    }
}

/// What goes wrong in a streamed answer once its 200 and some content are out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFaultKind {
    /// `[[cut:K]]`: close the connection abruptly.
    Cut,
    /// `[[midfail:K]]`: send an error event and end the body.
    MidFail,
    /// `[[stall:K]]`: send nothing more, for an hour, connection open.
    Stall,
}

/// A mid-stream fault and how many content chunks go out before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StreamFault {
    pub(crate) kind: StreamFaultKind,
    pub(crate) after: u64,
}

/// What to do with one call, after all markers were considered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Plan<'a> {
    pub(crate) extra_latency: Duration,
    pub(crate) fault: Option<Fault<'a>>,
    /// Only used when there is no fault; `None` is the plain echo.
    pub(crate) reply: Option<Reply>,
    /// `[[call:NAME:ARGS]]`: tools the model asks for (all at once) until the conversation
    /// ends with their results, then a final answer quoting them.
    pub(crate) calls: Vec<(&'a str, &'a str)>,
    /// `[[say:TEXT]]`: the reply's content instead of the echo (a planner's JSON, say).
    pub(crate) say: Option<&'a str>,
    /// `[[cut|midfail|stall:K:N]]`: only used when the answer is streamed.
    pub(crate) stream_fault: Option<StreamFault>,
    /// `[[stream_rate:N]]`: tokens per second of a streamed answer, instead of
    /// the configured rate (0: as fast as possible).
    pub(crate) stream_rate: Option<u64>,
}

/// Builds the plan for call number `call` (1-based) of `prompt`.
///
/// Only `[[fail…]]`, `[[hang…]]`, `[[drop…]]`, `[[sleep…]]`, `[[reply…]]`,
/// `[[call…]]`, `[[say…]]`, `[[stream_rate…]]`, `[[cut…]]`, `[[midfail…]]` and
/// `[[stall…]]` are markers; any other `[[…]]` text is ordinary prompt content. A malformed
/// marker is an error rather than being ignored, so a typo in a test script
/// fails loudly.
pub(crate) fn plan(prompt: &str, call: u64) -> Result<Plan<'_>, String> {
    let mut plan = Plan::default();
    // Fast path: the load tests send marker-free prompts at high rates.
    if !prompt.contains("[[") {
        return Ok(plan);
    }
    let mut rest = prompt;
    while let Some(start) = rest.find("[[") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("]]") else { break };
        let body = &after[..end];
        match parse_marker(body)? {
            Some(Marker::Sleep(extra)) => {
                plan.extra_latency = plan.extra_latency.saturating_add(extra);
            }
            Some(Marker::Fault(window, fault)) => {
                if plan.fault.is_none() && window.covers(call) {
                    plan.fault = Some(fault);
                }
            }
            Some(Marker::Reply(window, reply)) => {
                if plan.reply.is_none() && window.covers(call) {
                    plan.reply = Some(reply);
                }
            }
            Some(Marker::Call(name, args)) => plan.calls.push((name, args)),
            Some(Marker::Say(text)) => {
                plan.say.get_or_insert(text);
            }
            Some(Marker::StreamFault(window, fault)) => {
                if plan.stream_fault.is_none() && window.covers(call) {
                    plan.stream_fault = Some(fault);
                }
            }
            Some(Marker::StreamRate(rate)) => {
                plan.stream_rate.get_or_insert(rate);
            }
            None => {
                // Not a marker: resume right after this "[[" so that text like
                // "[[x]] [[fail:500:1]]" still finds the second one.
                rest = after;
                continue;
            }
        }
        rest = &after[end + 2..];
    }
    Ok(plan)
}

enum Marker<'a> {
    Sleep(Duration),
    Fault(Window, Fault<'a>),
    Reply(Window, Reply),
    Call(&'a str, &'a str),
    Say(&'a str),
    StreamFault(Window, StreamFault),
    StreamRate(u64),
}

const FAIL_FORMS: &str = "expected [[fail:CODE]] or [[fail:CODE:N]], optionally followed by \
headers: :S, :date:S, :ms:MS, :reset:DUR, :reset_tokens:DUR, :litellm:S, :anthropic:S, \
and last :raw:VALUE";

fn parse_marker(body: &str) -> Result<Option<Marker<'_>>, String> {
    let (kind, args) = body.split_once(':').unwrap_or((body, ""));
    let bad = |why: &str| Err(format!("invalid mock marker [[{body}]]: {why}"));
    // Like `args.split(':')`, but `raw:` can take the rest verbatim.
    let mut args = Args(if body.contains(':') { Some(args) } else { None });
    match kind {
        "fail" => {
            let Some(code) = args.next() else {
                return bad("expected [[fail:CODE:N]]");
            };
            let status = match code.parse::<u16>() {
                Ok(s) if (400..=599).contains(&s) => s,
                _ => return bad("CODE must be an HTTP status between 400 and 599"),
            };
            // A missing N means "always", which is the only sensible reading.
            let window = match args.next() {
                None => Window::Always,
                Some(n) => match parse_window(n) {
                    Some(w) => w,
                    None => return bad("N must be a call count or *"),
                },
            };
            let mut hints: Vec<Hint<'_>> = Vec::new();
            while let Some(form) = args.next() {
                let hint = match form {
                    "raw" => match args.rest() {
                        Some(value) if is_header_value(value) => Hint::Raw(value),
                        Some(_) => return bad("raw VALUE must be printable ASCII"),
                        None => return bad("expected raw:VALUE"),
                    },
                    "date" | "anthropic" => match args.next().map(str::parse::<u64>) {
                        Some(Ok(s)) if form == "date" => Hint::DateIn(s),
                        Some(Ok(s)) => Hint::Anthropic(s),
                        _ => return bad("S must be a non-negative integer of seconds"),
                    },
                    "ms" | "litellm" => match args.next() {
                        Some(v) if is_decimal(v) && form == "ms" => Hint::Ms(v),
                        Some(v) if is_decimal(v) => Hint::LiteLlm(v),
                        _ => {
                            return bad("the value must be a non-negative number, e.g. 250 or 1.5")
                        }
                    },
                    "reset" | "reset_tokens" => match args.next() {
                        Some(v) if is_go_duration(v) && form == "reset" => Hint::ResetRequests(v),
                        Some(v) if is_go_duration(v) => Hint::ResetTokens(v),
                        _ => return bad("DUR must be a Go duration such as 1s, 6m0s or 250ms"),
                    },
                    secs => match secs.parse() {
                        Ok(s) => Hint::Seconds(s),
                        Err(_) => {
                            return bad(&format!(
                                "{secs:?} is neither Retry-After seconds nor a header form; \
{FAIL_FORMS}"
                            ))
                        }
                    },
                };
                if hints.iter().any(|h| h.header() == hint.header()) {
                    return bad(&format!("{} is set twice", hint.header()));
                }
                hints.push(hint);
            }
            Ok(Some(Marker::Fault(window, Fault::Fail { status, hints })))
        }
        "hang" | "drop" => {
            let fault = if kind == "hang" {
                Fault::Hang
            } else {
                Fault::Drop
            };
            let window = match (args.next(), args.next()) {
                (None, _) => Window::Always,
                (Some(n), None) => match parse_window(n) {
                    Some(w) => w,
                    None => return bad("N must be a call count or *"),
                },
                _ => return bad("expected [[hang]], [[hang:N]], [[drop]] or [[drop:N]]"),
            };
            Ok(Some(Marker::Fault(window, fault)))
        }
        "sleep" => match (args.next(), args.next()) {
            (Some(ms), None) => match ms.parse() {
                Ok(ms) => Ok(Some(Marker::Sleep(Duration::from_millis(ms)))),
                Err(_) => bad("MS must be a non-negative integer"),
            },
            _ => bad("expected [[sleep:MS]]"),
        },
        "reply" => {
            let Some(reply) = args.next().and_then(Reply::parse) else {
                return bad(&format!("KIND must be one of {}", Reply::KINDS));
            };
            let window = match (args.next(), args.next()) {
                (None, _) => Window::Always,
                (Some(n), None) => match parse_window(n) {
                    Some(w) => w,
                    None => return bad("N must be a call count or *"),
                },
                _ => return bad("expected [[reply:KIND]] or [[reply:KIND:N]]"),
            };
            Ok(Some(Marker::Reply(window, reply)))
        }
        "call" => {
            let Some(name) = args.next().filter(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            }) else {
                return bad("expected [[call:NAME]] or [[call:NAME:ARGS]], NAME of [A-Za-z0-9_-]");
            };
            // the arguments are the rest verbatim (JSON has colons), `{}` when left out
            let args = args.rest().filter(|a| !a.is_empty()).unwrap_or("{}");
            Ok(Some(Marker::Call(name, args)))
        }
        // the text is the rest verbatim (JSON has colons), up to the closing brackets
        "say" => match args.rest() {
            Some(text) if !text.is_empty() => Ok(Some(Marker::Say(text))),
            _ => bad("expected [[say:TEXT]]"),
        },
        "cut" | "midfail" | "stall" => {
            let forms =
                format!("expected [[{kind}:K]] or [[{kind}:K:N]], K a number of content chunks");
            let kind = match kind {
                "cut" => StreamFaultKind::Cut,
                "midfail" => StreamFaultKind::MidFail,
                _ => StreamFaultKind::Stall,
            };
            let Some(Ok(after)) = args.next().map(str::parse::<u64>) else {
                return bad(&forms);
            };
            let window = match (args.next(), args.next()) {
                (None, _) => Window::Always,
                (Some(n), None) => match parse_window(n) {
                    Some(w) => w,
                    None => return bad("N must be a call count or *"),
                },
                _ => return bad(&forms),
            };
            Ok(Some(Marker::StreamFault(
                window,
                StreamFault { kind, after },
            )))
        }
        "stream_rate" => match (args.next().map(str::parse::<u64>), args.next()) {
            (Some(Ok(rate)), None) => Ok(Some(Marker::StreamRate(rate))),
            _ => bad("expected [[stream_rate:N]], N tokens per second (0: as fast as possible)"),
        },
        _ => Ok(None),
    }
}

/// The `:`-separated arguments of a marker.
struct Args<'a>(Option<&'a str>);

impl<'a> Args<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let s = self.0?;
        match s.split_once(':') {
            Some((arg, rest)) => {
                self.0 = Some(rest);
                Some(arg)
            }
            None => {
                self.0 = None;
                Some(s)
            }
        }
    }

    /// Everything left, colons included: `Some("")` after a trailing `:`,
    /// `None` when there was no `:` at all.
    fn rest(&mut self) -> Option<&'a str> {
        self.0.take()
    }
}

fn parse_window(s: &str) -> Option<Window> {
    if s == "*" {
        Some(Window::Always)
    } else {
        s.parse().ok().map(Window::FirstCalls)
    }
}

/// What a header value may hold here: visible ASCII, spaces and tabs.
fn is_header_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// `250`, `1.5`: digits with an optional fraction.
fn is_decimal(s: &str) -> bool {
    let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    digits(int) && digits(frac)
}

/// A non-negative Go `time.Duration` string: `0`, or one or more
/// `<decimal><unit>` groups with units `ns`, `us`, `ms`, `s`, `m`, `h`
/// (`1s`, `6m0s`, `250ms`, `1.5s`, `1h2m3.5s`).
fn is_go_duration(s: &str) -> bool {
    if s == "0" {
        return true;
    }
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        let number = &rest[..number_len];
        if number.is_empty()
            || number.bytes().filter(|b| *b == b'.').count() > 1
            || !number.bytes().any(|b| b.is_ascii_digit())
        {
            return false;
        }
        rest = &rest[number_len..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
        if !matches!(&rest[..unit_len], "ns" | "us" | "ms" | "s" | "m" | "h") {
            return false;
        }
        rest = &rest[unit_len..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(status: u16) -> Option<Fault<'static>> {
        Some(Fault::Fail {
            status,
            hints: Vec::new(),
        })
    }

    fn hints(prompt: &str) -> Vec<Hint<'_>> {
        match plan(prompt, 1) {
            Ok(Plan {
                fault: Some(Fault::Fail { hints, .. }),
                ..
            }) => hints,
            other => panic!("{prompt}: expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn no_markers_is_a_plain_success() {
        assert_eq!(plan("hello [[wiki]] link", 1), Ok(Plan::default()));
        assert_eq!(plan("hello", 1), Ok(Plan::default()));
    }

    #[test]
    fn fail_applies_to_the_first_n_calls() {
        assert_eq!(plan("x [[fail:500:2]]", 1).map(|p| p.fault), Ok(fail(500)));
        assert_eq!(plan("x [[fail:500:2]]", 2).map(|p| p.fault), Ok(fail(500)));
        assert_eq!(plan("x [[fail:500:2]]", 3).map(|p| p.fault), Ok(None));
        assert_eq!(plan("[[fail:503:*]]", 99).map(|p| p.fault), Ok(fail(503)));
        assert_eq!(plan("[[fail:400]]", 99).map(|p| p.fault), Ok(fail(400)));
    }

    #[test]
    fn first_covering_fault_wins() {
        let p = "[[fail:500:1]][[fail:429:2]]";
        assert_eq!(plan(p, 1).map(|p| p.fault), Ok(fail(500)));
        assert_eq!(plan(p, 2).map(|p| p.fault), Ok(fail(429)));
        assert_eq!(plan(p, 3).map(|p| p.fault), Ok(None));
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(hints("[[fail:429:1:7]]"), [Hint::Seconds(7)]);
        assert_eq!(
            plan("[[fail:429:*:date:3]]", 5).map(|p| p.fault),
            Ok(Some(Fault::Fail {
                status: 429,
                hints: vec![Hint::DateIn(3)]
            }))
        );
        assert_eq!(hints("[[fail:429:1:ms:250]]"), [Hint::Ms("250")]);
        assert_eq!(hints("[[fail:429:1:ms:1.5]]"), [Hint::Ms("1.5")]);
        assert_eq!(hints("[[fail:429:1:litellm:2]]"), [Hint::LiteLlm("2")]);
        assert_eq!(hints("[[fail:429:1:anthropic:4]]"), [Hint::Anthropic(4)]);
        for dur in [
            "1s", "6m0s", "250ms", "0", "1.5s", "1h2m3.5s", "10us", "7ns", ".5s",
        ] {
            let prompt = format!("[[fail:429:1:reset:{dur}]]");
            assert_eq!(hints(&prompt), [Hint::ResetRequests(dur)], "{dur}");
            let prompt = format!("[[fail:429:1:reset_tokens:{dur}]]");
            assert_eq!(hints(&prompt), [Hint::ResetTokens(dur)], "{dur}");
        }
    }

    #[test]
    fn raw_retry_after_is_verbatim_and_takes_the_rest() {
        for value in [
            "0",
            "1e+300",
            "-5",
            "soon",
            "",
            "Sun, 06 Nov 1994 08:49:37 GMT",
        ] {
            let prompt = format!("x [[fail:429:2:raw:{value}]] y");
            assert_eq!(hints(&prompt), [Hint::Raw(value)], "{value}");
        }
        assert_eq!(
            hints("[[fail:429:1:ms:100:raw:ms:5]]"),
            [Hint::Ms("100"), Hint::Raw("ms:5")]
        );
    }

    #[test]
    fn header_forms_combine() {
        assert_eq!(
            hints("[[fail:429:1:ms:100:3:litellm:9:reset:1s:reset_tokens:6m0s]]"),
            [
                Hint::Ms("100"),
                Hint::Seconds(3),
                Hint::LiteLlm("9"),
                Hint::ResetRequests("1s"),
                Hint::ResetTokens("6m0s")
            ]
        );
        assert_eq!(
            hints("[[fail:503:1:2]]"),
            [Hint::Seconds(2)],
            "any status may carry hints"
        );
    }

    #[test]
    fn hang_drop_and_sleep() {
        assert_eq!(plan("[[hang]]", 7).map(|p| p.fault), Ok(Some(Fault::Hang)));
        assert_eq!(plan("[[hang:1]]", 2).map(|p| p.fault), Ok(None));
        assert_eq!(
            plan("[[drop:2]]", 2).map(|p| p.fault),
            Ok(Some(Fault::Drop))
        );
        assert_eq!(
            plan("[[sleep:5]] a [[sleep:10]]", 1).map(|p| p.extra_latency),
            Ok(Duration::from_millis(15))
        );
    }

    #[test]
    fn reply_kinds_and_windows() {
        for (kind, reply) in [
            ("tool_calls", Reply::ToolCalls),
            ("refusal", Reply::Refusal),
            ("empty", Reply::Empty),
            ("groq", Reply::Groq),
            ("sparse", Reply::Sparse),
            ("no_usage", Reply::NoUsage),
            ("error200", Reply::Error200),
            ("error200_rate", Reply::Error200Rate),
            ("cached", Reply::Cached),
            ("parts", Reply::Parts),
        ] {
            let always = format!("q [[reply:{kind}]]");
            assert_eq!(plan(&always, 9).map(|p| p.reply), Ok(Some(reply)), "{kind}");
            let star = format!("q [[reply:{kind}:*]]");
            assert_eq!(plan(&star, 9).map(|p| p.reply), Ok(Some(reply)), "{kind}");
            let once = format!("q [[reply:{kind}:1]]");
            assert_eq!(plan(&once, 1).map(|p| p.reply), Ok(Some(reply)), "{kind}");
            assert_eq!(plan(&once, 2).map(|p| p.reply), Ok(None), "{kind}");
        }
    }

    #[test]
    fn faults_and_replies_are_planned_independently() {
        let p = "[[fail:500:1]][[reply:empty:2]][[reply:refusal]]";
        let at = |call| plan(p, call).expect("valid markers");
        assert_eq!((at(1).fault, at(1).reply), (fail(500), Some(Reply::Empty)));
        assert_eq!((at(2).fault, at(2).reply), (None, Some(Reply::Empty)));
        assert_eq!((at(3).fault, at(3).reply), (None, Some(Reply::Refusal)));
    }

    #[test]
    fn non_marker_brackets_do_not_hide_markers() {
        assert_eq!(
            plan("[[x [[fail:502:1]]", 1).map(|p| p.fault),
            Ok(fail(502))
        );
        assert_eq!(
            plan("[[replying]] [[reply:parts]]", 1).map(|p| p.reply),
            Ok(Some(Reply::Parts))
        );
    }

    #[test]
    fn malformed_markers_are_errors() {
        for bad in [
            "[[fail:abc:1]]",
            "[[fail:200:1]]",
            "[[fail:500:x]]",
            "[[fail:429:1:soon]]",
            "[[fail:429:1:]]",
            "[[fail]]",
            "[[fail:]]",
            "[[fail:429:1:date]]",
            "[[fail:429:1:date:-1]]",
            "[[fail:429:1:ms]]",
            "[[fail:429:1:ms:]]",
            "[[fail:429:1:ms:-5]]",
            "[[fail:429:1:ms:1e3]]",
            "[[fail:429:1:ms:1.]]",
            "[[fail:429:1:ms:abc]]",
            "[[fail:429:1:litellm]]",
            "[[fail:429:1:litellm:x]]",
            "[[fail:429:1:anthropic:1.5]]",
            "[[fail:429:1:reset]]",
            "[[fail:429:1:reset:]]",
            "[[fail:429:1:reset:5]]",
            "[[fail:429:1:reset:1d]]",
            "[[fail:429:1:reset:-1s]]",
            "[[fail:429:1:reset:1.2.3s]]",
            "[[fail:429:1:reset:s]]",
            "[[fail:429:1:reset:1s2]]",
            "[[fail:429:1:reset_tokens:later]]",
            "[[fail:429:1:raw]]",
            "[[fail:429:1:raw:caf\u{e9}]]",
            "[[fail:429:1:raw:a\u{7}b]]",
            "[[fail:429:1:7:raw:8]]",
            "[[fail:429:1:date:1:2]]",
            "[[fail:429:1:ms:1:ms:2]]",
            "[[fail:429:1:bogus:1]]",
            "[[hang:1:2]]",
            "[[hang:]]",
            "[[sleep]]",
            "[[sleep:-1]]",
            "[[reply]]",
            "[[reply:]]",
            "[[reply:nope]]",
            "[[reply:TOOL_CALLS]]",
            "[[reply:empty:x]]",
            "[[reply:empty:1:2]]",
            "[[cut]]",
            "[[cut:]]",
            "[[cut:x]]",
            "[[cut:-1]]",
            "[[cut:1:x]]",
            "[[midfail:1:2:3]]",
            "[[stall]]",
            "[[stall:1.5]]",
            "[[stream_rate]]",
            "[[stream_rate:fast]]",
            "[[stream_rate:1.5]]",
            "[[stream_rate:10:2]]",
        ] {
            let err = plan(bad, 1).expect_err(bad);
            assert!(err.starts_with("invalid mock marker [["), "{bad}: {err}");
        }
    }

    #[test]
    fn stream_faults_windows_and_rate() {
        let fault = |kind, after| Some(StreamFault { kind, after });
        assert_eq!(
            plan("a [[cut:3]]", 9).map(|p| p.stream_fault),
            Ok(fault(StreamFaultKind::Cut, 3))
        );
        assert_eq!(
            plan("a [[midfail:0:*]]", 9).map(|p| p.stream_fault),
            Ok(fault(StreamFaultKind::MidFail, 0))
        );
        let p = "[[stall:2:1]][[cut:5:2]][[midfail:1]]";
        let at = |call| plan(p, call).map(|p| p.stream_fault);
        assert_eq!(at(1), Ok(fault(StreamFaultKind::Stall, 2)));
        assert_eq!(at(2), Ok(fault(StreamFaultKind::Cut, 5)));
        assert_eq!(at(3), Ok(fault(StreamFaultKind::MidFail, 1)));
        assert_eq!(plan("[[cut:1:2]]", 3).map(|p| p.stream_fault), Ok(None));
        // Stream faults are no status faults: the call still gets its 200.
        assert_eq!(plan("[[cut:1]]", 1).map(|p| p.fault), Ok(None));
        assert_eq!(
            plan("[[stream_rate:50]] [[stream_rate:7]]", 1).map(|p| p.stream_rate),
            Ok(Some(50))
        );
        assert_eq!(
            plan("[[stream_rate:0]]", 1).map(|p| p.stream_rate),
            Ok(Some(0))
        );
    }

    #[test]
    fn go_durations() {
        for ok in ["0", "1s", "6m0s", "250ms", "1.5h", "1h0m0s", "3us", "0.5ms"] {
            assert!(is_go_duration(ok), "{ok}");
        }
        for bad in [
            "", "1", "s", "1S", "1sec", "-1s", "+1s", "1..5s", ".s", "1 s",
        ] {
            assert!(!is_go_duration(bad), "{bad}");
        }
    }
}
