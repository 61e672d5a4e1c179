//! Shadow traffic end to end: live requests copied to the new color by the real router, the answers compared, and a release stopped before the switch when they differ.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Backend, Daemon, Load, client, get, process_config};

/// The example app's JSON items, mirrored at 100 % for 2 s before the canary; what differs by
/// color and version (headers, fields) is ignored.
fn mirror_config() -> String {
    let config = process_config().replace(
        "--app-version {version}\"",
        "--app-version {version} --access-log\"",
    );
    format!(
        "{config}mirror:\n  percent: 100\n  duration: 3s\n  compare:\n    ignore_headers: [date, x-color, x-version]\n    ignore_json_paths: [$.color, $.version]\n"
    )
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Clients asking for items 1 to 6 (items 3 and 6 are the ones a drifting version prices
/// differently).
fn item_load(daemon: &Daemon) -> Vec<Load> {
    (1..=6)
        .map(|item| Load::start(daemon.url(&format!("/api/items/{item}")), 1))
        .collect()
}

async fn stop(loads: Vec<Load>) -> Vec<String> {
    let mut bodies = Vec::new();
    for load in loads {
        let report = load.stop().await;
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        bodies.extend(report.bodies);
    }
    bodies
}

/// A daemon with blue running 1.0 under the item load, and a release of 2.0 with `env` in its
/// environment run to its end; the clients saw no failure.
async fn release_under_load(config: &str, env: &str) -> (Daemon, std::process::Output) {
    let daemon = Daemon::start(config).await;
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let loads = item_load(&daemon);
    let out = daemon.cli(&["release", "--version", "2.0", "--env", env]);
    // The clients only ever waited for blue.
    stop(loads).await;
    (daemon, out)
}

/// The names of a release's recorded steps, in order (`GET /v1/releases/N`'s answer).
fn step_names(answer: &Value) -> Vec<&str> {
    answer["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect()
}

/// Polls the status until the release is in the mirror stage.
async fn until_mirroring(daemon: &Daemon) -> Value {
    daemon
        .wait_status("the mirror stage", |s| s["release"]["state"] == "mirroring")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirrored_stage_compares_answers_before_the_canary_and_stops_a_version_that_differs() {
    let daemon = Daemon::start(&mirror_config()).await;
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert!(out.status.success(), "{}", text(&out));
    let loads = item_load(&daemon);

    // 2.0 answers as 1.0 does (but for the ignored color and version): the mirror stage
    // passes, then the canary runs.
    let out = daemon.cli(&["release", "--version", "2.0", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    until_mirroring(&daemon).await;
    // While mirroring, every client answer is still blue's: copies' answers never reach them.
    let client = client();
    for item in 1..=20 {
        let (status, _, body) = get(&client, &daemon.url(&format!("/api/items/{item}")), &[])
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(body.contains(r#""color":"blue""#), "{body}");
    }
    // A POST is not a method copied by default.
    let posted = client
        .request(
            http::Request::post(daemon.url("/api/items/3"))
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    // Green's instances have answered copies only, each marked as such; the POST was not one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = daemon.cli(&["logs", "--environment", "green", "--lines", "100000"]);
    let logs = text(&out);
    assert!(logs.contains("GET /api/items/3 200 mirror"), "{logs}");
    assert!(!logs.contains("POST"), "{logs}");
    // (The smoke tests' `GET /` went through the preview route.)
    let answered: Vec<&str> = logs
        .lines()
        .filter(|l| l.starts_with("GET /api/"))
        .collect();
    assert!(answered.iter().all(|l| l.ends_with(" mirror")), "{logs}");
    let status = daemon.status().await;
    assert_eq!(
        status["release"]["state"], "mirroring",
        "still mirroring: {status}"
    );
    let status = daemon
        .wait_status("the release's end", |s| s["release"].is_null())
        .await;
    assert_eq!(status["live"], "green", "{status}");
    let (_, answer) = daemon.admin("GET", "/v1/releases/1", None).await;
    let release = &answer["release"];
    assert_eq!(release["state"], "succeeded", "{answer}");
    let verdict = &release["mirror"];
    assert_eq!(verdict["judged"], true, "{verdict}");
    assert!(
        verdict["window"]["compared"].as_u64().unwrap() >= 20,
        "{verdict}"
    );
    assert_eq!(verdict["window"]["mismatched"], 0, "{verdict}");
    assert_eq!(verdict["window"]["failed"], 0, "{verdict}");
    let stages = step_names(&answer);
    // The mirror ran after the tests, before the canary's first step.
    let mirror_at = stages.iter().position(|s| *s == "mirror");
    let test_at = stages.iter().position(|s| *s == "test");
    let first_step = stages.iter().position(|s| s.ends_with('%'));
    assert!(
        test_at < mirror_at && mirror_at < first_step && first_step.is_some(),
        "{stages:?}"
    );

    // 3.0 prices every third item differently: the mirror stage fails the release before
    // any traffic moves, naming the metric; blue 3.0 stays up for inspection.
    let out = daemon.cli(&[
        "release",
        "--version",
        "3.0",
        "--env",
        "EXAMPLE_PRICE_DRIFT=1",
    ]);
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(1), "exit 1 = failed: {printed}");
    assert!(printed.contains("mirror_mismatch_rate"), "{printed}");
    let bodies = stop(loads).await;
    assert!(
        bodies.iter().all(|b| !b.contains(r#""version":"3.0""#)),
        "no client saw 3.0: {bodies:?}"
    );
    let status = daemon.status().await;
    assert_eq!(status["live"], "green", "{status}");
    assert_eq!(status["weights"]["blue"], 0, "{status}");
    let (_, answer) = daemon.admin("GET", "/v1/releases/2", None).await;
    assert_eq!(answer["release"]["state"], "failed", "{answer}");
    assert_eq!(answer["release"]["traffic_moved"], false, "{answer}");
    let reason = answer["release"]["reason"].as_str().unwrap();
    assert!(reason.contains("bluegreen diff --mirror"), "{reason}");

    // `diff --mirror` shows the differing pairs: the request, both statuses, the place.
    let out = daemon.cli(&["diff", "--mirror"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("no mirror now; release #2's mirror:"),
        "{shown}"
    );
    assert!(shown.contains("GET /api/items/"), "{shown}");
    assert!(
        shown.contains("body: $.price: green 300, blue 301"),
        "{shown}"
    );
    // Items 1, 2, 4, 5 answer alike: only the drifting ones are kept.
    let out = daemon.cli(&["--output", "json", "diff", "--mirror"]);
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    let differences = view["router"]["differences"].as_array().unwrap();
    assert!(!differences.is_empty(), "{view}");
    for difference in differences {
        let request = difference["request"].as_str().unwrap();
        assert!(
            request == "GET /api/items/3" || request == "GET /api/items/6",
            "{difference}"
        );
        assert_eq!(difference["what"], "body", "{difference}");
        assert_eq!(difference["live_status"], 200, "{difference}");
        assert_eq!(difference["mirror_status"], 200, "{difference}");
    }
    assert_eq!(
        view["router"]["to"],
        Value::Null,
        "the mirror ended: {view}"
    );
}

#[tokio::test]
async fn a_mirror_the_config_cannot_run_is_refused_naming_the_key() {
    let base = mirror_config();
    let cases = [
        (
            base.replace("percent: 100", "percent: 0"),
            "mirror.percent: 0 is out of range",
        ),
        (
            base.replace(
                "ignore_json_paths: [$.color, $.version]",
                "ignore_json_paths: [\"items[x]\"]",
            ),
            "mirror.compare.ignore_json_paths[0]: \"items[x]\" is not a JSON path",
        ),
        (
            base.replace(
                "duration: 3s",
                "duration: 3s\n  methods: [GET, \"NOT A METHOD\"]",
            ),
            "mirror.methods[1]: \"NOT A METHOD\" is not a method",
        ),
        (
            base.replace(
                "duration: 3s",
                "duration: 3s\n  max_request_body: 100000000",
            ),
            "mirror.max_request_body: 100000000 is over",
        ),
        (
            format!("{base}  queue: 0\n"),
            "mirror.queue: 0 is out of range",
        ),
        (
            base.replace(
                "strategy: quick",
                "strategy: quick\n  pipeline: [deploy, test, switch, cleanup]",
            ),
            "mirror: is configured but release.pipeline has no mirror stage",
        ),
        (
            process_config().replace(
                "strategy: quick",
                "strategy: quick\n  pipeline: [deploy, mirror, switch]",
            ),
            "release.pipeline: has a mirror stage but no mirror: section",
        ),
        (
            base.replace(
                "strategy: quick",
                "strategy: quick\n  pipeline: [deploy, switch, mirror]",
            ),
            "release.pipeline: mirror must come before switch",
        ),
    ];
    for (config, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = support::write_file(dir.path(), "bluegreen.yaml", &config);
        let (code, stdout, stderr) = support::run_cli(&path, &["check"]);
        assert_ne!(code, 0, "{expected}: {stdout}");
        assert!(
            stderr.contains(expected) || stdout.contains(expected),
            "{expected}: {stdout}{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn beside_the_canary_the_old_colors_requests_are_still_compared_and_a_difference_rolls_back()
{
    // No mirror stage: the copies start with the canary's first step.
    let config = mirror_config().replace(
        "strategy: quick",
        "strategy: quick\n  pipeline: [deploy, test, switch, cleanup]",
    ) + "  beside_canary: true\n";
    let (daemon, out) = release_under_load(&config, "EXAMPLE_PRICE_DRIFT=5").await;
    let printed = text(&out);
    assert_eq!(
        out.status.code(),
        Some(6),
        "exit 6 = rolled back: {printed}"
    );
    assert!(printed.contains("mirror_mismatch_rate"), "{printed}");
    let (_, answer) = daemon.admin("GET", "/v1/releases/1", None).await;
    let release = &answer["release"];
    assert_eq!(release["state"], "rolled_back", "{answer}");
    // Rolled back at the first step, the copies of blue's 80 % compared all along.
    assert_eq!(release["percent"], 20, "{answer}");
    let stages = step_names(&answer);
    assert!(!stages.contains(&"mirror"), "{stages:?}");
    assert!(
        release["mirror"]["window"]["mismatched"].as_u64().unwrap() > 0,
        "{answer}"
    );
    let status = daemon.status().await;
    assert_eq!(status["live"], "blue", "{status}");
    assert_eq!(status["router"]["mirror"]["to"], Value::Null, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_new_color_is_judged_on_the_copies_latency_and_what_overflows_the_queue_is_dropped()
{
    // A queue of 4: the copies to a color that takes 700 ms each pile up and are dropped.
    let config = mirror_config().replace("  duration: 3s\n", "  duration: 3s\n  queue: 4\n");
    let (daemon, out) = release_under_load(&config, "EXAMPLE_LATENCY_MS=700").await;
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(1), "{printed}");
    assert!(printed.contains("mirror_latency_p99"), "{printed}");
    let (_, answer) = daemon.admin("GET", "/v1/releases/1", None).await;
    let window = &answer["release"]["mirror"]["window"];
    assert!(window["dropped"].as_u64().unwrap() > 0, "{window}");
    assert_eq!(window["mismatched"], 0, "{window}");
    assert_eq!(answer["release"]["traffic_moved"], false, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_carries_the_headers_the_live_request_had() {
    // Backends that answer with the request headers they got, as JSON: the copy must differ
    // from the live request only by its mark.
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let config = format!(
        "service: web\nrouter: {{ listen: 127.0.0.1:0, admin: .bluegreen/admin.sock, forwarded: {{ forwarded: true }} }}\n\
         environments:\n  blue: {{ upstreams: [\"{}\"] }}\n  green: {{ upstreams: [\"{}\"] }}\n\
         health: {{ path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2 }}\n\
         release: {{ pipeline: [mirror, switch], strategy: instant, monitor_window: 0s }}\n\
         analysis: {{ interval: 200ms, min_requests: 10 }}\n\
         mirror:\n  percent: 100\n  duration: 1s\n  compare:\n    ignore_headers: [date, x-served-by]\n    ignore_json_paths: [$.x-bluegreen-mirror]\n",
        blue.addr, green.addr
    );
    let daemon = Daemon::start(&config).await;
    let load = Load::start(daemon.url("/headers"), 2);
    let out = daemon.cli(&["release", "--version", "2.0"]);
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let shown = text(&daemon.cli(&["diff", "--mirror"]));
    assert_eq!(out.status.code(), Some(0), "{}{shown}", text(&out));
    let (_, answer) = daemon.admin("GET", "/v1/releases/1", None).await;
    let window = &answer["release"]["mirror"]["window"];
    assert!(window["compared"].as_u64().unwrap() >= 10, "{answer}");
    // Host, X-Forwarded-For/-Proto/-Host, Forwarded: all as the live request had them.
    assert_eq!(window["mismatched"], 0, "{answer}");
    assert!(green.served() > 0);
}
