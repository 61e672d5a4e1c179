//! The `mirror:` section: shadow traffic before the shift (and beside its canary steps) — which live requests are copied to the new color and how its answers are compared.

use std::time::Duration;

use bluegreen_router::{Color, Compare, CompareHeaders, JsonPath, MirrorRule};
use http::{HeaderName, Method};
use serde::Deserialize;

use super::Validator;
use crate::duration::HumanDuration;

/// A mirrored body is held in memory: it may not be larger than this.
const MAX_REQUEST_BODY_LIMIT: u64 = 16 << 20;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMirror {
    percent: u32,
    duration: HumanDuration,
    methods: Vec<String>,
    max_request_body: u64,
    timeout: HumanDuration,
    queue: u64,
    beside_canary: bool,
    compare: RawCompare,
}

impl Default for RawMirror {
    fn default() -> Self {
        RawMirror {
            percent: 10,
            duration: HumanDuration::secs(60),
            methods: vec!["GET".into(), "HEAD".into()],
            max_request_body: 0,
            timeout: HumanDuration::secs(5),
            queue: 1024,
            beside_canary: false,
            compare: RawCompare::default(),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawCompare {
    status: bool,
    headers: RawHeaders,
    body: bool,
    ignore_headers: Vec<String>,
    ignore_json_paths: Vec<String>,
}

impl Default for RawCompare {
    fn default() -> Self {
        RawCompare {
            status: true,
            headers: RawHeaders::Every(true),
            body: true,
            ignore_headers: vec!["date".into()],
            ignore_json_paths: Vec::new(),
        }
    }
}

/// `headers: true` (all but the ignored), `false`, or a list of the ones to compare.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum RawHeaders {
    Every(bool),
    Only(Vec<String>),
}

/// Shadow traffic as configured.
#[derive(Clone, Debug)]
pub struct MirrorSpec {
    pub percent: u8,
    /// How long the mirror stage compares before the shift.
    pub duration: Duration,
    pub methods: Vec<Method>,
    pub max_request_body: usize,
    pub timeout: Duration,
    pub queue: usize,
    /// Mirroring goes on during the canary steps (copies of the old color's requests).
    pub beside_canary: bool,
    pub compare: Compare,
}

impl MirrorSpec {
    /// The router's rule for release `id`, copying to `to`.
    pub fn rule(&self, id: i64, to: Color) -> MirrorRule {
        MirrorRule {
            id: id.max(0) as u64,
            to,
            percent: self.percent,
            methods: self.methods.clone(),
            max_request_body: self.max_request_body,
            timeout: self.timeout,
            queue: self.queue,
            compare: self.compare.clone(),
        }
    }
}

impl Validator<'_> {
    pub(super) fn mirror(&mut self, raw: RawMirror) -> MirrorSpec {
        if !(1..=100).contains(&raw.percent) {
            self.issue(
                "mirror.percent",
                format!(
                    "{} is out of range; give the share of live requests to copy, from 1 to 100",
                    raw.percent
                ),
            );
        }
        let duration = self.positive("mirror.duration", raw.duration);
        let timeout = self.positive("mirror.timeout", raw.timeout);
        if raw.methods.is_empty() {
            self.issue(
                "mirror.methods",
                "is empty; list the methods to copy, e.g. [GET, HEAD]",
            );
        }
        let mut methods = Vec::new();
        for (i, text) in raw.methods.iter().enumerate() {
            match Method::from_bytes(text.to_ascii_uppercase().as_bytes()) {
                Ok(method) if method != Method::CONNECT => methods.push(method),
                _ => self.issue(
                    format!("mirror.methods[{i}]"),
                    format!(
                        "{text:?} is not a method requests can be copied with; e.g. GET, HEAD, POST"
                    ),
                ),
            }
        }
        if raw.max_request_body > MAX_REQUEST_BODY_LIMIT {
            self.issue(
                "mirror.max_request_body",
                format!(
                    "{} is over {MAX_REQUEST_BODY_LIMIT} bytes (16 MiB): a copied body is held in memory; give a byte count like 65536",
                    raw.max_request_body
                ),
            );
        }
        if raw.queue == 0 || raw.queue > 1 << 20 {
            self.issue(
                "mirror.queue",
                format!(
                    "{} is out of range; give how many copies may wait to be sent, from 1 to 1048576, e.g. 1024",
                    raw.queue
                ),
            );
        }
        let header = |this: &mut Self, key: String, text: &str| match HeaderName::from_bytes(
            text.trim().to_ascii_lowercase().as_bytes(),
        ) {
            Ok(name) => Some(name),
            Err(_) => {
                this.issue(key, format!("{text:?} is not a header name; e.g. date"));
                None
            }
        };
        let c = raw.compare;
        let headers = match c.headers {
            RawHeaders::Every(true) => CompareHeaders::All,
            RawHeaders::Every(false) => CompareHeaders::None,
            RawHeaders::Only(names) => CompareHeaders::Only(
                names
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| header(self, format!("mirror.compare.headers[{i}]"), n))
                    .collect(),
            ),
        };
        let ignore_headers = c
            .ignore_headers
            .iter()
            .enumerate()
            .filter_map(|(i, n)| header(self, format!("mirror.compare.ignore_headers[{i}]"), n))
            .collect();
        let mut ignore_json_paths = Vec::new();
        for (i, text) in c.ignore_json_paths.iter().enumerate() {
            match JsonPath::parse(text) {
                Ok(path) => ignore_json_paths.push(path),
                Err(e) => self.issue(format!("mirror.compare.ignore_json_paths[{i}]"), e),
            }
        }
        MirrorSpec {
            percent: raw.percent.clamp(1, 100) as u8,
            duration,
            methods,
            max_request_body: raw.max_request_body.min(MAX_REQUEST_BODY_LIMIT) as usize,
            timeout,
            queue: raw.queue.clamp(1, 1 << 20) as usize,
            beside_canary: raw.beside_canary,
            compare: Compare {
                status: c.status,
                headers,
                body: c.body,
                ignore_headers,
                ignore_json_paths,
            },
        }
    }
}
