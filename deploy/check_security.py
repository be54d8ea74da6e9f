#!/usr/bin/env python3
"""Checks the chart's security wiring in rendered manifests (deploy/check.sh runs it on every value set).

Usage: check_security.py [--no-redis] RENDERED.yaml...

For each rendered file:
  * tokens: the api gets AGENTQ_AUTH ("on"/"off") and, when on, AGENTQ_ADMIN_TOKEN from a Secret
    (secretKeyRef, never a value); no worker container gets the admin or the metrics token, and no
    ConfigMap holds either;
  * Redis ACL users (redisAcl.enabled): the users ConfigMap is files/redis-users.acl rendered as
    tests/tests/acl.rs renders it (the same comment/continuation rules, the prefix, user names and
    SELECT of these values), with only the password hashes left as placeholders; the chart's Secret
    holds URL-safe passwords and users.acl with their SHA-256; the api's REDIS_URL (or each seed of
    REDIS_CLUSTER_NODES) is the api user's, every worker's the worker user's, KEDA's triggers and TriggerAuthentication the KEDA user's, each
    with its own password key. With the in-cluster Redis, its startup script is run as the
    container would run it (paths moved to a temporary folder) and a real redis-server is started
    on the config it writes: each user logs in with its password and KEDA's user may count the
    pending list and nothing more (skipped with --no-redis or without redis-server);
  * TLS: with a rediss:// REDIS_URL (in cluster mode: rediss:// REDIS_CLUSTER_NODES seeds, all of
    one scheme) and a CA Secret, api and every worker get AGENTQ_REDIS_CA_FILE pointing at a
    mounted copy of it, and KEDA's TriggerAuthentication passes it as `ca`; the
    in-cluster Redis (redis.tls) listens on TLS only and its probes speak TLS.
Exits non-zero on the first file with a failure, after printing every failure of that file.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
ACL_SOURCE = ROOT / "deploy/helm/agentq/files/redis-users.acl"
URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")


def render_acl(source: str, vars: dict[str, str], keep: tuple[str, ...] = ()) -> list[str]:
    """files/redis-users.acl as Redis reads it: comments dropped, continuations joined, placeholders
    substituted (except those in `keep`), spaces squeezed. One user per line."""
    lines: list[str] = []
    for line in source.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0] in " \t":
            lines[-1] += " " + line.strip()
        else:
            lines.append(line.strip())
    out = []
    for line in lines:
        for k, v in vars.items():
            line = line.replace("${" + k + "}", v)
        left = set(re.findall(r"\$\{([A-Z_0-9]+)\}", line)) - set(keep)
        if left:
            raise AssertionError(f"placeholders {sorted(left)} left in: {line}")
        out.append(" ".join(line.split()))
    return out


def docs_of(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def find(docs: list[dict], kind: str, suffix: str = "") -> list[dict]:
    return [d for d in docs if d.get("kind") == kind and d["metadata"]["name"].endswith(suffix)]


def secret_data(docs: list[dict], name: str) -> dict[str, str] | None:
    for s in find(docs, "Secret"):
        if s["metadata"]["name"] == name:
            out = {k: base64.b64decode(v).decode() for k, v in (s.get("data") or {}).items()}
            out.update(s.get("stringData") or {})
            return out
    return None


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def containers(docs: list[dict]) -> list[tuple[dict, dict, dict]]:
    out = []
    for d in find(docs, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"]:
            out.append((d, pod, c))
    return out


def check_file(path: Path, run_redis: bool) -> list[str]:
    errors: list[str] = []

    def expect(cond: bool, msg: str) -> None:
        if not cond:
            errors.append(msg)
            print(f"  FAIL {msg}")

    docs = docs_of(path)
    print(f"{path.name}:")
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in find(docs, "ConfigMap")}
    apis = [(d, pod, c) for d, pod, c in containers(docs) if c["name"] == "api"]
    workers = [(d, pod, c) for d, pod, c in containers(docs) if c["name"] == "worker"]
    expect(len(apis) == 1 and len(workers) >= 1, "one api and at least one worker Deployment")

    # ---- tokens ----
    for d, _, c in apis:
        env = env_of(c)
        auth = env.get("AGENTQ_AUTH", {}).get("value")
        expect(auth in ("on", "off"), f"{d['metadata']['name']}: AGENTQ_AUTH is {auth!r}")
        tok = env.get("AGENTQ_ADMIN_TOKEN")
        if auth == "on":
            ref = ((tok or {}).get("valueFrom") or {}).get("secretKeyRef")
            expect(tok is not None and "value" not in tok and ref is not None,
                   "the api's AGENTQ_ADMIN_TOKEN comes from a Secret (secretKeyRef)")
            if ref:
                print(f"  ok   api: AGENTQ_AUTH=on, AGENTQ_ADMIN_TOKEN from Secret {ref['name']} key {ref['key']}")
        else:
            expect(tok is None, "an api with auth off gets no admin token")
            print("  ok   api: AGENTQ_AUTH=off")
    for d, _, c in workers:
        env = env_of(c)
        for secret in ("AGENTQ_ADMIN_TOKEN", "AGENTQ_METRICS_TOKEN", "AGENTQ_AUTH"):
            expect(secret not in env, f"{d['metadata']['name']}: the worker gets {secret}")
        for src in c.get("envFrom", []):
            name = (src.get("configMapRef") or {}).get("name")
            if name:
                expect("AGENTQ_ADMIN_TOKEN" not in configmaps.get(name, {}),
                       f"{d['metadata']['name']}: the admin token reaches it through ConfigMap {name}")
    for name, data in configmaps.items():
        for secret in ("AGENTQ_ADMIN_TOKEN", "AGENTQ_METRICS_TOKEN"):
            expect(secret not in data, f"ConfigMap {name} holds {secret}")
    print(f"  ok   no worker ({len(workers)}) and no ConfigMap holds a token")

    # ---- ACL users ----
    acl_maps = [d for d in find(docs, "ConfigMap", "-redis-acl")]
    triggers = [t for so in find(docs, "ScaledObject") for t in so["spec"]["triggers"]
                if t["type"] in ("redis", "redis-cluster")]
    if acl_maps:
        check_acl(docs, acl_maps[0], apis, workers, triggers, configmaps, run_redis, expect)
    else:
        print("  --   no Redis ACL users (redisAcl.enabled=false)")

    # ---- TLS ----
    check_tls(docs, apis + workers, expect)
    return errors


def urls_of(c: dict) -> list[str]:
    """The Redis URLs a container is given: REDIS_URL, or in cluster mode every seed of REDIS_CLUSTER_NODES."""
    env = env_of(c)
    if "REDIS_CLUSTER_NODES" in env:
        return env["REDIS_CLUSTER_NODES"]["value"].split(",")
    return [env["REDIS_URL"]["value"]]


def url_of(c: dict, docs: list[dict]) -> str:
    """The first of urls_of (check_acl compares every one's user and password part)."""
    return urls_of(c)[0]


def check_acl(docs, cm, apis, workers, triggers, configmaps, run_redis, expect) -> None:
    name = cm["metadata"]["name"]
    tpl = cm["data"]["users.acl.tpl"].strip().splitlines()
    api_url = urlsplit(url_of(apis[0][2], docs))
    worker_urls = {urlsplit(u).username for _, _, c in workers for u in urls_of(c)}
    expect(len({urlsplit(u).username for u in urls_of(apis[0][2])}) == 1, "every api seed URL names one user")
    expect(len(worker_urls) == 1, f"every worker Deployment connects as one user: {worker_urls}")
    users = {"API": api_url.username, "WORKER": next(iter(worker_urls)), "KEDA": None}
    keda_users = {t["metadata"].get("username") for t in triggers}
    if triggers:
        expect(len(keda_users) == 1 and None not in keda_users, f"KEDA's triggers name one user: {keda_users}")
        users["KEDA"] = next(iter(keda_users))
    prefix = {d.get("AGENTQ_KEY_PREFIX") for d in configmaps.values() if "AGENTQ_KEY_PREFIX" in d}
    expect(len(prefix) == 1, f"one AGENTQ_KEY_PREFIX: {prefix}")
    prefix = next(iter(prefix))
    db = api_url.path.strip("/") or "0"
    vars = {"PREFIX": prefix, "SELECT": "" if db == "0" else "+select",
            "API_USER": users["API"], "WORKER_USER": users["WORKER"], "KEDA_USER": users["KEDA"] or "-"}
    hashes = ("API_PASSWORD_SHA256", "WORKER_PASSWORD_SHA256", "KEDA_PASSWORD_SHA256")
    want = render_acl(ACL_SOURCE.read_text(), vars, keep=hashes)
    if not triggers:
        want = [l for l in want if not l.startswith(f"user {vars['KEDA_USER']} ")]
    expect(tpl == want, f"ConfigMap {name} users.acl.tpl is not files/redis-users.acl rendered for prefix "
                        f"{prefix!r}, users {users}, db {db}:\n    " + "\n    ".join(tpl))
    print(f"  ok   ConfigMap {name}: files/redis-users.acl for prefix {prefix!r}, users "
          f"{', '.join(u for u in users.values() if u)}{', +select (db ' + db + ')' if db != '0' else ''}")

    # which Secret and key each component's password comes from
    def pw_ref(c: dict) -> dict:
        return env_of(c)["REDIS_PASSWORD_URLENCODED"]["valueFrom"]["secretKeyRef"]

    refs = {"api": pw_ref(apis[0][2])}
    for _, _, c in workers:
        r = pw_ref(c)
        expect(r["key"] == "worker-password", f"a worker's password key is {r['key']}")
        refs["worker"] = r
    expect(refs["api"]["key"] == "api-password", f"the api's password key is {refs['api']['key']}")
    secret_name = refs["api"]["name"]
    expect(refs["worker"]["name"] == secret_name, "api and worker passwords come from one Secret")
    auths = find(docs, "TriggerAuthentication")
    if triggers:
        pw = [r for a in auths for r in a["spec"]["secretTargetRef"] if r["parameter"] == "password"]
        expect(len(pw) == 1 and pw[0]["name"] == secret_name and pw[0]["key"] == "keda-password",
               f"KEDA's password is keda-password of {secret_name}: {pw}")
    for _, _, c in apis + workers:
        for url in urls_of(c):
            u = urlsplit(url)
            expect(u.password == "$(REDIS_PASSWORD_URLENCODED)", f"Redis URL password part: {u.password}")
    print(f"  ok   Redis URL users: api {users['API']}, workers {users['WORKER']}; KEDA {users['KEDA']}; "
          f"passwords from Secret {secret_name} (api-password, worker-password, keda-password)")

    data = secret_data(docs, secret_name)
    if data is None:
        print(f"  --   Secret {secret_name} is an existing one: not rendered, passwords not checked")
        return
    pws = {k: data.get(f"{k.lower()}-password", "") for k in ("API", "WORKER", "KEDA")}
    for k, v in pws.items():
        expect(URL_SAFE.fullmatch(v) is not None and len(v) >= 32, f"the {k} password is not 32+ URL-safe characters")
    hashed = dict(vars, **{f"{k}_PASSWORD_SHA256": hashlib.sha256(v.encode()).hexdigest() for k, v in pws.items()})
    want_final = render_acl(ACL_SOURCE.read_text(), hashed)
    if not triggers:
        want_final = [l for l in want_final if not l.startswith(f"user {vars['KEDA_USER']} ")]
    expect(data.get("users.acl", "").strip().splitlines() == want_final,
           f"Secret {secret_name} users.acl is not the users with their passwords' hashes")
    print(f"  ok   Secret {secret_name}: three generated URL-safe passwords, users.acl with their SHA-256")

    sts = find(docs, "StatefulSet", "-redis")
    if sts:
        boot_redis(docs, sts[0], data, pws, users, prefix, bool(triggers), run_redis, expect)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boot_redis(docs, sts, acl_secret, pws, users, prefix, keda, run_redis, expect) -> None:
    """Runs the Redis container's startup script against the rendered Secrets and ConfigMap, then
    a real redis-server on the config it writes, and logs in as every user."""
    if not run_redis or not shutil.which("redis-server") or not shutil.which("redis-cli"):
        print("  --   in-cluster Redis boot not run (no redis-server here, or --no-redis)")
        return
    pod = sts["spec"]["template"]["spec"]
    c = pod["containers"][0]
    script = c["command"][2]
    redis_secret = next(v["secret"] for v in pod["volumes"] if v["name"] == "auth")
    redis_pw = secret_data(docs, redis_secret["secretName"])
    if redis_pw is None:
        print("  --   the Redis password Secret is an existing one: boot not run")
        return
    redis_pw = redis_pw[redis_secret["items"][0]["key"]]
    acl_map = next(d for d in find(docs, "ConfigMap", "-redis-acl"))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "etc/redis-auth").mkdir(parents=True)
        (t / "etc/redis-auth/password").write_text(redis_pw)
        (t / "etc/redis-acl/passwords").mkdir(parents=True)
        for k, v in pws.items():
            (t / f"etc/redis-acl/passwords/{k.lower()}-password").write_text(acl_secret[f"{k.lower()}-password"])
        (t / "etc/redis-acl/users").mkdir(parents=True)
        (t / "etc/redis-acl/users/users.acl.tpl").write_text(acl_map["data"]["users.acl.tpl"])
        (t / "run/redis").mkdir(parents=True)
        local = script.replace("/etc/", f"{t}/etc/").replace("/run/redis", f"{t}/run/redis")
        local = local.replace('exec redis-server', 'exit 0; exec redis-server')
        r = subprocess.run(["sh", "-c", local], capture_output=True, text=True)
        expect(r.returncode == 0, f"the Redis startup script failed: {r.stderr}")
        conf = (t / "run/redis/auth.conf").read_text()
        for k, v in pws.items():
            expect(v not in conf, f"the {k} password is in Redis' config (only its hash may be)")
        port = free_port()
        proc = subprocess.Popen(["redis-server", str(t / "run/redis/auth.conf"), "--port", str(port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            cli = lambda user, pw, *args: subprocess.run(  # noqa: E731
                ["redis-cli", "-p", str(port), "--no-auth-warning", "--user", user, "--pass", pw, *args],
                capture_output=True, text=True).stdout.strip()
            deadline = time.time() + 10
            while cli("default", redis_pw, "PING") != "PONG":
                if time.time() > deadline or proc.poll() is not None:
                    out = proc.stdout.read() if proc.poll() is not None else ""
                    expect(False, f"redis-server did not start on the config the script wrote:\n{out}\n{conf}")
                    return
                time.sleep(0.05)
            for k in ("API", "WORKER") + (("KEDA",) if keda else ()):
                expect(cli(users[k], pws[k], "PING") == "PONG", f"{users[k]} cannot log in with its password")
                expect(cli(users[k], "wrong-password", "PING") != "PONG", f"{users[k]} logs in with a wrong password")
            if keda:
                pending = f"{prefix}:{{default}}:pending"
                n = cli(users["KEDA"], pws["KEDA"], "EVAL", "return redis.call('llen', KEYS[1])", "1", pending)
                expect(n == "0", f"KEDA's user cannot count {pending}: {n}")
                denied = cli(users["KEDA"], pws["KEDA"], "GET", f"{prefix}:token:x")
                expect("NOPERM" in denied or denied == "", f"KEDA's user may read a token: {denied!r}")
            denied = subprocess.run(["redis-cli", "-p", str(port), "--no-auth-warning", "--user", users["WORKER"],
                                     "--pass", pws["WORKER"], "HGETALL", f"{prefix}:tenant:{{a}}"],
                                    capture_output=True, text=True)
            expect("NOPERM" in denied.stdout + denied.stderr, f"the worker may read a tenant: {denied.stdout}")
            print(f"  ok   in-cluster Redis: its startup script writes the users with hashes only; redis-server "
                  f"{port} took them; each user logs in with its password, the worker may not read a tenant")
        finally:
            proc.kill()
            proc.wait()


def check_tls(docs, comps, expect) -> None:
    schemes = {urlsplit(u).scheme for _, _, c in comps for u in urls_of(c)}
    expect(len(schemes) == 1, f"every Redis URL (REDIS_URL, each REDIS_CLUSTER_NODES seed) has one scheme: {schemes}")
    tls = [c for _, _, c in comps if all(urlsplit(u).scheme == "rediss" for u in urls_of(c))]
    if not tls:
        print("  --   Redis without TLS")
        return
    expect(len(tls) == len(comps), "every agentq container reaches Redis over TLS, or none")
    ca_files = set()
    for d, pod, c in comps:
        env = env_of(c)
        ca = env.get("AGENTQ_REDIS_CA_FILE", {}).get("value")
        if ca is None:
            continue
        ca_files.add(ca)
        mounts = [m for m in c.get("volumeMounts", []) if ca.startswith(m["mountPath"].rstrip("/") + "/")]
        expect(len(mounts) == 1, f"{d['metadata']['name']}: {ca} is not on a mounted volume")
        if mounts:
            vol = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
            items = {i["path"]: i["key"] for i in vol["secret"].get("items", [])}
            expect(Path(ca).name in items, f"{d['metadata']['name']}: the CA volume has no {Path(ca).name}")
    auths = find(docs, "TriggerAuthentication")
    ca_refs = [r for a in auths for r in a["spec"]["secretTargetRef"] if r["parameter"] == "ca"]
    if ca_files:
        expect(len(ca_files) == 1 and len(ca_files) and all(
            "AGENTQ_REDIS_CA_FILE" in env_of(c) for _, _, c in comps), "every container or none gets the CA bundle")
        if find(docs, "ScaledObject"):
            expect(len(ca_refs) == 1, "KEDA's TriggerAuthentication passes the CA bundle (parameter ca)")
        print(f"  ok   rediss:// with the CA bundle mounted at {next(iter(ca_files))} in api and workers"
              f"{' and given to KEDA' if ca_refs else ''}")
    else:
        expect(not ca_refs, "KEDA gets a CA the pods do not")
        print("  ok   rediss:// verified against the system roots")
    for sts in find(docs, "StatefulSet", "-redis"):
        c = sts["spec"]["template"]["spec"]["containers"][0]
        args = c["args"]
        expect(args[args.index("--port") + 1] == "0" and "--tls-port" in args, "the in-cluster Redis listens on TLS only")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            expect("--tls" in " ".join(c[probe]["exec"]["command"]), f"the Redis {probe} does not speak TLS")
        print("  ok   in-cluster Redis: TLS port only, probes over TLS")


def main(argv: list[str]) -> int:
    run_redis = "--no-redis" not in argv
    paths = [Path(a) for a in argv if not a.startswith("--")]
    failed = 0
    for p in paths:
        if check_file(p, run_redis):
            failed += 1
    print(f"check_security: {len(paths) - failed} of {len(paths)} renders pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
