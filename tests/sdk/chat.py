"""The official `openai` Python SDK against agentq's /v1/chat/completions and /v1/models.

Run by tests/tests/openai_chat.rs with the venv of tests/peers/litellm (which pins `openai`):
    python tests/sdk/chat.py SCENARIO
with AGENTQ_BASE_URL (the api's http://host:port/v1). Each scenario asserts what the SDK gives
back and prints one JSON line for the Rust side, which checks the task records and the mock
LLM's exact call counts.
"""

import json
import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["AGENTQ_BASE_URL"]


def client(**kw):
    # the api has no auth yet: any key; the SDK insists on one
    return OpenAI(base_url=BASE, api_key="sk-anything", **kw)


def out(**kw):
    print(json.dumps(kw), flush=True)


def plain():
    c = client()
    raw = c.chat.completions.with_raw_response.create(
        model="mock-gpt",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "sdk plain hello"},
        ],
        temperature=0,
        max_tokens=50,
        metadata={"origin": "sdk-test"},
    )
    task_id = raw.headers["x-agentq-task-id"]
    r = raw.parse()
    assert isinstance(r, openai.types.chat.ChatCompletion), type(r)
    assert r.object == "chat.completion"
    assert r.id == "chatcmpl-" + task_id, (r.id, task_id)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "echo: sdk plain hello", r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r._request_id == task_id, r._request_id
    out(task_id=task_id, content=r.choices[0].message.content)


def tools():
    c = client()
    raw = c.chat.completions.with_raw_response.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "weather please [[reply:tool_calls]]"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    )
    r = raw.parse()
    m = r.choices[0].message
    # the model's tool calls are the answer, as OpenAI returns them (no suspended task)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].finish_reason
    assert m.content is None, m.content
    assert m.tool_calls[0].function.name == "get_weather"
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    out(task_id=raw.headers["x-agentq-task-id"], call_id=m.tool_calls[0].id)


def stream(prompt):
    c = client()
    fallback = os.environ.get("FALLBACK")
    s = c.chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"fallback_models": [fallback]} if fallback else None,
    )
    text, chunks, finish, usage, ids, roles = "", 0, None, None, set(), 0
    task_id = s.response.headers["x-agentq-task-id"]
    for chunk in s:
        assert chunk.object == "chat.completion.chunk"
        ids.add(chunk.id)
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        d = chunk.choices[0].delta
        if d.role:
            roles += 1
        if d.content:
            text += d.content
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert ids == {"chatcmpl-" + task_id}, ids
    assert roles == 1, roles
    assert finish == "stop", finish
    assert usage is not None and usage.completion_tokens > 0, usage
    out(task_id=task_id, text=text, chunks=chunks)


def errors():
    c = client(max_retries=2)
    seen = {}

    def expect(name, cls, fn):
        try:
            fn()
        except cls as e:
            body = e.body if isinstance(e.body, dict) else {}
            seen[name] = {
                "class": type(e).__name__,
                "status": e.status_code,
                "param": body.get("param"),
                "code": body.get("code"),
                "message": body.get("message"),
                "should_retry": e.response.headers.get("x-should-retry"),
            }
            return
        raise AssertionError(f"{name}: no {cls.__name__} raised")

    msgs = [{"role": "user", "content": "hi"}]
    expect(
        "unsupported",
        openai.BadRequestError,
        lambda: c.chat.completions.create(model="mock-gpt", messages=msgs, frequency_penalty=1),
    )
    expect(
        "bad_role",
        openai.BadRequestError,
        lambda: c.chat.completions.create(model="mock-gpt", messages=[{"role": "robot", "content": "x"}]),
    )
    expect(
        "n",
        openai.BadRequestError,
        lambda: c.chat.completions.create(model="mock-gpt", messages=msgs, n=2),
    )
    expect(
        "unknown_model",
        openai.NotFoundError,
        lambda: c.chat.completions.create(model="no-such-model", messages=msgs),
    )
    expect(
        "unknown_queue",
        openai.UnprocessableEntityError,
        lambda: c.chat.completions.create(
            model="mock-gpt", messages=msgs, extra_headers={"X-Agentq-Queue": "nobody-serves-this"}
        ),
    )
    expect(
        "too_large",
        openai.APIStatusError,
        lambda: c.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "x" * 300_000}]
        ),
    )
    # the upstream refuses the request: its 400, once (the fleet does not retry a 400, and
    # x-should-retry: false keeps the SDK from resending it)
    expect(
        "upstream_400",
        openai.BadRequestError,
        lambda: c.chat.completions.create(
            model="mock-gpt", messages=[{"role": "user", "content": "sdk refused [[fail:400]]"}]
        ),
    )
    # the upstream keeps failing: the fleet retried max_attempts times; the SDK must not add its
    # own retries on top (each would be a new task)
    expect(
        "upstream_500",
        openai.InternalServerError,
        lambda: c.chat.completions.create(
            model="mock-gpt",
            messages=[{"role": "user", "content": "sdk broken [[fail:500]]"}],
            extra_body={"max_attempts": 2},
        ),
    )
    # a budget stops the call before it is made: 429, and the SDK does not retry it
    expect(
        "budget",
        openai.RateLimitError,
        lambda: c.chat.completions.create(
            model="mock-gpt",
            messages=[{"role": "user", "content": "sdk over budget"}],
            extra_body={"max_total_tokens": 1},
        ),
    )
    assert c.models.list().data[0].id == "mock-gpt"
    expect("model_404", openai.NotFoundError, lambda: c.models.retrieve("no-such-model"))
    out(**seen)


def models():
    c = client()
    ids = [m.id for m in c.models.list()]
    m = c.models.retrieve(ids[0])
    assert m.object == "model"
    out(ids=ids)


def hangup():
    # the client gives up after 0.5 s; the task runs on (or is cancelled when asked)
    cancel = os.environ.get("CANCEL", "")
    headers = {"X-Agentq-Cancel-On-Disconnect": cancel} if cancel else {}
    c = client(timeout=0.5, max_retries=0)
    try:
        c.chat.completions.create(
            model="mock-gpt",
            messages=[{"role": "user", "content": os.environ["PROMPT"]}],
            extra_headers=headers,
        )
    except openai.APITimeoutError:
        out(timed_out=True)
        return
    raise AssertionError("the call did not time out")


SCENARIOS = {
    "plain": plain,
    "tools": tools,
    "stream": lambda: stream(os.environ["PROMPT"]),
    "errors": errors,
    "models": models,
    "hangup": hangup,
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
