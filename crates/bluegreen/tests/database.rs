//! The expand/contract gate with a real PostgreSQL (Debian's): `migrate_expand` runs before the new version deploys and the live version is tested again against the expanded schema; a bad expand that breaks it stops the release before anything deploys, and `migrate_rollback` runs; `migrate_contract` waits for the old color's cleanup.

#[path = "support/postgres.rs"]
mod postgres;
mod support;

use std::time::{Duration, Instant};

use postgres::Postgres;
use serde_json::Value;
use support::{Daemon, Load, process_config};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The table 1.0 writes, with a column no version uses any more (2.0's contract drops it).
const SCHEMA: &str = "CREATE TABLE visits (id serial PRIMARY KEY, color text NOT NULL, version text NOT NULL, legacy text)";

/// Migrations by version and phase, as a team would keep them, and the hook that runs the
/// release's: `migrate.sh PHASE` applies `<BLUEGREEN_VERSION>/<PHASE>.sql` if there is one.
fn migrations(dir: &std::path::Path, url: &str) -> String {
    let files = [
        // 2.0 adds a column 1.0 does not know (1.0 keeps working), and drops `legacy` once
        // 1.0 is gone.
        (
            "2.0/expand.sql",
            "ALTER TABLE visits ADD COLUMN agent text;",
        ),
        ("2.0/contract.sql", "ALTER TABLE visits DROP COLUMN legacy;"),
        // 3.0's expand renames a column the live 2.0 writes: not backward compatible.
        (
            "3.0/expand.sql",
            "ALTER TABLE visits RENAME COLUMN version TO app_version;",
        ),
        (
            "3.0/rollback.sql",
            "ALTER TABLE visits RENAME COLUMN app_version TO version;",
        ),
    ];
    for (path, sql) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("{sql}\n")).unwrap();
    }
    let script = dir.join("migrate.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nf=\"{}/$BLUEGREEN_VERSION/$1.sql\"\n[ -f \"$f\" ] || exit 0\nexec psql '{url}' -v ON_ERROR_STOP=1 -q -f \"$f\"\n",
            dir.display()
        ),
    )
    .unwrap();
    script.display().to_string()
}

/// The example app with two instances per color on the process provider (the tests'
/// usual config), each writing to PostgreSQL at `url`, and the migration hooks.
fn config(url: &str, migrate: &str) -> String {
    process_config()
        .replace(
            "--app-version {version}\"",
            &format!("--app-version {{version}} --database {url}\""),
        )
        .replace("scale_down_delay: 30s", "scale_down_delay: 2s")
        .replace(
            "health:",
            &format!(
                "hooks:\n  migrate_expand: \"sh {migrate} expand\"\n  migrate_contract: \"sh {migrate} contract\"\n  migrate_rollback: \"sh {migrate} rollback\"\nhealth:"
            ),
        )
}

async fn history(daemon: &Daemon) -> Vec<String> {
    let (_, history) = daemon.admin("GET", "/v1/history?limit=500", None).await;
    history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Where in `events` the first one containing `needle` is.
fn at(events: &[String], needle: &str) -> usize {
    events
        .iter()
        .position(|e| e.contains(needle))
        .unwrap_or_else(|| panic!("no event with {needle:?} in {events:#?}"))
}

fn columns(pg: &Postgres) -> String {
    pg.sql("SELECT string_agg(column_name, ',' ORDER BY column_name) FROM information_schema.columns WHERE table_name = 'visits'")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expand_before_deploy_guards_the_live_version_and_contract_waits_for_cleanup() {
    let pg = Postgres::start().await;
    pg.sql(SCHEMA);
    let scripts = tempfile::tempdir().unwrap();
    let migrate = migrations(scripts.path(), &pg.url);
    let daemon = Daemon::start(&config(&pg.url, &migrate)).await;
    let out = daemon.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let load = Load::start(daemon.url("/"), 2);

    // 2.0: the expand adds `agent`; 1.0, still live, passes its tests against it; then 2.0
    // deploys, writes `agent`, and takes the traffic. No request fails.
    let out = daemon.cli(&[
        "release",
        "--version",
        "2.0",
        "--env",
        "EXAMPLE_RECORD_AGENT=true",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let events = history(&daemon).await;
    assert!(
        at(&events, "migrate_expand hook passed") < at(&events, "deploying 2.0 to green"),
        "expand before the deploy: {events:#?}"
    );
    assert!(
        at(&events, "migrate_expand hook passed")
            < at(&events, "tests of blue: 2 passed, 0 failed"),
        "then the live 1.0's tests again: {events:#?}"
    );
    assert_eq!(
        pg.sql("SELECT count(*) > 0 FROM visits WHERE version = '1.0' AND agent IS NULL"),
        "t"
    );
    assert_eq!(
        pg.sql("SELECT count(*) > 0 FROM visits WHERE version = '2.0' AND agent IS NOT NULL"),
        "t"
    );
    // Blue stays warm for 2 s (a rollback could still need `legacy`): not contracted yet.
    assert!(columns(&pg).contains("legacy"), "{}", columns(&pg));
    let deadline = Instant::now() + Duration::from_secs(15);
    while columns(&pg).contains("legacy") {
        assert!(
            Instant::now() < deadline,
            "contract ran within 15 s: {:#?}",
            history(&daemon).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = history(&daemon).await;
    assert!(
        at(&events, "blue 1.0 stopped") < at(&events, "migrate_contract hook passed"),
        "contract after the old color stopped: {events:#?}"
    );
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);

    // 3.0: the expand renames a column the live 2.0 writes; 2.0's tests fail against it; the
    // release stops before 3.0 deploys, `migrate_rollback` renames it back, green serves on.
    let out = daemon.cli(&["release", "--version", "3.0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("the live green 2.0 fails its tests against the expanded schema"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("nothing was deployed"),
        "{}",
        text(&out)
    );
    let events = history(&daemon).await;
    assert!(
        events
            .iter()
            .any(|e| e.contains("migrate_rollback hook passed")),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.contains("deploying 3.0")),
        "{events:#?}"
    );
    assert!(columns(&pg).contains("version"), "{}", columns(&pg));
    let status: Value = daemon.status().await;
    assert_eq!(status["weights"]["green"], 100, "{status}");
    assert_eq!(
        status["environments"][0]["version"], "1.0",
        "blue untouched: {status}"
    );
    let (code, _, body) = support::get(&support::client(), &daemon.url("/"), &[])
        .await
        .unwrap();
    assert_eq!((code, body.trim()), (200, "green 2.0"));
}
