//! Fuzz target: raw bytes sent as HTTP/1 to a running router in front of a loopback upstream.
#![no_main]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bluegreen_router::{
    Color, ForwardedHeaders, HealthSettings, ListenerSettings, PreviewRule, ProxySettings, Router,
    RouterConfig, Split, StickyRule,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// How long one input may wait for the router's answer; a loopback round trip takes well
/// under a millisecond, so only a connection the router keeps open runs into it.
const REPLY_TIMEOUT: Duration = Duration::from_millis(50);

struct Harness {
    runtime: Runtime,
    router: SocketAddr,
}

/// The upstream: reads each request's body to its end, then answers 200 "ok".
async fn upstream(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(
                |request: hyper::Request<hyper::body::Incoming>| async move {
                    let _ = request.into_body().collect().await;
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
                },
            );
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let router = runtime.block_on(async {
            let upstream_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let upstream_addr = upstream_listener.local_addr().expect("addr");
            tokio::spawn(upstream(upstream_listener));
            let router = Router::new(RouterConfig {
                upstreams: [vec![upstream_addr], vec![upstream_addr]],
                split: Split::green_percent(0).expect("0% green"),
                // Preview and sticky rules on, so their header and cookie parsing is reached.
                preview: Some(PreviewRule {
                    header: "x-bluegreen-env".parse().expect("header name"),
                    cookie: "bluegreen_env".into(),
                    secret: None,
                    secret_header: "x-bluegreen-secret".parse().expect("header name"),
                }),
                sticky: Some(StickyRule {
                    cookie: "bluegreen_id".into(),
                }),
                proxy: ProxySettings {
                    connect_timeout: Duration::from_secs(1),
                    upstream_timeout: Duration::from_secs(2),
                    retries: 1,
                    forwarded: ForwardedHeaders {
                        x_forwarded_for: true,
                        x_forwarded_proto: true,
                        x_forwarded_host: true,
                        forwarded: true,
                        trust_incoming: false,
                    },
                    drain_timeout: Duration::from_secs(1),
                    close_grace: Duration::from_millis(100),
                },
                listener: ListenerSettings {
                    header_read_timeout: Duration::from_secs(2),
                    idle_timeout: Duration::from_secs(5),
                    max_header_bytes: 16 * 1024,
                    max_connections: 256,
                    tls: None,
                },
                health: HealthSettings {
                    path: "/healthz".into(),
                    interval: Duration::from_secs(1),
                    timeout: Duration::from_secs(1),
                    healthy_threshold: 1,
                    unhealthy_threshold: 3,
                },
            })
            .expect("router");
            router.start_health_checks().await;
            for color in Color::ALL {
                assert!(
                    router.table().pool(color).healthy_count() > 0,
                    "the loopback upstream passed its health check"
                );
            }
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            // The router lives as long as the process.
            std::mem::forget(router.serve(listener));
            std::mem::forget(router);
            addr
        });
        Harness { runtime, router }
    })
}

/// Checks every status line in the reply: HTTP/1.x (1.0 answers a 1.0 request), three digits, and no 5xx other than the
/// protocol's own 501/505 (a client's bad input is the client's error, so a 4xx).
fn check_reply(input: &[u8], reply: &[u8]) {
    // The HTTP/2 preface switches the connection to h2 (prior knowledge), and so does a part
    // of it cut short by the client (hyper-util's protocol detection): binary frames come
    // back, and only "no panic, no crash" is checked.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let n = input.len().min(PREFACE.len());
    if reply.is_empty() || input[..n] == PREFACE[..n] {
        return;
    }
    assert!(
        reply.len() >= 13
            && (reply.starts_with(b"HTTP/1.1 ") || reply.starts_with(b"HTTP/1.0 "))
            && reply[9..12].iter().all(u8::is_ascii_digit)
            && reply[12] == b' ',
        "reply does not start with a status line: {:?}\nfor input {:?}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)]),
        String::from_utf8_lossy(input)
    );
    let mut at = 0;
    while let Some(found) = find(&reply[at..], b"HTTP/1.") {
        let start = at + found;
        if let Some(code) = reply.get(start + 9..start + 12)
            && reply[start + 8] == b' '
            && code.iter().all(u8::is_ascii_digit)
        {
            let status = std::str::from_utf8(code).expect("digits");
            assert!(
                !status.starts_with('5') || status == "501" || status == "505",
                "{status} for a client's request:\n--- request\n{}\n--- reply\n{}",
                String::from_utf8_lossy(input),
                String::from_utf8_lossy(reply)
            );
        }
        at = start + 9;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let harness = harness();
    let reply = harness.runtime.block_on(async {
        let mut stream = TcpStream::connect(harness.router).await.expect("connect");
        // The router may answer and close before it read everything: not an error.
        let _ = stream.write_all(data).await;
        let _ = stream.shutdown().await;
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(REPLY_TIMEOUT, stream.read_to_end(&mut reply)).await;
        reply
    });
    check_reply(data, &reply);
});
