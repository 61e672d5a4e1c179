//! A fleet: three routers (real daemons) sharing one real etcd cluster of three members — a switch applied and confirmed by all, an etcd member killed, a router cut off from etcd that serves on and catches up, the leader killed mid-release, one bad host named by analysis, and hosts in network namespaces.

#[path = "support/etcd.rs"]
mod etcd;
#[path = "support/netns.rs"]
mod netns;
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use etcd::{EtcdCluster, Link};
use netns::Hosts;
use serde_json::Value;
use support::{BIN, Backend, Daemon, Load, client, config, get};

fn fleet_config(id: &str, blue: &Backend, green: &Backend, etcd: &[SocketAddr]) -> String {
    format!(
        "{}store:\n  etcd:\n    endpoints: {}\n    prefix: /bgtest/fleet-{}\n    confirm_timeout: 5s\n{RELEASE}",
        config(&[blue], &[green], &format!("  id: {id}\n")),
        EtcdCluster::endpoints_yaml(etcd),
        std::process::id()
    )
}

/// A release that holds each canary step long enough to kill its driver mid-shift, and
/// analysis that judges within it.
const RELEASE: &str = "release:\n  strategy: slow\n  monitor_window: 1s\nstrategies:\n  slow: { type: canary, steps: [20, 50], wait: 3s }\n\
    analysis:\n  interval: 300ms\n  min_requests: 20\n  error_rate: { max_percent: 5 }\n";

/// The fleet's routers: `ids[i]` reaches etcd at `etcd(i)`, with a blue and a green backend
/// of its own (answering `blue-<id>`, `green-<id>`). Started one after another (the first
/// leads), and listed by every router before this returns.
async fn start_fleet(
    ids: &[&str],
    etcd: impl Fn(usize) -> Vec<SocketAddr>,
) -> (Vec<Daemon>, Vec<(Backend, Backend)>) {
    let mut backends = Vec::new();
    for id in ids {
        backends.push((
            Backend::start(&format!("blue-{id}")).await,
            Backend::start(&format!("green-{id}")).await,
        ));
    }
    let mut routers = Vec::new();
    for (i, (id, (blue, green))) in ids.iter().zip(&backends).enumerate() {
        routers.push(Daemon::start(&fleet_config(id, blue, green, &etcd(i))).await);
    }
    for router in &routers {
        eventually(
            Duration::from_secs(10),
            "every router lists the fleet",
            async || routers_of(router).await.len() == ids.len(),
        )
        .await;
    }
    (routers, backends)
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
    let (routers, _backends) = start_fleet(&["a", "b", "c"], |i| {
        if i == 2 {
            vec![link.addr]
        } else {
            cluster.clients.clone()
        }
    })
    .await;
    let (a, b, c) = (&routers[0], &routers[1], &routers[2]);
    eventually(Duration::from_secs(10), "a leads the fleet", async || {
        b.status().await["leader"] == "a"
    })
    .await;
    let loads: Vec<Load> = routers.iter().map(|r| Load::start(r.url("/"), 3)).collect();

    // A switch on a: every router applies it before the command returns.
    let out = a.cli(&["switch", "--to", "green"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for (router, id) in routers.iter().zip(["a", "b", "c"]) {
        assert_eq!(answer(router).await, format!("green-{id}"));
    }
    // Each router's report follows within a moment (a's own comes at its next report).
    eventually(
        Duration::from_secs(3),
        "every router reports the newest revision",
        async || {
            let listed = routers_of(b).await;
            let newest = listed.iter().map(|r| r.1).max().unwrap();
            listed.iter().all(|r| r.1 == newest && r.2 == 0 && !r.3)
        },
    )
    .await;
    let printed = text(&b.cli(&["status"]));
    assert!(
        printed.contains("ROUTER") && printed.contains("ok"),
        "{printed}"
    );

    // Changes go to the leader: another router refuses them, naming it.
    let out = b.cli(&["switch", "--to", "blue"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(
        text(&out).contains("router b does not lead the fleet; send changes to router a"),
        "{}",
        text(&out)
    );

    // One etcd member killed: nothing changes — b's live event stream (its dashboard's)
    // still carries the events the leader records.
    let b_events = live_events(b, "switched: blue is live").await;
    cluster.kill(2);
    let out = a.cli(&["switch", "--to", "blue"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let seen = b_events.await.unwrap();
    assert!(
        seen.contains("switched: blue is live"),
        "b's live stream:\n{seen}\nb's log:\n{}",
        b.log()
    );
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
    // Its leased report lapses: the leader lists it as lost, with its last report.
    eventually(Duration::from_secs(10), "c listed as lost", async || {
        let status = a.status().await;
        status["routers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == "c" && r["lost"] == true && r["lag"].as_i64() > Some(0))
    })
    .await;
    let printed = text(&a.cli(&["status"]));
    assert!(printed.contains("lost: its report is gone"), "{printed}");

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

    no_failed_requests(loads, &["a", "b", "c"]).await;
}

/// The leader killed in the middle of a canary: another router takes the lead within the
/// lease's TTL and settles the release by the restart rule (traffic had moved: rolled back),
/// on every router; the routers still up fail no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_mid_release_is_replaced_and_the_release_rolled_back_everywhere() {
    let cluster = EtcdCluster::start(3).await;
    let (mut routers, _backends) = start_fleet(&["a", "b", "c"], |_| cluster.clients.clone()).await;
    eventually(Duration::from_secs(10), "a leads the fleet", async || {
        routers[1].status().await["leader"] == "a"
    })
    .await;
    let loads: Vec<Load> = routers[1..]
        .iter()
        .map(|r| Load::start(r.url("/"), 3))
        .collect();
    let out = routers[0].cli(&["release", "--version", "2.0", "--detach"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    eventually(
        Duration::from_secs(15),
        "the canary reaches b and c",
        async || {
            routers[1].status().await["weights"]["green"] == 20
                && routers[2].status().await["weights"]["green"] == 20
        },
    )
    .await;
    // Every router shows the release the leader drives.
    let shown = routers[2].status().await;
    assert_eq!(shown["release"]["version"], "2.0", "{shown}");
    assert_eq!(shown["release"]["state"], "shifting", "{shown}");

    let killed = Instant::now();
    let _dir = routers.remove(0).into_dir(); // SIGKILL, mid-canary
    let (b, c) = (&routers[0], &routers[1]);
    eventually(
        Duration::from_secs(15),
        "another router leads",
        async || matches!(b.status().await["leader"].as_str(), Some("b" | "c")),
    )
    .await;
    let took_over = killed.elapsed();
    println!("another router led {took_over:?} after the leader was killed");
    eventually(
        Duration::from_secs(15),
        "the release is rolled back",
        async || {
            let status = b.status().await;
            status["weights"]["green"] == 0 && c.status().await["weights"]["green"] == 0
        },
    )
    .await;
    assert!(
        b.status().await["release"].is_null(),
        "settled: no release in progress"
    );
    let releases = b.cli(&["releases", "--output", "json"]);
    let listed: Value = serde_json::from_slice(&releases.stdout).unwrap();
    assert_eq!(listed["releases"][0]["state"], "rolled_back", "{listed}");
    assert!(
        took_over < Duration::from_secs(12),
        "taken over within the lease's TTL (5 s) and a little: {took_over:?}"
    );
    assert_eq!(answer(b).await, "blue-b");
    assert_eq!(answer(c).await, "blue-c");
    no_failed_requests(loads, &["b", "c"]).await;
}

/// One host's new color fails: the leader judges every router's counters, summed and alone,
/// rolls the release back on every router, and the reason names the bad router.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn analysis_judges_the_fleet_and_names_the_one_bad_router() {
    let cluster = EtcdCluster::start(1).await;
    let (routers, backends) = start_fleet(&["a", "b", "c"], |_| cluster.clients.clone()).await;
    backends[2].1.set_failing(true); // c's green
    let loads: Vec<Load> = routers.iter().map(|r| Load::start(r.url("/"), 3)).collect();
    let out = routers[0].cli(&["release", "--version", "2.0"]);
    assert_eq!(out.status.code(), Some(6), "rolled back: {}", text(&out));
    println!("{}", text(&out));
    assert!(
        text(&out).contains("router c"),
        "the bad router named: {}",
        text(&out)
    );
    for (router, id) in routers.iter().zip(["a", "b", "c"]) {
        eventually(
            Duration::from_secs(10),
            "all traffic back on blue",
            async || router.status().await["weights"]["blue"] == 100,
        )
        .await;
        assert_eq!(answer(router).await, format!("blue-{id}"));
    }
    for load in loads {
        load.stop().await;
    }
}

/// Three hosts in network namespaces — each with its own address, its own app instances on
/// its own loopback and its own router — and a three-member etcd cluster on the bridge. Under
/// load from outside on every host: a switch confirmed by all; one host cut off from etcd by
/// the network (its packets to etcd dropped): it keeps serving, the switch names it, and it
/// catches up once the network is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosts_with_their_own_addresses_follow_one_state_and_a_cut_off_host_catches_up() {
    let mut hosts = Hosts::create(3);
    let cluster = EtcdCluster::start_on(hosts.service, 3).await;
    for i in 0..3 {
        for (color, port) in [("blue", "9001"), ("green", "9002")] {
            let listen = format!("127.0.0.1:{port}");
            let version = format!("h{i}");
            let args = [
                "example-app",
                "--listen",
                &listen,
                "--color",
                color,
                "--app-version",
                &version,
            ];
            hosts.spawn(i, BIN, &args);
        }
    }
    let mut routers = Vec::new();
    for i in 0..3 {
        let config = format!(
            "service: web\nrouter:\n  id: h{i}\n  listen: {}:8080\n  admin: .bluegreen/admin.sock\n  drain_timeout: 2s\n\
             environments:\n  blue: {{ upstreams: [\"127.0.0.1:9001\"] }}\n  green: {{ upstreams: [\"127.0.0.1:9002\"] }}\n\
             health: {{ path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2 }}\n\
             dashboard: {{ enabled: false }}\n\
             store:\n  etcd:\n    endpoints: {}\n    prefix: /bgtest/netns-{}\n    confirm_timeout: 5s\n",
            hosts.addresses[i],
            EtcdCluster::endpoints_yaml(&cluster.clients),
            std::process::id()
        );
        routers.push(Daemon::start_wrapped(&hosts.on(i), &config).await);
    }
    for (i, router) in routers.iter().enumerate() {
        eventually(
            Duration::from_secs(15),
            "every host lists the fleet and serves",
            async || {
                routers_of(router).await.len() == 3
                    && get(&client(), &router.url("/"), &[])
                        .await
                        .is_ok_and(|(code, ..)| code == 200)
            },
        )
        .await;
        assert_eq!(
            answer(router).await,
            format!("blue h{i}"),
            "its own instances"
        );
        assert!(router.url("/").contains(&hosts.addresses[i].to_string()));
    }
    let loads: Vec<Load> = routers.iter().map(|r| Load::start(r.url("/"), 2)).collect();

    let out = routers[0].cli(&["switch", "--to", "green"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for (i, router) in routers.iter().enumerate() {
        assert_eq!(answer(router).await, format!("green h{i}"));
    }

    // h2's packets to etcd vanish: it serves on with what it applied; the switch names it.
    hosts.cut_from_service(2, true);
    let out = routers[0].cli(&["switch", "--to", "blue"]);
    assert_eq!(out.status.code(), Some(8), "{}", text(&out));
    assert!(
        text(&out).contains("not yet applied by h2"),
        "{}",
        text(&out)
    );
    assert_eq!(answer(&routers[1]).await, "blue h1");
    assert_eq!(
        answer(&routers[2]).await,
        "green h2",
        "cut off, h2 serves what it applied"
    );

    hosts.cut_from_service(2, false);
    let restored = Instant::now();
    while answer(&routers[2]).await != "blue h2" {
        assert!(
            restored.elapsed() < Duration::from_secs(45),
            "h2 applies the switch within 45 s; its log:\n{}",
            routers[2].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "h2 caught up {:?} after the network came back",
        restored.elapsed()
    );
    eventually(
        Duration::from_secs(15),
        "h2 reports itself caught up",
        async || {
            routers_of(&routers[0])
                .await
                .iter()
                .any(|r| r.0 == "h2" && r.2 == 0 && !r.3)
        },
    )
    .await;
    no_failed_requests(loads, &["h0", "h1", "h2"]).await;
    drop(routers);
    drop(cluster);
    drop(hosts);
}

/// Three hosts in network namespaces, each deploying its own instances with the process
/// provider: a release deploys to one host at a time (`deploy.batch: 1`), tests each host's
/// new color through that host's router, then shifts every router together — 0 failed
/// requests; then a version that cannot become healthy on one host fails the deploy naming
/// that host, the hosts that deployed it are stopped, and traffic never moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_host_deploys_its_own_instances_in_batches_and_one_bad_host_stops_the_release() {
    let hosts = Hosts::create(3);
    let cluster = EtcdCluster::start_on(hosts.service, 3).await;
    let mut routers = Vec::new();
    for i in 0..3 {
        // Host h2 cannot run 3.0 (its health check fails there, and only there); host h1
        // answers with the wrong version under 2.5 (its tests fail there).
        let command = format!(
            "sh -c 'v={{version}}; case $v-h{i} in 3.0-h2) export EXAMPLE_UNHEALTHY=true;; 2.5-h1) v=wrong;; esac; \
             exec {BIN} example-app --listen 127.0.0.1:{{port}} --color {{color}} --app-version $v-h{i}'"
        );
        let config = format!(
            "service: web\nrouter:\n  id: h{i}\n  listen: {}:8080\n  admin: .bluegreen/admin.sock\n  drain_timeout: 2s\n\
             app:\n  command: \"{}\"\n  instances: 2\n  ready_timeout: 5s\n  stop_timeout: 2s\n\
             health: {{ path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2 }}\n\
             test:\n  checks:\n    - {{ path: /, status: 200, body_contains: \"{{version}}-h{i}\" }}\n\
             release:\n  strategy: quick\n  monitor_window: 1s\n  scale_down_delay: 0s\n\
             strategies:\n  quick: {{ type: canary, steps: [50], wait: 1s }}\n\
             deploy: {{ batch: 1 }}\n\
             dashboard: {{ enabled: false }}\n\
             store:\n  etcd:\n    endpoints: {}\n    prefix: /bgtest/hosts-{}\n    confirm_timeout: 5s\n",
            hosts.addresses[i],
            command.replace('"', "\\\""),
            EtcdCluster::endpoints_yaml(&cluster.clients),
            std::process::id()
        );
        routers.push(Daemon::start_wrapped(&hosts.on(i), &config).await);
    }
    for router in &routers {
        eventually(
            Duration::from_secs(15),
            "every host lists the fleet",
            async || routers_of(router).await.len() == 3,
        )
        .await;
    }
    // Nothing runs yet: the first deploy brings blue up on every host, one after another.
    let out = routers[0].cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("on 3 host(s), 1 at a time"),
        "{}",
        text(&out)
    );
    for (i, router) in routers.iter().enumerate() {
        eventually(
            Duration::from_secs(5),
            "each host serves its own blue",
            async || {
                get(&client(), &router.url("/"), &[])
                    .await
                    .is_ok_and(|(code, _, body)| {
                        code == 200 && body.trim() == format!("blue 1.0-h{i}")
                    })
            },
        )
        .await;
    }
    let loads: Vec<Load> = routers.iter().map(|r| Load::start(r.url("/"), 2)).collect();

    let out = routers[0].cli(&["release", "--version", "2.0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    println!("{}", text(&out));
    for (i, router) in routers.iter().enumerate() {
        assert_eq!(answer(router).await, format!("green 2.0-h{i}"));
    }
    println!("{}", text(&routers[1].cli(&["status"])));
    let status = routers[1].status().await;
    let green: Vec<&Value> = status["hosts"]
        .as_array()
        .expect("status lists the hosts")
        .iter()
        .filter(|h| h["record"]["color"] == "green")
        .collect();
    assert_eq!(green.len(), 3, "{status}");
    for host in &green {
        assert_eq!(host["record"]["version"], "2.0", "{host}");
        assert_eq!(host["record"]["status"], "running", "{host}");
        assert_eq!(
            host["test_failures"],
            serde_json::json!([]),
            "tested there: {host}"
        );
        let upstreams = host["record"]["upstreams"].as_array().unwrap();
        assert_eq!(upstreams.len(), 2, "its own two instances: {host}");
        assert!(
            upstreams
                .iter()
                .all(|u| u.as_str().unwrap().starts_with("127.0.0.1:"))
        );
    }
    // One host at a time, in order, each tested through its own router.
    let (_, events) = routers[0].admin("GET", "/v1/history?limit=200", None).await;
    let events = events.to_string();
    let batches: Vec<usize> = [
        "runs on h0 (batch 1 of 3",
        "runs on h1 (batch 2 of 3",
        "runs on h2 (batch 3 of 3",
    ]
    .iter()
    .map(|needle| {
        events
            .find(needle)
            .unwrap_or_else(|| panic!("{needle} in {events}"))
    })
    .collect();
    assert!(batches.windows(2).all(|w| w[0] < w[1]), "{events}");
    assert!(
        events.contains("passed on 3 host(s), each through its own router"),
        "{events}"
    );
    // The old color was cleaned up on every host (scale_down_delay: 0s).
    eventually(
        Duration::from_secs(10),
        "blue stopped on every host",
        async || {
            let status = routers[2].status().await;
            status["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|h| h["record"]["color"] == "blue" && h["record"]["status"] == "stopped")
                .count()
                == 3
        },
    )
    .await;

    // 3.0 cannot become healthy on h2: the deploy fails there, naming it; h0 and h1 had
    // deployed it and are stopped again; traffic never moved.
    let out = routers[0].cli(&["release", "--version", "3.0"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("host h2: "), "{}", text(&out));
    println!("{}", text(&out));
    let status = routers[0].status().await;
    for host in status["hosts"].as_array().unwrap() {
        if host["record"]["color"] == "blue" {
            assert_eq!(host["record"]["status"], "stopped", "{status}");
        }
    }
    for (i, router) in routers.iter().enumerate() {
        assert_eq!(answer(router).await, format!("green 2.0-h{i}"));
    }

    // 2.5 answers wrongly on h1: its tests, through h1's router, fail; h2 is never deployed
    // (no batch after a failed one); traffic never moved.
    let out = routers[0].cli(&["release", "--version", "2.5"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("tests of blue failed"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("host h1: "), "{}", text(&out));
    let status = routers[0].status().await;
    let blue = |host: &str| -> (Value, Value) {
        let host = status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == host && h["record"]["color"] == "blue")
            .unwrap();
        (
            host["record"]["version"].clone(),
            host["record"]["status"].clone(),
        )
    };
    assert_eq!(blue("h0"), ("2.5".into(), "running".into()), "{status}");
    assert_eq!(
        blue("h1"),
        ("2.5".into(), "running".into()),
        "kept for inspection: {status}"
    );
    assert_ne!(blue("h2").0, "2.5", "{status}");
    for (i, router) in routers.iter().enumerate() {
        assert_eq!(answer(router).await, format!("green 2.0-h{i}"));
    }
    no_failed_requests(loads, &["h0", "h1", "h2"]).await;

    // h1's daemon killed and started again: it adopts the instances its record names (the
    // same ports, not a new deploy) and serves green again.
    let before = routers[1].status().await;
    let adopted = |status: &Value| -> Vec<Value> {
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["host"] == "h1" && h["record"]["color"] == "green")
            .map(|h| h["record"]["upstreams"].clone())
            .collect()
    };
    let config = std::fs::read_to_string(routers[1].dir.path().join("bluegreen.yaml")).unwrap();
    let mut killed = routers.remove(1);
    killed.signal_and_wait("KILL");
    let restarted = Daemon::start_wrapped_in(killed.into_dir(), &hosts.on(1), &config).await;
    eventually(
        Duration::from_secs(15),
        "h1 serves green again",
        async || {
            get(&client(), &restarted.url("/"), &[])
                .await
                .is_ok_and(|(code, _, body)| code == 200 && body.trim() == "green 2.0-h1")
        },
    )
    .await;
    assert_eq!(adopted(&restarted.status().await), adopted(&before));
    drop(restarted);
    drop(routers);
    drop(cluster);
    drop(hosts);
}

/// Reads `router`'s server-sent events (its dashboard's `/api/stream`) in the background
/// until one contains `needle`; what was read, or after 20 s what was read so far.
async fn live_events(router: &Daemon, needle: &str) -> tokio::task::JoinHandle<String> {
    use http_body_util::BodyExt;
    let url = format!(
        "{}api/stream",
        router.status().await["dashboard"].as_str().unwrap()
    );
    let request = http::Request::get(&url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let mut body = client().request(request).await.unwrap().into_body();
    let needle = needle.to_string();
    tokio::spawn(async move {
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
            if text.contains(&needle) {
                break;
            }
        }
        text
    })
}

/// Stops each router's load; none may have failed a request.
async fn no_failed_requests(loads: Vec<Load>, routers: &[&str]) {
    for (load, id) in loads.into_iter().zip(routers) {
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
