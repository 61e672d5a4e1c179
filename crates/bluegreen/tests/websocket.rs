//! WebSockets across a switch: the old one lives until the drain deadline, then gets a close frame.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::{Backend, Daemon, config};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn open(
    daemon: &Daemon,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (socket, response) = tokio_tungstenite::connect_async(format!("ws://{}/ws", daemon.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    socket
}

async fn echo<S>(socket: &mut tokio_tungstenite::WebSocketStream<S>, text: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    socket.send(Message::text(text)).await.unwrap();
    match socket.next().await {
        Some(Ok(Message::Text(reply))) => reply.to_string(),
        other => panic!("expected an echo, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_on_blue_survives_a_switch_until_the_drain_timeout_then_is_closed() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  drain_timeout: 1500ms\n")).await;

    let mut old = open(&daemon).await;
    assert_eq!(echo(&mut old, "hello").await, "blue-1:hello");

    daemon.switch("green").await;
    let switched = Instant::now();
    let status = daemon.status().await;
    assert_eq!(
        status["colors"][0]["metrics"]["draining"], 1,
        "the blue socket is draining: {status}"
    );

    // Still open and still on blue after the switch.
    assert_eq!(echo(&mut old, "still there?").await, "blue-1:still there?");
    // New sockets go to green.
    let mut new = open(&daemon).await;
    assert_eq!(echo(&mut new, "hi").await, "green-1:hi");

    // At the deadline the router finishes the frame in progress and sends close 1001.
    let closed = tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .expect("closed within the deadline");
    let elapsed = switched.elapsed();
    match closed {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(
        elapsed >= Duration::from_millis(1400),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(3000),
        "closed too late: {elapsed:?}"
    );

    // The green socket is untouched.
    assert_eq!(echo(&mut new, "after").await, "green-1:after");
    assert_eq!(daemon.status().await["colors"][0]["metrics"]["draining"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_inside_the_drain_window_keeps_the_websocket() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  drain_timeout: 1s\n")).await;
    let mut socket = open(&daemon).await;
    daemon.switch("green").await;
    let (code, _) = daemon.admin("POST", "/v1/rollback", Some("{}")).await;
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        echo(&mut socket, "kept").await,
        "blue-1:kept",
        "blue is live again, its socket stays"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_closes_open_websockets_at_the_drain_deadline_and_exits_0() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let mut daemon = Daemon::start(&config(&[&blue], &[&green], "  drain_timeout: 800ms\n")).await;
    let mut socket = open(&daemon).await;
    assert_eq!(echo(&mut socket, "before").await, "blue-1:before");
    let pid = daemon.pid();
    let stopping = std::thread::spawn(move || {
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap();
    });
    stopping.join().unwrap();
    let started = Instant::now();
    // Still served until the deadline…
    assert_eq!(echo(&mut socket, "during").await, "blue-1:during");
    // …then closed with 1001.
    match tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .unwrap()
    {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    let exit = daemon.wait_exit();
    assert!(exit.success(), "{exit:?}");
}
