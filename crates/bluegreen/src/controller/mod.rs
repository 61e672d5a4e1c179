//! The control plane: environments and their providers, deploys, tests, releases, analysis and cleanup.

pub mod analysis;
pub mod checks;
pub mod command;
pub mod decide;
mod deploy;
pub mod event;
pub mod fleet;
pub mod hooks;
mod hosts;
pub mod logs;
pub mod provider;
pub mod release;
pub mod release_record;
pub mod reload;
pub mod traffic;
pub mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bluegreen_router::{Color, ColorSnapshot};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::config::controller::{EnvironmentSpec, HookPoint, ProviderKind};
use crate::dataplane::DataPlane;
use crate::store::{
    EnvironmentRecord, EnvironmentStatus, Key, ProviderState, RouterState, StateStore, Versioned,
    Write, now_ms,
};
use analysis::History;
pub use command::{Command, CommandError};
pub use event::{EventKind, Gate};
use hooks::Facts;
use provider::command::CommandProvider;
use provider::docker::DockerProvider;
use provider::process::ProcessProvider;
use provider::static_upstreams::StaticProvider;
use provider::{InstanceEvent, Provider};
use release::{Control, Release};
pub use traffic::Weights;

/// How many one-second samples of the router's counters are kept (ten minutes).
const HISTORY_SECONDS: usize = 600;

/// Where the daemon can be reached, for `bluegreen status`, and where its config lives.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub listen: SocketAddr,
    pub dashboard: Option<SocketAddr>,
    /// The config file `reload` reads again (none: built in a test from text).
    pub config: Option<PathBuf>,
}

/// The control plane: owns the state store, the providers' supervisor and the data plane,
/// and turns operators' commands into recorded changes and then into effects.
pub struct Controller {
    /// The config in force: swapped whole by a reload, read whole by each use.
    config: ArcSwap<Config>,
    /// Where the config was read from, for `reload`.
    config_path: Option<PathBuf>,
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) plane: Arc<dyn DataPlane>,
    pub endpoints: Endpoints,
    /// The recorded split, and the revision it was read at. Changes hold this lock while
    /// they decide and record (never the router's: it swaps its own table).
    pub(crate) state: tokio::sync::Mutex<Versioned<RouterState>>,
    /// Both colors' records as last stored, for readers that must not wait for a write.
    environments: Mutex<[Versioned<EnvironmentRecord>; 2]>,
    /// Writers of environment records take turns here (read, change, record, publish).
    environment_writes: tokio::sync::Mutex<()>,
    /// Each color's provider (both colors share one instance of a kind).
    providers: [Arc<dyn Provider>; 2],
    /// The release in progress, and the channel its runner listens to.
    active: Mutex<Option<(Release, watch::Sender<Control>)>>,
    history: Mutex<History>,
    /// Events as they are stored, for `/v1/stream` watchers; `published` is the last one sent.
    live: tokio::sync::broadcast::Sender<crate::store::Event>,
    published: tokio::sync::Mutex<i64>,
    /// Deploys, releases and redeploying rollbacks change environments one at a time.
    pub(crate) exclusive: tokio::sync::Mutex<()>,
    /// Releases being started take turns, so two asks never both start one.
    starting: tokio::sync::Mutex<()>,
    /// The task running the release in progress, stopped without a write at a hand-over.
    runner: Mutex<Option<tokio::task::AbortHandle>>,
    /// Set while a binary upgrade's successor has control: this process changes nothing.
    handed_over: std::sync::atomic::AtomicBool,
    /// Where `POST /v1/upgrade` asks the daemon process (`bluegreen up`) for an upgrade.
    pub upgrades: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::handoff::UpgradeAsk>>,
    pub logs_dir: PathBuf,
    /// The fleet this router belongs to (a store shared by many hosts); none on one machine.
    pub(crate) fleet: std::sync::OnceLock<Arc<dyn crate::fleet::Fleet>>,
    /// The revision of the router state this router serves.
    pub(crate) applied: std::sync::atomic::AtomicI64,
    pub(crate) standing: Mutex<fleet::FleetStanding>,
    /// Wakes the fleet reporter at once (a change applied, the store lost or found).
    pub(crate) reported: Arc<tokio::sync::Notify>,
    /// In a fleet: this router holds the leadership (drives releases, takes changes).
    pub(crate) leading: std::sync::atomic::AtomicBool,
    /// Tells the fleet follower to watch the store anew (on a new connection).
    pub(crate) resubscribe: Arc<tokio::sync::Notify>,
    /// The revisions of the newest router states this daemon has seen (recorded or applied),
    /// oldest first: a router's lag is how many of them it has not applied.
    pub(crate) router_states: Mutex<std::collections::VecDeque<crate::store::Revision>>,
    /// Every router's last report seen, so one whose report went away is listed as lost.
    pub(crate) seen_routers: Mutex<std::collections::BTreeMap<String, crate::fleet::RouterReport>>,
    /// In a fleet that deploys per host: this host's records of its own instances.
    hosted: Mutex<[crate::fleet::HostEnvironment; 2]>,
    /// Writers of this host's records take turns here.
    host_writes: tokio::sync::Mutex<()>,
    /// A host record the fleet could not take, to be saved again.
    host_unsaved: std::sync::atomic::AtomicBool,
    /// In a fleet, away from the leader: the newest release as last recorded.
    followed_release: Mutex<Option<Release>>,
    /// Events were stored that the live watchers have not been sent (the store could not be
    /// read when they were announced).
    events_behind: std::sync::atomic::AtomicBool,
}

impl Controller {
    /// A controller over `store` and `plane`, starting from what the store holds.
    pub async fn open(
        config: Config,
        store: Arc<dyn StateStore>,
        plane: Arc<dyn DataPlane>,
        endpoints: Endpoints,
        state: Versioned<RouterState>,
    ) -> Result<Controller, String> {
        let mut environments = store.environments().await.map_err(|e| e.to_string())?;
        for record in &mut environments {
            // Fixed upstreams are run by someone else: they count as running, health tells.
            if config
                .controller
                .environment(record.value.color)
                .provider
                .kind()
                == ProviderKind::Static
                && record.value.status == EnvironmentStatus::Stopped
            {
                record.value.status = EnvironmentStatus::Running;
            }
        }
        let last_event = store
            .events_after(0, 1)
            .await
            .map_err(|e| e.to_string())?
            .last()
            .map_or(0, |e| e.id);
        let logs_dir = config.state_dir.join("logs");
        let providers = providers_for(&config);
        let applied = state.revision;
        let hosted = Color::ALL.map(|color| crate::fleet::HostEnvironment {
            host: config.router.id.clone(),
            order: 0,
            test_failures: None,
            record: EnvironmentRecord::stopped(color),
        });
        Ok(Controller {
            config: ArcSwap::from_pointee(config),
            config_path: endpoints.config.clone(),
            store,
            plane,
            endpoints,
            state: tokio::sync::Mutex::new(state),
            environments: Mutex::new(environments),
            environment_writes: tokio::sync::Mutex::new(()),
            providers,
            active: Mutex::new(None),
            history: Mutex::new(History::new(HISTORY_SECONDS)),
            live: tokio::sync::broadcast::channel(1024).0,
            published: tokio::sync::Mutex::new(last_event),
            exclusive: tokio::sync::Mutex::new(()),
            starting: tokio::sync::Mutex::new(()),
            runner: Mutex::new(None),
            handed_over: std::sync::atomic::AtomicBool::new(false),
            upgrades: std::sync::OnceLock::new(),
            logs_dir,
            fleet: std::sync::OnceLock::new(),
            applied: std::sync::atomic::AtomicI64::new(applied),
            standing: Mutex::new(fleet::FleetStanding::default()),
            reported: Arc::new(tokio::sync::Notify::new()),
            leading: std::sync::atomic::AtomicBool::new(false),
            resubscribe: Arc::new(tokio::sync::Notify::new()),
            seen_routers: Mutex::new(std::collections::BTreeMap::new()),
            router_states: Mutex::new(std::collections::VecDeque::from([applied])),
            hosted: Mutex::new(hosted),
            host_writes: tokio::sync::Mutex::new(()),
            host_unsaved: std::sync::atomic::AtomicBool::new(false),
            followed_release: Mutex::new(None),
            events_behind: std::sync::atomic::AtomicBool::new(false),
        })
    }
}

/// One color as `bluegreen status` and `diff` show it: the record and the effective spec.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EnvironmentView {
    #[serde(flatten)]
    pub record: EnvironmentRecord,
    /// The supervised instances (the process provider's), for status and scripts.
    pub instances: Vec<crate::store::InstanceRecord>,
    /// The color's containers (the docker provider's): ids, names, ports, states.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<crate::store::ContainerRecord>,
    pub spec: EnvironmentSpec,
}

impl EnvironmentView {
    pub fn new(record: EnvironmentRecord, spec: EnvironmentSpec) -> EnvironmentView {
        EnvironmentView {
            instances: record.provider.instances().to_vec(),
            containers: record.provider.containers().to_vec(),
            record,
            spec,
        }
    }
}

/// One provider per kind the config uses, shared by both colors.
fn providers_for(config: &Config) -> [Arc<dyn Provider>; 2] {
    let mut made: Vec<(ProviderKind, Arc<dyn Provider>)> = Vec::new();
    Color::ALL.map(|color| {
        let kind = config.controller.environment(color).provider.kind();
        if let Some((_, provider)) = made.iter().find(|(k, _)| *k == kind) {
            return Arc::clone(provider);
        }
        let provider: Arc<dyn Provider> = match kind {
            ProviderKind::Process => Arc::new(ProcessProvider::new()),
            ProviderKind::Static => Arc::new(StaticProvider),
            ProviderKind::Command => Arc::new(CommandProvider),
            ProviderKind::Docker => Arc::new(DockerProvider::new(&config.service)),
        };
        made.push((kind, Arc::clone(&provider)));
        provider
    })
}

impl Controller {
    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    fn spec(&self, color: Color) -> EnvironmentSpec {
        self.config().controller.environment(color).clone()
    }

    /// The provider that runs `color`'s instances.
    pub(crate) fn provider(&self, color: Color) -> &Arc<dyn Provider> {
        &self.providers[color.index()]
    }

    pub fn environment(&self, color: Color) -> EnvironmentRecord {
        self.environments.lock().expect("lock")[color.index()]
            .value
            .clone()
    }

    pub fn environments(&self) -> Vec<EnvironmentView> {
        Color::ALL
            .into_iter()
            .map(|color| EnvironmentView::new(self.environment(color), self.spec(color)))
            .collect()
    }

    /// Changes a color's record and saves it (with the event `change` returns) before anything
    /// acts on it. Read, change and write happen under one lock: instance events and deploys
    /// update the same record concurrently.
    pub(crate) async fn update_environment(
        &self,
        color: Color,
        release: Option<i64>,
        change: impl FnOnce(&mut EnvironmentRecord) -> Option<(EventKind, String)>,
    ) -> Result<EnvironmentRecord, CommandError> {
        // Only writers wait here; readers of `environments` never wait for the disk.
        let _turn = self.environment_writes.lock().await;
        let current = self.environments.lock().expect("lock")[color.index()].clone();
        let mut record = current.value.clone();
        let event = change(&mut record);
        let mut write = Write {
            environment: Some((current.revision, record.clone())),
            ..Write::default()
        };
        if let Some((kind, message)) = &event {
            write = write.with_event(*kind, message, release);
        }
        let committed = self
            .store
            .commit(write)
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        self.environments.lock().expect("lock")[color.index()] = Versioned {
            value: record.clone(),
            revision: committed.revision,
        };
        if let Some((kind, message)) = &event {
            tracing::info!(%kind, "{message}");
            self.notify(*kind, message, release);
        }
        Ok(record)
    }

    /// Puts records read from the store in place of those kept, each only when newer.
    pub(crate) async fn replace_environments(&self, records: [Versioned<EnvironmentRecord>; 2]) {
        let _turn = self.environment_writes.lock().await;
        let mut kept = self.environments.lock().expect("lock");
        for (kept, read) in kept.iter_mut().zip(records) {
            if read.revision > kept.revision {
                *kept = read;
            }
        }
    }

    pub(crate) async fn event(&self, kind: EventKind, message: &str, release: Option<i64>) {
        tracing::info!(%kind, "{message}");
        if let Err(e) = self
            .store
            .commit(Write::event(kind, message, release))
            .await
        {
            tracing::error!(error = %e, "cannot record event");
        }
        self.notify(kind, message, release);
    }

    /// After an event is stored: the webhook hears of it (live watchers hear of it from the
    /// store's watch, in `follow_store`).
    pub(crate) fn notify(&self, kind: EventKind, message: &str, release: Option<i64>) {
        let config = self.config();
        if let Some(webhook) = &config.controller.webhook {
            hooks::notify(
                webhook,
                serde_json::json!({
                    "service": config.service,
                    "kind": kind.as_str(),
                    "message": message,
                    "release_id": release,
                    "at_ms": now_ms(),
                }),
            );
        }
    }

    /// Sends events stored since the last call to the live watchers, in order. When the
    /// store cannot be read, the events are sent by a later call (in a fleet the reporter
    /// tries again within a second).
    async fn publish_events(&self) {
        let mut last = self.published.lock().await;
        match self.store.events_after(*last, 1000).await {
            Ok(events) => {
                self.events_behind
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                for event in events {
                    *last = event.id;
                    let _ = self.live.send(event);
                }
            }
            Err(e) => {
                self.events_behind
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!(error = %e, "cannot read new events");
            }
        }
    }

    /// Subscribes to events as they are stored.
    pub fn watch_events(&self) -> tokio::sync::broadcast::Receiver<crate::store::Event> {
        self.live.subscribe()
    }

    /// One picture of the daemon for live views: both colors with their recent numbers, the
    /// live color, the release in progress.
    pub async fn snapshot(&self) -> serde_json::Value {
        let split = self.plane.split();
        serde_json::json!({
            "service": self.config().service,
            "at_ms": now_ms(),
            "live": split.sole_color(),
            "weights": Weights::from(split),
            "rollback_to": self.rollback_target().await,
            "environments": Color::ALL.map(|c| self.environment(c)),
            "monitor": self.monitor(10),
            "mirror": self.plane.status().mirror,
            "routers": self.routers().await,
            "leader": self.fleet_leader().await,
            "hosts": self.hosts().await,
        })
    }

    /// The facts hooks and test commands receive.
    pub(crate) fn facts(&self, color: Color, release: Option<&Release>) -> Facts {
        let env = self.environment(color);
        let from = color.other();
        let preview = self.plane.preview();
        Facts {
            service: self.config().service.clone(),
            release_id: release.map(|r| r.id),
            version: release.and_then(|r| r.version.clone()).or(env.version),
            color: Some(color.to_string()),
            from_color: Some(from.to_string()),
            from_version: release
                .and_then(|r| r.from_version.clone())
                .or(self.environment(from).version),
            router_url: format!(
                "{}://{}",
                if preview.tls { "https" } else { "http" },
                preview.router
            ),
            preview_header: preview.header,
            preview_secret: preview
                .secret
                .map(|(header, secret)| format!("{header}: {secret}")),
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
        let config = self.config();
        let Some(argv) = config.controller.hooks.commands.get(&point) else {
            return Ok(());
        };
        let log = self.logs_dir.join("hooks.log");
        let _ = std::fs::create_dir_all(&self.logs_dir);
        let outcome = hooks::run(
            point.as_str(),
            argv,
            facts,
            &[],
            config.controller.hooks.timeout,
            &log,
        )
        .await;
        match &outcome {
            Ok(_) => {
                self.event(
                    EventKind::Hook,
                    &format!("{} hook passed", point.as_str()),
                    release,
                )
                .await
            }
            Err(e) => {
                self.event(
                    EventKind::Hook,
                    &format!("{} hook failed: {e}", point.as_str()),
                    release,
                )
                .await
            }
        }
        outcome.map(|_| ())
    }

    /// Starts the controller's background work: recording instance events, sampling the
    /// router's counters, and bringing back instances, timers and the release: as the
    /// previous daemon left them after a restart, as it handed them over after an upgrade.
    pub async fn start(self: &Arc<Self>, after: Start) {
        for provider in &self.providers {
            if let Some(mut events) = provider.take_events() {
                let controller = Arc::clone(self);
                tokio::spawn(async move {
                    while let Some(event) = events.recv().await {
                        // Whatever a detached provider still reports is the successor's now.
                        if !controller.is_handed_over() {
                            controller.instance_event(event).await;
                        }
                    }
                });
            }
        }
        let controller = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(controller) = controller.upgrade() else {
                    break;
                };
                let snapshots = controller.snapshots();
                controller
                    .history
                    .lock()
                    .expect("lock")
                    .push(Instant::now(), snapshots);
            }
        });
        if self.fleet.get().is_some() {
            // In a fleet the follower that applies the router state also publishes events
            // (one watch, resumed after the store is lost); only the leader recovers and
            // drives releases, once elected; each host deploys its own instances when told.
            if Color::ALL.into_iter().any(|c| self.deploys_per_host(c)) {
                self.serve_host_orders();
            }
            self.lead_fleet(after);
            return;
        }
        self.follow_store().await;
        match after {
            Start::Restart => self.recover().await,
            Start::Upgrade => self.take_control().await,
        }
    }

    /// A binary upgrade's hand-over, in the process that hands over: the release runner stops
    /// where it is (it writes nothing more), the providers let go of the instances without
    /// stopping them, and a commit already under way lands before this returns, so the
    /// successor reads everything this process wrote.
    pub async fn hand_over(&self) {
        self.handed_over
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let runner = self.runner.lock().expect("lock").take();
        if let Some(runner) = runner {
            runner.abort();
        }
        if let Some(fleet) = self.fleet.get() {
            fleet.resign().await;
        }
        // The runner holds `exclusive` until it is gone; so does any deploy or rollback.
        let _exclusive = self.exclusive.lock().await;
        for provider in self.distinct_providers() {
            provider.detach().await;
        }
        if let Err(e) = self.store.revision().await {
            tracing::warn!(error = %e, "state store after the hand-over");
        }
    }

    /// Control taken back after an upgrade whose successor failed: as the successor would
    /// have, from what the store holds.
    pub async fn resume_after_failed_upgrade(self: &Arc<Self>) {
        self.handed_over
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.take_control().await;
    }

    pub fn is_handed_over(&self) -> bool {
        self.handed_over.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Each provider once (both colors may share one).
    fn distinct_providers(&self) -> Vec<&Arc<dyn Provider>> {
        let [a, b] = &self.providers;
        if Arc::ptr_eq(a, b) {
            vec![a]
        } else {
            vec![a, b]
        }
    }

    /// Follows the store's commits: each one that adds events sends them to the live watchers
    /// (`/v1/stream`), whoever wrote them (this daemon, or another on a shared store).
    async fn follow_store(self: &Arc<Self>) {
        let from = match self.store.revision().await {
            Ok(revision) => revision,
            Err(e) => {
                tracing::error!(error = %e, "cannot follow the state store");
                return;
            }
        };
        let controller = Arc::downgrade(self);
        let mut changes = self.store.watch(from);
        tokio::spawn(async move {
            while let Some(change) = changes.next().await {
                let Some(controller) = controller.upgrade() else {
                    break;
                };
                match change {
                    Ok(change) if change.keys.iter().any(|k| matches!(k, Key::Event(_))) => {
                        controller.publish_events().await
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Compacted or gone: what matters (the events) is read by id anyway.
                        tracing::warn!(error = %e, "stopped following the state store");
                        controller.publish_events().await;
                        break;
                    }
                }
            }
        });
    }

    /// Both colors' cumulative counters now.
    pub(crate) fn snapshots(&self) -> [ColorSnapshot; 2] {
        self.plane.counters()
    }

    /// The counters as they were at `since` (or the oldest kept sample).
    pub(crate) fn snapshots_since(&self, since: Instant) -> Option<(Instant, [ColorSnapshot; 2])> {
        self.history
            .lock()
            .expect("lock")
            .at_or_after(since)
            .cloned()
    }

    async fn instance_event(&self, event: InstanceEvent) {
        let current =
            |color: Color, generation: u64| self.provider(color).is_current(color, generation);
        match event {
            InstanceEvent::Started {
                color,
                generation,
                slot,
                pid,
                port,
            } if current(color, generation) => {
                let saved = self
                    .update_instances(color, |record| {
                        if let ProviderState::Process { instances } = &mut record.provider
                            && let Some(instance) = instances.get_mut(slot)
                        {
                            instance.pid = Some(pid);
                            instance.port = port;
                        }
                        None
                    })
                    .await;
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
                let saved = self.update_instances(color, |record| {
                    if let ProviderState::Process { instances } = &mut record.provider
                        && let Some(instance) = instances.get_mut(slot)
                    {
                        instance.restarts += 1;
                        instance.pid = None;
                    }
                    Some((
                        EventKind::Instance,
                        format!(
                            "{color} instance {slot} (port {port}) {status}; restarting in {}ms",
                            restart_in.as_millis()
                        ),
                    ))
                }).await;
                if let Err(e) = saved {
                    tracing::error!(error = %e, "cannot record instance exit");
                }
            }
            InstanceEvent::ContainerExited {
                color,
                generation,
                id,
                state,
                reason,
            } if current(color, generation) => {
                let saved = self
                    .update_instances(color, |record| {
                        if let ProviderState::Docker { containers } = &mut record.provider
                            && let Some(container) = containers.iter_mut().find(|c| c.id == id)
                        {
                            container.state = state.clone();
                        }
                        record.status = EnvironmentStatus::Failed;
                        record.reason = Some(reason.clone());
                        Some((EventKind::Failed, format!("{color} failed: {reason}")))
                    })
                    .await;
                if let Err(e) = saved {
                    tracing::error!(error = %e, "cannot record a container exit");
                }
            }
            InstanceEvent::CrashLoop {
                color,
                generation,
                reason,
            } if current(color, generation) => {
                let saved = self
                    .update_instances(color, |record| {
                        record.status = EnvironmentStatus::Failed;
                        record.reason = Some(reason.clone());
                        Some((EventKind::Failed, format!("{color} failed: {reason}")))
                    })
                    .await;
                if let Err(e) = saved {
                    tracing::error!(error = %e, "cannot record crash loop");
                }
            }
            _ => {}
        }
    }

    /// After a restart: instances recorded as running are adopted (or started again on their
    /// ports), scale-down timers are re-armed, and an unfinished release is settled by the rule
    /// in docs/lifecycle.md.
    pub(crate) async fn recover(self: &Arc<Self>) {
        self.adopt_instances().await;
        self.settle_interrupted_release().await;
        // A deploy the previous daemon did not finish: never proven healthy, so stopped.
        for color in Color::ALL {
            let why = "the deploy was interrupted by a daemon restart";
            self.abandon_deploy(color, None, EventKind::Recover, why)
                .await;
        }
    }

    /// After an upgrade: the instances are adopted as they run, and the release goes on from
    /// the stage and step it was in.
    pub(crate) async fn take_control(self: &Arc<Self>) {
        self.adopt_instances().await;
        self.continue_release().await;
    }

    /// Instances recorded as running are adopted (or started again on their ports), and
    /// scale-down timers re-armed.
    async fn adopt_instances(self: &Arc<Self>) {
        for color in Color::ALL {
            let record = self.environment(color);
            let runs = matches!(
                record.status,
                EnvironmentStatus::Running | EnvironmentStatus::Deploying
            );
            // Each host adopts its own instances (`serve_host_orders`).
            if runs && !self.deploys_per_host(color) {
                let request = self.deploy_request(color, &record, None);
                match self.provider(color).adopt(&request, &record).await {
                    Ok(Some(message)) => self.event(EventKind::Recover, &message, None).await,
                    Ok(None) => {}
                    Err(e) => tracing::error!(%color, error = %e, "cannot restart instances"),
                }
            }
            if let Some(at_ms) = record.scale_down_at_ms {
                self.schedule_scale_down(color, at_ms);
            }
        }
    }

    pub async fn shutdown(&self) {
        // Another router of the fleet takes the lead at once, not after the lease lapses.
        if let Some(fleet) = self.fleet.get() {
            fleet.resign().await;
        }
        for provider in &self.providers {
            provider.shutdown().await;
        }
    }
}

/// What the controller starts after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// A (re)start: what a previous daemon left unfinished is settled by the restart rule.
    Restart,
    /// A binary upgrade: the previous process handed over, and its release goes on.
    Upgrade,
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
