//! Issue 14, the whole chat request: a task carries every chat-completions parameter users set,
//! content parts, assistant tool calls and tool results, and the worker sends them as given; bad
//! ones are a 422 naming the field with nothing written; an agent's memory keeps whole
//! exchanges, tool calls and results included, and what it sends is always accepted by the
//! mock's strict order check (OpenAI's: tool results follow their call), even after trimming
//! cut an exchange in two.

use std::time::Duration;

use agentq_tests::{assert_no_panic, MockConfig, Stack};
use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

fn recording() -> MockConfig {
    MockConfig {
        record: true,
        ..MockConfig::default()
    }
}

fn call(id: &str, name: &str, args: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_carries_the_whole_chat_request() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let prompt = "what is 2+3, given the tool said so?";
    let messages = json!([
        {"role": "developer", "content": "answer in one word"},
        {"role": "user", "name": "ann", "content": [
            {"type": "text", "text": "add these"},
            {"type": "image_url", "image_url": {"url": "https://example.com/sum.png", "detail": "low"}}
        ]},
        {"role": "assistant", "tool_calls": [call("c1", "add", r#"{"a":2,"b":3}"#)]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "user", "content": prompt}
    ]);
    let params = json!({
        "temperature": 0.25, "top_p": 0.5, "max_tokens": 64, "stop": ["END"], "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "answer", "strict": true,
            "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        }},
        "tools": [{"type": "function", "function": {
            "name": "add", "description": "adds two integers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
        }}],
        "tool_choice": "auto", "parallel_tool_calls": false, "user": "user-42"
    });
    let mut body = params.clone();
    body["messages"] = messages.clone();
    let id = s.submit_json(&body).await?;
    let t = &s.wait_final(&[id], Duration::from_secs(15)).await?[0];
    ensure!(t["status"] == "succeeded", "{t}");
    ensure!(t["result"]["finish_reason"] == "stop", "{t}");

    let sent = s.request_bodies(prompt);
    ensure!(sent.len() == 1, "one call: {sent:?}");
    let sent = &sent[0];
    // exactly what the task said, and nothing else (the task's max_tokens replaces the
    // operator's AGENTQ_MAX_TOKENS)
    ensure!(
        sent["messages"] == messages,
        "messages: {}",
        sent["messages"]
    );
    for (k, v) in params.as_object().context("object")? {
        ensure!(&sent[k] == v, "{k}: sent {} for {v}", sent[k]);
    }
    let mut keys: Vec<&str> = sent
        .as_object()
        .context("object")?
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let mut want: Vec<&str> = params
        .as_object()
        .context("object")?
        .keys()
        .map(String::as_str)
        // streamed (AGENTQ_STREAM=on), with the usage chunk asked for
        .chain(["messages", "model", "stream", "stream_options"])
        .collect();
    want.sort_unstable();
    ensure!(keys == want, "sent {keys:?}, want {want:?}");
    ensure!(sent["stream"] == true, "{}", sent["stream"]);
    ensure!(
        sent["stream_options"] == json!({"include_usage": true}),
        "{}",
        sent["stream_options"]
    );
    assert_no_panic(&s);
    Ok(())
}

/// Each mistake is a 422 naming its field, and nothing is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chat_requests_name_their_field() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let user = json!({"role": "user", "content": "x"});
    let cases = [
        (json!({"prompt": "x", "temperature": 3}), "temperature"),
        (json!({"prompt": "x", "top_p": 1.5}), "top_p"),
        (
            json!({"prompt": "x", "max_tokens": 5, "max_completion_tokens": 5}),
            "max_completion_tokens",
        ),
        (
            json!({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
            "stop",
        ),
        (
            json!({"prompt": "x", "tool_choice": "required"}),
            "tool_choice",
        ),
        (
            json!({"prompt": "x", "tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "tool_choice.function.name",
        ),
        (
            json!({"messages": [user, {"role": "tool", "tool_call_id": "nope", "content": "1"}]}),
            "messages[1].tool_call_id",
        ),
        (
            json!({"messages": [user, {"role": "assistant", "tool_calls": [call("a", "f", "{}")]}]}),
            "messages[1].tool_calls",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}),
            "messages[0].content[0].image_url.url",
        ),
    ];
    for (body, field) in cases {
        let (status, reply) = s.post(&body).await?;
        ensure!(status == 422, "{body}: {status} {reply}");
        ensure!(reply["error"]["field"] == field, "{body}: {reply}");
    }
    // unknown fields and wrong shapes are 422 too, naming the place
    for (body, field_part) in [
        (
            json!({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "colour": 1}}]}),
            "tools",
        ),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages",
        ),
        (json!({"prompt": "x", "stop": 5}), "stop"),
    ] {
        let (status, reply) = s.post(&body).await?;
        ensure!(status == 422, "{body}: {status} {reply}");
        let field = reply["error"]["field"].as_str().unwrap_or_default();
        ensure!(field.starts_with(field_part), "{body}: {reply}");
    }
    let q = s.queue("default").await?;
    ensure!(q["pending"] == 0, "nothing half-written: {q}");
    assert_no_panic(&s);
    Ok(())
}

/// An agent's memory keeps whole exchanges with their tool calls and results; what the next
/// task sends is accepted by the mock's strict order check, also when the memory holds a model
/// reply whose tool calls were never answered, and when trimming cut an exchange in two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_keeps_whole_tool_exchanges() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    // room for 5 messages: the first task's exchange is 5 (user, assistant + tool calls, tool,
    // user, answer); each later one adds 2
    let _w = s.start_worker(&[("AGENTQ_MEMORY_MESSAGES", "5")]).await?;
    let tool_exchange = json!([
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "tool_calls": [call("t1", "lookup", r#"{"q":"x"}"#)]},
        {"role": "tool", "tool_call_id": "t1", "content": "found x"},
        {"role": "user", "content": "first question"}
    ]);
    let run = |body: Value| {
        let s = &s;
        async move {
            let id = s.submit_json(&body).await?;
            let t = s
                .wait_final(&[id], Duration::from_secs(15))
                .await?
                .remove(0);
            anyhow::Ok(t)
        }
    };
    let t1 = run(json!({"agent_id": "ana", "messages": tool_exchange})).await?;
    ensure!(t1["status"] == "succeeded", "{t1}");

    // task 2 sees task 1's whole exchange, tool call and result in order
    let t2 = run(json!({"agent_id": "ana", "prompt": "second question"})).await?;
    ensure!(t2["status"] == "succeeded", "{t2}");
    let sent = &s.request_bodies("second question")[0]["messages"];
    let mut want = tool_exchange.as_array().context("array")?.clone();
    want.push(json!({"role": "assistant", "content": "echo: first question"}));
    want.push(json!({"role": "user", "content": "second question"}));
    ensure!(sent == &Value::from(want), "task 2 sent {sent}");

    // memory kept its newest 5: ..., tool, user, answer, user, answer would start at the `tool`
    // result, whose call was trimmed away; the trim drops it, so the stored list starts whole
    let mut c = s.redis.conn()?;
    let stored: Vec<String> = redis::cmd("LRANGE")
        .arg("agentq:{default}:memory:ana")
        .arg(0)
        .arg(-1)
        .query(&mut c)?;
    ensure!(stored.len() == 4, "{stored:?}");
    ensure!(stored[0].starts_with(r#"{"role":"user""#), "{stored:?}");
    let t3 = run(json!({"agent_id": "ana", "prompt": "third question"})).await?;
    ensure!(
        t3["status"] == "succeeded",
        "the cut exchange was repaired: {t3}"
    );
    let sent = &s.request_bodies("third question")[0]["messages"];
    ensure!(
        sent == &json!([
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "echo: first question"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "echo: second question"},
            {"role": "user", "content": "third question"}
        ]),
        "task 3 sent {sent}"
    );

    // a model that answers with tool calls a task did not declare (its caller runs them
    // elsewhere): the result keeps them, and the agent's next task still sends a history the
    // provider accepts
    let t4 = run(json!({"agent_id": "bo", "prompt": r#"add [[call:add:{"a":1}]]"#})).await?;
    ensure!(t4["status"] == "succeeded", "{t4}");
    ensure!(t4["result"]["finish_reason"] == "tool_calls", "{t4}");
    ensure!(
        t4["result"]["tool_calls"][0]["function"]["name"] == "add",
        "{t4}"
    );
    let t5 = run(json!({"agent_id": "bo", "prompt": "next"})).await?;
    ensure!(t5["status"] == "succeeded", "{t5}");
    let sent = &s.request_bodies("next")[0]["messages"];
    ensure!(
        sent == &json!([
            {"role": "user", "content": r#"add [[call:add:{"a":1}]]"#},
            {"role": "user", "content": "next"}
        ]),
        "the unanswered tool calls are left out: {sent}"
    );
    assert_no_panic(&s);
    Ok(())
}

fn add_tool() -> Value {
    json!([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}])
}

async fn outputs(s: &Stack, id: &str, body: &Value) -> Result<(u16, Value)> {
    let r = s
        .http
        .post(format!("{}/v1/tasks/{id}/tool_outputs", s.api_url))
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// A client-side tool over HTTP: the model asks for the task's tool, the task waits in
/// `requires_action` holding no worker slot, bad outputs are a 422 naming the field, the right
/// ones queue it again and the model's second call reads them; the transcript, the step count,
/// the usage of both calls and the agent's memory hold the whole exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_side_tool_round_trip_over_http() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let prompt = r#"sum [[call:add:{"a":2,"b":3}]]"#;
    let id = s
        .submit_json(&json!({"prompt": prompt, "agent_id": "calc", "tools": add_tool()}))
        .await?;
    let t = s
        .wait_for(&id, Duration::from_secs(15), |t| {
            t["status"] == "requires_action"
        })
        .await?;
    let calls = &t["required_action"]["submit_tool_outputs"]["tool_calls"];
    ensure!(t["required_action"]["type"] == "submit_tool_outputs", "{t}");
    ensure!(calls[0]["id"] == "call_1_0", "{t}");
    ensure!(
        calls[0]["function"]["arguments"] == r#"{"a":2,"b":3}"#,
        "{t}"
    );
    ensure!(t["required_action"]["expires_at"].is_string(), "{t}");
    ensure!(t["steps"] == 1 && t["attempts"] == 1, "{t}");
    let q = s.queue("default").await?;
    ensure!(
        q["inflight"] == 0 && q["requires_action"] == 1 && q["pending"] == 0,
        "a waiting task holds no slot and is not pending: {q}"
    );

    for (body, field) in [
        (json!({"tool_outputs": []}), "tool_outputs"),
        (
            json!({"tool_outputs": [{"tool_call_id": "call_9", "output": "5"}]}),
            "tool_outputs[0].tool_call_id",
        ),
        (
            json!({"tool_outputs": [{"tool_call_id": "call_1_0", "output": "5"}, {"tool_call_id": "call_1_0", "output": "5"}]}),
            "tool_outputs[1].tool_call_id",
        ),
    ] {
        let (status, reply) = outputs(&s, &id, &body).await?;
        ensure!(status == 422, "{body}: {status} {reply}");
        ensure!(reply["error"]["field"] == field, "{body}: {reply}");
    }
    let (status, _) = outputs(
        &s,
        "default.01936a7e-0000-7000-8000-000000000000",
        &json!({"tool_outputs": [{"tool_call_id": "call_1_0", "output": "5"}]}),
    )
    .await?;
    ensure!(status == 404, "unknown task: {status}");
    let still = s.task(&id).await?;
    ensure!(
        still["status"] == "requires_action",
        "bad outputs changed nothing: {still}"
    );

    let good = json!({"tool_outputs": [{"tool_call_id": "call_1_0", "output": "5"}]});
    let (status, reply) = outputs(&s, &id, &good).await?;
    ensure!(
        status == 202 && reply["status"] == "queued",
        "{status} {reply}"
    );
    let done = &s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(15))
        .await?[0];
    ensure!(done["status"] == "succeeded", "{done}");
    ensure!(done["result"]["content"] == "tool results: 5", "{done}");
    ensure!(done["steps"] == 2, "{done}");
    ensure!(done["attempts"] == 1, "a resume is not an attempt: {done}");
    ensure!(
        done["usage"]["calls"] == 2,
        "both calls were paid for: {done}"
    );
    let (status, reply) = outputs(&s, &id, &good).await?;
    ensure!(
        status == 409,
        "outputs for a finished task: {status} {reply}"
    );

    // its event stream: the call, the wait, the resume, the answer (step 1) and the end
    let events =
        agentq_tests::sse::read(&s.api_url, &format!("/v1/tasks/{id}/events"), None, None).await?;
    let names = agentq_tests::sse::names(&events);
    let at = |name: &str, pred: &dyn Fn(&Value) -> bool| {
        events
            .iter()
            .position(|e| e.event == name && pred(&e.data))
            .with_context(|| format!("{name} in {names:?}"))
    };
    let call_at = at("tool_call", &|d| {
        d["step"] == 0 && d["tool_calls"][0]["id"] == "call_1_0"
    })?;
    let wait_at = at("status", &|d| {
        d["status"] == "requires_action" && d["pending_tool_calls"][0]["id"] == "call_1_0"
    })?;
    let resumed_at = at("status", &|d| {
        d["status"] == "queued" && d["reason"] == "tool_outputs"
    })?;
    ensure!(call_at < wait_at && wait_at < resumed_at, "{names:?}");
    ensure!(names.last() == Some(&"done"), "{names:?}");
    let answer: String = events[resumed_at..]
        .iter()
        .filter(|e| e.event == "delta" && e.data["step"] == 1)
        .map(|e| e.data["text"].as_str().unwrap_or_default())
        .collect();
    ensure!(answer == "tool results: 5", "{events:?}");
    ensure!(agentq_tests::sse::kept_text(&events) == "tool results: 5");

    // the model's second call read its first reply and the client's result, in order
    let sent = s.request_bodies(prompt);
    ensure!(sent.len() == 2, "two model calls: {sent:?}");
    let second = &sent[1]["messages"];
    ensure!(
        second
            == &json!([
                {"role": "user", "content": prompt},
                {"role": "assistant", "tool_calls": [call("call_1_0", "add", r#"{"a":2,"b":3}"#)]},
                {"role": "tool", "tool_call_id": "call_1_0", "content": "5"}
            ]),
        "second call sent {second}"
    );
    let (_, with_steps) = s.get_json(&format!("/v1/tasks/{id}?include=steps")).await?;
    let transcript = with_steps["transcript"].as_array().context("transcript")?;
    let roles: Vec<&str> = transcript
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    ensure!(roles == ["assistant", "tool", "assistant"], "{with_steps}");
    let (status, _) = s.get_json(&format!("/v1/tasks/{id}?include=nope")).await?;
    ensure!(status == 422, "unknown include: {status}");

    // the agent's next task carries the whole exchange, accepted by the strict order check
    let next = s
        .submit_json(&json!({"prompt": "and now?", "agent_id": "calc"}))
        .await?;
    let t = &s.wait_final(&[next], Duration::from_secs(15)).await?[0];
    ensure!(t["status"] == "succeeded", "{t}");
    let sent = &s.request_bodies("and now?")[0]["messages"];
    ensure!(
        sent.as_array().map(Vec::len) == Some(5),
        "user, assistant + call, tool, answer, new user: {sent}"
    );
    assert_no_panic(&s);
    Ok(())
}

/// Outputs that never come fail the task (`tool_timeout`, dead-lettered) even with no worker
/// running; a waiting task can be cancelled, and outputs for it are then a 409; a model that
/// still asks for tools at `max_steps` ends the task without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_waits_end_by_timeout_cancel_or_max_steps() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let mut w = s.start_worker(&[]).await?;
    let slow = s
        .submit_json(&json!({"prompt": "[[call:add]] slow client", "tools": add_tool(), "tool_timeout_secs": 1}))
        .await?;
    let gone = s
        .submit_json(&json!({"prompt": "[[call:add]] cancelled", "tools": add_tool()}))
        .await?;
    let capped = s
        .submit_json(&json!({"prompt": "[[call:add]] capped", "tools": add_tool(), "max_steps": 1}))
        .await?;
    for id in [&slow, &gone] {
        s.wait_for(id, Duration::from_secs(15), |t| {
            t["status"] == "requires_action"
        })
        .await?;
    }
    // the api fails the overdue wait on its own
    w.proc.sigterm();
    w.proc.wait_exit(Duration::from_secs(10))?;
    let t = &s
        .wait_final(std::slice::from_ref(&slow), Duration::from_secs(10))
        .await?[0];
    ensure!(
        t["status"] == "failed" && t["error_code"] == "tool_timeout",
        "{t}"
    );
    let dead = s.dead("default").await?;
    ensure!(dead.iter().any(|d| d["id"] == slow.as_str()), "{dead:?}");

    let r = s
        .http
        .delete(format!("{}/v1/tasks/{gone}", s.api_url))
        .send()
        .await?;
    ensure!(r.status() == 200, "cancel while waiting: {}", r.status());
    let (status, reply) = outputs(
        &s,
        &gone,
        &json!({"tool_outputs": [{"tool_call_id": "call_1_0", "output": "1"}]}),
    )
    .await?;
    ensure!(status == 409, "{status} {reply}");
    let q = s.queue("default").await?;
    ensure!(q["requires_action"] == 0, "nothing left waiting: {q}");

    let t = &s
        .wait_final(std::slice::from_ref(&capped), Duration::from_secs(10))
        .await?[0];
    ensure!(
        t["status"] == "failed" && t["error_code"] == "max_steps",
        "{t}"
    );
    ensure!(t["usage"]["calls"] == 1, "its one call was paid for: {t}");
    ensure!(
        s.request_bodies("[[call:add]] capped").len() == 1,
        "one model call"
    );
    // redriven, the timed-out task waits for its calls again without calling the model
    let _w2 = s.start_worker(&[]).await?;
    let (status, _) = s.redrive("default", None).await?;
    ensure!(status == 200, "redrive: {status}");
    let t = s
        .wait_for(&slow, Duration::from_secs(15), |t| {
            t["status"] == "requires_action"
        })
        .await?;
    ensure!(t["steps"] == 1, "{t}");
    ensure!(
        s.request_bodies("[[call:add]] slow client").len() == 1,
        "no second call for the same step"
    );
    let (status, _) = outputs(
        &s,
        &slow,
        &json!({"tool_outputs": [{"tool_call_id": "call_1_0", "output": "late"}]}),
    )
    .await?;
    ensure!(status == 202);
    let t = &s
        .wait_final(std::slice::from_ref(&slow), Duration::from_secs(15))
        .await?[0];
    ensure!(
        t["status"] == "succeeded" && t["result"]["content"] == "tool results: late",
        "{t}"
    );
    let (status, reply) = s.post(&json!({"prompt": "x", "max_steps": 33})).await?;
    ensure!(
        status == 422 && reply["error"]["field"] == "max_steps",
        "over the cap: {reply}"
    );
    assert_no_panic(&s);
    Ok(())
}

/// A worker killed during the second step's model call: the next run resumes from the recorded
/// step, so the first call is made once and the second twice (the killed one was never
/// recorded), and the result is the second step's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_from_its_last_step() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let mut w1 = s.start_worker(&[]).await?;
    let prompt = r#"[[sleep:1500]] [[call:add:{"a":1}]]"#;
    let id = s
        .submit_json(&json!({"prompt": prompt, "tools": add_tool()}))
        .await?;
    s.wait_for(&id, Duration::from_secs(15), |t| {
        t["status"] == "requires_action"
    })
    .await?;
    let (status, _) = outputs(
        &s,
        &id,
        &json!({"tool_outputs": [{"tool_call_id": "call_1_0", "output": "1"}]}),
    )
    .await?;
    ensure!(status == 202);
    // the second call has started (it sleeps in the mock): kill its worker
    s.wait_calls(prompt, 2, Duration::from_secs(20)).await?;
    w1.proc.sigkill();
    let _w2 = s.start_worker(&[]).await?;
    let t = &s
        .wait_final(std::slice::from_ref(&id), Duration::from_secs(30))
        .await?[0];
    ensure!(t["status"] == "succeeded", "{t}");
    ensure!(t["result"]["content"] == "tool results: 1", "{t}");
    ensure!(t["steps"] == 2, "{t}");
    let calls: Vec<u64> = s
        .mock
        .request_records()
        .into_iter()
        .filter(|r| r.prompt == prompt)
        .map(|r| r.call)
        .collect();
    ensure!(
        calls.len() == 3,
        "step 1 once, step 2 twice (killed, then resumed): calls {calls:?}"
    );
    // every call after the first carried the recorded step
    for b in s.request_bodies(prompt).iter().skip(1) {
        ensure!(b["messages"].as_array().map(Vec::len) == Some(3), "{b}");
    }
    assert_no_panic(&s);
    Ok(())
}

/// A time field of a task's record, in ms.
fn at_ms(s: &Stack, id: &str, field: &str) -> Result<i64> {
    let mut c = s.redis.conn()?;
    let v: i64 = redis::cmd("HGET")
        .arg(agentq_tests::task_key(id))
        .arg(field)
        .query(&mut c)?;
    Ok(v)
}

/// Six tasks of one agent enqueued at once on two workers run one after another in enqueue
/// order, each call carrying the exchanges before it, while another agent's task finishes at
/// once; the waiting ones are not in `pending` (no slot, no KEDA load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_tasks_run_one_at_a_time_in_order() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w1 = s.start_worker(&[]).await?;
    let _w2 = s.start_worker(&[]).await?;
    let prompts: Vec<String> = (0..6).map(|i| format!("turn {i} [[sleep:400]]")).collect();
    let mut ids = Vec::new();
    for p in &prompts {
        ids.push(
            s.submit_json(&json!({"prompt": p, "agent_id": "ada"}))
                .await?,
        );
    }
    let q = s.queue("default").await?;
    ensure!(
        q["pending"].as_u64().unwrap_or(99) <= 1,
        "only the lane's head is runnable: {q}"
    );
    let other = s
        .submit_json(&json!({"prompt": "someone else", "agent_id": "bob"}))
        .await?;
    let done = s.wait_final(&ids, Duration::from_secs(30)).await?;
    ensure!(done.iter().all(|t| t["status"] == "succeeded"), "{done:?}");
    for i in 1..ids.len() {
        let (prev_end, start) = (
            at_ms(&s, &ids[i - 1], "finished_at")?,
            at_ms(&s, &ids[i], "started_at")?,
        );
        ensure!(
            start >= prev_end,
            "turn {i} started {start} before turn {} finished {prev_end}",
            i - 1
        );
        // each call carries the earlier exchanges: min(2i, AGENTQ_MEMORY_MESSAGES = 10) + 1
        let sent = &s.request_bodies(&prompts[i])[0]["messages"];
        let n = sent.as_array().map_or(0, Vec::len);
        ensure!(
            n == (2 * i).min(10) + 1,
            "turn {i} sent {n} messages: {sent}"
        );
        let before_last = &sent[n - 3];
        ensure!(
            before_last["content"] == prompts[i - 1].as_str(),
            "turn {i} follows turn {}: {sent}",
            i - 1
        );
    }
    s.wait_final(std::slice::from_ref(&other), Duration::from_secs(5))
        .await?;
    ensure!(
        at_ms(&s, &other, "finished_at")? < at_ms(&s, &ids[1], "finished_at")?,
        "another agent's task is not held back by the lane"
    );
    assert_no_panic(&s);
    Ok(())
}

/// A lane moves on past a task that failed, one cancelled while it ran, and one whose tool
/// outputs never came (failed by the api's timeout, the lane moved on by its sweep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_moves_on_past_failed_cancelled_and_timed_out_tasks() -> Result<()> {
    let mut s = Stack::new(recording()).await?;
    s.start_api(&[]).await?;
    let _w = s.start_worker(&[]).await?;
    let failed = s
        .submit_json(&json!({"prompt": "[[fail:400]] first", "agent_id": "carol"}))
        .await?;
    let after_failed = s
        .submit_json(&json!({"prompt": "after a failure", "agent_id": "carol"}))
        .await?;
    let slow = s
        .submit_json(&json!({"prompt": "[[sleep:5000]] slow", "agent_id": "dan"}))
        .await?;
    let after_cancel = s
        .submit_json(&json!({"prompt": "after a cancel", "agent_id": "dan"}))
        .await?;
    let waits = s
        .submit_json(&json!({"prompt": "[[call:add]] waits", "agent_id": "eve",
            "tools": add_tool(), "tool_timeout_secs": 1}))
        .await?;
    let after_timeout = s
        .submit_json(&json!({"prompt": "after a timeout", "agent_id": "eve"}))
        .await?;

    let t = &s
        .wait_final(std::slice::from_ref(&after_failed), Duration::from_secs(15))
        .await?[0];
    ensure!(t["status"] == "succeeded", "{t}");
    ensure!(
        s.task(&failed).await?["status"] == "failed",
        "the head failed first"
    );

    s.wait_for(&slow, Duration::from_secs(10), |t| t["status"] == "running")
        .await?;
    let queued = s.task(&after_cancel).await?;
    ensure!(
        queued["status"] == "queued",
        "waits behind the running head: {queued}"
    );
    let r = s
        .http
        .delete(format!("{}/v1/tasks/{slow}", s.api_url))
        .send()
        .await?;
    ensure!(r.status() == 200);
    let t = &s
        .wait_final(std::slice::from_ref(&after_cancel), Duration::from_secs(3))
        .await?[0];
    ensure!(
        t["status"] == "succeeded",
        "ran right after the cancel: {t}"
    );

    let t = &s
        .wait_final(
            std::slice::from_ref(&after_timeout),
            Duration::from_secs(15),
        )
        .await?[0];
    ensure!(t["status"] == "succeeded", "{t}");
    ensure!(
        s.task(&waits).await?["error_code"] == "tool_timeout",
        "the head timed out"
    );
    ensure!(
        at_ms(&s, &after_timeout, "started_at")? >= at_ms(&s, &waits, "finished_at")?,
        "it waited for the head's timeout"
    );
    let q = s.queue("default").await?;
    ensure!(q["pending"] == 0 && q["requires_action"] == 0, "{q}");
    let mut c = s.redis.conn()?;
    let lanes: u64 = redis::cmd("SCARD")
        .arg("agentq:{default}:lanes")
        .query(&mut c)?;
    ensure!(lanes == 0, "every lane drained: {lanes} left");
    assert_no_panic(&s);
    Ok(())
}
