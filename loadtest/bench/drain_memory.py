"""Redis memory and CPU per drained task for one build's binaries (loadtest/bench/README.md, "Streams on
demand"): a private redis-server (stream-node-max-bytes 512, as the chart runs it), the mock LLM at
0 ms, the api and one worker (concurrency 64); N tasks queued by POST /v1/tasks/batch, then drained;
prints one JSON line: Redis CPU per task, used_memory per queued and per finished task, task streams
left and XADDs. Usage: .venv/bin/python loadtest/bench/drain_memory.py <bin dir> <n, a multiple of 1000>"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import redis


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def main(bindir, n):
    rp, mp, ap, wp = free_port(), free_port(), free_port(), free_port()
    procs = []

    def spawn(args, env=None):
        e = dict(os.environ)
        e.update(env or {})
        procs.append(subprocess.Popen(args, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    try:
        spawn(["redis-server", "--port", str(rp), "--save", "", "--appendonly", "no",
               "--stream-node-max-bytes", "512"])
        r = redis.Redis(port=rp)
        for _ in range(200):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        url = f"redis://127.0.0.1:{rp}"
        spawn([f"{bindir}/agentq-mock-llm"], {"MOCK_LLM_LISTEN": f"127.0.0.1:{mp}", "MOCK_LLM_LATENCY_MS": "0"})
        spawn([f"{bindir}/agentq-api"], {"AGENTQ_LISTEN": f"127.0.0.1:{ap}", "REDIS_URL": url, "AGENTQ_AUTH": "off"})
        api = f"http://127.0.0.1:{ap}"
        for _ in range(200):
            try:
                urllib.request.urlopen(api + "/readyz")
                break
            except OSError:
                time.sleep(0.05)
        base_mem = r.info("memory")["used_memory"]
        body = json.dumps({"tasks": [{"prompt": f"hello {i}"} for i in range(1000)]}).encode()
        for _ in range(n // 1000):
            req = urllib.request.Request(api + "/v1/tasks/batch", data=body,
                                         headers={"content-type": "application/json"})
            urllib.request.urlopen(req).read()
        queued_mem = r.info("memory")["used_memory"]
        r.config_resetstat()
        cpu0 = r.info("cpu")
        spawn([f"{bindir}/agentq-worker"], {
            "AGENTQ_LISTEN": f"127.0.0.1:{wp}", "REDIS_URL": url, "OPENAI_BASE_URL": f"http://127.0.0.1:{mp}/v1",
            "OPENAI_API_KEY": "bench", "AGENTQ_MODEL": "mock-gpt", "WORKER_CONCURRENCY": "64"})
        t0 = time.time()
        while True:
            q = json.load(urllib.request.urlopen(api + "/v1/queues/default"))
            if q["pending"] == 0 and q["inflight"] == 0 and q["retrying"] == 0:
                break
            time.sleep(0.2)
        took = time.time() - t0
        cpu1 = r.info("cpu")
        cpu = (cpu1["used_cpu_sys"] + cpu1["used_cpu_user"] - cpu0["used_cpu_sys"] - cpu0["used_cpu_user"])
        done_mem = r.info("memory")["used_memory"]
        streams = sum(1 for _ in r.scan_iter(match="*:events", count=1000))
        xadd = r.info("commandstats").get("cmdstat_xadd", {}).get("calls", 0)
        print(json.dumps({"bin": bindir, "tasks": n, "drain_s": round(took, 2), "tasks_per_s": round(n / took),
                          "redis_cpu_us_per_task": round(cpu * 1e6 / n, 2),
                          "mem_per_queued_task_B": round((queued_mem - base_mem) / n),
                          "mem_per_finished_task_B": round((done_mem - base_mem) / n),
                          "streams": streams, "xadd_calls": xadd}))
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
