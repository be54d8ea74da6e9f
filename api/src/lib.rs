//! agentq-api: a thin HTTP front to the queue.
//!
//! `POST /v1/tasks` validates a task and enqueues it with one Lua script; reads come straight
//! from Redis. The api holds no state of its own, so any number of replicas can run.
//! Failure policy: client mistakes get a 4xx naming the field and write nothing; Redis trouble
//! gets a 503 within a few seconds (never a 500 or a hang); nothing here retries on its own.

pub mod auth;
mod batch;
mod budgets;
mod bulk;
pub mod error;
mod events;
pub mod openai;
mod promote;
mod queues;
mod routes;
mod tasks;
mod tenants;
mod tools;
mod ui;
mod upstreams;
mod workflows;

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use agentq_common::config::ApiConfig;
use agentq_common::metrics::ApiMetrics;
use agentq_common::{Broker, Redis};
use tokio::net::TcpListener;

pub use routes::app;

/// Bodies above this size get a 413.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub broker: Broker,
    /// Reads the flow limiter's state for `GET /v1/upstreams`.
    pub limiter: agentq_common::flow::Limiter,
    /// Budgets and the usage report (`budgets.rs`).
    pub budgets: agentq_common::flow::Budgets,
    pub config: Arc<ApiConfig>,
    pub metrics: ApiMetrics,
    /// Declared queues this process has registered in Redis, so the registry write happens once
    /// per queue (only declared queues ever get here, so it stays small).
    pub known_queues: Arc<Mutex<HashSet<String>>>,
    /// `/openapi.json` with this deployment's declared queues, rendered once.
    pub openapi: axum::body::Bytes,
    /// The reader of live event streams (`events.rs`).
    pub hub: events::Hub,
    /// Tokens, blocked sources and the tenant cache (`auth.rs`, `tenants.rs`).
    pub auth: auth::AuthState,
    /// The group commit of single enqueues (`AGENTQ_ENQUEUE_GROUP_MAX`; `None` when 0).
    pub group: Option<agentq_common::queue::GroupCommit>,
}

impl AppState {
    /// Starts the event hub too (a tokio task), which ends with `stop`.
    pub fn new(
        config: ApiConfig,
        stop: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Self> {
        let redis = Redis::open_target(&config.common.redis_target())?;
        let limiter = agentq_common::flow::Limiter::new(redis.clone(), &config.common.key_prefix);
        let budgets = agentq_common::flow::Budgets::new(redis.clone(), &config.common.key_prefix);
        let mut broker = Broker::new(redis, config.common.key_prefix.clone());
        if let Some(wait) = config.enqueue_replicas {
            let writes = Redis::open_target(&config.common.redis_target())?;
            broker = broker.with_replica_wait(writes, wait);
        }
        let hub = events::Hub::start(
            &config.common.redis_target(),
            config.max_streams,
            config.stream_buffer,
            stop,
        )?;
        let metrics = ApiMetrics::new();
        let group = (config.enqueue_group_max > 0).then(|| {
            let sizes = metrics.enqueue_group.with_label_values(&["single"]);
            agentq_common::queue::GroupCommit::start(
                broker.clone(),
                agentq_common::queue::GroupConfig {
                    max_items: config.enqueue_group_max,
                    in_flight: config.enqueue_group_inflight,
                    ..Default::default()
                },
                config.common.result_ttl,
                Some(Arc::new(move |n: usize| sizes.observe(n as f64))),
            )
        });
        Ok(Self {
            hub,
            group,
            auth: auth::AuthState::default(),
            limiter,
            budgets,
            openapi: routes::openapi_for(&config.queues).into(),
            broker,
            config: Arc::new(config),
            metrics,
            known_queues: Arc::default(),
        })
    }
}

/// Every task has a small event stream, and Redis preallocates a stream's first node at
/// `stream-node-max-bytes` (4096 by default): a finished task's stream then takes ~4.7 KB instead
/// of ~1.1 KB at 512. Said once at start; a Redis that refuses CONFIG (managed services) is left
/// alone.
async fn check_stream_nodes(redis: Redis) {
    let Ok(mut conn) = redis.conn().await else {
        return;
    };
    let got: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("stream-node-max-bytes")
        .query_async(&mut conn)
        .await;
    match got.ok().and_then(|v| v.get(1).and_then(|n| n.parse::<u64>().ok())) {
        Some(n) if n > 1024 => tracing::warn!(
            stream_node_max_bytes = n,
            "Redis preallocates every task's event stream at stream-node-max-bytes: set it to 512 to keep a finished task's stream near 1 KB (README, \"Streaming\")"
        ),
        Some(_) => {}
        None => tracing::debug!("CONFIG GET stream-node-max-bytes not answered; not checked"),
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes in-flight requests.
pub async fn run(
    config: ApiConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Event streams never end on their own: they are closed when shutdown begins, so the
    // graceful shutdown below does not wait for them (clients resume on another replica).
    let streams = tokio_util::sync::CancellationToken::new();
    let state = AppState::new(config, streams.clone())?;
    tracing::info!(
        listen = %listener.local_addr()?,
        redis = %state.config.common.redis_display(),
        prefix = %state.config.common.key_prefix,
        "agentq-api serving"
    );
    if !state.config.common.redis_cluster_nodes.is_empty() {
        tracing::info!("cluster mode: REDIS_CLUSTER_NODES is set, so REDIS_URL is ignored");
    }
    if state.config.auth.enabled {
        tracing::info!(
            auth = "on",
            "every /v1 route needs a bearer token (AGENTQ_AUTH=on)"
        );
    } else {
        tracing::warn!(
            auth = "off",
            "AGENTQ_AUTH=off: the api is open to anyone who can reach it; use only on a trusted machine"
        );
    }
    // the tenants' weights and caps into every declared queue, once (tenants.rs)
    {
        let state = state.clone();
        tokio::spawn(async move {
            match tenants::sync_all(&state).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    tenants = n,
                    "tenant admission settings synced to the queues"
                ),
                Err(e) => tracing::warn!(error = %e, "tenant admission settings not synced"),
            }
        });
    }
    tokio::spawn(check_stream_nodes(state.broker.redis().clone()));
    let stop = tokio_util::sync::CancellationToken::new();
    let promoter = tokio::spawn(promote::run(state.clone(), stop.clone()));
    // Nagle off: an SSE event (and a chunked answer written in pieces) would otherwise wait for
    // the client's delayed ACK, ~40 ms on a kept-alive connection (loadtest/bench/README.md,
    // "front door")
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    // the peer address: failed authentications are counted per source (auth.rs)
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        streams.cancel();
    })
    .await?;
    stop.cancel();
    let _ = promoter.await;
    tracing::info!("agentq-api stopped");
    Ok(())
}
