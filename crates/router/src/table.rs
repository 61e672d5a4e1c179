//! The routing table: pools per color, the traffic split and the preview/sticky rules, read once per request.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use http::header::{COOKIE, HeaderName};
use serde::{Deserialize, Serialize};

use crate::drain::DrainGroup;
use crate::mirror::MirrorRule;
use crate::upstream::Upstream;

/// One of the two environments.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    PartialOrd,
    Ord,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub const ALL: [Color; 2] = [Color::Blue, Color::Green];

    pub fn index(self) -> usize {
        match self {
            Color::Blue => 0,
            Color::Green => 1,
        }
    }

    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name was neither `blue` nor `green`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown environment {0:?}; valid: blue, green")]
pub struct UnknownColor(pub String);

impl FromStr for Color {
    type Err = UnknownColor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "blue" => Ok(Color::Blue),
            "green" => Ok(Color::Green),
            _ => Err(UnknownColor(s.to_string())),
        }
    }
}

/// The share of traffic each color receives, as whole percent of green (blue gets the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Split {
    #[schema(maximum = 100)]
    green_percent: u8,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("green weight {0} is out of range; use a whole percent from 0 to 100")]
pub struct SplitOutOfRange(pub u64);

impl Split {
    pub fn green_percent(green: u64) -> Result<Split, SplitOutOfRange> {
        if green > 100 {
            return Err(SplitOutOfRange(green));
        }
        Ok(Split {
            green_percent: green as u8,
        })
    }

    /// All traffic to one color.
    pub fn all(color: Color) -> Split {
        match color {
            Color::Blue => Split { green_percent: 0 },
            Color::Green => Split { green_percent: 100 },
        }
    }

    /// Percent of traffic the color receives.
    pub fn weight(self, color: Color) -> u8 {
        match color {
            Color::Blue => 100 - self.green_percent,
            Color::Green => self.green_percent,
        }
    }

    /// The single color that takes all traffic, if there is one.
    pub fn sole_color(self) -> Option<Color> {
        match self.green_percent {
            0 => Some(Color::Blue),
            100 => Some(Color::Green),
            _ => None,
        }
    }

    /// Which color serves a client whose bucket (0..100) is given. A bucket below the green
    /// percent goes to green, so raising green's share only ever moves clients blue → green.
    pub fn color_for_bucket(self, bucket: u8) -> Color {
        if bucket < self.green_percent {
            Color::Green
        } else {
            Color::Blue
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "blue {}% / green {}%",
            self.weight(Color::Blue),
            self.weight(Color::Green)
        )
    }
}

/// The upstreams of one color and the cursor that spreads ties among them.
pub struct Pool {
    pub color: Color,
    pub upstreams: Vec<Arc<Upstream>>,
    cursor: AtomicUsize,
}

impl Pool {
    pub fn new(color: Color, upstreams: Vec<Arc<Upstream>>) -> Pool {
        Pool {
            color,
            upstreams,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Whether this color's upstreams speak HTTP/2 (they share one protocol).
    pub fn speaks_http2(&self) -> bool {
        self.upstreams
            .first()
            .is_some_and(|u| u.pool.connector().is_http2())
    }

    pub fn healthy_count(&self) -> usize {
        self.upstreams.iter().filter(|u| u.is_routable()).count()
    }

    /// The healthy upstream with the fewest requests in flight, skipping `tried` (indexes into
    /// `upstreams`). Least-in-flight rather than round robin: a slow or stuck instance piles up
    /// in-flight requests and so receives fewer new ones. The scan starts at a rotating cursor
    /// so that equally idle upstreams take turns.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.upstreams.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, usize)> = None;
        for offset in 0..n {
            let i = (start + offset) % n;
            let upstream = &self.upstreams[i];
            if !upstream.is_routable() || tried.contains(&i) {
                continue;
            }
            let load = upstream.in_flight();
            if best.is_none_or(|(_, best_load)| load < best_load) {
                best = Some((i, load));
                if load == 0 {
                    break;
                }
            }
        }
        best.map(|(i, _)| i)
    }
}

/// Requests that name a color (for smoke tests of the idle one) bypass the split.
#[derive(Clone, Debug)]
pub struct PreviewRule {
    /// Header whose value names the color, e.g. `X-Bluegreen-Env: green`.
    pub header: HeaderName,
    /// Cookie whose value names the color, e.g. `bluegreen_env=green`.
    pub cookie: String,
    /// When set, a preview request must also carry this secret in `secret_header`.
    pub secret: Option<String>,
    pub secret_header: HeaderName,
}

/// Why a request went where it went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreviewOutcome {
    /// The request asked for no color.
    NotRequested,
    /// It asked for this color and may have it.
    Granted(Color),
    /// It asked for a color but lacked the secret (or named no valid color); routed normally.
    Refused,
}

impl PreviewRule {
    pub fn evaluate(&self, headers: &HeaderMap) -> PreviewOutcome {
        let asked = headers
            .get(&self.header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| cookie_value(headers, &self.cookie).map(str::to_owned));
        let Some(asked) = asked else {
            return PreviewOutcome::NotRequested;
        };
        let Ok(color) = asked.parse::<Color>() else {
            return PreviewOutcome::Refused;
        };
        if let Some(secret) = &self.secret {
            let given = headers
                .get(&self.secret_header)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !constant_time_eq(given, secret.as_bytes()) {
                return PreviewOutcome::Refused;
            }
        }
        PreviewOutcome::Granted(color)
    }
}

/// Compares secrets without stopping at the first difference, so timing tells nothing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Clients carrying this cookie stay on one color while the split moves in one direction.
#[derive(Clone, Debug)]
pub struct StickyRule {
    pub cookie: String,
}

impl StickyRule {
    /// The client's bucket (0..100) from its cookie, or `None` when it has none yet.
    pub fn bucket(&self, headers: &HeaderMap) -> Option<u8> {
        cookie_value(headers, &self.cookie).map(bucket_of)
    }
}

/// A stable hash (FNV-1a) so every router of a fleet, and every version of this one, puts a
/// client in the same bucket.
pub fn bucket_of(id: &str) -> u8 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % 100) as u8
}

pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The immutable value every request reads once. A change builds a new table and swaps it in.
pub struct RoutingTable {
    /// Counts swaps, so a status reader can tell tables apart.
    pub generation: u64,
    pub split: Split,
    pub pools: [Arc<Pool>; 2],
    /// Requests and tunnels opened on a color join its current drain group.
    pub drains: [Arc<DrainGroup>; 2],
    pub preview: Option<PreviewRule>,
    pub sticky: Option<StickyRule>,
    /// Shadow traffic: which requests are copied to the other color, and how compared.
    pub mirror: Option<Arc<MirrorRule>>,
}

impl RoutingTable {
    pub fn pool(&self, color: Color) -> &Arc<Pool> {
        &self.pools[color.index()]
    }

    pub fn drain_group(&self, color: Color) -> &Arc<DrainGroup> {
        &self.drains[color.index()]
    }

    /// The table that follows this one, with the rules kept and the rest given.
    pub fn next(
        &self,
        split: Split,
        pools: [Arc<Pool>; 2],
        drains: [Arc<DrainGroup>; 2],
    ) -> RoutingTable {
        RoutingTable {
            generation: self.generation + 1,
            split,
            pools,
            drains,
            preview: self.preview.clone(),
            sticky: self.sticky.clone(),
            mirror: self.mirror.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_green_never_moves_a_green_bucket_back_to_blue() {
        for bucket in 0..100u8 {
            let mut was_green = false;
            for green in 0..=100 {
                let color = Split::green_percent(green)
                    .unwrap()
                    .color_for_bucket(bucket);
                if was_green {
                    assert_eq!(color, Color::Green, "bucket {bucket} flipped at {green}%");
                }
                was_green = color == Color::Green;
            }
            assert!(was_green);
        }
    }

    #[test]
    fn split_rejects_more_than_100() {
        assert!(Split::green_percent(101).is_err());
        assert_eq!(Split::green_percent(30).unwrap().weight(Color::Blue), 70);
        assert_eq!(Split::all(Color::Green).sole_color(), Some(Color::Green));
    }

    #[test]
    fn buckets_spread_evenly() {
        let mut counts = [0u32; 100];
        for i in 0..100_000 {
            counts[bucket_of(&format!("client-{i}")) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, "a=1; bluegreen_env=green; b=2".parse().unwrap());
        assert_eq!(cookie_value(&headers, "bluegreen_env"), Some("green"));
        assert_eq!(cookie_value(&headers, "missing"), None);
    }

    #[test]
    fn preview_needs_the_secret_when_one_is_set() {
        let rule = PreviewRule {
            header: HeaderName::from_static("x-bluegreen-env"),
            cookie: "bluegreen_env".into(),
            secret: Some("s3cret".into()),
            secret_header: HeaderName::from_static("x-bluegreen-secret"),
        };
        let mut headers = HeaderMap::new();
        assert_eq!(rule.evaluate(&headers), PreviewOutcome::NotRequested);
        headers.insert("x-bluegreen-env", "green".parse().unwrap());
        assert_eq!(rule.evaluate(&headers), PreviewOutcome::Refused);
        headers.insert("x-bluegreen-secret", "wrong".parse().unwrap());
        assert_eq!(rule.evaluate(&headers), PreviewOutcome::Refused);
        headers.insert("x-bluegreen-secret", "s3cret".parse().unwrap());
        assert_eq!(
            rule.evaluate(&headers),
            PreviewOutcome::Granted(Color::Green)
        );
        headers.insert("x-bluegreen-env", "purple".parse().unwrap());
        assert_eq!(rule.evaluate(&headers), PreviewOutcome::Refused);
    }
}
