//! Upstreams: which OpenAI-compatible server serves which model, and the limits each one has.
//!
//! `AGENTQ_UPSTREAMS` names a JSON (`.json`) or YAML file, read once at start by the api (to
//! refuse models nobody serves) and by every worker (to route calls and to know the limits). With
//! it unset, one implicit upstream named `default` is built from `OPENAI_BASE_URL` /
//! `OPENAI_API_KEY`: it serves any model and has no configured limits, though the limits a
//! provider reports in its headers, and its 429s, still apply to the whole fleet.

use std::collections::{BTreeMap, HashSet};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, Env};

pub const ENV_UPSTREAMS: &str = "AGENTQ_UPSTREAMS";
/// The implicit upstream's name.
pub const IMPLICIT: &str = "default";
/// Bounds that keep keys, metric labels and the api's answers small.
pub const MAX_UPSTREAMS: usize = 64;
pub const MAX_MODELS: usize = 256;
/// Largest upstreams file read.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Limits of one scope (an upstream, or one model on it). Every limit is optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (input + output) per minute.
    pub tpm: Option<u64>,
    /// Calls in flight at once.
    pub concurrency: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.rpm.is_none() && self.tpm.is_none() && self.concurrency.is_none()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    name: String,
    base_url: String,
    #[serde(default)]
    api_key: Option<String>,
    models: Vec<String>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    model_limits: BTreeMap<String, Limits>,
    /// Dollars per million prompt and completion tokens of this upstream's models, over
    /// `AGENTQ_PRICES` (the same model can cost differently at two providers).
    #[serde(default)]
    prices: BTreeMap<String, FilePrice>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct FilePrice {
    prompt: f64,
    completion: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    upstreams: Vec<FileUpstream>,
}

/// One upstream, resolved: its key read from the environment.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub base_url: String,
    pub api_key: SecretString,
    /// The models it serves; empty for the implicit upstream, which serves any.
    pub models: Vec<String>,
    pub limits: Limits,
    pub model_limits: BTreeMap<String, Limits>,
    /// Prices of its models that override `AGENTQ_PRICES` (the file's `prices`).
    pub prices: BTreeMap<String, crate::config::Price>,
}

impl Upstream {
    pub fn limits_for(&self, model: &str) -> Limits {
        self.model_limits.get(model).copied().unwrap_or_default()
    }
}

/// Where a model's calls go.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub upstream: &'a Upstream,
    pub model: &'a str,
    pub model_limits: Limits,
}

#[derive(Debug, Clone)]
pub struct Upstreams {
    pub list: Vec<Upstream>,
    /// True when built from `OPENAI_BASE_URL` alone (no `AGENTQ_UPSTREAMS`).
    pub implicit: bool,
    /// The model of a task that names none.
    pub default_model: String,
}

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError {
        var: ENV_UPSTREAMS,
        message: message.into(),
    }
}

fn valid_upstream_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A variable name the api will not read, checked only for shape.
fn continue_key(var: &str) -> Result<(), ConfigError> {
    if var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Ok(())
    } else {
        Err(err(format!("api_key: env:{var} is not a variable name")))
    }
}

fn check_limits(at: &str, l: &Limits) -> Result<(), ConfigError> {
    for (name, v) in [
        ("rpm", l.rpm),
        ("tpm", l.tpm),
        ("concurrency", l.concurrency),
    ] {
        if v == Some(0) {
            return Err(err(format!(
                "{at}.{name}: must be at least 1 (leave it out for no limit)"
            )));
        }
        if v.is_some_and(|v| v > 1_000_000_000_000) {
            return Err(err(format!("{at}.{name}: too large")));
        }
    }
    Ok(())
}

impl Upstreams {
    /// The implicit upstream: today's single `OPENAI_BASE_URL` setup.
    pub fn implicit(base_url: &str, api_key: SecretString, default_model: &str) -> Self {
        Self {
            list: vec![Upstream {
                name: IMPLICIT.to_owned(),
                base_url: base_url.trim_end_matches('/').to_owned(),
                api_key,
                models: Vec::new(),
                limits: Limits::default(),
                model_limits: BTreeMap::new(),
                prices: BTreeMap::new(),
            }],
            implicit: true,
            default_model: default_model.to_owned(),
        }
    }

    /// Reads `AGENTQ_UPSTREAMS` when set, else builds the implicit upstream from the given values.
    /// `model_env` is `AGENTQ_MODEL` as set (None when unset).
    pub fn from_env(
        env: &dyn Env,
        base_url: &str,
        api_key: SecretString,
        model_env: Option<&str>,
        default_model: &str,
        read_keys: bool,
    ) -> Result<Self, ConfigError> {
        let Some(path) = env
            .get(ENV_UPSTREAMS)
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.trim().to_owned())
        else {
            return Ok(Self::implicit(base_url, api_key, default_model));
        };
        let meta = std::fs::metadata(&path).map_err(|e| err(format!("{path}: {e}")))?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(err(format!("{path}: larger than {MAX_FILE_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("{path}: {e}")))?;
        Self::parse(&text, path.ends_with(".json"), env, model_env, read_keys)
    }

    /// Parses and checks an upstreams file. `json`: parse as JSON, else as YAML. `read_keys`:
    /// resolve `api_key: env:VAR` (the worker); the api routes without keys and never reads them.
    pub fn parse(
        text: &str,
        json: bool,
        env: &dyn Env,
        model_env: Option<&str>,
        read_keys: bool,
    ) -> Result<Self, ConfigError> {
        let file: File = if json {
            serde_json::from_str(text).map_err(|e| err(format!("not valid: {e}")))?
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| err(format!("not valid: {e}")))?
        };
        if file.upstreams.is_empty() {
            return Err(err("upstreams: must name at least one upstream"));
        }
        if file.upstreams.len() > MAX_UPSTREAMS {
            return Err(err(format!("upstreams: at most {MAX_UPSTREAMS}")));
        }
        let mut names = HashSet::new();
        let mut served = HashSet::new();
        let mut list = Vec::with_capacity(file.upstreams.len());
        for (i, u) in file.upstreams.into_iter().enumerate() {
            let at = format!("upstreams[{i}]");
            if !valid_upstream_name(&u.name) {
                return Err(err(format!(
                    "{at}.name: must be 1 to 64 characters of [A-Za-z0-9_-]"
                )));
            }
            if !names.insert(u.name.clone()) {
                return Err(err(format!("{at}.name: {:?} is used twice", u.name)));
            }
            if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
                return Err(err(format!(
                    "{at}.base_url: must start with http:// or https://"
                )));
            }
            let api_key = match u.api_key.as_deref() {
                None | Some("") => SecretString::from(String::new()),
                Some(r) => {
                    let Some(var) = r.strip_prefix("env:").filter(|v| !v.is_empty()) else {
                        // The value is never echoed: it may be the key itself.
                        return Err(err(format!(
                            "{at}.api_key: must be env:VARIABLE (keys belong in the environment, not in this file)"
                        )));
                    };
                    if !read_keys {
                        continue_key(var)?;
                        SecretString::from(String::new())
                    } else {
                        let Some(key) = env.get(var) else {
                            return Err(err(format!(
                                "{at}.api_key: environment variable {var} is not set"
                            )));
                        };
                        SecretString::from(key)
                    }
                }
            };
            if u.models.is_empty() {
                return Err(err(format!("{at}.models: must name at least one model")));
            }
            for (j, m) in u.models.iter().enumerate() {
                if !crate::task::valid_name(m) {
                    return Err(err(format!(
                        "{at}.models[{j}]: must be 1 to 128 characters of [A-Za-z0-9_.:/-]"
                    )));
                }
                if !served.insert(m.clone()) {
                    return Err(err(format!(
                        "{at}.models[{j}]: {m:?} is served by two upstreams; a model routes to exactly one (use fallback_models to try another)"
                    )));
                }
            }
            check_limits(&format!("{at}.limits"), &u.limits)?;
            for (m, l) in &u.model_limits {
                if !u.models.contains(m) {
                    return Err(err(format!(
                        "{at}.model_limits.{m}: not one of this upstream's models"
                    )));
                }
                check_limits(&format!("{at}.model_limits.{m}"), l)?;
            }
            let mut prices = BTreeMap::new();
            for (m, p) in &u.prices {
                if !u.models.contains(m) {
                    return Err(err(format!(
                        "{at}.prices.{m}: not one of this upstream's models"
                    )));
                }
                for (what, v) in [("prompt", p.prompt), ("completion", p.completion)] {
                    if !v.is_finite() || !(0.0..=1e6).contains(&v) {
                        return Err(err(format!(
                            "{at}.prices.{m}.{what}: dollars per million tokens, 0 to 1000000"
                        )));
                    }
                }
                prices.insert(
                    m.clone(),
                    crate::config::Price {
                        prompt: p.prompt,
                        completion: p.completion,
                    },
                );
            }
            list.push(Upstream {
                name: u.name,
                base_url: u.base_url.trim_end_matches('/').to_owned(),
                api_key,
                models: u.models,
                limits: u.limits,
                model_limits: u.model_limits,
                prices,
            });
        }
        if served.len() > MAX_MODELS {
            return Err(err(format!("at most {MAX_MODELS} models in all")));
        }
        let default_model = match model_env.filter(|m| !m.trim().is_empty()) {
            Some(m) => {
                if !served.contains(m.trim()) {
                    return Err(ConfigError {
                        var: crate::config::ENV_MODEL,
                        message: format!("{m:?} is not served by any upstream in {ENV_UPSTREAMS}"),
                    });
                }
                m.trim().to_owned()
            }
            None => list[0].models[0].clone(),
        };
        Ok(Self {
            list,
            implicit: false,
            default_model,
        })
    }

    /// Where `model`'s calls go; `None` when no upstream serves it (never for the implicit one).
    pub fn route<'a>(&'a self, model: &'a str) -> Option<Route<'a>> {
        if self.implicit {
            let upstream = self.list.first()?;
            return Some(Route {
                upstream,
                model,
                model_limits: upstream.limits_for(model),
            });
        }
        self.list
            .iter()
            .find(|u| u.models.iter().any(|m| m == model))
            .map(|upstream| Route {
                upstream,
                model,
                model_limits: upstream.limits_for(model),
            })
    }

    pub fn serves(&self, model: &str) -> bool {
        self.implicit || self.route(model).is_some()
    }

    /// Whether `model` may appear as a metric label: with configured upstreams every served model
    /// is bounded by the file.
    pub fn is_configured_model(&self, model: &str) -> bool {
        !self.implicit && self.route(model).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const YAML: &str = r#"
upstreams:
  - name: primary
    base_url: http://127.0.0.1:1/v1/
    api_key: env:PRIMARY_KEY
    models: [gpt-4o-mini, gpt-4o]
    limits: {rpm: 500, tpm: 200000}
    model_limits:
      gpt-4o: {rpm: 100, concurrency: 4}
  - name: backup
    base_url: https://example.invalid/v1
    models: [llama-3]
"#;

    #[test]
    fn a_yaml_file_routes_models_to_their_upstream() {
        let u = Upstreams::parse(YAML, false, &env(&[("PRIMARY_KEY", "sk-1")]), None, true)
            .expect("valid file");
        assert!(!u.implicit);
        assert_eq!(u.default_model, "gpt-4o-mini");
        let r = u.route("gpt-4o").expect("served");
        assert_eq!(r.upstream.name, "primary");
        assert_eq!(r.upstream.base_url, "http://127.0.0.1:1/v1");
        assert_eq!(r.upstream.limits.rpm, Some(500));
        assert_eq!(r.model_limits.concurrency, Some(4));
        assert_eq!(
            u.route("llama-3").map(|r| r.upstream.name.as_str()),
            Some("backup")
        );
        assert!(u.route("gpt-5").is_none());
        assert!(!u.serves("gpt-5"));
    }

    #[test]
    fn an_upstream_prices_its_own_models() {
        let json = r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m1", "m2"],
                        "prices": {"m1": {"prompt": 2.5, "completion": 10}}}]}"#;
        let u = Upstreams::parse(json, true, &env(&[]), None, true).expect("valid");
        let r = u.route("m1").expect("served");
        assert_eq!(
            r.upstream.prices.get("m1"),
            Some(&crate::config::Price {
                prompt: 2.5,
                completion: 10.0
            })
        );
        assert!(!r.upstream.prices.contains_key("m2"));
    }

    #[test]
    fn json_works_too_and_agentq_model_must_be_served() {
        let json =
            r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m1", "m2"]}]}"#;
        let u = Upstreams::parse(json, true, &env(&[]), Some("m2"), true).expect("valid");
        assert_eq!(u.default_model, "m2");
        let e = Upstreams::parse(json, true, &env(&[]), Some("m3"), true).expect_err("unserved");
        assert_eq!(e.var, "AGENTQ_MODEL");
    }

    #[test]
    fn mistakes_name_their_place_and_never_echo_a_key() {
        let cases = [
            (r#"{"upstreams": []}"#, "at least one upstream"),
            (
                r#"{"upstreams": [{"name": "a b", "base_url": "http://x", "models": ["m"]}]}"#,
                "upstreams[0].name",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "ftp://x", "models": ["m"]}]}"#,
                "upstreams[0].base_url",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": []}]}"#,
                "upstreams[0].models",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"], "limits": {"rpm": 0}}]}"#,
                "upstreams[0].limits.rpm",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"], "limits": {"rps": 1}}]}"#,
                "rps",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"], "prices": {"z": {"prompt": 1, "completion": 1}}}]}"#,
                "upstreams[0].prices.z",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"], "prices": {"m": {"prompt": -1, "completion": 1}}}]}"#,
                "upstreams[0].prices.m.prompt",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"], "prices": {"m": {"prompt": 1}}}]}"#,
                "completion",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"], "model_limits": {"z": {"rpm": 1}}}]}"#,
                "model_limits.z",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"]}, {"name": "a", "base_url": "http://y", "models": ["n"]}]}"#,
                "upstreams[1].name",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"]}, {"name": "b", "base_url": "http://y", "models": ["m"]}]}"#,
                "upstreams[1].models[0]",
            ),
            (
                r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"], "api_key": "env:MISSING"}]}"#,
                "MISSING is not set",
            ),
        ];
        for (text, want) in cases {
            let e = Upstreams::parse(text, true, &env(&[]), None, true).expect_err(text);
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
        let literal = r#"{"upstreams": [{"name": "a", "base_url": "http://x", "models": ["m"], "api_key": "sk-secret-123"}]}"#;
        let e = Upstreams::parse(literal, true, &env(&[]), None, true).expect_err("literal key");
        assert!(e.to_string().contains("env:VARIABLE"), "{e}");
        assert!(!e.to_string().contains("sk-secret-123"), "{e}");
    }

    #[test]
    fn the_implicit_upstream_serves_any_model() {
        let u = Upstreams::implicit(
            "http://x/v1/",
            SecretString::from(String::new()),
            "gpt-4o-mini",
        );
        assert!(u.implicit);
        assert!(u.serves("anything"));
        let r = u.route("anything").expect("implicit routes all");
        assert_eq!(r.upstream.name, IMPLICIT);
        assert!(r.upstream.limits.is_empty());
        assert!(!u.is_configured_model("gpt-4o-mini"));
    }
}
