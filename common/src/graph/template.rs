//! The template syntax of workflow nodes: how a node's messages read its parents' results.
//!
//! `{{ expr }}` anywhere in a message's text, where `expr` is one of
//! - `nodes.<id>.output`: the parent's result content (`""` when it did not succeed);
//! - `nodes.<id>.output.<path>`: a field of that content parsed as JSON (a code fence around it
//!   is allowed); `<path>` is dot-separated object keys or array indexes; a string is inserted as
//!   it is, anything else as JSON;
//! - `nodes.<id>.status` / `nodes.<id>.error`: the parent's final status and error text (`""` if
//!   none): how a node after a `continue` parent sees the failure;
//! - `parents`: every parent's output as a JSON object `{"<id>": "<output>" or null}` (null when
//!   the parent did not succeed); for a dependent of a `plan` node, the plan's children too.
//!
//! Nothing else is evaluated: no expressions, filters or loops. Every `{{` starts a template, and
//! `<id>` must be one of the node's `depends_on`, so a template can only read a result that is
//! final before the node runs. Checked when the workflow is submitted; rendered by the worker.

use std::collections::BTreeMap;

/// One piece of a parsed text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Text(String),
    Ref(Expr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Output { node: String, path: Vec<String> },
    Status { node: String },
    Error { node: String },
    Parents,
}

impl Expr {
    /// The node it reads, if one.
    pub fn node(&self) -> Option<&str> {
        match self {
            Self::Output { node, .. } | Self::Status { node } | Self::Error { node } => Some(node),
            Self::Parents => None,
        }
    }
}

/// Longest text between `{{` and `}}`.
const MAX_EXPR_LEN: usize = 256;

/// Whether a text holds a template at all (the common case, none, costs one search).
pub fn has_templates(text: &str) -> bool {
    text.contains("{{")
}

/// Splits a text into literal pieces and references. The error says what is wrong, quoting the
/// template.
pub fn parse(text: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push(Segment::Text(rest[..start].to_owned()));
        }
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(format!(
                "template {:?} is not closed with }}}}",
                clip(&rest[start..])
            ));
        };
        let inner = &after[..end];
        if inner.len() > MAX_EXPR_LEN {
            return Err(format!(
                "template {:?} is longer than {MAX_EXPR_LEN} characters",
                clip(&rest[start..])
            ));
        }
        out.push(Segment::Ref(parse_expr(inner.trim()).map_err(|why| {
            format!("template {{{{{}}}}}: {why}", inner.trim())
        })?));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Segment::Text(rest.to_owned()));
    }
    Ok(out)
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn parse_expr(e: &str) -> Result<Expr, String> {
    if e == "parents" {
        return Ok(Expr::Parents);
    }
    let mut parts = e.split('.');
    if parts.next() != Some("nodes") {
        return Err(
            "must be nodes.<id>.output, nodes.<id>.output.<field>, nodes.<id>.status, nodes.<id>.error or parents"
                .to_owned(),
        );
    }
    let node = parts.next().unwrap_or("");
    if !super::valid_node_id(node) {
        return Err("a node id is 1 to 64 characters of [A-Za-z0-9_-]".to_owned());
    }
    let node = node.to_owned();
    match parts.next() {
        Some("output") => {
            let path: Vec<String> = parts.map(str::to_owned).collect();
            if path.iter().any(String::is_empty) {
                return Err("a field path has no empty parts".to_owned());
            }
            Ok(Expr::Output { node, path })
        }
        Some("status") if parts.next().is_none() => Ok(Expr::Status { node }),
        Some("error") if parts.next().is_none() => Ok(Expr::Error { node }),
        _ => Err("after nodes.<id> comes .output, .output.<field>, .status or .error".to_owned()),
    }
}

/// What a template may read of one parent (final before the node runs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeData {
    /// `succeeded`, `failed`, `cancelled` or `skipped`.
    pub status: String,
    /// The result content; empty when the node did not succeed.
    pub output: String,
    pub error: String,
}

impl NodeData {
    fn succeeded(&self) -> bool {
        self.status == "succeeded"
    }
}

/// Renders a parsed text. `parents` are the node's parents (and a plan parent's children), by id.
pub fn render(
    segments: &[Segment],
    parents: &BTreeMap<String, NodeData>,
) -> Result<String, String> {
    let mut out = String::new();
    for s in segments {
        match s {
            Segment::Text(t) => out.push_str(t),
            Segment::Ref(e) => out.push_str(&render_expr(e, parents)?),
        }
    }
    Ok(out)
}

fn render_expr(e: &Expr, parents: &BTreeMap<String, NodeData>) -> Result<String, String> {
    let get = |node: &str| {
        parents
            .get(node)
            .ok_or_else(|| format!("node {node:?} has no recorded result"))
    };
    match e {
        Expr::Parents => {
            let obj: serde_json::Map<String, serde_json::Value> = parents
                .iter()
                .map(|(id, d)| {
                    let v = if d.succeeded() {
                        serde_json::Value::String(d.output.clone())
                    } else {
                        serde_json::Value::Null
                    };
                    (id.clone(), v)
                })
                .collect();
            Ok(serde_json::Value::Object(obj).to_string())
        }
        Expr::Status { node } => Ok(get(node)?.status.clone()),
        Expr::Error { node } => Ok(get(node)?.error.clone()),
        Expr::Output { node, path } => {
            let d = get(node)?;
            if path.is_empty() {
                return Ok(if d.succeeded() {
                    d.output.clone()
                } else {
                    String::new()
                });
            }
            if !d.succeeded() {
                return Err(format!(
                    "{{{{nodes.{node}.output.{}}}}}: node {node:?} {} and has no output",
                    path.join("."),
                    d.status
                ));
            }
            let v: serde_json::Value =
                serde_json::from_str(strip_fence(&d.output)).map_err(|_| {
                    format!(
                        "{{{{nodes.{node}.output.{}}}}}: the output of node {node:?} is not JSON",
                        path.join(".")
                    )
                })?;
            let mut at = &v;
            for p in path {
                let next = match at {
                    serde_json::Value::Object(m) => m.get(p),
                    serde_json::Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
                    _ => None,
                };
                at = next.ok_or_else(|| {
                    format!(
                        "{{{{nodes.{node}.output.{}}}}}: the output of node {node:?} has no {p:?}",
                        path.join(".")
                    )
                })?;
            }
            Ok(match at {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        }
    }
}

/// A model's JSON often comes inside a Markdown code fence: the text inside it.
pub fn strip_fence(s: &str) -> &str {
    let t = s.trim();
    let Some(body) = t.strip_prefix("```") else {
        return t;
    };
    let Some(body) = body.strip_suffix("```") else {
        return t;
    };
    // the language tag (`json`) runs to the first newline
    match body.find('\n') {
        Some(nl) => body[nl + 1..].trim(),
        None => body.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(status: &str, output: &str) -> NodeData {
        NodeData {
            status: status.to_owned(),
            output: output.to_owned(),
            error: if status == "succeeded" {
                String::new()
            } else {
                "boom".to_owned()
            },
        }
    }

    #[test]
    fn parses_every_form() {
        let s = parse("a {{nodes.r.output}} b {{ nodes.r.output.x.0 }}{{parents}}{{nodes.q.status}}{{nodes.q.error}}").expect("valid");
        assert_eq!(s.len(), 7);
        assert_eq!(
            s[3],
            Segment::Ref(Expr::Output {
                node: "r".into(),
                path: vec!["x".into(), "0".into()]
            })
        );
        assert_eq!(
            parse("plain").expect("valid"),
            vec![Segment::Text("plain".into())]
        );
    }

    #[test]
    fn refuses_what_is_not_the_syntax() {
        for bad in [
            "{{nodes.r.output",
            "{{ env.HOME }}",
            "{{nodes..output}}",
            "{{nodes.r}}",
            "{{nodes.r.status.x}}",
            "{{nodes.r.output..x}}",
            "{{}}",
            "{{nodes.a b.output}}",
        ] {
            assert!(parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn renders_outputs_fields_and_parents() {
        let mut p = BTreeMap::new();
        p.insert(
            "a".to_owned(),
            data(
                "succeeded",
                "```json\n{\"x\": [\"one\", 2], \"n\": {\"k\": true}}\n```",
            ),
        );
        p.insert("b".to_owned(), data("failed", ""));
        let r = |t: &str| render(&parse(t).expect("valid"), &p);
        assert_eq!(r("{{nodes.a.output.x.0}}").expect("ok"), "one");
        assert_eq!(r("{{nodes.a.output.x.1}}").expect("ok"), "2");
        assert_eq!(r("{{nodes.a.output.n}}").expect("ok"), "{\"k\":true}");
        assert_eq!(r("[{{nodes.b.output}}]").expect("ok"), "[]");
        assert_eq!(
            r("{{nodes.b.status}}: {{nodes.b.error}}").expect("ok"),
            "failed: boom"
        );
        let parents: serde_json::Value =
            serde_json::from_str(&r("{{parents}}").expect("ok")).expect("json");
        assert_eq!(parents["b"], serde_json::Value::Null);
        assert!(parents["a"].as_str().expect("text").contains("\"x\""));
        assert!(r("{{nodes.a.output.missing}}").is_err());
        assert!(r("{{nodes.b.output.x}}").is_err());
        assert!(r("{{nodes.zz.output}}").is_err());
    }

    #[test]
    fn a_rendered_output_is_not_rendered_again() {
        let mut p = BTreeMap::new();
        p.insert("a".to_owned(), data("succeeded", "{{nodes.a.output}}"));
        assert_eq!(
            render(&parse("<{{nodes.a.output}}>").expect("valid"), &p).expect("ok"),
            "<{{nodes.a.output}}>"
        );
    }

    #[test]
    fn strips_fences() {
        assert_eq!(strip_fence("```json\n{}\n```"), "{}");
        assert_eq!(strip_fence("```\n[1]\n```"), "[1]");
        assert_eq!(strip_fence(" {\"a\":1} "), "{\"a\":1}");
    }
}
