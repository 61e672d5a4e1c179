//! Releases end to end: the real binary supervising the example app, under load, through every strategy and gate.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Daemon, Load, process_config};

/// A daemon with blue running 1.0 and live.
async fn blue_live(config: &str) -> Daemon {
    let daemon = Daemon::start(config).await;
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    daemon
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn release(daemon: &Daemon, id: i64) -> Value {
    let (code, answer) = daemon
        .admin("GET", &format!("/v1/releases/{id}"), None)
        .await;
    assert_eq!(code, 200, "{answer}");
    answer
}

/// Tests that send no traffic let steps go on unjudged (the default waits for data).
fn no_traffic_config() -> String {
    process_config().replace(
        "min_requests: 20",
        "min_requests: 20\n  on_too_few_requests: proceed",
    )
}

/// Smoke tests that check health only: the faulty versions below pass them (as bugs that
/// smoke tests miss do), so analysis is what must catch them.
fn health_checks_only() -> String {
    let config = process_config();
    let line = "    - { path: /, status: 200, body_contains: \"{version}\" }\n";
    assert!(config.contains(line));
    config.replace(line, "")
}

fn live(status: &Value) -> Option<&str> {
    status["live"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_release_under_load_fails_no_request_and_records_every_step() {
    let daemon = blue_live(&process_config()).await;
    let load = Load::start(daemon.url("/"), 6);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let out = daemon.cli(&["release", "--version", "2.0"]);
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(0), "{printed}");
    assert!(printed.contains("step 1/3: green 20%"), "{printed}");
    assert!(printed.contains("release #1 succeeded"), "{printed}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.stop().await;

    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(
        report.blue > 50 && report.green > 50,
        "{} blue, {} green",
        report.blue,
        report.green
    );
    assert!(
        report.bodies.contains("blue 1.0") && report.bodies.contains("green 2.0"),
        "{:?}",
        report.bodies
    );

    let status = daemon.status().await;
    assert_eq!(live(&status), Some("green"), "{status}");
    let answer = release(&daemon, 1).await;
    assert_eq!(answer["release"]["state"], "succeeded", "{answer}");
    let steps: Vec<&str> = answer["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["deploy", "test", "20%", "60%", "100%", "monitor"],
        "{answer}"
    );
    assert!(
        answer["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "ok"),
        "{answer}"
    );
    // Blue stays warm: a rollback is a table swap back to 1.0.
    let envs = &status["environments"];
    assert_eq!(envs[0]["status"], "running", "{envs}");
    assert!(envs[0]["scale_down_at_ms"].as_i64().is_some(), "{envs}");
    let out = daemon.cli(&["rollback"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(live(&daemon.status().await), Some("blue"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_erroring_version_is_rolled_back_by_analysis_naming_the_metric() {
    let daemon = blue_live(&health_checks_only()).await;
    let load = Load::start(daemon.url("/"), 6);
    let out = daemon.cli(&[
        "release",
        "--version",
        "2.0",
        "--env",
        "EXAMPLE_ERROR_RATE=0.3",
    ]);
    let report = load.stop().await;
    let printed = text(&out);
    assert_eq!(
        out.status.code(),
        Some(6),
        "exit 6 = rolled back: {printed}"
    );
    assert!(printed.contains("error_rate"), "{printed}");
    let status = daemon.status().await;
    assert_eq!(live(&status), Some("blue"), "{status}");
    let answer = release(&daemon, 1).await;
    let reason = answer["release"]["reason"].as_str().unwrap();
    assert!(reason.contains("over the limit 5.00%"), "{reason}");
    // The rollback happened at the first step: green never got more than 20 %.
    assert_eq!(answer["release"]["percent"], 20, "{answer}");
    // Failures are green's own 500s during the canary, none from blue.
    assert!(
        report
            .failures
            .iter()
            .all(|f| f.contains("green 2.0 failed on purpose")),
        "{:?}",
        report.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_version_is_rolled_back_on_p99_latency() {
    let daemon = blue_live(&health_checks_only()).await;
    let load = Load::start(daemon.url("/"), 8);
    let out = daemon.cli(&[
        "release",
        "--version",
        "2.0",
        "--env",
        "EXAMPLE_LATENCY_MS=400",
    ]);
    let report = load.stop().await;
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(6), "{printed}");
    assert!(printed.contains("latency_p99"), "{printed}");
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(live(&daemon.status().await), Some("blue"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_smoke_test_blocks_the_switch() {
    // The check expects a body the app never sends.
    let config =
        process_config().replace("body_contains: \"{version}\"", "body_contains: \"welcome\"");
    let daemon = blue_live(&config).await;
    let out = daemon.cli(&["release", "--version", "2.0"]);
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(
        printed.contains("body does not contain \\\"welcome\\\"")
            || printed.contains("body does not contain \"welcome\""),
        "{printed}"
    );
    let status = daemon.status().await;
    assert_eq!(live(&status), Some("blue"));
    let answer = release(&daemon, 1).await;
    assert_eq!(answer["release"]["state"], "failed");
    assert_eq!(answer["release"]["traffic_moved"], false);
    // No weights were ever set.
    let (_, history) = daemon.admin("GET", "/v1/history?limit=200", None).await;
    assert!(
        history["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["kind"] != "weights"),
        "{history}"
    );
    // `bluegreen test` says the same on its own, with exit 1.
    let out = daemon.cli(&["test", "--environment", "green"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("FAIL"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_canary_waits_for_promote_and_pause_holds_it() {
    let config = no_traffic_config().replace(
        "quick: { type: canary, steps: [20, 60], wait: 1s }",
        "quick: { type: canary, steps: [20, 60], wait: 1s }\n  gated: { type: canary, steps: [30], wait: manual }",
    );
    let daemon = blue_live(&config).await;
    let out = daemon.cli(&["promote"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "nothing to promote: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("no release or shift is running"),
        "{}",
        text(&out)
    );

    let out = daemon.cli(&["deploy", "--environment", "green", "--version", "2.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = daemon.cli(&["switch", "--to", "green", "--strategy", "gated", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    // It holds at 30 % however long we wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = daemon.status().await;
    assert_eq!(status["weights"]["green"], 30, "{status}");
    assert_eq!(status["release"]["state"], "shifting");
    // A second release is refused while this one runs, naming it.
    let out = daemon.cli(&["release", "--version", "3.0"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("release #1"), "{}", text(&out));
    // Hand changes are refused too.
    let out = daemon.cli(&["weights", "--green", "50"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));

    let out = daemon.cli(&["promote"]);
    assert!(out.status.success(), "{}", text(&out));
    // Now at 100 % and in the monitor window; pause holds it there.
    daemon
        .wait_status("green at 100 %", |s| s["weights"]["green"] == 100)
        .await;
    assert!(daemon.cli(&["pause"]).status.success());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = daemon.status().await;
    assert_eq!(status["release"]["state"], "monitoring", "{status}");
    assert_eq!(status["release"]["paused"], true, "{status}");
    assert!(daemon.cli(&["resume"]).status.success());
    daemon
        .wait_status("the release's end", |s| s["release"].is_null())
        .await;
    let answer = release(&daemon, 1).await;
    assert_eq!(answer["release"]["state"], "succeeded", "{answer}");
    assert_eq!(answer["release"]["kind"], "shift");
}

#[tokio::test(flavor = "multi_thread")]
async fn linear_and_instant_strategies_and_abort() {
    let daemon = blue_live(&no_traffic_config()).await;
    let out = daemon.cli(&["deploy", "--environment", "green", "--version", "2.0"]);
    assert!(out.status.success(), "{}", text(&out));
    // A preset: 40 % every 300 ms → 40, 80, 100.
    let out = daemon.cli(&[
        "switch",
        "--to",
        "green",
        "--strategy",
        "linear-40-every-300ms",
    ]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    for step in [
        "step 1/3: green 40%",
        "step 2/3: green 80%",
        "step 3/3: green 100%",
    ] {
        assert!(printed.contains(step), "{step}: {printed}");
    }
    // Instant back to blue (blue is still warm: a shift needs no deploy).
    let out = daemon.cli(&["switch", "--to", "blue", "--strategy", "instant"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(live(&daemon.status().await), Some("blue"));
    // Abort during a long canary sends traffic back; exit 6 for the follower.
    let out = daemon.cli(&[
        "switch",
        "--to",
        "green",
        "--strategy",
        "canary-50-1m",
        "--detach",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    daemon
        .wait_status("green at 50 %", |s| s["weights"]["green"] == 50)
        .await;
    let out = daemon.cli(&["abort", "--reason", "saw something odd"]);
    assert!(out.status.success(), "{}", text(&out));
    daemon
        .wait_status("the release's end", |s| s["release"].is_null())
        .await;
    let status = daemon.status().await;
    assert_eq!(live(&status), Some("blue"), "{status}");
    let answer = release(&daemon, 3).await;
    assert_eq!(answer["release"]["state"], "rolled_back", "{answer}");
    assert!(
        answer["release"]["reason"]
            .as_str()
            .unwrap()
            .contains("saw something odd")
    );
    // An unknown strategy names the choices.
    let out = daemon.cli(&["switch", "--to", "green", "--strategy", "bluegreen"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("canary-10-5m"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_name_what_to_fix_and_change_nothing() {
    let daemon = Daemon::start(&process_config()).await;
    // Nothing deployed: switching to green is refused, naming deploy.
    let out = daemon.cli(&["switch", "--to", "green"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("green is not deployed"),
        "{}",
        text(&out)
    );
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert!(out.status.success(), "{}", text(&out));
    // Deploying to the live color.
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.1"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("deploy to the idle color green"),
        "{}",
        text(&out)
    );
    // An empty or spaced version.
    for version in ["", "  ", "1 0"] {
        let out = daemon.cli(&["deploy", "--environment", "green", "--version", version]);
        assert_eq!(out.status.code(), Some(4), "{version:?}: {}", text(&out));
        assert!(text(&out).contains("version"), "{}", text(&out));
    }
    let (code, answer) = daemon
        .admin(
            "POST",
            "/v1/releases",
            Some(r#"{"version":"2.0","strategy":7}"#),
        )
        .await;
    assert_eq!(code, 400, "{answer}");
    assert_eq!(answer["error"]["field"], "strategy", "{answer}");
    let (code, answer) = daemon
        .admin(
            "POST",
            "/v1/deploy",
            Some(r#"{"environment":"green","version":"2","env":{"1X":"y"}}"#),
        )
        .await;
    assert_eq!(code, 400, "{answer}");
    assert_eq!(answer["error"]["field"], "env.1X", "{answer}");
    // None of it changed anything.
    let status = daemon.status().await;
    assert_eq!(live(&status), Some("blue"));
    assert_eq!(status["environments"][0]["version"], "1.0");
    assert_eq!(status["environments"][1]["status"], "stopped", "{status}");
    let out = daemon.cli(&["abort"]);
    assert_eq!(out.status.code(), Some(4));
}

#[tokio::test(flavor = "multi_thread")]
async fn diff_logs_and_monitor_show_the_environments() {
    let config = process_config().replace(
        "health:",
        "environments:\n  green: { instances: 1, env: { FEATURE: on } }\nhealth:",
    );
    let daemon = blue_live(&config).await;
    let out = daemon.cli(&["deploy", "--environment", "green", "--version", "2.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = daemon.cli(&["diff", "blue", "green"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    for key in ["version", "spec.instances", "spec.env"] {
        assert!(printed.contains(key), "{key}: {printed}");
    }
    let out = daemon.cli(&["logs", "--environment", "blue"]);
    assert!(out.status.success());
    assert!(
        text(&out).contains("listening on 127.0.0.1:"),
        "{}",
        text(&out)
    );
    let load = Load::start(daemon.url("/"), 2);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = daemon.cli(&["monitor", "--interval", "1", "--count", "1"]);
    load.stop().await;
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("blue 1.0 w100%") && printed.contains("green 2.0 w0%"),
        "{printed}"
    );
    assert!(printed.contains("req/s"), "{printed}");
    // A release to green warns that it is not configured like blue.
    let out = daemon.cli(&["release", "--version", "3.0", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let (_, history) = daemon.admin("GET", "/v1/history?limit=50", None).await;
    assert!(
        history["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "warning"
                && e["message"]
                    .as_str()
                    .unwrap()
                    .contains("green is not configured like blue: instances (1 vs 2)")),
        "{history}"
    );
    let out = daemon.cli(&["abort"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn aborting_during_the_deploy_stops_the_new_instances() {
    let daemon = blue_live(&process_config()).await;
    let out = daemon.cli(&[
        "release",
        "--version",
        "2.0",
        "--env",
        "EXAMPLE_SLOW_START_MS=10000",
        "--detach",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let mut green_pids = Vec::new();
    for _ in 0..100 {
        let status = daemon.status().await;
        green_pids = status["environments"][1]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["pid"].as_u64())
            .collect();
        if status["release"]["state"] == "deploying" && green_pids.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(green_pids.len(), 2, "green's instances started");
    let out = daemon.cli(&["abort", "--reason", "wrong build"]);
    assert!(out.status.success(), "{}", text(&out));
    daemon
        .wait_status("the release's end", |s| s["release"].is_null())
        .await;
    let answer = release(&daemon, 1).await;
    assert_eq!(answer["release"]["state"], "aborted", "{answer}");
    let status = daemon.status().await;
    assert_eq!(status["environments"][1]["status"], "failed", "{status}");
    assert_eq!(live(&status), Some("blue"));
    for pid in green_pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "green instance {pid} still runs"
        );
    }
}

/// As a new user would: `init`, `up`, `release --version 1.0` in a fresh folder. Nothing ran
/// before, so there is no baseline to compare with: the release switches at once and says so.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_release_of_a_service_switches_at_once_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let init = std::process::Command::new(support::BIN)
        .current_dir(dir.path())
        .arg("init")
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", text(&init));
    let written = std::fs::read_to_string(dir.path().join("bluegreen.yaml")).unwrap();
    // Only what a test needs changed: free ports, quick health checks.
    let config = written
        .replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0")
        .replace(
            "health: { path: /healthz, interval: 1s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3 }",
            "health: { path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2 }",
        )
        + "dashboard: { listen: \"127.0.0.1:0\" }\n";
    assert_ne!(config, written);
    let daemon = Daemon::start_in(dir, &config).await;
    let out = daemon.cli(&["release", "--version", "1.0"]);
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(0), "{printed}");
    assert!(
        printed.contains("first release: no baseline to compare with, switching at once"),
        "{printed}"
    );
    assert!(printed.contains("(from nothing)"), "{printed}");
    assert!(!printed.contains("rolled back"), "{printed}");
    let status = daemon.status().await;
    assert_eq!(live(&status), Some("green"), "{status}");
    assert_eq!(status["environments"][1]["version"], "1.0");
    let client = support::client();
    let (code, _, body) = support::get(&client, &daemon.url("/"), &[]).await.unwrap();
    assert_eq!((code, body.trim()), (200, "green 1.0"));
    // The second release is an ordinary one: it has 1.0 to compare with.
    let (code, answer) = daemon
        .admin("POST", "/v1/releases", Some(r#"{"version": "2.0"}"#))
        .await;
    assert_eq!(code, 202, "{answer}");
    assert_eq!(answer["release"]["first"], false, "{answer}");
    assert_eq!(answer["release"]["from_version"], "1.0", "{answer}");
    let _ = daemon.cli(&["abort"]);
}
