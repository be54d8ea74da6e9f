"""A private agentq stack for the browser tests and the screenshots: redis-server, the mock LLM,
agentq-api (auth on, unless `auth=False`) and one agentq-worker, each on a free port, from the debug binaries in
$CARGO_TARGET_DIR (default ./target). Everything is stopped, and its temporary directory removed,
when the `with` block ends; logs are printed when it ends with an exception."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
BIN = os.path.join(TARGET, "debug")
ADMIN_TOKEN = "ui-test-admin-" + os.urandom(12).hex()
MODEL = "mock-gpt"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    def __init__(self, worker_env=None, auth=True):
        self.auth = auth
        self.dir = tempfile.mkdtemp(prefix="agentq-ui-")
        self.procs = []
        self.worker_env = worker_env or {}

    def _spawn(self, name, argv, env):
        log = open(os.path.join(self.dir, name + ".log"), "wb")
        full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        full.update(env)
        p = subprocess.Popen(argv, env=full, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.procs.append((name, p))
        return p

    def _wait(self, url, secs=30):
        deadline = time.time() + secs
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{url} never answered")

    @staticmethod
    def _wait_port(port, secs=20):
        deadline = time.time() + secs
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.dump_logs()
            self.stop()
            raise
        return self

    def start(self):
        rport = free_port()
        self._spawn("redis", ["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no", "--stream-node-max-bytes", "512",
                              "--dir", self.dir], {})
        self._wait_port(rport)
        lport = free_port()
        self._spawn("mock-llm", [os.path.join(BIN, "agentq-mock-llm")],
                    {"MOCK_LLM_LISTEN": f"127.0.0.1:{lport}"})
        self._wait_port(lport)
        upstreams = os.path.join(self.dir, "upstreams.json")
        with open(upstreams, "w") as f:
            json.dump({"upstreams": [{
                "name": "mock", "base_url": f"http://127.0.0.1:{lport}/v1",
                "api_key": "env:OPENAI_API_KEY", "models": [MODEL, "mock-mini"],
                "limits": {"rpm": 6000, "tpm": 2000000, "concurrency": 16},
                "model_limits": {"mock-mini": {"rpm": 1200}},
                "prices": {MODEL: {"prompt": 15, "completion": 60},
                           "mock-mini": {"prompt": 1.5, "completion": 6}},
            }]}, f)
        common = {
            "REDIS_URL": f"redis://127.0.0.1:{rport}",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{lport}/v1",
            "OPENAI_API_KEY": "sk-ui-test",
            "AGENTQ_MODEL": MODEL,
            "AGENTQ_UPSTREAMS": upstreams,
            "AGENTQ_RETRY_BASE_MS": "50",
            "AGENTQ_RETRY_MAX_MS": "500",
            "AGENTQ_HEARTBEAT_SECS": "2",
            "AGENTQ_LOG_FORMAT": "pretty",
            "RUST_LOG": "warn",
        }
        aport = free_port()
        self.url = f"http://127.0.0.1:{aport}"
        self._spawn("api", [os.path.join(BIN, "agentq-api")], {
            **common, "AGENTQ_LISTEN": f"127.0.0.1:{aport}",
            **({"AGENTQ_AUTH": "on", "AGENTQ_ADMIN_TOKEN": ADMIN_TOKEN} if self.auth
               else {"AGENTQ_AUTH": "off"}),
        })
        self._wait(self.url + "/healthz")
        wport = free_port()
        self._spawn("worker", [os.path.join(BIN, "agentq-worker")], {
            **common, "AGENTQ_LISTEN": f"127.0.0.1:{wport}", "WORKER_CONCURRENCY": "8",
            "HOSTNAME": "worker-ui-1", **self.worker_env,
        })
        self._wait(f"http://127.0.0.1:{wport}/healthz")

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.dump_logs()
        self.stop()
        return False

    def stop(self):
        # worker first, so it drains while the api and Redis are still there
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def dump_logs(self):
        for name, _ in self.procs:
            path = os.path.join(self.dir, name + ".log")
            try:
                with open(path, "rb") as f:
                    tail = f.read()[-3000:].decode("utf-8", "replace")
                print(f"---- {name} log (tail) ----\n{tail}")
            except OSError:
                pass

    def logs(self):
        out = ""
        for name, _ in self.procs:
            try:
                with open(os.path.join(self.dir, name + ".log"), "rb") as f:
                    out += f.read().decode("utf-8", "replace")
            except OSError:
                pass
        return out

    # ---- the HTTP API, as a client ----

    def call(self, method, path, body=None, token=ADMIN_TOKEN):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode("utf-8", "replace")

    def submit(self, body, token=ADMIN_TOKEN):
        st, v = self.call("POST", "/v1/tasks", body, token)
        assert st == 202, f"POST /v1/tasks: {st} {v}"
        return v["id"]

    def task(self, tid, token=ADMIN_TOKEN):
        st, v = self.call("GET", f"/v1/tasks/{tid}", None, token)
        assert st == 200, f"GET task: {st} {v}"
        return v

    def wait_status(self, tid, want, secs=20, token=ADMIN_TOKEN):
        deadline = time.time() + secs
        while True:
            t = self.task(tid, token)
            if t["status"] in want:
                return t
            if time.time() > deadline:
                raise AssertionError(f"{tid} is {t['status']}, not {want}")
            time.sleep(0.05)
