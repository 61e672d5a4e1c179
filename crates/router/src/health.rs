//! Active health checks: an HTTP GET per upstream every interval, flipping state by thresholds.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::upstream::{Thresholds, Upstream};

#[derive(Clone, Debug, PartialEq)]
pub struct HealthSettings {
    /// Path requested on each upstream; a 2xx or 3xx answer is healthy.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl HealthSettings {
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            healthy: self.healthy_threshold,
            unhealthy: self.unhealthy_threshold,
        }
    }
}

/// One check on a fresh connection, so a check also proves the upstream still accepts them.
pub async fn check(upstream: &Upstream, settings: &HealthSettings) -> Result<(), String> {
    let attempt = async {
        let stream = TcpStream::connect(upstream.addr)
            .await
            .map_err(|e| format!("health check connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| format!("health check handshake: {e}"))?;
        let driver = tokio::spawn(connection);
        let request = Request::get(settings.path.as_str())
            .header(header::HOST, upstream.authority.as_str())
            .header(header::USER_AGENT, "bluegreen-health-check")
            .header(header::CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| format!("health check request: {e}"))?;
        let response = sender.send_request(request).await;
        driver.abort();
        let status = response
            .map_err(|e| format!("health check request: {e}"))?
            .status();
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(format!("health check {} answered {status}", settings.path))
        }
    };
    match tokio::time::timeout(settings.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "health check {} got no answer within {}ms",
            settings.path,
            settings.timeout.as_millis()
        )),
    }
}

/// Checks every upstream once, concurrently, so a fresh router knows where it can route.
pub async fn check_all_once(upstreams: &[Arc<Upstream>], settings: &HealthSettings) {
    let mut checks = JoinSet::new();
    for upstream in upstreams {
        let upstream = Arc::clone(upstream);
        let settings = settings.clone();
        checks.spawn(async move {
            let result = check(&upstream, &settings).await;
            upstream.record_check(result, settings.thresholds());
        });
    }
    while checks.join_next().await.is_some() {}
}

/// Keeps checking each upstream every interval until `stop` is cancelled or the upstream is
/// gone (removed from the table and no request holds it any more).
pub fn spawn_checks(
    tasks: &mut JoinSet<()>,
    upstreams: &[Arc<Upstream>],
    settings: &HealthSettings,
    stop: &CancellationToken,
) {
    for upstream in upstreams {
        let upstream = Arc::downgrade(upstream);
        let settings = settings.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let start = tokio::time::Instant::now() + settings.interval;
            let mut ticks = tokio::time::interval_at(start, settings.interval);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => {
                        let Some(upstream) = upstream.upgrade() else { return };
                        let result = check(&upstream, &settings).await;
                        upstream.record_check(result, settings.thresholds());
                    }
                }
            }
        });
    }
}
