//! Switching under load: zero failed requests, colors that were really live, refusals that change nothing.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{Backend, Daemon, client, color_of, config, fresh_connection_client, get};

/// One admin call: the new color took effect somewhere between `sent` and `answered`.
#[derive(Clone, Copy)]
struct SwitchWindow {
    sent: Instant,
    answered: Instant,
    to: &'static str,
}

/// The colors that may have been live at some moment in [start, end].
fn possibly_live(windows: &[SwitchWindow], start: Instant, end: Instant) -> Vec<&'static str> {
    let mut colors = vec!["blue"];
    if let Some(j) = windows.iter().rposition(|w| w.sent <= start) {
        colors = vec![windows[j].to];
        if start < windows[j].answered {
            colors.push(if j == 0 { "blue" } else { windows[j - 1].to });
        }
    }
    for w in windows.iter().filter(|w| w.sent > start && w.sent <= end) {
        colors.push(w.to);
    }
    colors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_and_rolling_back_under_load_fails_no_request() {
    let blue1 = Backend::start("blue-1").await;
    let blue2 = Backend::start("blue-2").await;
    let green1 = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue1, &blue2], &[&green1], "")).await;
    let url = daemon.url("/");

    let running = Arc::new(AtomicBool::new(true));
    let mut workers = Vec::new();
    // 12 keep-alive clients and 4 that open a new connection for every request.
    for i in 0..16 {
        let running = Arc::clone(&running);
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let client = if i < 12 {
                client()
            } else {
                fresh_connection_client()
            };
            let mut seen = Vec::new();
            while running.load(Ordering::Relaxed) && seen.len() < 20_000 {
                let start = Instant::now();
                let result = get(&client, &url, &[]).await;
                seen.push((start, Instant::now(), result));
            }
            seen
        }));
    }

    let mut windows = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in 0..60 {
        tokio::time::sleep(Duration::from_millis(15)).await;
        let sent = Instant::now();
        let (path, body, to) = if round % 2 == 0 {
            ("/v1/switch", r#"{"to":"green"}"#, "green")
        } else {
            ("/v1/rollback", "{}", "blue")
        };
        let (code, answer) = daemon.admin("POST", path, Some(body)).await;
        assert_eq!(code, 200, "round {round}: {answer}");
        windows.push(SwitchWindow {
            sent,
            answered: Instant::now(),
            to,
        });
        assert!(Instant::now() < deadline, "switching took too long");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    running.store(false, Ordering::Relaxed);

    let mut total = 0;
    let mut per_color = [0u64; 2];
    for worker in workers {
        for (start, end, result) in worker.await.unwrap() {
            total += 1;
            let (status, served_by, body) =
                result.unwrap_or_else(|e| panic!("request failed: {e}\n{}", daemon.log()));
            assert_eq!(status, 200, "body: {body}");
            let color = color_of(&served_by);
            let allowed = possibly_live(&windows, start, end);
            assert!(
                allowed.contains(&color),
                "served by {served_by} while only {allowed:?} could be live"
            );
            per_color[usize::from(color == "green")] += 1;
        }
    }
    assert_eq!(windows.len(), 60);
    assert!(total > 1000, "only {total} requests were made");
    assert!(
        per_color[0] > 100 && per_color[1] > 100,
        "both colors served: {per_color:?}"
    );
    // The router's own counters agree that nothing failed.
    let status = daemon.status().await;
    for color in status["colors"].as_array().unwrap() {
        assert_eq!(color["metrics"]["responses_5xx"], 0, "{color}");
        assert_eq!(color["metrics"]["upstream_errors"], 0, "{color}");
    }
    assert!(
        blue1.served() > 0 && blue2.served() > 0,
        "both blue upstreams share the load"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_switch_to_an_unhealthy_color_is_refused_and_the_old_table_keeps_serving() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    green.set_healthy(false);
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    daemon.wait_healthy("green", 0).await;
    let before = daemon.status().await;

    let (code, body) = daemon
        .admin("POST", "/v1/switch", Some(r#"{"to":"green"}"#))
        .await;
    assert_eq!(code, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("environment green has no healthy upstream"),
        "{message}"
    );

    let (code, body) = daemon
        .admin("POST", "/v1/weights", Some(r#"{"green":10}"#))
        .await;
    assert_eq!(code, 409, "{body}");

    let cli = daemon.cli(&["switch", "--to", "green"]);
    assert_eq!(cli.status.code(), Some(4), "refusals exit 4");
    assert!(String::from_utf8_lossy(&cli.stderr).contains("no healthy upstream"));

    let after = daemon.status().await;
    assert_eq!(
        after["generation"], before["generation"],
        "the table was not replaced"
    );
    assert_eq!(after["live"], "blue");
    let http = client();
    for _ in 0..20 {
        let (status, served_by, _) = get(&http, &daemon.url("/"), &[]).await.unwrap();
        assert_eq!((status, served_by.as_str()), (200, "blue-1"));
    }

    // Once green recovers the same switch goes through.
    green.set_healthy(true);
    daemon.wait_healthy("green", 1).await;
    daemon.switch("green").await;
    let (_, served_by, _) = get(&http, &daemon.url("/"), &[]).await.unwrap();
    assert_eq!(served_by, "green-1");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_request_started_before_a_switch_finishes_on_the_old_color() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  drain_timeout: 10s\n")).await;
    let url = daemon.url("/slow?sleep_ms=3000");
    let slow = tokio::spawn(async move { get(&client(), &url, &[]).await });
    daemon.wait_open("blue", 1).await;
    daemon.switch("green").await;
    let status = daemon.status().await;
    assert_eq!(
        status["colors"][0]["metrics"]["draining"], 1,
        "blue has one request draining: {status}"
    );
    let (_, served_by, _) = get(&client(), &daemon.url("/"), &[]).await.unwrap();
    assert_eq!(served_by, "green-1", "new requests go to green at once");
    let (status, served_by, body) = slow.await.unwrap().unwrap();
    assert_eq!(
        (status, served_by.as_str(), body.as_str()),
        (200, "blue-1", "blue-1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_speaks_every_spelling_and_rollback_returns_to_the_last_live_color() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;

    let nothing = daemon.cli(&["rollback"]);
    assert_eq!(nothing.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&nothing.stderr).contains("nothing to roll back to"));

    let wrong_from = daemon.cli(&["switch", "--from", "green", "--to", "blue"]);
    assert_eq!(wrong_from.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&wrong_from.stderr).contains(
            "--from green does not match the router: green takes no traffic (blue is live)"
        )
    );

    let seed = daemon.cli(&["router", "switch", "--from", "blue", "--to", "green"]);
    assert!(
        seed.status.success(),
        "{}",
        String::from_utf8_lossy(&seed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&seed.stdout).trim(),
        "switched: green is live (was blue)"
    );

    let weights = daemon.cli(&["weights", "--green", "10"]);
    assert!(weights.status.success());
    let status = daemon.cli(&["status", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["weights"],
        serde_json::json!({"blue": 90, "green": 10})
    );
    assert_eq!(status["live"], serde_json::Value::Null);

    // A canary back from green (green 10%) rolls back to green, the last color with all traffic.
    assert!(daemon.cli(&["rollback"]).status.success());
    let status = daemon.status().await;
    assert_eq!(status["live"], "green", "rollback undid the weights change");
    assert_eq!(status["rollback_to"], "blue");
    // From a canary that started on blue, rollback returns everything to blue.
    assert!(daemon.cli(&["switch", "--to", "blue"]).status.success());
    assert!(daemon.cli(&["weights", "--green", "30"]).status.success());
    assert!(daemon.cli(&["weights", "--green", "60"]).status.success());
    let rolled = daemon.cli(&["rollback"]);
    assert_eq!(
        String::from_utf8_lossy(&rolled.stdout).trim(),
        "rolled back: blue is live (was blue 40% / green 60%)"
    );

    let history = daemon.cli(&["history"]);
    let history = String::from_utf8_lossy(&history.stdout);
    let kinds: Vec<&str> = history
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "start", "switch", "weights", "rollback", "switch", "weights", "weights", "rollback"
        ],
        "{history}"
    );
    assert!(
        history
            .lines()
            .last()
            .unwrap()
            .ends_with("rolled back: blue is live (was blue 40% / green 60%)"),
        "{history}"
    );

    let text = daemon.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("live: blue"), "{text}");
    assert!(
        text.contains(&blue.addr.to_string()) && text.contains("healthy"),
        "{text}"
    );

    let usage = daemon.cli(&["weights", "--green", "10", "--blue", "90"]);
    assert_eq!(usage.status.code(), Some(2), "clap usage errors exit 2");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_color_survives_kill_9_and_a_restart() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let text = config(&[&blue], &[&green], "");
    let daemon = Daemon::start(&text).await;
    daemon.switch("green").await;
    let dir = daemon.into_dir(); // SIGKILL, keep the folder
    let daemon = Daemon::start_in(dir, &text).await;
    let status = daemon.status().await;
    assert_eq!(status["live"], "green", "{status}");
    assert_eq!(status["rollback_to"], "blue");
    let (_, served_by, _) = get(&client(), &daemon.url("/"), &[]).await.unwrap();
    assert_eq!(served_by, "green-1");
    assert!(daemon.cli(&["rollback"]).status.success());
    assert_eq!(daemon.status().await["live"], "blue");
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_stop_lets_an_in_flight_request_finish() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let mut daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let url = daemon.url("/slow?sleep_ms=1000");
    let slow = tokio::spawn(async move { get(&client(), &url, &[]).await });
    daemon.wait_open("blue", 1).await;
    let started = Instant::now();
    let exit = daemon.signal_and_wait("TERM");
    assert!(exit.success(), "graceful stop exits 0: {exit:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "it stopped as soon as the request finished"
    );
    let (status, served_by, _) = slow.await.unwrap().unwrap();
    assert_eq!((status, served_by.as_str()), (200, "blue-1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_still_waiting_at_the_drain_deadline_gets_a_typed_503() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  drain_timeout: 500ms\n")).await;
    let url = daemon.url("/slow?sleep_ms=5000");
    let stuck = tokio::spawn(async move {
        let started = Instant::now();
        let response = client()
            .request(http::Request::get(url).body(Default::default()).unwrap())
            .await
            .unwrap();
        (
            started.elapsed(),
            response.status(),
            response.headers().get("x-bluegreen-error").cloned(),
        )
    });
    daemon.wait_open("blue", 1).await;
    daemon.switch("green").await;
    let (elapsed, status, kind) = stuck.await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(kind.unwrap(), "drain-timeout");
    assert!(
        elapsed < Duration::from_secs(3),
        "cut at the drain deadline, not when blue answered: {elapsed:?}"
    );
}
