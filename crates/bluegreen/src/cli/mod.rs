//! Command-line interface: argument definitions, the commands, and how their results are printed.

mod init;
pub(crate) mod progress;
mod release;
mod tui;
mod up;

use std::path::{Path, PathBuf};

use bluegreen_router::Color;
use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Method;
use serde_json::{Value, json};

use crate::client::AdminClient;
use crate::config::{AdminEndpoint, Config};
use crate::exit::{self, CliError, expect_ok};
use crate::timestamp::utc_time;

#[derive(Parser, Debug)]
#[command(
    name = "bluegreen",
    version,
    about = "Zero-downtime blue-green releases: deploy to the idle color, test it, shift traffic under analysis, roll back at once"
)]
pub struct Cli {
    /// Config file (YAML).
    #[arg(
        long,
        short,
        global = true,
        env = "BLUEGREEN_CONFIG",
        default_value = "bluegreen.yaml"
    )]
    pub config: PathBuf,
    /// Admin endpoint to talk to, overriding router.admin: a socket path or host:port.
    #[arg(long, global = true, env = "BLUEGREEN_ADMIN")]
    pub admin: Option<String>,
    /// File holding the admin bearer token (TCP admin only), overriding router.admin_token_file.
    #[arg(long, global = true, env = "BLUEGREEN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// How to print results.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Commands,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Commands {
    /// Start the daemon in the foreground: router, controller, admin API, dashboard (Ctrl-C or SIGTERM stops it gracefully; SIGHUP reloads the config).
    Up,
    /// Read the config file again and put it in force without dropping a request; an invalid file changes nothing (every issue is listed).
    Reload,
    /// Replace the running daemon with a new binary without dropping a request: the new process takes the listening sockets, the app instances and the release in progress; the old one drains and exits. If the new one fails, the old one keeps serving (exit 1, with the reason).
    Upgrade {
        /// The new binary (default: the one the daemon was started from, e.g. replaced in place by a package upgrade).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// How long the new process has to take over before it is given up.
        #[arg(long, default_value = "60s")]
        timeout: String,
    },
    /// Write a commented bluegreen.yaml that runs the example app (edit it for your service).
    Init {
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
        /// Write a config for containers of this image (the Docker Engine provider), given
        /// without a tag: each deploy runs IMAGE:VERSION.
        #[arg(long, value_name = "IMAGE")]
        docker: Option<String>,
    },
    /// Deploy a version to the idle environment and wait until it is healthy.
    Deploy(DeployArgs),
    /// Run the configured smoke tests against an environment through the preview route.
    Test {
        #[arg(long, value_parser = parse_color)]
        environment: Color,
    },
    /// Send traffic to one color: at once, or gradually with --strategy (analysis guards each step).
    Switch(SwitchArgs),
    /// Deploy, test, shift with analysis, monitor and clean up: one guarded run.
    Release(ReleaseArgs),
    /// Go to the next step of a running shift now (--full: straight to 100%).
    Promote {
        #[arg(long)]
        full: bool,
    },
    /// Hold the running shift at its current step (analysis keeps running).
    Pause,
    /// Let a paused shift go on.
    Resume,
    /// Stop the running release: traffic goes back to the old color if any had moved.
    Abort {
        /// Recorded with the abort.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Live per-color numbers, the release and its analysis: a live screen on a terminal, else one line per interval.
    Monitor(MonitorArgs),
    /// What differs between the two environments' effective specs and what they run; with
    /// --mirror, how the mirrored color's answers differed from the live ones.
    Diff {
        #[arg(value_parser = parse_color, default_value = "blue")]
        a: Color,
        #[arg(value_parser = parse_color, default_value = "green")]
        b: Color,
        /// Shadow traffic instead: the mirror's verdict, counters and first differing answers.
        #[arg(long, conflicts_with_all = ["a", "b"])]
        mirror: bool,
    },
    /// The newest log lines of an environment's instances (or of hooks, tests).
    Logs {
        /// blue, green, hooks or tests.
        #[arg(long)]
        environment: String,
        #[arg(long, default_value_t = 50)]
        lines: usize,
        /// Keep printing lines as they are written (until the containers followed stop, the
        /// daemon stops, or Ctrl-C).
        #[arg(long, short)]
        follow: bool,
    },
    /// Releases, newest first.
    Releases {
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// The web dashboard's address with its token (open it in a browser).
    Dashboard,
    /// Shell completions, generated from these definitions: `bluegreen completions bash > …`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The man page (roff), generated from these definitions: `bluegreen man | man -l -`.
    Man,
    /// Run the whole story on this machine: the example app, load, a good and a bad release.
    Demo(crate::demo::DemoArgs),
    /// Router commands, spelled as in the seed: `bluegreen router switch --from blue --to green`.
    Router {
        #[command(subcommand)]
        command: RouterCommands,
    },
    /// Split traffic: a percent to one color, the rest to the other.
    Weights(WeightsArgs),
    /// Send all traffic back to the color that was live before the last change (a running
    /// release is aborted), or to a version with --to.
    Rollback {
        /// Roll back to this version: a table swap if the idle color runs it, else a deploy first.
        #[arg(long = "to")]
        to_version: Option<String>,
    },
    /// Point one environment at other upstreams (kept across restarts, over the config's).
    Upstreams(UpstreamsArgs),
    /// Live color, weights, upstream health, per-color counters, what each color runs, the release.
    Status,
    /// What changed and when: releases and their steps, deploys, switches, rollbacks, instance restarts.
    History {
        /// How many of the newest events to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Check the config file and print what it resolves to.
    Check,
}

#[derive(Subcommand, Debug)]
pub enum RouterCommands {
    /// Send all traffic to one color.
    Switch(SwitchArgs),
}

#[derive(Args, Debug)]
pub struct SwitchArgs {
    /// The color to make live.
    #[arg(long, value_parser = parse_color)]
    pub to: Color,
    /// The color expected to be live now; refused if it is not.
    #[arg(long, value_parser = parse_color)]
    pub from: Option<Color>,
    /// Shift gradually: canary, linear, instant, a preset (canary-10-5m, linear-10-every-1m)
    /// or a name under strategies:. Without it the switch is one table swap.
    #[arg(long)]
    pub strategy: Option<String>,
    /// With --strategy: return once started instead of following it.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// The environment to deploy to; must be idle.
    #[arg(long, value_parser = parse_color)]
    pub environment: Color,
    /// The version to deploy (a tag, a git sha: no spaces); filled into {version}.
    #[arg(long)]
    pub version: String,
    /// Extra environment variables for this deployment's instances (KEY=VALUE, repeatable).
    #[arg(long = "env", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// The version to release (a tag, a git sha: no spaces); it goes to the idle color.
    #[arg(long)]
    pub version: String,
    /// Overrides release.strategy for this release.
    #[arg(long)]
    pub strategy: Option<String>,
    /// Extra environment variables for the new version's instances (KEY=VALUE, repeatable).
    #[arg(long = "env", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Return once started instead of following it to the end.
    #[arg(long)]
    pub detach: bool,
}

#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// Only this color (default: both).
    #[arg(long, value_parser = parse_color)]
    pub environment: Option<Color>,
    /// Seconds between lines (and the window each line covers).
    #[arg(long, default_value_t = 2)]
    pub interval: u64,
    /// Stop after this many lines (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!(
            "{text:?} is not KEY=VALUE, e.g. --env FEATURE_X=on"
        )),
    }
}

#[derive(Args, Debug)]
pub struct UpstreamsArgs {
    /// The environment whose upstreams to replace.
    #[arg(long, value_parser = parse_color)]
    pub environment: Color,
    /// Its new upstreams, host:port each.
    #[arg(required = true)]
    pub upstreams: Vec<String>,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct WeightsArgs {
    /// Percent of traffic to green (0-100); blue gets the rest.
    #[arg(long)]
    pub green: Option<u64>,
    /// Percent of traffic to blue (0-100); green gets the rest.
    #[arg(long)]
    pub blue: Option<u64>,
}

fn parse_color(text: &str) -> Result<Color, String> {
    text.parse::<Color>().map_err(|e| e.to_string())
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match &cli.command {
        Commands::Up => up::run(&cli).await,
        Commands::Reload => reload(&cli).await,
        Commands::Upgrade { binary, timeout } => upgrade(&cli, binary.as_deref(), timeout).await,
        Commands::Check => check(&cli),
        Commands::Switch(args)
        | Commands::Router {
            command: RouterCommands::Switch(args),
        } => switch(&cli, args).await,
        Commands::Init { force, docker } => init::write(&cli.config, *force, docker.as_deref()),
        Commands::Deploy(args) => release::deploy(&cli, args).await,
        Commands::Test { environment } => release::test(&cli, *environment).await,
        Commands::Release(args) => start_release(&cli, args).await,
        Commands::Promote { full } => change(&cli, "/v1/promote", json!({ "full": full })).await,
        Commands::Pause => change(&cli, "/v1/pause", json!({})).await,
        Commands::Resume => change(&cli, "/v1/resume", json!({})).await,
        Commands::Abort { reason } => change(&cli, "/v1/abort", json!({ "reason": reason })).await,
        Commands::Monitor(args) => release::monitor(&cli, args).await,
        Commands::Diff { mirror: true, .. } => release::mirror_diff(&cli).await,
        Commands::Diff { a, b, .. } => release::diff(&cli, *a, *b).await,
        Commands::Logs {
            environment,
            lines,
            follow,
        } => release::logs(&cli, environment, *lines, *follow).await,
        Commands::Releases { limit } => release::list(&cli, *limit).await,
        Commands::Demo(args) => crate::demo::run(args).await,
        Commands::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "bluegreen", &mut std::io::stdout());
            Ok(())
        }
        Commands::Man => print_man_page(),
        Commands::Dashboard => dashboard(&cli).await,
        Commands::Weights(args) => weights(&cli, args).await,
        Commands::Rollback { to_version } => rollback(&cli, to_version.as_deref()).await,
        Commands::Upstreams(args) => {
            let body = json!({ "environment": args.environment, "upstreams": args.upstreams });
            change(&cli, "/v1/upstreams", body).await
        }
        Commands::History { limit } => history(&cli, *limit).await,
        Commands::Status => status(&cli).await,
    }
}

fn check(cli: &Cli) -> Result<(), CliError> {
    let config = Config::load(&cli.config)?;
    print_check(&config, cli.output);
    Ok(())
}

/// All traffic to one color at once, or gradually with a strategy (followed like a release).
async fn switch(cli: &Cli, args: &SwitchArgs) -> Result<(), CliError> {
    match &args.strategy {
        Some(strategy) => {
            let body = json!({ "to": args.to, "from": args.from, "strategy": strategy });
            release::start_and_follow(cli, "/v1/shift", body, args.detach).await
        }
        None => {
            let body = json!({ "to": args.to, "from": args.from });
            change(cli, "/v1/switch", body).await
        }
    }
}

async fn start_release(cli: &Cli, args: &ReleaseArgs) -> Result<(), CliError> {
    let env: serde_json::Map<String, Value> = args
        .env
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let body = json!({ "version": args.version, "strategy": args.strategy, "env": env });
    release::start_and_follow(cli, "/v1/releases", body, args.detach).await
}

fn print_man_page() -> Result<(), CliError> {
    let command = <Cli as clap::CommandFactory>::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut page)
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot render the man page: {e}")))?;
    use std::io::Write;
    std::io::stdout()
        .write_all(&page)
        .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
    Ok(())
}

/// The dashboard's address with the token its buttons need.
async fn dashboard(cli: &Cli) -> Result<(), CliError> {
    let config = Config::load(&cli.config)?;
    let Some(settings) = &config.dashboard else {
        return Err(CliError::new(
            exit::REFUSED,
            "the dashboard is disabled (dashboard.enabled: false)",
        ));
    };
    let client = admin_client(cli)?;
    let status = expect_ok(client.call(Method::GET, "/v1/status", None).await?)?;
    let url = status["dashboard"].as_str().unwrap_or("").to_string();
    let token = std::fs::read_to_string(&settings.token_file)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!(
                    "cannot read the dashboard token {}: {e}",
                    settings.token_file.display()
                ),
            )
        })?;
    match cli.output {
        Output::Json => println!("{}", json!({ "url": url, "token": token })),
        Output::Text => println!("{url}#token={token}"),
    }
    Ok(())
}

async fn weights(cli: &Cli, args: &WeightsArgs) -> Result<(), CliError> {
    let body = match (args.green, args.blue) {
        (Some(green), _) => json!({ "green": green }),
        (_, Some(blue)) => json!({ "blue": blue }),
        _ => unreachable!("clap requires one of --green and --blue"),
    };
    change(cli, "/v1/weights", body).await
}

async fn rollback(cli: &Cli, to_version: Option<&str>) -> Result<(), CliError> {
    if cli.output == Output::Text {
        warn_if_rollback_redeploys(cli, to_version).await;
    }
    let body = match to_version {
        Some(version) => json!({ "to_version": version }),
        None => json!({}),
    };
    let progress = release::spinner(cli, "rolling back".into());
    let outcome = change(cli, "/v1/rollback", body).await;
    progress.finish_and_clear();
    outcome
}

/// A rollback to a color scaled down after the release deploys to it again first: say so,
/// since it takes as long as a deploy. Best effort: the rollback itself reports any error.
async fn warn_if_rollback_redeploys(cli: &Cli, to_version: Option<&str>) {
    let Ok(client) = admin_client(cli) else {
        return;
    };
    let Ok(Ok(status)) = client
        .call(Method::GET, "/v1/status", None)
        .await
        .map(expect_ok)
    else {
        return;
    };
    let back = status["rollback_to"].as_str();
    let stopped = status["environments"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["color"].as_str() == back && e["status"] == "stopped");
    if let (None, Some(env)) = (to_version, stopped) {
        eprintln!(
            "{} was scaled down after the release: rolling back deploys {} to it again, which takes as long as a deploy",
            env["color"].as_str().unwrap_or("?"),
            env["version"].as_str().unwrap_or("its last version")
        );
    }
}

async fn history(cli: &Cli, limit: usize) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let answer = expect_ok(
        client
            .call(Method::GET, &format!("/v1/history?limit={limit}"), None)
            .await?,
    )?;
    match cli.output {
        Output::Json => {
            println!("{}", serde_json::to_string_pretty(&answer).expect("json"))
        }
        Output::Text => print!("{}", render_history(&answer)),
    }
    Ok(())
}

async fn status(cli: &Cli) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let status = expect_ok(client.call(Method::GET, "/v1/status", None).await?)?;
    match cli.output {
        Output::Json => {
            println!("{}", serde_json::to_string_pretty(&status).expect("json"))
        }
        Output::Text => print!("{}", render_status(&status)),
    }
    Ok(())
}

pub(crate) async fn change(cli: &Cli, path: &str, body: Value) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let outcome = expect_ok(client.call(Method::POST, path, Some(body)).await?)?;
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&outcome).expect("json")),
        Output::Text => println!("{}", outcome["message"].as_str().unwrap_or("done")),
    }
    unconfirmed(&outcome)
}

/// In a fleet, a change some routers had not applied in time: exit 8, naming them.
pub(crate) fn unconfirmed(outcome: &Value) -> Result<(), CliError> {
    let Some(lagging) = outcome["unconfirmed"].as_array().filter(|l| !l.is_empty()) else {
        return Ok(());
    };
    let names: Vec<String> = lagging
        .iter()
        .map(|router| {
            let id = router["id"].as_str().unwrap_or("?");
            match router["applied"].as_i64() {
                Some(applied) => format!("{id} (applied revision {applied})"),
                None => format!("{id} (its report is gone: stopped, or cut off from etcd)"),
            }
        })
        .collect();
    Err(CliError::new(
        exit::NOT_CONFIRMED,
        format!(
            "recorded, but not yet applied by {}; they apply it when they reach etcd again (store.etcd.confirm_timeout)",
            names.join(", ")
        ),
    ))
}

/// Where the daemon is: `--admin` wins, else the config's router.admin.
pub(crate) fn admin_client(cli: &Cli) -> Result<AdminClient, CliError> {
    let read_token = |path: &PathBuf| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .map_err(|e| {
                CliError::new(
                    exit::USAGE,
                    format!("--token-file: cannot read {}: {e}", path.display()),
                )
            })
    };
    if let Some(admin) = &cli.admin {
        let endpoint = AdminEndpoint::parse(admin, Path::new(""));
        let token = match (&cli.token_file, std::env::var("BLUEGREEN_TOKEN").ok()) {
            (Some(path), _) => Some(read_token(path)?),
            (None, token) => token,
        };
        return Ok(AdminClient { endpoint, token });
    }
    let config = Config::load(&cli.config)?;
    let token = match &cli.token_file {
        Some(path) => Some(read_token(path)?),
        None => std::env::var("BLUEGREEN_TOKEN")
            .ok()
            .or(config.router.admin_token),
    };
    Ok(AdminClient {
        endpoint: config.router.admin,
        token,
    })
}

/// `bluegreen upgrade`: waits until the new process serves, or says why it was given up.
async fn upgrade(cli: &Cli, binary: Option<&Path>, timeout: &str) -> Result<(), CliError> {
    let binary = binary
        .map(|b| {
            std::path::absolute(b)
                .map_err(|e| CliError::new(exit::USAGE, format!("--binary {}: {e}", b.display())))
        })
        .transpose()?;
    let body = json!({ "binary": binary, "timeout": timeout });
    let client = admin_client(cli)?;
    let answer = expect_ok(client.call(Method::POST, "/v1/upgrade", Some(body)).await?)?;
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer).expect("json")),
        Output::Text => println!("{}", answer["message"].as_str().unwrap_or("upgraded")),
    }
    Ok(())
}

/// `bluegreen reload`: exit 3 when the file is invalid, 4 when it changes what cannot change
/// in place; nothing changed in either case.
async fn reload(cli: &Cli) -> Result<(), CliError> {
    // The admin endpoint comes from the same file: an invalid one stops here, before the
    // daemon is asked, and the daemon's config is untouched.
    let client = admin_client(cli).map_err(|mut e| {
        if e.code == exit::BAD_CONFIG {
            e.message = format!(
                "{}\nthe running config stays in force (the daemon was not asked to reload)",
                e.message
            );
        }
        e
    })?;
    let (status, body) = client
        .call(Method::POST, "/v1/reload", Some(json!({})))
        .await?;
    if status == http::StatusCode::BAD_REQUEST {
        let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
        let message = answer["error"]["message"]
            .as_str()
            .unwrap_or("the config is invalid")
            .to_string();
        return Err(CliError::new(exit::BAD_CONFIG, message));
    }
    let outcome = expect_ok((status, body))?;
    match cli.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&outcome).expect("json")),
        Output::Text => println!("{}", outcome["message"].as_str().unwrap_or("reloaded")),
    }
    Ok(())
}

impl crate::controller::traffic::ControllerStatus {
    fn weights_text(&self) -> String {
        match self.live {
            Some(color) => color.to_string(),
            None => format!(
                "split blue {}% / green {}%",
                self.weights.blue, self.weights.green
            ),
        }
    }
}

fn print_check(config: &Config, output: Output) {
    let summary = json!({
        "service": config.service,
        "listen": config.router.listen,
        "admin": config.router.admin.to_string(),
        "blue": config.upstreams[Color::Blue.index()],
        "green": config.upstreams[Color::Green.index()],
        "drain_timeout_ms": config.router.drain_timeout.as_millis() as u64,
    });
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&summary).expect("json")),
        Output::Text => println!(
            "config ok: service {} on {}, admin {}, blue {} upstream(s), green {} upstream(s)",
            config.service,
            config.router.listen,
            config.router.admin,
            config.upstreams[0].len(),
            config.upstreams[1].len()
        ),
    }
}

/// Events one per line: UTC time, kind, message.
pub(crate) fn render_history(answer: &Value) -> String {
    let empty = Vec::new();
    answer["events"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|e| {
            let at_ms = e["at_ms"].as_i64().unwrap_or(0);
            format!(
                "{}  {:<10} {}\n",
                utc_time(at_ms),
                e["kind"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// The status as a small table.
pub fn render_status(status: &Value) -> String {
    let mut out = String::new();
    let live = status["live"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| "split".into());
    out.push_str(&format!(
        "service {}  listen {}  live: {}  (blue {}% / green {}%)\n",
        status["service"].as_str().unwrap_or("?"),
        status["listen"].as_str().unwrap_or("?"),
        live,
        status["weights"]["blue"],
        status["weights"]["green"],
    ));
    render_color_table(&mut out, status);
    out.push_str(&format!(
        "connections open: {}\n",
        status["connections_open"]
    ));
    if let Some(url) = status["dashboard"].as_str() {
        out.push_str(&format!(
            "dashboard: {url} (`bluegreen dashboard` adds the token)\n"
        ));
    }
    render_environments(&mut out, status);
    render_routers(&mut out, status);
    render_hosts(&mut out, status);
    let release = &status["release"];
    if !release.is_null() {
        out.push_str(&format!(
            "release #{} {} → {}: {}\n",
            release["id"],
            release["version"].as_str().unwrap_or("shift"),
            release["color"].as_str().unwrap_or("?"),
            progress::progress_line(release)
        ));
    }
    out
}

/// In a fleet: each router, what it applied and how far behind it is.
fn render_routers(out: &mut String, status: &Value) {
    let Some(routers) = status["routers"].as_array() else {
        return;
    };
    out.push_str(&format!(
        "fleet: {} routers, leader {}\n",
        routers.len(),
        status["leader"].as_str().unwrap_or("none elected")
    ));
    out.push_str(&format!(
        "{:<16} {:>8} {:>4} {:>13} {:>9} {:>9} {:>7}  {}\n",
        "ROUTER", "APPLIED", "LAG", "BLUE/GREEN", "REQUESTS", "ERRORS", "REPORT", "STATE"
    ));
    for router in routers {
        let state = match (router["stale"].as_bool(), router["refused"].as_str()) {
            _ if router["lost"].as_bool() == Some(true) => {
                "lost: its report is gone (stopped, or cut off from etcd)".into()
            }
            (_, Some(refused)) => format!("cannot apply: {refused}"),
            (Some(true), _) => "stale: lost etcd, serving its last state".into(),
            _ => "ok".into(),
        };
        let sum = |key: &str| -> u64 {
            router[key]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_u64).sum())
                .unwrap_or(0)
        };
        out.push_str(&format!(
            "{:<16} {:>8} {:>4} {:>13} {:>9} {:>9} {:>6.1}s  {state}\n",
            router["id"].as_str().unwrap_or("?"),
            router["applied"].to_string(),
            router["lag"].to_string(),
            format!(
                "{}/{}",
                router["weights"]["blue"], router["weights"]["green"]
            ),
            sum("requests"),
            sum("errors"),
            router["report_age_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        ));
    }
}

/// In a fleet that deploys per host: what each host runs of each color.
fn render_hosts(out: &mut String, status: &Value) {
    let Some(hosts) = status["hosts"].as_array() else {
        return;
    };
    out.push_str(&format!(
        "{:<16} {:<6} {:<12} {:<10} {:<7} {}\n",
        "HOST", "COLOR", "VERSION", "STATUS", "TESTS", "UPSTREAMS / REASON"
    ));
    for host in hosts {
        let record = &host["record"];
        let tests = match host["test_failures"].as_array() {
            None => "-",
            Some(failures) if failures.is_empty() => "passed",
            Some(_) => "failed",
        };
        let upstreams: Vec<&str> = record["upstreams"]
            .as_array()
            .map(|list| list.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let detail = match record["status"].as_str() {
            Some("failed") => record["reason"].as_str().unwrap_or("").to_string(),
            Some("running" | "deploying") => upstreams.join(", "),
            _ => String::new(),
        };
        let line = format!(
            "{:<16} {:<6} {:<12} {:<10} {:<7} {detail}",
            host["host"].as_str().unwrap_or("?"),
            record["color"].as_str().unwrap_or("?"),
            record["version"].as_str().unwrap_or("-"),
            record["status"].as_str().unwrap_or("?"),
            tests,
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// One row of weight, health and counters per color, each followed by its upstreams.
fn render_color_table(out: &mut String, status: &Value) {
    out.push_str(&format!(
        "{:<6} {:>6} {:>8} {:>9} {:>8} {:>6} {:>6} {:>8} {:>8} {:>5} {:>8}\n",
        "COLOR",
        "WEIGHT",
        "HEALTHY",
        "REQUESTS",
        "2XX",
        "5XX",
        "ERRORS",
        "P50",
        "P99",
        "OPEN",
        "DRAINING"
    ));
    let ms = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x}ms"))
            .unwrap_or_else(|| "-".into())
    };
    let empty = Vec::new();
    for color in status["colors"].as_array().unwrap_or(&empty) {
        let m = &color["metrics"];
        let upstreams = color["upstreams"].as_array().unwrap_or(&empty);
        let text = |v: &Value| v.to_string();
        out.push_str(&format!(
            "{:<6} {:>5}% {:>8} {:>9} {:>8} {:>6} {:>6} {:>8} {:>8} {:>5} {:>8}\n",
            color["color"].as_str().unwrap_or("?"),
            text(&color["weight"]),
            format!("{}/{}", color["healthy_upstreams"], upstreams.len()),
            text(&m["requests"]),
            text(&m["responses_2xx"]),
            text(&m["responses_5xx"]),
            text(&m["upstream_errors"]),
            ms(&m["latency_p50_ms"]),
            ms(&m["latency_p99_ms"]),
            text(&m["open"]),
            text(&m["draining"]),
        ));
        for upstream in upstreams {
            let error = upstream["last_error"]
                .as_str()
                .filter(|_| upstream["health"] != "healthy")
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "    {:<22} {:<9} in-flight {}{}\n",
                upstream["address"].as_str().unwrap_or("?"),
                upstream["health"].as_str().unwrap_or("?"),
                upstream["in_flight"],
                error
            ));
        }
    }
}

/// What each color runs and its state (warm until, why).
fn render_environments(out: &mut String, status: &Value) {
    let empty = Vec::new();
    for env in status["environments"].as_array().unwrap_or(&empty) {
        let warm = env["scale_down_at_ms"]
            .as_i64()
            .map(|at| format!(", warm until {}", utc_time(at)))
            .unwrap_or_default();
        let reason = env["reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        let version = env["version"]
            .as_str()
            .map(|v| format!("version {v}"))
            .unwrap_or_else(|| "no version recorded".into());
        out.push_str(&format!(
            "{:<6} {version}, {}{warm}{reason}\n",
            env["color"].as_str().unwrap_or("?"),
            env["status"].as_str().unwrap_or("?"),
        ));
        for container in env["containers"].as_array().unwrap_or(&empty) {
            let id = container["id"].as_str().unwrap_or("");
            let address = match container["address"].as_str() {
                Some(address) => address.to_string(),
                None => format!("127.0.0.1:{}", container["host_port"]),
            };
            out.push_str(&format!(
                "       container {} {} on {address}, {}\n",
                container["name"].as_str().unwrap_or("?"),
                &id[..id.len().min(12)],
                container["state"].as_str().unwrap_or("?"),
            ));
        }
    }
}
