//! Config reload by SIGHUP and `bluegreen reload`: a valid change is in force at once with no failed request; an invalid or unchangeable one changes nothing.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Backend, Daemon, Load, config, process_config};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn history(daemon: &Daemon) -> Vec<Value> {
    let (code, answer) = daemon.admin("GET", "/v1/history?limit=200", None).await;
    assert_eq!(code, 200, "{answer}");
    answer["events"].as_array().unwrap().clone()
}

async fn reloads(daemon: &Daemon) -> Vec<String> {
    history(daemon)
        .await
        .iter()
        .filter(|e| e["kind"] == "reload")
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect()
}

fn rewrite(daemon: &Daemon, from: &str, to: &str) {
    let text = std::fs::read_to_string(&daemon.config_path).unwrap();
    assert!(text.contains(from), "{from:?} not in the config");
    std::fs::write(&daemon.config_path, text.replace(from, to)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_and_reload_put_a_changed_config_in_force_without_a_failed_request() {
    let daemon = Daemon::start(&process_config()).await;
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let load = Load::start(daemon.url("/"), 6);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // SIGHUP, as nginx and HAProxy take it: the new canary steps are in force.
    rewrite(
        &daemon,
        "quick: { type: canary, steps: [20, 60], wait: 1s }",
        "quick: { type: canary, steps: [50], wait: 1s }",
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = reloads(&daemon).await;
        if !seen.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen.len(), 1, "one reload recorded: {seen:?}");
    assert!(seen[0].contains("strategies changed"), "{}", seen[0]);

    // `bluegreen reload` says what changed; the same file again changes nothing.
    rewrite(&daemon, "monitor_window: 1s", "monitor_window: 0s");
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("release.monitor_window changed"),
        "{}",
        text(&out)
    );
    let out = daemon.cli(&["reload"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).starts_with("unchanged:"), "{}", text(&out));
    assert_eq!(reloads(&daemon).await.len(), 2);

    // The next release runs the reloaded strategy.
    let (code, answer) = daemon
        .admin("POST", "/v1/releases", Some(r#"{"version": "2.0"}"#))
        .await;
    assert_eq!(code, 202, "{answer}");
    let percents: Vec<u64> = answer["release"]["strategy"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["percent"].as_u64().unwrap())
        .collect();
    assert_eq!(percents, [50, 100], "{answer}");
    daemon
        .wait_status("the release to finish", |s| s["release"].is_null())
        .await;
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "failed: {:?}", report.failures);
    assert!(report.blue > 0 && report.green > 0, "both served");
    assert!(daemon.log().contains("config reloaded"), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_or_unchangeable_config_changes_nothing() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let mut daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let good = std::fs::read_to_string(&daemon.config_path).unwrap();

    // Two mistakes: both are named, with the exit code of a bad config; nothing changes.
    std::fs::write(
        &daemon.config_path,
        format!("{good}analysis: {{ interval: 0s }}\nrelease: {{ strategy: sideways }}\n"),
    )
    .unwrap();
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("analysis.interval"), "{said}");
    assert!(said.contains("release.strategy"), "{said}");
    assert!(said.contains("the running config stays in force"), "{said}");
    // The daemon itself refuses it the same way, listing every issue by its key.
    let (code, answer) = daemon.admin("POST", "/v1/reload", Some("{}")).await;
    assert_eq!(code, 400, "{answer}");
    let fields: Vec<&str> = answer["error"]["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["release.strategy", "analysis.interval"],
        "{answer}"
    );

    // SIGHUP with the same bad file: logged, and the daemon keeps serving.
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(daemon.log().contains("reload refused"), "{}", daemon.log());
    let client = support::client();
    let (code, served_by, _) = support::get(&client, &daemon.url("/"), &[]).await.unwrap();
    assert_eq!((code, served_by.as_str()), (200, "blue-1"));

    // What the sockets and the state are bound to cannot change, not even in a new process
    // (the router's timeouts and health checks reload through one: tests/upgrade.rs).
    std::fs::write(
        &daemon.config_path,
        good.replace(
            "listen: 127.0.0.1:0\n  admin",
            "listen: 127.0.0.1:1\n  admin",
        )
        .replace("service: web", "service: shop")
        .replace("interval: 100ms", "interval: 200ms"),
    )
    .unwrap();
    let out = daemon.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("service, router.listen cannot change while the daemon runs"),
        "{}",
        text(&out)
    );
    assert!(reloads(&daemon).await.is_empty(), "nothing was recorded");
    assert_eq!(
        daemon.signal_and_wait("TERM").code(),
        Some(0),
        "the daemon was alive and stops cleanly"
    );
}
