//! Keep-alive HTTP/1.1 connections parked between requests: every way a next request can
//! arrive still served, and every connection hyper would close still closed.

mod support;

use std::time::{Duration, Instant};

use support::{Backend, Daemon, config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one response (its head and a body framed by Content-Length or chunked) and gives
/// back its status and body; bytes read past it are kept in `pending`.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (u16, Vec<u8>) {
    let within = Duration::from_secs(10);
    tokio::time::timeout(within, async {
        let head_end = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            fill(stream, pending).await;
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
        let status: u16 = head[9..12].parse().expect("a status code");
        pending.drain(..head_end);
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>().expect("a length"));
        let body = match length {
            Some(length) => {
                while pending.len() < length {
                    fill(stream, pending).await;
                }
                pending.drain(..length).collect()
            }
            None => {
                assert!(head.contains("transfer-encoding: chunked"), "{head}");
                let mut body = Vec::new();
                loop {
                    let line_end = loop {
                        if let Some(end) = pending.windows(2).position(|w| w == b"\r\n") {
                            break end;
                        }
                        fill(stream, pending).await;
                    };
                    let size = usize::from_str_radix(
                        String::from_utf8_lossy(&pending[..line_end]).trim(),
                        16,
                    )
                    .expect("a chunk size");
                    while pending.len() < line_end + 2 + size + 2 {
                        fill(stream, pending).await;
                    }
                    body.extend_from_slice(&pending[line_end + 2..line_end + 2 + size]);
                    pending.drain(..line_end + 2 + size + 2);
                    if size == 0 {
                        break body;
                    }
                }
            }
        };
        (status, body)
    })
    .await
    .expect("a whole response within 10 s")
}

async fn fill(stream: &mut TcpStream, pending: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await.expect("read");
    assert!(
        n > 0,
        "closed mid-response: {:?}",
        String::from_utf8_lossy(pending)
    );
    pending.extend_from_slice(&chunk[..n]);
}

/// The router's `bluegreen_connections_parked` gauge.
async fn parked(daemon: &Daemon) -> u64 {
    let (_, metrics) = daemon.admin("GET", "/metrics", None).await;
    let text = metrics.as_str().expect("metrics text").to_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("bluegreen_connections_parked "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no bluegreen_connections_parked in {text}"))
}

async fn wait_parked(daemon: &Daemon, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = parked(daemon).await;
        if now == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} connections parked, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the router to close the connection, reading (and returning) what it still sent.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the router closed the connection: {read:?}"
    );
    rest
}

const GET: &[u8] = b"GET /who HTTP/1.1\r\nHost: app\r\n\r\n";

/// When connections are parked: after 200 ms idle (the default with few connections open),
/// or as soon as they have answered (as with over 1,000 open).
#[derive(Clone, Copy)]
enum Parking {
    WhenIdle,
    AtOnce,
}

async fn start(config: &str, parking: Parking) -> Daemon {
    let threshold = match parking {
        Parking::WhenIdle => "1000",
        Parking::AtOnce => "0",
    };
    let dir = tempfile::tempdir().unwrap();
    Daemon::start_with_env(dir, config, &[("BLUEGREEN_PARK_AT_ONCE_ABOVE", threshold)]).await
}

async fn a_parked_connection_serves_its_next_request_however_it_arrives(parking: Parking) {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = start(&config(&[&blue], &[&green], ""), parking).await;
    let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
    let mut pending = Vec::new();

    stream.write_all(GET).await.unwrap();
    let (status, body) = read_response(&mut stream, &mut pending).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    wait_parked(&daemon, 1).await;

    // The next request on the same socket.
    stream.write_all(GET).await.unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    wait_parked(&daemon, 1).await;

    // Three pipelined in one write: answered in order, none lost across a park.
    let three = [GET, GET, GET].concat();
    stream.write_all(&three).await.unwrap();
    for _ in 0..3 {
        assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    }
    wait_parked(&daemon, 1).await;

    // A request head split across two writes with a pause between.
    stream.write_all(&GET[..12]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(&GET[12..]).await.unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);

    // A body, by length and chunked: read to its end, then the connection parks again.
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    wait_parked(&daemon, 1).await;
    stream
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    wait_parked(&daemon, 1).await;
    assert!(pending.is_empty(), "nothing extra was sent: {pending:?}");
    assert_eq!(blue.served(), 8);
}

async fn connections_that_ask_to_close_are_closed_not_parked(parking: Parking) {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = start(&config(&[&blue], &[&green], ""), parking).await;

    for request in [
        &b"GET /who HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"[..],
        &b"GET /who HTTP/1.0\r\nHost: app\r\n\r\n"[..],
    ] {
        let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let answer = read_to_close(&mut stream).await;
        let answer = String::from_utf8_lossy(&answer);
        // hyper answers in the request's version.
        assert!(
            answer.starts_with("HTTP/1.") && answer[8..].starts_with(" 200"),
            "{answer}"
        );
    }
    assert_eq!(parked(&daemon).await, 0);

    // A request whose body has not all arrived when its answer is written (hyper is still reading
    // it, and the router checks it too): the rest of the
    // body is still to come on the socket, so the connection is not parked (where it would be
    // read as a request), and what follows is never served as one.
    let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
    stream
        .write_all(b"POST /who HTTP/1.1\r\nHost: app\r\nContent-Length: 64\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut pending = Vec::new();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(parked(&daemon).await, 0);
    let _ = stream
        .write_all(b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        blue.served(),
        3,
        "the bytes after the answer were not served as a request"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_connection_is_closed_after_idle_timeout() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  idle_timeout: 400ms\n")).await;
    let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
    let mut pending = Vec::new();
    stream.write_all(GET).await.unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    let answered = Instant::now();
    assert!(read_to_close(&mut stream).await.is_empty());
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(350),
        "closed while not yet idle: {idle:?}"
    );
    assert_eq!(parked(&daemon).await, 0);
}

/// A stop: a parked connection gets the stop's grace for a last request, answered with
/// `Connection: close`, and is closed after it.
async fn a_parked_connection_gets_a_last_request_in_a_stops_grace(parking: Parking) {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let mut daemon = start(&config(&[&blue], &[&green], ""), parking).await;
    let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
    let mut pending = Vec::new();
    stream.write_all(GET).await.unwrap();
    assert_eq!(read_response(&mut stream, &mut pending).await.0, 200);
    wait_parked(&daemon, 1).await;
    let pid = daemon.pid();
    let stopping = tokio::task::spawn_blocking(move || {
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
    });
    assert!(stopping.await.unwrap().success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.write_all(GET).await.unwrap();
    let last = String::from_utf8_lossy(&read_to_close(&mut stream).await).to_ascii_lowercase();
    assert!(last.starts_with("http/1.1 200"), "{last}");
    assert!(last.contains("connection: close"), "{last}");
    assert!(daemon.wait_exit().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_connection_serves_its_next_request_however_it_arrives_when_idle() {
    a_parked_connection_serves_its_next_request_however_it_arrives(Parking::WhenIdle).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_connection_serves_its_next_request_however_it_arrives_at_once() {
    a_parked_connection_serves_its_next_request_however_it_arrives(Parking::AtOnce).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_ask_to_close_are_closed_not_parked_when_idle() {
    connections_that_ask_to_close_are_closed_not_parked(Parking::WhenIdle).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_ask_to_close_are_closed_not_parked_at_once() {
    connections_that_ask_to_close_are_closed_not_parked(Parking::AtOnce).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_connection_gets_a_last_request_in_a_stops_grace_when_idle() {
    a_parked_connection_gets_a_last_request_in_a_stops_grace(Parking::WhenIdle).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_connection_gets_a_last_request_in_a_stops_grace_at_once() {
    a_parked_connection_gets_a_last_request_in_a_stops_grace(Parking::AtOnce).await;
}
