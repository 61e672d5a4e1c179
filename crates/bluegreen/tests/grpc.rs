//! gRPC behind the router: HTTP/2 upstreams (h2c and h2 over TLS), unary and streaming calls, trailers, switches, drains and gRPC health checks.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bluegreen_grpc_echo::Instance;
use bluegreen_grpc_echo::echo::echo_client::EchoClient;
use bluegreen_grpc_echo::echo::{CountRequest, SayRequest};
use support::{Daemon, run_cli, write_file};
use tonic::transport::Channel;

/// Both colors' upstreams speak `protocol` (with `extra` under each environment).
fn grpc_config(blue: &Instance, green: &Instance, protocol: &str, extra: &str) -> String {
    format!(
        "service: grpc\nrouter:\n  listen: 127.0.0.1:0\n  admin: .bluegreen/admin.sock\n  drain_timeout: 2s\n\
         environments:\n  blue: {{ upstreams: [\"{}\"], upstream_protocol: {protocol}{extra} }}\n  \
         green: {{ upstreams: [\"{}\"], upstream_protocol: {protocol}{extra} }}\n\
         health: {{ grpc_service: \"\", interval: 100ms, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2 }}\n\
         dashboard: {{ listen: \"127.0.0.1:0\" }}\n",
        blue.addr, green.addr
    )
}

/// Blue and green instances on h2c and a daemon routing to them, both colors healthy.
async fn h2c_pair() -> (Instance, Instance, Daemon) {
    let blue = Instance::start("blue", None).await;
    let green = Instance::start("green", None).await;
    let daemon = Daemon::start(&grpc_config(&blue, &green, "h2c", "")).await;
    daemon.wait_healthy("blue", 1).await;
    daemon.wait_healthy("green", 1).await;
    (blue, green, daemon)
}

async fn client(daemon: &Daemon) -> EchoClient<Channel> {
    EchoClient::connect(format!("http://{}", daemon.addr))
        .await
        .expect("the router accepts h2c")
}

async fn say(client: &mut EchoClient<Channel>, text: &str) -> Result<String, tonic::Status> {
    let reply = client
        .say(SayRequest { text: text.into() })
        .await?
        .into_inner();
    assert_eq!(reply.text, text);
    Ok(reply.color)
}

#[tokio::test(flavor = "multi_thread")]
async fn unary_and_streaming_calls_and_their_trailers_pass_through_h2c() {
    let (_blue, _green, daemon) = h2c_pair().await;
    daemon.wait_healthy("blue", 1).await;
    let mut client = client(&daemon).await;

    assert_eq!(say(&mut client, "hello").await.unwrap(), "blue");
    // An error status travels in the trailers (grpc-status, grpc-message).
    let refused = say(&mut client, "fail").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(refused.message(), "blue was asked to fail");

    let mut stream = client
        .count(CountRequest {
            count: 5,
            interval_ms: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(reply) = stream.message().await.unwrap() {
        assert_eq!(reply.color, "blue");
        seen.push(reply.n);
    }
    assert_eq!(seen, [1, 2, 3, 4, 5], "every message, then an OK status");

    daemon.switch("green").await;
    assert_eq!(say(&mut client, "after").await.unwrap(), "green");
}

/// Connections open to `port` on loopback (from any process: here, the router's).
fn established_to(port: u16) -> usize {
    let sockets = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = format!(":{port:04X}");
    sockets
        .lines()
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[2].ends_with(&port) && fields[3] == "01" // ESTABLISHED
        })
        .count()
}

/// Calls keep going from several clients while the colors switch back and forth: none fails,
/// and both colors answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switch_under_a_stream_of_calls_fails_no_call() {
    let (blue, green, daemon) = h2c_pair().await;
    daemon.wait_healthy("blue", 1).await;
    daemon.wait_healthy("green", 1).await;
    let done = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..4 {
        let mut client = client(&daemon).await;
        let done = Arc::clone(&done);
        callers.spawn(async move {
            let (mut colors, mut failures) = (Vec::new(), Vec::new());
            for i in 0..20_000 {
                if done.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break;
                }
                match say(&mut client, &format!("call {caller}-{i}")).await {
                    Ok(color) => colors.push(color),
                    Err(status) => failures.push(format!("{status:?}")),
                }
            }
            (colors, failures)
        });
    }
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        daemon
            .switch(if i % 2 == 0 { "green" } else { "blue" })
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    done.store(true, Ordering::SeqCst);
    let (mut answered, mut failed) = (Vec::new(), Vec::new());
    while let Some(result) = callers.join_next().await {
        let (colors, failures) = result.unwrap();
        answered.extend(colors);
        failed.extend(failures);
    }
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        answered.len() > 100,
        "only {} calls answered",
        answered.len()
    );
    for color in ["blue", "green"] {
        assert!(
            answered.iter().any(|c| c == color),
            "no call answered by {color}"
        );
    }
    // Four callers at once shared one HTTP/2 connection per upstream (health checks' own
    // connections, one every 100 ms, may still be open beside it), where HTTP/1.1 would keep
    // four.
    for upstream in [&blue, &green] {
        let open = established_to(upstream.addr.port());
        assert!(open < 4, "{open} connections to {}", upstream.addr);
    }
}

/// A server stream open on the old color goes on after the switch until the drain deadline,
/// then ends with UNAVAILABLE (which gRPC clients may retry), as a WebSocket gets a close frame.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_stream_drains_to_the_deadline_then_ends_unavailable() {
    let (_blue, _green, daemon) = h2c_pair().await;
    daemon.wait_healthy("green", 1).await;
    let mut client = client(&daemon).await;
    let mut stream = client
        .count(CountRequest {
            count: 1000,
            interval_ms: 50,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().color, "blue");
    daemon.switch("green").await;
    let switched = Instant::now();
    assert_eq!(say(&mut client, "new call").await.unwrap(), "green");
    let mut after_switch = 0;
    let ended = loop {
        match stream.message().await {
            Ok(Some(reply)) => {
                assert_eq!(reply.color, "blue");
                after_switch += 1;
            }
            Ok(None) => panic!("the stream ended with OK after {after_switch} messages"),
            Err(status) => break status,
        }
    };
    let lasted = switched.elapsed();
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("drain timeout"), "{ended:?}");
    assert!(
        lasted >= Duration::from_millis(1800) && lasted < Duration::from_secs(6),
        "cut after {lasted:?}; drain_timeout is 2s"
    );
    assert!(
        after_switch >= 20,
        "only {after_switch} messages after the switch"
    );
}

/// With `health.grpc_service`, an upstream is judged by grpc.health.v1.Health/Check: one
/// reporting NOT_SERVING leaves rotation and a switch to its color is refused.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_checks_take_a_not_serving_upstream_out() {
    let (_blue, green, daemon) = h2c_pair().await;
    daemon.wait_healthy("green", 1).await;
    green.set_serving(false);
    daemon.wait_healthy("green", 0).await;
    let status = daemon.status().await;
    let green_entry = status["colors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["color"] == "green")
        .unwrap()
        .clone();
    let reason = green_entry["upstreams"][0]["last_error"].as_str().unwrap();
    assert!(reason.contains("NOT_SERVING"), "{reason}");
    let (code, body) = daemon
        .admin("POST", "/v1/switch", Some("{\"to\":\"green\"}"))
        .await;
    assert_eq!(code, 409, "{body}");
    green.set_serving(true);
    daemon.wait_healthy("green", 1).await;
    daemon.switch("green").await;
    assert_eq!(say(&mut client(&daemon).await, "x").await.unwrap(), "green");
}

/// h2: HTTP/2 over TLS to the upstream, its certificate checked against the configured CA and
/// server name; a name the certificate does not hold keeps the upstream out of rotation.
#[tokio::test(flavor = "multi_thread")]
async fn h2_over_tls_checks_the_upstreams_certificate() {
    let certified = rcgen::generate_simple_self_signed(vec!["echo.internal".to_string()]).unwrap();
    let (cert, key) = (certified.cert.pem(), certified.signing_key.serialize_pem());
    let blue = Instance::start("blue", Some((cert.clone(), key.clone()))).await;
    let green = Instance::start("green", Some((cert.clone(), key))).await;
    // A daemon whose colors trust `cert` for `server_name`.
    let start = async |server_name: &str| {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "ca.pem", &cert);
        let tls = format!(", upstream_tls: {{ ca: ca.pem, server_name: {server_name} }}");
        Daemon::start_in(dir, &grpc_config(&blue, &green, "h2", &tls)).await
    };
    let daemon = start("echo.internal").await;
    daemon.wait_healthy("blue", 1).await;
    let mut client = client(&daemon).await;
    assert_eq!(say(&mut client, "over tls").await.unwrap(), "blue");
    daemon.wait_healthy("green", 1).await;
    daemon.switch("green").await;
    assert_eq!(say(&mut client, "over tls").await.unwrap(), "green");

    let daemon = start("other.internal").await;
    let status = daemon
        .wait_status("blue checked and refused", |s| {
            s["colors"][0]["upstreams"][0]["last_error"].is_string()
        })
        .await;
    let reason = status["colors"][0]["upstreams"][0]["last_error"]
        .as_str()
        .unwrap();
    assert!(reason.contains("certificate"), "{reason}");
    assert_eq!(status["colors"][0]["healthy_upstreams"], 0, "{status}");
}

/// An HTTP/1.1 client reaches an HTTP/2 upstream (the router translates); a WebSocket cannot
/// ride to one and is refused with a 501 naming the cause.
#[tokio::test(flavor = "multi_thread")]
async fn http1_clients_are_translated_and_upgrades_refused_by_name() {
    let (_blue, _green, daemon) = h2c_pair().await;
    daemon.wait_healthy("blue", 1).await;
    // tonic answers a path it does not serve with HTTP 200 and grpc-status 12 (UNIMPLEMENTED).
    let plain = http1_exchange(
        &daemon,
        "GET /no.Such/Method HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");
    assert!(plain.contains("grpc-status: 12"), "{plain}");
    let upgrade = http1_exchange(
        &daemon,
        "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert!(upgrade.starts_with("HTTP/1.1 501"), "{upgrade}");
    assert!(upgrade.contains("upgrade-to-http2"), "{upgrade}");
}

/// Writes one HTTP/1.1 request on a new connection and reads the answer's first bytes.
async fn http1_exchange(daemon: &Daemon, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// Shadow traffic for gRPC: calls (bodies of no declared length) are copied to the new
/// color and judged by their grpc-status, which travels in the trailers of a 200 answer. A
/// version that answers alike is released; one whose calls fail is stopped before the switch,
/// and no caller saw it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mirrored_calls_are_judged_by_their_grpc_status() {
    let blue = Instance::start("blue", None).await;
    let green = Instance::start("green", None).await;
    let config = format!(
        "{}release: {{ strategy: instant, monitor_window: 0s }}\nmirror:\n  percent: 100\n  duration: 2s\n  methods: [POST]\n  max_request_body: 4096\n  \
         compare: {{ body: false, ignore_headers: [date] }}\n",
        grpc_config(&blue, &green, "h2c", "")
    );
    let daemon = Daemon::start(&config).await;
    daemon.wait_healthy("green", 1).await;

    // Calls keep coming while each release runs, until `stop`; every one must succeed.
    let calls = |daemon: &Daemon, stop: &Arc<AtomicBool>| {
        let (addr, stop) = (daemon.addr, Arc::clone(stop));
        tokio::spawn(async move {
            let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
            let mut answered = Vec::new();
            for i in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match say(&mut client, &format!("call {i}")).await {
                    Ok(color) => answered.push(color),
                    Err(status) => panic!("a caller saw {status:?}"),
                }
            }
            answered
        })
    };

    green.set_failing(true);
    let stop = Arc::new(AtomicBool::new(false));
    let callers = calls(&daemon, &stop);
    let out = daemon.cli(&["release", "--version", "2.0"]);
    stop.store(true, Ordering::SeqCst);
    let answered = callers.await.unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "exit 1 = failed: {printed}");
    assert!(printed.contains("mirror_mismatch_rate"), "{printed}");
    assert!(
        !answered.is_empty() && answered.iter().all(|c| c == "blue"),
        "{answered:?}"
    );
    let (_, mirror) = daemon.admin("GET", "/v1/mirror", None).await;
    let differences = mirror["router"]["differences"].as_array().unwrap();
    assert!(!differences.is_empty(), "{mirror}");
    assert_eq!(differences[0]["what"], "grpc-status", "{mirror}");
    assert_eq!(differences[0]["live_status"], 200, "{mirror}");
    assert_eq!(differences[0]["mirror_status"], 200, "{mirror}");
    let detail = differences[0]["detail"].as_str().unwrap();
    assert_eq!(detail, "blue answered grpc-status 0, green answered 13");
    assert_eq!(daemon.status().await["live"], "blue");
    // Copies 2.0's mirror queued may still be answered after the release ended: the counters
    // are read once they stop moving.
    let mut settled = mirror["router"].clone();
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (_, now) = daemon.admin("GET", "/v1/mirror", None).await;
        if now["router"]["compared"] == settled["compared"]
            && now["router"]["failed"] == settled["failed"]
        {
            break;
        }
        settled = now["router"].clone();
    }
    let compared_before = settled["compared"].as_u64().unwrap();
    let mismatched_before = settled["mismatched"].as_u64().unwrap();

    green.set_failing(false);
    let stop = Arc::new(AtomicBool::new(false));
    let callers = calls(&daemon, &stop);
    let out = daemon.cli(&["release", "--version", "3.0"]);
    stop.store(true, Ordering::SeqCst);
    callers.await.unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, mirror) = daemon.admin("GET", "/v1/mirror", None).await;
    assert_eq!(daemon.status().await["live"], "green", "{mirror}");
    // 3.0's own mirror compared calls, and found none that differed.
    assert!(
        mirror["router"]["compared"].as_u64().unwrap() > compared_before,
        "{mirror}"
    );
    assert_eq!(
        mirror["router"]["mismatched"].as_u64().unwrap(),
        mismatched_before,
        "{mirror}"
    );
}

/// Bad protocol settings are refused by `check`, each naming its key and the fix.
#[test]
fn bad_upstream_protocol_settings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "environments:\n  blue: { upstreams: [\"127.0.0.1:9001\"], upstream_protocol: h3 }\n  green: { upstreams: [\"127.0.0.1:9002\"] }\n",
            "environments.blue.upstream_protocol: \"h3\" is not a protocol",
        ),
        (
            "environments:\n  blue: { upstreams: [\"127.0.0.1:9001\"], upstream_protocol: h2c, upstream_tls: { ca: ca.pem } }\n  green: { upstreams: [\"127.0.0.1:9002\"] }\n",
            "environments.blue.upstream_tls: is only used with upstream_protocol: h2, not h2c",
        ),
        (
            "environments:\n  blue: { upstreams: [\"127.0.0.1:9001\"], upstream_protocol: h2, upstream_tls: { ca: missing.pem } }\n  green: { upstreams: [\"127.0.0.1:9002\"] }\n",
            "environments.blue.upstream_tls: cannot read the upstream CA file",
        ),
        (
            "environments:\n  blue: { upstreams: [\"127.0.0.1:9001\"], upstream_protocol: h2c }\n  green: { upstreams: [\"127.0.0.1:9002\"] }\nhealth: { grpc_service: \"\" }\n",
            "health.grpc_service: gRPC health checks need HTTP/2 upstreams, and environment green speaks http1",
        ),
        (
            "app: { command: \"sleep 60 {port}\", upstream_protocol: h2c }\nenvironments:\n  green: { upstream_tls: { server_name: x } }\n",
            "environments.green.upstream_tls: is given without this color's upstream_protocol",
        ),
    ];
    for (i, (body, expected)) in cases.iter().enumerate() {
        let path = write_file(
            dir.path(),
            &format!("c{i}.yaml"),
            &format!("service: web\n{body}"),
        );
        let (code, _, stderr) = run_cli(&path, &["check"]);
        assert_eq!(code, 3, "{body}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{body}\nwanted {expected:?} in:\n{stderr}"
        );
    }
    // And a config that uses them well passes.
    let path = write_file(
        dir.path(),
        "good.yaml",
        "service: web\nenvironments:\n  blue: { upstreams: [\"127.0.0.1:9001\"], upstream_protocol: h2c }\n  green: { upstreams: [\"127.0.0.1:9002\"], upstream_protocol: h2c }\nhealth: { grpc_service: \"\" }\n",
    );
    let (code, _, stderr) = run_cli(&path, &["check"]);
    assert_eq!(code, 0, "{stderr}");
}
