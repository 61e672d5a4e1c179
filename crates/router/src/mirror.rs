//! Shadow traffic: a share of the live color's requests copied to the other color once the live answer is sent, and the two answers compared; the client never waits for the copy.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use crate::metrics::latency_bucket_bounds_us;
use crate::proxy::{RequestBody, strip_hop_by_hop};
use crate::table::{Color, Pool};

/// How much of each answer's body is kept for a JSON comparison and a difference's excerpt;
/// past it, bodies are compared by hash and length only.
pub const KEPT_BODY_BYTES: usize = 1 << 20;
/// Differences kept per mirror (the first ones: later ones are counted, not kept).
pub const KEPT_DIFFERENCES: usize = 20;
/// Copies in flight to the mirrored color at once; the queue holds the ones waiting.
const IN_FLIGHT: usize = 32;
/// The header a mirrored request carries, so the application can tell a copy (and not, say,
/// send the e-mail twice).
pub const MIRROR_HEADER: HeaderName = HeaderName::from_static("x-bluegreen-mirror");

/// What is mirrored and how the answers are compared, as the control plane sets it.
#[derive(Clone, Debug)]
pub struct MirrorRule {
    /// Which mirror this is (the release's id): the kept differences start anew with another.
    pub id: u64,
    /// The color the copies go to: requests the other color answers are mirrored.
    pub to: Color,
    pub percent: u8,
    pub methods: Vec<Method>,
    /// Requests with a body are mirrored when it declares a length up to this (0: never).
    pub max_request_body: usize,
    /// How long a copy may take to be answered before it counts as failed.
    pub timeout: Duration,
    /// Copies waiting to be sent; one that finds the queue full is dropped and counted.
    pub queue: usize,
    pub compare: Compare,
}

/// Which parts of the two answers must agree.
#[derive(Clone, Debug)]
pub struct Compare {
    pub status: bool,
    pub headers: CompareHeaders,
    pub body: bool,
    /// Headers never compared (besides the per-hop ones and `content-length`).
    pub ignore_headers: Vec<HeaderName>,
    /// Places in JSON bodies never compared (a timestamp, a request id).
    pub ignore_json_paths: Vec<JsonPath>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum CompareHeaders {
    None,
    All,
    Only(Vec<HeaderName>),
}

impl MirrorRule {
    /// Whether a request of the live color, of this method, is one to copy.
    fn samples(&self, answered_by: Color, method: &Method) -> bool {
        answered_by != self.to
            && self.methods.contains(method)
            && (self.percent >= 100 || fastrand::u8(0..100) < self.percent)
    }
}

/// A place in a JSON document: `$.meta.request_id`, `items[*].updated_at`, `list[0]`.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonPath {
    text: String,
    steps: Vec<JsonStep>,
}

#[derive(Clone, Debug, PartialEq)]
enum JsonStep {
    Key(String),
    Index(usize),
    Every,
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, String> {
        let bad = |why: &str| {
            format!(
                "{text:?} is not a JSON path ({why}); write e.g. $.meta.request_id or items[*].updated_at"
            )
        };
        let rest = text.strip_prefix('$').unwrap_or(text);
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        let mut steps = Vec::new();
        for part in rest.split('.') {
            let (key, mut indexes) = match part.find('[') {
                Some(at) => (&part[..at], &part[at..]),
                None => (part, ""),
            };
            if key.is_empty() && indexes.is_empty() {
                return Err(bad("an empty step"));
            }
            if !key.is_empty() {
                steps.push(JsonStep::Key(key.to_string()));
            }
            while !indexes.is_empty() {
                let Some(end) = indexes.find(']').filter(|_| indexes.starts_with('[')) else {
                    return Err(bad("an unclosed ["));
                };
                let inside = &indexes[1..end];
                steps.push(match inside {
                    "*" => JsonStep::Every,
                    n => JsonStep::Index(n.parse().map_err(|_| bad("an index is a number or *"))?),
                });
                indexes = &indexes[end + 1..];
            }
        }
        Ok(JsonPath {
            text: text.to_string(),
            steps,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Takes out of `value` what the path names (nothing when it names nothing).
    fn remove_from(&self, value: &mut serde_json::Value) {
        remove(value, &self.steps);
    }
}

fn remove(value: &mut serde_json::Value, steps: &[JsonStep]) {
    let Some((step, rest)) = steps.split_first() else {
        return;
    };
    let last = rest.is_empty();
    match (step, value) {
        (JsonStep::Key(key), serde_json::Value::Object(map)) => {
            if last {
                map.remove(key);
            } else if let Some(inner) = map.get_mut(key) {
                remove(inner, rest);
            }
        }
        (JsonStep::Index(i), serde_json::Value::Array(items)) => {
            if last {
                if *i < items.len() {
                    items[*i] = serde_json::Value::Null;
                }
            } else if let Some(inner) = items.get_mut(*i) {
                remove(inner, rest);
            }
        }
        (JsonStep::Every, serde_json::Value::Array(items)) => {
            for item in items.iter_mut() {
                if last {
                    *item = serde_json::Value::Null;
                } else {
                    remove(item, rest);
                }
            }
        }
        _ => {}
    }
}

/// Everything counted of the mirror since the router started, and the first differences of
/// the current mirror.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct MirrorSnapshot {
    /// The color copies go to now (none: no mirror).
    pub to: Option<Color>,
    pub percent: u8,
    /// Copies queued to be sent.
    pub mirrored: u64,
    /// Copies dropped because the queue was full (the mirrored color is slower than live).
    pub dropped: u64,
    /// Requests that were to be copied but could not be: a body too large or of unknown
    /// length, or a live answer the client did not read to its end.
    pub skipped: u64,
    /// Pairs of answers compared.
    pub compared: u64,
    /// Pairs that differed.
    pub mismatched: u64,
    /// Copies the mirrored color did not answer (refused, failed, timed out).
    pub failed: u64,
    /// Latency of the live answers of the mirrored requests, per bucket of
    /// [`latency_bucket_bounds_us`] then +Inf.
    pub live_latency_buckets: Vec<u64>,
    /// Latency of the copies' answers, per bucket.
    pub mirror_latency_buckets: Vec<u64>,
    /// Which mirror (its rule's id: the release) the kept differences are of: the current
    /// one, or the last one until the next records a difference.
    pub differences_of: Option<u64>,
    /// The first differing pairs of that mirror.
    pub differences: Vec<MirrorDifference>,
}

/// One pair of answers that differed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct MirrorDifference {
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// `GET /path?query`.
    pub request: String,
    pub live_color: Color,
    pub live_status: u16,
    /// `None` when the copy got no answer.
    pub mirror_status: Option<u16>,
    /// What differs: `status`, `headers`, `body`, or `no answer`.
    pub what: String,
    /// The differing headers, the first differing place of the bodies (both sides), or why
    /// the copy got no answer.
    pub detail: String,
    pub live_ms: f64,
    pub mirror_ms: Option<f64>,
    /// How many pairs differed the same way (same request, same difference) since.
    pub times: u64,
}

/// The mirror's queue, counters and kept differences, shared by every request.
pub struct Mirror {
    queue: OnceLock<mpsc::UnboundedSender<Job>>,
    /// Copies in the queue now: bounded by the rule in force (`MirrorRule::queue`), so a new
    /// rule's bound applies at once.
    waiting: AtomicU64,
    mirrored: AtomicU64,
    dropped: AtomicU64,
    skipped: AtomicU64,
    compared: AtomicU64,
    mismatched: AtomicU64,
    failed: AtomicU64,
    live_latency: Buckets,
    mirror_latency: Buckets,
    /// The rule the kept differences belong to, and the differences.
    differences: Mutex<(u64, Vec<MirrorDifference>)>,
    connect_timeout: Duration,
}

struct Buckets([AtomicU64; 17]);

impl Buckets {
    fn new() -> Buckets {
        Buckets(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn add(&self, latency: Duration) {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let bounds = latency_bucket_bounds_us();
        let bucket = bounds
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(bounds.len());
        self.0[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> Vec<u64> {
        self.0.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }
}

/// A request's copy, and the live answer it will be compared with.
struct Job {
    rule: Arc<MirrorRule>,
    pool: Arc<Pool>,
    request: MirroredRequest,
    live: Answer,
}

/// What of the client's request goes to the mirrored color.
pub(crate) struct MirroredRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// One side's answer: status, headers, body (hashed whole, kept up to [`KEPT_BODY_BYTES`])
/// and the time to its headers.
pub(crate) struct Answer {
    pub color: Color,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: CapturedBody,
    /// What came after the body (gRPC's status travels here).
    pub trailers: HeaderMap,
    pub latency: Duration,
}

impl Answer {
    fn grpc_status(&self) -> Option<&str> {
        crate::protocol::grpc_field(GRPC_STATUS, &self.headers, &self.trailers)
    }
}

const GRPC_STATUS: &str = "grpc-status";

/// A body as it streams by: its hash and length, and its start.
#[derive(Default)]
pub(crate) struct CapturedBody {
    hasher: DefaultHasher,
    length: u64,
    kept: BytesMut,
}

impl CapturedBody {
    pub fn feed(&mut self, data: &[u8]) {
        self.hasher.write(data);
        self.length += data.len() as u64;
        let room = KEPT_BODY_BYTES.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }

    fn whole(&self) -> Option<&[u8]> {
        (self.length as usize == self.kept.len()).then_some(&self.kept[..])
    }
}

/// A mirrored request's live answer while it streams to the client; compared once it ended.
pub(crate) struct PendingMirror {
    mirror: Arc<Mirror>,
    rule: Arc<MirrorRule>,
    pool: Arc<Pool>,
    request: Option<MirroredRequest>,
    live: Option<Answer>,
}

impl PendingMirror {
    pub fn feed(&mut self, data: &[u8]) {
        if let Some(live) = self.live.as_mut() {
            live.body.feed(data);
        }
    }

    pub fn trailers(&mut self, trailers: &HeaderMap) {
        if let Some(live) = self.live.as_mut() {
            live.trailers = trailers.clone();
        }
    }

    /// The live answer was read to its end: the copy goes out.
    pub fn finish(mut self) {
        if let (Some(request), Some(live)) = (self.request.take(), self.live.take()) {
            let job = Job {
                rule: Arc::clone(&self.rule),
                pool: Arc::clone(&self.pool),
                request,
                live,
            };
            self.mirror.submit(job);
        }
    }
}

impl Drop for PendingMirror {
    fn drop(&mut self) {
        // Not finished: the client went away before the live answer's end.
        if self.request.is_some() {
            self.mirror.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Mirror {
    pub fn new(connect_timeout: Duration) -> Mirror {
        Mirror {
            queue: OnceLock::new(),
            waiting: AtomicU64::new(0),
            mirrored: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            compared: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            live_latency: Buckets::new(),
            mirror_latency: Buckets::new(),
            differences: Mutex::new((0, Vec::new())),
            connect_timeout,
        }
    }

    /// Whether this request is one to copy under `rule`; counts it as skipped when it is
    /// but its body cannot be (too large, or of unknown length).
    pub(crate) fn wants(
        &self,
        rule: &MirrorRule,
        answered_by: Color,
        method: &Method,
        headers: &HeaderMap,
        bodyless: bool,
    ) -> bool {
        if !rule.samples(answered_by, method) {
            return false;
        }
        if bodyless {
            return true;
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        // A body of no declared length (HTTP/2, chunked; every gRPC call) is read up to the
        // limit; one that turns out longer goes on to the live color uncopied.
        let fits = match declared {
            Some(length) => length <= rule.max_request_body,
            None => rule.max_request_body > 0,
        };
        if !fits {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        fits
    }

    /// A copy of the request on its way, waiting for the live answer it is compared with.
    pub(crate) fn pending(
        self: &Arc<Self>,
        rule: &Arc<MirrorRule>,
        pool: &Arc<Pool>,
        request: MirroredRequest,
        live: Answer,
    ) -> PendingMirror {
        PendingMirror {
            mirror: Arc::clone(self),
            rule: Arc::clone(rule),
            pool: Arc::clone(pool),
            request: Some(request),
            live: Some(live),
        }
    }

    pub(crate) fn skip(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Queues the copy, or drops it (counted) when the queue is full: the live path never
    /// waits for the mirror.
    fn submit(self: &Arc<Self>, job: Job) {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(send_copies(Arc::downgrade(self), receiver));
            sender
        });
        let bound = job.rule.queue.max(1) as u64;
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= bound {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match queue.send(job) {
            Ok(()) => {
                self.mirrored.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self, rule: Option<&MirrorRule>) -> MirrorSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let differences = self.differences.lock().expect("lock");
        MirrorSnapshot {
            to: rule.map(|rule| rule.to),
            percent: rule.map_or(0, |rule| rule.percent),
            mirrored: load(&self.mirrored),
            dropped: load(&self.dropped),
            skipped: load(&self.skipped),
            compared: load(&self.compared),
            mismatched: load(&self.mismatched),
            failed: load(&self.failed),
            live_latency_buckets: self.live_latency.counts(),
            mirror_latency_buckets: self.mirror_latency.counts(),
            differences_of: (!differences.1.is_empty()).then_some(differences.0),
            differences: differences.1.clone(),
        }
    }

    fn keep(&self, rule: &MirrorRule, difference: MirrorDifference) {
        let mut kept = self.differences.lock().expect("lock");
        if kept.0 != rule.id {
            *kept = (rule.id, Vec::new());
        }
        let same = kept.1.iter().position(|k| {
            k.request == difference.request
                && k.what == difference.what
                && k.detail == difference.detail
        });
        match same {
            Some(at) => kept.1[at].times += 1,
            None if kept.1.len() < KEPT_DIFFERENCES => kept.1.push(difference),
            None => {}
        }
    }
}

/// Takes copies off the queue and sends each, at most [`IN_FLIGHT`] at once; ends with the
/// router.
async fn send_copies(mirror: std::sync::Weak<Mirror>, mut queue: mpsc::UnboundedReceiver<Job>) {
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(job) = queue.recv().await {
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let Some(mirror) = mirror.upgrade() else {
            return;
        };
        // Out of the queue once it may be sent.
        mirror.waiting.fetch_sub(1, Ordering::AcqRel);
        tokio::spawn(async move {
            let copy = send_copy(&mirror, &job).await;
            mirror.record(job, copy);
            drop(permit);
        });
    }
}

/// Sends the copy to an upstream of the mirrored color and reads its answer to the end.
async fn send_copy(mirror: &Mirror, job: &Job) -> Result<Answer, String> {
    let color = job.rule.to;
    let Some(index) = job.pool.pick(&[]) else {
        return Err(format!("{color} has no healthy upstream"));
    };
    let upstream = Arc::clone(&job.pool.upstreams[index]);
    // A request without a body is sent without one (an empty body would add
    // `content-length: 0`, which the live request did not have).
    let body = match job.request.body.is_empty() {
        true => RequestBody::Empty,
        false => RequestBody::Buffered(Some(job.request.body.clone())),
    };
    let mut request = Request::new(body);
    *request.method_mut() = job.request.method.clone();
    *request.uri_mut() = job.request.uri.clone();
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = job.request.headers.clone();
    let started = Instant::now();
    let exchange = async {
        let (response, sender) = upstream
            .pool
            .send(
                upstream.addr,
                &upstream.authority,
                mirror.connect_timeout,
                request,
            )
            .await
            .map_err(|e| e.to_string())?;
        let latency = started.elapsed();
        let (mut head, mut body) = response.into_parts();
        let mut captured = CapturedBody::default();
        let mut trailers = HeaderMap::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("its body failed: {e}"))?;
            if let Some(data) = frame.data_ref() {
                captured.feed(data);
            } else if let Some(sent) = frame.trailers_ref() {
                trailers = sent.clone();
            }
        }
        if body.is_end_stream() {
            upstream.pool.put(sender);
        }
        strip_hop_by_hop(&mut head.headers, false);
        Ok(Answer {
            color,
            status: head.status,
            headers: head.headers,
            body: captured,
            trailers,
            latency,
        })
    };
    match tokio::time::timeout(job.rule.timeout, exchange).await {
        Ok(answer) => answer.map_err(|e: String| format!("{} ({e})", upstream.addr)),
        Err(_) => Err(format!(
            "{} did not answer within {}ms",
            upstream.addr,
            job.rule.timeout.as_millis()
        )),
    }
}

impl Mirror {
    /// Counts the pair and keeps it when it differs.
    fn record(&self, job: Job, copy: Result<Answer, String>) {
        let Job {
            rule,
            request,
            live,
            ..
        } = job;
        self.live_latency.add(live.latency);
        let request_line = format!("{} {}", request.method, request.uri);
        let difference = match &copy {
            Ok(answer) => {
                self.mirror_latency.add(answer.latency);
                self.compared.fetch_add(1, Ordering::Relaxed);
                let differs = compare(&rule.compare, &live, answer);
                if differs.is_some() {
                    self.mismatched.fetch_add(1, Ordering::Relaxed);
                }
                differs
            }
            Err(why) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Some(("no answer".to_string(), why.clone()))
            }
        };
        if let Some((what, detail)) = difference {
            let copy = copy.as_ref().ok();
            self.keep(
                &rule,
                MirrorDifference {
                    at_ms: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as i64),
                    request: request_line,
                    live_color: live.color,
                    live_status: live.status.as_u16(),
                    mirror_status: copy.map(|c| c.status.as_u16()),
                    what,
                    detail,
                    live_ms: live.latency.as_secs_f64() * 1000.0,
                    mirror_ms: copy.map(|c| c.latency.as_secs_f64() * 1000.0),
                    times: 1,
                },
            );
        }
    }
}

/// What differs between the live answer and the copy's, as (`status`|`headers`|`body`, the
/// detail); `None` when they agree on everything `compare` asks for.
fn compare(rule: &Compare, live: &Answer, copy: &Answer) -> Option<(String, String)> {
    if rule.status && live.status != copy.status {
        return Some((
            "status".into(),
            format!(
                "{} answered {}, {} answered {}",
                live.color,
                live.status.as_u16(),
                copy.color,
                copy.status.as_u16()
            ),
        ));
    }
    // A gRPC call's outcome is its grpc-status (the HTTP status is 200 either way).
    if rule.status && live.grpc_status() != copy.grpc_status() {
        let status = |a: &Answer| a.grpc_status().unwrap_or("none").to_string();
        return Some((
            "grpc-status".into(),
            format!(
                "{} answered grpc-status {}, {} answered {}",
                live.color,
                status(live),
                copy.color,
                status(copy)
            ),
        ));
    }
    if let Some(detail) = differing_headers(rule, live, copy) {
        return Some(("headers".into(), detail));
    }
    if rule.body
        && let Some(detail) = differing_bodies(rule, live, copy)
    {
        return Some(("body".into(), detail));
    }
    None
}

fn differing_headers(rule: &Compare, live: &Answer, copy: &Answer) -> Option<String> {
    let names: Vec<HeaderName> = match &rule.headers {
        CompareHeaders::None => return None,
        CompareHeaders::Only(names) => names.clone(),
        CompareHeaders::All => {
            let mut names: Vec<HeaderName> = live
                .headers
                .keys()
                .chain(copy.headers.keys())
                .cloned()
                .collect();
            names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            names.dedup();
            names
        }
    };
    let differing: Vec<String> = names
        .iter()
        .filter(|name| **name != header::CONTENT_LENGTH && !rule.ignore_headers.contains(name))
        .filter_map(|name| {
            let values = |headers: &HeaderMap| -> Vec<String> {
                headers
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect()
            };
            let (a, b) = (values(&live.headers), values(&copy.headers));
            (a != b).then(|| {
                format!(
                    "{name}: {} {:?}, {} {:?}",
                    live.color,
                    a.join(", "),
                    copy.color,
                    b.join(", ")
                )
            })
        })
        .collect();
    (!differing.is_empty()).then(|| differing.join("; "))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            let t = t.trim();
            t.eq_ignore_ascii_case("application/json") || t.ends_with("+json")
        })
}

fn differing_bodies(rule: &Compare, live: &Answer, copy: &Answer) -> Option<String> {
    // JSON both sides, whole: compared as values, the ignored paths taken out.
    if is_json(&live.headers)
        && is_json(&copy.headers)
        && let (Some(a), Some(b)) = (live.body.whole(), copy.body.whole())
        && let (Ok(mut a), Ok(mut b)) = (
            serde_json::from_slice::<serde_json::Value>(a),
            serde_json::from_slice::<serde_json::Value>(b),
        )
    {
        for path in &rule.ignore_json_paths {
            path.remove_from(&mut a);
            path.remove_from(&mut b);
        }
        return first_json_difference("$", &a, &b).map(|(place, x, y)| {
            format!(
                "{place}: {} {}, {} {}",
                live.color,
                excerpt(&x),
                copy.color,
                excerpt(&y)
            )
        });
    }
    let (a, b) = (&live.body, &copy.body);
    if a.length == b.length && a.hasher.finish() == b.hasher.finish() {
        return None;
    }
    let at = a
        .kept
        .iter()
        .zip(b.kept.iter())
        .position(|(x, y)| x != y)
        .unwrap_or(a.kept.len().min(b.kept.len()));
    let around = |kept: &BytesMut| {
        let from = at.saturating_sub(20);
        let to = (at + 40).min(kept.len());
        format!(
            "{:?}",
            excerpt(&String::from_utf8_lossy(&kept[from.min(to)..to]))
        )
    };
    Some(format!(
        "byte {at} of {} / {} bytes: {} {}, {} {}",
        a.length,
        b.length,
        live.color,
        around(&a.kept),
        copy.color,
        around(&b.kept)
    ))
}

/// The first place where two JSON values differ, with both sides there.
fn first_json_difference(
    place: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
) -> Option<(String, String, String)> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|key| {
                let place = format!("{place}.{key}");
                match (x.get(key), y.get(key)) {
                    (Some(p), Some(q)) => first_json_difference(&place, p, q),
                    (p, q) => Some((place, shown(p), shown(q))),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) => {
            let common = x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (p, q))| first_json_difference(&format!("{place}[{i}]"), p, q));
            common.or_else(|| {
                (x.len() != y.len()).then(|| {
                    (
                        format!("{place} length"),
                        x.len().to_string(),
                        y.len().to_string(),
                    )
                })
            })
        }
        _ => (a != b).then(|| (place.to_string(), a.to_string(), b.to_string())),
    }
}

fn shown(value: Option<&serde_json::Value>) -> String {
    value.map_or_else(|| "(absent)".to_string(), |v| v.to_string())
}

/// At most 80 characters of `text`, on one line.
fn excerpt(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

/// Reads a request body of at most `limit` bytes, for the live upstream and the copy alike;
/// stops at the first byte past it (a body whose length was not declared).
pub(crate) async fn read_body(
    mut body: hyper::body::Incoming,
    limit: usize,
) -> Result<ReadBody, String> {
    let mut read = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            read.extend_from_slice(&data);
            if read.len() > limit {
                return Ok(ReadBody::Longer {
                    read: read.freeze(),
                    rest: body,
                });
            }
        }
    }
    Ok(ReadBody::Whole(read.freeze()))
}

/// A request body read for copying.
pub(crate) enum ReadBody {
    Whole(Bytes),
    /// Longer than the limit (its length was not declared): what was read, and the rest still
    /// to stream to the live color.
    Longer {
        read: Bytes,
        rest: hyper::body::Incoming,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(color: Color, status: u16, content_type: &str, body: &str) -> Answer {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        headers.insert(header::DATE, format!("{color}").parse().unwrap());
        let mut captured = CapturedBody::default();
        for chunk in body.as_bytes().chunks(3) {
            captured.feed(chunk);
        }
        Answer {
            color,
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: captured,
            trailers: HeaderMap::new(),
            latency: Duration::from_millis(1),
        }
    }

    fn rule(ignore_json_paths: &[&str]) -> Compare {
        Compare {
            status: true,
            headers: CompareHeaders::All,
            body: true,
            ignore_headers: vec![header::DATE],
            ignore_json_paths: ignore_json_paths
                .iter()
                .map(|p| JsonPath::parse(p).unwrap())
                .collect(),
        }
    }

    #[test]
    fn equal_answers_agree_and_a_status_or_body_difference_is_named() {
        let live = answer(Color::Blue, 200, "text/plain", "hello world");
        let same = answer(Color::Green, 200, "text/plain", "hello world");
        assert_eq!(compare(&rule(&[]), &live, &same), None);
        let failing = answer(Color::Green, 500, "text/plain", "hello world");
        let (what, detail) = compare(&rule(&[]), &live, &failing).unwrap();
        assert_eq!(what, "status");
        assert_eq!(detail, "blue answered 200, green answered 500");
        let other = answer(Color::Green, 200, "text/plain", "hello wOrld");
        let (what, detail) = compare(&rule(&[]), &live, &other).unwrap();
        assert_eq!(what, "body");
        assert!(detail.starts_with("byte 7 of 11 / 11 bytes"), "{detail}");
        let typed = answer(Color::Green, 200, "text/html", "hello world");
        let (what, detail) = compare(&rule(&[]), &live, &typed).unwrap();
        assert_eq!(what, "headers");
        assert!(
            detail.starts_with("content-type: blue \"text/plain\""),
            "{detail}"
        );
    }

    #[test]
    fn json_bodies_are_compared_as_values_without_the_ignored_paths() {
        let live = answer(
            Color::Blue,
            200,
            "application/json",
            r#"{"id": 7, "at": "10:00", "items": [{"n": 1, "seen": 1}], "version": "1.0"}"#,
        );
        let copy = answer(
            Color::Green,
            200,
            "application/json; charset=utf-8",
            r#"{"version": "1.0", "items": [{"seen": 2, "n": 1}], "at": "10:01", "id": 7}"#,
        );
        let loose = Compare {
            headers: CompareHeaders::None,
            ..rule(&["$.at", "items[*].seen"])
        };
        assert_eq!(compare(&loose, &live, &copy), None);
        let strict = Compare {
            headers: CompareHeaders::None,
            ..rule(&["$.at"])
        };
        let (what, detail) = compare(&strict, &live, &copy).unwrap();
        assert_eq!(what, "body");
        assert_eq!(detail, "$.items[0].seen: blue 1, green 2");
    }

    #[test]
    fn only_the_live_colors_requests_of_the_listed_methods_with_a_bounded_body_are_copied() {
        let mirror = Mirror::new(Duration::from_secs(1));
        let rule = MirrorRule {
            id: 1,
            to: Color::Green,
            percent: 100,
            methods: vec![Method::GET, Method::POST],
            max_request_body: 10,
            timeout: Duration::from_secs(1),
            queue: 8,
            compare: rule(&[]),
        };
        let none = HeaderMap::new();
        assert!(mirror.wants(&rule, Color::Blue, &Method::GET, &none, true));
        // Green's own answers (a canary's share) have nothing to be compared with.
        assert!(!mirror.wants(&rule, Color::Green, &Method::GET, &none, true));
        assert!(!mirror.wants(&rule, Color::Blue, &Method::DELETE, &none, true));
        let mut small = HeaderMap::new();
        small.insert(header::CONTENT_LENGTH, "10".parse().unwrap());
        assert!(mirror.wants(&rule, Color::Blue, &Method::POST, &small, false));
        let mut large = HeaderMap::new();
        large.insert(header::CONTENT_LENGTH, "11".parse().unwrap());
        assert!(!mirror.wants(&rule, Color::Blue, &Method::POST, &large, false));
        // A body of no declared length (chunked, HTTP/2, gRPC) is read up to the limit.
        assert!(mirror.wants(&rule, Color::Blue, &Method::POST, &none, false));
        assert_eq!(mirror.snapshot(Some(&rule)).skipped, 1);
        let never = MirrorRule {
            max_request_body: 0,
            ..rule.clone()
        };
        assert!(!mirror.wants(&never, Color::Blue, &Method::POST, &small, false));
        assert!(!mirror.wants(&never, Color::Blue, &Method::POST, &none, false));
    }

    #[test]
    fn a_grpc_status_difference_is_named_though_both_answered_200() {
        let grpc = |color, status: &str, in_trailers: bool| {
            let mut answer = answer(color, 200, "application/grpc", "\0\0\0\0\0");
            let target = match in_trailers {
                true => &mut answer.trailers,
                false => &mut answer.headers,
            };
            target.insert(GRPC_STATUS, status.parse().unwrap());
            answer
        };
        let compare_rule = Compare {
            body: false,
            ..rule(&[])
        };
        let live = grpc(Color::Blue, "0", true);
        assert!(compare(&compare_rule, &live, &grpc(Color::Green, "0", true)).is_none());
        let (what, detail) =
            compare(&compare_rule, &live, &grpc(Color::Green, "13", false)).unwrap();
        assert_eq!(what, "grpc-status");
        assert_eq!(detail, "blue answered grpc-status 0, green answered 13");
    }

    #[test]
    fn a_json_path_that_cannot_be_read_is_refused_with_an_example() {
        assert!(JsonPath::parse("$.a.b[*].c").is_ok());
        assert!(JsonPath::parse("list[0]").is_ok());
        for bad in ["a..b", "a[x]", "a[1", ""] {
            let error = JsonPath::parse(bad).unwrap_err();
            assert!(error.contains("write e.g. $.meta.request_id"), "{error}");
        }
    }
}
