//! HTTP/2 (h2c and TLS with ALPN), forwarding headers, hop-by-hop stripping and streamed bodies.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Backend, Daemon, client, config, get, write_file};

#[tokio::test(flavor = "multi_thread")]
async fn h2c_with_prior_knowledge_is_proxied() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    // Many streams on one connection, across a switch.
    let mut served = Vec::new();
    for i in 0..40 {
        if i == 20 {
            daemon.switch("green").await;
        }
        let response = h2
            .request(Request::get(daemon.url("/")).body(Full::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.version(), http::Version::HTTP_2);
        served.push(
            response.headers()["x-served-by"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    assert!(served[..20].iter().all(|s| s == "blue-1"));
    assert!(
        served[20..].iter().all(|s| s == "green-1"),
        "one h2 connection follows the switch: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn h2_over_tls_is_negotiated_by_alpn() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "cert.pem", &certified.cert.pem());
    write_file(
        dir.path(),
        "key.pem",
        &certified.signing_key.serialize_pem(),
    );
    let daemon = Daemon::start_in(
        dir,
        &config(
            &[&blue],
            &[&green],
            "  tls: { cert: cert.pem, key: key.pem }\n",
        ),
    )
    .await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let stream = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get(format!("https://localhost:{}/headers", daemon.addr.port()))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.headers()["x-served-by"], "blue-1");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(
        seen["host"],
        format!("localhost:{}", daemon.addr.port()),
        "h2 :authority becomes Host"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_are_set_and_hop_by_hop_ones_removed() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(
        &[&blue],
        &[&green],
        "  forwarded: { forwarded: true }\n",
    ))
    .await;
    let (_, _, body) = get(
        &client(),
        &daemon.url("/headers"),
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("connection", "x-private-hop"),
            ("x-private-hop", "secret"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-end-to-end", "kept"),
        ],
    )
    .await
    .unwrap();
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "a client cannot spoof its address: {seen}"
    );
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], daemon.addr.to_string());
    assert_eq!(
        seen["forwarded"],
        format!("for=127.0.0.1;proto=http;host=\"{}\"", daemon.addr)
    );
    assert_eq!(seen["x-end-to-end"], "kept");
    for hop in ["x-private-hop", "proxy-authorization"] {
        assert!(seen.get(hop).is_none(), "{hop} was forwarded: {seen}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_stream_both_ways_without_buffering() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;

    // Download: the first chunk arrives long before the last one is produced.
    let started = Instant::now();
    let response = client()
        .request(
            Request::get(daemon.url("/stream?chunks=4&gap_ms=400"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "chunk0\n");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "first chunk took {:?}",
        started.elapsed()
    );
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "chunk1\nchunk2\nchunk3\n");

    // Upload: a 4 MiB body in 64 KiB chunks arrives whole.
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let frames = futures_util::stream::iter(
        (0..64).map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
    );
    let upload: Client<_, StreamBody<_>> = Client::builder(TokioExecutor::new()).build_http();
    let response = upload
        .request(
            Request::post(daemon.url("/echo"))
                .body(StreamBody::new(frames))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echoed = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(echoed.len(), 4 * 1024 * 1024);
    let metrics = daemon.status().await["colors"][0]["metrics"].clone();
    assert!(
        metrics["bytes_in"].as_u64().unwrap() >= 4 * 1024 * 1024,
        "{metrics}"
    );
    assert!(
        metrics["bytes_out"].as_u64().unwrap() >= 4 * 1024 * 1024,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_and_slow_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(
        &[&blue],
        &[&green],
        "  header_read_timeout: 500ms\n  max_header_bytes: 8192\n",
    ))
    .await;

    let huge = "a".repeat(20_000);
    let (status, _, _) = get(&client(), &daemon.url("/"), &[("x-huge", &huge)])
        .await
        .unwrap();
    assert_eq!(status, 431, "headers over max_header_bytes are refused");

    // Slowloris: a client that never finishes its headers is disconnected.
    let mut slow = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buffer)).await;
    assert!(read.is_ok(), "the router closed the connection");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "after {:?}",
        started.elapsed()
    );
}

/// Opens an h2c connection and makes one request on it. Hands back the sender (the
/// connection stays open while it lives), the response, and the task driving the connection,
/// which ends when the router closes it.
async fn one_h2_request(
    daemon: &Daemon,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    http::Response<hyper::body::Incoming>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get(daemon.url("/"))
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    (sender, response, connection)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_http2_connection_is_closed_after_idle_timeout() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  idle_timeout: 400ms\n")).await;
    let (_sender, response, connection) = one_h2_request(&daemon).await;
    assert_eq!(response.status(), 200);
    drop(response);
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        ended.is_ok(),
        "the router closed the idle connection (GOAWAY)"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300),
        "closed while not yet idle: {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_limit_are_closed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  max_connections: 2\n")).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = [0u8; 12];
        stream.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"HTTP/1.1 200");
        held.push(stream);
    }
    let mut third = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), third.read_to_end(&mut buffer)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the third connection is closed without an answer: {buffer:?}"
    );
    let (_, metrics) = daemon.admin("GET", "/metrics", None).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("bluegreen_connections_rejected_total 1")
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_sends_http2_clients_goaway() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let mut daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let (_sender, response, connection) = one_h2_request(&daemon).await;
    assert_eq!(response.status(), 200);
    let exit = daemon.signal_and_wait("TERM");
    assert!(exit.success(), "{exit:?}");
    let ended = tokio::time::timeout(Duration::from_secs(3), connection).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the connection ended cleanly (GOAWAY): {ended:?}"
    );
}
