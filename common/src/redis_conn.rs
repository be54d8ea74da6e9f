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
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
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
            Conn::Cluster(c) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                // the crate would send WAIT to every master and keep the least: ask only the
                // master that took the write
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::with_key(key, SlotAddr::Master),
                ));
                redis::from_redis_value(c.route_command(cmd, route).await?)?
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
        conn: OnceCell<ClusterConnection>,
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
                conn: OnceCell::new(),
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
            Inner::Cluster { client, conn } => {
                // connecting reads the slot map from a seed; bounded like a single connection
                let connect = async {
                    match tokio::time::timeout(
                        CONNECT_TIMEOUT + RESPONSE_TIMEOUT,
                        client.get_async_connection(),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "cluster connection timed out",
                        )
                        .into()),
                    }
                };
                conn.get_or_try_init(|| connect)
                    .await
                    .cloned()
                    .map(Conn::Cluster)
            }
        }
    }

    /// A pub/sub connection of its own, from the same client (same URL, credentials and TLS):
    /// SUBSCRIBE takes a connection over, so the shared one cannot carry it. It does not
    /// reconnect by itself: its message stream ends when the connection drops, and the caller
    /// subscribes again. Connecting (with the handshake) is bounded like every other connection.
    /// Single-server mode only (nothing in agentq subscribes on a cluster).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let Inner::Single { client, .. } = &*self.inner else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "pub/sub is not offered in cluster mode",
            )));
        };
        match tokio::time::timeout(
            CONNECT_TIMEOUT + RESPONSE_TIMEOUT,
            client.get_async_pubsub(),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "pub/sub connection timed out",
            )
            .into()),
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

/// The client for `url`: without `CLIENT SETINFO` in its handshake, and with the CA bundle of
/// [`ENV_REDIS_CA_FILE`] as its only roots when that is set (a `redis://` URL ignores it).
fn client(url: &SecretString) -> RedisResult<redis::Client> {
    let info = url.expose_secret().into_connection_info()?;
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    let info = info.set_redis_settings(settings);
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    match std::env::var_os(ENV_REDIS_CA_FILE).filter(|p| tls && !p.is_empty()) {
        None => redis::Client::open(info),
        Some(path) => {
            let root_cert = std::fs::read(&path).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read the CA bundle named by AGENTQ_REDIS_CA_FILE",
                    format!("{}: {e}", path.to_string_lossy()),
                ))
            })?;
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )
        }
    }
}

/// The cluster client for `seeds`: the same handshake rules and CA bundle as [`client`] (the
/// credentials and TLS mode come from the seeds, which must agree on them). Retries are few and
/// bounded by the response timeout, so a command during a failover fails (503) within it instead
/// of queueing for long; the slot map is re-read on MOVED and on a lost node.
fn cluster_client(seeds: &[SecretString], timeout: Option<Duration>) -> RedisResult<ClusterClient> {
    let mut infos = Vec::with_capacity(seeds.len());
    let mut tls = false;
    for url in seeds {
        let info = url.expose_secret().into_connection_info()?;
        let settings = info.redis_settings().clone().set_skip_set_lib_name();
        tls |= matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        infos.push(info.set_redis_settings(settings));
    }
    let mut builder = ClusterClient::builder(infos)
        .connection_timeout(CONNECT_TIMEOUT)
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(500);
    if let Some(t) = timeout {
        builder = builder
            .response_timeout(t)
            .overall_response_timeout(Some(t + RESPONSE_TIMEOUT));
    } else {
        builder = builder.overall_response_timeout(None);
    }
    if let Some(path) = std::env::var_os(ENV_REDIS_CA_FILE).filter(|p| tls && !p.is_empty()) {
        let root_cert = std::fs::read(&path).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read the CA bundle named by AGENTQ_REDIS_CA_FILE",
                format!("{}: {e}", path.to_string_lossy()),
            ))
        })?;
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root_cert),
        });
    }
    builder.build()
}
