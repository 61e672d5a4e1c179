//! What live views read: per-color numbers over a recent window, and how the colors differ.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use bluegreen_router::{Color, MirrorSnapshot};

use serde::Serialize;

use super::Controller;
use super::EnvironmentView;
use super::analysis::{MirrorVerdict, WindowStats};
use super::release::Release;

/// One way two colors differ: a key and each side's value.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Difference {
    pub key: String,
    /// The first color's value, then the second's (any JSON, `null` when unset).
    #[schema(value_type = Vec<serde_json::Value>, min_items = 2, max_items = 2)]
    pub values: [serde_json::Value; 2],
}

/// The numbers `bluegreen monitor` prints: each color over the last window, and the release.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MonitorView {
    pub window_seconds: f64,
    pub colors: Vec<MonitorColor>,
    pub release: Option<Release>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MonitorColor {
    pub color: Color,
    pub version: Option<String>,
    pub weight: u8,
    pub healthy_upstreams: usize,
    pub upstreams: usize,
    /// Each upstream and its health (`healthy`, `unhealthy`, `unknown`).
    #[schema(value_type = Vec<Vec<String>>, example = json!([["127.0.0.1:9001", "healthy"]]))]
    pub upstream_health: Vec<(SocketAddr, bluegreen_router::Health)>,
    pub window: WindowStats,
    /// Requests per second, one per second, oldest first.
    pub rps_history: Vec<f64>,
    /// p99 latency in milliseconds per second (0 for a second without requests), oldest first.
    pub p99_history: Vec<f64>,
}

/// Shadow traffic as `bluegreen diff --mirror` shows it: the last verdict and the router's
/// counters and first differing pairs.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MirrorView {
    /// The release whose mirror this is: the running one, else the last one.
    pub release: Option<i64>,
    /// That release's last judgement of the mirror.
    pub verdict: Option<MirrorVerdict>,
    pub router: MirrorSnapshot,
}

impl Controller {
    /// The running (else the last) release's mirror verdict, and the router's mirror.
    pub async fn mirror_view(&self) -> MirrorView {
        let release = match self.active_release() {
            Some(active) => Some(active),
            None => self
                .releases(1)
                .await
                .ok()
                .and_then(|r| r.into_iter().next()),
        };
        MirrorView {
            release: release.as_ref().map(|r| r.id),
            verdict: release.and_then(|r| r.mirror),
            router: self.plane.status().mirror,
        }
    }

    /// How two colors differ: what they run, and their effective specs (per-color overrides).
    pub fn diff(&self, a: Color, b: Color) -> Vec<Difference> {
        let view = |color: Color| {
            serde_json::to_value(EnvironmentView::new(
                self.environment(color),
                self.spec(color),
            ))
            .expect("views serialize")
        };
        let (left, right) = (view(a), view(b));
        let mut differences = Vec::new();
        let mut compare = |key: String, l: &serde_json::Value, r: &serde_json::Value| {
            if l != r {
                differences.push(Difference {
                    key,
                    values: [l.clone(), r.clone()],
                });
            }
        };
        for key in ["version", "status", "extra_env"] {
            compare(key.to_string(), &left[key], &right[key]);
        }
        for key in [
            "provider",
            "instances",
            "command",
            "env",
            "deploy",
            "stop",
            "ready_timeout",
            "stop_timeout",
        ] {
            compare(
                format!("spec.{key}"),
                &left["spec"][key],
                &right["spec"][key],
            );
        }
        // The process provider picks ports per deploy: only fixed upstreams are a difference.
        if self.provider(a).runs_elsewhere() {
            compare(
                "spec.upstreams".into(),
                &left["spec"]["upstreams"].as_array().map(|u| u.len()).into(),
                &right["spec"]["upstreams"]
                    .as_array()
                    .map(|u| u.len())
                    .into(),
            );
        }
        differences
    }

    /// Numbers for `bluegreen monitor`: the last `seconds` of each color and the release.
    pub fn monitor(&self, seconds: u64) -> MonitorView {
        let now = Instant::now();
        let current = self.snapshots();
        let split = self.plane.split();
        let (from_at, from) = self
            .snapshots_since(now - Duration::from_secs(seconds))
            .unwrap_or((now, current.clone()));
        let elapsed = now.duration_since(from_at);
        let history = self.history.lock().expect("lock");
        let colors = Color::ALL
            .into_iter()
            .map(|color| {
                let upstreams = self.plane.upstreams(color);
                let series = history.series(color, 60);
                MonitorColor {
                    color,
                    version: self.environment(color).version,
                    weight: split.weight(color),
                    healthy_upstreams: self.plane.healthy_count(color),
                    upstreams: upstreams.len(),
                    upstream_health: upstreams.iter().map(|u| (u.addr, u.health)).collect(),
                    window: WindowStats::between(
                        &from[color.index()],
                        &current[color.index()],
                        elapsed,
                    ),
                    rps_history: series.iter().map(|w| w.requests_per_second).collect(),
                    p99_history: series.iter().map(|w| w.p99_ms.unwrap_or(0.0)).collect(),
                }
            })
            .collect();
        MonitorView {
            window_seconds: elapsed.as_secs_f64(),
            colors,
            release: self.active_release(),
        }
    }
}
