//! `agentq-mock-llm` binary: runs the OpenAI-compatible mock chat-completions
//! server from `agentq_mock_llm` for load tests and local development.
//!
//! Configuration comes from environment variables, each overridable by a flag:
//! `MOCK_LLM_LISTEN` / `--listen` (default `127.0.0.1:8000`),
//! `MOCK_LLM_LATENCY_MS` / `--latency-ms` (default 0),
//! `MOCK_LLM_ERROR_RATE` / `--error-rate` (default 0),
//! `MOCK_LLM_API_KEY` / `--api-key` (unset: no auth),
//! `MOCK_LLM_RECORD` / `--record` (`1` to keep the last 1000 requests, served
//! at `/_mock/requests` and, with `Authorization` and `max_tokens`, at
//! `/_mock/request_records`),
//! `MOCK_LLM_RPM` (or `MOCK_RPM`) / `--rpm` and `MOCK_LLM_TPM` (or `MOCK_TPM`)
//! / `--tpm`: quota mode, requests and tokens per sliding minute (unset, empty
//! or 0: no limit; change at runtime with `POST /_mock/config`, watch with
//! `GET /_mock/quota`, start a 429 storm with `POST /_mock/block?ms=N`),
//! `MOCK_LLM_STREAM_RATE` (or `MOCK_STREAM_RATE`) / `--stream-rate`: content
//! chunks per second of streamed (`"stream": true`) answers (unset, empty or
//! 0: as fast as possible; change at runtime with `POST /_mock/config`
//! `{"stream_rate": N}`),
//! `MOCK_LLM_H2_MAX_STREAMS` / `--h2-max-streams`: the calls one HTTP/2
//! connection may carry at once (default 200). The port answers HTTP/1.1 and
//! HTTP/2 with prior knowledge (h2c) alike.
//! `MOCK_LLM_TLS_CERT` / `--tls-cert` and `MOCK_LLM_TLS_KEY` / `--tls-key`
//! (PEM files, both or neither): serve HTTPS instead, offering h2 and
//! http/1.1 in ALPN as hosted LLM APIs do.
//! Invalid configuration exits with code 64 (EX_USAGE).

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use agentq_mock_llm::{serve, MockConfig, MockLlm};
use tokio::net::TcpListener;

const EX_USAGE: u8 = 64;

const USAGE: &str = "usage: agentq-mock-llm [--listen ADDR] [--latency-ms MS] [--error-rate R] \
[--api-key KEY] [--record] [--rpm N] [--tpm N] [--stream-rate TOKENS_PER_S] [--h2-max-streams N] [--tls-cert PEM --tls-key PEM]
env: MOCK_LLM_LISTEN, MOCK_LLM_LATENCY_MS, MOCK_LLM_ERROR_RATE, MOCK_LLM_API_KEY, MOCK_LLM_RECORD,
MOCK_LLM_RPM (or MOCK_RPM), MOCK_LLM_TPM (or MOCK_TPM), MOCK_LLM_STREAM_RATE (or MOCK_STREAM_RATE),
MOCK_LLM_H2_MAX_STREAMS, MOCK_LLM_TLS_CERT, MOCK_LLM_TLS_KEY";

struct Settings {
    listen: SocketAddr,
    config: MockConfig,
}

fn main() -> ExitCode {
    let settings = match settings(std::env::args().skip(1)) {
        Ok(Some(s)) => s,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("agentq-mock-llm: {msg}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentq-mock-llm: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(settings))
}

async fn run(settings: Settings) -> ExitCode {
    let listener = match TcpListener::bind(settings.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("agentq-mock-llm: cannot listen on {}: {e}", settings.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("agentq-mock-llm: cannot read the bound address: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Registered before announcing readiness, so a supervisor that signals
    // right after reading the line still gets a graceful stop.
    let shutdown = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("agentq-mock-llm: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    // Scripts wait for this line; a failed write only means nobody listens.
    let scheme = if settings.config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let _ = writeln!(stdout, "agentq-mock-llm listening on {scheme}://{addr}/v1");
    let _ = stdout.flush();
    drop(stdout);

    match serve(listener, MockLlm::new(settings.config), shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agentq-mock-llm: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// `Ok(None)` means `--help` was asked for.
fn settings(args: impl Iterator<Item = String>) -> Result<Option<Settings>, String> {
    let env = |name: &str| std::env::var(name).ok();
    let mut listen = env("MOCK_LLM_LISTEN").map(|v| ("MOCK_LLM_LISTEN", v));
    let mut latency = env("MOCK_LLM_LATENCY_MS").map(|v| ("MOCK_LLM_LATENCY_MS", v));
    let mut error_rate = env("MOCK_LLM_ERROR_RATE").map(|v| ("MOCK_LLM_ERROR_RATE", v));
    let mut api_key = env("MOCK_LLM_API_KEY");
    let mut record = env("MOCK_LLM_RECORD").map(|v| ("MOCK_LLM_RECORD", v));
    // The short names are the ones issue 12's spec gives; the MOCK_LLM_ ones
    // follow this binary's other variables and win when both are set.
    let either = |long: &'static str, short: &'static str| {
        env(long)
            .map(|v| (long, v))
            .or_else(|| env(short).map(|v| (short, v)))
    };
    let mut rpm = either("MOCK_LLM_RPM", "MOCK_RPM");
    let mut tpm = either("MOCK_LLM_TPM", "MOCK_TPM");
    let mut stream_rate = either("MOCK_LLM_STREAM_RATE", "MOCK_STREAM_RATE");
    let mut h2_streams = env("MOCK_LLM_H2_MAX_STREAMS").map(|v| ("MOCK_LLM_H2_MAX_STREAMS", v));
    let mut tls_cert = env("MOCK_LLM_TLS_CERT").filter(|v| !v.is_empty());
    let mut tls_key = env("MOCK_LLM_TLS_KEY").filter(|v| !v.is_empty());

    let mut args = args;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &'static str| {
            inline
                .clone()
                .or_else(|| args.next())
                .map(|v| (name, v))
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => listen = Some(value("--listen")?),
            "--latency-ms" => latency = Some(value("--latency-ms")?),
            "--error-rate" => error_rate = Some(value("--error-rate")?),
            "--api-key" => api_key = Some(value("--api-key")?.1),
            "--record" => record = Some(("--record", inline.unwrap_or_else(|| "1".into()))),
            "--rpm" => rpm = Some(value("--rpm")?),
            "--tpm" => tpm = Some(value("--tpm")?),
            "--stream-rate" => stream_rate = Some(value("--stream-rate")?),
            "--h2-max-streams" => h2_streams = Some(value("--h2-max-streams")?),
            "--tls-cert" => tls_cert = Some(value("--tls-cert")?.1),
            "--tls-key" => tls_key = Some(value("--tls-key")?.1),
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }

    let listen = match listen {
        None => SocketAddr::from(([127, 0, 0, 1], 8000)),
        Some((name, v)) => parse_listen(&v).ok_or_else(|| {
            format!("invalid {name}={v:?}: expected HOST:PORT, e.g. 127.0.0.1:8000")
        })?,
    };
    let latency = match latency {
        None => Duration::ZERO,
        Some((name, v)) => v.trim().parse().map(Duration::from_millis).map_err(|_| {
            format!("invalid {name}={v:?}: expected a non-negative integer of milliseconds")
        })?,
    };
    let error_rate = match error_rate {
        None => 0.0,
        Some((name, v)) => match v.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => r,
            _ => {
                return Err(format!(
                    "invalid {name}={v:?}: expected a number within 0.0..=1.0"
                ))
            }
        },
    };
    let record = match record {
        None => false,
        Some((name, v)) => match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "" | "0" | "false" | "no" | "off" => false,
            _ => return Err(format!("invalid {name}={v:?}: expected 1 or 0")),
        },
    };
    // Compose files often pass an empty variable to mean "unset".
    let api_key = api_key.filter(|k| !k.is_empty());
    let rpm = parse_limit(rpm)?;
    let tpm = parse_limit(tpm)?;
    // A rate limit like the quotas: empty or 0 means none, i.e. unpaced.
    let stream_rate = parse_limit(stream_rate)?.unwrap_or(0);
    let h2_max_streams = match h2_streams {
        None => 0,
        Some((name, v)) => match v.trim().parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                return Err(format!(
                    "invalid {name}={v:?}: expected an integer of at least 1"
                ))
            }
        },
    };

    let tls = match (tls_cert, tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(agentq_mock_llm::tls_config(
            std::path::Path::new(&cert),
            std::path::Path::new(&key),
        )?),
        _ => return Err(format!("--tls-cert and --tls-key go together\n{USAGE}")),
    };
    Ok(Some(Settings {
        listen,
        config: MockConfig {
            latency,
            error_rate,
            api_key,
            record,
            // The journal is read in-process (`MockLlm::journal`); the binary has no use for it.
            journal: false,
            rpm,
            tpm,
            stream_rate,
            h2_max_streams,
            tls,
        },
    }))
}

/// A per-minute limit: empty or 0 means none (compose files pass an empty
/// variable to mean "unset").
fn parse_limit(v: Option<(&'static str, String)>) -> Result<Option<u64>, String> {
    let Some((name, v)) = v else { return Ok(None) };
    if v.trim().is_empty() {
        return Ok(None);
    }
    match v.trim().parse::<u64>() {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(format!(
            "invalid {name}={v:?}: expected a non-negative integer (0: no limit)"
        )),
    }
}

fn parse_listen(v: &str) -> Option<SocketAddr> {
    let v = v.trim();
    v.parse()
        .ok()
        .or_else(|| v.to_socket_addrs().ok().and_then(|mut addrs| addrs.next()))
}
