//! Analysis: a window of the routers' counters per color — one router's, or a fleet's summed and router by router — judged against absolute and baseline-relative limits.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use bluegreen_router::metrics::quantile_ms;
use bluegreen_router::{Color, ColorSnapshot, MirrorSnapshot};
use serde::{Deserialize, Serialize};

use crate::config::controller::{AnalysisSpec, Limit};

/// One color's numbers over a window: the difference of two cumulative snapshots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WindowStats {
    pub color: Color,
    pub seconds: f64,
    pub requests: u64,
    pub errors: u64,
    pub error_rate_percent: f64,
    pub requests_per_second: f64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl WindowStats {
    pub fn between(from: &ColorSnapshot, to: &ColorSnapshot, elapsed: Duration) -> WindowStats {
        // Counters only grow; a smaller value means the sample is from before a restart.
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let buckets: Vec<u64> = to
            .latency_buckets
            .iter()
            .enumerate()
            .map(|(i, b)| d(from.latency_buckets.get(i).copied().unwrap_or(0), *b))
            .collect();
        let answered = d(from.responses_1xx, to.responses_1xx)
            + d(from.responses_2xx, to.responses_2xx)
            + d(from.responses_3xx, to.responses_3xx)
            + d(from.responses_4xx, to.responses_4xx)
            + d(from.responses_5xx, to.responses_5xx);
        let errors = d(from.responses_5xx, to.responses_5xx);
        let seconds = elapsed.as_secs_f64().max(0.001);
        WindowStats {
            color: to.color,
            seconds,
            requests: answered,
            errors,
            error_rate_percent: if answered == 0 {
                0.0
            } else {
                errors as f64 * 100.0 / answered as f64
            },
            requests_per_second: answered as f64 / seconds,
            p50_ms: quantile_ms(&buckets, 0.50),
            p95_ms: quantile_ms(&buckets, 0.95),
            p99_ms: quantile_ms(&buckets, 0.99),
        }
    }
}

/// A metric over its limit: what, how much, the limit, and against what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Breach {
    pub metric: String,
    pub value: f64,
    pub limit: f64,
    pub against: String,
}

impl std::fmt::Display for Breach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = if self.metric == "error_rate" || self.metric == "mirror_mismatch_rate" {
            "%"
        } else if self.metric == "throughput_ratio" {
            ""
        } else {
            "ms"
        };
        write!(
            f,
            "{} {:.2}{unit} over the limit {:.2}{unit} ({})",
            self.metric, self.value, self.limit, self.against
        )
    }
}

/// One judgement of the new color against the baseline color.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Verdict {
    pub new: WindowStats,
    pub baseline: Option<WindowStats>,
    /// False while the new color has fewer than `min_requests` in the window.
    pub judged: bool,
    pub breach: Option<Breach>,
    pub note: String,
}

/// Judges `new` against the limits; relative limits only when `baseline` has enough requests.
/// `weights` (new, baseline) let throughput be compared per percent of traffic.
pub fn judge(
    spec: &AnalysisSpec,
    new: WindowStats,
    baseline: Option<WindowStats>,
    weights: (u8, u8),
) -> Verdict {
    if new.requests < spec.min_requests {
        let note = format!(
            "waiting for data: {} has {} of the {} requests needed to judge (no traffic? `bluegreen promote` goes on without)",
            new.color, new.requests, spec.min_requests
        );
        return Verdict {
            new,
            baseline,
            judged: false,
            breach: None,
            note,
        };
    }
    let base = baseline
        .as_ref()
        .filter(|b| b.requests >= spec.min_requests);
    let mut breach = None;
    let mut check = |metric: &str, value: Option<f64>, limit: &Limit, base_value: Option<f64>| {
        let Some(value) = value else { return };
        if breach.is_some() {
            return;
        }
        if let Some(max) = limit.max
            && value > max
        {
            breach = Some(Breach {
                metric: metric.into(),
                value,
                limit: max,
                against: "absolute limit".into(),
            });
        } else if let (Some(increase), Some(base_value)) = (limit.max_increase, base_value)
            && value > base_value + increase
        {
            breach = Some(Breach {
                metric: metric.into(),
                value,
                limit: base_value + increase,
                against: format!(
                    "baseline {} {base_value:.2} + {increase:.2}",
                    base.map(|b| b.color.as_str()).unwrap_or("?")
                ),
            });
        }
    };
    check(
        "error_rate",
        Some(new.error_rate_percent),
        &spec.error_rate,
        base.map(|b| b.error_rate_percent),
    );
    check(
        "latency_p99",
        new.p99_ms,
        &spec.latency_p99,
        base.and_then(|b| b.p99_ms),
    );
    check(
        "latency_p95",
        new.p95_ms,
        &spec.latency_p95,
        base.and_then(|b| b.p95_ms),
    );
    check(
        "latency_p50",
        new.p50_ms,
        &spec.latency_p50,
        base.and_then(|b| b.p50_ms),
    );
    if breach.is_none()
        && let (Some(min_ratio), Some(base)) = (spec.min_throughput_ratio, base)
        && weights.0 > 0
        && weights.1 > 0
        && base.requests_per_second > 0.0
    {
        let per_percent_new = new.requests_per_second / weights.0 as f64;
        let per_percent_base = base.requests_per_second / weights.1 as f64;
        let ratio = per_percent_new / per_percent_base;
        if ratio < min_ratio {
            breach = Some(Breach {
                metric: "throughput_ratio".into(),
                value: ratio,
                limit: min_ratio,
                against: format!("{} per percent of traffic", base.color),
            });
        }
    }
    let note = match (&breach, base) {
        (Some(b), _) => format!("breach: {b}"),
        (None, Some(_)) => "healthy against absolute and baseline limits".into(),
        (None, None) => "healthy against absolute limits (no baseline traffic to compare)".into(),
    };
    Verdict {
        new,
        baseline,
        judged: true,
        breach,
        note,
    }
}

/// Shadow traffic over a window: the difference of two of the router's mirror snapshots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MirrorWindow {
    /// The color the copies went to.
    pub color: Color,
    pub seconds: f64,
    pub mirrored: u64,
    pub dropped: u64,
    pub skipped: u64,
    pub compared: u64,
    pub mismatched: u64,
    /// Copies the mirrored color did not answer; they count as mismatches.
    pub failed: u64,
    pub mismatch_rate_percent: f64,
    pub live_p99_ms: Option<f64>,
    pub mirror_p99_ms: Option<f64>,
}

impl MirrorWindow {
    pub fn between(
        color: Color,
        from: &MirrorSnapshot,
        to: &MirrorSnapshot,
        elapsed: Duration,
    ) -> MirrorWindow {
        let d = |a: u64, b: u64| b.saturating_sub(a);
        let buckets = |a: &[u64], b: &[u64]| -> Vec<u64> {
            b.iter()
                .enumerate()
                .map(|(i, n)| d(a.get(i).copied().unwrap_or(0), *n))
                .collect()
        };
        let compared = d(from.compared, to.compared);
        let mismatched = d(from.mismatched, to.mismatched);
        let failed = d(from.failed, to.failed);
        let judged = compared + failed;
        MirrorWindow {
            color,
            seconds: elapsed.as_secs_f64().max(0.001),
            mirrored: d(from.mirrored, to.mirrored),
            dropped: d(from.dropped, to.dropped),
            skipped: d(from.skipped, to.skipped),
            compared,
            mismatched,
            failed,
            mismatch_rate_percent: if judged == 0 {
                0.0
            } else {
                (mismatched + failed) as f64 * 100.0 / judged as f64
            },
            live_p99_ms: quantile_ms(
                &buckets(&from.live_latency_buckets, &to.live_latency_buckets),
                0.99,
            ),
            mirror_p99_ms: quantile_ms(
                &buckets(&from.mirror_latency_buckets, &to.mirror_latency_buckets),
                0.99,
            ),
        }
    }
}

/// One judgement of the mirrored color's answers against the live ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MirrorVerdict {
    pub window: MirrorWindow,
    /// False while fewer than `min_requests` pairs were compared.
    pub judged: bool,
    pub breach: Option<Breach>,
    pub note: String,
}

/// Judges shadow traffic: the share of copies answered differently, and the copies' p99
/// against the live answers' p99 of the same requests.
pub fn judge_mirror(spec: &AnalysisSpec, window: MirrorWindow) -> MirrorVerdict {
    let pairs = window.compared + window.failed;
    if pairs < spec.min_requests {
        let note = format!(
            "waiting for data: {} of the {} mirrored pairs needed to judge ({} copies dropped, {} skipped)",
            pairs, spec.min_requests, window.dropped, window.skipped
        );
        return MirrorVerdict {
            window,
            judged: false,
            breach: None,
            note,
        };
    }
    let mut breach = None;
    if let Some(max) = spec.mirror_mismatch_rate
        && window.mismatch_rate_percent > max
    {
        breach = Some(Breach {
            metric: "mirror_mismatch_rate".into(),
            value: window.mismatch_rate_percent,
            limit: max,
            against: format!(
                "{} of {pairs} mirrored answers differ",
                window.mismatched + window.failed
            ),
        });
    }
    let limit = &spec.mirror_latency_p99;
    if breach.is_none()
        && let Some(p99) = window.mirror_p99_ms
    {
        if let Some(max) = limit.max
            && p99 > max
        {
            breach = Some(Breach {
                metric: "mirror_latency_p99".into(),
                value: p99,
                limit: max,
                against: "absolute limit".into(),
            });
        } else if let (Some(increase), Some(live)) = (limit.max_increase, window.live_p99_ms)
            && p99 > live + increase
        {
            breach = Some(Breach {
                metric: "mirror_latency_p99".into(),
                value: p99,
                limit: live + increase,
                against: format!("the live answers' p99 {live:.2} + {increase:.2}"),
            });
        }
    }
    let note = match &breach {
        Some(b) => format!("breach: {b}"),
        None => format!(
            "{} of {pairs} mirrored answers differ ({:.2}%), within the limits",
            window.mismatched + window.failed,
            window.mismatch_rate_percent
        ),
    };
    MirrorVerdict {
        window,
        judged: true,
        breach,
        note,
    }
}

/// Each router's cumulative counters of both colors, by router id.
pub type CountersByRouter = BTreeMap<String, [ColorSnapshot; 2]>;

/// The windows between two samples of every router's counters: both colors summed over the
/// routers present in both samples, and each such router's own.
pub fn fleet_windows(
    from: &CountersByRouter,
    now: &CountersByRouter,
    elapsed: Duration,
) -> ([WindowStats; 2], Vec<(String, [WindowStats; 2])>) {
    let both: Vec<(&String, &[ColorSnapshot; 2], &[ColorSnapshot; 2])> = now
        .iter()
        .filter_map(|(id, now)| Some((id, from.get(id)?, now)))
        .collect();
    let total = Color::ALL.map(|color| {
        let i = color.index();
        WindowStats::between(
            &sum(color, both.iter().map(|(_, from, _)| &from[i])),
            &sum(color, both.iter().map(|(_, _, now)| &now[i])),
            elapsed,
        )
    });
    let routers = both
        .iter()
        .map(|(id, from, now)| {
            let windows = Color::ALL.map(|color| {
                WindowStats::between(&from[color.index()], &now[color.index()], elapsed)
            });
            (id.to_string(), windows)
        })
        .collect();
    (total, routers)
}

/// One color's counters added up over routers (the percentiles, which do not add, left out:
/// windows compute theirs from the summed histogram).
fn sum<'a>(color: Color, snapshots: impl Iterator<Item = &'a ColorSnapshot>) -> ColorSnapshot {
    let mut total = ColorSnapshot::empty(color);
    for s in snapshots {
        total.requests += s.requests;
        total.responses_1xx += s.responses_1xx;
        total.responses_2xx += s.responses_2xx;
        total.responses_3xx += s.responses_3xx;
        total.responses_4xx += s.responses_4xx;
        total.responses_5xx += s.responses_5xx;
        total.upstream_errors += s.upstream_errors;
        total.bytes_in += s.bytes_in;
        total.bytes_out += s.bytes_out;
        total.open += s.open;
        total.draining += s.draining;
        total.latency_sum_us += s.latency_sum_us;
        if total.latency_buckets.len() < s.latency_buckets.len() {
            total.latency_buckets.resize(s.latency_buckets.len(), 0);
        }
        for (sum, count) in total.latency_buckets.iter_mut().zip(&s.latency_buckets) {
            *sum += count;
        }
    }
    total
}

/// In a fleet, the verdict on the summed windows, with each router judged alone too: a
/// router over a limit by itself is named — in the fleet's breach when there is one, or as
/// the breach when the sum hides it (one bad host among many good ones).
pub fn name_routers(
    spec: &AnalysisSpec,
    mut verdict: Verdict,
    routers: &[(String, [WindowStats; 2])],
    (color, old): (Color, Color),
    weights: (u8, u8),
) -> Verdict {
    if routers.len() < 2 {
        return verdict;
    }
    let alone: Vec<(&str, Breach)> = routers
        .iter()
        .filter_map(|(id, windows)| {
            let own = judge(
                spec,
                windows[color.index()].clone(),
                Some(windows[old.index()].clone()),
                weights,
            );
            Some((id.as_str(), own.breach?))
        })
        .collect();
    let Some((first, breach)) = alone.first() else {
        return verdict;
    };
    match verdict.breach.as_mut() {
        Some(fleet) => {
            let names: Vec<&str> = alone.iter().map(|(id, _)| *id).collect();
            fleet.against = format!(
                "{}; over it alone: router {}",
                fleet.against,
                names.join(", router ")
            );
        }
        None => {
            verdict.breach = Some(Breach {
                against: format!("router {first} alone: {}", breach.against),
                ..breach.clone()
            });
        }
    }
    if let Some(breach) = &verdict.breach {
        verdict.note = format!("breach: {breach}");
    }
    verdict
}

/// The router's counters sampled once a second, for windows that end now and began earlier.
pub struct History {
    samples: VecDeque<(Instant, [ColorSnapshot; 2])>,
    capacity: usize,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn push(&mut self, at: Instant, snapshots: [ColorSnapshot; 2]) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back((at, snapshots));
    }

    /// The oldest sample taken at or after `since` (or the oldest one kept).
    pub fn at_or_after(&self, since: Instant) -> Option<&(Instant, [ColorSnapshot; 2])> {
        self.samples
            .iter()
            .find(|(at, _)| *at >= since)
            .or(self.samples.front())
    }

    /// Per-second windows of one color, oldest first: requests per second and error rate.
    pub fn series(&self, color: Color, last: usize) -> Vec<WindowStats> {
        let skip = self.samples.len().saturating_sub(last + 1);
        let samples: Vec<_> = self.samples.iter().skip(skip).collect();
        samples
            .windows(2)
            .map(|pair| {
                let (a_at, a) = pair[0];
                let (b_at, b) = pair[1];
                WindowStats::between(&a[color.index()], &b[color.index()], *b_at - *a_at)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bluegreen_router::metrics::ColorMetrics;

    fn spec() -> AnalysisSpec {
        AnalysisSpec {
            interval: Duration::from_secs(1),
            min_requests: 50,
            error_rate: Limit {
                max: Some(5.0),
                max_increase: Some(2.0),
            },
            latency_p50: Limit::default(),
            latency_p95: Limit::default(),
            latency_p99: Limit {
                max: Some(1000.0),
                max_increase: Some(100.0),
            },
            min_throughput_ratio: Some(0.5),
            wait_for_data: true,
            mirror_mismatch_rate: Some(1.0),
            mirror_latency_p99: Limit {
                max: None,
                max_increase: Some(100.0),
            },
        }
    }

    /// A mirror that compared `compared` pairs, `mismatched` of them differing, the copies
    /// answered in `mirror_latency` and the live answers in 1 ms.
    fn mirror_window(compared: u64, mismatched: u64, mirror_latency: Duration) -> MirrorWindow {
        let buckets = |latency: Duration| {
            let metrics = ColorMetrics::default();
            for _ in 0..compared {
                metrics.response(200, latency);
            }
            metrics.snapshot(Color::Green, 0).latency_buckets
        };
        let to = MirrorSnapshot {
            compared,
            mismatched,
            live_latency_buckets: buckets(Duration::from_millis(1)),
            mirror_latency_buckets: buckets(mirror_latency),
            ..MirrorSnapshot::default()
        };
        MirrorWindow::between(
            Color::Green,
            &MirrorSnapshot::default(),
            &to,
            Duration::from_secs(2),
        )
    }

    #[test]
    fn a_mirror_is_judged_on_its_differing_share_and_the_copies_p99_over_live() {
        let fine = judge_mirror(&spec(), mirror_window(200, 2, Duration::from_millis(1)));
        assert!(fine.judged && fine.breach.is_none(), "{fine:?}");
        let differing = judge_mirror(&spec(), mirror_window(200, 4, Duration::from_millis(1)));
        let breach = differing.breach.unwrap();
        assert_eq!(breach.metric, "mirror_mismatch_rate");
        assert_eq!(
            breach.to_string(),
            "mirror_mismatch_rate 2.00% over the limit 1.00% (4 of 200 mirrored answers differ)"
        );
        let slow = judge_mirror(&spec(), mirror_window(200, 0, Duration::from_millis(400)));
        assert_eq!(slow.breach.unwrap().metric, "mirror_latency_p99");
        let few = judge_mirror(&spec(), mirror_window(10, 10, Duration::from_millis(1)));
        assert!(!few.judged && few.breach.is_none(), "{few:?}");
    }

    /// `ok` 200s and `failed` 500s, each taking `latency`.
    fn window(color: Color, ok: u64, failed: u64, latency: Duration) -> WindowStats {
        let metrics = ColorMetrics::default();
        let before = metrics.snapshot(color, 0);
        for _ in 0..ok {
            metrics.response(200, latency);
        }
        for _ in 0..failed {
            metrics.response(500, latency);
        }
        WindowStats::between(
            &before,
            &metrics.snapshot(color, 0),
            Duration::from_secs(10),
        )
    }

    /// A router's cumulative counters of both colors after `ok` 200s and `failed` 500s on
    /// green and `blue_ok` 200s on blue.
    fn router(ok: u64, failed: u64, blue_ok: u64) -> [ColorSnapshot; 2] {
        let (blue, green) = (ColorMetrics::default(), ColorMetrics::default());
        for _ in 0..blue_ok {
            blue.response(200, Duration::from_millis(1));
        }
        for _ in 0..ok {
            green.response(200, Duration::from_millis(1));
        }
        for _ in 0..failed {
            green.response(500, Duration::from_millis(1));
        }
        [
            blue.snapshot(Color::Blue, 0),
            green.snapshot(Color::Green, 0),
        ]
    }

    #[test]
    fn a_fleet_is_judged_summed_and_one_bad_router_is_named() {
        let zero = || router(0, 0, 0);
        let from: CountersByRouter = ["a", "b", "c"].map(|id| (id.to_string(), zero())).into();
        // c answers 30 % errors; summed with a and b the fleet has 1.4 %, under the 5 % limit.
        let now: CountersByRouter = [
            ("a".to_string(), router(1000, 0, 1000)),
            ("b".to_string(), router(1000, 0, 1000)),
            ("c".to_string(), router(70, 30, 100)),
            // Joined during the window: not counted.
            ("d".to_string(), router(0, 500, 0)),
        ]
        .into();
        let (total, routers) = fleet_windows(&from, &now, Duration::from_secs(10));
        let green = total[Color::Green.index()].clone();
        assert_eq!((green.requests, green.errors), (2100, 30));
        assert_eq!(routers.len(), 3);
        let weights = (50, 50);
        let summed = judge(
            &spec(),
            green,
            Some(total[Color::Blue.index()].clone()),
            weights,
        );
        assert!(summed.breach.is_none(), "{summed:?}");
        let named = name_routers(
            &spec(),
            summed,
            &routers,
            (Color::Green, Color::Blue),
            weights,
        );
        let breach = named.breach.expect("c named");
        assert_eq!(breach.metric, "error_rate");
        assert!(breach.against.starts_with("router c alone: "), "{breach:?}");
        assert!(named.note.contains("router c alone"), "{}", named.note);

        // When the sum breaches too, the routers over the limit alone are named in it.
        let now: CountersByRouter = [
            ("a".to_string(), router(100, 0, 100)),
            ("b".to_string(), router(60, 40, 100)),
            ("c".to_string(), router(60, 40, 100)),
        ]
        .into();
        let (total, routers) = fleet_windows(&from, &now, Duration::from_secs(10));
        let summed = judge(&spec(), total[Color::Green.index()].clone(), None, weights);
        let named = name_routers(
            &spec(),
            summed,
            &routers,
            (Color::Green, Color::Blue),
            weights,
        );
        let against = named.breach.expect("breach").against;
        assert!(
            against.ends_with("over it alone: router b, router c"),
            "{against}"
        );
    }

    #[test]
    fn too_few_requests_are_not_judged() {
        let v = judge(
            &spec(),
            window(Color::Green, 10, 10, Duration::from_millis(1)),
            None,
            (10, 90),
        );
        assert!(!v.judged && v.breach.is_none(), "{v:?}");
        assert!(v.note.contains("20 of the 50"), "{}", v.note);
    }

    #[test]
    fn an_absolute_error_rate_breach_names_metric_value_and_limit() {
        let v = judge(
            &spec(),
            window(Color::Green, 80, 20, Duration::from_millis(1)),
            None,
            (10, 90),
        );
        let breach = v.breach.expect("breach");
        assert_eq!(breach.metric, "error_rate");
        assert_eq!(breach.value, 20.0);
        assert_eq!(breach.limit, 5.0);
        assert!(
            breach
                .to_string()
                .contains("error_rate 20.00% over the limit 5.00%")
        );
    }

    #[test]
    fn relative_limits_compare_with_the_baseline() {
        // 4 % errors is under the absolute 5 %, but 3.5 points over blue's 0.5 %.
        let v = judge(
            &spec(),
            window(Color::Green, 96, 4, Duration::from_millis(1)),
            Some(window(Color::Blue, 995, 5, Duration::from_millis(1))),
            (50, 50),
        );
        let breach = v.breach.expect("breach");
        assert_eq!(breach.metric, "error_rate");
        assert!(breach.against.starts_with("baseline blue"), "{breach:?}");
        // Latency: p99 of 250 ms against blue's 1 ms + 100 ms.
        let v = judge(
            &spec(),
            window(Color::Green, 100, 0, Duration::from_millis(200)),
            Some(window(Color::Blue, 1000, 0, Duration::from_micros(900))),
            (50, 50),
        );
        assert_eq!(v.breach.expect("breach").metric, "latency_p99");
    }

    #[test]
    fn a_healthy_canary_passes_and_throughput_is_per_percent() {
        let v = judge(
            &spec(),
            window(Color::Green, 100, 0, Duration::from_millis(1)),
            Some(window(Color::Blue, 900, 0, Duration::from_millis(1))),
            (10, 90),
        );
        assert!(v.judged && v.breach.is_none(), "{v:?}");
        // The same 100 requests at 50 % weight are a quarter of blue's rate per percent.
        let v = judge(
            &spec(),
            window(Color::Green, 100, 0, Duration::from_millis(1)),
            Some(window(Color::Blue, 400, 0, Duration::from_millis(1))),
            (50, 50),
        );
        assert_eq!(v.breach.expect("breach").metric, "throughput_ratio");
    }
}
