//! The daemon killed with SIGKILL at each release step restarts consistent: the documented rule, live color served, instances adopted.

mod support;

use std::time::Duration;

use bluegreen::store::{ProviderState, SqliteStore, StateStore, Write};
use serde_json::Value;
use support::{Daemon, alive, client, get, process_config, write_file};

fn pids(status: &Value, color: usize) -> Vec<u64> {
    status["environments"][color]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["pid"].as_u64().expect("a recorded pid"))
        .collect()
}

/// Starts a release, kills the daemon with SIGKILL once the release is in `state`, restarts
/// it on the same folder and returns the restarted daemon and the settled release.
async fn kill_during(state: &str, config: &str, release: &[&str]) -> (Daemon, Value, Vec<u64>) {
    let daemon = Daemon::start(config).await;
    daemon.release_over_blue(release);
    let mut reached = false;
    for _ in 0..400 {
        let status = daemon.status().await;
        // In that state, and inside its step (the step row is written just after the state).
        let (_, release) = daemon.admin("GET", "/v1/releases/1", None).await;
        let in_step = release["steps"]
            .as_array()
            .is_some_and(|steps| steps.iter().any(|s| s["status"] == "running"));
        if status["release"]["state"] == state && in_step {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reached, "never reached {state}: {}", daemon.status().await);
    let before = daemon.status().await;
    let blue_pids = pids(&before, 0);
    let dir = daemon.into_dir();
    let daemon = Daemon::start_in(dir, config).await;
    let mut settled = Value::Null;
    for _ in 0..200 {
        let (_, answer) = daemon.admin("GET", "/v1/releases/1", None).await;
        if matches!(
            answer["release"]["state"].as_str(),
            Some("aborted" | "rolled_back" | "failed" | "succeeded")
        ) {
            settled = answer;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !settled.is_null(),
        "the release was not settled: {}",
        daemon.log()
    );
    (daemon, settled, blue_pids)
}

/// After the restart blue is live, runs the very processes it ran before, and answers.
async fn blue_serves_as_before(daemon: &Daemon, blue_pids: &[u64]) {
    let status = daemon.status().await;
    assert_eq!(status["live"], "blue", "{status}");
    assert_eq!(
        pids(&status, 0),
        blue_pids,
        "blue's instances were adopted, not restarted"
    );
    assert!(blue_pids.iter().all(|p| alive(*p)));
    daemon.wait_healthy("blue", 2).await;
    let client = client();
    for _ in 0..20 {
        let (code, _, body) = get(&client, &daemon.url("/"), &[]).await.unwrap();
        assert_eq!((code, body.trim()), (200, "blue 1.0"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_while_deploying_the_release_is_abandoned_and_the_new_color_stopped() {
    let (daemon, settled, blue_pids) = kill_during(
        "deploying",
        &process_config(),
        &["--version", "2.0", "--env", "EXAMPLE_SLOW_START_MS=4000"],
    )
    .await;
    assert_eq!(settled["release"]["state"], "aborted", "{settled}");
    let reason = settled["release"]["reason"].as_str().unwrap();
    assert!(reason.contains("before any traffic moved"), "{reason}");
    assert!(
        settled["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["status"] == "interrupted"),
        "{settled}"
    );
    blue_serves_as_before(&daemon, &blue_pids).await;
    let status = daemon.status().await;
    assert_eq!(status["environments"][1]["status"], "failed", "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_while_testing_the_release_is_abandoned_and_green_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_file(dir.path(), "slow-test", "#!/bin/sh\nsleep 5\n");
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let config = process_config().replace(
        "test:\n",
        &format!("test:\n  command: {}\n", script.display()),
    );
    let (daemon, settled, blue_pids) = kill_during("testing", &config, &["--version", "2.0"]).await;
    assert_eq!(settled["release"]["state"], "aborted", "{settled}");
    blue_serves_as_before(&daemon, &blue_pids).await;
    let status = daemon.status().await;
    assert_eq!(status["environments"][1]["status"], "running", "{status}");
    assert_eq!(status["environments"][1]["version"], "2.0");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_while_shifting_the_release_is_rolled_back() {
    let config = process_config().replace("wait: 1s", "wait: 30s").replace(
        "min_requests: 20",
        "min_requests: 20\n  on_too_few_requests: proceed",
    );
    let (daemon, settled, blue_pids) =
        kill_during("shifting", &config, &["--version", "2.0"]).await;
    assert_eq!(settled["release"]["state"], "rolled_back", "{settled}");
    let reason = settled["release"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("rolled back to blue on restart"),
        "{reason}"
    );
    blue_serves_as_before(&daemon, &blue_pids).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_while_monitoring_the_release_is_rolled_back() {
    let config = process_config()
        .replace("monitor_window: 1s", "monitor_window: 30s")
        .replace("strategy: quick", "strategy: instant")
        .replace(
            "min_requests: 20",
            "min_requests: 20\n  on_too_few_requests: proceed",
        );
    let (daemon, settled, blue_pids) =
        kill_during("monitoring", &config, &["--version", "2.0"]).await;
    assert_eq!(settled["release"]["state"], "rolled_back", "{settled}");
    blue_serves_as_before(&daemon, &blue_pids).await;
}

/// The daemon can die between starting an instance and recording its pid. After the restart
/// that instance is found by the mark in its environment and stopped with the abandoned deploy,
/// instead of running on, unowned, on the port the store recorded.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_started_but_not_recorded_is_found_after_a_restart_and_stopped() {
    let config = process_config();
    let daemon = Daemon::start(&config).await;
    daemon.release_over_blue(&["--version", "2.0", "--env", "EXAMPLE_SLOW_START_MS=4000"]);
    let deploying = daemon
        .wait_status("green's instances started", |s| {
            s["release"]["state"] == "deploying"
                && s["environments"][1]["instances"]
                    .as_array()
                    .is_some_and(|i| i.len() == 2 && i.iter().all(|i| i["pid"].is_u64()))
        })
        .await;
    let green_pids = pids(&deploying, 1);
    let dir = daemon.into_dir();
    assert!(green_pids.iter().all(|p| alive(*p)), "{deploying}");

    // What the store holds had the daemon died a moment earlier: ports, no pids.
    let store = SqliteStore::open(&dir.path().join(".bluegreen")).unwrap();
    let [_, green] = store.environments().await.unwrap();
    let mut record = green.value.clone();
    let ProviderState::Process { instances } = &mut record.provider else {
        panic!("green runs process instances: {:?}", record.provider);
    };
    instances.iter_mut().for_each(|i| i.pid = None);
    store
        .commit(Write {
            environment: Some((green.revision, record)),
            ..Write::default()
        })
        .await
        .unwrap();
    drop(store);

    let daemon = Daemon::start_in(dir, &config).await;
    let status = daemon
        .wait_status("the interrupted deploy settled", |s| {
            s["environments"][1]["status"] == "failed"
        })
        .await;
    for _ in 0..100 {
        if green_pids.iter().all(|p| !alive(*p)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let running: Vec<_> = green_pids.iter().filter(|p| alive(**p)).collect();
    assert!(
        running.is_empty(),
        "green instances {running:?} still run after the restart: {status}\n{}",
        daemon.log()
    );
}
