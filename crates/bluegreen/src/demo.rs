//! `bluegreen demo`: the whole story on one machine with nothing but this binary: under load, a good release, one the mirror stops before the switch, and one analysis rolls back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::client::AdminClient;
use crate::config::AdminEndpoint;
use crate::exit::{self, CliError, expect_ok};
use crate::follower::{follow, start};
use crate::timestamp::utc_time;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Requests per second the demo's clients send through the router.
    #[arg(long, default_value_t = 300)]
    pub rate: u32,
    /// Where to put the demo's config, state and logs (default: a new temporary folder).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the folder afterwards (the daemon and the app are stopped either way).
    #[arg(long)]
    pub keep: bool,
    /// Run the example app in containers through the Docker Engine (an image of this binary,
    /// built locally and removed afterwards) instead of as local processes.
    #[arg(long)]
    pub docker: bool,
}

/// The hard limit on the demo's load, whatever happens: it stops by itself.
const MAX_LOAD: Duration = Duration::from_secs(300);
const CLIENTS: u32 = 8;

/// Per second of load: answers from blue, from green, failures.
#[derive(Default, Clone, Copy)]
struct Second {
    blue: u64,
    green: u64,
    failed: u64,
}

struct Load {
    started: Instant,
    seconds: Mutex<BTreeMap<u64, Second>>,
    stop: AtomicBool,
}

impl Load {
    fn record(&self, color: Option<&str>) {
        let second = self.started.elapsed().as_secs();
        let mut seconds = self.seconds.lock().expect("lock");
        let entry = seconds.entry(second).or_default();
        match color {
            Some("blue") => entry.blue += 1,
            Some("green") => entry.green += 1,
            _ => entry.failed += 1,
        }
    }

    fn totals(&self, from: u64, to: u64) -> Second {
        let seconds = self.seconds.lock().expect("lock");
        seconds
            .range(from..to)
            .fold(Second::default(), |a, (_, s)| Second {
                blue: a.blue + s.blue,
                green: a.green + s.green,
                failed: a.failed + s.failed,
            })
    }
}

/// One client: a keep-alive connection, one request at a time, paced to its share of the rate,
/// asking for items 1 to 9 in turn (from `first_item`).
async fn load_client(router: SocketAddr, load: Arc<Load>, every: Duration, first_item: u32) {
    let deadline = load.started + MAX_LOAD;
    let mut connection = None;
    let mut next = Instant::now();
    let mut item = first_item;
    while !load.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        next += every;
        item = item % 9 + 1;
        if connection.is_none() {
            connection = connect(router).await;
        }
        let Some(sender) = connection.as_mut() else {
            load.record(None);
            tokio::time::sleep(every).await;
            continue;
        };
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("/api/items/{item}"))
            .header(header::HOST, "demo")
            .body(Empty::<Bytes>::new())
            .expect("valid request");
        let answer = async {
            let response = sender.send_request(request).await.ok()?;
            let color = response
                .headers()
                .get("x-color")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let ok = response.status().is_success();
            response.into_body().collect().await.ok()?;
            ok.then_some(color).flatten()
        };
        match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Some(color)) => load.record(Some(&color)),
            _ => {
                load.record(None);
                connection = None;
            }
        }
        tokio::time::sleep_until(next.into()).await;
    }
}

async fn connect(
    router: SocketAddr,
) -> Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(router).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(sender)
}

/// The `app` section: the example app as local processes of this binary, or as containers of
/// the demo's image.
fn app_section(binary: &Path, docker: bool) -> String {
    if docker {
        return format!(
            r#"app:
  provider: docker
  image: {}
  port: 8080
  command: "--listen 0.0.0.0:8080 --color {{color}} --app-version {{version}}"
  pull: never
  retain: 0
  # The example app runs as the container's PID 1 without a SIGTERM handler: the engine
  # would wait the whole grace before it kills it.
  stop_grace: 1s
  instances: 2
  ready_timeout: 20s
"#,
            crate::demo_image::REPOSITORY
        );
    }
    let program = shlex::try_quote(&binary.to_string_lossy())
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| binary.display().to_string());
    format!(
        r#"app:
  provider: process
  command: "{program} example-app --listen 127.0.0.1:{{port}} --color {{color}} --app-version {{version}}"
  instances: 2
  ready_timeout: 20s
"#
    )
}

fn config(app: &str, listen: SocketAddr) -> String {
    format!(
        r#"service: demo
router:
  listen: {listen}
  admin: admin.sock
  drain_timeout: 5s
{app}health: {{ path: /healthz, interval: 250ms, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 2 }}
dashboard: {{ listen: "127.0.0.1:0" }}
test:
  checks:
    - {{ path: /healthz, status: 200, max_latency: 1s }}
release:
  strategy: demo
  monitor_window: 4s
  scale_down_delay: 6s
strategies:
  demo: {{ type: canary, steps: [10, 50], wait: 3s }}
analysis:
  interval: 500ms
  min_requests: 40
  error_rate: {{ max_percent: 5, max_increase_percent: 2 }}
  latency_p99: {{ max_increase: 500ms }}
mirror:
  percent: 50
  duration: 3s
  compare:
    ignore_headers: [date, x-color, x-version]
    ignore_json_paths: [$.color, $.version]
"#
    )
}

pub async fn run(args: &DemoArgs) -> Result<(), CliError> {
    let fail = |m: String| CliError::new(exit::FAILURE, m);
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("bluegreen-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
    let binary =
        std::env::current_exe().map_err(|e| fail(format!("cannot find this binary: {e}")))?;
    let listen = crate::controller::provider::supervisor::free_port()
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .map_err(|e| fail(format!("no free port: {e}")))?;
    let engine = match args.docker {
        true => {
            let docker = crate::controller::provider::docker::connect_engine()
                .await
                .map_err(fail)?;
            say(&format!(
                "building the image {} (this binary and its shared libraries, FROM scratch) and tagging it {}",
                crate::demo_image::REPOSITORY,
                crate::demo_image::TAGS.join(", ")
            ));
            crate::demo_image::build(&docker, &binary)
                .await
                .map_err(fail)?;
            Some(docker)
        }
        false => None,
    };
    let config_path = dir.join("bluegreen.yaml");
    std::fs::write(
        &config_path,
        config(&app_section(&binary, args.docker), listen),
    )
    .map_err(|e| fail(format!("cannot write {}: {e}", config_path.display())))?;
    let log = std::fs::File::create(dir.join("daemon.log")).map_err(|e| fail(e.to_string()))?;
    say(&format!(
        "starting the daemon (router on {listen}; config, state and logs in {})",
        dir.display()
    ));
    let mut daemon = tokio::process::Command::new(&binary)
        .arg("up")
        .arg("--config")
        .arg(&config_path)
        .env("BLUEGREEN_LOG", "warn")
        .stdout(log.try_clone().map_err(|e| fail(e.to_string()))?)
        .stderr(log)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot start the daemon: {e}")))?;
    let client = AdminClient {
        endpoint: AdminEndpoint::Unix(dir.join("admin.sock")),
        token: None,
    };
    let outcome = story(&client, listen, args.rate, &dir).await;
    say("stopping the daemon and every app instance it started");
    if let Some(pid) = daemon
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(Duration::from_secs(15), daemon.wait())
        .await
        .is_err()
    {
        let _ = daemon.kill().await;
    }
    if let Some(docker) = &engine {
        say("removing the demo's containers and images");
        crate::demo_image::remove(docker, "demo").await;
    }
    if args.keep || outcome.is_err() {
        say(&format!(
            "kept {} (daemon.log, logs/, state.db)",
            dir.display()
        ));
    } else if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    outcome
}

fn say(text: &str) {
    println!("demo: {text}");
}

async fn call(
    client: &AdminClient,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, CliError> {
    expect_ok(client.call(method, path, body).await?)
}

/// Runs a release to its end, printing its events.
async fn release(
    client: &AdminClient,
    load: &Load,
    label: &'static str,
    body: Value,
) -> Result<Ran, CliError> {
    let from = load.started.elapsed().as_secs();
    let (id, after, _) = start(client, "/v1/releases", body).await?;
    let print_event = |event: &Value| {
        if event["kind"] != "stage" && event["kind"] != "instance" {
            println!(
                "  +{:>5.1}s  {}",
                load.started.elapsed().as_secs_f64(),
                event["message"].as_str().unwrap_or("")
            );
        }
    };
    let answer = follow(client, id, after, print_event, |_| {}).await?;
    Ok(Ran {
        label,
        record: answer["release"].clone(),
        from,
        to: load.started.elapsed().as_secs() + 1,
    })
}

async fn story(
    client: &AdminClient,
    router: SocketAddr,
    rate: u32,
    dir: &Path,
) -> Result<(), CliError> {
    wait_for_daemon(client).await?;
    let status = call(client, Method::GET, "/v1/status", None).await?;
    if let Some(url) = status["dashboard"].as_str()
        && let Ok(token) = std::fs::read_to_string(dir.join(".bluegreen/dashboard.token"))
    {
        say(&format!(
            "watch it in a browser: {url}#token={}",
            token.trim()
        ));
    }
    say("deploying 1.0 to blue (2 instances of the example app)");
    let deployed = call(
        client,
        Method::POST,
        "/v1/deploy",
        Some(json!({ "environment": "blue", "version": "1.0" })),
    )
    .await?;
    say(deployed["message"].as_str().unwrap_or("deployed"));

    let (load, clients) = start_load(router, rate);
    tokio::time::sleep(Duration::from_secs(3)).await;

    say(
        "release 2.0: deploy to green, test, mirror (half of blue's requests copied to green, answers compared), canary 10% → 50% → 100% with analysis, monitor, cleanup",
    );
    let good = release(client, &load, "2.0", json!({ "version": "2.0" })).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    say(
        "release 3.0, which prices every third item differently: the mirror must stop it before any traffic moves",
    );
    let drifting = release(
        client,
        &load,
        "3.0 (drifts)",
        json!({ "version": "3.0", "env": { "EXAMPLE_PRICE_DRIFT": "1" } }),
    )
    .await?;
    print_mirror_differences(client).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    say(
        "release 4.0, which answers 20% of requests with 500 from 6 s after it starts (past the mirror): analysis must roll it back",
    );
    let failing = release(
        client,
        &load,
        "4.0 (fails)",
        json!({ "version": "4.0", "env": { "EXAMPLE_ERROR_RATE": "0.2", "EXAMPLE_FAIL_AFTER_MS": "6000" } }),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }

    let end = load.started.elapsed().as_secs() + 1;
    let releases = [good, drifting, failing];
    print_requests_over_time(&load, end, &releases);
    print_outcomes(&load, end, &releases);
    print_traffic_changes(client).await?;
    judge(&load, &releases)
}

/// A release as the demo ran it: its label, its record at the end, and its span in seconds
/// since the load started.
struct Ran {
    label: &'static str,
    record: Value,
    from: u64,
    to: u64,
}

/// The first answers the mirrored color gave differently from the live one.
async fn print_mirror_differences(client: &AdminClient) -> Result<(), CliError> {
    let view = call(client, Method::GET, "/v1/mirror", None).await?;
    let differences = view["router"]["differences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    say("what the mirror saw (bluegreen diff --mirror):");
    for d in differences.iter().take(3) {
        println!(
            "          {}: {} {}, mirrored {} — {}: {} (×{})",
            d["request"].as_str().unwrap_or("?"),
            d["live_color"].as_str().unwrap_or("?"),
            d["live_status"],
            d["mirror_status"],
            d["what"].as_str().unwrap_or("?"),
            d["detail"].as_str().unwrap_or(""),
            d["times"]
        );
    }
    Ok(())
}

/// Waits up to 15s for the daemon's admin API to answer.
async fn wait_for_daemon(client: &AdminClient) -> Result<(), CliError> {
    let up = Instant::now();
    while client.call(Method::GET, "/v1/status", None).await.is_err() {
        if up.elapsed() > Duration::from_secs(15) {
            return Err(CliError::new(
                exit::FAILURE,
                "the daemon did not start within 15s; see daemon.log",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Starts the load clients, `rate` requests per second in all, until `load.stop` or
/// [`MAX_LOAD`].
fn start_load(router: SocketAddr, rate: u32) -> (Arc<Load>, Vec<tokio::task::JoinHandle<()>>) {
    let load = Arc::new(Load {
        started: Instant::now(),
        seconds: Mutex::new(BTreeMap::new()),
        stop: AtomicBool::new(false),
    });
    let every = Duration::from_secs_f64(CLIENTS as f64 / rate.clamp(10, 5000) as f64);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(load_client(router, Arc::clone(&load), every, n)))
        .collect();
    say(&format!(
        "{CLIENTS} clients send {rate} requests/s through the router (keep-alive connections)"
    ));
    (load, clients)
}

/// Two-second rows of answers per color, with a bar of their shares and the release then
/// running.
fn print_requests_over_time(load: &Load, end: u64, releases: &[Ran]) {
    println!();
    println!("requests per color over time (2-second rows)");
    println!(
        "{:>6} {:>7} {:>7} {:>7}  SHARE (b = blue, g = green)",
        "TIME", "BLUE", "GREEN", "FAILED"
    );
    let mut t = 0;
    while t < end {
        let s = load.totals(t, t + 2);
        let mark = releases
            .iter()
            .find(|r| t < r.to && t + 2 > r.from)
            .map_or(String::new(), |r| format!("release {}", r.label));
        let total = (s.blue + s.green).max(1);
        let bar = format!(
            "{}{}",
            "b".repeat((s.blue * 30 / total) as usize),
            "g".repeat((s.green * 30 / total) as usize)
        );
        println!(
            "{:>5}s {:>7} {:>7} {:>7}  {bar:<30} {mark}",
            t, s.blue, s.green, s.failed
        );
        t += 2;
    }
}

/// How each release ended and what the clients saw during it.
fn print_outcomes(load: &Load, end: u64, releases: &[Ran]) {
    println!();
    let all = load.totals(0, end);
    println!("{:<34} {}", "requests", all.blue + all.green + all.failed);
    for ran in releases {
        let r = &ran.record;
        println!(
            "{:<34} {} ({})",
            format!("release {}", ran.label),
            r["state"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("")
        );
        if !r["mirror"].is_null() {
            println!(
                "{:<34} {}",
                "  its mirror",
                crate::cli::progress::mirror_text(&r["mirror"])
            );
        }
        println!(
            "{:<34} {}",
            "  failed requests during it",
            load.totals(ran.from, ran.to).failed
        );
        if r["state"] != "succeeded" {
            println!(
                "{:<34} {:.1}s",
                "  from its start to its end",
                (r["ended_ms"].as_i64().unwrap_or(0) - r["started_ms"].as_i64().unwrap_or(0))
                    as f64
                    / 1000.0
            );
        }
    }
}

/// The switches, weight changes and rollbacks among the newest 200 events, oldest first.
async fn print_traffic_changes(client: &AdminClient) -> Result<(), CliError> {
    let history = call(client, Method::GET, "/v1/history?limit=200", None).await?;
    let switches: Vec<String> = history["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| matches!(e["kind"].as_str(), Some("weights" | "switch" | "rollback")))
        .map(|e| {
            format!(
                "{} {}",
                utc_time(e["at_ms"].as_i64().unwrap_or(0)),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    println!("traffic changes:");
    for line in switches {
        println!("  {line}");
    }
    Ok(())
}

/// The demo succeeds when 2.0 went out without a failed request, the mirror stopped 3.0
/// before any traffic moved (so no client saw it), and analysis rolled 4.0 back.
fn judge(load: &Load, releases: &[Ran; 3]) -> Result<(), CliError> {
    let [good, drifting, failing] = releases;
    let failed_during = |ran: &Ran| load.totals(ran.from, ran.to).failed;
    let good_ok = good.record["state"] == "succeeded" && failed_during(good) == 0;
    let drifting_ok = drifting.record["state"] == "failed"
        && drifting.record["traffic_moved"] == false
        && failed_during(drifting) == 0;
    let failing_ok = failing.record["state"] == "rolled_back";
    if good_ok && drifting_ok && failing_ok {
        say(
            "done: 2.0 released with 0 failed requests; 3.0 stopped by the mirror before any client saw it; 4.0 rolled back automatically",
        );
        Ok(())
    } else {
        Err(CliError::new(
            exit::FAILURE,
            format!(
                "the demo did not go as expected: release 2.0 {} with {} failed requests, release 3.0 {} (traffic moved: {}), release 4.0 {}",
                good.record["state"],
                failed_during(good),
                drifting.record["state"],
                drifting.record["traffic_moved"],
                failing.record["state"]
            ),
        ))
    }
}
