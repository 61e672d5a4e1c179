//! The control plane: environments and their providers, deploys, tests, releases, analysis and cleanup.

pub mod analysis;
pub mod checks;
mod deploy;
pub mod hooks;
pub mod process;
pub mod release;
pub mod strategy;
mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bluegreen_router::{Color, ColorSnapshot};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::config::controller::{EnvironmentSpec, HookPoint, ProviderKind};
use crate::daemon::{CommandError, Daemon};
use crate::store::{EnvironmentRecord, EnvironmentStatus, now_ms};
use analysis::History;
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

    pub async fn shutdown_controller(&self) {
        self.controller.supervisor.stop_all().await;
    }
}

/// Where to send our own requests to the router: a wildcard listen address means loopback.
pub(crate) fn loopback_of(listen: SocketAddr) -> SocketAddr {
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
