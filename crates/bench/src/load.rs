//! Load of our own where wrk cannot judge: every response checked, fixed rate, idle connections, propagation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::peers::Peer;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// Strict clients: a request on a connection the server closed counts as a failure instead
/// of being sent again silently.
fn keepalive_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .retry_canceled_requests(false)
        .pool_max_idle_per_host(1)
        .build_http()
}

fn fresh_connection_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .retry_canceled_requests(false)
        .pool_max_idle_per_host(0)
        .build_http()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Blue,
    Green,
    Other,
}

/// GET once; the status and the color the example app put in `x-color`.
async fn get(client: &HttpClient, uri: &Uri) -> Result<(u16, Seen), String> {
    let response = client
        .get(uri.clone())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let seen = match response.headers().get("x-color").map(|v| v.as_bytes()) {
        Some(b"blue") => Seen::Blue,
        Some(b"green") => Seen::Green,
        _ => Seen::Other,
    };
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, seen))
}

#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub ok: u64,
    pub non_2xx: u64,
    pub errors: u64,
    pub blue: u64,
    pub green: u64,
    pub first_errors: Vec<String>,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        self.blue += other.blue;
        self.green += other.green;
        self.first_errors.extend(
            other
                .first_errors
                .into_iter()
                .take(3usize.saturating_sub(self.first_errors.len())),
        );
    }

    pub fn total(&self) -> u64 {
        self.ok + self.non_2xx + self.errors
    }
}

/// Saturates the peer with keep-alive and new-connection clients while switching it
/// `switches` times, `gap` apart. Ends on blue.
pub async fn switch_under_load(
    peer: &Peer,
    keepalive: usize,
    fresh: usize,
    switches: usize,
    gap: Duration,
) -> Result<Tally, String> {
    let flip = async |i: usize| {
        peer.switch_to(if i.is_multiple_of(2) { "green" } else { "blue" })
            .await
    };
    let tally = under_load(peer, keepalive, fresh, switches, gap, flip).await?;
    if !switches.is_multiple_of(2) {
        peer.switch_to("blue").await?;
    }
    Ok(tally)
}

/// Saturates the peer with keep-alive and new-connection clients while `act` runs `times`
/// times (its argument: which time), `gap` apart; every response is counted.
pub async fn under_load(
    peer: &Peer,
    keepalive: usize,
    fresh: usize,
    times: usize,
    gap: Duration,
    mut act: impl AsyncFnMut(usize) -> Result<(), String>,
) -> Result<Tally, String> {
    let uri: Uri = peer.url().parse().map_err(|e| format!("{e}"))?;
    let running = Arc::new(AtomicBool::new(true));
    let mut workers = JoinSet::new();
    for i in 0..keepalive + fresh {
        let running = Arc::clone(&running);
        let uri = uri.clone();
        workers.spawn(async move {
            let client = if i < keepalive {
                keepalive_client()
            } else {
                fresh_connection_client()
            };
            let mut tally = Tally::default();
            // Bounded twice: by the stop flag and by a count no run reaches.
            while running.load(Ordering::Relaxed) && tally.total() < 5_000_000 {
                match get(&client, &uri).await {
                    Ok((status, seen)) => {
                        if (200..300).contains(&status) {
                            tally.ok += 1
                        } else {
                            tally.non_2xx += 1
                        }
                        match seen {
                            Seen::Blue => tally.blue += 1,
                            Seen::Green => tally.green += 1,
                            Seen::Other => {}
                        }
                    }
                    Err(error) => {
                        tally.errors += 1;
                        if tally.first_errors.len() < 3 {
                            tally.first_errors.push(error);
                        }
                    }
                }
            }
            tally
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut outcome = Ok(());
    for i in 0..times {
        tokio::time::sleep(gap).await;
        if let Err(e) = act(i).await {
            outcome = Err(e);
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::Relaxed);
    let mut total = Tally::default();
    while let Some(tally) = workers.join_next().await {
        total.add(tally.map_err(|e| e.to_string())?);
    }
    outcome.map(|_| total)
}

/// Open-loop load at a fixed total rate over `connections` keep-alive connections. Latency
/// is measured from when each request was due, not when it was sent, so a stall is counted
/// for every request it delayed (no coordinated omission). Returns latencies in µs and errors.
pub async fn fixed_rate(
    peer: &Peer,
    rate: f64,
    seconds: f64,
    connections: usize,
) -> Result<(Vec<u64>, u64), String> {
    let uri: Uri = peer.url().parse().map_err(|e| format!("{e}"))?;
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let per_connection = (seconds * rate / connections as f64).ceil() as usize;
    let begin = Instant::now() + Duration::from_millis(50);
    let mut workers = JoinSet::new();
    for c in 0..connections {
        let uri = uri.clone();
        let start = begin + interval.mul_f64(c as f64 / connections as f64);
        workers.spawn(async move {
            let client = keepalive_client();
            let mut latencies = Vec::with_capacity(per_connection);
            let mut errors = 0u64;
            for k in 0..per_connection {
                let due = start + interval * k as u32;
                tokio::time::sleep_until(due.into()).await;
                match get(&client, &uri).await {
                    Ok((200..=299, _)) => latencies.push(due.elapsed().as_micros() as u64),
                    _ => errors += 1,
                }
            }
            (latencies, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (latencies, e) = done.map_err(|e| e.to_string())?;
        all.extend(latencies);
        errors += e;
    }
    all.sort_unstable();
    Ok((all, errors))
}

/// Opens `count` keep-alive connections, sends one request on each, and keeps them open.
pub async fn hold_idle_connections(
    addr: SocketAddr,
    count: usize,
) -> Result<Vec<TcpStream>, String> {
    let mut held = Vec::with_capacity(count);
    let mut pending = JoinSet::new();
    for i in 0..count {
        pending.spawn(async move {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connection {i}: {e}"))?;
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                .await
                .map_err(|e| format!("connection {i}: {e}"))?;
            read_one_response(&mut stream)
                .await
                .map_err(|e| format!("connection {i}: {e}"))?;
            Ok::<_, String>(stream)
        });
        // At most 256 handshakes in flight, so the listen backlog is never the limit.
        if pending.len() >= 256
            && let Some(done) = pending.join_next().await
        {
            held.push(done.map_err(|e| e.to_string())??);
        }
    }
    while let Some(done) = pending.join_next().await {
        held.push(done.map_err(|e| e.to_string())??);
    }
    Ok(held)
}

async fn read_one_response(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buffer = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before the response"));
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                return Ok(());
            }
        }
    }
}

/// How fast a switch reaches new requests: per switch, the time from the switch call
/// returning to the first response from the new color, and to the last response from the
/// old color to a request sent after the call returned (0 when there was none).
#[derive(Clone, Debug, Default)]
pub struct Propagation {
    pub first_new_ms: Vec<f64>,
    pub last_old_ms: Vec<f64>,
    /// Responses from the old color to requests sent after the switch returned.
    pub stale_responses: u64,
}

pub async fn propagation(
    peer: &Peer,
    switches: usize,
    gap: Duration,
    clients: usize,
) -> Result<Propagation, String> {
    let uri: Uri = peer.url().parse().map_err(|e| format!("{e}"))?;
    let running = Arc::new(AtomicBool::new(true));
    let mut workers = JoinSet::new();
    for _ in 0..clients {
        let running = Arc::clone(&running);
        let uri = uri.clone();
        workers.spawn(async move {
            let client = keepalive_client();
            let mut seen = Vec::new();
            while running.load(Ordering::Relaxed) && seen.len() < 5_000_000 {
                let start = Instant::now();
                if let Ok((_, color)) = get(&client, &uri).await {
                    seen.push((start, Instant::now(), color));
                }
            }
            seen
        });
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut switched = Vec::with_capacity(switches);
    let mut outcome = Ok(());
    for i in 0..switches {
        let target = if i % 2 == 0 { Seen::Green } else { Seen::Blue };
        let called = Instant::now();
        if let Err(e) = peer
            .switch_to(if target == Seen::Green {
                "green"
            } else {
                "blue"
            })
            .await
        {
            outcome = Err(e);
            break;
        }
        switched.push((called, Instant::now(), target));
        tokio::time::sleep(gap).await;
    }
    running.store(false, Ordering::Relaxed);
    let mut seen = Vec::new();
    while let Some(done) = workers.join_next().await {
        seen.extend(done.map_err(|e| e.to_string())?);
    }
    if !switches.is_multiple_of(2) {
        peer.switch_to("blue").await?;
    }
    outcome?;
    let mut result = Propagation::default();
    for (i, (_, returned, target)) in switched.iter().enumerate() {
        // Up to the moment the next switch is called: after that the next color may answer.
        let window_end = switched
            .get(i + 1)
            .map(|s| s.0)
            .unwrap_or_else(Instant::now);
        let first_new = seen
            .iter()
            .filter(|(_, end, color)| color == target && *end >= *returned && *end < window_end)
            .map(|(_, end, _)| *end - *returned)
            .min();
        let stale: Vec<Duration> = seen
            .iter()
            .filter(|(start, _, color)| {
                color != target && *start >= *returned && *start < window_end
            })
            .map(|(_, end, _)| *end - *returned)
            .collect();
        result.stale_responses += stale.len() as u64;
        result
            .first_new_ms
            .push(first_new.unwrap_or(gap).as_secs_f64() * 1000.0);
        result.last_old_ms.push(
            stale
                .iter()
                .max()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0,
        );
    }
    Ok(result)
}
