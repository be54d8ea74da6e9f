//! The Redis connection: one multiplexed, auto-reconnecting connection shared by every task
//! (and, for a subscriber, a pub/sub connection of its own: [`Redis::pubsub`]).
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
use redis::{IntoConnectionInfo, RedisResult};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

/// Longest a command may wait for its reply before it fails (and the caller answers 503 or retries).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `AGENTQ_REDIS_CA_FILE`: a PEM file of the CA certificates a `rediss://` server's certificate
/// must chain to, instead of the system roots (a private CA, mounted from a Secret by the chart).
pub const ENV_REDIS_CA_FILE: &str = "AGENTQ_REDIS_CA_FILE";

#[derive(Clone)]
pub struct Redis {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    config: ConnectionManagerConfig,
    conn: OnceCell<ConnectionManager>,
}

impl Redis {
    pub fn open(url: &SecretString) -> RedisResult<Self> {
        Self::with_response_timeout(url, Some(RESPONSE_TIMEOUT))
    }

    /// A connection for blocking commands (BLMOVE): its reply may legitimately take `timeout`.
    pub fn with_response_timeout(
        url: &SecretString,
        timeout: Option<Duration>,
    ) -> RedisResult<Self> {
        let client = client(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(timeout)
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        Ok(Self {
            inner: std::sync::Arc::new(Inner {
                client,
                config,
                conn: OnceCell::new(),
            }),
        })
    }

    /// The shared connection, connecting on first use. Cloning it is cheap.
    pub async fn conn(&self) -> RedisResult<ConnectionManager> {
        let inner = &self.inner;
        inner
            .conn
            .get_or_try_init(|| {
                ConnectionManager::new_with_config(inner.client.clone(), inner.config.clone())
            })
            .await
            .cloned()
    }

    /// A pub/sub connection of its own, from the same client (same URL, credentials and TLS):
    /// SUBSCRIBE takes a connection over, so the shared one cannot carry it. It does not
    /// reconnect by itself: its message stream ends when the connection drops, and the caller
    /// subscribes again. Connecting (with the handshake) is bounded like every other connection.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match tokio::time::timeout(
            CONNECT_TIMEOUT + RESPONSE_TIMEOUT,
            self.inner.client.get_async_pubsub(),
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
