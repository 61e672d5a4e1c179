//! Upstream failures: ejection of a killed upstream, and the router's own typed error responses.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::{Backend, Daemon, client, config, get};

/// Kills one of blue's two upstreams while 8 keep-alive clients hammer the router.
/// Returns (failed requests, total requests).
async fn kill_one_upstream_under_load(retries: u32) -> (usize, usize, serde_json::Value) {
    let blue1 = Backend::start("blue-1").await;
    let blue2 = Backend::start("blue-2").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(
        &[&blue1, &blue2],
        &[&green],
        &format!("  retries: {retries}\n"),
    ))
    .await;
    let running = Arc::new(AtomicBool::new(true));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let running = Arc::clone(&running);
            let url = daemon.url("/slow?sleep_ms=2");
            tokio::spawn(async move {
                let http = client();
                let mut results = Vec::new();
                while running.load(Ordering::Relaxed) && results.len() < 50_000 {
                    results.push(get(&http, &url, &[]).await);
                }
                results
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    blue2.kill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    running.store(false, Ordering::Relaxed);
    let mut failed = 0;
    let mut total = 0;
    for worker in workers {
        for result in worker.await.unwrap() {
            total += 1;
            if !matches!(result, Ok((200, _, _))) {
                failed += 1;
            }
        }
    }
    let status = daemon.status().await;
    (failed, total, status)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_upstream_is_ejected_and_retries_hide_it_from_clients() {
    let (failed, total, status) = kill_one_upstream_under_load(1).await;
    let blue = &status["colors"][0];
    assert_eq!(blue["upstreams"][1]["health"], "unhealthy", "{blue}");
    assert!(blue["upstreams"][1]["last_error"].as_str().is_some());
    assert_eq!(blue["healthy_upstreams"], 1);
    // Every request here is an idempotent GET without a body, so each one that met the dead
    // upstream was retried on the live one.
    assert_eq!(failed, 0, "{failed} of {total} failed");
    assert!(total > 200, "only {total} requests");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_retries_the_errors_are_bounded_by_the_requests_in_flight() {
    let (failed, total, status) = kill_one_upstream_under_load(0).await;
    assert_eq!(status["colors"][0]["upstreams"][1]["health"], "unhealthy");
    // Only requests in flight on the dead upstream when it died, and those that picked it
    // before the first failure ejected it, can fail: at most one per client (8).
    assert!(failed <= 8, "{failed} of {total} failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_router_answers_for_itself_with_typed_errors() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  upstream_timeout: 300ms\n")).await;
    let http = client();

    let response = support::get_response(&http, &daemon.url("/slow?sleep_ms=2000")).await;
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["x-bluegreen-error"], "upstream-timeout");

    blue.set_healthy(false);
    daemon.wait_healthy("blue", 0).await;
    let (status, _, body) = get(&http, &daemon.url("/"), &[]).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "503 no-healthy-upstream: no healthy upstream in environment blue\n"
    );

    let metrics = daemon.status().await["colors"][0]["metrics"].clone();
    assert_eq!(metrics["responses_5xx"], 2, "{metrics}");
    assert_eq!(
        metrics["upstream_errors"], 1,
        "the timeout was the upstream's fault: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn when_no_other_upstream_can_take_the_retry_the_real_failure_is_reported() {
    let blue1 = Backend::start("blue-1").await;
    let blue2 = Backend::start("blue-2").await;
    let green = Backend::start("green-1").await;
    // Slow health checks, so the killed upstream is still listed healthy when the request comes.
    let text = config(&[&blue1, &blue2], &[&green], "").replace("interval: 100ms", "interval: 30s");
    let daemon = Daemon::start(&text).await;
    blue2.kill();
    // Requests that meet the dead blue-2 eject it (and are retried on blue-1).
    let http = client();
    for _ in 0..4 {
        let _ = get(&http, &daemon.url("/"), &[]).await;
    }
    daemon.wait_healthy("blue", 1).await;
    blue1.kill();
    // Let the router see its idle keep-alive connection to blue-1 close; a request racing that
    // close would fail as `upstream-failed` (sent, then cut) instead of `upstream-connect`.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = support::get_response(&http, &daemon.url("/")).await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["x-bluegreen-error"], "upstream-connect");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connections_are_reused_and_closed_ones_are_replaced() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let http = client();
    for _ in 0..200 {
        let (status, _, _) = get(&http, &daemon.url("/"), &[]).await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(
        blue.used_connections(),
        1,
        "one keep-alive connection carried all 200"
    );

    // The upstream closes the connection after every other answer: the router notices and
    // opens a new one, and no request fails for it.
    for i in 0..100 {
        let path = if i % 2 == 0 { "/close" } else { "/" };
        let (status, _, _) = get(&http, &daemon.url(path), &[]).await.unwrap();
        assert_eq!(status, 200, "request {i} to {path}");
    }
    assert!(blue.used_connections() > 40, "{}", blue.used_connections());
    let metrics = daemon.status().await["colors"][0]["metrics"].clone();
    assert_eq!(metrics["upstream_errors"], 0, "{metrics}");
}

/// One raw HTTP/1.1 exchange; returns the response head.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).to_string();
    text.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A client's bad input is the client's error: a broken chunked body gets 400 and is never
/// a 5xx or an upstream error of the color (a client must not be able to push a canary over
/// its error limit); CONNECT is answered by the router and never reaches an upstream.
#[tokio::test(flavor = "multi_thread")]
async fn a_clients_broken_body_or_connect_is_its_own_error() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let served_before = blue.served();
    for _ in 0..3 {
        let head = raw_exchange(
            daemon.addr,
            b"POST /echo HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        assert!(head.contains("x-bluegreen-error: client-body"), "{head}");
    }
    let head = raw_exchange(
        daemon.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.contains("x-bluegreen-error: method-not-proxied"),
        "{head}"
    );
    let metrics = daemon.status().await["colors"][0]["metrics"].clone();
    assert_eq!(metrics["responses_5xx"], 0, "{metrics}");
    assert_eq!(metrics["upstream_errors"], 0, "{metrics}");
    assert_eq!(
        metrics["responses_4xx"], 3,
        "the broken bodies count as 4xx: {metrics}"
    );
    assert!(
        blue.served() <= served_before + 3,
        "CONNECT never reached the upstream"
    );
    // The upstream was not ejected: it still serves.
    let (code, served_by, _) = get(&client(), &daemon.url("/"), &[]).await.unwrap();
    assert_eq!((code, served_by.as_str()), (200, "blue-1"));
}
