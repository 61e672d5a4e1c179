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

impl Memory {
    /// RSS the idle connections added, per connection.
    pub fn per_connection_kib(&self) -> f64 {
        self.idle_kib.saturating_sub(self.before_idle_kib) as f64
            / self.measured_connections.max(1) as f64
    }
}

/// One goal of the data plane and this run's figures for it.
pub struct Target {
    pub name: String,
    /// Per round (or one value).
    pub values: Vec<f64>,
    pub goal: f64,
    /// Met when the median is at least the goal (else: at most).
    pub at_least: bool,
    pub unit: &'static str,
}

impl Target {
    fn at_least(name: impl Into<String>, values: Vec<f64>) -> Target {
        Target {
            name: name.into(),
            values,
            goal: 1.0,
            at_least: true,
            unit: "",
        }
    }

    fn at_most(name: impl Into<String>, values: Vec<f64>, goal: f64, unit: &'static str) -> Target {
        Target {
            name: name.into(),
            values,
            goal,
            at_least: false,
            unit,
        }
    }

    pub fn met(&self) -> bool {
        let m = median(&self.values);
        if self.at_least {
            m >= self.goal
        } else {
            m <= self.goal
        }
    }

    fn goal_text(&self) -> String {
        let sign = if self.at_least { "≥" } else { "≤" };
        format!("{sign} {}{}", self.goal, self.unit)
    }

    fn figure_text(&self) -> String {
        if self.values.len() == 1 {
            format!("{:.2}{}", self.values[0], self.unit)
        } else {
            format!("{}{}", spread(&self.values, 2), self.unit)
        }
    }

    /// The median as a share of the goal, 1.0 or more when met.
    fn score(&self) -> f64 {
        let m = median(&self.values);
        match (self.at_least, self.goal == 0.0) {
            (true, _) => m / self.goal,
            (false, true) => f64::from(u8::from(m <= 0.0)),
            (false, false) if m <= 0.0 => 1.0,
            (false, false) => self.goal / m,
        }
    }
}

/// Every router's latency at one fixed rate.
pub struct FixedLevel {
    /// The rate as a share of nginx's median saturation rate.
    pub load: f64,
    pub rate: f64,
    pub rows: Vec<FixedRate>,
}

impl FixedLevel {
    pub fn table(&self) -> String {
        let nginx = self
            .rows
            .iter()
            .find(|f| f.kind == Kind::Nginx)
            .map(|f| f.p99_ms.clone())
            .unwrap_or_default();
        let mut out = String::from(
            "| target | p50 ms | p99 ms | p99.9 ms | p99 ÷ nginx | errors |\n|---|---|---|---|---|---|\n",
        );
        for f in &self.rows {
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

    fn p99(&self, kind: Kind) -> Vec<f64> {
        self.rows
            .iter()
            .find(|f| f.kind == kind)
            .map(|f| f.p99_ms.clone())
            .unwrap_or_default()
    }
}

pub struct Memory {
    pub kind: Kind,
    pub start_kib: u64,
    /// With the first half of the idle connections open.
    pub before_idle_kib: u64,
    pub idle_kib: u64,
    pub saturated_peak_kib: u64,
    pub idle_connections: usize,
    /// How many connections `idle_kib` has over `before_idle_kib`.
    pub measured_connections: usize,
}

#[derive(Default)]
pub struct Results {
    pub throughput: Vec<(Kind, Vec<WrkResult>)>,
    /// Latency at fixed rates, one level per share of nginx's saturation rate.
    pub fixed: Vec<FixedLevel>,
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
    /// A peer's HTTP/1.1 saturation rate, per round.
    pub fn requests_per_sec(&self, kind: Kind) -> Vec<f64> {
        column(&self.throughput, kind, |r| r.requests_per_sec)
    }

    pub fn throughput_table(&self) -> String {
        let nginx_rps = self.requests_per_sec(Kind::Nginx);
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
            "| router | RSS at start | RSS with idle keep-alive connections | per idle connection | peak RSS under saturation |\n|---|---|---|---|---|\n",
        );
        for m in &self.memory {
            let _ = writeln!(
                out,
                "| {} | {:.1} MiB | {:.1} MiB ({} connections) | {:.1} KiB | {:.1} MiB |",
                m.kind.name(),
                m.start_kib as f64 / 1024.0,
                m.idle_kib as f64 / 1024.0,
                m.idle_connections,
                m.per_connection_kib(),
                m.saturated_peak_kib as f64 / 1024.0
            );
        }
        out
    }

    /// The data plane's goals (issue 13), each with this run's figure and whether it is met.
    pub fn targets(&self) -> Vec<Target> {
        let rps = |kind| self.requests_per_sec(kind);
        let h2 = |kind| column(&self.h2, kind, |r| r.requests_per_sec);
        let bluegreen = rps(Kind::Bluegreen);
        let mut targets = vec![
            Target::at_least(
                "HTTP/1.1 req/s ÷ nginx",
                ratios(&bluegreen, &rps(Kind::Nginx)),
            ),
            Target::at_least(
                "HTTP/1.1 req/s ÷ HAProxy",
                ratios(&bluegreen, &rps(Kind::Haproxy)),
            ),
        ];
        for level in &self.fixed {
            targets.push(Target::at_most(
                format!(
                    "p99 at {:.0} % of nginx's rate ÷ nginx's",
                    level.load * 100.0
                ),
                ratios(&level.p99(Kind::Bluegreen), &level.p99(Kind::Nginx)),
                1.0,
                "",
            ));
        }
        if let Some(m) = self.memory.iter().find(|m| m.kind == Kind::Bluegreen) {
            targets.push(Target::at_most(
                "RSS per idle keep-alive connection",
                vec![m.per_connection_kib()],
                2.0,
                " KiB",
            ));
        }
        targets.push(Target::at_least(
            "HTTP/2 req/s ÷ HAProxy",
            ratios(&h2(Kind::Bluegreen), &h2(Kind::Haproxy)),
        ));
        for (what, rows) in [("switches", &self.switching), ("restarts", &self.restarts)] {
            if let Some((_, _, tally)) = rows.iter().find(|(k, _, _)| *k == Kind::Bluegreen) {
                targets.push(Target::at_most(
                    format!("failed requests over {what} under load"),
                    vec![(tally.errors + tally.non_2xx) as f64],
                    0.0,
                    "",
                ));
            }
        }
        targets
    }

    pub fn targets_table(&self) -> String {
        let mut out = String::from(
            "| target | goal | this run: median (min–max) | met |\n|---|---|---|---|\n",
        );
        for t in self.targets() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                t.name,
                t.goal_text(),
                t.figure_text(),
                if t.met() { "yes" } else { "**no**" }
            );
        }
        out
    }

    /// One bar per target: its median as a share of the goal, oriented so that 1.0 or more
    /// is met; zero-goals (failed requests) show 1.0 when met, 0 otherwise.
    pub fn plot_targets(&self, path: &Path) -> Result<(), String> {
        let targets = self.targets();
        let root =
            SVGBackend::new(path, (1000, 60 + 34 * targets.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let scores: Vec<f64> = targets.iter().map(Target::score).collect();
        let right = scores.iter().copied().fold(1.2, f64::max) * 1.1;
        let n = targets.len();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "bluegreen's figures as a share of each goal (≥ 1.0 met)",
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(330)
            .build_cartesian_2d(0.0..right, (0..n - 1).into_segmented())
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, score) in scores.iter().enumerate() {
            let color = if *score >= 1.0 {
                RGBColor(0, 150, 60)
            } else {
                RGBColor(200, 80, 30)
            };
            chart
                .draw_series(
                    Histogram::horizontal(&chart)
                        .style(color.filled())
                        .margin(6)
                        .data([(i, *score)]),
                )
                .map_err(|e| e.to_string())?;
        }
        chart
            .draw_series(LineSeries::new(
                [(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Last)],
                BLACK.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
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
    fn targets_are_judged_on_their_median_and_scored_against_their_goal() {
        let below = Target::at_least("r", vec![0.8, 0.9, 1.1]);
        assert!(!below.met());
        assert!((below.score() - 0.9).abs() < 1e-9);
        assert!(Target::at_least("r", vec![1.0, 1.2]).met());
        let memory = Target::at_most("m", vec![25.0], 2.0, " KiB");
        assert!(!memory.met());
        assert!((memory.score() - 0.08).abs() < 1e-9);
        assert_eq!(memory.figure_text(), "25.00 KiB");
        assert!(Target::at_most("f", vec![0.0], 0.0, "").met());
        assert_eq!(Target::at_most("f", vec![0.0], 0.0, "").score(), 1.0);
        assert_eq!(Target::at_most("f", vec![3.0], 0.0, "").score(), 0.0);
    }

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
