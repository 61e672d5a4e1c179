//! bluegreen-bench: bluegreen against nginx and HAProxy on this machine, in one run, as tables and a plot.

mod load;
mod peers;
mod report;
mod tools;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::peers::{Backends, Kind, Peer, ROUTER_CORE};
use crate::report::{FixedLevel, FixedRate, Memory, Results, median, quantile};

#[derive(Parser, Debug)]
#[command(
    name = "bluegreen-bench",
    about = "Benchmark bluegreen against nginx and HAProxy (run it through bench/run)"
)]
struct Args {
    /// A short run (about two minutes): fewer rounds, shorter runs, fewer switches.
    #[arg(long)]
    quick: bool,
    /// Folder with the release binaries bluegreen and bluegreen-example-app.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where to write the report; the plot goes beside it as benchmarks.svg.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
}

/// How much to measure.
#[derive(Debug, Clone, Copy)]
struct Plan {
    rounds: usize,
    seconds: u64,
    connections: u32,
    fixed_rounds: usize,
    fixed_seconds: f64,
    h2_rounds: usize,
    idle_connections: usize,
    switches: usize,
    propagation_switches: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 2,
                seconds: 3,
                connections: 64,
                fixed_rounds: 1,
                fixed_seconds: 3.0,
                h2_rounds: 1,
                idle_connections: 2000,
                switches: 40,
                propagation_switches: 20,
            }
        } else {
            Plan {
                rounds: 5,
                seconds: 10,
                connections: 64,
                fixed_rounds: 3,
                fixed_seconds: 8.0,
                h2_rounds: 3,
                idle_connections: 10_000,
                switches: 100,
                propagation_switches: 100,
            }
        }
    }
}

/// Time between switches in the propagation test: long enough for nginx's reload (about
/// 100 ms here) to take effect inside the window.
const PROPAGATION_GAP: Duration = Duration::from_millis(300);

/// Time between restarts in the restart row: the previous one's old process is still
/// draining when the next begins, as when an operator repeats a reload.
const RESTART_GAP: Duration = Duration::from_millis(500);

fn progress(message: &str) {
    eprintln!("bench: {message}");
    let _ = std::io::stderr().flush();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), String> {
    let mut plan = Plan::new(args.quick);
    // Every router gets the same number of idle connections, within what HAProxy can hold
    // under this machine's descriptor limit.
    plan.idle_connections = plan
        .idle_connections
        .min(peers::haproxy_maxconn().saturating_sub(200) as usize);
    let started = Instant::now();
    let work = std::env::temp_dir().join(format!("bluegreen-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let outcome = measure(args, plan, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    let (results, commands) = outcome?;
    let report = render(&results, plan, &commands, args, started.elapsed());
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let plot = args.out.with_file_name("benchmarks.svg");
    results.plot(&plot)?;
    results.plot_targets(&args.out.with_file_name("targets.svg"))?;
    std::fs::write(&args.out, &report).map_err(|e| format!("{}: {e}", args.out.display()))?;
    println!("{report}");
    progress(&format!(
        "done in {:.0}s; report {} and plot {}",
        started.elapsed().as_secs_f64(),
        args.out.display(),
        plot.display()
    ));
    Ok(())
}

async fn measure(
    args: &Args,
    plan: Plan,
    work: &std::path::Path,
) -> Result<(Results, Vec<String>), String> {
    progress("starting backends (example app: blue 1.0, green 2.0) and routers");
    let (mut blue_child, blue) = peers::start_backend(&args.bin_dir, "blue", "1.0")?;
    let (mut green_child, green) = peers::start_backend(&args.bin_dir, "green", "2.0")?;
    let backends = Backends { blue, green };
    let peers = vec![
        Peer::direct(backends, work),
        Peer::bluegreen(&args.bin_dir, backends, work)?,
        Peer::nginx(backends, work)?,
        Peer::haproxy(backends, work)?,
    ];
    let mut outcome = measure_peers(&peers, plan).await;
    if let Ok((results, _)) = &mut outcome {
        // The same switches, the traffic through HAProxy and nginx and bluegreen switching
        // them as their driver.
        let driven = [
            Peer::driven_haproxy(&args.bin_dir, backends, work),
            Peer::driven_nginx(&args.bin_dir, backends, work),
        ];
        for peer in driven {
            let peer = peer?;
            peer.wait_ready().await?;
            measure_switching(&[&peer], plan, results).await?;
        }
    }
    if let Ok((_, commands)) = &mut outcome {
        for peer in &peers {
            if let Some(text) = peer.config_text() {
                commands.push(format!("\n# {} config\n{}", peer.name(), text.trim_end()));
            }
        }
    }
    drop(peers);
    let _ = blue_child.kill();
    let _ = green_child.kill();
    let _ = blue_child.wait();
    let _ = green_child.wait();
    outcome
}

async fn measure_peers(peers: &[Peer], plan: Plan) -> Result<(Results, Vec<String>), String> {
    for peer in peers {
        peer.wait_ready().await?;
    }
    let routers: Vec<&Peer> = peers.iter().filter(|p| p.kind != Kind::Direct).collect();
    let mut results = Results::default();
    let mut commands = Vec::new();
    let start_rss: Vec<u64> = routers.iter().map(|p| p.rss_kib()).collect();
    measure_throughput(peers, plan, &mut results, &mut commands)?;
    let saturated_peak: Vec<u64> = routers.iter().map(|p| p.peak_rss_kib()).collect();
    measure_fixed_rate(peers, plan, &mut results, &mut commands).await?;
    measure_h2(&routers, plan, &mut results, &mut commands)?;
    measure_idle_memory(&routers, plan, &start_rss, &saturated_peak, &mut results).await?;
    measure_switching(&routers, plan, &mut results).await?;
    measure_propagation(&routers, plan, &mut results).await?;
    // Last: bluegreen's process is a new one after it.
    measure_restarts(&routers, &mut results).await?;
    Ok((results, commands))
}

/// 1. Throughput and latency at saturation, interleaved A B C D A B C D ….
fn measure_throughput(
    peers: &[Peer],
    plan: Plan,
    results: &mut Results,
    commands: &mut Vec<String>,
) -> Result<(), String> {
    commands.push(
        tools::wrk_command("http://127.0.0.1:PORT/", plan.connections, plan.seconds).join(" "),
    );
    results.throughput = peers.iter().map(|p| (p.kind, Vec::new())).collect();
    for round in 0..plan.rounds {
        for (i, peer) in peers.iter().enumerate() {
            let run = tools::run_wrk(&peer.url(), plan.connections, plan.seconds)?;
            progress(&format!(
                "throughput round {}/{}: {:<14} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
                round + 1,
                plan.rounds,
                peer.name(),
                run.requests_per_sec,
                run.p50_ms,
                run.p99_ms
            ));
            results.throughput[i].1.push(run);
        }
    }
    Ok(())
}

/// 2. Latency at fixed rates below saturation: [`FIXED_LOADS`] of nginx's median rate.
async fn measure_fixed_rate(
    peers: &[Peer],
    plan: Plan,
    results: &mut Results,
    commands: &mut Vec<String>,
) -> Result<(), String> {
    let nginx = median(&results.requests_per_sec(Kind::Nginx));
    for load in FIXED_LOADS {
        let rate = (nginx * load / 100.0).floor() * 100.0;
        commands.push(format!(
            "bluegreen-bench open-loop load: {rate:.0} req/s ({:.0} % of nginx's saturation) over 32 keep-alive connections for {}s, latency from each request's due time",
            load * 100.0,
            plan.fixed_seconds
        ));
        let mut level = FixedLevel {
            load,
            rate,
            rows: peers
                .iter()
                .map(|p| FixedRate {
                    kind: p.kind,
                    p50_ms: vec![],
                    p99_ms: vec![],
                    p999_ms: vec![],
                    errors: 0,
                })
                .collect(),
        };
        for round in 0..plan.fixed_rounds {
            for (i, peer) in peers.iter().enumerate() {
                let (latencies, errors) =
                    load::fixed_rate(peer, rate, plan.fixed_seconds, 32).await?;
                let f = &mut level.rows[i];
                f.p50_ms.push(quantile(&latencies, 0.50) / 1000.0);
                f.p99_ms.push(quantile(&latencies, 0.99) / 1000.0);
                f.p999_ms.push(quantile(&latencies, 0.999) / 1000.0);
                f.errors += errors;
                progress(&format!(
                    "fixed {rate:.0} req/s round {}/{}: {:<14} p50 {:.3} ms  p99 {:.3} ms",
                    round + 1,
                    plan.fixed_rounds,
                    peer.name(),
                    f.p50_ms.last().unwrap(),
                    f.p99_ms.last().unwrap()
                ));
            }
        }
        results.fixed.push(level);
    }
    Ok(())
}

/// The fixed rates latency is measured at, as shares of nginx's saturation rate.
const FIXED_LOADS: [f64; 2] = [0.5, 0.8];

/// 3. HTTP/2 (h2c with prior knowledge) with h2load; the upstream side stays HTTP/1.1.
fn measure_h2(
    routers: &[&Peer],
    plan: Plan,
    results: &mut Results,
    commands: &mut Vec<String>,
) -> Result<(), String> {
    commands.push(tools::h2load_command("http://127.0.0.1:PORT/", 16, 10, plan.seconds).join(" "));
    results.h2 = routers.iter().map(|p| (p.kind, Vec::new())).collect();
    for round in 0..plan.h2_rounds {
        for (i, peer) in routers.iter().enumerate() {
            let Some(h2) = peer.h2 else { continue };
            let run = tools::run_h2load(&format!("http://{h2}/"), 16, 10, plan.seconds)?;
            progress(&format!(
                "h2 round {}/{}: {:<14} {:>8.0} req/s",
                round + 1,
                plan.h2_rounds,
                peer.name(),
                run.requests_per_sec
            ));
            results.h2[i].1.push(run);
        }
    }
    Ok(())
}

/// 4. Memory with many idle keep-alive connections, beside each router's `start_rss` (before
///    any load) and `saturated_peak` (the peak of the saturation runs).
async fn measure_idle_memory(
    routers: &[&Peer],
    plan: Plan,
    start_rss: &[u64],
    saturated_peak: &[u64],
    results: &mut Results,
) -> Result<(), String> {
    for (i, peer) in routers.iter().enumerate() {
        // Half the connections first, then the other half: the second half's RSS over the
        // first's is what a connection costs, apart from what earlier load left in the heap.
        let half = plan.idle_connections / 2;
        let mut held = load::hold_idle_connections(peer.http, half).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = peer.rss_kib();
        held.extend(load::hold_idle_connections(peer.http, plan.idle_connections - half).await?);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle = peer.rss_kib();
        progress(&format!(
            "memory: {:<14} {:.1} MiB with {} idle connections",
            peer.name(),
            idle as f64 / 1024.0,
            held.len()
        ));
        results.memory.push(Memory {
            kind: peer.kind,
            start_kib: start_rss[i],
            before_idle_kib: before,
            idle_kib: idle,
            saturated_peak_kib: saturated_peak[i],
            idle_connections: held.len(),
            measured_connections: plan.idle_connections - half,
        });
        drop(held);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// 5. Switching under saturating load, every response checked.
async fn measure_switching(
    routers: &[&Peer],
    plan: Plan,
    results: &mut Results,
) -> Result<(), String> {
    for peer in routers {
        let tally =
            load::switch_under_load(peer, 32, 4, plan.switches, Duration::from_millis(20)).await?;
        progress(&format!(
            "switch under load: {:<14} {} switches, {} requests, {} failed, {} non-2xx",
            peer.name(),
            plan.switches,
            tally.total(),
            tally.errors,
            tally.non_2xx
        ));
        results.switching.push((peer.kind, plan.switches, tally));
    }
    Ok(())
}

/// 7. The router itself restarted in place under saturating load: bluegreen's upgrades
///    and reloads, nginx's reloads; HAProxy runs without master-worker mode here, so it has
///    none.
async fn measure_restarts(routers: &[&Peer], results: &mut Results) -> Result<(), String> {
    for peer in routers.iter().filter(|p| p.kind != Kind::Haproxy) {
        let restart = async |i: usize| peer.restart_in_place(i).await;
        let tally = load::under_load(peer, 32, 4, peers::RESTARTS, RESTART_GAP, restart).await?;
        progress(&format!(
            "restarts under load: {:<14} {} restarts, {} requests, {} failed, {} non-2xx",
            peer.name(),
            peers::RESTARTS,
            tally.total(),
            tally.errors,
            tally.non_2xx
        ));
        results.restarts.push((peer.kind, peers::RESTARTS, tally));
    }
    Ok(())
}

/// 6. Propagation: how soon new requests see the new color.
async fn measure_propagation(
    routers: &[&Peer],
    plan: Plan,
    results: &mut Results,
) -> Result<(), String> {
    for peer in routers {
        let p = load::propagation(peer, plan.propagation_switches, PROPAGATION_GAP, 4).await?;
        progress(&format!(
            "propagation: {:<14} first new {:.3} ms, last old {:.3} ms (medians)",
            peer.name(),
            median(&p.first_new_ms),
            median(&p.last_old_ms)
        ));
        results.propagation.push((peer.kind, p));
    }
    Ok(())
}

fn render(
    results: &Results,
    plan: Plan,
    commands: &[String],
    args: &Args,
    elapsed: Duration,
) -> String {
    let machine = machine_description();
    let versions = tool_versions(&args.bin_dir);
    let mut out = String::new();
    out.push_str("# Benchmarks: bluegreen against nginx and HAProxy\n\n");
    out.push_str(&format!(
        "Written by `bench/run{}` in {:.0} s. Machine: {machine}. Every number below comes from this one run; rerun `bench/run` to reproduce on your machine.\n\n",
        if args.quick { " --quick" } else { "" },
        elapsed.as_secs_f64()
    ));
    out.push_str("![req/s and p99 per router](benchmarks.svg)\n\n");
    out.push_str(&format!(
        "## Targets (issue 13)\n\nEach figure from this run, against the goal bluegreen's data plane is held to; the plot shows each as a share of its goal (1.0 = met).\n\n{}\n![each target as a share of its goal](targets.svg)\n\n",
        results.targets_table()
    ));
    render_setup(&mut out, plan, &versions, commands);
    render_results(&mut out, results, plan);
    out
}

/// Cores, CPU model and kernel.
fn machine_description() -> String {
    format!(
        "{} cores, {}, kernel {}",
        tools::version_of("nproc", &["--all"]),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_else(|| "unknown CPU".into()),
        tools::version_of("uname", &["-r"])
    )
}

/// What each program in the run reports as its version.
fn tool_versions(bin_dir: &Path) -> [(&'static str, String); 6] {
    [
        (
            "bluegreen",
            tools::version_of(&bin_dir.join("bluegreen").to_string_lossy(), &["--version"]),
        ),
        ("nginx", tools::version_of("nginx", &["-v"])),
        ("HAProxy", tools::version_of("haproxy", &["-v"])),
        ("wrk", tools::version_of("wrk", &["-v"])),
        ("h2load", tools::version_of("h2load", &["--version"])),
        ("rustc", tools::version_of("rustc", &["--version"])),
    ]
}

/// How the run was set up: core placement, backend, peers, rounds, versions and commands.
fn render_setup(out: &mut String, plan: Plan, versions: &[(&str, String)], commands: &[String]) {
    out.push_str("## Setup\n\n");
    out.push_str(&format!(
        "- **Cores.** The router under test runs alone on core {ROUTER_CORE} (`taskset -c {ROUTER_CORE}`) with one worker: `BLUEGREEN_WORKER_THREADS=1` (one thread: a current-thread runtime), nginx `worker_processes 1`, HAProxy `nbthread 1`. The load generator and the backend share the other core. Every peer gets the same placement, so the ratios compare work per core.\n\
         - **Backend.** The workspace's example app (`bluegreen-example-app`, a minimal hyper server, release build, one thread) answers `GET /` with a 9-byte body. It is the same binary the tests and demo use, so the benchmark measures the path users run; the `backend direct` row is the ceiling a router cannot beat.\n\
         - **Peers.** nginx with upstream `keepalive 64`, `proxy_http_version 1.1`, `Connection \"\"`, no access log. HAProxy in `mode http` with `http-reuse always` and keep-alive on both sides. bluegreen with its defaults (health checks every second, metrics on).\n\
         - **Rounds.** {} rounds of {} s per target for throughput, interleaved (direct, bluegreen, nginx, HAProxy, then again), reported as median (min–max); ratios to nginx are paired within a round. Fixed rate: {} round(s) of {} s. HTTP/2: {} round(s).\n\n",
        plan.rounds, plan.seconds, plan.fixed_rounds, plan.fixed_seconds, plan.h2_rounds
    ));
    out.push_str("Versions:\n\n");
    for (name, version) in versions {
        out.push_str(&format!("- {name}: `{version}`\n"));
    }
    out.push_str("\nCommands:\n\n```\n");
    for command in commands {
        out.push_str(command);
        out.push('\n');
    }
    out.push_str("```\n\n");
}

/// One section per measurement, each with its table.
fn render_results(out: &mut String, results: &Results, plan: Plan) {
    out.push_str(&format!(
        "## Throughput and latency at saturation (wrk, {} keep-alive connections)\n\n{}\n",
        plan.connections,
        results.throughput_table()
    ));
    for level in &results.fixed {
        out.push_str(&format!(
            "## Latency at a fixed {:.0} req/s ({:.0} % of nginx's saturation)\n\n{}\n",
            level.rate,
            level.load * 100.0,
            level.table()
        ));
    }
    out.push_str(&format!("## HTTP/2 (h2load, h2c prior knowledge, 16 clients × 10 streams; HTTP/1.1 to the backend)\n\n{}\n", results.h2_table()));
    out.push_str(&format!(
        "## Memory\n\nResident set size (nginx: master and worker). Idle connections: {} keep-alive connections that each made one request; the descriptor hard limit here is {}, and HAProxy needs two per connection, so every router gets the same {} rather than 10,000. Per connection: the RSS the second half of them added over the RSS with the first half open (so what earlier load left in the heap does not count).\n\n{}\n",
        plan.idle_connections,
        peers::fd_hard_limit(),
        plan.idle_connections,
        results.memory_table()
    ));
    out.push_str(&format!(
        "## Switching under load ({} flips, 20 ms apart, 32 keep-alive + 4 new-connection clients, every response checked)\n\n\
         bluegreen: `POST /v1/switch` on the admin socket. nginx: rewrite the included upstream file, `nginx -s reload`. HAProxy: `set weight app/NEW 100; set weight app/OLD 0` in one runtime-API command. \"bluegreen driver\" rows: the same `POST /v1/switch` to a bluegreen daemon driving that router (`router.driver`): HAProxy's weights through its runtime API, new color raised first; nginx's servers file rewritten, `nginx -t`, reload. The clients never resend a request on their own, so a request lost on a closing keep-alive connection counts as failed.\n\n{}\n",
        plan.switches,
        results.switching_table()
    ));
    out.push_str(&format!(
        "## Switch propagation ({} switches, {} ms apart, 4 keep-alive clients)\n\nFrom the moment the switch call returns: when the first response from the new color arrives, and when the last response from the old color to a request sent after the call returned arrives (0 when there is none). A switch whose new color did not answer before the next switch counts as the full {} ms.\n\n{}\n",
        plan.propagation_switches,
        PROPAGATION_GAP.as_millis(),
        PROPAGATION_GAP.as_millis(),
        results.propagation_table()
    ));
    out.push_str(&format!(
        "## Restarts under load ({} restarts, {} ms apart, 32 keep-alive + 4 new-connection clients, every response checked)\n\n\
         bluegreen: `POST /v1/upgrade` (to the same binary: a new process takes the listening sockets) and SIGHUP reloads of a changed config, alternately, then a SIGHUP with an invalid config. nginx: `nginx -s reload` of a changed config each time, then of an invalid one. HAProxy runs here as one process without master-worker mode, so it is not restarted. The clients never resend a request on their own.\n\n{}\n",
        peers::RESTARTS,
        RESTART_GAP.as_millis(),
        results.restarts_table()
    ));
}
