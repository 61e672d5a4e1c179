//! A fleet: three routers (real daemons) sharing one real etcd cluster of three members — a switch on one router applied and confirmed by all, an etcd member killed, a router cut off from etcd that keeps serving and catches up.

#[path = "support/etcd.rs"]
mod etcd;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcd::{EtcdCluster, Link};
use serde_json::Value;
use support::{Backend, Daemon, Load, client, config, get};

fn fleet_config(id: &str, blue: &Backend, green: &Backend, etcd: &[SocketAddr]) -> String {
    format!(
        "{}store:\n  etcd:\n    endpoints: {}\n    prefix: /bgtest/fleet-{}\n    confirm_timeout: 5s\n",
        config(&[blue], &[green], &format!("  id: {id}\n")),
        EtcdCluster::endpoints_yaml(etcd),
        std::process::id()
    )
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn answer(daemon: &Daemon) -> String {
    let (code, _, body) = get(&client(), &daemon.url("/"), &[]).await.unwrap();
    assert_eq!(code, 200, "{body}");
    body.trim().to_string()
}

/// Polls `check` every 50 ms until it holds; fails after `within` with `what`.
async fn eventually<F: AsyncFnMut() -> bool>(within: Duration, what: &str, mut check: F) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The routers `status` lists, by id: (applied, lag, stale).
fn routers(status: &Value) -> Vec<(String, i64, i64, bool)> {
    status["routers"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|r| {
                    (
                        r["id"].as_str().unwrap().to_string(),
                        r["applied"].as_i64().unwrap(),
                        r["lag"].as_i64().unwrap(),
                        r["stale"].as_bool().unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switch_is_applied_by_every_router_and_a_router_cut_off_serves_on_and_catches_up() {
    let mut cluster = EtcdCluster::start(3).await;
    // Router c reaches etcd through a link the test can cut.
    let link = Link::start(cluster.clients.clone()).await;
    let mut backends = Vec::new();
    for id in ["a", "b", "c"] {
        backends.push((
            Backend::start(&format!("blue-{id}")).await,
            Backend::start(&format!("green-{id}")).await,
        ));
    }
    let mut routers = Vec::new();
    for (id, (blue, green)) in ["a", "b", "c"].into_iter().zip(&backends) {
        let etcd = if id == "c" {
            vec![link.addr]
        } else {
            cluster.clients.clone()
        };
        routers.push(Daemon::start(&fleet_config(id, blue, green, &etcd)).await);
    }
    let (a, b, c) = (&routers[0], &routers[1], &routers[2]);
    eventually(
        Duration::from_secs(10),
        "all three routers report",
        async || routers_of(a).await.len() == 3,
    )
    .await;
    let loads: Vec<Load> = routers.iter().map(|r| Load::start(r.url("/"), 3)).collect();

    // A switch on a: every router applies it before the command returns.
    let out = a.cli(&["switch", "--to", "green"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for (router, id) in routers.iter().zip(["a", "b", "c"]) {
        assert_eq!(answer(router).await, format!("green-{id}"));
    }
    let listed = routers_of(b).await;
    let newest = listed.iter().map(|r| r.1).max().unwrap();
    assert!(
        listed.iter().all(|r| r.1 == newest && r.2 == 0 && !r.3),
        "every router applied the newest revision: {listed:?}"
    );
    let printed = text(&b.cli(&["status"]));
    assert!(
        printed.contains("ROUTER") && printed.contains("ok"),
        "{printed}"
    );

    // One etcd member killed: nothing changes.
    cluster.kill(2);
    let out = b.cli(&["switch", "--to", "blue"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for (router, id) in routers.iter().zip(["a", "b", "c"]) {
        assert_eq!(answer(router).await, format!("blue-{id}"));
    }

    // c cut off from etcd: the switch is recorded and applied by a and b; the command names c
    // (exit 8), and c serves on with the state it had.
    link.cut();
    let out = a.cli(&["switch", "--to", "green"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(
        text(&out).contains("not yet applied by c"),
        "{}",
        text(&out)
    );
    assert_eq!(answer(a).await, "green-a");
    assert_eq!(answer(b).await, "green-b");
    assert_eq!(
        answer(c).await,
        "blue-c",
        "cut off, c serves what it applied"
    );

    // Back in reach: c catches up and says so.
    link.restore();
    eventually(
        Duration::from_secs(15),
        "c applies the switch",
        async || answer(c).await == "green-c",
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "c reports itself caught up",
        async || {
            routers_of(a)
                .await
                .iter()
                .any(|r| r.0 == "c" && r.2 == 0 && !r.3)
        },
    )
    .await;

    for (load, id) in loads.into_iter().zip(["a", "b", "c"]) {
        let report = load.stop().await;
        assert!(
            report.failures.is_empty(),
            "router {id}: {:?}",
            report.failures
        );
    }
}

async fn routers_of(daemon: &Daemon) -> Vec<(String, i64, i64, bool)> {
    routers(&daemon.status().await)
}
