//! The control plane: environments and their providers, deploys, tests, releases, analysis and cleanup.

pub mod analysis;
pub mod checks;
pub mod hooks;
pub mod process;
pub mod release;
pub mod strategy;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluegreen_router::{Color, ColorSnapshot};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::controller::{EnvironmentSpec, HookPoint, ProviderKind};
use crate::daemon::{CommandError, Daemon};
use crate::store::{EnvironmentRecord, EnvironmentStatus, InstanceRecord, now_ms};
use analysis::{History, WindowStats};
use hooks::Facts;
use process::{InstanceEvent, Launch, Supervisor};
use release::{Control, Release};

/// How many one-second samples of the router's counters are kept (ten minutes).
const HISTORY_SECONDS: usize = 600;

/// The controller's live parts, owned by the daemon.
pub struct Controller {
    environments: Mutex<[EnvironmentRecord; 2]>,
    pub(crate) supervisor: Supervisor,
    supervisor_events: Mutex<Option<mpsc::UnboundedReceiver<InstanceEvent>>>,
    /// The release in progress, and the channel its runner listens to.
    active: Mutex<Option<(Release, watch::Sender<Control>)>>,
    history: Mutex<History>,
    /// Events as they are stored, for `/v1/stream` watchers; `published` is the last one sent.
    live: tokio::sync::broadcast::Sender<crate::store::Event>,
    published: Mutex<i64>,
    /// Deploys, releases and redeploying rollbacks change environments one at a time.
    pub(crate) exclusive: tokio::sync::Mutex<()>,
    pub logs_dir: PathBuf,
}

impl Controller {
    pub fn new(
        environments: [EnvironmentRecord; 2],
        logs_dir: PathBuf,
        last_event: i64,
    ) -> Controller {
        let (events, receiver) = mpsc::unbounded_channel();
        Controller {
            environments: Mutex::new(environments),
            supervisor: Supervisor::new(events),
            supervisor_events: Mutex::new(Some(receiver)),
            active: Mutex::new(None),
            history: Mutex::new(History::new(HISTORY_SECONDS)),
            live: tokio::sync::broadcast::channel(1024).0,
            published: Mutex::new(last_event),
            exclusive: tokio::sync::Mutex::new(()),
            logs_dir,
        }
    }
}

/// One color as `bluegreen status` and `diff` show it: the record and the effective spec.
#[derive(Serialize)]
pub struct EnvironmentView {
    #[serde(flatten)]
    pub record: EnvironmentRecord,
    pub spec: EnvironmentSpec,
}

/// One way two colors differ: a key and each side's value.
#[derive(Serialize)]
pub struct Difference {
    pub key: String,
    pub values: [serde_json::Value; 2],
}

/// The numbers `bluegreen monitor` prints: each color over the last window, and the release.
#[derive(Serialize)]
pub struct MonitorView {
    pub window_seconds: f64,
    pub colors: Vec<MonitorColor>,
    pub release: Option<Release>,
}

#[derive(Serialize)]
pub struct MonitorColor {
    pub color: Color,
    pub version: Option<String>,
    pub weight: u8,
    pub healthy_upstreams: usize,
    pub upstreams: usize,
    /// Each upstream and its health (`healthy`, `unhealthy`, `unknown`).
    pub upstream_health: Vec<(SocketAddr, bluegreen_router::Health)>,
    pub window: WindowStats,
    /// Requests per second, one per second, oldest first.
    pub rps_history: Vec<f64>,
}

impl Daemon {
    fn spec(&self, color: Color) -> &EnvironmentSpec {
        self.config.controller.environment(color)
    }

    pub fn environment(&self, color: Color) -> EnvironmentRecord {
        self.controller.environments.lock().expect("lock")[color.index()].clone()
    }

    pub fn environments(&self) -> Vec<EnvironmentView> {
        Color::ALL
            .into_iter()
            .map(|color| EnvironmentView {
                record: self.environment(color),
                spec: self.spec(color).clone(),
            })
            .collect()
    }

    /// How two colors differ: what they run, and their effective specs (per-color overrides).
    pub fn diff(&self, a: Color, b: Color) -> Vec<Difference> {
        let view = |color: Color| {
            serde_json::to_value(EnvironmentView {
                record: self.environment(color),
                spec: self.spec(color).clone(),
            })
            .expect("views serialize")
        };
        let (left, right) = (view(a), view(b));
        let mut differences = Vec::new();
        let mut compare = |key: String, l: &serde_json::Value, r: &serde_json::Value| {
            if l != r {
                differences.push(Difference {
                    key,
                    values: [l.clone(), r.clone()],
                });
            }
        };
        for key in ["version", "status", "extra_env"] {
            compare(key.to_string(), &left[key], &right[key]);
        }
        for key in [
            "provider",
            "instances",
            "command",
            "env",
            "deploy",
            "stop",
            "ready_timeout",
            "stop_timeout",
        ] {
            compare(
                format!("spec.{key}"),
                &left["spec"][key],
                &right["spec"][key],
            );
        }
        // The process provider picks ports per deploy: only fixed upstreams are a difference.
        if self.spec(a).provider == ProviderKind::Static {
            compare(
                "spec.upstreams".into(),
                &left["spec"]["upstreams"].as_array().map(|u| u.len()).into(),
                &right["spec"]["upstreams"]
                    .as_array()
                    .map(|u| u.len())
                    .into(),
            );
        }
        differences
    }

    /// Changes a color's record and saves it (with the event `change` returns) before anything
    /// acts on it. Read, change and write happen under one lock: instance events and deploys
    /// update the same record concurrently.
    pub(crate) fn update_environment(
        &self,
        color: Color,
        release: Option<i64>,
        change: impl FnOnce(&mut EnvironmentRecord) -> Option<(&'static str, String)>,
    ) -> Result<EnvironmentRecord, CommandError> {
        let mut all = self.controller.environments.lock().expect("lock");
        let mut record = all[color.index()].clone();
        let event = change(&mut record);
        let stored = event
            .as_ref()
            .map(|(kind, message)| (*kind, message.as_str(), release));
        crate::daemon::off_the_runtime(|| self.store.save_environment(&record, stored))
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        all[color.index()] = record.clone();
        drop(all);
        if let Some((kind, message)) = &event {
            tracing::info!(kind, "{message}");
            self.notify(kind, message, release);
        }
        Ok(record)
    }

    pub(crate) fn event(&self, kind: &str, message: &str, release: Option<i64>) {
        tracing::info!(kind, "{message}");
        if let Err(e) = crate::daemon::off_the_runtime(|| self.store.event(kind, message, release))
        {
            tracing::error!(error = %e, "cannot record event");
        }
        self.notify(kind, message, release);
    }

    /// After an event is stored: live watchers (`/v1/stream`) and the webhook hear of it.
    pub(crate) fn notify(&self, kind: &str, message: &str, release: Option<i64>) {
        self.publish_events();
        if let Some(webhook) = &self.config.controller.webhook {
            hooks::notify(
                webhook,
                serde_json::json!({
                    "service": self.config.service,
                    "kind": kind,
                    "message": message,
                    "release_id": release,
                    "at_ms": now_ms(),
                }),
            );
        }
    }

    /// Sends events stored since the last call to the live watchers, in order.
    fn publish_events(&self) {
        let mut last = self.controller.published.lock().expect("lock");
        match crate::daemon::off_the_runtime(|| self.store.events_after(*last, 1000)) {
            Ok(events) => {
                for event in events {
                    *last = event.id;
                    let _ = self.controller.live.send(event);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read new events"),
        }
    }

    /// Subscribes to events as they are stored.
    pub fn watch_events(&self) -> tokio::sync::broadcast::Receiver<crate::store::Event> {
        self.controller.live.subscribe()
    }

    /// One picture of the daemon for live views: both colors with their recent numbers, the
    /// live color, the release in progress.
    pub async fn snapshot(&self) -> serde_json::Value {
        let split = self.router.table().split;
        serde_json::json!({
            "service": self.config.service,
            "at_ms": now_ms(),
            "live": split.sole_color(),
            "weights": crate::daemon::Weights::from(split),
            "rollback_to": self.rollback_target().await,
            "environments": Color::ALL.map(|c| self.environment(c)),
            "monitor": self.monitor(10),
        })
    }

    /// The facts hooks and test commands receive.
    pub(crate) fn facts(&self, color: Color, release: Option<&Release>) -> Facts {
        let env = self.environment(color);
        let from = color.other();
        Facts {
            service: self.config.service.clone(),
            release_id: release.map(|r| r.id),
            version: release.and_then(|r| r.version.clone()).or(env.version),
            color: Some(color.to_string()),
            from_color: Some(from.to_string()),
            from_version: release
                .and_then(|r| r.from_version.clone())
                .or(self.environment(from).version),
            router_url: format!(
                "{}://{}",
                if self.config.router.tls.is_some() {
                    "https"
                } else {
                    "http"
                },
                loopback_of(self.listen)
            ),
            preview_header: self
                .config
                .router
                .preview
                .as_ref()
                .map(|p| p.header.to_string()),
            preview_secret: self.config.router.preview.as_ref().and_then(|p| {
                p.secret
                    .as_ref()
                    .map(|secret| format!("{}: {secret}", p.secret_header))
            }),
            reason: None,
        }
    }

    /// Runs a hook if the config has one for `point`.
    pub(crate) async fn hook(
        &self,
        point: HookPoint,
        facts: &Facts,
        release: Option<i64>,
    ) -> Result<(), String> {
        let Some(argv) = self.config.controller.hooks.commands.get(&point) else {
            return Ok(());
        };
        let log = self.controller.logs_dir.join("hooks.log");
        let _ = std::fs::create_dir_all(&self.controller.logs_dir);
        let outcome = hooks::run(
            point.as_str(),
            argv,
            facts,
            &[],
            self.config.controller.hooks.timeout,
            &log,
        )
        .await;
        match &outcome {
            Ok(_) => self.event("hook", &format!("{} hook passed", point.as_str()), release),
            Err(e) => self.event(
                "hook",
                &format!("{} hook failed: {e}", point.as_str()),
                release,
            ),
        }
        outcome.map(|_| ())
    }

    /// Starts the controller's background work: recording instance events, sampling the
    /// router's counters, bringing back instances and timers after a restart, and settling a
    /// release a previous daemon left unfinished.
    pub async fn start_controller(self: &Arc<Self>) {
        let events = self
            .controller
            .supervisor_events
            .lock()
            .expect("lock")
            .take();
        if let Some(mut events) = events {
            let daemon = Arc::clone(self);
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    daemon.instance_event(event);
                }
            });
        }
        let daemon = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(daemon) = daemon.upgrade() else {
                    break;
                };
                let snapshots = daemon.snapshots();
                daemon
                    .controller
                    .history
                    .lock()
                    .expect("lock")
                    .push(Instant::now(), snapshots);
            }
        });
        self.recover().await;
    }

    /// Both colors' cumulative counters now.
    pub(crate) fn snapshots(&self) -> [ColorSnapshot; 2] {
        let status = self.router.status();
        Color::ALL.map(|color| {
            status
                .colors
                .iter()
                .find(|c| c.color == color)
                .map(|c| c.metrics.clone())
                .expect("the router reports both colors")
        })
    }

    /// The counters as they were at `since` (or the oldest kept sample).
    pub(crate) fn snapshots_since(&self, since: Instant) -> Option<(Instant, [ColorSnapshot; 2])> {
        self.controller
            .history
            .lock()
            .expect("lock")
            .at_or_after(since)
            .cloned()
    }

    fn instance_event(&self, event: InstanceEvent) {
        let current = |color: Color, generation: u64| {
            self.controller.supervisor.generation(color) == Some(generation)
        };
        match event {
            InstanceEvent::Started {
                color,
                generation,
                slot,
                pid,
                port,
            } if current(color, generation) => {
                let saved = self.update_environment(color, None, |record| {
                    if let Some(instance) = record.instances.get_mut(slot) {
                        instance.pid = Some(pid);
                        instance.port = port;
                    }
                    None
                });
                if let Err(e) = saved {
                    tracing::error!(error = %e, "cannot record instance");
                }
            }
            InstanceEvent::Exited {
                color,
                generation,
                slot,
                port,
                status,
                restart_in,
            } if current(color, generation) => {
                let saved = self.update_environment(color, None, |record| {
                    if let Some(instance) = record.instances.get_mut(slot) {
                        instance.restarts += 1;
                        instance.pid = None;
                    }
                    Some((
                        "instance",
                        format!(
                            "{color} instance {slot} (port {port}) {status}; restarting in {}ms",
                            restart_in.as_millis()
                        ),
                    ))
                });
                if let Err(e) = saved {
                    tracing::error!(error = %e, "cannot record instance exit");
                }
            }
            InstanceEvent::CrashLoop {
                color,
                generation,
                reason,
            } if current(color, generation) => {
                let saved = self.update_environment(color, None, |record| {
                    record.status = EnvironmentStatus::Failed;
                    record.reason = Some(reason.clone());
                    Some(("failed", format!("{color} failed: {reason}")))
                });
                if let Err(e) = saved {
                    tracing::error!(error = %e, "cannot record crash loop");
                }
            }
            _ => {}
        }
    }

    fn launch(&self, color: Color, record: &EnvironmentRecord) -> Launch {
        let spec = self.spec(color);
        let mut env = spec.env.clone();
        env.extend(record.extra_env.clone());
        Launch {
            color,
            version: record.version.clone().unwrap_or_default(),
            argv: spec.command.clone(),
            env,
            stop_timeout: spec.stop_timeout,
            logs_dir: self.controller.logs_dir.clone(),
        }
    }

    /// After a restart: instances recorded as running are adopted (or started again on their
    /// ports), scale-down timers are re-armed, and an unfinished release is settled by the rule
    /// in docs/lifecycle.md.
    async fn recover(self: &Arc<Self>) {
        for color in Color::ALL {
            let record = self.environment(color);
            let runs = matches!(
                record.status,
                EnvironmentStatus::Running | EnvironmentStatus::Deploying
            );
            if self.spec(color).provider == ProviderKind::Process
                && runs
                && !record.instances.is_empty()
            {
                let adopted = record.instances.iter().filter(|i| i.pid.is_some()).count();
                match self
                    .controller
                    .supervisor
                    .start(self.launch(color, &record), record.instances.clone())
                {
                    Ok(_) => self.event(
                        "recover",
                        &format!(
                            "{color} {}: {} instance(s) brought back ({adopted} recorded as running are adopted if still alive)",
                            record.version.as_deref().unwrap_or("?"),
                            record.instances.len()
                        ),
                        None,
                    ),
                    Err(e) => tracing::error!(%color, error = %e, "cannot restart instances"),
                }
            }
            if let Some(at_ms) = record.scale_down_at_ms {
                self.schedule_scale_down(color, at_ms);
            }
        }
        self.settle_interrupted_release().await;
        for color in Color::ALL {
            if self.environment(color).status != EnvironmentStatus::Deploying {
                continue;
            }
            // A deploy the previous daemon did not finish: never proven healthy, so stopped.
            self.controller.supervisor.stop(color).await;
            let saved = self.update_environment(color, None, |record| {
                record.instances.iter_mut().for_each(|i| i.pid = None);
                record.status = EnvironmentStatus::Failed;
                record.reason = Some("the deploy was interrupted by a daemon restart".into());
                Some((
                    "recover",
                    format!(
                        "{color} {}: the deploy was interrupted by a daemon restart; its instances were stopped",
                        record.version.as_deref().unwrap_or("")
                    ),
                ))
            });
            if let Err(e) = saved {
                tracing::error!(error = %e, "cannot record the interrupted deploy");
            }
        }
    }

    /// Deploys `version` to the idle `color` and waits until all its instances are healthy.
    /// Refused for a color that takes traffic. On failure the color is left stopped or failed
    /// and the live color is untouched.
    pub async fn deploy(
        &self,
        color: Color,
        version: &str,
        extra_env: BTreeMap<String, String>,
        release: Option<i64>,
    ) -> Result<String, CommandError> {
        if version.trim().is_empty() {
            return Err(CommandError::Refused(
                "version is empty; give the version to deploy, e.g. --version 2.0".into(),
            ));
        }
        let table = self.router.table();
        let weight = table.split.weight(color);
        // A live color with nothing running serves no one: its first deploy is allowed.
        let bootstrap = self.environment(color).status != EnvironmentStatus::Running
            && table.pool(color).healthy_count() == 0;
        drop(table);
        if weight > 0 && !bootstrap {
            return Err(CommandError::Refused(format!(
                "{color} takes {weight}% of traffic; deploy to the idle color {} (or switch away from {color} first)",
                color.other()
            )));
        }
        let spec = self.spec(color).clone();
        let started = Instant::now();
        let mut record = self.update_environment(color, release, |record| {
            record.version = Some(version.to_string());
            record.status = EnvironmentStatus::Deploying;
            record.extra_env = extra_env;
            record.reason = None;
            record.scale_down_at_ms = None;
            record.deployed_at_ms = Some(now_ms());
            Some((
                "deploy",
                format!(
                    "deploying {version} to {color} ({} instance(s), {} provider)",
                    spec.instances,
                    provider_name(spec.provider)
                ),
            ))
        })?;
        let outcome = match spec.provider {
            ProviderKind::Process => self.deploy_processes(color, &mut record).await,
            ProviderKind::Command => self.deploy_by_command(color, &mut record, release).await,
            ProviderKind::Static => {
                // The router's upstreams: the config's, or those set with `bluegreen upstreams`.
                let pool = Arc::clone(self.router.table().pool(color));
                record.upstreams = pool.upstreams.iter().map(|u| u.addr).collect();
                self.wait_healthy(color, pool.upstreams.len(), spec.ready_timeout)
                    .await
            }
        };
        let upstreams = record.upstreams;
        match outcome {
            Ok(()) => {
                let message = format!(
                    "{color} runs {version}: {} healthy upstream(s) in {:.1}s",
                    self.router.table().pool(color).healthy_count(),
                    started.elapsed().as_secs_f64()
                );
                self.update_environment(color, release, |record| {
                    record.upstreams = upstreams;
                    record.status = EnvironmentStatus::Running;
                    Some(("deployed", message.clone()))
                })?;
                Ok(message)
            }
            Err(reason) => {
                if spec.provider == ProviderKind::Process {
                    self.controller.supervisor.stop(color).await;
                }
                let message = format!("deploying {version} to {color} failed: {reason}");
                self.update_environment(color, release, |record| {
                    record.upstreams = upstreams;
                    record.instances.iter_mut().for_each(|i| i.pid = None);
                    record.status = EnvironmentStatus::Failed;
                    record.reason = Some(reason);
                    Some(("deploy-failed", message.clone()))
                })?;
                Err(CommandError::Failed(message))
            }
        }
    }

    async fn deploy_processes(
        &self,
        color: Color,
        record: &mut EnvironmentRecord,
    ) -> Result<(), String> {
        let spec = self.spec(color);
        self.controller.supervisor.stop(color).await;
        let mut instances = Vec::new();
        for _ in 0..spec.instances {
            let port = process::free_port().map_err(|e| format!("no free port: {e}"))?;
            instances.push(InstanceRecord {
                port,
                pid: None,
                restarts: 0,
            });
        }
        let addrs: Vec<SocketAddr> = instances
            .iter()
            .map(|i| SocketAddr::from(([127, 0, 0, 1], i.port)))
            .collect();
        record.instances = instances.clone();
        record.upstreams = addrs.clone();
        self.update_environment(color, None, |saved| {
            saved.instances = instances.clone();
            saved.upstreams = addrs.clone();
            None
        })
        .map_err(|e| e.to_string())?;
        self.controller
            .supervisor
            .start(self.launch(color, record), instances)
            .map_err(|e| format!("cannot start instances: {e}"))?;
        self.set_upstreams(color, addrs)
            .await
            .map_err(|e| e.to_string())?;
        self.wait_healthy(color, spec.instances as usize, spec.ready_timeout)
            .await
    }

    async fn deploy_by_command(
        &self,
        color: Color,
        record: &mut EnvironmentRecord,
        release: Option<i64>,
    ) -> Result<(), String> {
        let spec = self.spec(color);
        let argv = spec.deploy.as_ref().ok_or("no deploy script configured")?;
        let _ = std::fs::create_dir_all(&self.controller.logs_dir);
        let mut facts = self.facts(color, None);
        facts.version = record.version.clone();
        facts.release_id = release;
        let mut env: Vec<(String, String)> = spec.env.clone().into_iter().collect();
        env.extend(record.extra_env.clone());
        env.push(("BLUEGREEN_INSTANCES".into(), spec.instances.to_string()));
        let stdout = hooks::run(
            "deploy",
            argv,
            &facts,
            &env,
            spec.ready_timeout,
            &self.controller.logs_dir.join(format!("{color}-deploy.log")),
        )
        .await?;
        let mut addrs = Vec::new();
        for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let addr = crate::config::parse_socket_addr(line).map_err(|e| {
                format!("the deploy script printed {line:?}, not an upstream address: {e}")
            })?;
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(
                "the deploy script printed no upstream address (one host:port per line on stdout)"
                    .into(),
            );
        }
        record.upstreams = addrs.clone();
        self.set_upstreams(color, addrs.clone())
            .await
            .map_err(|e| e.to_string())?;
        self.wait_healthy(color, addrs.len(), spec.ready_timeout)
            .await
    }

    /// Waits until `wanted` upstreams of `color` pass their health checks, or the color's
    /// instances crash-loop, or the time is up.
    async fn wait_healthy(
        &self,
        color: Color,
        wanted: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let pool = Arc::clone(self.router.table().pool(color));
            let healthy = pool.healthy_count();
            if healthy >= wanted.max(1) {
                return Ok(());
            }
            let record = self.environment(color);
            if record.status == EnvironmentStatus::Failed {
                return Err(record.reason.unwrap_or_else(|| "instances failed".into()));
            }
            if Instant::now() >= deadline {
                let errors: Vec<String> = pool
                    .upstreams
                    .iter()
                    .filter_map(|u| u.last_error().map(|e| format!("{}: {e}", u.addr)))
                    .collect();
                return Err(format!(
                    "{healthy} of {wanted} upstream(s) healthy after {}s{}; see `bluegreen logs --environment {color}`",
                    timeout.as_secs(),
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" (last errors: {})", errors.join("; "))
                    }
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops a color that takes no traffic. Its version stays recorded, so a rollback to it
    /// can deploy it again.
    pub async fn stop_environment(&self, color: Color, why: &str) -> Result<(), CommandError> {
        if self.router.table().split.weight(color) > 0 {
            return Err(CommandError::Refused(format!(
                "{color} takes traffic; it cannot be stopped"
            )));
        }
        let spec = self.spec(color).clone();
        match spec.provider {
            ProviderKind::Process => self.controller.supervisor.stop(color).await,
            ProviderKind::Command => {
                if let Some(argv) = &spec.stop {
                    let facts = self.facts(color, None);
                    if let Err(e) = hooks::run(
                        "stop",
                        argv,
                        &facts,
                        &[],
                        spec.stop_timeout.max(Duration::from_secs(30)),
                        &self.controller.logs_dir.join(format!("{color}-deploy.log")),
                    )
                    .await
                    {
                        self.event("stop-failed", &e, None);
                    }
                }
            }
            ProviderKind::Static => {}
        }
        self.update_environment(color, None, |record| {
            record.instances.iter_mut().for_each(|i| i.pid = None);
            record.status = EnvironmentStatus::Stopped;
            record.scale_down_at_ms = None;
            Some((
                "stopped",
                format!(
                    "{color} {} stopped: {why}",
                    record.version.as_deref().unwrap_or("")
                ),
            ))
        })
        .map(|_| ())
    }

    /// Arms the timer that stops a warm old color at `at_ms`, unless it takes traffic again or
    /// is redeployed by then.
    pub(crate) fn schedule_scale_down(self: &Arc<Self>, color: Color, at_ms: i64) {
        let daemon = Arc::downgrade(self);
        tokio::spawn(async move {
            let wait = (at_ms - now_ms()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let Some(daemon) = daemon.upgrade() else {
                return;
            };
            let _exclusive = daemon.controller.exclusive.lock().await;
            let record = daemon.environment(color);
            if record.scale_down_at_ms != Some(at_ms) {
                return; // redeployed or rescheduled since
            }
            if daemon.router.table().split.weight(color) > 0 {
                let _ = daemon.update_environment(color, None, |record| {
                    record.scale_down_at_ms = None;
                    Some((
                        "cleanup",
                        format!("{color} takes traffic again; not stopped"),
                    ))
                });
                return;
            }
            daemon.clean_up(color).await;
        });
    }

    /// The cleanup stage proper: the `cleanup` hook, stopping the old color, `migrate_contract`.
    pub(crate) async fn clean_up(&self, color: Color) {
        let facts = self.facts(color.other(), None);
        if let Err(e) = self.hook(HookPoint::Cleanup, &facts, None).await {
            tracing::warn!(error = %e, "cleanup hook failed; stopping anyway");
        }
        if let Err(e) = self
            .stop_environment(color, "scale_down_delay passed after the release")
            .await
        {
            self.event("cleanup", &format!("cleanup of {color} failed: {e}"), None);
            return;
        }
        if let Err(e) = self.hook(HookPoint::MigrateContract, &facts, None).await {
            tracing::warn!(error = %e, "migrate_contract hook failed");
        }
    }

    /// Runs the configured smoke tests against `color` through the preview route.
    pub async fn test_environment(
        &self,
        color: Color,
        release: Option<&Release>,
    ) -> Result<Vec<checks::CheckResult>, CommandError> {
        let test = &self.config.controller.test;
        let Some(preview) = &self.config.router.preview else {
            return Err(CommandError::Refused(
                "router.preview is disabled; tests reach the idle color through it. Enable router.preview".into(),
            ));
        };
        if self.config.router.tls.is_some() && !test.checks.is_empty() {
            return Err(CommandError::Refused(
                "test.checks over a TLS router.listen are not supported yet; use test.command"
                    .into(),
            ));
        }
        if self.router.table().pool(color).healthy_count() == 0 {
            let record = self.environment(color);
            return Err(CommandError::Refused(match record.status {
                EnvironmentStatus::Stopped => format!(
                    "{color} is not deployed; run `bluegreen deploy --environment {color} --version V` first"
                ),
                _ => format!("{color} has no healthy upstream; see `bluegreen status`"),
            }));
        }
        let route = checks::PreviewRoute {
            router: loopback_of(self.listen),
            header: preview.header.clone(),
            secret: preview
                .secret
                .as_ref()
                .map(|s| (preview.secret_header.clone(), s.clone())),
        };
        let version = self.environment(color).version;
        let mut results = checks::run(
            &route,
            color,
            version.as_deref(),
            &test.checks,
            test.timeout,
        )
        .await;
        if let Some(argv) = &test.command {
            let facts = self.facts(color, release);
            let started = Instant::now();
            let outcome = hooks::run(
                "test",
                argv,
                &facts,
                &[],
                test.timeout,
                &self.controller.logs_dir.join("tests.log"),
            )
            .await;
            results.push(checks::CheckResult {
                name: argv.join(" "),
                passed: outcome.is_ok(),
                detail: match outcome {
                    Ok(_) => "exited 0".into(),
                    Err(e) => e,
                },
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            });
        }
        if results.is_empty() {
            results.push(checks::CheckResult {
                name: "health".into(),
                passed: true,
                detail:
                    "no test.checks or test.command configured; only health checks vouch for it"
                        .into(),
                latency_ms: 0.0,
            });
        }
        let failed = results.iter().filter(|r| !r.passed).count();
        let message = format!(
            "tests of {color}: {} passed, {failed} failed{}",
            results.len() - failed,
            results
                .iter()
                .filter(|r| !r.passed)
                .map(|r| format!("; {}: {}", r.name, r.detail))
                .collect::<String>()
        );
        self.event("test", &message, release.map(|r| r.id));
        Ok(results)
    }

    /// Numbers for `bluegreen monitor`: the last `seconds` of each color and the release.
    pub fn monitor(&self, seconds: u64) -> MonitorView {
        let now = Instant::now();
        let current = self.snapshots();
        let table = self.router.table();
        let (from_at, from) = self
            .snapshots_since(now - Duration::from_secs(seconds))
            .unwrap_or((now, current.clone()));
        let elapsed = now.duration_since(from_at);
        let history = self.controller.history.lock().expect("lock");
        let colors = Color::ALL
            .into_iter()
            .map(|color| {
                let pool = table.pool(color);
                MonitorColor {
                    color,
                    version: self.environment(color).version,
                    weight: table.split.weight(color),
                    healthy_upstreams: pool.healthy_count(),
                    upstreams: pool.upstreams.len(),
                    upstream_health: pool
                        .upstreams
                        .iter()
                        .map(|u| (u.addr, u.health()))
                        .collect(),
                    window: WindowStats::between(
                        &from[color.index()],
                        &current[color.index()],
                        elapsed,
                    ),
                    rps_history: history
                        .series(color, 60)
                        .iter()
                        .map(|w| w.requests_per_second)
                        .collect(),
                }
            })
            .collect();
        MonitorView {
            window_seconds: elapsed.as_secs_f64(),
            colors,
            release: self.active_release(),
        }
    }

    /// The newest log lines of a color's instances (or of the hooks, for `hooks`).
    pub fn logs(
        &self,
        name: &str,
        lines: usize,
    ) -> Result<Vec<(String, Vec<String>)>, CommandError> {
        let dir = &self.controller.logs_dir;
        let files: Vec<PathBuf> = match name.parse::<Color>() {
            Ok(color) => {
                let count = self.environment(color).instances.len().max(1);
                let mut files: Vec<PathBuf> = (0..count)
                    .map(|slot| Launch::log_path(dir, color, slot))
                    .collect();
                files.push(dir.join(format!("{color}-deploy.log")));
                files
            }
            Err(_) if name == "hooks" || name == "tests" => vec![dir.join(format!("{name}.log"))],
            Err(_) => {
                return Err(CommandError::Refused(format!(
                    "unknown log {name:?}; use blue, green, hooks or tests"
                )));
            }
        };
        Ok(files
            .into_iter()
            .filter(|f| f.exists())
            .map(|file| {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..]
                    .iter()
                    .map(|l| l.to_string())
                    .collect();
                (file.display().to_string(), tail)
            })
            .collect())
    }

    pub async fn shutdown_controller(&self) {
        self.controller.supervisor.stop_all().await;
    }
}

/// Where to send our own requests to the router: a wildcard listen address means loopback.
fn loopback_of(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}

pub fn provider_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Process => "process",
        ProviderKind::Static => "static",
        ProviderKind::Command => "command",
    }
}
