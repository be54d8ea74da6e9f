//! Issue 14, server-side tools over MCP, against a server nobody here wrote: the reference
//! `@modelcontextprotocol/server-everything` from npm in Streamable HTTP mode (installed by
//! `tests/peers/mcp/install.sh`), behind a proxy that counts the tool calls it receives. The mock
//! LLM's `[[call:NAME:ARGS]]` marker plays the model that asks for tools.

use std::time::Duration;

use agentq_tests::mcp::McpServer;
use agentq_tests::{assert_no_panic, MockConfig, Stack};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

async fn stack(watch: Option<&str>) -> Result<(Stack, McpServer)> {
    let mut s = Stack::new(MockConfig {
        record: true,
        ..MockConfig::default()
    })
    .await?;
    let mcp = McpServer::start(s.logs.path(), watch).await?;
    s.env.insert(
        "AGENTQ_MCP_SERVERS".into(),
        json!({"everything": {"url": mcp.url, "headers": {"X-Agentq-Test": "env:MCP_TEST_TOKEN"}}})
            .to_string(),
    );
    s.env
        .insert("MCP_TEST_TOKEN".into(), "token-from-a-secret".into());
    s.start_api(&[]).await?;
    Ok((s, mcp))
}

fn offered(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t["function"]["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The tool messages the model's last call carried, by content.
fn tool_results(body: &Value) -> Vec<String> {
    body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["role"] == "tool")
                .filter_map(|m| m["content"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The model asks for `echo` and `get-sum`; the worker lists the server's tools, offers them,
/// calls both (with the declared header, read from the environment), records the step and calls
/// the model again with the results: the right answers come back and the task succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tools_answer_the_model_and_the_task_succeeds() -> Result<()> {
    let (mut s, mcp) = stack(Some("x-agentq-test")).await?;
    let _w = s.start_worker(&[]).await?;
    let prompt = r#"[[call:everything__echo:{"message":"hi there"}]][[call:everything__get-sum:{"a":2,"b":3}]]"#;
    let id = s
        .submit_json(&json!({"prompt": prompt, "mcp": ["everything"]}))
        .await?;
    let t = &s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(30))
        .await?[0];
    ensure!(t["status"] == "succeeded", "{t}");
    let content = t["result"]["content"].as_str().unwrap_or_default();
    ensure!(content.contains("Echo: hi there"), "{content}");
    ensure!(content.contains('5'), "the sum: {content}");
    ensure!(t["steps"] == 2 && t["usage"]["calls"] == 2, "{t}");

    let sent = s.request_bodies(prompt);
    ensure!(sent.len() == 2, "two model calls: {}", sent.len());
    let tools = offered(&sent[0]);
    for want in ["everything__echo", "everything__get-sum"] {
        ensure!(tools.iter().any(|t| t == want), "{want} offered: {tools:?}");
    }
    let echo = sent[0]["tools"]
        .as_array()
        .and_then(|t| {
            t.iter()
                .find(|t| t["function"]["name"] == "everything__echo")
        })
        .context("echo offered")?;
    ensure!(
        echo["function"]["parameters"]["properties"]["message"].is_object(),
        "the tool's input schema is offered as its parameters: {echo}"
    );
    let results = tool_results(&sent[1]);
    ensure!(results.len() == 2, "{results:?}");
    ensure!(results[0] == "Echo: hi there", "{results:?}");
    // exactly the two calls, each once (run at the same time: in any order), with the
    // declared header
    let mut calls = mcp.tool_calls();
    calls.sort();
    ensure!(calls == ["echo", "get-sum"], "{calls:?}");
    // the event stream shows the step: what the model asked for, what the tools said, then the
    // answer's text (step 1), which is the result
    let events =
        agentq_tests::sse::read(&s.api_url, &format!("/v1/tasks/{id}/events"), None, None).await?;
    let names = agentq_tests::sse::names(&events);
    let call = events
        .iter()
        .position(|e| e.event == "tool_call")
        .with_context(|| format!("{names:?}"))?;
    let result = events
        .iter()
        .position(|e| e.event == "tool_result")
        .with_context(|| format!("{names:?}"))?;
    ensure!(call < result, "{names:?}");
    ensure!(
        events[call].data["step"] == 0
            && events[call].data["tool_calls"].as_array().map(Vec::len) == Some(2),
        "{:?}",
        events[call]
    );
    let results = &events[result].data["results"];
    ensure!(
        results.as_array().map(Vec::len) == Some(2)
            && results
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x["content"] == "Echo: hi there")),
        "{results}"
    );
    let answer: String = events
        .iter()
        .filter(|e| e.event == "delta")
        .map(|e| {
            ensure!(e.data["step"] == 1, "only the answer streams text: {e:?}");
            Ok(e.data["text"].as_str().unwrap_or_default())
        })
        .collect::<Result<_>>()?;
    ensure!(answer == content, "{answer:?} != {content:?}");
    ensure!(names.last() == Some(&"done"), "{names:?}");
    ensure!(
        mcp.seen()
            .iter()
            .all(|r| r.header.as_deref() == Some("token-from-a-secret")),
        "every request carried the header from the environment"
    );
    let (_, with_steps) = s.get_json(&format!("/v1/tasks/{id}?include=steps")).await?;
    let roles: Vec<&str> = with_steps["transcript"]
        .as_array()
        .context("transcript")?
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    ensure!(
        roles == ["assistant", "tool", "tool", "assistant"],
        "{with_steps}"
    );
    // the secret never reaches a log
    ensure!(
        !s.all_logs().contains("token-from-a-secret"),
        "secret in a log"
    );
    assert_no_panic(&s);
    Ok(())
}

/// A failing tool (bad arguments), a slow one (past the timeout), a huge result (past the size
/// cap) and a tool the server does not have each come back to the model as a tool result saying
/// so; the task still succeeds. A filter offers only the tools it names, and `max_steps` ends a
/// model that keeps asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_slow_huge_and_unknown_tools_are_answered_as_errors() -> Result<()> {
    let (mut s, mcp) = stack(None).await?;
    let _w = s
        .start_worker(&[
            ("AGENTQ_MCP_TIMEOUT_SECS", "1"),
            ("AGENTQ_MCP_MAX_RESULT_BYTES", "256"),
        ])
        .await?;
    let long = "x".repeat(2000);
    let prompt = format!(
        r#"[[call:everything__get-sum:{{"a":"two"}}]][[call:everything__trigger-long-running-operation:{{"duration":3,"steps":1}}]][[call:everything__echo:{{"message":"{long}"}}]][[call:everything__nope]]"#
    );
    let id = s
        .submit_json(&json!({"prompt": prompt, "mcp": ["everything"]}))
        .await?;
    let t = &s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(30))
        .await?[0];
    ensure!(t["status"] == "succeeded", "{t}");
    let sent = s.request_bodies(&prompt);
    ensure!(sent.len() == 2, "two model calls: {}", sent.len());
    let results = tool_results(&sent[1]);
    ensure!(results.len() == 4, "{results:?}");
    ensure!(
        results[0].starts_with("error:"),
        "bad arguments: {}",
        results[0]
    );
    ensure!(
        results[1] == "error: the tool did not answer within 1s",
        "slow: {}",
        results[1]
    );
    ensure!(
        results[2].starts_with("Echo: xxx")
            && results[2].contains("[truncated: 2006 bytes in all]"),
        "huge: {}",
        results[2]
    );
    ensure!(
        results[2].len() < 320,
        "bounded: {} bytes",
        results[2].len()
    );
    ensure!(
        results[3].starts_with("error: there is no tool named \"everything__nope\""),
        "unknown: {}",
        results[3]
    );
    // the unknown tool never reached the server
    ensure!(
        !mcp.tool_calls().iter().any(|t| t == "nope"),
        "{:?}",
        mcp.tool_calls()
    );

    // a filter: only echo is offered
    let filtered = "only echo, please";
    let id = s
        .submit_json(
            &json!({"prompt": filtered, "mcp": [{"server": "everything", "tools": ["echo"]}]}),
        )
        .await?;
    s.wait_final(std::slice::from_ref(&id), Duration::from_secs(30))
        .await?;
    let sent = s.request_bodies(filtered);
    ensure!(
        offered(&sent[0]) == ["everything__echo"],
        "{:?}",
        offered(&sent[0])
    );

    // max_steps: the model asks again at the last step
    let capped = r#"capped [[call:everything__echo:{"message":"a"}]]"#;
    let id = s
        .submit_json(&json!({"prompt": capped, "mcp": ["everything"], "max_steps": 1}))
        .await?;
    let t = &s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(30))
        .await?[0];
    ensure!(
        t["status"] == "failed" && t["error_code"] == "max_steps",
        "{t}"
    );
    ensure!(s.request_bodies(capped).len() == 1, "one model call");

    // only declared servers: a task naming another is a 422, and nothing is dialled
    let (status, reply) = s
        .post(&json!({"prompt": "x", "mcp": ["http://evil.example/mcp"]}))
        .await?;
    ensure!(
        status == 422 && reply["error"]["field"] == "mcp[0]",
        "{status} {reply}"
    );
    assert_no_panic(&s);
    Ok(())
}

/// A worker SIGKILLed during the second model call, after the first step's MCP call was
/// recorded: the next run resumes from that step. The model is called 3 times (step 1 once,
/// step 2 twice) and the MCP server gets exactly one tool call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_between_steps_repeats_no_recorded_call() -> Result<()> {
    let (mut s, mcp) = stack(None).await?;
    let mut w1 = s.start_worker(&[]).await?;
    let prompt = r#"[[sleep:1200]] [[call:everything__echo:{"message":"once"}]]"#;
    let id = s
        .submit_json(&json!({"prompt": prompt, "mcp": ["everything"]}))
        .await?;
    // the second call has started (it sleeps in the mock): kill its worker
    s.wait_calls(prompt, 2, Duration::from_secs(20)).await?;
    w1.proc.sigkill();
    let _w2 = s.start_worker(&[]).await?;
    let t = &s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(30))
        .await?[0];
    ensure!(t["status"] == "succeeded", "{t}");
    ensure!(t["result"]["content"] == "tool results: Echo: once", "{t}");
    ensure!(t["steps"] == 2, "{t}");
    ensure!(
        s.request_bodies(prompt).len() == 3,
        "model calls: {}",
        s.request_bodies(prompt).len()
    );
    ensure!(mcp.tool_calls() == ["echo"], "{:?}", mcp.tool_calls());
    assert_no_panic(&s);
    Ok(())
}
