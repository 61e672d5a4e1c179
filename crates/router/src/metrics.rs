//! Per-color counters and a latency histogram, read by `status`, Prometheus and (later) analysis.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::table::Color;

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
const BUCKETS_US: [u64; 16] = [
    250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000,
];

/// Everything counted for one color. Latency is measured to the upstream's response headers.
#[derive(Default)]
pub struct ColorMetrics {
    requests: AtomicU64,
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    status_classes: [AtomicU64; 5],
    upstream_errors: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Requests in flight plus open upgraded tunnels.
    open: AtomicI64,
}

impl ColorMetrics {
    pub fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_ended(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn response(&self, status: u16, latency: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.status_classes[class].fetch_add(1, Ordering::Relaxed);
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(BUCKETS_US.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn upstream_error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    pub fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self, color: Color, draining: usize) -> ColorSnapshot {
        let buckets: Vec<u64> = self
            .latency_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let status = |i: usize| self.status_classes[i].load(Ordering::Relaxed);
        ColorSnapshot {
            color,
            requests: self.requests.load(Ordering::Relaxed),
            responses_1xx: status(0),
            responses_2xx: status(1),
            responses_3xx: status(2),
            responses_4xx: status(3),
            responses_5xx: status(4),
            upstream_errors: self.upstream_errors.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed).max(0) as u64,
            draining: draining as u64,
            latency_p50_ms: quantile_ms(&buckets, 0.50),
            latency_p99_ms: quantile_ms(&buckets, 0.99),
            latency_sum_us: self.latency_sum_us.load(Ordering::Relaxed),
            latency_buckets: buckets,
        }
    }
}

/// Estimates a quantile as the upper bound of the bucket that holds it (`None` with no samples).
/// `buckets` are counts per bucket of [`latency_bucket_bounds_us`], then +Inf.
pub fn quantile_ms(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let bound = BUCKETS_US
                .get(i)
                .copied()
                .unwrap_or(BUCKETS_US[BUCKETS_US.len() - 1]);
            return Some(bound as f64 / 1000.0);
        }
    }
    None
}

/// A point-in-time copy of one color's numbers.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ColorSnapshot {
    pub color: Color,
    pub requests: u64,
    pub responses_1xx: u64,
    pub responses_2xx: u64,
    pub responses_3xx: u64,
    pub responses_4xx: u64,
    pub responses_5xx: u64,
    pub upstream_errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub open: u64,
    pub draining: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_sum_us: u64,
    /// Counts per bucket; bounds are [`latency_bucket_bounds_us`], then +Inf.
    pub latency_buckets: Vec<u64>,
}

impl ColorSnapshot {
    /// A color's counters before anything was counted.
    pub fn empty(color: Color) -> ColorSnapshot {
        ColorSnapshot {
            color,
            requests: 0,
            responses_1xx: 0,
            responses_2xx: 0,
            responses_3xx: 0,
            responses_4xx: 0,
            responses_5xx: 0,
            upstream_errors: 0,
            bytes_in: 0,
            bytes_out: 0,
            open: 0,
            draining: 0,
            latency_p50_ms: None,
            latency_p99_ms: None,
            latency_sum_us: 0,
            latency_buckets: vec![0; BUCKETS_US.len() + 1],
        }
    }
}

pub fn latency_bucket_bounds_us() -> &'static [u64] {
    &BUCKETS_US
}

/// The router's metrics: one set per color plus connection counters.
#[derive(Default)]
pub struct Metrics {
    colors: [ColorMetrics; 2],
    pub connections_open: AtomicI64,
    /// Keep-alive HTTP/1.1 connections waiting for their next request, holding no buffer.
    pub connections_parked: AtomicI64,
    pub connections_total: AtomicU64,
    pub connections_rejected: AtomicU64,
}

impl Metrics {
    pub fn color(&self, color: Color) -> &ColorMetrics {
        &self.colors[color.index()]
    }

    pub fn connections_open(&self) -> u64 {
        self.connections_open.load(Ordering::Relaxed).max(0) as u64
    }
}

/// Renders snapshots in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus(snapshots: &[ColorSnapshot], metrics: &Metrics) -> String {
    let mut out = String::with_capacity(4096);
    let counter =
        |out: &mut String, name: &str, help: &str, value: &dyn Fn(&ColorSnapshot) -> u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for s in snapshots {
                let _ = writeln!(out, "{name}{{color=\"{}\"}} {}", s.color, value(s));
            }
        };
    counter(
        &mut out,
        "bluegreen_requests_total",
        "Requests routed to the color.",
        &|s| s.requests,
    );
    counter(
        &mut out,
        "bluegreen_upstream_errors_total",
        "Requests that failed at the upstream (connect, reset, timeout).",
        &|s| s.upstream_errors,
    );
    counter(
        &mut out,
        "bluegreen_request_bytes_total",
        "Request body bytes sent to the color.",
        &|s| s.bytes_in,
    );
    counter(
        &mut out,
        "bluegreen_response_bytes_total",
        "Response body bytes received from the color.",
        &|s| s.bytes_out,
    );

    let _ = writeln!(
        out,
        "# HELP bluegreen_responses_total Responses by status class.\n# TYPE bluegreen_responses_total counter"
    );
    for s in snapshots {
        let classes = [
            s.responses_1xx,
            s.responses_2xx,
            s.responses_3xx,
            s.responses_4xx,
            s.responses_5xx,
        ];
        for (i, count) in classes.iter().enumerate() {
            let _ = writeln!(
                out,
                "bluegreen_responses_total{{color=\"{}\",class=\"{}xx\"}} {count}",
                s.color,
                i + 1
            );
        }
    }

    let _ = writeln!(
        out,
        "# HELP bluegreen_open Requests in flight and upgraded tunnels open.\n# TYPE bluegreen_open gauge"
    );
    for s in snapshots {
        let _ = writeln!(out, "bluegreen_open{{color=\"{}\"}} {}", s.color, s.open);
    }
    let _ = writeln!(
        out,
        "# HELP bluegreen_draining Requests and tunnels still open on a color that no longer takes traffic.\n# TYPE bluegreen_draining gauge"
    );
    for s in snapshots {
        let _ = writeln!(
            out,
            "bluegreen_draining{{color=\"{}\"}} {}",
            s.color, s.draining
        );
    }

    let _ = writeln!(
        out,
        "# HELP bluegreen_request_duration_seconds Time from request to upstream response headers.\n# TYPE bluegreen_request_duration_seconds histogram"
    );
    for s in snapshots {
        let mut cumulative = 0;
        for (i, count) in s.latency_buckets.iter().enumerate() {
            cumulative += count;
            let le = BUCKETS_US
                .get(i)
                .map(|us| format!("{}", *us as f64 / 1e6))
                .unwrap_or_else(|| "+Inf".to_string());
            let _ = writeln!(
                out,
                "bluegreen_request_duration_seconds_bucket{{color=\"{}\",le=\"{le}\"}} {cumulative}",
                s.color
            );
        }
        let _ = writeln!(
            out,
            "bluegreen_request_duration_seconds_sum{{color=\"{}\"}} {}",
            s.color,
            s.latency_sum_us as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "bluegreen_request_duration_seconds_count{{color=\"{}\"}} {cumulative}",
            s.color
        );
    }

    let gauge = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        &mut out,
        "bluegreen_connections_open",
        "gauge",
        "Client connections open.",
        metrics.connections_open(),
    );
    gauge(
        &mut out,
        "bluegreen_connections_parked",
        "gauge",
        "Keep-alive HTTP/1.1 client connections idle between requests, parked holding no buffer.",
        metrics.connections_parked.load(Ordering::Relaxed).max(0) as u64,
    );
    gauge(
        &mut out,
        "bluegreen_connections_total",
        "counter",
        "Client connections accepted.",
        metrics.connections_total.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "bluegreen_connections_rejected_total",
        "counter",
        "Client connections closed at once because the connection limit was reached.",
        metrics.connections_rejected.load(Ordering::Relaxed),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_bucket_bounds() {
        let m = ColorMetrics::default();
        for _ in 0..98 {
            m.response(200, Duration::from_micros(800));
        }
        m.response(500, Duration::from_millis(40));
        m.response(500, Duration::from_millis(40));
        let s = m.snapshot(Color::Blue, 0);
        assert_eq!(s.latency_p50_ms, Some(1.0));
        assert_eq!(s.latency_p99_ms, Some(50.0));
        assert_eq!(s.responses_2xx, 98);
        assert_eq!(s.responses_5xx, 2);
    }

    #[test]
    fn no_samples_no_quantile() {
        let s = ColorMetrics::default().snapshot(Color::Green, 0);
        assert_eq!(s.latency_p99_ms, None);
    }

    #[test]
    fn prometheus_text_has_every_family() {
        let metrics = Metrics::default();
        metrics.color(Color::Blue).request_started();
        metrics
            .color(Color::Blue)
            .response(200, Duration::from_millis(3));
        let snaps: Vec<_> = Color::ALL
            .iter()
            .map(|c| metrics.color(*c).snapshot(*c, 0))
            .collect();
        let text = render_prometheus(&snaps, &metrics);
        assert!(text.contains("bluegreen_requests_total{color=\"blue\"} 1"));
        assert!(text.contains("bluegreen_responses_total{color=\"blue\",class=\"2xx\"} 1"));
        assert!(
            text.contains(
                "bluegreen_request_duration_seconds_bucket{color=\"blue\",le=\"+Inf\"} 1"
            )
        );
        assert!(
            text.contains(
                "bluegreen_request_duration_seconds_bucket{color=\"blue\",le=\"0.005\"} 1"
            )
        );
        assert!(
            text.contains(
                "bluegreen_request_duration_seconds_bucket{color=\"blue\",le=\"0.0025\"} 0"
            )
        );
    }
}
