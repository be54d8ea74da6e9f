//! The Redis connection: one multiplexed, auto-reconnecting connection shared by every task
//! (and, for a subscriber, a pub/sub connection of its own: [`Redis::pubsub`]).
//!
//! Why not a pool: a multiplexed connection pipelines concurrent commands on one socket, which is
//! what a queue's many small scripts want, and deadpool-redis PINGs on every checkout, doubling the
//! round trips per enqueue. The connection is made lazily so a process starts, serves its probes
//! and reports not-ready while Redis is away, instead of crash-looping.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::RedisResult;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::OnceCell;

/// Longest a command may wait for its reply before it fails (and the caller answers 503 or retries).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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
        let client = redis::Client::open(url.expose_secret())?;
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
