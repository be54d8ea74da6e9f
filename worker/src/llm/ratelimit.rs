//! One reader for every rate-limit header an OpenAI-compatible server may send on a 429.
//!
//! Servers disagree on how to say "come back later": OpenAI sends `retry-after-ms` and
//! `x-ratelimit-reset-requests` / `-tokens` as Go-style durations (`1s`, `6m0s`), proxies send the
//! standard `Retry-After` (seconds or an HTTP date), Anthropic sends RFC 3339 instants in
//! `anthropic-ratelimit-*-reset`, and LiteLLM's own limiter sends only `llm_provider-retry-after`.
//! [`read`] tries them from the most precise to the least and returns the first usable wait.
//! Every value comes from outside: parsing is checked, never panics, and garbage (negative, NaN,
//! infinite, unparsable) counts as no header. Values too large for a `Duration` saturate; the
//! caller clamps every wait to `AGENTQ_RETRY_MAX_MS` anyway.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A server's hint of how long to wait, and which header said so (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    pub wait: Duration,
    pub source: &'static str,
}

/// The first usable, non-zero wait among the headers, most precise first. A zero wait is skipped
/// (a server saying "now" while answering 429 is no guidance; the caller backs off instead).
pub fn read(headers: &HeaderMap, now: SystemTime) -> Option<Hint> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let usable = |d: Option<Duration>| d.filter(|d| !d.is_zero());
    let hint = |wait, source| Some(Hint { wait, source });

    if let Some(w) = usable(text("retry-after-ms").and_then(parse_millis)) {
        return hint(w, "retry-after-ms");
    }
    if let Some(w) = usable(text("retry-after").and_then(|v| parse_retry_after(v, now))) {
        return hint(w, "retry-after");
    }
    if let Some(w) =
        usable(text("llm_provider-retry-after").and_then(|v| parse_retry_after(v, now)))
    {
        return hint(w, "llm_provider-retry-after");
    }
    let openai = ["requests", "tokens"].map(|kind| {
        let reset = text(&format!("x-ratelimit-reset-{kind}")).and_then(parse_go_duration);
        let remaining = text(&format!("x-ratelimit-remaining-{kind}")).map(str::trim);
        (reset, remaining)
    });
    if let Some(w) = usable(pick(&openai)) {
        return hint(w, "x-ratelimit-reset");
    }
    let anthropic = ["requests", "tokens", "input-tokens", "output-tokens"].map(|kind| {
        let reset =
            text(&format!("anthropic-ratelimit-{kind}-reset")).and_then(|v| parse_instant(v, now));
        let remaining = text(&format!("anthropic-ratelimit-{kind}-remaining")).map(str::trim);
        (reset, remaining)
    });
    if let Some(w) = usable(pick(&anthropic)) {
        return hint(w, "anthropic-ratelimit-reset");
    }
    None
}

/// What an upstream's headers say about its limits, on any reply (OpenAI sends them on every
/// one): the per-minute limits it enforces, and, when a limit has nothing left, how long until
/// it resets. The flow limiter learns a limit lower than the configured one, and blocks the
/// model for the whole fleet until an exhausted limit resets, before any 429.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub exhausted_for: Option<Duration>,
}

/// Header names read on every reply, parsed once: a `&str` lookup parses the name again each
/// time, and this runs for every call.
mod names {
    use http::HeaderName;

    pub static REMAINING: [HeaderName; 2] = [
        HeaderName::from_static("x-ratelimit-remaining-requests"),
        HeaderName::from_static("x-ratelimit-remaining-tokens"),
    ];
    pub static RESET: [HeaderName; 2] = [
        HeaderName::from_static("x-ratelimit-reset-requests"),
        HeaderName::from_static("x-ratelimit-reset-tokens"),
    ];
    pub static A_REMAINING: [HeaderName; 2] = [
        HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
        HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    ];
    pub static A_RESET: [HeaderName; 2] = [
        HeaderName::from_static("anthropic-ratelimit-requests-reset"),
        HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
    ];
    pub static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
    pub static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
    pub static A_LIMIT_REQUESTS: HeaderName =
        HeaderName::from_static("anthropic-ratelimit-requests-limit");
    pub static A_LIMIT_TOKENS: HeaderName =
        HeaderName::from_static("anthropic-ratelimit-tokens-limit");
}

pub fn reported(headers: &HeaderMap, now: SystemTime) -> Reported {
    let text = |name: &http::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let number = |name: &http::HeaderName| {
        text(name)
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n > 0)
    };
    let mut exhausted: Option<Duration> = None;
    let mut note = |d: Option<Duration>| {
        if let Some(d) = d.filter(|d| !d.is_zero()) {
            exhausted = Some(exhausted.map_or(d, |e| e.max(d)));
        }
    };
    for kind in 0..2 {
        if text(&names::REMAINING[kind]) == Some("0") {
            note(text(&names::RESET[kind]).and_then(parse_go_duration));
        }
        if text(&names::A_REMAINING[kind]) == Some("0") {
            note(text(&names::A_RESET[kind]).and_then(|v| parse_instant(v, now)));
        }
    }
    Reported {
        limit_requests: number(&names::LIMIT_REQUESTS).or_else(|| number(&names::A_LIMIT_REQUESTS)),
        limit_tokens: number(&names::LIMIT_TOKENS).or_else(|| number(&names::A_LIMIT_TOKENS)),
        exhausted_for: exhausted,
    }
}

/// Of several limits' reset times, the one that matters: the longest among the limits reported
/// exhausted (`remaining` 0), or, when none says so, the longest of all (the 429 says something
/// ran out, and waiting for the shorter one would likely just meet a second 429).
fn pick(limits: &[(Option<Duration>, Option<&str>)]) -> Option<Duration> {
    let exhausted = limits
        .iter()
        .filter(|(_, remaining)| remaining.is_some_and(|r| r == "0"))
        .filter_map(|(reset, _)| *reset)
        .max();
    exhausted.or_else(|| limits.iter().filter_map(|(reset, _)| *reset).max())
}

/// `Retry-After` is either delta-seconds or an HTTP date (RFC 9110 §10.2.3); a decimal number of
/// seconds is tolerated. An all-digits number too large for a `Duration` saturates; a date in the
/// past means zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // all digits: only overflow can fail, and that means "very long"
        return Some(v.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    if let Some(d) = parse_seconds_f64(v) {
        return Some(d);
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `retry-after-ms`: milliseconds, possibly fractional (OpenAI's SDKs parse it as a float).
fn parse_millis(value: &str) -> Option<Duration> {
    parse_seconds_f64(value.trim()).map(|d| d / 1000)
}

/// A finite, non-negative decimal number of seconds (`1.5`, `1e3`); saturates when too large.
fn parse_seconds_f64(v: &str) -> Option<Duration> {
    // Rust's float parser also accepts "inf" and "NaN": rejected below as not finite.
    let secs = v.parse::<f64>().ok()?;
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// A Go `time.Duration` string as OpenAI sends it: `6m0s`, `1.5s`, `250ms`, `1h2m3.5s`, `0s`.
/// Units: `h`, `m`, `s`, `ms`, `us`/`µs`/`μs`, `ns`. A bare number is read as seconds (some
/// compatible servers send that). Negative or malformed values are `None`.
pub fn parse_go_duration(value: &str) -> Option<Duration> {
    let v = value.trim();
    let v = v.strip_prefix('+').unwrap_or(v);
    if v.is_empty() {
        return None;
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return Some(v.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    if let Some(d) = parse_seconds_f64(v) {
        return Some(d);
    }
    let mut rest = v;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds_per_unit;
    }
    if !total.is_finite() {
        return Some(Duration::MAX);
    }
    Some(Duration::try_from_secs_f64(total).unwrap_or(Duration::MAX))
}

/// An RFC 3339 instant (Anthropic's reset headers) as the time left until it; past means zero.
fn parse_instant(value: &str, now: SystemTime) -> Option<Duration> {
    let when = OffsetDateTime::parse(value.trim(), &Rfc3339).ok()?;
    let now = OffsetDateTime::from(now);
    let left = when - now;
    if left.is_negative() {
        return Some(Duration::ZERO);
    }
    Some(Duration::try_from(left).unwrap_or(Duration::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_limits_and_exhaustion_are_read_from_any_reply() {
        let now = SystemTime::now();
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-limit-requests", "500".parse().expect("header"));
        h.insert("x-ratelimit-limit-tokens", "30000".parse().expect("header"));
        h.insert(
            "x-ratelimit-remaining-requests",
            "12".parse().expect("header"),
        );
        h.insert(
            "x-ratelimit-reset-requests",
            "1.5s".parse().expect("header"),
        );
        h.insert("x-ratelimit-remaining-tokens", "0".parse().expect("header"));
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().expect("header"));
        let r = reported(&h, now);
        assert_eq!(r.limit_requests, Some(500));
        assert_eq!(r.limit_tokens, Some(30000));
        assert_eq!(r.exhausted_for, Some(Duration::from_secs(360)));
        let mut g = HeaderMap::new();
        g.insert("x-ratelimit-limit-requests", "0".parse().expect("header"));
        g.insert("x-ratelimit-limit-tokens", "lots".parse().expect("header"));
        g.insert(
            "x-ratelimit-remaining-requests",
            "0".parse().expect("header"),
        );
        g.insert("x-ratelimit-reset-requests", "-1s".parse().expect("header"));
        assert_eq!(reported(&g, now), Reported::default());
    }
    use http::HeaderValue;

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("valid header value"));
        }
        h
    }

    fn wait(pairs: &[(&'static str, &str)]) -> Option<(Duration, &'static str)> {
        read(&headers(pairs), at()).map(|h| (h.wait, h.source))
    }

    #[test]
    fn retry_after_in_both_forms() {
        let now = at();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_never_panics_or_overflows() {
        let now = SystemTime::now();
        let huge = parse_retry_after("1e20", now).expect("a number");
        assert!(huge >= Duration::from_secs(u64::from(u32::MAX)));
        assert_eq!(parse_retry_after("1e+300", now), Some(Duration::MAX));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::MAX)
        );
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        for garbage in [
            "-1",
            "NaN",
            "inf",
            "-inf",
            "",
            "1e",
            "0x10",
            "Tue, 99 Foo",
            "-0.5",
        ] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage}");
        }
    }

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("1s", ms(1000)),
            ("6m0s", ms(360_000)),
            ("1h2m3.5s", ms(3_723_500)),
            ("250ms", ms(250)),
            ("1.5s", ms(1500)),
            ("0s", ms(0)),
            ("20", ms(20_000)),
            ("0.5", ms(500)),
            (" 2m ", ms(120_000)),
            ("+3s", ms(3000)),
            ("1000us", ms(1)),
            ("1000µs", ms(1)),
            ("2000000ns", ms(2)),
        ] {
            // float arithmetic: compare at millisecond resolution, rounded
            let got = parse_go_duration(text)
                .map(|d| Duration::from_millis((d.as_secs_f64() * 1000.0).round() as u64));
            assert_eq!(got, Some(want), "{text}");
        }
        for garbage in [
            "", "s", "-1s", "1x", "1m-2s", "..s", "1..2s", "NaN", "inf", "m1",
        ] {
            assert_eq!(parse_go_duration(garbage), None, "{garbage}");
        }
        assert_eq!(
            parse_go_duration("99999999999999999999999h"),
            Some(Duration::MAX)
        );
        assert_eq!(parse_go_duration(&"9".repeat(400)), Some(Duration::MAX));
    }

    #[test]
    fn headers_in_order_of_precision() {
        let s = Duration::from_secs;
        assert_eq!(
            wait(&[("retry-after-ms", "1500"), ("retry-after", "2")]),
            Some((Duration::from_millis(1500), "retry-after-ms"))
        );
        assert_eq!(
            wait(&[("retry-after-ms", "0.5")]),
            Some((Duration::from_micros(500), "retry-after-ms"))
        );
        assert_eq!(
            wait(&[("retry-after", "3"), ("llm_provider-retry-after", "9")]),
            Some((s(3), "retry-after"))
        );
        assert_eq!(
            wait(&[("llm_provider-retry-after", "9")]),
            Some((s(9), "llm_provider-retry-after"))
        );
        // a garbage or zero value falls through to the next header
        assert_eq!(
            wait(&[
                ("retry-after-ms", "soon"),
                ("retry-after", "0"),
                ("llm_provider-retry-after", "4")
            ]),
            Some((s(4), "llm_provider-retry-after"))
        );
        assert_eq!(wait(&[("retry-after", "0")]), None);
        assert_eq!(wait(&[("retry-after", "-5")]), None);
        assert_eq!(wait(&[]), None);
        assert_eq!(
            wait(&[("retry-after", "1e+300")]),
            Some((Duration::MAX, "retry-after"))
        );
    }

    #[test]
    fn openai_reset_headers_follow_the_exhausted_limit() {
        let s = Duration::from_secs;
        let both = [
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ];
        // out of requests, tokens left: the requests reset
        let mut h = both.to_vec();
        h.extend([
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "1200"),
        ]);
        assert_eq!(wait(&h), Some((s(1), "x-ratelimit-reset")));
        // out of tokens: the tokens reset
        let mut h = both.to_vec();
        h.extend([
            ("x-ratelimit-remaining-requests", "10"),
            ("x-ratelimit-remaining-tokens", "0"),
        ]);
        assert_eq!(wait(&h), Some((s(360), "x-ratelimit-reset")));
        // nothing says which: the longer
        assert_eq!(wait(&both), Some((s(360), "x-ratelimit-reset")));
        assert_eq!(
            wait(&[("x-ratelimit-reset-requests", "250ms")]),
            Some((Duration::from_millis(250), "x-ratelimit-reset"))
        );
        assert_eq!(wait(&[("x-ratelimit-reset-tokens", "-3s")]), None);
        // Retry-After wins over the reset headers
        let mut h = both.to_vec();
        h.push(("retry-after", "2"));
        assert_eq!(wait(&h), Some((s(2), "retry-after")));
    }

    #[test]
    fn anthropic_reset_instants() {
        let now = OffsetDateTime::from(at());
        let fmt = |secs: i64| {
            (now + time::Duration::seconds(secs))
                .format(&Rfc3339)
                .expect("formats")
        };
        let (r, t) = (fmt(20), fmt(50));
        assert_eq!(
            wait(&[
                ("anthropic-ratelimit-requests-reset", &r),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", &t),
                ("anthropic-ratelimit-tokens-remaining", "5000"),
            ]),
            Some((Duration::from_secs(20), "anthropic-ratelimit-reset"))
        );
        assert_eq!(
            wait(&[("anthropic-ratelimit-output-tokens-reset", &t)]),
            Some((Duration::from_secs(50), "anthropic-ratelimit-reset"))
        );
        let past = fmt(-20);
        assert_eq!(wait(&[("anthropic-ratelimit-tokens-reset", &past)]), None);
        assert_eq!(
            wait(&[("anthropic-ratelimit-tokens-reset", "yesterday")]),
            None
        );
        let with_offset = "2023-11-14T23:14:00+01:00"; // 22:14:00Z, 1_700_000_040
        assert_eq!(
            wait(&[("anthropic-ratelimit-requests-reset", with_offset)]),
            Some((Duration::from_secs(40), "anthropic-ratelimit-reset"))
        );
    }
}
