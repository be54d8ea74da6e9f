//! Test harness for agentq's end-to-end tests: a private `redis-server` per test on a free port,
//! the real `agentq-api` / `agentq-worker` binaries as child processes, and the mock LLM in-process.
//!
//! The binaries must be built first (`cargo build --bins`); `scripts/test.sh` does that.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub mod aimock;
pub mod fair;
pub mod litellm;
pub mod mcp;
pub mod sdk;
pub mod sse;

pub use agentq_mock_llm::{MockConfig, MockLlm};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Path of a workspace binary next to the test executable (target/<profile>/NAME).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --bins`",
        path.display()
    );
    path
}

/// Sends a signal with kill(1): the tests need SIGTERM and SIGKILL, and no unsafe code.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A child process killed on drop, its output kept in a log file for failure reports.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        signal(self.pid(), "TERM");
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} still running after {:?}\n{}",
                    self.name,
                    timeout,
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private redis-server. With `durable`, it writes an AOF with `appendfsync always`, so it can
/// be stopped and started again on the same port and directory without losing acknowledged writes.
pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    durable: bool,
    extra: Vec<String>,
    proc: Option<Proc>,
    /// A one-node cluster of the sweep whose slots are assigned: a restart waits for it to be ok.
    one_node_cluster: bool,
}

impl RedisServer {
    pub fn start() -> Result<Self> {
        Self::start_with(false, &[])
    }

    pub fn start_with(durable: bool, extra: &[&str]) -> Result<Self> {
        let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        // the suite's cluster sweep: every server is a one-node cluster owning every slot
        let one_node_cluster = cluster_sweep() && !extra.iter().any(|a| a == "--cluster-enabled");
        if one_node_cluster {
            extra.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ]
                .map(str::to_owned),
            );
        }
        if extra.iter().any(|a| a == "--cluster-enabled") {
            // the cluster bus listens on a port of its own, port + 10000 unless told: a free one
            // instead, so it never collides with another test's server
            extra.extend(["--cluster-port".to_owned(), free_port().to_string()]);
        }
        let mut r = Self {
            port: free_port(),
            dir: tempfile::tempdir()?,
            durable,
            extra,
            proc: None,
            one_node_cluster: false,
        };
        r.resume()?;
        if one_node_cluster {
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(0)
                .arg(16383)
                .query::<()>(&mut r.conn()?)?;
            r.one_node_cluster = true;
            r.wait_cluster_ok()?;
        }
        Ok(r)
    }

    fn wait_cluster_ok(&self) -> Result<()> {
        let mut c = self.conn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c)?;
            if info.contains("cluster_state:ok") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the one-node cluster never became ok");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and directory.
    pub fn resume(&mut self) -> Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--save")
            .arg("");
        if self.durable {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        cmd.args(&self.extra);
        let name = format!("redis-{}", self.port);
        self.proc = Some(Proc::spawn(&name, &mut cmd, self.dir.path())?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                if self.one_node_cluster {
                    // its slots come back from nodes.conf, a moment after it answers
                    self.wait_cluster_ok()?;
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server did not start on port {}", self.port)
    }

    /// Stops the server abruptly (SIGKILL), like a crashed or evicted Redis pod.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.sigkill();
        }
    }

    /// The running server's pid (None while killed), e.g. to freeze it with SIGSTOP.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// True when the server answers, even if only to say it wants a password.
    pub fn ping(&self) -> bool {
        let Ok(mut c) = self
            .client()
            .and_then(|c| c.get_connection().map_err(anyhow::Error::from))
        else {
            return false;
        };
        match redis::cmd("PING").query::<String>(&mut c) {
            Ok(_) => true,
            Err(e) => e.code() == Some("NOAUTH"),
        }
    }

    pub fn client(&self) -> Result<redis::Client> {
        Ok(redis::Client::open(self.url())?)
    }

    /// The product's own connection to this server, as the binaries open it: for tests that call
    /// `Broker` or `Limiter` the way a worker does.
    pub fn agentq(&self) -> Result<agentq_common::Redis> {
        Ok(agentq_common::Redis::open(&secrecy::SecretString::from(
            self.url(),
        ))?)
    }

    /// A synchronous connection for assertions and fault injection.
    pub fn conn(&self) -> Result<redis::Connection> {
        Ok(self.client()?.get_connection()?)
    }

    pub fn dbsize(&self) -> Result<u64> {
        Ok(redis::cmd("DBSIZE").query(&mut self.conn()?)?)
    }
}

/// A local Redis Cluster as a test's peer: six `redis-server`s on free ports, made into 3 masters
/// with one replica each by `redis-cli --cluster create` (the tool an operator uses), with a 1 s
/// node timeout so a killed master's replica takes over within a few seconds.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// `cluster-node-timeout` of [`RedisCluster`]: how long a master may be silent before it is
/// marked failed and its replica promoted.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

impl RedisCluster {
    pub fn start() -> Result<Self> {
        let timeout = CLUSTER_NODE_TIMEOUT_MS.to_string();
        let mut nodes = Vec::with_capacity(6);
        for _ in 0..6 {
            nodes.push(RedisServer::start_with(
                false,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
                ],
            )?);
        }
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let c = Self { nodes };
        c.wait_ready(Duration::from_secs(30))?;
        Ok(c)
    }

    /// `REDIS_CLUSTER_NODES` for the binaries: every node as a seed.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every live node says `cluster_state:ok` and every master has a replica in sync.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the cluster was not ready after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn ready(&self) -> bool {
        let live: Vec<&RedisServer> = self.nodes.iter().filter(|n| n.pid().is_some()).collect();
        let mut masters = 0;
        for n in &live {
            let Ok(mut c) = n.conn() else { return false };
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut c)
                .unwrap_or_default();
            if !info.contains("cluster_state:ok") {
                return false;
            }
            let repl: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut c)
                .unwrap_or_default();
            if repl.contains("role:master") {
                masters += 1;
                if !repl.contains("connected_slaves:1") || !repl.contains("state=online") {
                    return false;
                }
            }
        }
        masters == 3
    }

    /// The node that serves `key`'s slot as master now (asked of a live node).
    pub fn master_of(&self, key: &str) -> Result<usize> {
        let live = self
            .nodes
            .iter()
            .find(|n| n.pid().is_some())
            .ok_or_else(|| anyhow::anyhow!("no live node"))?;
        let mut c = live.conn()?;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)?;
        // CLUSTER SLOTS: [[start, end, [ip, port, id], replicas...], ...]
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c)?;
        for range in slots {
            let redis::Value::Array(r) = range else {
                continue;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (r.first(), r.get(1))
            else {
                continue;
            };
            if (*start..=*end).contains(&slot) {
                if let Some(redis::Value::Array(master)) = r.get(2) {
                    if let Some(redis::Value::Int(port)) = master.get(1) {
                        if let Some(i) = self.nodes.iter().position(|n| i64::from(n.port) == *port)
                        {
                            return Ok(i);
                        }
                    }
                }
            }
        }
        bail!("no master serves slot {slot} of {key}")
    }

    /// A cluster client for the test's own reads (the binaries use their own).
    pub fn client(&self) -> Result<redis::cluster::ClusterClient> {
        Ok(redis::cluster::ClusterClient::new(
            self.nodes.iter().map(RedisServer::url).collect::<Vec<_>>(),
        )?)
    }
}

/// `AGENTQ_TEST_REDIS=cluster`: the suite's cluster sweep. Every test's Redis is a one-node
/// Redis Cluster owning all 16384 slots, and the binaries run in cluster mode against it
/// (`REDIS_CLUSTER_NODES`). A one-node cluster refuses exactly what a real one would: a script
/// or command whose keys are in more than one slot (CROSSSLOT, "do not hash to the same slot").
pub fn cluster_sweep() -> bool {
    std::env::var("AGENTQ_TEST_REDIS").is_ok_and(|v| v == "cluster")
}

/// Base environment for both binaries in tests: fast heartbeats and retries, pretty logs.
pub fn base_env(redis_url: &str, llm_url: &str) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = [
        ("REDIS_URL", redis_url),
        ("OPENAI_BASE_URL", llm_url),
        ("OPENAI_API_KEY", "sk-test-secret"),
        ("AGENTQ_MODEL", "mock-gpt"),
        ("AGENTQ_HEARTBEAT_SECS", "2"),
        ("AGENTQ_RETRY_BASE_MS", "50"),
        ("AGENTQ_RETRY_MAX_MS", "500"),
        ("AGENTQ_LLM_TIMEOUT_SECS", "5"),
        ("AGENTQ_DRAIN_TIMEOUT_SECS", "10"),
        ("AGENTQ_LOG_FORMAT", "pretty"),
        ("RUST_LOG", "info"),
        // the api's default is on (a token on every /v1 route); tests about tokens and tenants
        // start it with `start_api_auth`
        ("AGENTQ_AUTH", "off"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if cluster_sweep() {
        env.insert("REDIS_CLUSTER_NODES".to_owned(), redis_url.to_owned());
        // a one-node cluster has no replica to wait for
        env.insert("AGENTQ_ENQUEUE_REPLICAS".to_owned(), "0".to_owned());
    }
    env
}

/// The admin token of an api started with [`Stack::start_api_auth`].
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Redis, the mock LLM, and handles to start the api and workers against them.
pub struct Stack {
    pub redis: RedisServer,
    pub llm_url: String,
    pub mock: MockLlm,
    pub env: HashMap<String, String>,
    pub logs: tempfile::TempDir,
    pub api: Option<Proc>,
    pub api_url: String,
    pub http: reqwest::Client,
    workers_started: usize,
}

impl Stack {
    /// Starts Redis and the mock LLM (on the current tokio runtime, which must be multi-threaded).
    pub async fn new(mock: MockConfig) -> Result<Self> {
        Self::with_redis(RedisServer::start()?, mock).await
    }

    pub async fn with_redis(redis: RedisServer, mock: MockConfig) -> Result<Self> {
        let (llm_url, mock) = agentq_mock_llm::spawn(mock).await?;
        let env = base_env(&redis.url(), &llm_url);
        Ok(Self {
            redis,
            llm_url,
            mock,
            env,
            logs: tempfile::tempdir()?,
            api: None,
            api_url: String::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            workers_started: 0,
        })
    }

    fn command(&self, binary: &str, listen: u16, extra: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(bin(binary));
        cmd.env_clear();
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        cmd.envs(&self.env);
        cmd.env("AGENTQ_LISTEN", format!("127.0.0.1:{listen}"));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the api and waits for its /healthz.
    pub async fn start_api(&mut self, extra: &[(&str, &str)]) -> Result<()> {
        let port = free_port();
        let mut cmd = self.command("agentq-api", port, extra);
        self.api = Some(Proc::spawn("api", &mut cmd, self.logs.path())?);
        self.api_url = format!("http://127.0.0.1:{port}");
        self.wait_http(&format!("{}/healthz", self.api_url)).await
    }

    /// Starts the api with auth on (`AGENTQ_AUTH=on`, admin token [`ADMIN_TOKEN`]).
    pub async fn start_api_auth(&mut self, extra: &[(&str, &str)]) -> Result<()> {
        let mut all = vec![("AGENTQ_AUTH", "on"), ("AGENTQ_ADMIN_TOKEN", ADMIN_TOKEN)];
        all.extend_from_slice(extra);
        self.start_api(&all).await
    }

    /// Creates a tenant (`POST /v1/admin/tenants` with `body`, which must hold `id`) and one
    /// token for it; returns the token.
    pub async fn tenant(&self, body: &Value) -> Result<String> {
        let (st, v) = self
            .send_as(
                ADMIN_TOKEN,
                reqwest::Method::POST,
                "/v1/admin/tenants",
                Some(body),
            )
            .await?;
        if st != 201 {
            bail!("POST /v1/admin/tenants answered {st}: {v}");
        }
        let id = body["id"].as_str().context("tenant body without id")?;
        let (st, v) = self
            .send_as(
                ADMIN_TOKEN,
                reqwest::Method::POST,
                &format!("/v1/admin/tenants/{id}/tokens"),
                Some(&json!({})),
            )
            .await?;
        if st != 201 {
            bail!("POST tokens answered {st}: {v}");
        }
        v["token"]
            .as_str()
            .map(str::to_owned)
            .context("201 without a token")
    }

    /// A request with `Authorization: Bearer <token>`; returns (status, JSON body or null).
    pub async fn send_as(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.api_url))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Polls `GET /v1/tasks/{id}` with `token` until the task is final (20 s at most).
    pub async fn wait_final_as(&self, token: &str, id: &str) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (st, v) = self
                .send_as(
                    token,
                    reqwest::Method::GET,
                    &format!("/v1/tasks/{id}"),
                    None,
                )
                .await?;
            if st == 200
                && matches!(
                    v["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                )
            {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("task {id} not final: {st} {v}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a worker and waits for its probe server.
    pub async fn start_worker(&mut self, extra: &[(&str, &str)]) -> Result<Worker> {
        let port = free_port();
        self.workers_started += 1;
        let name = format!("worker-{}", self.workers_started);
        let mut cmd = self.command("agentq-worker", port, extra);
        cmd.env("HOSTNAME", &name);
        let proc = Proc::spawn(&name, &mut cmd, self.logs.path())?;
        let probe = format!("http://127.0.0.1:{port}");
        self.wait_http(&format!("{probe}/healthz")).await?;
        Ok(Worker { proc, probe })
    }

    async fn wait_http(&self, url: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("{url} never answered")
    }

    /// POSTs a task; returns (status, body).
    pub async fn post(&self, body: &Value) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}/v1/tasks", self.api_url))
            .json(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// POSTs `{"prompt": prompt}` and returns the new task's id.
    pub async fn submit(&self, prompt: &str) -> Result<String> {
        self.submit_json(&json!({ "prompt": prompt })).await
    }

    pub async fn submit_json(&self, body: &Value) -> Result<String> {
        let (status, v) = self.post(body).await?;
        if status != 202 {
            bail!("POST /v1/tasks answered {status}: {v}");
        }
        v["id"]
            .as_str()
            .map(str::to_owned)
            .context("202 without an id")
    }

    /// Cancels a task (`DELETE /v1/tasks/{id}`); the api must answer 200.
    pub async fn cancel(&self, id: &str) -> Result<()> {
        let r = self
            .http
            .delete(format!("{}/v1/tasks/{id}", self.api_url))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "DELETE {id} answered {}", r.status());
        Ok(())
    }

    pub async fn task(&self, id: &str) -> Result<Value> {
        let r = self
            .http
            .get(format!("{}/v1/tasks/{id}", self.api_url))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("GET task {id}: {}", r.status());
        }
        Ok(r.json().await?)
    }

    pub async fn get_json(&self, path: &str) -> Result<(u16, Value)> {
        let r = self
            .http
            .get(format!("{}{path}", self.api_url))
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Polls until every task reaches a final status; returns their records in order.
    pub async fn wait_final(&self, ids: &[String], timeout: Duration) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut done: HashMap<String, Value> = HashMap::new();
        loop {
            for id in ids {
                if done.contains_key(id) {
                    continue;
                }
                if let Ok(t) = self.task(id).await {
                    if matches!(
                        t["status"].as_str(),
                        Some("succeeded" | "failed" | "cancelled")
                    ) {
                        done.insert(id.clone(), t);
                    }
                }
            }
            if done.len() == ids.len() {
                return Ok(ids.iter().filter_map(|i| done.remove(i)).collect());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {} tasks unfinished after {timeout:?}; api log:\n{}",
                    ids.len() - done.len(),
                    ids.len(),
                    self.api.as_ref().map(Proc::tail).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `GET /v1/tasks/{id}` until `pred` holds.
    pub async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.task(id).await?;
            if pred(&t) {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("task {id} never matched; last: {t}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn queue(&self, queue: &str) -> Result<Value> {
        Ok(self.get_json(&format!("/v1/queues/{queue}")).await?.1)
    }

    /// POSTs raw bytes to /v1/tasks with the given Content-Type (none when `None`) and extra
    /// headers (raw bytes, so tests can send non-ASCII values); returns (status, JSON body).
    pub async fn post_raw(
        &self,
        content_type: Option<&str>,
        body: Vec<u8>,
        headers: &[(&str, &[u8])],
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .post(format!("{}/v1/tasks", self.api_url))
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        for (name, value) in headers {
            req = req.header(*name, reqwest::header::HeaderValue::from_bytes(value)?);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// `GET /v1/queues/{queue}/dead`: the dead-lettered tasks, newest first.
    pub async fn dead(&self, queue: &str) -> Result<Vec<Value>> {
        let (status, v) = self.get_json(&format!("/v1/queues/{queue}/dead")).await?;
        if status != 200 {
            bail!("GET dead list answered {status}: {v}");
        }
        Ok(v["tasks"].as_array().cloned().unwrap_or_default())
    }

    /// `POST /v1/queues/{queue}/dead/redrive[?limit=N]`; returns (status, body).
    pub async fn redrive(&self, queue: &str, limit: Option<usize>) -> Result<(u16, Value)> {
        let mut url = format!("{}/v1/queues/{queue}/dead/redrive", self.api_url);
        if let Some(n) = limit {
            url.push_str(&format!("?limit={n}"));
        }
        let r = self.http.post(url).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// The request bodies the mock LLM received for `prompt` (its last user message), in call
    /// order (the mock must record: `MockConfig { record: true, .. }`).
    pub fn request_bodies(&self, prompt: &str) -> Vec<Value> {
        let mut r: Vec<_> = self
            .mock
            .request_records()
            .into_iter()
            .filter(|r| r.prompt == prompt)
            .collect();
        r.sort_by_key(|r| r.call);
        r.into_iter().map(|r| r.body).collect()
    }

    /// Waits until the mock LLM has received `n` calls of `prompt` (recording on).
    pub async fn wait_calls(&self, prompt: &str, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.request_bodies(prompt).len() < n {
            if Instant::now() > deadline {
                bail!("call {n} of {prompt:?} never reached the mock");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Every log line any process of this stack wrote so far (api, workers), for panic checks.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        if let Ok(dir) = std::fs::read_dir(self.logs.path()) {
            for entry in dir.flatten() {
                out.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        out
    }
}

/// A running worker process and its probe URL.
pub struct Worker {
    pub proc: Proc,
    pub probe: String,
}

impl Worker {
    /// The worker's Prometheus text from its probe server.
    pub async fn metrics(&self) -> Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.probe))
            .await?
            .text()
            .await?)
    }
}

/// The value of one series (`name{labels}` exactly as rendered) in Prometheus text; 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

// ---- Chaos helpers (tests/tests/chaos.rs): freezing, thawing and polling processes ----

impl Proc {
    /// SIGSTOP: the process stops with its sockets open and its timers frozen, like a long GC
    /// pause or a paused VM; peers see silence, not a disconnect.
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    /// SIGCONT after [`Proc::freeze`].
    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl RedisServer {
    /// SIGSTOP: clients stay connected and get no answer until [`RedisServer::thaw`].
    pub fn freeze(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
        }
    }

    pub fn thaw(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
        }
    }
}

// ---- helpers shared by the end-to-end test files ----

/// Key of a task record in the default queue under the default prefix.
pub fn task_key(id: &str) -> String {
    format!("agentq:{{default}}:task:{id}")
}

/// The worker's `agentq_llm_requests_total` series for one model and outcome.
pub fn llm_series(model: &str, outcome: &str) -> String {
    format!("agentq_llm_requests_total{{model=\"{model}\",outcome=\"{outcome}\"}}")
}

/// Submits each prompt and checks that it succeeded after exactly its count of failed calls:
/// `attempts` one more, as many calls at the mock, the echo as its result, no error left.
pub async fn assert_recover(s: &Stack, cases: &[(&str, u64)]) -> Result<()> {
    let mut ids = Vec::new();
    for (p, _) in cases {
        ids.push(s.submit(p).await?);
    }
    let done = s.wait_final(&ids, Duration::from_secs(30)).await?;
    for ((p, n), t) in cases.iter().zip(&done) {
        assert_eq!(t["status"], "succeeded", "{p}: {t}");
        assert_eq!(t["attempts"], n + 1, "{p}: {t}");
        assert_eq!(s.mock.calls(p), n + 1, "{p}");
        assert_eq!(t["result"]["content"], format!("echo: {p}"));
        assert!(t["error"].is_null(), "a success clears the error: {t}");
    }
    Ok(())
}

/// POSTs `{"prompt", "max_attempts"}` and returns the new task's id.
pub async fn submit_max(s: &Stack, prompt: &str, max_attempts: u32) -> Result<String> {
    s.submit_json(&json!({"prompt": prompt, "max_attempts": max_attempts}))
        .await
}

/// Fails the test when any process of the stack panicked, quoting the lines.
pub fn assert_no_panic(s: &Stack) {
    let logs = s.all_logs();
    let panics: Vec<&str> = logs.lines().filter(|l| l.contains("panicked")).collect();
    assert!(
        panics.is_empty(),
        "a process panicked:\n{}",
        panics.join("\n")
    );
}

/// The last lines of every process log of the stack, to explain a failed wait.
pub fn log_tails(s: &Stack) -> String {
    let mut out = String::new();
    if let Ok(dir) = std::fs::read_dir(s.logs.path()) {
        for entry in dir.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {}\n", entry.file_name().to_string_lossy()));
            out.push_str(&lines[lines.len().saturating_sub(30)..].join("\n"));
            out.push('\n');
        }
    }
    out
}

/// A private CA and a server certificate it signed for 127.0.0.1 and localhost, in `dir`, made
/// with the system's openssl: what a real TLS deployment of Redis has.
pub struct TlsFiles {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

pub fn tls_files(dir: &Path) -> Result<TlsFiles> {
    let p = |n: &str| dir.join(n).display().to_string();
    let (ca_key, ca, key, csr, cert, ext) = (
        p("ca.key"),
        p("ca.pem"),
        p("server.key"),
        p("server.csr"),
        p("server.pem"),
        p("ext.cnf"),
    );
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
    let steps: [Vec<&str>; 3] = [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=agentq-test-ca",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
        ],
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
        vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &cert,
            "-extfile",
            &ext,
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .output()
            .context("openssl")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(TlsFiles { ca, cert, key })
}
