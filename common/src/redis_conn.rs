//! The Redis connection: one multiplexed, auto-reconnecting connection shared by every task
//! (and, for a subscriber, a pub/sub connection of its own: [`Redis::pubsub`]).
//!
//! Cluster mode (`REDIS_CLUSTER_NODES`, [`RedisTarget::Cluster`]): the same [`Redis`] handle holds
//! the `redis` crate's async cluster connection instead, which keeps a connection per node, routes
//! every command and script by its first key's slot, follows MOVED/ASK and re-reads the slot map
//! after a failover. Callers see one [`Conn`] either way. What a cluster asks of callers: a
//! pipeline's commands share one slot (a queue's keys do: they carry its `{queue}` hash tag), and
//! a blocking command gets a [`Redis`] of its own (it holds its node's connection while it waits).
//!
//! Why not a pool: a multiplexed connection pipelines concurrent commands on one socket, which is
//! what a queue's many small scripts want, and deadpool-redis PINGs on every checkout, doubling the
//! round trips per enqueue. The connection is made lazily so a process starts, serves its probes
//! and reports not-ready while Redis is away, instead of crash-looping.
//!
//! Security (docs/security.md): a `rediss://` URL is TLS, verified against the system roots or,
//! when [`ENV_REDIS_CA_FILE`] names a PEM bundle, against that bundle only (the LLM client keeps
//! the system roots). The connection's handshake is AUTH (from the URL's user and password) and
//! SELECT for a database other than 0, nothing else: `CLIENT SETINFO` is not sent, so the Redis
//! ACL users of `deploy/helm/agentq/files/redis-users.acl` need no CLIENT permission for it (and
//! they stay valid on Redis 7.0, which has no such subcommand).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Value};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

/// Longest a command may wait for its reply before it fails (and the caller answers 503 or retries).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `AGENTQ_REDIS_CA_FILE`: a PEM file of the CA certificates a `rediss://` server's certificate
/// must chain to, instead of the system roots (a private CA, mounted from a Secret by the chart).
pub const ENV_REDIS_CA_FILE: &str = "AGENTQ_REDIS_CA_FILE";

/// Where Redis is: one server (`REDIS_URL`), or a Redis Cluster (or Valkey cluster) reached
/// through its seed nodes (`REDIS_CLUSTER_NODES`; the client learns the rest from them).
#[derive(Clone, Debug)]
pub enum RedisTarget {
    Single(SecretString),
    Cluster(Vec<SecretString>),
}

/// A connection to the single server or to the cluster; cheap to clone (both are handles to a
/// multiplexed connection), and usable wherever the `redis` crate takes an async connection.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection, std::sync::Arc<Watch>),
}

/// Whether a cluster connection still answers. redis-rs's cluster connection can wedge: in a
/// seeded chaos run (cluster mode, Redis SIGKILLed, restarted and SIGSTOPped in a row) its
/// recovery began reconnecting just as Redis was thawed and never finished, and from then on
/// every command of the api waited until the caller's deadline, for minutes, while a second
/// connection of the same process recovered. So every command on it is watched: a command issued
/// while no reply has come back since starts the clock, any reply (an answer or a Redis error;
/// not a timeout) stops it, and [`Redis::conn`] replaces a connection whose clock has run past
/// `wedge_after` with a fresh one from the same client. Commands already waiting on the old one
/// end at their own deadlines.
pub struct Watch {
    base: std::time::Instant,
    /// Milliseconds since `base`, plus 1, of the first command issued after the last reply; 0
    /// while nothing waits unanswered.
    waiting_since: std::sync::atomic::AtomicU64,
    wedge_after: Duration,
}

impl Watch {
    fn new(wedge_after: Duration) -> Self {
        Self {
            base: std::time::Instant::now(),
            waiting_since: std::sync::atomic::AtomicU64::new(0),
            wedge_after,
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_millis() as u64 + 1
    }

    fn issued(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self
            .waiting_since
            .compare_exchange(0, self.now(), Relaxed, Relaxed);
    }

    fn settled<T>(&self, result: &RedisResult<T>) {
        if !matches!(result, Err(e) if e.is_timeout()) {
            self.waiting_since
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// True when a command has waited `wedge_after` with no reply on the connection since.
    pub fn wedged(&self) -> bool {
        let since = self
            .waiting_since
            .load(std::sync::atomic::Ordering::Relaxed);
        let limit = u64::try_from(self.wedge_after.as_millis()).unwrap_or(u64::MAX);
        since != 0 && self.now().saturating_sub(since) > limit
    }

    /// Restarts the clock (a replacement could not connect: the old connection gets another
    /// `wedge_after` to answer before the next try).
    fn rearm(&self) {
        self.waiting_since
            .store(self.now(), std::sync::atomic::Ordering::Relaxed);
    }

    async fn watch<T>(
        &self,
        fut: impl std::future::Future<Output = RedisResult<T>>,
    ) -> RedisResult<T> {
        self.issued();
        let result = fut.await;
        self.settled(&result);
        result
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, w) => Box::pin(w.watch(c.req_packed_command(cmd))),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c, w) if !cmd.is_transaction() && spans_slots(cmd) => {
                // A plain pipeline only batches round trips; the cluster client refuses one whose
                // keys are in several slots, so its commands go one by one, all at once, each to
                // its own node, and the replies come back in order as the pipeline's would.
                let c = c.clone();
                let w = w.clone();
                Box::pin(async move {
                    let replies = futures::future::try_join_all(cmd.cmd_iter().map(|one| {
                        let mut c = c.clone();
                        let w = w.clone();
                        async move { w.watch(c.req_packed_command(one)).await }
                    }))
                    .await?;
                    Ok(replies.into_iter().skip(offset).take(count).collect())
                })
            }
            Conn::Cluster(c, w) => Box::pin(w.watch(c.req_packed_commands(cmd, offset, count))),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c, _) => c.get_db(),
        }
    }
}

/// True when a pipeline's commands name keys of more than one slot. The key is where our
/// pipelines put it: the first argument, or EVALSHA/EVAL's first key; commands without a key
/// (PING, TIME, SCRIPT, ...) go anywhere and do not count.
fn spans_slots(pipe: &Pipeline) -> bool {
    use redis::cluster_routing::{Route, SlotAddr};
    let mut first = None;
    for cmd in pipe.cmd_iter() {
        let args: Vec<&[u8]> = cmd
            .args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(b),
                _ => None,
            })
            .collect();
        let Some(name) = args.first() else { continue };
        let key = match name.to_ascii_uppercase().as_slice() {
            b"PING" | b"TIME" | b"SCRIPT" | b"CLIENT" | b"INFO" | b"CONFIG" | b"WAIT"
            | b"MULTI" | b"EXEC" | b"CLUSTER" | b"ECHO" => None,
            b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" => {
                let keys = std::str::from_utf8(args.get(2).copied().unwrap_or_default())
                    .ok()
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0);
                if keys > 0 {
                    args.get(3).copied()
                } else {
                    None
                }
            }
            _ => args.get(1).copied(),
        };
        let Some(key) = key else { continue };
        let route = Route::with_key(key, SlotAddr::Master);
        match first {
            None => first = Some(route),
            Some(r) if r != route => return true,
            Some(_) => {}
        }
    }
    false
}

impl Conn {
    /// Sends `cmd`, which names no key of its own (SCAN), to the node holding `key`'s slot; with
    /// one server, to it. In a cluster a keyless command would go to any node, and a SCAN there
    /// would see only that node's keys.
    pub async fn query_at<T: redis::FromRedisValue>(
        &mut self,
        cmd: &Cmd,
        key: &str,
    ) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c, w) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                Ok(redis::from_redis_value(
                    w.watch(c.route_command(cmd.clone(), route)).await?,
                )?)
            }
        }
    }

    /// `WAIT replicas timeout` on the connection that carried this client's writes to the node
    /// holding `key` (in a cluster, the master of its slot): how many replicas acknowledged every
    /// write sent on it so far. WAIT counts the writes of its own connection only, which is why it
    /// must ride the same multiplexed connection as the write it vouches for.
    pub async fn wait_replicas(
        &mut self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> RedisResult<u32> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout.as_millis() as u64);
        let acked: i64 = match self {
            Conn::Single(c) => cmd.query_async(c).await?,
            Conn::Cluster(c, w) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                // the crate would send WAIT to every master and keep the least: ask only the
                // master that took the write
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                redis::from_redis_value(w.watch(c.route_command(cmd, route)).await?)?
            }
        };
        Ok(u32::try_from(acked).unwrap_or(0))
    }
}

#[derive(Clone)]
pub struct Redis {
    inner: std::sync::Arc<Inner>,
}

enum Inner {
    Single {
        client: redis::Client,
        config: ConnectionManagerConfig,
        conn: OnceCell<ConnectionManager>,
    },
    Cluster {
        client: ClusterClient,
        /// The connection and its watch; replaced when it wedges (see [`Watch`]).
        conn: std::sync::Mutex<Option<(ClusterConnection, std::sync::Arc<Watch>)>>,
        /// One (re)connect at a time.
        connecting: tokio::sync::Mutex<()>,
        /// How long a command may wait with no reply on the connection before it is replaced.
        wedge_after: Duration,
        /// The seeds, for pub/sub (see [`Redis::pubsub`]).
        seeds: Vec<SecretString>,
    },
}

impl Redis {
    /// One server at `url`.
    pub fn open(url: &SecretString) -> RedisResult<Self> {
        Self::with_response_timeout(url, Some(RESPONSE_TIMEOUT))
    }

    /// A connection for blocking commands (BLMOVE): its reply may legitimately take `timeout`.
    pub fn with_response_timeout(
        url: &SecretString,
        timeout: Option<Duration>,
    ) -> RedisResult<Self> {
        Self::connect(&RedisTarget::Single(url.clone()), timeout)
    }

    /// The single server or the cluster of `target`, with the usual response timeout.
    pub fn open_target(target: &RedisTarget) -> RedisResult<Self> {
        Self::connect(target, Some(RESPONSE_TIMEOUT))
    }

    /// The single server or the cluster of `target`; a reply may take `timeout` (None: no limit).
    pub fn connect(target: &RedisTarget, timeout: Option<Duration>) -> RedisResult<Self> {
        let inner = match target {
            RedisTarget::Single(url) => {
                let client = client(url)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(timeout)
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(2));
                Inner::Single {
                    client,
                    config,
                    conn: OnceCell::new(),
                }
            }
            RedisTarget::Cluster(seeds) => Inner::Cluster {
                client: cluster_client(seeds, timeout)?,
                conn: std::sync::Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                // twice the longest a reply may take (the crate's overall response timeout): a
                // healthy connection answers something within that, even a blocking command
                wedge_after: timeout.map_or(Duration::MAX, |t| (t + RESPONSE_TIMEOUT) * 2),
                seeds: seeds.clone(),
            },
        };
        Ok(Self {
            inner: std::sync::Arc::new(inner),
        })
    }

    /// True in cluster mode.
    pub fn is_cluster(&self) -> bool {
        matches!(*self.inner, Inner::Cluster { .. })
    }

    /// The shared connection, connecting on first use. Cloning it is cheap.
    pub async fn conn(&self) -> RedisResult<Conn> {
        match &*self.inner {
            Inner::Single {
                client,
                config,
                conn,
            } => conn
                .get_or_try_init(|| {
                    ConnectionManager::new_with_config(client.clone(), config.clone())
                })
                .await
                .cloned()
                .map(Conn::Single),
            Inner::Cluster {
                client,
                conn,
                connecting,
                wedge_after,
                ..
            } => {
                let current = || lock(conn).clone();
                if let Some((c, w)) = current().filter(|(_, w)| !w.wedged()) {
                    return Ok(Conn::Cluster(c, w));
                }
                let _one = connecting.lock().await;
                let old = current();
                if let Some((c, w)) = old.clone().filter(|(_, w)| !w.wedged()) {
                    return Ok(Conn::Cluster(c, w));
                }
                // connecting reads the slot map from a seed; bounded like a single connection
                match bounded(client.get_async_connection(), "cluster connection").await {
                    Ok(c) => {
                        if old.is_some() {
                            tracing::warn!(
                                wedge_after_s = wedge_after.as_secs(),
                                "redis cluster connection gave no reply: replaced with a new one"
                            );
                        }
                        let w = std::sync::Arc::new(Watch::new(*wedge_after));
                        *lock(conn) = Some((c.clone(), w.clone()));
                        Ok(Conn::Cluster(c, w))
                    }
                    Err(e) => match old {
                        // the old one may still come back: it gets another while
                        Some((c, w)) => {
                            w.rearm();
                            Ok(Conn::Cluster(c, w))
                        }
                        None => Err(e),
                    },
                }
            }
        }
    }

    /// A pub/sub connection of its own, from the same client (same URL, credentials and TLS):
    /// SUBSCRIBE takes a connection over, so the shared one cannot carry it. It does not
    /// reconnect by itself: its message stream ends when the connection drops, and the caller
    /// subscribes again. Connecting (with the handshake) is bounded like every other connection.
    /// In cluster mode it is a plain connection to the first seed that answers: a cluster
    /// delivers every PUBLISH to subscribers on all its nodes, so any node will do, and when that
    /// one is lost the caller's next subscribe moves on to another.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match &*self.inner {
            Inner::Single { client, .. } => bounded_pubsub(client).await,
            Inner::Cluster { seeds, .. } => {
                let mut last = None;
                for url in seeds.iter() {
                    match client(url) {
                        Ok(c) => match bounded_pubsub(&c).await {
                            Ok(ps) => return Ok(ps),
                            Err(e) => last = Some(e),
                        },
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "no cluster seed to subscribe on",
                    ))
                }))
            }
        }
    }

    /// True when Redis answers a PING.
    pub async fn ping(&self) -> bool {
        let Ok(mut conn) = self.conn().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }
}

/// The slot's lock; a panic while it was held cannot leave its `Option` half-written.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A pub/sub connection from `client`, connecting within the usual bounds.
async fn bounded_pubsub(client: &redis::Client) -> RedisResult<redis::aio::PubSub> {
    bounded(client.get_async_pubsub(), "pub/sub connection").await
}

/// `connect` (a connection being made, with its handshake), given up after the connect and reply
/// timeouts: a Redis that accepts and never answers must not hold a caller forever.
async fn bounded<T>(
    connect: impl std::future::Future<Output = RedisResult<T>>,
    what: &'static str,
) -> RedisResult<T> {
    match tokio::time::timeout(CONNECT_TIMEOUT + RESPONSE_TIMEOUT, connect).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "connecting timed out",
            what.to_owned(),
        ))),
    }
}

/// The PEM bundle `AGENTQ_REDIS_CA_FILE` names, for a TLS connection (`None`: the system roots,
/// also for a `redis://` URL, which ignores it).
fn ca_bundle(tls: bool) -> RedisResult<Option<Vec<u8>>> {
    let Some(path) = std::env::var_os(ENV_REDIS_CA_FILE).filter(|p| tls && !p.is_empty()) else {
        return Ok(None);
    };
    std::fs::read(&path).map(Some).map_err(|e| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "cannot read the CA bundle named by AGENTQ_REDIS_CA_FILE",
            format!("{}: {e}", path.to_string_lossy()),
        ))
    })
}

/// The client for `url`: without `CLIENT SETINFO` in its handshake, and with the CA bundle of
/// [`ENV_REDIS_CA_FILE`] as its only roots when that is set (a `redis://` URL ignores it).
fn client(url: &SecretString) -> RedisResult<redis::Client> {
    let info = url.expose_secret().into_connection_info()?;
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    let info = info.set_redis_settings(settings);
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    match ca_bundle(tls)? {
        None => redis::Client::open(info),
        Some(root_cert) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        ),
    }
}

/// The cluster client for `seeds`: the same handshake rules and CA bundle as [`client`] (the
/// credentials and TLS mode come from the seeds, which must agree on them). It never retries a
/// command (see below); a command during a failover fails within the response timeout.
fn cluster_client(seeds: &[SecretString], timeout: Option<Duration>) -> RedisResult<ClusterClient> {
    let mut infos = Vec::with_capacity(seeds.len());
    let mut tls = false;
    for url in seeds {
        let info = url.expose_secret().into_connection_info()?;
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        tls |= matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        infos.push(info.set_redis_settings(settings));
    }
    // No retries: the client would resend a command whose connection dropped after sending it,
    // and a script that already ran (a fetch that started runs, a result) must not run twice;
    // the seeded chaos test in cluster mode caught a task called twice that way. A failed command
    // is the caller's to handle, as with one server (503, or the worker's own retry), and the
    // client still re-reads the slot map after MOVED or a lost node.
    let mut builder = ClusterClient::builder(infos)
        .connection_timeout(CONNECT_TIMEOUT)
        .retries(0);
    if let Some(t) = timeout {
        builder = builder
            .response_timeout(t)
            .overall_response_timeout(Some(t + RESPONSE_TIMEOUT));
    } else {
        builder = builder.overall_response_timeout(None);
    }
    if let Some(root_cert) = ca_bundle(tls)? {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        });
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::{spans_slots, Watch};
    use std::time::Duration;

    #[test]
    fn a_connection_is_wedged_only_while_a_command_waits_unanswered_too_long() {
        let w = Watch::new(Duration::from_millis(40));
        let timeout = || -> redis::RedisResult<()> {
            Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into())
        };
        assert!(!w.wedged(), "idle");
        std::thread::sleep(Duration::from_millis(60));
        assert!(!w.wedged(), "idle for long is not wedged");
        w.issued();
        assert!(!w.wedged());
        std::thread::sleep(Duration::from_millis(60));
        assert!(w.wedged(), "a command waited past the limit");
        w.settled(&Ok::<_, redis::RedisError>(()));
        assert!(!w.wedged(), "a reply came back");
        w.issued();
        std::thread::sleep(Duration::from_millis(25));
        // a later command does not restart the clock of the first one waiting
        w.issued();
        w.settled(&timeout());
        std::thread::sleep(Duration::from_millis(25));
        assert!(w.wedged(), "a timeout is no reply");
        w.rearm();
        assert!(!w.wedged(), "rearmed after a failed replacement");
        let redis_error: redis::RedisResult<()> = Err((
            redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
            "down",
        )
            .into());
        w.settled(&redis_error);
        w.issued();
        assert!(!w.wedged(), "an error from Redis is a reply");
        assert!(!Watch::new(Duration::MAX).wedged());
    }

    #[test]
    fn a_pipeline_spans_slots_only_when_its_keys_do() {
        let mut same = redis::pipe();
        same.hset("agentq:{q}:task:1", "a", 1)
            .zadd("agentq:{q}:recent", "1", 0)
            .cmd("PING")
            .cmd("EVALSHA")
            .arg("abc")
            .arg(1)
            .arg("agentq:{q}:pending");
        assert!(!spans_slots(&same));

        let mut two = redis::pipe();
        two.hset("agentq:{q}:task:1", "a", 1)
            .incr("agentq:files:bytes", 1);
        assert!(spans_slots(&two));

        let mut script = redis::pipe();
        script
            .get("agentq:{a}:x")
            .cmd("EVALSHA")
            .arg("abc")
            .arg(1)
            .arg("agentq:{b}:y");
        assert!(spans_slots(&script));

        // a script without keys goes anywhere
        let mut keyless = redis::pipe();
        keyless.get("agentq:{a}:x").cmd("EVALSHA").arg("abc").arg(0);
        assert!(!spans_slots(&keyless));
    }
}
