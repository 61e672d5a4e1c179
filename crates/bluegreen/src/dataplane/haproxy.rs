//! HAProxy as the router: blue and green are servers of one backend, switched through HAProxy's runtime API (addresses, states, weights), with health and counters read back from its statistics.
//!
//! The servers named `blue…` and `green…` of the backend are the colors' slots (declare
//! them with `server-template blue 1-4 127.0.0.1:1 check disabled`): a color's upstreams take
//! its first slots in order, the rest are put in maintenance. A split sets the slots'
//! weights, the color gaining traffic raised before the other is lowered (dropping the old
//! first fails requests while neither has weight). bluegreen's own router stays on
//! `router.listen` with the same upstreams as the preview route smoke tests take.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bluegreen_router::{Color, ColorSnapshot, Health, RouterStatus, Split};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{DataPlane, EmbeddedRouter, PreviewRoute, UpstreamHealth};

/// How often HAProxy's statistics are read (health and counters).
const POLL_EVERY: Duration = Duration::from_millis(500);
/// How long one runtime API command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// HAProxy's largest server weight: a color with all the traffic and one slot gets it.
const MAX_WEIGHT: u64 = 256;

/// HAProxy's runtime API on its stats socket: one connection per command.
struct RuntimeApi {
    socket: PathBuf,
}

impl RuntimeApi {
    async fn command(&self, command: &str) -> Result<String, String> {
        let unreachable = |e: &dyn std::fmt::Display| {
            format!(
                "cannot reach HAProxy's runtime API at {} (router.socket): {e}; check that haproxy runs with `stats socket {} level admin`",
                self.socket.display(),
                self.socket.display()
            )
        };
        let exchange = async {
            let mut stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| unreachable(&e))?;
            stream
                .write_all(format!("{command}\n").as_bytes())
                .await
                .map_err(|e| unreachable(&e))?;
            let mut answer = String::new();
            stream
                .read_to_string(&mut answer)
                .await
                .map_err(|e| unreachable(&e))?;
            Ok(answer)
        };
        tokio::time::timeout(COMMAND_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(unreachable(&format!(
                    "no answer within {COMMAND_TIMEOUT:?}"
                )))
            })
    }

    /// A command that changes something: HAProxy answers nothing (or says what changed) when
    /// it did, and why not otherwise.
    async fn change(&self, command: &str) -> Result<(), String> {
        let answer = self.command(command).await?;
        let answer = answer.trim();
        let done = ["IP changed", "no need to change", "port changed"];
        if answer.is_empty() || done.iter().any(|d| answer.starts_with(d)) {
            Ok(())
        } else {
            Err(format!("HAProxy refused `{command}`: {answer}"))
        }
    }
}

/// One server's row of `show stat`: what bluegreen reads of it.
#[derive(Clone, Debug, Default, PartialEq)]
struct ServerRow {
    name: String,
    status: String,
    addr: Option<SocketAddr>,
    /// Answers by class 1xx…5xx, and other.
    answers: [u64; 6],
    /// Connection and response errors (`econ`, `eresp`).
    errors: u64,
    /// Average response time of its last 1,024 answers, in ms.
    rtime_ms: u64,
    bytes_in: u64,
    bytes_out: u64,
    open: u64,
}

impl ServerRow {
    fn is_up(&self) -> bool {
        ["UP", "no check", "DRAIN"]
            .iter()
            .any(|s| self.status.starts_with(s))
    }
}

/// The servers of `backend` in `show stat`'s CSV.
fn parse_stat(csv: &str, backend: &str) -> Result<Vec<ServerRow>, String> {
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| format!("HAProxy's `show stat` answered no CSV: {csv:?}"))?;
    let names: Vec<&str> = header.split(',').collect();
    let index = |name: &str| names.iter().position(|n| *n == name);
    let number = |fields: &[&str], name: &str| -> u64 {
        index(name)
            .and_then(|i| fields.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let text = |fields: &[&str], name: &str| -> String {
        index(name)
            .and_then(|i| fields.get(i))
            .map_or(String::new(), |v| v.to_string())
    };
    Ok(lines
        .map(|line| line.split(',').collect::<Vec<_>>())
        .filter(|f| f.first() == Some(&backend))
        .filter(|f| !matches!(f.get(1), Some(&"BACKEND" | &"FRONTEND")))
        .map(|f| ServerRow {
            name: text(&f, "svname"),
            status: text(&f, "status"),
            addr: text(&f, "addr").parse().ok(),
            answers: [
                "hrsp_1xx",
                "hrsp_2xx",
                "hrsp_3xx",
                "hrsp_4xx",
                "hrsp_5xx",
                "hrsp_other",
            ]
            .map(|n| number(&f, n)),
            errors: number(&f, "econ") + number(&f, "eresp"),
            rtime_ms: number(&f, "rtime"),
            bytes_in: number(&f, "bin"),
            bytes_out: number(&f, "bout"),
            open: number(&f, "scur"),
        })
        .collect())
}

/// The servers of a color, ordered by their number (`blue1`, `blue2`, … `blue10`).
fn slots(rows: &[ServerRow], color: Color) -> Vec<String> {
    let mut slots: Vec<(u64, String)> = rows
        .iter()
        .filter_map(|row| {
            let number = row.name.strip_prefix(color.as_str())?;
            let n = if number.is_empty() {
                0
            } else {
                number.parse().ok()?
            };
            Some((n, row.name.clone()))
        })
        .collect();
    slots.sort();
    slots.into_iter().map(|(_, name)| name).collect()
}

/// Each slot's weight for `percent` of the traffic spread over `used` slots: the colors'
/// weights stay in the split's proportion (a color with any traffic gets at least 1).
fn slot_weight(percent: u8, used: usize) -> u64 {
    if percent == 0 || used == 0 {
        return 0;
    }
    ((percent as u64 * MAX_WEIGHT) as f64 / (100.0 * used as f64))
        .round()
        .max(1.0) as u64
}

/// What the last reads of the statistics found, and each color's counters summed over them.
#[derive(Default)]
struct Seen {
    rows: BTreeMap<String, ServerRow>,
    totals: Option<[ColorSnapshot; 2]>,
    /// Why the last read failed (the servers' health is then unknown).
    unreachable: Option<String>,
}

pub struct HaproxyPlane {
    /// bluegreen's own router: the colors' upstream sets and the preview route.
    embedded: EmbeddedRouter,
    api: RuntimeApi,
    backend: String,
    /// Each color's servers in the backend, by `Color::index`.
    slots: [Vec<String>; 2],
    seen: Mutex<Seen>,
}

impl HaproxyPlane {
    /// Finds the backend's blue and green servers, points them at the upstreams and the split
    /// the embedded router holds (the recorded state), and reads HAProxy's statistics from
    /// then on. Refused, naming the key to fix, when HAProxy cannot be reached or the backend
    /// has no server of a color.
    pub async fn connect(
        embedded: EmbeddedRouter,
        socket: &Path,
        backend: &str,
    ) -> Result<Arc<HaproxyPlane>, String> {
        let api = RuntimeApi {
            socket: socket.to_path_buf(),
        };
        let rows = parse_stat(&api.command("show stat").await?, backend)?;
        let slots = Color::ALL.map(|color| slots(&rows, color));
        for color in Color::ALL {
            if slots[color.index()].is_empty() {
                return Err(format!(
                    "router.backend: HAProxy's backend {backend:?} has no server named {color}…; declare them, e.g. `server-template {color} 1-4 127.0.0.1:1 check disabled`"
                ));
            }
        }
        let plane = Arc::new(HaproxyPlane {
            embedded,
            api,
            backend: backend.to_string(),
            slots,
            seen: Mutex::new(Seen::default()),
        });
        for color in Color::ALL {
            let upstreams: Vec<SocketAddr> = plane
                .embedded
                .upstreams(color)
                .iter()
                .map(|u| u.addr)
                .collect();
            plane.point_slots(color, &upstreams).await?;
        }
        plane.set_weights(plane.embedded.split()).await?;
        plane.read_stats().await;
        tokio::spawn(poll(Arc::downgrade(&plane)));
        Ok(plane)
    }

    fn server(&self, name: &str) -> String {
        format!("{}/{name}", self.backend)
    }

    /// Points `color`'s first slots at `upstreams` (ready) and puts the rest in maintenance.
    async fn point_slots(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String> {
        let slots = &self.slots[color.index()];
        if upstreams.len() > slots.len() {
            return Err(format!(
                "HAProxy's backend {:?} has {} {color} server(s) for {} upstreams; declare more (router.backend), e.g. `server-template {color} 1-{} 127.0.0.1:1 check disabled`",
                self.backend,
                slots.len(),
                upstreams.len(),
                upstreams.len()
            ));
        }
        // A slot's weight is set before it is made ready: it never takes traffic the split
        // does not give its color (template servers start at weight 1).
        let weight = slot_weight(self.embedded.split().weight(color), upstreams.len());
        for (i, slot) in slots.iter().enumerate() {
            let server = self.server(slot);
            match upstreams.get(i) {
                Some(addr) => {
                    self.api
                        .change(&format!(
                            "set server {server} addr {} port {}",
                            addr.ip(),
                            addr.port()
                        ))
                        .await?;
                    self.api
                        .change(&format!("set server {server} weight {weight}"))
                        .await?;
                    self.api
                        .change(&format!("set server {server} state ready"))
                        .await?;
                }
                None => {
                    self.api
                        .change(&format!("set server {server} weight 0"))
                        .await?;
                    self.api
                        .change(&format!("set server {server} state maint"))
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Sets every used slot's weight for `split`: the color whose share grows first.
    async fn set_weights(&self, split: Split) -> Result<(), String> {
        let before = self.embedded.split();
        let mut colors = Color::ALL;
        colors
            .sort_by_key(|c| std::cmp::Reverse(split.weight(*c) as i16 - before.weight(*c) as i16));
        for color in colors {
            let used = self.embedded.upstreams(color).len();
            let weight = slot_weight(split.weight(color), used);
            for slot in self.slots[color.index()].iter().take(used) {
                self.api
                    .change(&format!("set server {} weight {weight}", self.server(slot)))
                    .await?;
            }
        }
        Ok(())
    }

    /// Reads `show stat`: each server's health, and the answers since the last read added to
    /// its color's counters (a server's counters going back — HAProxy reloaded — count anew).
    async fn read_stats(&self) {
        let read = match self.api.command("show stat").await {
            Ok(csv) => parse_stat(&csv, &self.backend),
            Err(e) => Err(e),
        };
        let mut seen = self.seen.lock().expect("lock");
        let rows = match read {
            Ok(rows) => rows,
            Err(e) => {
                seen.unreachable = Some(e);
                return;
            }
        };
        seen.unreachable = None;
        let mut totals = seen
            .totals
            .clone()
            .unwrap_or_else(|| Color::ALL.map(ColorSnapshot::empty));
        for row in &rows {
            let Some(color) = Color::ALL
                .into_iter()
                .find(|c| self.slots[c.index()].contains(&row.name))
            else {
                continue;
            };
            let previous = seen.rows.get(&row.name).cloned().unwrap_or_default();
            let since = |now: u64, then: u64| if now >= then { now - then } else { now };
            let total = &mut totals[color.index()];
            let answers: Vec<u64> = (0..6)
                .map(|i| since(row.answers[i], previous.answers[i]))
                .collect();
            let requests: u64 = answers.iter().sum();
            total.requests += requests;
            total.responses_1xx += answers[0];
            total.responses_2xx += answers[1];
            total.responses_3xx += answers[2];
            total.responses_4xx += answers[3];
            total.responses_5xx += answers[4];
            total.upstream_errors += since(row.errors, previous.errors);
            total.bytes_in += since(row.bytes_in, previous.bytes_in);
            total.bytes_out += since(row.bytes_out, previous.bytes_out);
            // HAProxy keeps no histogram: the answers of each read count at its average
            // response time, so percentiles are those of half-second averages.
            total.latency_sum_us += requests * row.rtime_ms * 1000;
            let bucket = bluegreen_router::metrics::latency_bucket_bounds_us()
                .iter()
                .position(|bound| row.rtime_ms * 1000 <= *bound)
                .unwrap_or(total.latency_buckets.len() - 1);
            total.latency_buckets[bucket] += requests;
        }
        for total in &mut totals {
            total.open = rows
                .iter()
                .filter(|r| self.slots[total.color.index()].contains(&r.name))
                .map(|r| r.open)
                .sum();
            total.latency_p50_ms =
                bluegreen_router::metrics::quantile_ms(&total.latency_buckets, 0.50);
            total.latency_p99_ms =
                bluegreen_router::metrics::quantile_ms(&total.latency_buckets, 0.99);
        }
        seen.totals = Some(totals);
        seen.rows = rows.into_iter().map(|r| (r.name.clone(), r)).collect();
    }
}

/// Reads HAProxy's statistics every `POLL_EVERY` while the plane lives.
async fn poll(plane: Weak<HaproxyPlane>) {
    loop {
        tokio::time::sleep(POLL_EVERY).await;
        let Some(plane) = plane.upgrade() else {
            return;
        };
        if plane.is_stopping() {
            return;
        }
        plane.read_stats().await;
    }
}

#[async_trait]
impl DataPlane for HaproxyPlane {
    fn split(&self) -> Split {
        self.embedded.split()
    }

    fn check_split(&self, split: Split) -> Result<(), String> {
        if let Some(unreachable) = &self.seen.lock().expect("lock").unreachable {
            return Err(unreachable.clone());
        }
        for color in Color::ALL {
            if split.weight(color) > 0 && self.healthy_count(color) == 0 {
                return Err(format!(
                    "{color} has no upstream HAProxy and bluegreen both find healthy; refusing to send it {}% of traffic",
                    split.weight(color)
                ));
            }
        }
        Ok(())
    }

    /// HAProxy's weights first (the growing color raised before the other is lowered), then
    /// the embedded router's table; when HAProxy refuses a command, the weights it had are
    /// put back and nothing is applied.
    async fn apply_split(&self, split: Split) -> Result<(), String> {
        self.check_split(split)?;
        let before = self.embedded.split();
        if let Err(e) = self.set_weights(split).await {
            if let Err(back) = self.set_weights(before).await {
                tracing::error!(error = %back, "cannot put HAProxy's weights back");
            }
            return Err(e);
        }
        self.embedded.apply_split(split).await
    }

    async fn set_upstreams(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String> {
        self.embedded.check_upstreams(color, upstreams).await?;
        self.point_slots(color, upstreams).await?;
        self.embedded.set_upstreams(color, upstreams).await?;
        // The color's share is spread over its new number of slots.
        self.set_weights(self.embedded.split()).await
    }

    async fn check_upstreams(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String> {
        let slots = self.slots[color.index()].len();
        if upstreams.len() > slots {
            return Err(format!(
                "HAProxy's backend {:?} has {slots} {color} server(s) for {} upstreams; declare more",
                self.backend,
                upstreams.len()
            ));
        }
        self.embedded.check_upstreams(color, upstreams).await
    }

    /// Healthy when bluegreen's own checks find it so and HAProxy has it up.
    fn upstreams(&self, color: Color) -> Vec<UpstreamHealth> {
        let seen = self.seen.lock().expect("lock");
        self.embedded
            .upstreams(color)
            .into_iter()
            .enumerate()
            .map(|(i, mut upstream)| {
                let row = self.slots[color.index()]
                    .get(i)
                    .and_then(|slot| seen.rows.get(slot));
                let verdict = match (&seen.unreachable, row) {
                    (Some(e), _) => Some(e.clone()),
                    (None, None) => Some("HAProxy does not list its server yet".into()),
                    (None, Some(row)) if row.addr != Some(upstream.addr) => Some(format!(
                        "HAProxy's server {} points at {:?}",
                        row.name, row.addr
                    )),
                    (None, Some(row)) if !row.is_up() => {
                        Some(format!("HAProxy's server {} is {}", row.name, row.status))
                    }
                    _ => None,
                };
                if let Some(why) = verdict
                    && upstream.health != Health::Unhealthy
                {
                    upstream.health = Health::Unhealthy;
                    upstream.last_error = Some(why);
                }
                upstream
            })
            .collect()
    }

    fn healthy_count(&self, color: Color) -> usize {
        self.upstreams(color)
            .iter()
            .filter(|u| u.is_healthy())
            .count()
    }

    fn counters(&self) -> [ColorSnapshot; 2] {
        self.seen
            .lock()
            .expect("lock")
            .totals
            .clone()
            .unwrap_or_else(|| Color::ALL.map(ColorSnapshot::empty))
    }

    fn preview(&self) -> PreviewRoute {
        self.embedded.preview()
    }

    /// The embedded router's picture, with HAProxy's health and counters.
    fn status(&self) -> RouterStatus {
        let mut status = self.embedded.status();
        let counters = self.counters();
        for color in &mut status.colors {
            let upstreams = self.upstreams(color.color);
            color.healthy_upstreams = upstreams.iter().filter(|u| u.is_healthy()).count();
            for shown in &mut color.upstreams {
                if let Some(u) = upstreams.iter().find(|u| u.addr == shown.address) {
                    shown.health = u.health;
                    shown.last_error = u.last_error.clone();
                }
            }
            color.metrics = counters[color.color.index()].clone();
        }
        status.connections_open = counters.iter().map(|c| c.open).sum();
        status
    }

    fn prometheus(&self) -> String {
        super::driven_prometheus("haproxy", &self.counters())
    }

    fn is_stopping(&self) -> bool {
        self.embedded.is_stopping()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "# pxname,svname,qcur,scur,stot,bin,bout,econ,eresp,status,weight,hrsp_1xx,hrsp_2xx,hrsp_3xx,hrsp_4xx,hrsp_5xx,hrsp_other,rtime,addr,\n\
        web,FRONTEND,,3,10,100,200,,,OPEN,,0,10,0,0,0,0,,,\n\
        app,blue10,0,0,0,0,0,0,0,MAINT,0,0,0,0,0,0,0,0,127.0.0.1:1,\n\
        app,blue2,0,1,5,50,60,1,0,UP,128,0,4,0,0,1,0,3,127.0.0.1:9002,\n\
        app,green1,0,0,0,0,0,0,0,DOWN,0,0,0,0,0,0,0,0,127.0.0.1:9003,\n\
        app,BACKEND,0,1,5,50,60,1,0,UP,128,0,4,0,0,1,0,3,,\n";

    #[test]
    fn show_stat_gives_the_backends_servers_in_slot_order() {
        let rows = parse_stat(STAT, "app").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(slots(&rows, Color::Blue), ["blue2", "blue10"]);
        assert_eq!(slots(&rows, Color::Green), ["green1"]);
        let blue2 = rows.iter().find(|r| r.name == "blue2").unwrap();
        assert_eq!(blue2.answers, [0, 4, 0, 0, 1, 0]);
        assert_eq!(blue2.errors, 1);
        assert_eq!(blue2.addr, Some("127.0.0.1:9002".parse().unwrap()));
        assert!(blue2.is_up());
        assert!(!rows.iter().find(|r| r.name == "green1").unwrap().is_up());
        assert!(parse_stat("Unknown command.\n", "app").is_err());
    }

    #[test]
    fn weights_keep_the_split_in_proportion() {
        assert_eq!(slot_weight(100, 1), 256);
        assert_eq!(slot_weight(0, 3), 0);
        assert_eq!(slot_weight(50, 2), 64);
        assert_eq!(slot_weight(1, 4), 1, "a little traffic is never none");
        assert_eq!(slot_weight(20, 1), 51);
    }
}
