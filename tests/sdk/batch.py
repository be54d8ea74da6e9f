"""The Batch API driven by the official `openai` Python SDK (run by tests/tests/openai_batch.rs
with a real agentq-api, agentq-worker and mock LLM; usage: batch.py BASE_URL).

Uploads a 1,000-line JSONL (a few lines carry the mock's `[[fail:400]]` marker) with
client.files.create, starts it with client.batches.create, polls client.batches.retrieve until
it ends, reads the output and error files with client.files.content, and checks the counts and
custom_ids line by line in input order. Then the SDK's error classes: an unknown batch raises
NotFoundError, a bad upload BadRequestError. Prints one JSON summary line; exits non-zero on any
failed check."""

import io
import json
import sys
import time

import openai

N = 1000
FAILING = {7, 123, 500, 999}


def line(i):
    prompt = f"sdk batch line {i}" + (" [[fail:400]]" if i in FAILING else "")
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "mock-gpt", "messages": [{"role": "user", "content": prompt}]},
    }


def main():
    base_url = sys.argv[1]
    client = openai.OpenAI(base_url=base_url, api_key="sk-anything", max_retries=0)
    jsonl = "".join(json.dumps(line(i)) + "\n" for i in range(N)).encode()

    f = client.files.create(file=("requests.jsonl", io.BytesIO(jsonl)), purpose="batch")
    assert f.id.startswith("file-"), f
    assert f.purpose == "batch" and f.bytes == len(jsonl), f
    assert client.files.retrieve(f.id).id == f.id

    b = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "sdk"},
    )
    assert b.status in ("validating", "in_progress"), b
    assert b.request_counts.total == N, b

    deadline = time.time() + 60
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, f"batch not done in 60 s: {b}"
        time.sleep(0.2)
        b = client.batches.retrieve(b.id)
    assert b.status == "completed", b
    assert b.request_counts.completed == N - len(FAILING), b.request_counts
    assert b.request_counts.failed == len(FAILING), b.request_counts
    assert b.metadata == {"suite": "sdk"}, b.metadata
    assert b.output_file_id and b.error_file_id, b

    out = [json.loads(x) for x in client.files.content(b.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in client.files.content(b.error_file_id).text.splitlines()]
    want_ok = [f"req-{i}" for i in range(N) if i not in FAILING]
    want_err = [f"req-{i}" for i in sorted(FAILING)]
    assert [o["custom_id"] for o in out] == want_ok, "output file not in input order"
    assert [e["custom_id"] for e in err] == want_err, [e["custom_id"] for e in err]
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None, o
        assert o["response"]["status_code"] == 200, o
        body = o["response"]["body"]
        assert body["object"] == "chat.completion", body
        assert body["choices"][0]["message"]["role"] == "assistant", body
    for e in err:
        assert e["response"]["status_code"] == 400, e
        assert e["response"]["body"]["error"]["message"], e

    listed = client.batches.list(limit=10)
    assert any(x.id == b.id for x in listed.data), listed

    # the SDK maps the statuses to its exception classes
    try:
        client.batches.retrieve("batch_nope")
        raise AssertionError("retrieving an unknown batch did not raise")
    except openai.NotFoundError:
        pass
    try:
        bad = b'{"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {}}\n'
        client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="batch")
        raise AssertionError("a bad upload did not raise")
    except openai.BadRequestError as e:
        assert "line 1" in str(e), e
    try:
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        raise AssertionError("an unsupported endpoint did not raise")
    except openai.BadRequestError:
        pass

    print(json.dumps({"ok": True, "batch": b.id, "completed": len(out), "failed": len(err)}))


if __name__ == "__main__":
    main()
