//! The data plane seam: what the controller asks of a router, whichever router it is.
//!
//! Implementations: [`embedded`] (bluegreen's own router, in this process), [`haproxy`] (an
//! HAProxy driven through its runtime API) and [`nginx`] (an nginx whose servers file
//! bluegreen writes and reloads).

pub mod embedded;
pub mod haproxy;
pub mod nginx;

use std::net::SocketAddr;

use async_trait::async_trait;
use bluegreen_router::{Color, ColorSnapshot, Health, MirrorRule, RouterStatus, Split};

pub use embedded::EmbeddedRouter;

/// One upstream of a color as the router sees it.
#[derive(Clone, Debug)]
pub struct UpstreamHealth {
    pub addr: SocketAddr,
    pub health: Health,
    pub last_error: Option<String>,
}

impl UpstreamHealth {
    pub fn is_healthy(&self) -> bool {
        self.health == Health::Healthy
    }
}

/// How smoke tests reach a color that takes no traffic: the router's address and the
/// header (and secret) that route a request to a chosen color.
#[derive(Clone, Debug)]
pub struct PreviewRoute {
    /// Where our own requests reach the router (loopback for a wildcard listener).
    pub router: SocketAddr,
    pub tls: bool,
    /// The header naming the color; `None` when previews are disabled.
    pub header: Option<String>,
    /// The secret header and its value, when previews are locked.
    pub secret: Option<(String, String)>,
}

/// What the controller asks of a router. A refused change leaves the router as it was.
#[async_trait]
pub trait DataPlane: Send + Sync + 'static {
    /// The split in service now.
    fn split(&self) -> Split;

    /// Whether `split` could be applied now: refused when it would send traffic to a color
    /// with no healthy upstream (never blackhole).
    fn check_split(&self, split: Split) -> Result<(), String>;

    /// Applies `split`, checked again at the moment of the swap.
    async fn apply_split(&self, split: Split) -> Result<(), String>;

    /// Points `color` at `upstreams` (health-checked first); refused for a color that takes
    /// traffic when none of them is healthy.
    async fn set_upstreams(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String>;

    /// Whether `set_upstreams` would be accepted now (the new upstreams checked once), with
    /// nothing changed.
    async fn check_upstreams(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String>;

    /// Each upstream of `color` with its health.
    fn upstreams(&self, color: Color) -> Vec<UpstreamHealth>;

    fn healthy_count(&self, color: Color) -> usize {
        self.upstreams(color)
            .iter()
            .filter(|u| u.is_healthy())
            .count()
    }

    /// Both colors' cumulative counters (requests, errors, latency histogram) for analysis.
    fn counters(&self) -> [ColorSnapshot; 2];

    /// The route smoke tests take to a color.
    fn preview(&self) -> PreviewRoute;

    /// The router's own picture for `bluegreen status`.
    fn status(&self) -> RouterStatus;

    /// Prometheus exposition text of the router's metrics.
    fn prometheus(&self) -> String;

    /// Whether the router is shutting down (live views end their streams).
    fn is_stopping(&self) -> bool;

    /// Starts copying a share of the live color's requests to the other color (shadow
    /// traffic), or stops (`None`). Only a router the requests pass through can copy them.
    fn set_mirror(&self, rule: Option<MirrorRule>) -> Result<(), String> {
        match rule {
            None => Ok(()),
            Some(_) => Err(
                "mirror: shadow traffic needs bluegreen's own router (router.driver: embedded)"
                    .into(),
            ),
        }
    }
}

/// The per-color counters a driven router's answers gave, as bluegreen reads them (the
/// router's own exporter has everything else).
fn driven_prometheus(router: &str, counters: &[ColorSnapshot; 2]) -> String {
    let mut out = String::new();
    let requests = counters.each_ref().map(|c| c.requests);
    let errors = counters.each_ref().map(|c| c.responses_5xx);
    let metrics = [
        ("bluegreen_requests_total", "Answers", requests),
        ("bluegreen_responses_5xx_total", "5xx answers", errors),
    ];
    for (name, what, values) in metrics {
        out.push_str(&format!(
            "# HELP {name} {what} {router} gave per color (router.driver: {router}).\n# TYPE {name} counter\n"
        ));
        for color in Color::ALL {
            let value = values[color.index()];
            out.push_str(&format!("{name}{{color=\"{color}\"}} {value}\n"));
        }
    }
    out
}
