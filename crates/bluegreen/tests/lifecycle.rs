//! Around the shift: hooks, the webhook, pipeline stages, cleanup after scale_down_delay, crash loops, config mistakes, init and the demo.

mod support;

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::{BIN, Daemon, client, get, process_config, run_cli, write_file};

fn executable(dir: &Path, name: &str, body: &str) -> String {
    let path = write_file(dir, name, &format!("#!/bin/sh\n{body}\n"));
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&path)
        .status()
        .unwrap();
    path.display().to_string()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A webhook receiver on loopback (over TLS with `tls`) that keeps every JSON body it is sent.
async fn webhook_receiver(
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (std::net::SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (store, tls) = (Arc::clone(&store), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => keep_json_bodies(stream, store).await,
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            keep_json_bodies(stream, store).await;
                        }
                    }
                }
            });
        }
    });
    (addr, received)
}

/// Serves one connection, keeping each request's JSON body.
async fn keep_json_bodies<S>(stream: S, store: Arc<Mutex<Vec<Value>>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let store = Arc::clone(&store);
        async move {
            let body = request.into_body().collect().await.unwrap().to_bytes();
            if let Ok(value) = serde_json::from_slice(&body) {
                store.lock().unwrap().push(value);
            }
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hooks_run_with_release_facts_and_the_webhook_hears_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("hooks.txt");
    let hook = |name: &str| {
        executable(
            dir.path(),
            name,
            &format!(
                "echo \"$BLUEGREEN_STEP $BLUEGREEN_VERSION $BLUEGREEN_COLOR $BLUEGREEN_FROM_COLOR $BLUEGREEN_FROM_VERSION\" >> {}",
                record.display()
            ),
        )
    };
    let (webhook, received) = webhook_receiver(None).await;
    let config = process_config().replace(
        "health:",
        &format!(
            "hooks:\n  pre_deploy: {}\n  post_deploy: {}\n  migrate_expand: {}\n  pre_switch: {}\n  post_switch: {}\n  cleanup: {}\n  migrate_contract: {}\n\
             webhook: {{ url: \"http://{webhook}/events\" }}\nhealth:",
            hook("pre"), hook("post"), hook("expand"), hook("preswitch"), hook("postswitch"), hook("cleanup"), hook("contract")
        ),
    )
    .replace("scale_down_delay: 30s", "scale_down_delay: 0s")
    .replace("min_requests: 20", "min_requests: 20\n  on_too_few_requests: proceed");
    let daemon = Daemon::start(&config).await;
    assert!(
        daemon
            .cli(&["deploy", "--environment", "blue", "--version", "1.0"])
            .status
            .success()
    );
    let out = daemon.cli(&["release", "--version", "2.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let lines = std::fs::read_to_string(&record).unwrap();
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(
        lines,
        [
            // The expand comes before the deploy (then the live 1.0 is tested again).
            "migrate_expand 2.0 green blue 1.0",
            "pre_deploy 2.0 green blue 1.0",
            "post_deploy 2.0 green blue 1.0",
            "pre_switch 2.0 green blue 1.0",
            "post_switch 2.0 green blue 1.0",
            "cleanup 2.0 green blue 1.0",
            "migrate_contract 2.0 green blue 1.0",
        ]
    );
    // scale_down_delay 0: blue was stopped as part of the release.
    let status = daemon.status().await;
    assert_eq!(status["environments"][0]["status"], "stopped", "{status}");
    for _ in 0..50 {
        if received
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "succeeded")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let kinds: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    for kind in [
        "release",
        "deploy",
        "deployed",
        "step",
        "succeeded",
        "stopped",
    ] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
    assert!(
        received
            .lock()
            .unwrap()
            .iter()
            .all(|e| e["service"] == "web")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_hook_stops_the_release_before_traffic_moves() {
    let dir = tempfile::tempdir().unwrap();
    let failing = executable(
        dir.path(),
        "no-migration",
        "echo 'schema locked' >&2; exit 3",
    );
    let config = process_config().replace(
        "health:",
        &format!("hooks:\n  migrate_expand: {failing}\nhealth:"),
    );
    let daemon = Daemon::start(&config).await;
    assert!(
        daemon
            .cli(&["deploy", "--environment", "blue", "--version", "1.0"])
            .status
            .success()
    );
    let out = daemon.cli(&["release", "--version", "2.0"]);
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("migrate_expand") && printed.contains("schema locked"),
        "{printed}"
    );
    let status = daemon.status().await;
    assert_eq!(status["live"], "blue");
    assert_eq!(status["weights"]["green"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn cleanup_stops_the_old_color_after_the_delay_and_rollback_then_redeploys_it() {
    let dir = tempfile::tempdir().unwrap();
    let warm = dir.path().join("warmed");
    let stage = executable(
        dir.path(),
        "warm-cache",
        &format!("touch {}", warm.display()),
    );
    let config = process_config()
        .replace("scale_down_delay: 30s", "scale_down_delay: 1500ms")
        .replace(
            "  strategy: quick\n",
            &format!("  strategy: quick\n  pipeline: [deploy_green, test_green, \"run {stage}\", switch_traffic, cleanup_blue]\n"),
        )
        .replace("min_requests: 20", "min_requests: 20\n  on_too_few_requests: proceed");
    let daemon = Daemon::start(&config).await;
    assert!(
        daemon
            .cli(&["deploy", "--environment", "blue", "--version", "1.0"])
            .status
            .success()
    );
    let blue_pids: Vec<u64> = daemon.status().await["environments"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap())
        .collect();
    let out = daemon.cli(&["release", "--version", "2.0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(warm.exists(), "the pipeline's own stage ran");
    let finished = Instant::now();
    // Warm first: still running right after the release.
    let status = daemon.status().await;
    assert_eq!(status["environments"][0]["status"], "running", "{status}");
    let mut stopped_after = None;
    for _ in 0..100 {
        if daemon.status().await["environments"][0]["status"] == "stopped" {
            stopped_after = Some(finished.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped_after = stopped_after.expect("blue was stopped after scale_down_delay");
    assert!(
        stopped_after >= Duration::from_millis(1000),
        "{stopped_after:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for pid in &blue_pids {
        assert!(
            !Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z"),
            "blue instance {pid} still runs"
        );
    }
    // Rollback now has to deploy 1.0 again, and says so.
    let out = daemon.cli(&["rollback"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("scaled down") && printed.contains("1.0"),
        "{printed}"
    );
    assert_eq!(daemon.status().await["live"], "blue");
    // Colors alternate: the next release goes to the idle color, green.
    let out = daemon.cli(&["release", "--version", "3.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = daemon.status().await;
    assert_eq!(status["live"], "green");
    assert_eq!(status["environments"][1]["version"], "3.0");
    // rollback --to a version the idle color runs is a table swap.
    let out = daemon.cli(&["rollback", "--to", "1.0"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(daemon.status().await["live"], "blue");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_looping_version_fails_its_deploy_with_the_reason() {
    let config = process_config().replace(
        "--app-version {version}",
        "--app-version {version} --error-rate 7",
    );
    let daemon = Daemon::start(&config).await;
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("exited") && printed.contains("times"),
        "{printed}"
    );
    let status = daemon.status().await;
    assert_eq!(status["environments"][0]["status"], "failed", "{status}");
    let out = daemon.cli(&["logs", "--environment", "blue"]);
    assert!(text(&out).contains("--error-rate"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_prints_the_newest_lines_then_each_line_as_it_is_written() {
    let config = process_config().replace(
        "--app-version {version}",
        "--app-version {version} --access-log",
    );
    let daemon = Daemon::start(&config).await;
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert!(out.status.success(), "{}", text(&out));

    let mut following = daemon.cli_following(&["logs", "--environment", "blue", "--follow"]);
    following.wait_for("(blue 1.0)", Duration::from_secs(10));
    for path in ["/first", "/second"] {
        let (code, _, body) = get(&client(), &daemon.url(path), &[]).await.unwrap();
        assert_eq!(code, 200, "{body}");
        following.wait_for(&format!("GET {path} 200"), Duration::from_secs(10));
    }
    assert!(
        following
            .seen
            .iter()
            .any(|l| l.starts_with("==> ") && l.ends_with("blue-0.log <==")),
        "lines under the file's heading: {:?}",
        following.seen
    );
    drop(following);

    // JSON: one object a line, as the API sends it.
    let mut following = daemon.cli_following(&[
        "logs",
        "--environment",
        "blue",
        "--follow",
        "--lines",
        "1",
        "--output",
        "json",
    ]);
    let (code, _, _) = get(&client(), &daemon.url("/third"), &[]).await.unwrap();
    assert_eq!(code, 200);
    let line = following.wait_for("GET /third 200", Duration::from_secs(10));
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(entry["line"], "GET /third 200", "{line}");
    assert!(
        entry["source"].as_str().unwrap().ends_with(".log"),
        "{line}"
    );
    drop(following);

    // A bad query is refused with the field named, before anything is followed.
    let out = daemon.cli(&["logs", "--environment", "purple", "--follow"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("environment"), "{}", text(&out));
    // The stream ends when the daemon stops.
    let mut following = daemon.cli_following(&["logs", "--environment", "blue", "--follow"]);
    following.wait_for("(blue 1.0)", Duration::from_secs(10));
    drop(daemon);
    assert_eq!(following.wait_exit(Duration::from_secs(15)), Some(0));
}

#[test]
fn config_mistakes_name_their_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let not_executable = write_file(dir.path(), "hook.sh", "#!/bin/sh\n");
    let cases = [
        (
            process_config().replace("--listen 127.0.0.1:{port}", "--listen 127.0.0.1:8000"),
            "app.command: has no {port}",
        ),
        (
            process_config().replace("{color}", "{colour}"),
            "unknown placeholder {colour}",
        ),
        (
            process_config().replace(
                "health:",
                &format!(
                    "hooks:\n  pre_switch: {}\nhealth:",
                    not_executable.display()
                ),
            ),
            "hooks.pre_switch:",
        ),
        (
            process_config().replace("strategy: quick", "strategy: fastest"),
            "release.strategy: unknown strategy \"fastest\"",
        ),
        (
            process_config().replace(
                "  strategy: quick\n",
                "  strategy: quick\n  pipeline: [deploy, test]\n",
            ),
            "release.pipeline: has no switch stage",
        ),
        (
            process_config().replace("wait: 1s", "wait: soon"),
            "strategies.quick.wait:",
        ),
        (
            process_config().replace("instances: 2", "instances: 2\n  replicas: 3"),
            "app.replicas: unknown field",
        ),
        (
            process_config().replace("instances: 2", "instances: two"),
            "app.instances:",
        ),
        (
            process_config().replace("max_percent: 5,", "max_percent: 150,"),
            "analysis.error_rate.max_percent: 150 is out of range",
        ),
    ];
    for (config, expected) in cases {
        let path = write_file(dir.path(), "bluegreen.yaml", &config);
        let (code, _, stderr) = run_cli(&path, &["check"]);
        assert_eq!(code, 3, "{expected}: {stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in: {stderr}"
        );
    }
    // The hook message says how to fix it.
    let path = write_file(
        dir.path(),
        "bluegreen.yaml",
        &process_config().replace(
            "health:",
            &format!(
                "hooks:\n  pre_switch: {}\nhealth:",
                not_executable.display()
            ),
        ),
    );
    let (_, _, stderr) = run_cli(&path, &["check"]);
    assert!(stderr.contains("chmod +x"), "{stderr}");
}

#[test]
fn completions_and_the_man_page_come_from_the_command_definitions() {
    for (shell, expected) in [
        ("bash", "_bluegreen()"),
        ("zsh", "#compdef bluegreen"),
        ("fish", "complete -c bluegreen"),
    ] {
        let output = std::process::Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && text.contains(expected),
            "{shell}: {text:.200}"
        );
        assert!(
            text.contains("release") && text.contains("rollback"),
            "{shell}"
        );
    }
    let output = std::process::Command::new(BIN).arg("man").output().unwrap();
    let page = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && page.contains(".TH bluegreen"),
        "{page:.300}"
    );
    assert!(page.contains("release"), "the subcommands are listed");
    let output = std::process::Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn init_writes_a_config_that_checks_and_will_not_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bluegreen.yaml");
    let (code, stdout, stderr) = run_cli(&path, &["init"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(
        written.contains(BIN),
        "the template runs the example app from this binary"
    );
    let (code, _, stderr) = run_cli(&path, &["check"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run_cli(&path, &["init"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
}

#[test]
fn the_demo_releases_a_good_version_stops_a_drifting_one_at_the_mirror_and_rolls_back_a_failing_one()
 {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(BIN)
        .args(["demo", "--rate", "200", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let printed = text(&output);
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains("release 2.0                        succeeded"),
        "{printed}"
    );
    // 2.0's mirror compared answers before its canary, and found none differing.
    assert!(
        printed.contains("the mirror of green passed: 0 of "),
        "{printed}"
    );
    assert!(
        printed.contains("failed (mirror of blue: mirror_mismatch_rate"),
        "{printed}"
    );
    assert!(printed.contains("body: $.price: green "), "{printed}");
    assert!(
        printed.contains("rolled_back (analysis of blue: error_rate"),
        "{printed}"
    );
    assert!(
        printed.contains("failed requests during it        0"),
        "{printed}"
    );
    // The daemon it started was stopped gracefully (which stops the app instances too).
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(log.contains("bluegreen: stopped"), "{log}");
}

/// Stops the apps a test's deploy scripts started (their pids are in `<color>.pid`).
struct ScriptedApps(std::path::PathBuf);

impl Drop for ScriptedApps {
    fn drop(&mut self) {
        for color in ["blue", "green"] {
            if let Ok(pid) = std::fs::read_to_string(self.0.join(format!("{color}.pid"))) {
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
}

/// The deploy script leaves its app running with the script's stderr still open, as scripts
/// that background a process usually do: the deploy must not wait for that pipe to close.
#[tokio::test(flavor = "multi_thread")]
async fn the_command_provider_deploys_and_stops_through_user_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let scripts = dir.path().display().to_string();
    let deploy = executable(
        dir.path(),
        "deploy",
        &format!(
            "set -e\nout={scripts}/$BLUEGREEN_COLOR.out\n\
             {BIN} example-app --listen 127.0.0.1:0 --color $BLUEGREEN_COLOR --app-version $BLUEGREEN_VERSION > $out &\n\
             echo $! > {scripts}/$BLUEGREEN_COLOR.pid\n\
             for i in $(seq 100); do grep -q listening $out && break; sleep 0.05; done\n\
             echo \"deploying $BLUEGREEN_VERSION x$BLUEGREEN_INSTANCES\" >&2\n\
             awk '{{print $3}}' $out"
        ),
    );
    let stop = executable(
        dir.path(),
        "stop",
        &format!("kill $(cat {scripts}/$BLUEGREEN_COLOR.pid)"),
    );
    let test_record = dir.path().join("test-env");
    let test_command = executable(
        dir.path(),
        "smoke",
        &format!(
            "echo \"$BLUEGREEN_COLOR $BLUEGREEN_PREVIEW_HEADER $BLUEGREEN_PREVIEW_URL\" > {}",
            test_record.display()
        ),
    );
    let config = format!(
        "service: web\nrouter: {{ listen: 127.0.0.1:0, admin: .bluegreen/admin.sock, drain_timeout: 1s }}\n\
         app: {{ provider: command, deploy: {deploy}, stop: {stop}, ready_timeout: 10s }}\n\
         health: {{ path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2 }}\n\
         test: {{ command: {test_command} }}\n\
         release: {{ strategy: instant, monitor_window: 0s, scale_down_delay: 0s }}\n\
         dashboard: {{ listen: \"127.0.0.1:0\" }}\n"
    );
    let daemon = Daemon::start(&config).await;
    // The scripts' apps are the user's to stop, not the daemon's: stopped here, pass or fail.
    let _apps = ScriptedApps(dir.path().to_path_buf());
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let blue_pid = std::fs::read_to_string(dir.path().join("blue.pid")).unwrap();
    let out = daemon.cli(&["release", "--version", "2.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let client = support::client();
    let (code, _, body) = support::get(&client, &daemon.url("/"), &[]).await.unwrap();
    assert_eq!((code, body.trim()), (200, "green 2.0"));
    // The test command got the preview route of green.
    let seen = std::fs::read_to_string(&test_record).unwrap();
    assert!(
        seen.starts_with("green x-bluegreen-env: green http://127.0.0.1:"),
        "{seen}"
    );
    // scale_down_delay 0: the stop script stopped blue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stat =
        std::fs::read_to_string(format!("/proc/{}/stat", blue_pid.trim())).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "blue still runs: {stat}"
    );
    let out = daemon.cli(&["logs", "--environment", "green"]);
    assert!(text(&out).contains("deploying 2.0 x1"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_webhook_is_verified_against_its_ca_file() {
    use std::sync::Arc as StdArc;
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = write_file(dir.path(), "webhook-ca.pem", &certified.cert.pem());
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(StdArc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(StdArc::new(server));
    let (addr, received) = webhook_receiver(Some(acceptor)).await;
    let blue = support::Backend::start("blue-1").await;
    let green = support::Backend::start("green-1").await;
    let config = support::config(&[&blue], &[&green], "").replace(
        "health:",
        &format!(
            "webhook: {{ url: \"https://{addr}/events\", ca_file: {} }}\nhealth:",
            ca.display()
        ),
    );
    let daemon = Daemon::start(&config).await;
    daemon.wait_healthy("green", 1).await;
    daemon.switch("green").await;
    for _ in 0..100 {
        if received
            .lock()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "switch")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = received.lock().unwrap().clone();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "switch"
                && e["message"].as_str().unwrap().contains("green is live")),
        "{events:?}"
    );
    // A ca_file that cannot be read is a config error naming the key.
    let path = write_file(
        dir.path(),
        "bad.yaml",
        &config.replace(&ca.display().to_string(), "/nonexistent/ca.pem"),
    );
    let (code, _, stderr) = run_cli(&path, &["check"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("webhook.ca_file: cannot read /nonexistent/ca.pem"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn smoke_checks_reach_the_idle_color_through_a_tls_router() {
    let certified = rcgen::generate_simple_self_signed(vec!["shop.example".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "cert.pem", &certified.cert.pem());
    write_file(
        dir.path(),
        "key.pem",
        &certified.signing_key.serialize_pem(),
    );
    let config = process_config().replace(
        "  drain_timeout: 2s\n",
        "  drain_timeout: 2s\n  tls: { cert: cert.pem, key: key.pem }\n",
    );
    let daemon = Daemon::start_in(dir, &config).await;
    for (color, version) in [("blue", "1.0"), ("green", "2.0")] {
        let out = daemon.cli(&["deploy", "--environment", color, "--version", version]);
        assert!(out.status.success(), "{}", text(&out));
    }
    // The certificate names shop.example, not 127.0.0.1: the checks trust exactly the
    // router's own certificate instead.
    let out = daemon.cli(&["test", "--environment", "green"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert_eq!(printed.matches("PASS").count(), 2, "{printed}");
}
