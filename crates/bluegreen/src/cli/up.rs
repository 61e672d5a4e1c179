//! `bluegreen up`: the daemon in the foreground, from its sockets to its drain, and the binary upgrade that hands them on.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use bluegreen_router::Color;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{Cli, release};
use crate::admin::{self, AdminListener};
use crate::config::{AdminEndpoint, Config};
use crate::controller::{Controller, Start};
use crate::daemon::Daemon;
use crate::exit::{self, CliError};
use crate::handoff::{self, AdminKind, Predecessor, Sockets, UpgradeAsk};

/// How long a SIGUSR2 upgrade gives the new process to take over.
const SIGNAL_UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// How `up` ends.
enum Ending {
    /// SIGTERM or Ctrl-C: drain, stop the app instances, remove the admin socket.
    Stop,
    /// A new process took over: drain, and leave the instances and the sockets to it.
    HandedOver,
}

pub async fn run(cli: &Cli) -> Result<(), CliError> {
    let failure = |message: String| CliError::new(exit::FAILURE, message);
    // Started by `bluegreen upgrade`: the old process hands over its sockets, then control.
    let predecessor = handoff::predecessor().map_err(failure)?;
    // The binary as started: an upgrade in place replaces the file this path names.
    let exe = std::env::current_exe().map_err(|e| failure(format!("own binary: {e}")))?;
    let (config, sockets, mut predecessor) = match load_and_bind(cli, predecessor).await {
        Ok(loaded) => loaded,
        Err((error, Some(predecessor))) => {
            predecessor.failed(&error.message).await;
            return Err(error);
        }
        Err((error, None)) => return Err(error),
    };
    if let Some(predecessor) = predecessor.as_mut() {
        predecessor.loaded().await.map_err(failure)?;
        tracing::info!(
            old = predecessor.pid,
            "upgrade: the old process let go of control"
        );
    }
    let router_listener = tcp_listener(&sockets.router).map_err(failure)?;
    let listen = router_listener
        .local_addr()
        .map_err(|e| failure(e.to_string()))?;
    let dashboard_addr = sockets
        .dashboard
        .as_ref()
        .map(|fd| tcp_listener(fd).and_then(|l| l.local_addr().map_err(|e| e.to_string())))
        .transpose()
        .map_err(failure)?;
    let config_path = std::path::absolute(&cli.config).unwrap_or_else(|_| cli.config.clone());
    let state_dir = config.state_dir.clone();
    let admin_endpoint = config.router.admin.clone();
    let built = Daemon::build(config, Some(config_path), listen, dashboard_addr).await;
    let daemon = match built {
        Ok(daemon) => daemon,
        Err(e) => {
            if let Some(predecessor) = predecessor {
                predecessor.failed(&e).await;
            }
            return Err(failure(e));
        }
    };
    let mut signals = Signals::new().map_err(failure)?;

    daemon.router.start_health_checks().await;
    let table = daemon.router.table();
    for color in Color::ALL {
        if table.split.weight(color) > 0 && table.pool(color).healthy_count() == 0 {
            // The recorded split is served as recorded (promise: restart into the last state),
            // but the operator should know it cannot answer yet.
            tracing::warn!(%color, "takes traffic but has no healthy upstream yet; requests get 503 until one passes its check");
        }
    }
    // Traffic first: settling an interrupted release may wait for instances to answer.
    let serving = daemon.router.serve(router_listener);
    let upgraded = predecessor.is_some();
    daemon
        .controller
        .start(if upgraded {
            Start::Upgrade
        } else {
            Start::Restart
        })
        .await;
    let mut servers = ControlServers::start(&sockets, &daemon.controller).map_err(failure)?;
    let (asks, mut upgrade_asks) = mpsc::channel::<UpgradeAsk>(1);
    let _ = daemon.controller.upgrades.set(asks);
    announce(&daemon, listen, &admin_endpoint).await;
    if let Some(predecessor) = predecessor {
        let old = predecessor.pid;
        if let Err(e) = predecessor.ready().await {
            tracing::warn!(error = %e, "upgrade: could not tell the old process");
        }
        tracing::info!(
            old,
            "upgrade: serving and in control; the old process drains"
        );
        let _ = sd_notify::notify(
            false,
            &[
                sd_notify::NotifyState::MainPid(std::process::id()),
                sd_notify::NotifyState::Ready,
            ],
        );
    } else {
        // Under systemd (`Type=notify`): ready once the router serves. Outside it, a no-op.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
    let ending = loop {
        let ask = tokio::select! {
            _ = signals.terminate.recv() => break Ending::Stop,
            _ = signals.interrupt.recv() => break Ending::Stop,
            _ = signals.hangup.recv() => match reload_on_signal(&daemon.controller).await {
                // What only a new process can change: an upgrade to the same binary.
                Some(keys) => {
                    tracing::info!("reload: {keys} change in a new process; upgrading to the same binary");
                    UpgradeAsk::from_signal(exe.clone(), SIGNAL_UPGRADE_TIMEOUT)
                }
                None => continue,
            },
            _ = signals.upgrade.recv() => UpgradeAsk::from_signal(exe.clone(), SIGNAL_UPGRADE_TIMEOUT),
            Some(ask) = upgrade_asks.recv() => ask,
        };
        let binary = ask.binary.clone().unwrap_or_else(|| exe.clone());
        let outcome = upgrade(
            &daemon,
            &sockets,
            &state_dir,
            &mut servers,
            &binary,
            ask.timeout,
        )
        .await;
        match &outcome {
            Ok(message) => tracing::info!("{message}"),
            Err(why) => tracing::error!("{why}"),
        }
        let handed_over = outcome.is_ok();
        ask.answer(outcome);
        if handed_over {
            break Ending::HandedOver;
        }
    };
    if let Ending::Stop = ending {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    }
    println!(
        "bluegreen: {}; in-flight requests get up to {}s to finish (signal again to quit now)",
        match ending {
            Ending::Stop => "stopping",
            Ending::HandedOver => "handed over to the new process; draining",
        },
        daemon
            .controller
            .config()
            .router
            .drain_timeout
            .as_secs_f32()
    );
    servers.stop_accepting();
    tokio::select! {
        _ = drain(cli, &daemon) => {}
        _ = signals.terminate.recv() => {}
        _ = signals.interrupt.recv() => {}
    }
    servers.stopped().await;
    serving.abort();
    match ending {
        Ending::Stop => {
            daemon.controller.shutdown().await;
            if let AdminEndpoint::Unix(path) = &admin_endpoint {
                let _ = std::fs::remove_file(path);
            }
            println!("bluegreen: stopped");
        }
        Ending::HandedOver => println!("bluegreen: drained; the new process serves"),
    }
    Ok(())
}

/// The config, and the sockets: handed over by the old process at an upgrade, else bound now.
async fn load_and_bind(
    cli: &Cli,
    predecessor: Option<Predecessor>,
) -> Result<(Config, Sockets, Option<Predecessor>), (CliError, Option<Predecessor>)> {
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => return Err((e.into(), predecessor)),
    };
    let failure = |message: String| CliError::new(exit::FAILURE, message);
    if let Err(e) = crate::daemon::create_private_dir(&config.state_dir) {
        return Err((failure(e), predecessor));
    }
    match predecessor {
        Some(mut predecessor) => {
            let sockets = match predecessor.sockets.take() {
                Some(sockets) => sockets,
                None => return Err((failure("upgrade: no sockets".into()), Some(predecessor))),
            };
            Ok((config, sockets, Some(predecessor)))
        }
        None => match bind(&config).await {
            Ok(sockets) => Ok((config, sockets, None)),
            Err(e) => Err((failure(e), None)),
        },
    }
}

/// The router's, the admin API's and the dashboard's listening sockets, bound from the config.
async fn bind(config: &Config) -> Result<Sockets, String> {
    let router = router_listener(config).await?;
    let admin = admin::bind(&config.router.admin, config.router.admin_token.as_deref()).await?;
    let dashboard = bind_dashboard(config).await?;
    let (admin, admin_kind) = match admin {
        AdminListener::Unix(listener) => (owned(listener.into_std())?, AdminKind::Unix),
        AdminListener::Tcp(listener, _) => (owned(listener.into_std())?, AdminKind::Tcp),
    };
    Ok(Sockets {
        router: owned(router.into_std())?,
        admin,
        admin_kind,
        dashboard: dashboard.map(|l| owned(l.into_std())).transpose()?,
    })
}

fn owned<T: Into<OwnedFd>>(listener: std::io::Result<T>) -> Result<OwnedFd, String> {
    listener
        .map(Into::into)
        .map_err(|e| format!("listening socket: {e}"))
}

/// A tokio listener on another descriptor of `fd`'s socket.
fn tcp_listener(fd: &OwnedFd) -> Result<tokio::net::TcpListener, String> {
    let fail = |e: std::io::Error| format!("listening socket: {e}");
    let listener = std::net::TcpListener::from(fd.try_clone().map_err(fail)?);
    listener.set_nonblocking(true).map_err(fail)?;
    tokio::net::TcpListener::from_std(listener).map_err(fail)
}

/// The admin API and the dashboard, served from descriptors of the daemon's sockets: stopped
/// at a hand-over, started again if the new process fails.
struct ControlServers {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ControlServers {
    fn start(sockets: &Sockets, controller: &Arc<Controller>) -> Result<ControlServers, String> {
        let fail = |e: std::io::Error| format!("admin socket: {e}");
        let config = controller.config();
        let admin = match sockets.admin_kind {
            AdminKind::Unix => {
                let listener = std::os::unix::net::UnixListener::from(
                    sockets.admin.try_clone().map_err(fail)?,
                );
                listener.set_nonblocking(true).map_err(fail)?;
                AdminListener::Unix(tokio::net::UnixListener::from_std(listener).map_err(fail)?)
            }
            AdminKind::Tcp => {
                let token = config
                    .router
                    .admin_token
                    .clone()
                    .ok_or("router.admin_token_file: required for a TCP admin address")?;
                AdminListener::Tcp(tcp_listener(&sockets.admin)?, Arc::new(token))
            }
        };
        let (stop, stopped) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(admin::run(
            admin,
            Arc::clone(controller),
            stopped.clone(),
        ))];
        if let (Some(fd), Some(settings)) = (&sockets.dashboard, &config.dashboard) {
            let token = admin::dashboard_token(&settings.token_file)?;
            tasks.push(tokio::spawn(admin::run_dashboard(
                tcp_listener(fd)?,
                token,
                Arc::clone(controller),
                stopped,
            )));
        }
        Ok(ControlServers { stop, tasks })
    }

    /// New connections wait in the sockets' backlogs (for the new process, at an upgrade);
    /// the open ones finish.
    fn stop_accepting(&self) {
        let _ = self.stop.send(true);
    }

    async fn stopped(self) {
        self.stop_accepting();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }
}

/// The binary upgrade, in the old process: start the new binary with the sockets, let go of
/// control once it has loaded its config, and return once it serves. If it fails at any
/// point, it is stopped and this process takes control back and goes on serving.
async fn upgrade(
    daemon: &Daemon,
    sockets: &Sockets,
    state_dir: &std::path::Path,
    servers: &mut ControlServers,
    binary: &std::path::Path,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    tracing::info!(binary = %binary.display(), "upgrade: starting the new binary");
    let given_up = |why: String| {
        format!(
            "upgrade to {} failed: {why}; this process (pid {}) goes on serving",
            binary.display(),
            std::process::id()
        )
    };
    let mut successor = handoff::start_successor(binary, sockets, state_dir, deadline)
        .await
        .map_err(given_up)?;
    // Admin calls wait in the backlog for the new process from here.
    servers.stop_accepting();
    daemon.controller.hand_over().await;
    match successor.hand_over(deadline).await {
        Ok(()) => Ok(format!(
            "upgraded: pid {} (bluegreen {}) serves and controls; pid {} drains and exits",
            successor.pid,
            successor.version,
            std::process::id()
        )),
        Err(why) => {
            let why = successor.abandon(why).await;
            daemon.controller.resume_after_failed_upgrade().await;
            let restarted = ControlServers::start(sockets, &daemon.controller);
            let previous = std::mem::replace(
                servers,
                restarted.map_err(|e| given_up(format!("{why}; and the admin API: {e}")))?,
            );
            previous.stopped().await;
            Err(given_up(why))
        }
    }
}

struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    /// SIGHUP reloads the config, as it does nginx and HAProxy; it never stops the daemon.
    hangup: tokio::signal::unix::Signal,
    /// SIGUSR2 upgrades to the binary the daemon was started from, as it does nginx.
    upgrade: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, String> {
        let listen = |kind: SignalKind| signal(kind).map_err(|e| e.to_string());
        Ok(Signals {
            terminate: listen(SignalKind::terminate())?,
            interrupt: listen(SignalKind::interrupt())?,
            hangup: listen(SignalKind::hangup())?,
            upgrade: listen(SignalKind::user_defined2())?,
        })
    }
}

/// SIGHUP: the config read again; what went wrong is logged, and the daemon keeps serving.
/// Returns the keys that need a new process, when that is all that stands in the way.
async fn reload_on_signal(controller: &Controller) -> Option<String> {
    let reloading = [sd_notify::NotifyState::Reloading];
    let stamp = sd_notify::NotifyState::monotonic_usec_now().ok();
    let _ = sd_notify::notify(false, &[reloading.as_slice(), stamp.as_slice()].concat());
    let outcome = controller.reload().await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    match outcome {
        Ok(message) => tracing::info!("{message}"),
        Err(crate::controller::reload::ReloadError::Invalid { path, issues }) => {
            tracing::error!("reload refused: {path} is invalid; the running config stays in force");
            for issue in issues {
                tracing::error!("  {issue}");
            }
        }
        Err(crate::controller::reload::ReloadError::NeedsNewProcess(keys)) => {
            return Some(keys.join(", "));
        }
        Err(e) => tracing::error!("reload refused: {e}"),
    }
    None
}

/// The router's listening socket: the one systemd passed (socket activation, `LISTEN_FDS`),
/// so that connections wait in its backlog across a restart; else `router.listen`, bound now.
async fn router_listener(config: &Config) -> Result<tokio::net::TcpListener, String> {
    let mut activation = listenfd::ListenFd::from_env();
    let passed = activation.take_tcp_listener(0).map_err(|e| {
        format!("the socket systemd passed (LISTEN_FDS) is not a TCP listener: {e}")
    })?;
    if let Some(listener) = passed {
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("the socket systemd passed: {e}"))?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("the socket systemd passed: {e}"))?;
        tracing::info!(addr = ?listener.local_addr().ok(), "serving on the socket systemd passed (router.listen is not bound)");
        return Ok(listener);
    }
    tokio::net::TcpListener::bind(config.router.listen)
        .await
        .map_err(|e| format!("router.listen: cannot bind {}: {e}", config.router.listen))
}

/// The dashboard's listener, when the dashboard is enabled.
async fn bind_dashboard(config: &Config) -> Result<Option<tokio::net::TcpListener>, String> {
    let Some(settings) = &config.dashboard else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|e| {
            format!(
                "dashboard.listen: cannot bind {}: {e}; choose another address, or set dashboard.enabled: false",
                settings.listen
            )
        })?;
    // An unreadable token file stops the start here, before anything serves.
    admin::dashboard_token(&settings.token_file)?;
    Ok(Some(listener))
}

/// The line `up` prints once it serves: where, each color's health, the split, the admin
/// endpoint and the dashboard.
async fn announce(daemon: &Daemon, listen: std::net::SocketAddr, admin_endpoint: &AdminEndpoint) {
    let status = daemon.controller.status().await;
    let health: Vec<String> = status
        .router
        .colors
        .iter()
        .map(|c| {
            format!(
                "{} {}/{} healthy",
                c.color,
                c.healthy_upstreams,
                c.upstreams.len()
            )
        })
        .collect();
    println!(
        "bluegreen: {} routing on {}://{listen} ({}); live: {}; admin: {admin_endpoint}{}",
        daemon.controller.config().service,
        if daemon.controller.config().router.tls.is_some() {
            "https"
        } else {
            "http"
        },
        health.join(", "),
        status.weights_text(),
        match &status.dashboard {
            Some(url) =>
                format!("; dashboard: {url} (`bluegreen dashboard` prints it with its token)"),
            None => String::new(),
        }
    );
}

/// Lets the router finish in-flight requests and connections, showing what is left.
async fn drain(cli: &Cli, daemon: &Daemon) {
    let progress = release::spinner(cli, "draining".into());
    let watch_drain = async {
        loop {
            let status = daemon.router.status();
            let in_flight: u64 = status.colors.iter().map(|c| c.metrics.open).sum();
            progress.set_message(format!(
                "draining: {in_flight} request(s) and {} connection(s) still open",
                status.connections_open
            ));
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = daemon.router.shutdown() => {}
        _ = watch_drain => {}
    }
    progress.finish_and_clear();
}
