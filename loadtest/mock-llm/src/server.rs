//! Accept loop: hyper per connection, so `[[drop]]` can really close a
//! connection without a response, which `axum::serve` cannot do. Each
//! connection speaks HTTP/1.1, or HTTP/2 when it opens with the HTTP/2 preface
//! (h2c with prior knowledge, as a worker with `AGENTQ_LLM_HTTP=http2` sends):
//! one port for both, like vLLM behind Envoy. Under HTTP/2 `[[drop]]` resets
//! the call's stream (the connection carries other calls).

use std::future::Future;
use std::io;
use std::pin::pin;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::api::DropConnection;
use crate::{MockConfig, MockLlm};

/// After shutdown, in-flight requests get this long to finish; `[[hang]]`
/// requests would otherwise hold the process for an hour.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A TLS handshake that takes longer is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Backoff when `accept` fails for a reason that is not the peer's fault
/// (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// The error hyper gets from the service for `[[drop]]`: a service error makes
/// hyper close the connection without writing a response.
#[derive(Debug)]
struct DroppedByScript;

impl std::fmt::Display for DroppedByScript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by [[drop]] marker")
    }
}

impl std::error::Error for DroppedByScript {}

/// Binds nothing itself: serves on the given listener until `shutdown` resolves.
///
/// On shutdown it stops accepting, lets idle keep-alive connections close and
/// gives in-flight requests up to two seconds before cutting them off.
pub async fn serve(
    listener: TcpListener,
    mock: MockLlm,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let router = mock.router();
    let mut http = auto::Builder::new(TokioExecutor::new());
    // No header-read timeout: it needs a timer per request and would close
    // idle pooled connections under clients that expect them to stay open.
    http.http1().keep_alive(true).header_read_timeout(None);
    http.http2()
        .max_concurrent_streams(mock.h2_max_streams())
        .timer(hyper_util::rt::TokioTimer::new());

    let graceful = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut shutdown = pin!(shutdown);

    loop {
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) if is_per_connection_error(&e) => continue,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Best effort: without NODELAY small responses wait on Nagle, which
        // only costs latency, never correctness.
        let _ = stream.set_nodelay(true);
        mock.count_connection();
        let (mock, router, http) = (mock.clone(), router.clone(), http.clone());
        let (graceful, hard_stop) = (graceful.clone(), hard_stop.clone());
        tracker.spawn(async move {
            match mock.tls().cloned() {
                None => serve_connection(stream, mock, router, http, graceful, hard_stop).await,
                Some(tls) => {
                    // the handshake in the connection's own task, so a slow client never
                    // holds up the accept loop; a failed one just ends the connection
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                    else {
                        return;
                    };
                    serve_connection(stream, mock, router, http, graceful, hard_stop).await
                }
            }
        });
    }

    drop(listener);
    graceful.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        hard_stop.cancel();
        tracker.wait().await;
    }
    Ok(())
}

/// Convenience for tests: bind 127.0.0.1:0, spawn the server on the current
/// runtime, return (base_url like "http://127.0.0.1:PORT/v1", or https:// with
/// [`MockConfig::tls`], handle).
///
/// The server runs until the runtime shuts down.
pub async fn spawn(config: MockConfig) -> io::Result<(String, MockLlm)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mock = MockLlm::new(config);
    tokio::spawn(serve(listener, mock.clone(), std::future::pending()));
    Ok((format!("{scheme}://{addr}/v1"), mock))
}

fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn serve_connection<S>(
    stream: S,
    mock: MockLlm,
    router: Router,
    http: auto::Builder<TokioExecutor>,
    graceful: CancellationToken,
    hard_stop: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // counted as an HTTP/2 connection at its first HTTP/2 request
    let h2_seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let router = router.clone();
        if req.version() == hyper::Version::HTTP_2 {
            let first = !h2_seen.swap(true, std::sync::atomic::Ordering::Relaxed);
            mock.count_http2(first);
        }
        async move {
            let Ok(response) = router.oneshot(req).await;
            if response.extensions().get::<DropConnection>().is_some() {
                Err(DroppedByScript)
            } else {
                Ok(response)
            }
        }
    });
    let mut conn = pin!(http.serve_connection(TokioIo::new(stream), service));
    // Connection errors (peer resets, [[drop]]) need no reporting: the
    // connection is finished either way.
    tokio::select! {
        _ = conn.as_mut() => return,
        () = graceful.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        () = hard_stop.cancelled() => {}
    }
}
