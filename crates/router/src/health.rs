//! Active health checks: an HTTP GET (or a gRPC health check) per upstream every interval, flipping state by thresholds.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, header};
use http_body_util::BodyExt;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::pool::Sender;
use crate::protocol::grpc_field;
use crate::proxy::RequestBody;
use crate::upstream::{Thresholds, Upstream};

#[derive(Clone, Debug, PartialEq)]
pub struct HealthSettings {
    /// Path requested on each upstream; a 2xx or 3xx answer is healthy.
    pub path: String,
    /// On HTTP/2 upstreams, check with the gRPC health checking protocol for this service
    /// ("" for the whole server) instead of `GET path`.
    pub grpc_service: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl HealthSettings {
    /// What a check asks for, as told in its errors.
    fn target(&self) -> &str {
        match &self.grpc_service {
            Some(_) => GRPC_HEALTH_CHECK,
            None => &self.path,
        }
    }

    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            healthy: self.healthy_threshold,
            unhealthy: self.unhealthy_threshold,
        }
    }
}

/// One check on a fresh connection, so a check also proves the upstream still accepts them.
pub async fn check(upstream: &Upstream, settings: &HealthSettings) -> Result<(), String> {
    let attempt = async {
        let connector = upstream.pool.connector();
        let mut sender = connector
            .connect(upstream.addr, settings.timeout)
            .await
            .map_err(|e| format!("health check connect: {e}"))?;
        match &settings.grpc_service {
            Some(service) if connector.is_http2() => {
                grpc_check(upstream, &mut sender, service).await
            }
            _ => http_check(upstream, &mut sender, &settings.path).await,
        }
    };
    match tokio::time::timeout(settings.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "health check {} got no answer within {}ms",
            settings.target(),
            settings.timeout.as_millis()
        )),
    }
}

/// `GET path`: a 2xx or 3xx answer is healthy.
async fn http_check(upstream: &Upstream, sender: &mut Sender, path: &str) -> Result<(), String> {
    let mut request = Request::get(path)
        .header(header::HOST, upstream.authority.as_str())
        .header(header::USER_AGENT, USER_AGENT)
        .body(RequestBody::Empty)
        .map_err(|e| format!("health check request: {e}"))?;
    let connector = upstream.pool.connector();
    if !connector.is_http2() {
        request
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    connector.adapt(&mut request, &upstream.authority);
    let status = sender
        .try_send(request)
        .await
        .map_err(|e| format!("health check request: {}", e.into_error()))?
        .status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("health check {path} answered {status}"))
    }
}

/// The gRPC health checking protocol: `grpc.health.v1.Health/Check` for `service` ("" is the
/// whole server) must answer `SERVING`.
async fn grpc_check(upstream: &Upstream, sender: &mut Sender, service: &str) -> Result<(), String> {
    let mut request = Request::post(GRPC_HEALTH_CHECK)
        .header(header::HOST, upstream.authority.as_str())
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(RequestBody::Buffered(Some(grpc::health_request(service))))
        .map_err(|e| format!("health check request: {e}"))?;
    upstream
        .pool
        .connector()
        .adapt(&mut request, &upstream.authority);
    let response = sender
        .try_send(request)
        .await
        .map_err(|e| format!("health check {GRPC_HEALTH_CHECK}: {}", e.into_error()))?;
    let (head, body) = response.into_parts();
    if !head.status.is_success() {
        return Err(format!(
            "health check {GRPC_HEALTH_CHECK} answered {}",
            head.status
        ));
    }
    let body = body
        .collect()
        .await
        .map_err(|e| format!("health check {GRPC_HEALTH_CHECK}: {e}"))?;
    let trailers = body.trailers().cloned().unwrap_or_default();
    let status = grpc_field("grpc-status", &head.headers, &trailers).unwrap_or("");
    if status != "0" {
        let message = grpc_field("grpc-message", &head.headers, &trailers).unwrap_or("");
        return Err(format!(
            "health check {GRPC_HEALTH_CHECK} answered grpc-status {status:?} {message}"
        ));
    }
    match grpc::serving_status(&body.to_bytes()) {
        Some(1) => Ok(()),
        other => Err(format!(
            "health check {GRPC_HEALTH_CHECK} for service {service:?} reports {}",
            grpc::status_name(other)
        )),
    }
}

const USER_AGENT: &str = "bluegreen-health-check";
const GRPC_HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// The two messages of the gRPC health checking protocol, in protobuf's wire format: each
/// has one field, too little to take a protobuf library onto the router for.
mod grpc {
    use bytes::{BufMut, Bytes, BytesMut};

    /// A length-prefixed `HealthCheckRequest { string service = 1; }`.
    pub fn health_request(service: &str) -> Bytes {
        let mut message = BytesMut::new();
        if !service.is_empty() {
            message.put_u8(0x0a); // field 1, length-delimited
            put_varint(&mut message, service.len() as u64);
            message.put_slice(service.as_bytes());
        }
        let mut framed = BytesMut::with_capacity(5 + message.len());
        framed.put_u8(0); // not compressed
        framed.put_u32(message.len() as u32);
        framed.put_slice(&message);
        framed.freeze()
    }

    /// `HealthCheckResponse.status` (field 1, an enum) of one length-prefixed message; an
    /// empty message is the default, 0 (UNKNOWN). `None` when the bytes are not that.
    pub fn serving_status(framed: &[u8]) -> Option<u64> {
        let (&[compressed, l0, l1, l2, l3], message) = framed.split_first_chunk::<5>()?;
        let length = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
        if compressed != 0 || message.len() != length {
            return None;
        }
        let mut status = 0;
        let mut rest = message;
        while let Some((&tag, after)) = rest.split_first() {
            let (value, after) = varint(after)?;
            match tag {
                0x08 => status = value,
                _ => return None, // no other field in this message
            }
            rest = after;
        }
        Some(status)
    }

    pub fn status_name(status: Option<u64>) -> String {
        match status {
            Some(0) => "UNKNOWN".into(),
            Some(1) => "SERVING".into(),
            Some(2) => "NOT_SERVING".into(),
            Some(3) => "SERVICE_UNKNOWN".into(),
            Some(other) => format!("status {other}"),
            None => "an answer that is not a HealthCheckResponse".into(),
        }
    }

    fn put_varint(out: &mut BytesMut, mut value: u64) {
        while value >= 0x80 {
            out.put_u8((value as u8 & 0x7f) | 0x80);
            value >>= 7;
        }
        out.put_u8(value as u8);
    }

    fn varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
        let mut value = 0u64;
        for (i, &byte) in bytes.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some((value, &bytes[i + 1..]));
            }
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn requests_and_answers_in_protobuf_wire_format() {
            assert_eq!(&health_request("")[..], &[0, 0, 0, 0, 0]);
            assert_eq!(
                &health_request("echo.Echo")[..],
                &[
                    0, 0, 0, 0, 11, 0x0a, 9, b'e', b'c', b'h', b'o', b'.', b'E', b'c', b'h', b'o'
                ]
            );
            let long = "s".repeat(200);
            assert_eq!(&health_request(&long)[5..8], &[0x0a, 0xc8, 0x01]);
            assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
            assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 2]), Some(2));
            assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
            assert_eq!(serving_status(&[0, 0, 0, 0, 3, 0x08, 1]), None, "length");
            assert_eq!(
                serving_status(&[1, 0, 0, 0, 2, 0x08, 1]),
                None,
                "compressed"
            );
            assert_eq!(
                serving_status(&[0, 0, 0, 0, 2, 0x10, 1]),
                None,
                "other field"
            );
            assert_eq!(serving_status(&[0, 0]), None);
        }
    }
}

/// Checks every upstream once, concurrently, so a fresh router knows where it can route.
pub async fn check_all_once(upstreams: &[Arc<Upstream>], settings: &HealthSettings) {
    let mut checks = JoinSet::new();
    for upstream in upstreams {
        let upstream = Arc::clone(upstream);
        let settings = settings.clone();
        checks.spawn(async move {
            let result = check(&upstream, &settings).await;
            upstream.record_check(result, settings.thresholds());
        });
    }
    while checks.join_next().await.is_some() {}
}

/// Keeps checking each upstream every interval until `stop` is cancelled or the upstream is
/// gone (removed from the table and no request holds it any more).
pub fn spawn_checks(
    tasks: &mut JoinSet<()>,
    upstreams: &[Arc<Upstream>],
    settings: &HealthSettings,
    stop: &CancellationToken,
) {
    for upstream in upstreams {
        let upstream = Arc::downgrade(upstream);
        let settings = settings.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let start = tokio::time::Instant::now() + settings.interval;
            let mut ticks = tokio::time::interval_at(start, settings.interval);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = ticks.tick() => {
                        let Some(upstream) = upstream.upgrade() else { return };
                        let result = check(&upstream, &settings).await;
                        upstream.record_check(result, settings.thresholds());
                    }
                }
            }
        });
    }
}
