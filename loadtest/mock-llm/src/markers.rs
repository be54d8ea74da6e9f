//! Fault markers scripted inside the last user message, e.g. `[[fail:503:2]]`.
//!
//! Markers are evaluated in the order they appear: `[[sleep:MS]]` markers add
//! up, and the first `fail`/`hang`/`drop` marker whose call window covers the
//! current call number decides the fault. That lets one prompt script a
//! sequence such as "500 on call 1, 429 on call 2, then success" with
//! `[[fail:500:1]][[fail:429:2]]`.

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RetryAfter {
    /// `Retry-After: <seconds>`
    Seconds(u64),
    /// `Retry-After: <HTTP-date this many seconds from now>`
    DateIn(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Fail {
        status: u16,
        retry_after: Option<RetryAfter>,
    },
    Hang,
    Drop,
}

/// What to do with one call, after all markers were considered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) extra_latency: Duration,
    pub(crate) fault: Option<Fault>,
}

/// Builds the plan for call number `call` (1-based) of `prompt`.
///
/// Only `[[fail…]]`, `[[hang…]]`, `[[drop…]]` and `[[sleep…]]` are markers;
/// any other `[[…]]` text is ordinary prompt content. A malformed marker is an
/// error rather than being ignored, so a typo in a test script fails loudly.
pub(crate) fn plan(prompt: &str, call: u64) -> Result<Plan, String> {
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

enum Marker {
    Sleep(Duration),
    Fault(Window, Fault),
}

fn parse_marker(body: &str) -> Result<Option<Marker>, String> {
    let mut parts = body.split(':');
    let kind = parts.next().unwrap_or_default();
    let args: Vec<&str> = parts.collect();
    let bad = |why: &str| Err(format!("invalid mock marker [[{body}]]: {why}"));
    match kind {
        "fail" => {
            let Some(code) = args.first() else {
                return bad("expected [[fail:CODE:N]]");
            };
            let status = match code.parse::<u16>() {
                Ok(s) if (400..=599).contains(&s) => s,
                _ => return bad("CODE must be an HTTP status between 400 and 599"),
            };
            // A missing N means "always", which is the only sensible reading.
            let window = match args.get(1) {
                None => Window::Always,
                Some(n) => match parse_window(n) {
                    Some(w) => w,
                    None => return bad("N must be a call count or *"),
                },
            };
            let retry_after = match args.get(2..).unwrap_or_default() {
                [] => None,
                [secs] => match secs.parse() {
                    Ok(s) => Some(RetryAfter::Seconds(s)),
                    Err(_) => return bad("Retry-After seconds must be a non-negative integer"),
                },
                ["date", secs] => match secs.parse() {
                    Ok(s) => Some(RetryAfter::DateIn(s)),
                    Err(_) => return bad("Retry-After seconds must be a non-negative integer"),
                },
                _ => {
                    return bad(
                        "expected [[fail:CODE:N]], [[fail:CODE:N:S]] or [[fail:CODE:N:date:S]]",
                    )
                }
            };
            Ok(Some(Marker::Fault(
                window,
                Fault::Fail {
                    status,
                    retry_after,
                },
            )))
        }
        "hang" | "drop" => {
            let fault = if kind == "hang" {
                Fault::Hang
            } else {
                Fault::Drop
            };
            let window = match args.as_slice() {
                [] => Window::Always,
                [n] => match parse_window(n) {
                    Some(w) => w,
                    None => return bad("N must be a call count or *"),
                },
                _ => return bad("expected [[hang]], [[hang:N]], [[drop]] or [[drop:N]]"),
            };
            Ok(Some(Marker::Fault(window, fault)))
        }
        "sleep" => match args.as_slice() {
            [ms] => match ms.parse() {
                Ok(ms) => Ok(Some(Marker::Sleep(Duration::from_millis(ms)))),
                Err(_) => bad("MS must be a non-negative integer"),
            },
            _ => bad("expected [[sleep:MS]]"),
        },
        _ => Ok(None),
    }
}

fn parse_window(s: &str) -> Option<Window> {
    if s == "*" {
        Some(Window::Always)
    } else {
        s.parse().ok().map(Window::FirstCalls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(status: u16) -> Option<Fault> {
        Some(Fault::Fail {
            status,
            retry_after: None,
        })
    }

    #[test]
    fn no_markers_is_a_plain_success() {
        assert_eq!(plan("hello [[wiki]] link", 1), Ok(Plan::default()));
    }

    #[test]
    fn fail_applies_to_the_first_n_calls() {
        assert_eq!(plan("x [[fail:500:2]]", 1).map(|p| p.fault), Ok(fail(500)));
        assert_eq!(plan("x [[fail:500:2]]", 2).map(|p| p.fault), Ok(fail(500)));
        assert_eq!(plan("x [[fail:500:2]]", 3).map(|p| p.fault), Ok(None));
        assert_eq!(plan("[[fail:503:*]]", 99).map(|p| p.fault), Ok(fail(503)));
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
        assert_eq!(
            plan("[[fail:429:1:7]]", 1).map(|p| p.fault),
            Ok(Some(Fault::Fail {
                status: 429,
                retry_after: Some(RetryAfter::Seconds(7))
            }))
        );
        assert_eq!(
            plan("[[fail:429:*:date:3]]", 5).map(|p| p.fault),
            Ok(Some(Fault::Fail {
                status: 429,
                retry_after: Some(RetryAfter::DateIn(3))
            }))
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
    fn non_marker_brackets_do_not_hide_markers() {
        assert_eq!(
            plan("[[x [[fail:502:1]]", 1).map(|p| p.fault),
            Ok(fail(502))
        );
    }

    #[test]
    fn malformed_markers_are_errors() {
        for bad in [
            "[[fail:abc:1]]",
            "[[fail:200:1]]",
            "[[fail:500:x]]",
            "[[fail:429:1:soon]]",
            "[[fail]]",
            "[[hang:1:2]]",
            "[[sleep]]",
            "[[sleep:-1]]",
        ] {
            assert!(plan(bad, 1).is_err(), "{bad} should be rejected");
        }
    }
}
