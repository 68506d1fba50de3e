//! The agent's HTTP endpoints: `/healthz` (the loop goes round),
//! `/readyz` (a policy this agent applied is enforced) for Kubernetes
//! probes, and `/metrics` for Prometheus.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use tokio::sync::watch;

use super::Status;

/// Serves the probes on `addr` until `shutdown` turns true. `hung` is how
/// long the loop may go without a round before the agent counts as hung.
pub async fn serve(
    addr: SocketAddr,
    status: Status,
    hung: Duration,
    pin_dir: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state((status, hung, pin_dir));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

type Shared = (Status, Duration, PathBuf);

async fn metrics(
    State((status, _, pin_dir)): State<Shared>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    // Map reads are quick system calls: no blocking thread needed.
    match status.metrics.render(&pin_dir) {
        Ok(text) => (StatusCode::OK, [("content-type", OPENMETRICS)], text),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("cannot read the counters: {e}\n"),
        ),
    }
}

async fn healthz(State((status, hung, _)): State<Shared>) -> (StatusCode, String) {
    let since = status.since_beat();
    if since > hung {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the agent's loop has not gone round for {since:?}\n"),
        );
    }
    let stale = match status.stale_since() {
        Some(t) => format!(
            "; the Kubernetes API has been unreachable since {} (the last good policy stays enforced)",
            humantime_utc(t)
        ),
        None => String::new(),
    };
    (StatusCode::OK, format!("ok{stale}\n"))
}

async fn readyz(State((status, _, _)): State<Shared>) -> (StatusCode, &'static str) {
    if status.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no policy applied yet\n",
        )
    }
}

/// Seconds since the epoch, as a log reader can compare.
fn humantime_utc(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{secs} (Unix time)")
}
