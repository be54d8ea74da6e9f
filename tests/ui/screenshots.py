"""Screenshots of every console page for docs/ui/ (scripts/ui-screenshots.sh): starts a private
stack (stack.py), fills it with demo data through the public API, and saves PNGs at a laptop
width (1280 px) and a phone width (390 px)."""

import os
import sys
import time

from playwright.sync_api import expect, sync_playwright

import stack as st
from console_test import ARGS, CHROMIUM

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(st.ROOT, "docs", "ui")


def demo(s):
    ids = {}
    for i, (agent, model, prompt) in enumerate([
        ("support-bot", "mock-gpt", "Summarise ticket 4211 for the on-call engineer"),
        ("support-bot", "mock-gpt", "Draft a reply about the refund policy"),
        ("researcher", "mock-gpt", "List three sources on queue fairness"),
        ("researcher", "mock-mini", "Compare weighted round robin with deficit round robin"),
        ("summarizer", "mock-mini", "Summarise the release notes of 0.6.0"),
        ("summarizer", "mock-mini", "Summarise the incident review"),
        ("triage", "mock-mini", "Classify: 'the export button does nothing'"),
    ]):
        ids[f"t{i}"] = s.submit({"prompt": prompt, "agent_id": agent, "model": model,
                                 "metadata": {"ticket": 4200 + i}})
    for prompt in ["Translate the contract [[fail:400]]", "Fetch the weather [[fail:400]]",
                   "Call the billing API [[fail:422]]"]:
        s.submit({"prompt": prompt, "agent_id": "triage", "max_attempts": 1})
    for i in range(3):
        s.submit({"prompt": f"Long analysis {i} [[sleep:120000]]", "agent_id": f"analyst-{i}"})
    st_, wf = s.call("POST", "/v1/workflows", {"nodes": [
        {"id": "collect", "prompt": "collect the week's tickets", "agent_id": "researcher"},
        {"id": "cluster", "prompt": "cluster {{nodes.collect.output}}", "depends_on": ["collect"]},
        {"id": "billing", "prompt": "billing issues [[fail:400]]", "depends_on": ["collect"],
         "on_failure": "continue", "max_attempts": 1},
        {"id": "ux", "prompt": "ux issues", "depends_on": ["collect"]},
        {"id": "report", "prompt": "write the weekly report", "depends_on": ["cluster", "billing", "ux"]},
        {"id": "publish", "prompt": "publish [[sleep:120000]]", "depends_on": ["report"]},
    ]})
    assert st_ == 202, wf
    words = " ".join(["the", "queue", "hands", "each", "tenant", "its", "turn,", "and", "the", "worker",
                      "streams", "every", "token", "to", "the", "console", "as", "it", "arrives."] * 6)
    live = s.submit({"prompt": f"[[stream_rate:6]] {words}", "agent_id": "writer"})
    for tid in ids.values():
        s.wait_status(tid, {"succeeded"})
    # budgets once the demo's calls are paid (a reservation is the call's worst case)
    for scope, body in [("global", {"limit_usd": 5, "window": "1h"}),
                        ("agent:support-bot", {"limit_usd": 0.01, "window": "1d"}),
                        ("model:mock-mini", {"limit_usd": 0.002, "window": "1h"})]:
        st_, v = s.call("PUT", f"/v1/budgets/{scope}", body)
        assert st_ in (200, 201), v
    return ids, wf["id"], live


def shot(page, name):
    page.wait_for_timeout(400)
    page.screenshot(path=os.path.join(OUT, name), full_page=True)
    print("saved", os.path.join(OUT, name))


def main():
    os.makedirs(OUT, exist_ok=True)
    with st.Stack() as s, sync_playwright() as pw:
        ids, wf, live = demo(s)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for width, height, prefix in [(1280, 800, ""), (390, 844, "phone-")]:
            page = browser.new_context(viewport={"width": width, "height": height},
                                       device_scale_factor=1).new_page()
            page.goto(s.url + "/ui")
            expect(page.locator("#login")).to_be_visible()
            if not prefix:
                shot(page, "login.png")
            page.fill("#token", st.ADMIN_TOKEN)
            page.click("#login-form button[type=submit]")
            expect(page.locator("#queues [data-queue=default]")).to_be_visible()
            expect(page.locator("[data-stat='in flight'] .n")).not_to_have_text("0")
            shot(page, prefix + "queues.png")
            page.goto(s.url + "/ui#/tasks")
            expect(page.locator("#task-rows tr").first).to_be_visible()
            shot(page, prefix + "tasks.png")
            page.goto(s.url + f"/ui#/task/{ids['t0']}")
            expect(page.locator("#task-result")).to_be_visible()
            shot(page, prefix + "task.png")
            if not prefix:
                page.goto(s.url + f"/ui#/task/{live}")
                expect(page.locator("#live-text")).to_contain_text("console")
                time.sleep(1.5)
                page.screenshot(path=os.path.join(OUT, "live.png"), full_page=False)
                print("saved live.png")
            page.goto(s.url + "/ui#/dead")
            expect(page.locator("#dead-rows tr").first).to_be_visible()
            shot(page, prefix + "dead.png")
            page.goto(s.url + f"/ui#/workflow/{wf}")
            expect(page.locator("#wf-graph [data-node=report]")).to_contain_text("succeeded")
            shot(page, prefix + "workflow.png")
            page.goto(s.url + "/ui#/usage")
            expect(page.locator("#usage-chart")).to_be_visible()
            shot(page, prefix + "usage.png")
        browser.close()


if __name__ == "__main__":
    main()
