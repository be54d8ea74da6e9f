"""Browser tests of the web console (issue 21) in Debian's headless Chromium, driven by Playwright
for Python, against a private stack (stack.py: redis-server, the mock LLM, agentq-api with auth on,
one agentq-worker). Run by scripts/ui-test.sh; `python tests/ui/console_test.py [name...]` runs
some of them.

Each test drives the page only through what a user does (click, type) and checks what the page
shows against what the API says."""

import re
import sys
import time
import traceback

from playwright.sync_api import expect, sync_playwright

import stack as st

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS = '<script>window.__xss=1</script>"><img src=x onerror="window.__xss=2">'
expect.set_options(timeout=15_000)


class Browser:
    def __init__(self, pw, s):
        self.s = s
        self.browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        self.problems = []

    def page(self, width=1280, height=860):
        ctx = self.browser.new_context(viewport={"width": width, "height": height})
        page = ctx.new_page()
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))

        def console(msg):
            text = msg.text
            # a 401 the login probe expects is logged by Chromium as a failed load; anything else
            # (a CSP violation above all) is a defect
            if msg.type == "error" and "Failed to load resource" not in text:
                self.problems.append(f"console: {text}")
        page.on("console", console)
        page.on("dialog", lambda d: self.problems.append(f"unexpected native dialog: {d.message}"))
        return page

    def signed_in(self, token=None, **kw):
        page = self.page(**kw)
        page.goto(self.s.url + "/ui")
        page.fill("#token", token or st.ADMIN_TOKEN)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#nav")).to_be_visible()
        return page


def confirm(page):
    dlg = page.locator("dialog#confirm")
    expect(dlg).to_be_visible()
    page.click("#confirm-yes")
    expect(dlg).to_be_hidden()


# ---- the tests ----

def test_without_a_token_only_the_login_shows(b):
    page = b.page()
    for frag in ["", "#/tasks", "#/dead", "#/usage"]:
        page.goto(b.s.url + "/ui" + frag)
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#nav")).to_be_hidden()
        expect(page.locator("#view")).to_be_hidden()
        assert page.locator("#view *").count() == 0, "no page content without a token"
    # a wrong token is refused and nothing else shows
    page.fill("#token", "agentq_0123456789abcdef_wrong")
    page.click("#login-form button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("refused")
    expect(page.locator("#view")).to_be_hidden()
    # the right one: the page asked for (the last, #/usage), the token in this tab's
    # sessionStorage only, no cookie
    page.fill("#token", st.ADMIN_TOKEN)
    page.click("#login-form button[type=submit]")
    expect(page.locator("#view h1")).to_have_text("Budgets and usage")
    page.click("#nav a[data-page=queues]")
    expect(page.locator("#queues [data-queue=default]")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('agentq.token')") == st.ADMIN_TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("document.cookie") == ""
    assert page.context.cookies() == []
    # a reload in the same tab stays signed in; a new browser session does not
    page.reload()
    expect(page.locator("#queues [data-queue=default]")).to_be_visible()
    other = b.page()
    other.goto(b.s.url + "/ui#/tasks")
    expect(other.locator("#login")).to_be_visible()
    expect(other.locator("#view")).to_be_hidden()
    # sign out forgets it
    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('agentq.token')") is None


def test_every_page_opens(b):
    s = b.s
    tid = s.submit({"prompt": "a page tour", "agent_id": "tour"})
    s.wait_status(tid, {"succeeded"})
    st_, wf = s.call("POST", "/v1/workflows", {"nodes": [{"id": "only", "prompt": "one node"}]})
    assert st_ == 202, wf
    page = b.signed_in()
    # queues: counts and the limiter's upstream
    expect(page.locator("#queues [data-queue=default] [data-stat=workers] .n")).to_have_text("1")
    # rates: the last minute's LLM calls and spend (the worker writes its usage report each second)
    calls = page.locator("#queues [data-queue=default] [data-stat='LLM calls / min'] .n")
    expect(calls).not_to_have_text("0", timeout=10_000)
    expect(page.locator("#queues [data-queue=default] [data-stat='spend / min'] .n")).to_contain_text("$")
    expect(page.locator("#upstreams")).to_contain_text("mock")
    expect(page.locator("#upstreams")).to_contain_text("6000 rpm")
    # tasks: the task is listed and the filters narrow the list
    page.click("#nav a[data-page=tasks]")
    expect(page.locator(f"#task-rows tr[data-id='{tid}']")).to_be_visible()
    page.fill("#f-agent", "tour")
    page.select_option("#f-status", "succeeded")
    page.click("#task-search button[type=submit]")
    expect(page.locator("#task-rows tr")).to_have_count(1)
    expect(page.locator(f"#task-rows tr[data-id='{tid}']")).to_contain_text("succeeded")
    page.select_option("#f-status", "failed")
    page.click("#task-search button[type=submit]")
    expect(page.locator("#task-rows")).to_contain_text("No tasks match")
    # search by id opens the task: record, usage and cost, transcript
    page.fill("#f-id", tid)
    page.click("#task-search button[type=submit]")
    expect(page.locator("#task-id")).to_have_text(tid)
    expect(page.locator("#task-status")).to_contain_text("succeeded")
    expect(page.locator("#task-usage")).to_contain_text("completion tokens")
    expect(page.locator("#task-result")).to_have_text("echo: a page tour")
    expect(page.locator("#transcript")).to_contain_text("echo: a page tour")
    # dead letters, workflows, usage
    page.click("#nav a[data-page=dead]")
    expect(page.locator("#dead-rows")).to_be_visible()
    page.click("#nav a[data-page=workflows]")
    page.fill("#wf-id", wf["id"])
    page.click("#wf-open button[type=submit]")
    expect(page.locator("#wf-graph [data-node=only]")).to_be_visible()
    page.click("#nav a[data-page=usage]")
    expect(page.locator("#usage-chart")).to_be_visible()
    expect(page.locator("#usage-chart")).to_contain_text("tour")
    expect(page.locator("#usage-total")).to_contain_text("spent over the last 1h")
    page.select_option("#u-group", "model")
    expect(page.locator("#usage-chart")).to_contain_text(st.MODEL)


def test_redrive_a_dead_letter_from_the_page(b):
    s = b.s
    tid = s.submit({"prompt": "redrive me [[fail:400:1]]", "max_attempts": 1})
    s.wait_status(tid, {"failed"})
    page = b.signed_in()
    page.goto(s.url + "/ui#/dead")
    row = page.locator(f"#dead-rows tr[data-id='{tid}']")
    expect(row).to_be_visible()
    expect(row).to_contain_text("400")
    # cancelling the confirm changes nothing
    row.locator("input[type=checkbox]").check()
    expect(page.locator("#selected-count")).to_have_text("1")
    page.click("#redrive-selected")
    expect(page.locator("#confirm-text")).to_contain_text("Redrive 1 dead task?")
    page.click("#confirm-no")
    assert s.task(tid)["status"] == "failed"
    page.click("#redrive-selected")
    confirm(page)
    expect(page.locator("#dead-msg")).to_contain_text("Redriven: 1")
    done = s.wait_status(tid, {"succeeded"})
    assert done["result"]["content"].startswith("echo: redrive me"), done
    expect(row).to_have_count(0)
    # many at once: select every listed one
    more = [s.submit({"prompt": f"redrive us {i} [[fail:400:1]]", "max_attempts": 1}) for i in range(3)]
    for t in more:
        s.wait_status(t, {"failed"})
    for t in more:
        expect(page.locator(f"#dead-rows tr[data-id='{t}']")).to_be_visible()
    listed = page.locator("#dead-rows tr[data-id]").count()
    page.locator("#select-all").check()
    expect(page.locator("#selected-count")).to_have_text(str(listed))
    page.click("#redrive-selected")
    expect(page.locator("#confirm-text")).to_contain_text(f"Redrive {listed} dead tasks?")
    confirm(page)
    expect(page.locator("#dead-msg")).to_contain_text(f"Redriven: {listed}")
    for t in more:
        s.wait_status(t, {"succeeded"})
    expect(page.locator("#dead-rows tr[data-id]")).to_have_count(0)


def test_a_streaming_task_text_grows(b):
    s = b.s
    words = " ".join(f"w{i}" for i in range(40))
    # 10 words a second: the answer takes ~4 s to stream
    tid = s.submit({"prompt": f"[[stream_rate:10]] {words}"})
    page = b.signed_in()
    page.goto(s.url + f"/ui#/task/{tid}")
    text = page.locator("#live-text")
    seen = []
    deadline = time.time() + 30
    while time.time() < deadline:
        n = len(text.text_content() or "")
        if not seen or n != seen[-1]:
            seen.append(n)
        if "w39" in (text.text_content() or ""):
            break
        time.sleep(0.1)
    partial = [n for n in seen if 0 < n < seen[-1]]
    assert len(partial) >= 5, f"the text should grow in many steps: {seen}"
    assert seen == sorted(seen), f"it only grows: {seen}"
    final = s.wait_status(tid, {"succeeded"})
    expect(text).to_have_text(final["result"]["content"])
    expect(page.locator("#task-status")).to_contain_text("succeeded")
    expect(page.locator("#events")).to_contain_text("delta")


def test_follow_a_workflow_node_to_its_task(b):
    s = b.s
    st_, wf = s.call("POST", "/v1/workflows", {"nodes": [
        {"id": "research", "prompt": "research"},
        {"id": "draft", "prompt": "draft {{nodes.research.output}}", "depends_on": ["research"]},
        {"id": "review", "prompt": "review", "depends_on": ["research"]},
        {"id": "publish", "prompt": "publish", "depends_on": ["draft", "review"]},
    ]})
    assert st_ == 202, wf
    page = b.signed_in()
    page.goto(s.url + f"/ui#/workflow/{wf['id']}")
    expect(page.locator("#wf-status")).to_contain_text("succeeded")
    node = page.locator("#wf-graph [data-node=publish]")
    expect(node).to_contain_text("succeeded")
    expect(node).to_contain_text("$")
    # layered: publish sits below draft, which sits below research
    y = {n: page.locator(f"#wf-graph [data-node={n}] rect").get_attribute("y")
         for n in ["research", "draft", "review", "publish"]}
    assert float(y["research"]) < float(y["draft"]) == float(y["review"]) < float(y["publish"]), y
    _, full = s.call("GET", f"/v1/workflows/{wf['id']}")
    draft_task = next(n["task_id"] for n in full["nodes"] if n["id"] == "draft")
    page.locator("#wf-graph [data-node=draft]").click()
    expect(page.locator("#task-id")).to_have_text(draft_task)
    assert page.evaluate("location.hash") == f"#/task/{draft_task}"
    expect(page.locator("#task-result")).to_contain_text("echo: draft echo: research")
    # and back from the task to its workflow
    page.get_by_role("link", name=re.compile("^Workflow ")).click()
    expect(page.locator("#wf-graph")).to_be_visible()


def test_cancel_a_running_task(b):
    s = b.s
    tid = s.submit({"prompt": "cancel me [[sleep:60000]]"})
    s.wait_status(tid, {"running"})
    page = b.signed_in()
    page.goto(s.url + f"/ui#/task/{tid}")
    expect(page.locator("#task-status")).to_contain_text("running")
    page.click("#cancel")
    confirm(page)
    expect(page.locator("#task-status")).to_contain_text("cancelled")
    assert s.task(tid)["status"] == "cancelled"
    expect(page.locator("#cancel")).to_have_count(0)


def test_user_strings_are_text_and_run_nothing(b):
    s = b.s
    tid = s.submit({"prompt": XSS, "metadata": {"note": XSS}})
    s.wait_status(tid, {"succeeded"})
    dead = s.submit({"prompt": XSS + " [[fail:400]]", "max_attempts": 1})
    s.wait_status(dead, {"failed"})
    page = b.signed_in()
    page.goto(s.url + f"/ui#/task/{tid}")
    expect(page.locator("#task-result")).to_have_text("echo: " + XSS)
    # the prompt itself, as the request's user message
    expect(page.locator("#task-input")).to_contain_text(XSS)
    expect(page.locator("#task-metadata")).to_contain_text('"note": ' + '"<script>')
    expect(page.locator("#live-text")).to_have_text("echo: " + XSS)
    expect(page.locator("#transcript")).to_contain_text(XSS)
    page.goto(s.url + "/ui#/dead")
    expect(page.locator(f"#dead-rows tr[data-id='{dead}']")).to_be_visible()
    page.goto(s.url + "/ui#/tasks")
    expect(page.locator(f"#task-rows tr[data-id='{tid}']")).to_be_visible()
    page.goto(s.url + f"/ui#/task/{dead}")
    expect(page.locator("#task-status")).to_contain_text("failed")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__xss") is None, "a script ran"
    assert page.locator("img").count() == 0, "an element was made from data"
    assert page.locator("#view script").count() == 0


def test_a_tenant_sees_its_own_and_a_revoked_token_signs_out(b):
    s = b.s
    st_, _ = s.call("POST", "/v1/admin/tenants", {"id": "acme"})
    assert st_ == 201
    st_, tok = s.call("POST", "/v1/admin/tenants/acme/tokens", {})
    assert st_ == 201, tok
    mine = s.submit({"prompt": "acme's own"}, token=tok["token"])
    theirs = s.submit({"prompt": "the admin's"})
    s.wait_status(mine, {"succeeded"}, token=tok["token"])
    page = b.signed_in(token=tok["token"])
    page.goto(s.url + "/ui#/tasks")
    expect(page.locator(f"#task-rows tr[data-id='{mine}']")).to_be_visible()
    expect(page.locator(f"#task-rows tr[data-id='{theirs}']")).to_have_count(0)
    page.goto(s.url + f"/ui#/task/{theirs}")
    expect(page.locator("#view")).to_contain_text("404")
    page.goto(s.url + "/ui#/tasks")
    st_, _ = s.call("DELETE", f"/v1/admin/tenants/acme/tokens/{tok['token_id']}")
    assert st_ == 204, st_
    # the next refresh gets a 401: back to the login, the token forgotten
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("401")
    expect(page.locator("#view")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('agentq.token')") is None


def test_phone_width(b):
    s = b.s
    tid = s.submit({"prompt": "small screen " * 30})
    s.wait_status(tid, {"succeeded"})
    page = b.signed_in(width=390, height=844)
    for frag in ["#/queues", "#/tasks", f"#/task/{tid}", "#/dead", "#/usage"]:
        page.goto(s.url + "/ui" + frag)
        expect(page.locator("#view > *").first).to_be_visible()
        page.wait_for_timeout(200)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 392, f"{frag}: the page is {width}px wide at 390"


def auth_off_test_the_console_opens_without_a_login(b):
    """With AGENTQ_AUTH=off (its own stack) there is no token to ask for: the pages show at once,
    and no Sign out is offered."""
    tid = b.s.submit({"prompt": "open api"}, token=None)
    page = b.page()
    page.goto(b.s.url + "/ui#/tasks")
    expect(page.locator(f"#task-rows tr[data-id='{tid}']")).to_be_visible()
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#logout")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0


TESTS = [v for k, v in list(globals().items()) if k.startswith("test_")]
AUTH_OFF_TESTS = [v for k, v in list(globals().items()) if k.startswith("auth_off_test_")]


def run(tests, auth, failed):
    if not tests:
        return
    with st.Stack(auth=auth) as s, sync_playwright() as pw:
        b = Browser(pw, s)
        before = len(failed)
        for t in tests:
            t1 = time.time()
            b.problems = []
            try:
                t(b)
                assert not b.problems, "\n".join(b.problems)
                print(f"ok   {t.__name__} ({time.time() - t1:.1f} s)", flush=True)
            except Exception:
                failed.append(t.__name__)
                print(f"FAIL {t.__name__} ({time.time() - t1:.1f} s)", flush=True)
                traceback.print_exc()
        b.browser.close()
        if len(failed) > before:
            s.dump_logs()
        if "panicked" in s.logs():
            failed.append("a process panicked")


def main(names):
    pick = lambda ts: [t for t in ts if not names or any(n in t.__name__ for n in names)]
    failed = []
    t0 = time.time()
    run(pick(TESTS), True, failed)
    run(pick(AUTH_OFF_TESTS), False, failed)
    n = len(pick(TESTS)) + len(pick(AUTH_OFF_TESTS))
    print(f"{n - len(failed)} passed, {len(failed)} failed in {time.time() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
