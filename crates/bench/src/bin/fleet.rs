//! bluegreen-fleet-bench: how fast a switch reaches every router of a fleet on one etcd cluster (3 and 50 routers on this machine), beside etcd's own watch fan-out as the floor.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Parser, Debug)]
#[command(
    name = "bluegreen-fleet-bench",
    about = "Switch propagation across a fleet of bluegreen routers on etcd (run it through bench/fleet)"
)]
struct Args {
    /// Fewer switches.
    #[arg(long)]
    quick: bool,
    /// Folder with the release binary `bluegreen`.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Fleet sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "3,50")]
    routers: Vec<usize>,
    /// Where to write the report.
    #[arg(long, default_value = "docs/fleet-benchmark.md")]
    out: PathBuf,
}

/// How often each router is asked which color answers, while a switch propagates.
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
/// The pause between switches.
const GAP: Duration = Duration::from_millis(300);
/// A switch not seen everywhere by then is a failure of the run.
const SWITCH_DEADLINE: Duration = Duration::from_secs(15);

type Http = HttpClient<HttpConnector, Full<Bytes>>;

fn progress(message: &str) {
    eprintln!("fleet-bench: {message}");
    let _ = std::io::stderr().flush();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let work = std::env::temp_dir().join(format!("bluegreen-fleet-bench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("fleet-bench: {}: {e}", work.display());
        return ExitCode::FAILURE;
    }
    let outcome = run(&args, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    match outcome {
        Ok(report) => {
            println!("{report}");
            if let Err(e) = std::fs::write(&args.out, report) {
                eprintln!("fleet-bench: {}: {e}", args.out.display());
                return ExitCode::FAILURE;
            }
            progress(&format!("report written to {}", args.out.display()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Processes this run started; each is stopped (SIGTERM, then SIGKILL) when dropped.
struct Started(Vec<Child>);

impl Drop for Started {
    fn drop(&mut self) {
        for child in &self.0 {
            let _ = Command::new("kill")
                .arg(child.id().to_string())
                .stderr(Stdio::null())
                .status();
        }
        for child in &mut self.0 {
            for _ in 0..100 {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16, String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port())
}

/// A three-member etcd cluster on loopback (Debian's etcd-server).
fn start_etcd(work: &Path, started: &mut Started) -> Result<Vec<SocketAddr>, String> {
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<_, String>>()?;
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    for (i, (client, peer)) in ports.iter().enumerate() {
        let log =
            std::fs::File::create(work.join(format!("etcd-{i}.log"))).map_err(|e| e.to_string())?;
        let child = Command::new("etcd")
            .args(["--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(work.join(format!("etcd-{i}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("etcd (Debian's etcd-server): {e}"))?;
        started.0.push(child);
    }
    Ok(ports
        .iter()
        .map(|(client, _)| SocketAddr::from(([127, 0, 0, 1], *client)))
        .collect())
}

async fn connect(members: &[SocketAddr]) -> Result<Client, String> {
    let endpoints: Vec<String> = members.iter().map(|a| format!("http://{a}")).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut client) = Client::connect(&endpoints, None).await
            && client.put("/bench/ready", "1", None).await.is_ok()
        {
            return Ok(client);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "etcd at {endpoints:?} did not form a cluster in 30 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sum of etcd's gRPC requests started, over every member.
async fn etcd_requests(http: &Http, members: &[SocketAddr]) -> Result<f64, String> {
    let mut total = 0.0;
    for member in members {
        let (_, text) = get(http, &format!("http://{member}/metrics"), None).await?;
        total += text
            .lines()
            .filter(|l| l.starts_with("grpc_server_started_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    Ok(total)
}

async fn get(http: &Http, url: &str, token: Option<&str>) -> Result<(u16, String), String> {
    send(http, http::Method::GET, url, token, None).await
}

async fn send(
    http: &Http,
    method: http::Method,
    url: &str,
    token: Option<&str>,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let mut request = http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let response = http
        .request(request)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// One router of the fleet under measurement.
struct Router {
    id: String,
    url: String,
}

const TOKEN: &str = "fleet-bench-token-0123456789abcdef";

/// Starts `count` routers on one prefix, the first alone until it leads.
async fn start_fleet(
    args: &Args,
    work: &Path,
    members: &[SocketAddr],
    backends: [SocketAddr; 2],
    count: usize,
    started: &mut Started,
    etcd: &mut Client,
) -> Result<(Vec<Router>, String), String> {
    let prefix = format!("/bench/fleet-{count}");
    let endpoints: Vec<String> = members.iter().map(|a| format!("\"http://{a}\"")).collect();
    let mut routers = Vec::new();
    let mut admin = String::new();
    for i in 0..count {
        let dir = work.join(format!("fleet-{count}-r{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("token"), TOKEN).map_err(|e| e.to_string())?;
        let (listen, admin_port) = (free_port()?, free_port()?);
        let config = format!(
            "service: bench\nrouter:\n  id: r{i}\n  listen: 127.0.0.1:{listen}\n  admin: 127.0.0.1:{admin_port}\n  admin_token_file: token\n  drain_timeout: 1s\n\
             environments:\n  blue: {{ upstreams: [\"{}\"] }}\n  green: {{ upstreams: [\"{}\"] }}\n\
             health: {{ path: /healthz, interval: 500ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 3 }}\n\
             dashboard: {{ enabled: false }}\n\
             store:\n  etcd:\n    endpoints: [{}]\n    prefix: {prefix}\n    confirm_timeout: 10s\n",
            backends[0],
            backends[1],
            endpoints.join(", ")
        );
        std::fs::write(dir.join("bluegreen.yaml"), config).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("daemon.log")).map_err(|e| e.to_string())?;
        let child = Command::new(args.bin_dir.join("bluegreen"))
            .arg("--config")
            .arg(dir.join("bluegreen.yaml"))
            .arg("up")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("bluegreen: {e}"))?;
        started.0.push(child);
        if i == 0 {
            admin = format!("http://127.0.0.1:{admin_port}");
            wait_for(
                etcd,
                &format!("{prefix}/routers/"),
                1,
                Duration::from_secs(30),
            )
            .await?;
        }
        routers.push(Router {
            id: format!("r{i}"),
            url: format!("http://127.0.0.1:{listen}/"),
        });
    }
    let all = wait_for(
        etcd,
        &format!("{prefix}/routers/"),
        count,
        Duration::from_secs(90),
    )
    .await;
    if let Err(e) = all {
        // Say which routers never reported, and what their logs end with.
        let reported = etcd
            .get(
                format!("{prefix}/routers/"),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .map_err(|e| e.to_string())?;
        let keys: Vec<String> = reported
            .kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect();
        let mut missing = String::new();
        for i in 0..count {
            if !keys.iter().any(|k| k.ends_with(&format!("/r{i}"))) {
                let log =
                    std::fs::read_to_string(work.join(format!("fleet-{count}-r{i}/daemon.log")))
                        .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                missing.push_str(&format!("\nr{i}: {}", tail.join("\n    ")));
            }
        }
        return Err(format!("{e}; missing:{missing}"));
    }
    Ok((routers, admin))
}

/// Waits until `count` keys exist under `prefix`.
async fn wait_for(
    etcd: &mut Client,
    prefix: &str,
    count: usize,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let found = etcd
            .get(
                prefix,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(|e| e.to_string())?
            .count() as usize;
        if found >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {found} of {count} routers reported under {prefix} in {within:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One switch's figures, in milliseconds from the command sent.
struct Switch {
    /// The switch call returned: bluegreen's own confirmation that every router applied it.
    confirmed: f64,
    /// The last router's report of the new split arrived.
    reported: f64,
    /// The last router answered a request with the new color.
    answered: f64,
}

async fn measure_switches(
    http: &Http,
    etcd: &Client,
    routers: &[Router],
    admin: &str,
    prefix: &str,
    switches: usize,
) -> Result<Vec<Switch>, String> {
    let mut measured = Vec::new();
    for k in 0..switches {
        let target = if k % 2 == 0 { "green" } else { "blue" };
        let body_prefix = target.to_string();
        // Reports: the first one of each router that shows the new split.
        let mut client = etcd.clone();
        let mut reports = client
            .watch(
                format!("{prefix}/routers/"),
                Some(WatchOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let reported = {
            let expected = routers.len();
            let target = target.to_string();
            tokio::spawn(async move {
                let mut seen: BTreeMap<String, f64> = BTreeMap::new();
                while seen.len() < expected && started.elapsed() < SWITCH_DEADLINE {
                    let Ok(Some(answer)) = reports.message().await else {
                        break;
                    };
                    for event in answer.events() {
                        let (EventType::Put, Some(kv)) = (event.event_type(), event.kv()) else {
                            continue;
                        };
                        let Ok(report) = serde_json::from_slice::<serde_json::Value>(kv.value())
                        else {
                            continue;
                        };
                        let weight = report["weights"][&target].as_u64().unwrap_or(0);
                        let id = report["id"].as_str().unwrap_or("?").to_string();
                        if weight == 100 {
                            seen.entry(id)
                                .or_insert(started.elapsed().as_secs_f64() * 1000.0);
                        }
                    }
                }
                seen
            })
        };
        let probes: Vec<_> = routers
            .iter()
            .map(|router| {
                let (http, url, body_prefix) =
                    (http.clone(), router.url.clone(), body_prefix.clone());
                tokio::spawn(async move {
                    while started.elapsed() < SWITCH_DEADLINE {
                        if let Ok((200, body)) = get(&http, &url, None).await
                            && body.starts_with(&body_prefix)
                        {
                            return Some(started.elapsed().as_secs_f64() * 1000.0);
                        }
                        tokio::time::sleep(PROBE_INTERVAL).await;
                    }
                    None
                })
            })
            .collect();
        let (status, answer) = send(
            http,
            http::Method::POST,
            &format!("{admin}/v1/switch"),
            Some(TOKEN),
            Some(format!("{{\"to\":\"{target}\"}}")),
        )
        .await?;
        let confirmed = started.elapsed().as_secs_f64() * 1000.0;
        if status != 200 || answer.contains("\"unconfirmed\"") {
            return Err(format!("switch {k} to {target}: {status} {answer}"));
        }
        let mut answered: f64 = 0.0;
        for (probe, router) in probes.into_iter().zip(routers) {
            let at = probe.await.map_err(|e| e.to_string())?.ok_or_else(|| {
                format!(
                    "router {} never answered {target} after switch {k}",
                    router.id
                )
            })?;
            answered = answered.max(at);
        }
        let seen = reported.await.map_err(|e| e.to_string())?;
        if seen.len() < routers.len() {
            return Err(format!(
                "switch {k}: only {} of {} routers reported it",
                seen.len(),
                routers.len()
            ));
        }
        let reported = seen.values().copied().fold(0.0, f64::max);
        measured.push(Switch {
            confirmed,
            reported,
            answered,
        });
        tokio::time::sleep(GAP).await;
    }
    Ok(measured)
}

/// etcd alone: a put, and the time until `watchers` watch streams (one per router) all see it.
async fn etcd_fan_out(etcd: &Client, watchers: usize, puts: usize) -> Result<Vec<f64>, String> {
    let key = format!("/bench/fan-out-{watchers}");
    let mut streams = Vec::new();
    for _ in 0..watchers {
        let mut client = etcd.clone();
        streams.push(
            client
                .watch(key.clone(), None)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let mut times = Vec::new();
    for i in 0..puts {
        let started = Instant::now();
        let waits: Vec<_> = streams
            .drain(..)
            .map(|mut stream| {
                tokio::spawn(async move {
                    let seen = loop {
                        match stream.message().await {
                            Ok(Some(answer)) if !answer.events().is_empty() => {
                                break Some(started.elapsed());
                            }
                            Ok(Some(_)) => continue,
                            _ => break None,
                        }
                    };
                    (stream, seen)
                })
            })
            .collect();
        let mut client = etcd.clone();
        client
            .put(key.clone(), i.to_string(), None)
            .await
            .map_err(|e| e.to_string())?;
        let mut last = Duration::ZERO;
        for wait in waits {
            let (stream, seen) = wait.await.map_err(|e| e.to_string())?;
            last = last.max(seen.ok_or("a watch of etcd ended")?);
            streams.push(stream);
        }
        times.push(last.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(times)
}

fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn p50_p99(values: &[f64]) -> String {
    format!(
        "{:.1} / {:.1}",
        percentile(values, 0.5),
        percentile(values, 0.99)
    )
}

async fn run(args: &Args, work: &Path) -> Result<String, String> {
    let switches = if args.quick { 10 } else { 40 };
    let mut started = Started(Vec::new());
    progress("starting a three-member etcd cluster");
    let members = start_etcd(work, &mut started)?;
    let mut etcd = connect(&members).await?;
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    let mut backends = Vec::new();
    for color in ["blue", "green"] {
        let port = free_port()?;
        let child = Command::new(args.bin_dir.join("bluegreen"))
            .args([
                "example-app",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--color",
                color,
            ])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("bluegreen example-app: {e}"))?;
        started.0.push(child);
        backends.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let mut rows = Vec::new();
    for &count in &args.routers {
        progress(&format!("starting {count} routers"));
        let mut fleet = Started(Vec::new());
        let (routers, admin) = start_fleet(
            args,
            work,
            &members,
            [backends[0], backends[1]],
            count,
            &mut fleet,
            &mut etcd,
        )
        .await?;
        let prefix = format!("/bench/fleet-{count}");
        // etcd's requests while idle (reports, lease keep-alives), then during the switches.
        let idle_from = (Instant::now(), etcd_requests(&http, &members).await?);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_rate = (etcd_requests(&http, &members).await? - idle_from.1)
            / idle_from.0.elapsed().as_secs_f64();
        progress(&format!("{switches} switches across {count} routers"));
        let during_from = (Instant::now(), etcd_requests(&http, &members).await?);
        let measured = measure_switches(&http, &etcd, &routers, &admin, &prefix, switches).await?;
        let during = etcd_requests(&http, &members).await? - during_from.1;
        let busy = during - idle_rate * during_from.0.elapsed().as_secs_f64();
        let per_switch = (busy / switches as f64).max(0.0);
        progress(&format!("etcd's watch fan-out to {count} watchers"));
        let fan_out = etcd_fan_out(&etcd, count, switches).await?;
        drop(fleet);
        rows.push(Row {
            routers: count,
            measured,
            per_switch,
            idle_rate,
            fan_out,
        });
    }
    drop(started);
    Ok(render(&rows, switches))
}

/// One fleet size's figures.
struct Row {
    routers: usize,
    measured: Vec<Switch>,
    /// etcd requests per switch, net of the idle rate.
    per_switch: f64,
    /// etcd requests per second while idle.
    idle_rate: f64,
    /// etcd alone: put → every watcher saw it, in milliseconds.
    fan_out: Vec<f64>,
}

fn render(rows: &[Row], switches: usize) -> String {
    let mut out = String::from(
        "# Fleet: switch propagation\n\n\
         Written by `bench/fleet` (crates/bench/src/bin/fleet.rs). On this machine: a three-member etcd\n\
         cluster (Debian's etcd-server) and N `bluegreen up` routers on one prefix, all on loopback,\n\
         each routing to the same two example-app instances. Each switch is `POST /v1/switch` to the\n\
         leader, alternating blue and green. Times are milliseconds from the command sent, p50 / p99\n\
         over the switches; each router is probed every 5 ms for the color that answers. The peer row\n\
         is etcd alone: a put, until as many watch streams as routers have all seen it — the floor\n\
         under any router that follows etcd.\n\n",
    );
    out.push_str(
        "| routers | switches | switch call returns (all confirmed) | every router reported it | every router answers with the new color | etcd: put → all watchers | etcd requests per switch (idle: per s) |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let Row {
            routers: count,
            measured,
            per_switch,
            idle_rate,
            fan_out,
        } = row;
        let pick = |f: fn(&Switch) -> f64| measured.iter().map(f).collect::<Vec<f64>>();
        out.push_str(&format!(
            "| {count} | {switches} | {} | {} | {} | {} | {:.0} ({:.0}) |\n",
            p50_p99(&pick(|s| s.confirmed)),
            p50_p99(&pick(|s| s.reported)),
            p50_p99(&pick(|s| s.answered)),
            p50_p99(fan_out),
            per_switch,
            idle_rate
        ));
    }
    out.push_str(
        "\nThe switch call returns when bluegreen has seen every live router's report of the new\n\
         revision (`store.etcd.confirm_timeout` bounds the wait). A router applies a change when its\n\
         watch delivers it and reports at once; its report is one put under its lease. etcd requests\n\
         are gRPC calls started on any member (`grpc_server_started_total`), net of the idle rate\n\
         (each router reports and renews its lease about once a second).\n",
    );
    out
}
