//! The HTTP listener (`--http-addr`): `/metrics` (Prometheus), `/healthz`
//! and `/readyz` (`docs/metrics.md`).
//!
//! axum rather than bare hyper: three routes with correct 404/405/HEAD
//! handling come without hand-written request matching, on the hyper and
//! tokio the agent already runs.
//!
//! It serves from a thread of its own (a current-thread runtime): encoding
//! a large registry for a scrape never delays the ring-buffer loop, and a
//! loop stuck on a blocked stdout does not take `/healthz` down with it —
//! `/healthz` reports it instead.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;

use crate::sinks::metrics;

/// `/healthz` fails once the main loop has not turned for this long (it
/// turns every 50 ms; a blocked stdout or a stuck read stops it).
const LOOP_STALL_LIMIT: Duration = Duration::from_secs(10);

/// What the main loop tells the probes, shared with the HTTP thread.
pub struct Health {
    started: Instant,
    /// Milliseconds after `started` of the loop's last turn, plus one
    /// (0: the loop has not started yet).
    last_turn_ms: AtomicU64,
    ready: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// The main loop turned.
    pub fn beat(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_turn_ms
            .store(ms.saturating_add(1), Ordering::Relaxed);
    }

    /// Programs are attached and the first window was written.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Alive unless the loop started and then stopped turning (loading the
    /// programs before the loop may take a while: not a failure).
    fn live(&self) -> bool {
        match self.last_turn_ms.load(Ordering::Relaxed) {
            0 => true,
            turn => {
                let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                now.saturating_sub(turn - 1) < LOOP_STALL_LIMIT.as_millis() as u64
            }
        }
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.live()
    }
}

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    health: Arc<Health>,
}

/// Binds `addr` now (a taken port fails the start) and serves on a thread
/// of its own until the process exits. Returns the bound address.
pub fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    health: Arc<Health>,
) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--http-addr: listening on {addr}"))?;
    listener
        .set_nonblocking(true)
        .context("--http-addr: making the listener non-blocking")?;
    let bound = listener
        .local_addr()
        .context("--http-addr: bound address")?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Shared { registry, health });
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the HTTP runtime")
                .and_then(|runtime| {
                    runtime.block_on(async {
                        let listener = tokio::net::TcpListener::from_std(listener)
                            .context("registering the HTTP listener")?;
                        axum::serve(listener, app).await.context("serving HTTP")
                    })
                });
            if let Err(err) = result {
                tracing::error!("HTTP listener on {bound} stopped: {err:#}");
            }
        })
        .context("starting the HTTP thread")?;
    Ok(bound)
}

async fn metrics(State(shared): State<Shared>) -> Response {
    match metrics::encode(&shared.registry) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(err) => {
            tracing::warn!("encoding /metrics: {err}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn healthz(State(shared): State<Shared>) -> (StatusCode, &'static str) {
    if shared.health.live() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the event loop has stopped turning\n",
        )
    }
}

async fn readyz(State(shared): State<Shared>) -> (StatusCode, &'static str) {
    if shared.health.ready() {
        (StatusCode::OK, "ready\n")
    } else if shared.health.ready.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the event loop has stopped turning\n",
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: attaching programs or waiting for the first window\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_before_the_loop_starts_and_while_it_turns() {
        let health = Health::default();
        assert!(health.live() && !health.ready());
        health.beat();
        assert!(health.live() && !health.ready());
        health.set_ready();
        assert!(health.ready());
    }

    #[test]
    fn a_loop_that_stopped_turning_is_neither_live_nor_ready() {
        let health = Health {
            started: Instant::now() - LOOP_STALL_LIMIT * 2,
            ..Health::default()
        };
        // The last turn right at the start, long ago.
        health.last_turn_ms.store(1, Ordering::Relaxed);
        health.set_ready();
        assert!(!health.live() && !health.ready());
    }
}
