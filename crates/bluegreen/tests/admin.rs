//! Bad config, bad admin requests and strangers: each gets a clear answer and nothing changes.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::{BIN, Backend, Daemon, config, write_file};

fn run_up(config_text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "bluegreen.yaml", config_text);
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("up")
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_config_exits_3_naming_the_key_and_the_fix() {
    let good = "service: web\nrouter:\n  listen: 127.0.0.1:0\nenvironments:\n  blue: { upstreams: [\"127.0.0.1:9001\"] }\n  green: { upstreams: [\"127.0.0.1:9002\"] }\n";
    let cases = [
        (
            good.replace("127.0.0.1:9002", "127.0.0.1"),
            "environments.green.upstreams[0]: \"127.0.0.1\" has no port; write it as host:port",
        ),
        (
            good.replace("listen:", "lisen:"),
            "router.lisen: unknown field `lisen`, expected one of",
        ),
        (
            good.replace("  listen: 127.0.0.1:0\n", "  drain_timeout: 30\n"),
            "router.drain_timeout: duration 30 has no unit",
        ),
        (
            good.replace("  listen: 127.0.0.1:0\n", "  retries: many\n"),
            "router.retries:",
        ),
        (
            good.replace("green:", "purple:"),
            "environments.purple: unknown environment; valid: blue, green",
        ),
        (
            good.replace("  listen: 127.0.0.1:0\n", "  admin: 127.0.0.1:9900\n"),
            "router.admin_token_file: is required when router.admin is host:port",
        ),
        (
            good.replace("service: web\n", ""),
            "missing field `service`",
        ),
        (
            good.replace(
                "  listen: 127.0.0.1:0\n",
                "  tls: { cert: nope.pem, key: nope.key }\n",
            ),
            "router.tls.cert: \"nope.pem\" is not a readable file",
        ),
        (
            "service: [web\n".to_string(),
            "service: expected string scalar at line 1",
        ),
        ("service: web\nenvironments: {\n".to_string(), "line"),
    ];
    for (text, expected) in cases {
        let (code, stderr) = run_up(&text);
        assert_eq!(code, Some(3), "{expected}: {stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let missing = Command::new(BIN)
        .args(["--config", "/nonexistent/bluegreen.yaml", "up"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("cannot read config /nonexistent/bluegreen.yaml")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_admin_requests_get_4xx_naming_the_field_and_change_nothing() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let before = daemon.status().await;
    let (_, history_before) = daemon.admin("GET", "/v1/history", None).await;

    let cases: [(&str, &str, u16, Option<&str>, &str); 9] = [
        ("/v1/switch", "{not json", 400, None, "not valid JSON"),
        (
            "/v1/switch",
            r#"{"to":"purple"}"#,
            400,
            Some("to"),
            "unknown variant `purple`, expected `blue` or `green`",
        ),
        ("/v1/switch", r#"{}"#, 400, None, "missing field `to`"),
        (
            "/v1/switch",
            r#"{"to":"green","force":true}"#,
            400,
            Some("force"),
            "unknown field `force`",
        ),
        (
            "/v1/weights",
            r#"{"green":101}"#,
            400,
            Some("green"),
            "101 is out of range",
        ),
        (
            "/v1/weights",
            r#"{"green":-5}"#,
            400,
            Some("green"),
            "invalid value",
        ),
        (
            "/v1/weights",
            r#"{"green":30,"blue":30}"#,
            400,
            Some("blue"),
            "must add up to 100",
        ),
        ("/v1/weights", r#"{}"#, 400, Some("green"), "missing"),
        (
            "/v1/nope",
            r#"{}"#,
            404,
            None,
            "no such endpoint POST /v1/nope",
        ),
    ];
    for (path, body, code, field, message) in cases {
        let (got, answer) = daemon.admin("POST", path, Some(body)).await;
        assert_eq!(got, code, "{path} {body}: {answer}");
        let error = &answer["error"];
        assert_eq!(error["field"].as_str(), field, "{path} {body}: {answer}");
        assert!(
            error["message"].as_str().unwrap().contains(message),
            "{path} {body}: {answer}"
        );
    }
    let (got, answer) = daemon.admin("POST", "/v1/rollback", Some("{}")).await;
    assert_eq!(got, 409, "{answer}");

    let after = daemon.status().await;
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["weights"], before["weights"]);
    let (_, history_after) = daemon.admin("GET", "/v1/history", None).await;
    assert_eq!(history_after, history_before, "nothing was recorded");
    assert_eq!(
        history_after["events"].as_array().unwrap().len(),
        1,
        "{history_after}"
    );

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("since=1", "since"),
    ] {
        let (code, answer) = daemon
            .admin("GET", &format!("/v1/history?{query}"), None)
            .await;
        assert_eq!(code, 400, "{answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_socket_is_private_to_its_owner() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let socket_mode = std::fs::metadata(daemon.socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(socket_mode, 0o600);
    let dir_mode = std::fs::metadata(daemon.dir.path().join(".bluegreen"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);

    // A second daemon on the same socket is refused instead of stealing it.
    let second = Command::new(BIN)
        .arg("--config")
        .arg(&daemon.config_path)
        .arg("up")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr)
            .contains("another bluegreen daemon is already listening"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_admin_demands_the_bearer_token() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let dir = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef0123456789abcdef";
    write_file(dir.path(), "token", &format!("{token}\n"));
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = config(&[&blue], &[&green], "").replace(
        "  admin: .bluegreen/admin.sock\n",
        &format!("  admin: 127.0.0.1:{admin_port}\n  admin_token_file: token\n"),
    );
    let config_path = write_file(dir.path(), "bluegreen.yaml", &text);
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config_path)
        .arg("up")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = support::client();
    let url = format!("http://127.0.0.1:{admin_port}/v1/status");
    let mut answered = None;
    for _ in 0..100 {
        if let Ok(answer) = support::get(&http, &url, &[]).await {
            answered = Some(answer);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (status, _, body) = answered.expect("admin answers");
    assert_eq!(status, 401, "no token: {body}");
    assert!(body.contains("missing bearer token"));
    let (status, _, body) = support::get(
        &http,
        &url,
        &[("authorization", "Bearer wrong-token-wrong-token")],
    )
    .await
    .unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("wrong bearer token"));
    let metrics_url = format!("http://127.0.0.1:{admin_port}/metrics");
    let (status, _, _) = support::get(&http, &metrics_url, &[]).await.unwrap();
    assert_eq!(status, 401, "metrics need the token too");
    let bearer = format!("Bearer {token}");
    let (status, _, body) = support::get(&http, &url, &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // The CLI reads the token file from the config.
    let cli = Command::new(BIN)
        .arg("--config")
        .arg(&config_path)
        .args(["switch", "--to", "green"])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let wrong = Command::new(BIN)
        .args(["--admin", &format!("127.0.0.1:{admin_port}"), "status"])
        .env("BLUEGREEN_TOKEN", "nope")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong bearer token"));
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_prometheus_text() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let http = support::client();
    for _ in 0..5 {
        support::get(&http, &daemon.url("/"), &[]).await.unwrap();
    }
    let (code, text) = daemon.admin("GET", "/metrics", None).await;
    assert_eq!(code, 200);
    let text = text.as_str().unwrap();
    assert!(
        text.contains("bluegreen_requests_total{color=\"blue\"} 5"),
        "{text}"
    );
    assert!(text.contains("bluegreen_responses_total{color=\"blue\",class=\"2xx\"} 5"));
    assert!(text.contains("bluegreen_request_duration_seconds_count{color=\"blue\"} 5"));
    assert!(text.contains("# TYPE bluegreen_draining gauge"));
    // Every sample line is `name{labels} value` with a numeric value.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
}

#[test]
fn check_validates_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "bluegreen.yaml",
        "service: web\nenvironments:\n  blue: { upstreams: [\"127.0.0.1:9001\"] }\n  green: { upstreams: [\"127.0.0.1:9002\"] }\n",
    );
    let ok = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("check")
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("config ok: service web"));
}

/// A refused value is quoted only in part: a megabyte sent is not a megabyte echoed.
#[tokio::test(flavor = "multi_thread")]
async fn admin_errors_quote_only_an_excerpt_of_what_they_refuse() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let huge = "x".repeat(1 << 20);
    for body in [
        format!(r#"{{"green": "{huge}"}}"#),
        format!(r#"{{"{huge}": 1}}"#),
        format!(r#"{{"to": "{huge}"}}"#),
    ] {
        let path = if body.contains("\"to\"") {
            "/v1/switch"
        } else {
            "/v1/weights"
        };
        let (code, answer) = daemon.admin("POST", path, Some(&body)).await;
        assert_eq!(code, 400, "{path}");
        let text = answer.to_string();
        assert!(text.len() < 1200, "{} bytes echoed for {path}", text.len());
        assert!(
            text.contains("more bytes"),
            "{}",
            &text[..200.min(text.len())]
        );
    }
}
