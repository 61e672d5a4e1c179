//! Statistics, markdown tables and the SVG plot of a benchmark run.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::load::{Propagation, Tally};
use crate::peers::Kind;
use crate::tools::{H2Result, WrkResult};

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

pub fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// The value at quantile `q` of sorted samples.
pub fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index] as f64
}

/// `median (min–max)` with the given decimals.
pub fn spread(values: &[f64], decimals: usize) -> String {
    let (lo, hi) = min_max(values);
    format!(
        "{:.*} ({:.*}–{:.*})",
        decimals,
        median(values),
        decimals,
        lo,
        decimals,
        hi
    )
}

/// Per-round ratios of a peer's value to nginx's, paired within each round.
pub fn ratios(values: &[f64], nginx: &[f64]) -> Vec<f64> {
    values.iter().zip(nginx).map(|(v, n)| v / n).collect()
}

pub struct FixedRate {
    pub kind: Kind,
    pub p50_ms: Vec<f64>,
    pub p99_ms: Vec<f64>,
    pub p999_ms: Vec<f64>,
    pub errors: u64,
}

pub struct Memory {
    pub kind: Kind,
    pub start_kib: u64,
    pub idle_kib: u64,
    pub saturated_peak_kib: u64,
    pub idle_connections: usize,
}

#[derive(Default)]
pub struct Results {
    pub throughput: Vec<(Kind, Vec<WrkResult>)>,
    pub fixed_rate: f64,
    pub fixed: Vec<FixedRate>,
    pub h2: Vec<(Kind, Vec<H2Result>)>,
    pub memory: Vec<Memory>,
    pub switching: Vec<(Kind, usize, Tally)>,
    pub restarts: Vec<(Kind, usize, Tally)>,
    pub propagation: Vec<(Kind, Propagation)>,
}

fn column<T>(rows: &[(Kind, Vec<T>)], kind: Kind, f: impl Fn(&T) -> f64) -> Vec<f64> {
    rows.iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, v)| v.iter().map(f).collect())
        .unwrap_or_default()
}

impl Results {
    pub fn throughput_table(&self) -> String {
        let nginx_rps = column(&self.throughput, Kind::Nginx, |r| r.requests_per_sec);
        let nginx_p99 = column(&self.throughput, Kind::Nginx, |r| r.p99_ms);
        let mut out = String::from(
            "| target | req/s median (min–max) | p50 ms | p99 ms | req/s ÷ nginx | p99 ÷ nginx | non-2xx + socket errors |\n|---|---|---|---|---|---|---|\n",
        );
        for (kind, runs) in &self.throughput {
            let rps: Vec<f64> = runs.iter().map(|r| r.requests_per_sec).collect();
            let p50: Vec<f64> = runs.iter().map(|r| r.p50_ms).collect();
            let p99: Vec<f64> = runs.iter().map(|r| r.p99_ms).collect();
            let bad: u64 = runs.iter().map(|r| r.non_2xx + r.socket_errors).sum();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {bad} |",
                kind.name(),
                spread(&rps, 0),
                spread(&p50, 3),
                spread(&p99, 3),
                spread(&ratios(&rps, &nginx_rps), 2),
                spread(&ratios(&p99, &nginx_p99), 2),
            );
        }
        out
    }

    pub fn fixed_table(&self) -> String {
        let nginx = self
            .fixed
            .iter()
            .find(|f| f.kind == Kind::Nginx)
            .map(|f| f.p99_ms.clone())
            .unwrap_or_default();
        let mut out = String::from(
            "| target | p50 ms | p99 ms | p99.9 ms | p99 ÷ nginx | errors |\n|---|---|---|---|---|---|\n",
        );
        for f in &self.fixed {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                f.kind.name(),
                spread(&f.p50_ms, 3),
                spread(&f.p99_ms, 3),
                spread(&f.p999_ms, 3),
                spread(&ratios(&f.p99_ms, &nginx), 2),
                f.errors
            );
        }
        out
    }

    pub fn h2_table(&self) -> String {
        let nginx = column(&self.h2, Kind::Nginx, |r| r.requests_per_sec);
        let mut out = String::from(
            "| router | req/s median (min–max) | req/s ÷ nginx | failed |\n|---|---|---|---|\n",
        );
        for (kind, runs) in &self.h2 {
            let rps: Vec<f64> = runs.iter().map(|r| r.requests_per_sec).collect();
            let failed: u64 = runs.iter().map(|r| r.failed).sum();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {failed} |",
                kind.name(),
                spread(&rps, 0),
                spread(&ratios(&rps, &nginx), 2)
            );
        }
        out
    }

    pub fn memory_table(&self) -> String {
        let mut out = String::from(
            "| router | RSS at start | RSS with idle keep-alive connections | peak RSS under saturation |\n|---|---|---|---|\n",
        );
        for m in &self.memory {
            let _ = writeln!(
                out,
                "| {} | {:.1} MiB | {:.1} MiB ({} connections) | {:.1} MiB |",
                m.kind.name(),
                m.start_kib as f64 / 1024.0,
                m.idle_kib as f64 / 1024.0,
                m.idle_connections,
                m.saturated_peak_kib as f64 / 1024.0
            );
        }
        out
    }

    pub fn switching_table(&self) -> String {
        changes_table(&self.switching, "switches")
    }

    pub fn restarts_table(&self) -> String {
        changes_table(&self.restarts, "restarts")
    }

    pub fn propagation_table(&self) -> String {
        let mut out = String::from(
            "| router | switches | to first new-color response: median / p99 ms | to last old-color response (new requests): median / p99 ms | old-color responses to new requests |\n|---|---|---|---|---|\n",
        );
        for (kind, p) in &self.propagation {
            let p99 = |values: &[f64]| {
                let mut sorted: Vec<u64> = values.iter().map(|v| (v * 1000.0) as u64).collect();
                sorted.sort_unstable();
                quantile(&sorted, 0.99) / 1000.0
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} / {:.3} | {:.3} / {:.3} | {} |",
                kind.name(),
                p.first_new_ms.len(),
                median(&p.first_new_ms),
                p99(&p.first_new_ms),
                median(&p.last_old_ms),
                p99(&p.last_old_ms),
                p.stale_responses
            );
        }
        out
    }

    /// Bars of req/s and p99 per target (median, with min–max whiskers).
    pub fn plot(&self, path: &Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(500);
        let names: Vec<&str> = self.throughput.iter().map(|(k, _)| k.name()).collect();
        let rps: Vec<Vec<f64>> = self
            .throughput
            .iter()
            .map(|(_, r)| r.iter().map(|x| x.requests_per_sec).collect())
            .collect();
        let p99: Vec<Vec<f64>> = self
            .throughput
            .iter()
            .map(|(_, r)| r.iter().map(|x| x.p99_ms).collect())
            .collect();
        bars(
            &left,
            "requests/s at saturation (median, min–max)",
            &names,
            &rps,
        )?;
        bars(
            &right,
            "p99 latency at saturation, ms (median, min–max)",
            &names,
            &p99,
        )?;
        root.present().map_err(|e| e.to_string())
    }
}

fn bars(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    names: &[&str],
    values: &[Vec<f64>],
) -> Result<(), String> {
    let top = values.iter().map(|v| min_max(v).1).fold(0.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d((0..names.len() - 1).into_segmented(), 0.0..top.max(1.0))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_label_formatter(&|v| {
            if top > 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).map(|s| s.to_string()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [
        RGBColor(120, 120, 120),
        RGBColor(30, 110, 200),
        RGBColor(0, 150, 60),
        RGBColor(200, 80, 30),
    ];
    for (i, series) in values.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(
                Histogram::vertical(&chart)
                    .style(color.filled())
                    .margin(18)
                    .data([(i, median(series))]),
            )
            .map_err(|e| e.to_string())?;
        let (lo, hi) = min_max(series);
        chart
            .draw_series([ErrorBar::new_vertical(
                SegmentValue::CenterOf(i),
                lo,
                median(series),
                hi,
                BLACK.stroke_width(2),
                12,
            )])
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Requests through a router while it changed `what` (switches, restarts) that many times.
fn changes_table(rows: &[(Kind, usize, Tally)], what: &str) -> String {
    let mut out = format!(
        "| router | {what} | requests | failed (transport) | non-2xx | failed per 100 {what} | served blue / green |\n|---|---|---|---|---|---|---|\n"
    );
    for (kind, changes, t) in rows {
        let per_100 = (t.errors + t.non_2xx) as f64 * 100.0 / *changes as f64;
        let _ = writeln!(
            out,
            "| {} | {changes} | {} | {} | {} | {per_100:.1} | {} / {} |",
            kind.name(),
            t.total(),
            t.errors,
            t.non_2xx,
            t.blue,
            t.green
        );
    }
    for (kind, _, t) in rows {
        if let Some(first) = t.first_errors.first() {
            let _ = writeln!(
                out,
                "\nfirst {} error: `{}`",
                kind.name(),
                first.replace('`', "'")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let sorted: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&sorted, 0.99), 990.0);
        assert_eq!(quantile(&sorted, 0.5), 500.0);
        assert_eq!(spread(&[1.0, 2.0, 3.0], 1), "2.0 (1.0–3.0)");
    }
}
