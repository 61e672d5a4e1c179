//! `bluegreen upgrade` and SIGHUP reloads under load: no failed request, the same instances, and the release in progress goes on; a failed upgrade leaves the old process serving.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Current, Daemon, process_config, strict_clients};

fn pids(status: &Value, color: usize) -> Vec<u64> {
    status["environments"][color]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().unwrap())
        .collect()
}

/// The process config with a canary that holds at 10 % until promoted, a monitor window a
/// reload changes in place, and a health interval that changes only in a new process.
fn held_release_config(monitor_window: &str, health_interval: &str) -> String {
    process_config()
        .replace(
            "strategies:\n",
            "strategies:\n  gated: { type: canary, steps: [10, 50], wait: manual }\n",
        )
        .replace(
            "monitor_window: 1s",
            &format!("monitor_window: {monitor_window}"),
        )
        .replace(
            "health: { path: /healthz, interval: 100ms,",
            &format!("health: {{ path: /healthz, interval: {health_interval},"),
        )
}

/// The new process answers (and the old one exits by itself): the test stops the new one.
async fn follow_upgrade(daemon: &Daemon, current: &mut Current) -> Value {
    let status = daemon.status().await;
    let pid = status["pid"].as_u64().unwrap() as u32;
    assert_ne!(pid, current.0, "a new process answers after the upgrade");
    let old = std::mem::replace(current, Current(pid));
    for _ in 0..200 {
        if !old.alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!old.alive(), "the old process exited after draining");
    std::mem::forget(old);
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrades_and_reloads_under_load_fail_no_request_and_the_release_goes_on() {
    let config = held_release_config("1s", "100ms");
    assert!(config.contains("gated") && config.contains("monitor_window: 1s"));
    assert!(config.contains("interval: 100ms"));
    let daemon = Daemon::start(&config).await;
    daemon.release_over_blue(&["--version", "2.0", "--strategy", "gated"]);
    let before = daemon
        .wait_status("the canary holds at 10%", |s| {
            s["release"]["state"] == "shifting" && s["weights"]["green"] == 10
        })
        .await;
    let release_id = before["release"]["id"].clone();
    let instances = [pids(&before, 0), pids(&before, 1)];
    let mut current = Current(before["pid"].as_u64().unwrap() as u32);

    let load = strict_clients(daemon.url("/"), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..3 {
        let out = daemon.cli(&["upgrade"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "upgrade {round}: {out:?}\n{}",
            daemon.log()
        );
        assert!(said.starts_with("upgraded: pid "), "{said}");
        let status = follow_upgrade(&daemon, &mut current).await;
        assert_eq!(status["release"]["id"], release_id, "{status}");
        assert_eq!(status["release"]["state"], "shifting", "{status}");
        assert_eq!(status["weights"]["green"], 10, "{status}");
        assert_eq!(
            [pids(&status, 0), pids(&status, 1)],
            instances,
            "the instances were adopted, not restarted"
        );

        // A reload with a changed config, by signal, as systemd's ExecReload sends it.
        let window = ["2s", "3s", "1s"][round];
        std::fs::write(&daemon.config_path, held_release_config(window, "100ms")).unwrap();
        current.signal("HUP");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // The health checks are built into the router: that reload goes through a new process.
    std::fs::write(&daemon.config_path, held_release_config("1s", "150ms")).unwrap();
    let out = daemon.cli(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}\n{}", daemon.log());
    assert!(
        said.contains("config reloaded in a new process (health changed): upgraded: pid"),
        "{said}"
    );
    let status = follow_upgrade(&daemon, &mut current).await;
    assert_eq!(status["release"]["state"], "shifting", "{status}");
    // An invalid config: refused whole, the daemon keeps serving on the one in force.
    std::fs::write(&daemon.config_path, "router: [not, a, map]\n").unwrap();
    current.signal("HUP");
    tokio::time::sleep(Duration::from_millis(400)).await;
    std::fs::write(&daemon.config_path, held_release_config("1s", "150ms")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The release the upgrades carried along finishes in the last process (under load: the
    // monitor window needs requests to judge).
    let out = daemon.cli(&["promote", "--full"]);
    assert!(out.status.success(), "{out:?}");
    let done = daemon
        .wait_status("the release succeeded", |s| {
            s["release"].is_null() && s["live"] == "green"
        })
        .await;
    let (_, release) = daemon
        .admin("GET", &format!("/v1/releases/{release_id}"), None)
        .await;
    assert_eq!(
        release["release"]["state"], "succeeded",
        "{release}\n{done}"
    );
    let (answered, failed) = load.stop().await;
    let log = daemon.log();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}\n{log}",
        failed.len(),
        answered + failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(answered > 100, "only {answered} answers");
    println!("{answered} answers, none failed, across 4 upgrades, 3 reloads and 1 invalid reload");
    assert_eq!(
        log.matches("release.monitor_window changed kind=reload")
            .count(),
        3,
        "three reloads with a change: {log}"
    );
    assert!(log.contains("reload refused"), "{log}");

    drop(current);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_upgrade_leaves_the_old_process_serving_and_in_control() {
    let daemon = Daemon::start(&process_config()).await;
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert!(out.status.success(), "{out:?}");
    let pid = daemon.status().await["pid"].clone();

    // A binary that exits at once, and one that never takes the sockets.
    let stuck = daemon.dir.path().join("stuck.sh");
    std::fs::write(&stuck, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&stuck, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for (binary, why) in [
        ("/bin/false", "exited (exit status: 1) before it was ready"),
        (
            stuck.to_str().unwrap(),
            "did not ask for the sockets in time",
        ),
    ] {
        let out = daemon.cli(&["upgrade", "--binary", binary, "--timeout", "2s"]);
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(said.contains(why), "{said}");
        assert!(said.contains("goes on serving"), "{said}");
        let status = daemon.status().await;
        assert_eq!(status["pid"], pid, "the same process serves");
    }
    // Still in control: it changes traffic and deploys.
    let out = daemon.cli(&["deploy", "--environment", "green", "--version", "2.0"]);
    assert!(out.status.success(), "{out:?}");
    let switched = daemon.switch("green").await;
    assert_eq!(daemon.status().await["live"], "green", "{switched}");

    // Bad input names the field, and nothing is started.
    for (body, field) in [
        (r#"{"binary": "relative/bluegreen"}"#, "binary"),
        (r#"{"binary": "/nonexistent/bluegreen"}"#, "binary"),
        (r#"{"timeout": "soon"}"#, "timeout"),
        (r#"{"timeout": "0s"}"#, "timeout"),
        (r#"{"binnary": "/bin/true"}"#, "binnary"),
    ] {
        let (code, answer) = daemon.admin("POST", "/v1/upgrade", Some(body)).await;
        assert_eq!(code, 400, "{body}: {answer}");
        let said = answer["error"].to_string();
        assert!(said.contains(field), "{body}: {answer}");
    }
    assert_eq!(daemon.status().await["pid"], pid);
}

/// A new process that takes the sockets, loads, and then dies once the old one has let go of
/// control: the hand-over protocol spoken by a script (the old process is the real one).
const DIES_AFTER_THE_RELEASE_OF_CONTROL: &str = r#"#!/usr/bin/env python3
import array, json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["BLUEGREEN_UPGRADE_FROM"])
data, ancillary, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(3 * 4))
assert json.loads(data.split(b"\n")[0])["hello"], data
s.sendall(json.dumps({"loaded": {"version": "test"}}).encode() + b"\n")
assert s.makefile().readline().strip() == '"released"'
sys.exit(3)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_that_dies_after_taking_control_hands_it_back_under_load() {
    let daemon = Daemon::start(&held_release_config("1s", "100ms")).await;
    daemon.release_over_blue(&["--version", "2.0", "--strategy", "gated"]);
    let before = daemon
        .wait_status("the canary holds at 10%", |s| {
            s["release"]["state"] == "shifting" && s["weights"]["green"] == 10
        })
        .await;
    let fake = daemon.dir.path().join("dies.py");
    std::fs::write(&fake, DIES_AFTER_THE_RELEASE_OF_CONTROL).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let load = strict_clients(daemon.url("/"), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = daemon.cli(&[
        "upgrade",
        "--binary",
        fake.to_str().unwrap(),
        "--timeout",
        "5s",
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}\n{}", daemon.log());
    assert!(said.contains("exited (exit status: 3)"), "{said}");
    assert!(said.contains("goes on serving"), "{said}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Control is back: the same process, the same instances, the canary still held, and it
    // goes on when promoted.
    let status = daemon.status().await;
    assert_eq!(status["pid"], before["pid"], "{status}");
    assert_eq!(
        [pids(&status, 0), pids(&status, 1)],
        [pids(&before, 0), pids(&before, 1)]
    );
    assert_eq!(status["release"]["state"], "shifting", "{status}");
    assert_eq!(status["weights"]["green"], 10, "{status}");
    let out = daemon.cli(&["promote", "--full"]);
    assert!(out.status.success(), "{out:?}\n{}", daemon.log());
    daemon
        .wait_status("the release succeeded", |s| {
            s["release"].is_null() && s["live"] == "green"
        })
        .await;
    let (answered, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        answered + failed.len(),
        &failed[..failed.len().min(10)]
    );
    println!("{answered} answers, none failed, across a hand-over given back");
}
