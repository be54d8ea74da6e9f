"""The Batch API driven by the official `openai` Python SDK (run by tests/tests/openai_batch.rs
with a real agentq-api, agentq-worker and mock LLM; usage: batch.py BASE_URL).

Uploads a 1,000-line JSONL (a few lines carry the mock's `[[fail:400]]` marker) with
client.files.create, starts it with client.batches.create, polls client.batches.retrieve until
it ends, reads the output and error files with client.files.content, and checks the counts and
custom_ids line by line in input order. Then the SDK's error classes: an unknown batch raises
NotFoundError, a bad upload BadRequestError. Prints one JSON summary line; exits non-zero on any
failed check.

`batch.py --tenants BASE_URL TOKEN_A TOKEN_B ADMIN_TOKEN` (an api with auth on): two tenants, each
a client with its own token as api_key, and the admin. A runs a batch to completion; B cannot
list, retrieve, download or delete A's files (input and output), retrieve or cancel A's batch,
nor start a batch from A's file (NotFoundError, as for ids that do not exist); each tenant's
lists hold only its own, paged full (the SDK's auto-paging over files interleaved with the other
tenant's); the admin sees both. Prints a JSON summary with A's batch and its task ids."""

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


def not_found(what, call):
    try:
        call()
    except openai.NotFoundError:
        return
    raise AssertionError(f"{what} did not raise NotFoundError")


def tenant_line(tenant, i, fail=False, sleep=False):
    prompt = f"tenant {tenant} line {i}"
    if fail:
        prompt += " [[fail:400]]"
    if sleep:
        prompt += " [[sleep:300]]"
    return {
        "custom_id": f"{tenant}-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "mock-gpt", "messages": [{"role": "user", "content": prompt}]},
    }


def upload(client, name, lines):
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def run_batch(client, file_id):
    b = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    return b


def wait_done(client, b):
    deadline = time.time() + 60
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, f"batch not done in 60 s: {b}"
        time.sleep(0.1)
        b = client.batches.retrieve(b.id)
    return b


def pages(first):
    """Every page of a list, following the SDK's own cursor (has_more, after = last id)."""
    out = [first]
    while out[-1].has_next_page():
        out.append(out[-1].get_next_page())
    return out


def tenants(base_url, token_a, token_b, admin_token):
    a = openai.OpenAI(base_url=base_url, api_key=token_a, max_retries=0)
    b = openai.OpenAI(base_url=base_url, api_key=token_b, max_retries=0)
    admin = openai.OpenAI(base_url=base_url, api_key=admin_token, max_retries=0)

    # A's batch: 6 lines, one failing, slow enough to be running while B tries it
    fa = upload(a, "a.jsonl", [tenant_line("a", i, fail=i == 4, sleep=True) for i in range(6)])
    ba = run_batch(a, fa.id)
    not_found("B retrieving A's batch", lambda: b.batches.retrieve(ba.id))
    not_found("B cancelling A's batch", lambda: b.batches.cancel(ba.id))
    not_found("B retrieving A's file", lambda: b.files.retrieve(fa.id))
    not_found("B downloading A's file", lambda: b.files.content(fa.id))
    not_found("B deleting A's file", lambda: b.files.delete(fa.id))
    not_found("B batching A's file", lambda: run_batch(b, fa.id))
    # exactly what an id that does not exist gets
    not_found("B retrieving a missing file", lambda: b.files.retrieve("file-" + "0" * 32))
    assert all(x.id != fa.id for x in b.files.list()), "B lists A's file"
    assert all(x.id != ba.id for x in b.batches.list()), "B lists A's batch"

    ba = wait_done(a, ba)
    assert ba.status == "completed", ba
    assert ba.request_counts.completed == 5 and ba.request_counts.failed == 1, ba.request_counts
    assert ba.output_file_id and ba.error_file_id, ba
    out = [json.loads(x) for x in a.files.content(ba.output_file_id).text.splitlines()]
    err = [json.loads(x) for x in a.files.content(ba.error_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"a-{i}" for i in (0, 1, 2, 3, 5)], out
    assert [e["custom_id"] for e in err] == ["a-4"], err
    # the batch's files are A's: B gets nothing of them
    for f in (ba.output_file_id, ba.error_file_id):
        not_found("B retrieving A's output", lambda f=f: b.files.retrieve(f))
        not_found("B downloading A's output", lambda f=f: b.files.content(f))
        not_found("B deleting A's output", lambda f=f: b.files.delete(f))
    assert a.files.retrieve(ba.output_file_id).purpose == "batch_output"

    # B's own batch works as usual, and is B's alone
    fb = upload(b, "b.jsonl", [tenant_line("b", i) for i in range(3)])
    bb = wait_done(b, run_batch(b, fb.id))
    assert bb.status == "completed" and bb.request_counts.completed == 3, bb
    not_found("A retrieving B's batch", lambda: a.batches.retrieve(bb.id))
    not_found("A downloading B's output", lambda: a.files.content(bb.output_file_id))

    # lists: each tenant its own, the admin both
    a_files = {fa.id, ba.output_file_id, ba.error_file_id}
    b_files = {fb.id, bb.output_file_id}
    assert {x.id for x in a.files.list()} == a_files, list(a.files.list())
    assert {x.id for x in b.files.list()} == b_files, list(b.files.list())
    assert {x.id for x in a.files.list(purpose="batch_output")} == a_files - {fa.id}
    admin_files = {x.id for x in admin.files.list()}
    assert a_files | b_files <= admin_files, admin_files
    assert [x.id for x in a.batches.list()] == [ba.id], list(a.batches.list())
    assert [x.id for x in b.batches.list()] == [bb.id], list(b.batches.list())
    admin_batches = {x.id for x in admin.batches.list()}
    assert {ba.id, bb.id} <= admin_batches, admin_batches
    assert admin.batches.retrieve(ba.id).id == ba.id
    assert admin.files.content(fa.id).text.count("\n") == 6

    # paging over files interleaved with the other tenant's: full pages while more follow,
    # and the SDK's auto-paging yields exactly the tenant's own, newest first
    extra_a = []
    for i in range(5):
        extra_a.append(upload(a, f"a{i}.jsonl", [tenant_line("a", 100 + i)]).id)
        upload(b, f"b{i}.jsonl", [tenant_line("b", 100 + i)])
    want = list(reversed(extra_a)) + [fa.id]
    got = [x.id for x in a.files.list(purpose="batch", limit=2)]
    assert got == want, (got, want)
    ps = pages(a.files.list(purpose="batch", limit=2))
    assert [len(p.data) for p in ps] == [2, 2, 2], [len(p.data) for p in ps]
    assert [p.has_more for p in ps] == [True, True, False], [p.has_more for p in ps]
    ps = pages(a.files.list(limit=4, order="asc"))
    assert [len(p.data) for p in ps] == [4, 4], [len(p.data) for p in ps]
    assert {x.id for p in ps for x in p.data} == a_files | set(extra_a)
    # another tenant's id as the cursor places nothing
    assert b.files.list(after=fa.id).data == []

    # deleting: B's own works; A's file survives B's try
    assert b.files.delete(fb.id).deleted
    assert a.files.retrieve(fa.id).id == fa.id
    for f in extra_a:
        assert a.files.delete(f).deleted
    assert {x.id for x in a.files.list()} == a_files

    print(json.dumps({
        "ok": True,
        "batch_a": ba.id,
        "file_a": fa.id,
        "output_a": ba.output_file_id,
        "batch_b": bb.id,
        "tasks_a": [o["response"]["request_id"] for o in out],
    }))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--tenants":
        tenants(*sys.argv[2:6])
    else:
        main()
