//! A controller in a fleet: it applies the router state other daemons record, reports its router, and waits for every router to apply a change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bluegreen_router::{Color, ColorSnapshot};
use futures_util::StreamExt;

use super::{Controller, EventKind, Start};
use crate::fleet::{Fleet, Lagging, RouterReport};
use crate::store::{Key, Revision, RouterState, Versioned, now_ms};

/// How often a router reports itself when nothing changes.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a router waits before following the store again after losing it.
const RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// How long one report may take before it counts as failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the recorded state is read directly, in case the watch missed a change.
const CHECK_INTERVAL: Duration = Duration::from_secs(3);
/// Reports failing this long: the store counts as lost; the connection is made anew.
const LOST_AFTER: Duration = Duration::from_secs(3);

/// What this router knows of its place in the fleet, beyond the state it applied.
#[derive(Default)]
pub(crate) struct FleetStanding {
    /// The store is out of reach: the router serves the last state it applied.
    pub stale: bool,
    /// Why the newest recorded state could not be applied here.
    pub refused: Option<String>,
}

/// A router in the list `bluegreen status` shows: its report, how far it is behind, and how
/// old the report is.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct RouterView {
    #[serde(flatten)]
    pub report: RouterReport,
    /// Router states (splits, upstream overrides) recorded since the one it applied: 0 when
    /// it serves the newest.
    pub lag: i64,
    pub report_age_ms: i64,
    /// Its report is gone (its lease lapsed: it stopped, or lost etcd); this is the last one
    /// seen. Kept in the list for `LOST_KEPT`.
    pub lost: bool,
}

/// How long a router whose report went away stays in the list, marked lost.
const LOST_KEPT: Duration = Duration::from_secs(600);

impl Controller {
    /// Joins the fleet: follows the recorded router state from the store, and reports this
    /// router about once a second and at each change it applies.
    pub fn join_fleet(self: &Arc<Self>, fleet: Arc<dyn Fleet>) {
        if self.fleet.set(fleet).is_err() {
            return;
        }
        self.follow_router_state();
        let controller = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut failing_since: Option<tokio::time::Instant> = None;
            let mut checked = tokio::time::Instant::now();
            loop {
                let Some(this) = controller.upgrade() else {
                    break;
                };
                if this.is_handed_over() || this.plane.is_stopping() {
                    break;
                }
                let reported = this.reported.clone();
                this.report_once(&mut failing_since).await;
                if this.events_behind.load(Ordering::SeqCst) {
                    this.publish_events().await;
                }
                if checked.elapsed() >= CHECK_INTERVAL {
                    checked = tokio::time::Instant::now();
                    this.check_applied().await;
                }
                drop(this);
                tokio::select! {
                    _ = tokio::time::sleep(REPORT_INTERVAL) => {}
                    _ = reported.notified() => {}
                }
            }
        });
    }

    /// Publishes this router's report. Reports failing for `LOST_AFTER` mean the store is out
    /// of reach, or the connection wedged after a partition: the router says it is stale,
    /// connects anew, and the follower watches anew.
    async fn report_once(&self, failing_since: &mut Option<tokio::time::Instant>) {
        let fleet = self.fleet.get().expect("in a fleet");
        let report = self.report();
        let error = match tokio::time::timeout(PUBLISH_TIMEOUT, fleet.publish(&report)).await {
            Ok(Ok(())) => {
                *failing_since = None;
                return;
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {PUBLISH_TIMEOUT:?}"),
        };
        tracing::warn!(error = %error, "cannot report this router to the fleet");
        let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() < LOST_AFTER {
            return;
        }
        self.set_stale(true);
        match fleet.reconnect().await {
            Ok(()) => self.resubscribe.notify_one(),
            Err(e) => tracing::warn!(error = %e, "cannot reach the state store"),
        }
        *failing_since = Some(tokio::time::Instant::now());
    }

    /// A watch can hang on a connection a partition wedged while other requests go through:
    /// the state is read directly now and then, and a change the watch missed is applied and
    /// the watch opened anew.
    async fn check_applied(&self) {
        // The leader keeps the list of routers it has seen, so one that goes away is shown
        // as lost (the others learn of routers when asked for their status).
        if self.leading.load(Ordering::SeqCst) {
            let _ = self.routers().await;
        }
        let before = self.applied.load(Ordering::SeqCst);
        if self.apply_recorded(before).await && self.applied.load(Ordering::SeqCst) > before {
            tracing::warn!("the store's watch missed a change; applied it and watching anew");
            self.resubscribe.notify_one();
        }
    }

    /// Campaigns for the fleet's leadership until this daemon stops; once elected it does
    /// what a restarted daemon does (an interrupted release is settled by the kill -9 rule:
    /// abandoned before traffic moved, rolled back after) — or, right after a binary upgrade
    /// on this host, takes the release over where it was. When the leadership lapses the
    /// release runner stops where it is: the next leader settles it.
    pub(super) fn lead_fleet(self: &Arc<Self>, after: Start) {
        let controller = Arc::downgrade(self);
        let fleet = Arc::clone(self.fleet.get().expect("in a fleet"));
        tokio::spawn(async move {
            let mut after = Some(after);
            loop {
                match controller.upgrade() {
                    Some(this) if !this.is_handed_over() && !this.plane.is_stopping() => {}
                    _ => return,
                }
                let lost = match fleet.lead().await {
                    Ok(lost) => lost,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot campaign for the fleet's leadership");
                        tokio::time::sleep(RECONNECT_DELAY).await;
                        continue;
                    }
                };
                let Some(this) = controller.upgrade() else {
                    return;
                };
                if this.is_handed_over() {
                    fleet.resign().await;
                    return;
                }
                this.leading.store(true, Ordering::SeqCst);
                let id = this.config().router.id.clone();
                this.event(
                    EventKind::Recover,
                    &format!("router {id} leads the fleet"),
                    None,
                )
                .await;
                match after.take() {
                    Some(Start::Upgrade) => this.take_control().await,
                    _ => this.recover().await,
                }
                drop(this);
                lost.cancelled().await;
                let Some(this) = controller.upgrade() else {
                    return;
                };
                this.leading.store(false, Ordering::SeqCst);
                if !this.is_handed_over() {
                    tracing::warn!(
                        "lost the fleet's leadership; the release runner stops where it is"
                    );
                    let runner = this.runner.lock().expect("lock").take();
                    if let Some(runner) = runner {
                        runner.abort();
                    }
                }
            }
        });
    }

    /// Whether this daemon may change things: always on one machine, only the leader in a
    /// fleet.
    pub fn is_leading(&self) -> bool {
        self.fleet.get().is_none() || self.leading.load(Ordering::SeqCst)
    }

    /// The router leading the fleet now (none on one machine).
    pub async fn fleet_leader(&self) -> Option<String> {
        self.fleet.get()?.leader().await
    }

    /// Applies each router state another daemon records, and publishes each event to the live
    /// watchers (`/v1/stream`), as they land; when the store is out
    /// of reach the router keeps what it applied, says it is stale, and catches up after.
    fn follow_router_state(self: &Arc<Self>) {
        let controller = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut from: Revision = match controller.upgrade() {
                Some(this) => {
                    this.follow_release().await;
                    this.applied.load(Ordering::SeqCst)
                }
                None => return,
            };
            loop {
                let Some(this) = controller.upgrade() else {
                    return;
                };
                let mut changes = this.store.watch(from);
                let resubscribe = Arc::clone(&this.resubscribe);
                drop(this);
                loop {
                    let change = tokio::select! {
                        change = changes.next() => change,
                        // The reporter found the store out of reach and reconnected.
                        _ = resubscribe.notified() => None,
                    };
                    let Some(change) = change else { break };
                    let Some(this) = controller.upgrade() else {
                        return;
                    };
                    if this.is_handed_over() {
                        return;
                    }
                    match change {
                        Ok(change) => {
                            if change.keys.contains(&Key::RouterState) {
                                match change.router_state.clone() {
                                    Some(state) => {
                                        let read = Versioned {
                                            value: Some(state),
                                            revision: change.revision,
                                        };
                                        this.apply_state(read).await;
                                    }
                                    None => {
                                        this.apply_recorded(change.revision).await;
                                    }
                                }
                            }
                            if change.keys.iter().any(|k| matches!(k, Key::Environment(_))) {
                                this.read_environments().await;
                            }
                            if change.keys.iter().any(|k| matches!(k, Key::Release(_)))
                                && !this.leading.load(Ordering::SeqCst)
                            {
                                this.follow_release().await;
                            }
                            if change.keys.iter().any(|k| matches!(k, Key::Event(_))) {
                                this.publish_events().await;
                            }
                            from = change.revision;
                            this.set_stale(false);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "lost the state store; serving the last state applied");
                            this.set_stale(true);
                            break;
                        }
                    }
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
                let Some(this) = controller.upgrade() else {
                    return;
                };
                // Caught up by reading, then followed from there.
                this.publish_events().await;
                this.read_environments().await;
                if !this.leading.load(Ordering::SeqCst) {
                    this.follow_release().await;
                }
                if let Ok(newest) = this.store.revision().await
                    && this.apply_recorded(newest).await
                {
                    from = from.max(newest);
                    this.set_stale(false);
                }
            }
        });
    }

    /// Reads the recorded router state (as of `seen` or later) and applies what is newer
    /// than what this router serves. Returns whether the store answered.
    async fn apply_recorded(&self, seen: Revision) -> bool {
        let read = match self.store.router_state_since(seen).await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the router state");
                return false;
            }
        };
        self.apply_state(read).await;
        true
    }

    /// Applies a recorded router state (read, or delivered by the watch) when it is newer
    /// than what this router serves.
    async fn apply_state(&self, read: Versioned<Option<RouterState>>) {
        let Some(recorded) = read.value else {
            return;
        };
        let mut state = self.state.lock().await;
        if read.revision <= self.applied.load(Ordering::SeqCst) {
            return;
        }
        for color in Color::ALL {
            let wanted = recorded.upstreams.get(color);
            if let Some(upstreams) = wanted
                && wanted != state.value.upstreams.get(color)
                && let Err(e) = self.plane.set_upstreams(color, upstreams).await
            {
                tracing::warn!(%color, error = %e, "cannot apply the recorded upstreams here");
            }
        }
        self.saw_router_state(read.revision);
        let outcome = self.plane.apply_split(recorded.split).await;
        state.value = recorded;
        state.revision = state.revision.max(read.revision);
        match outcome {
            Ok(()) => {
                self.applied.store(read.revision, Ordering::SeqCst);
                self.standing.lock().expect("lock").refused = None;
                tracing::info!(revision = read.revision, split = %state.value.split, "applied the recorded router state");
            }
            Err(refused) => {
                tracing::warn!(revision = read.revision, error = %refused, "cannot apply the recorded router state here");
                self.standing.lock().expect("lock").refused = Some(refused);
            }
        }
        self.reported.notify_one();
    }

    /// Reads both colors' records another daemon (the leader) wrote, so this one's status
    /// and tests see the versions it deployed. The leader's own writes are already here.
    async fn read_environments(&self) {
        if self.leading.load(Ordering::SeqCst) {
            return;
        }
        match self.store.environments().await {
            Ok(records) => self.replace_environments(records).await,
            Err(e) => tracing::warn!(error = %e, "cannot read the environments' records"),
        }
    }

    /// Remembers a router state's revision (the newest 1,000), for routers' lag.
    pub(crate) fn saw_router_state(&self, revision: Revision) {
        let mut states = self.router_states.lock().expect("lock");
        if states.back().is_some_and(|last| *last >= revision) {
            return;
        }
        states.push_back(revision);
        if states.len() > 1000 {
            states.pop_front();
        }
    }

    fn set_stale(&self, stale: bool) {
        let mut standing = self.standing.lock().expect("lock");
        if standing.stale != stale {
            standing.stale = stale;
            self.reported.notify_one();
        }
    }

    /// This router's report now.
    fn report(&self) -> RouterReport {
        let counters = self.plane.counters();
        let standing = self.standing.lock().expect("lock");
        let config = self.config();
        RouterReport {
            id: config.router.id.clone(),
            applied: self.applied.load(Ordering::SeqCst),
            stale: standing.stale,
            refused: standing.refused.clone(),
            weights: self.plane.split().into(),
            listen: self.endpoints.listen.to_string(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            requests: counters.each_ref().map(|c| c.requests),
            errors: counters
                .each_ref()
                .map(|c| c.responses_5xx + c.upstream_errors),
            healthy: Color::ALL.map(|color| self.plane.healthy_count(color)),
            counters: Some(counters),
            reported_ms: now_ms(),
        }
    }

    /// Each router's cumulative counters now, by id: this router's own as they are, the
    /// others' from their last reports (a second old at most). On one machine, this router's.
    pub(crate) async fn counters_by_router(&self) -> BTreeMap<String, [ColorSnapshot; 2]> {
        let own = self.config().router.id.clone();
        let mut counters = BTreeMap::new();
        if let Some(fleet) = self.fleet.get() {
            match fleet.routers().await {
                Ok(reports) => counters.extend(
                    reports
                        .into_iter()
                        .filter_map(|report| Some((report.id, report.counters?))),
                ),
                Err(e) => tracing::warn!(error = %e, "analysis: cannot read the routers' reports"),
            }
        }
        counters.insert(own, self.snapshots());
        counters
    }

    /// The fleet's routers for `status` (none on one machine).
    pub async fn routers(&self) -> Option<Vec<RouterView>> {
        let fleet = self.fleet.get()?;
        let now = now_ms();
        // When the reports cannot be read, nobody is called lost: the last ones seen are shown.
        let live = match fleet.routers().await {
            Ok(reports) => Some(reports),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the fleet's routers");
                None
            }
        };
        let states = self.router_states.lock().expect("lock").clone();
        let lag = |applied: Revision| states.iter().filter(|r| **r > applied).count() as i64;
        let mut seen = self.seen_routers.lock().expect("lock");
        for report in live.iter().flatten() {
            seen.insert(report.id.clone(), report.clone());
        }
        seen.retain(|_, report| now - report.reported_ms < LOST_KEPT.as_millis() as i64);
        let mut routers: Vec<RouterView> = seen
            .values()
            .map(|report| RouterView {
                lag: lag(report.applied),
                report_age_ms: (now - report.reported_ms).max(0),
                lost: live
                    .as_ref()
                    .is_some_and(|live| !live.iter().any(|r| r.id == report.id)),
                report: report.clone(),
            })
            .collect();
        routers.sort_by(|a, b| a.report.id.cmp(&b.report.id));
        Some(routers)
    }

    /// A release's change of the split in a fleet: waited for like a switch; the release
    /// goes on either way, and a warning names the routers that had not applied it (they
    /// apply it when they reach etcd again).
    pub(crate) async fn confirm_release_step(&self, release: i64, what: &str) {
        if self.fleet.get().is_none() {
            return;
        }
        let revision = self.state.lock().await.revision;
        let lagging = self.confirm(revision).await;
        if lagging.is_empty() {
            return;
        }
        let names: Vec<&str> = lagging.iter().map(|l| l.id.as_str()).collect();
        let message = format!(
            "release #{release}: {what} is not yet applied by router(s) {}; the release goes on, they apply it when they reach etcd",
            names.join(", ")
        );
        self.event(EventKind::Warning, &message, Some(release))
            .await;
    }

    /// After a change recorded at `revision`: waits until every live router applied it.
    /// The routers that had not when `store.etcd.confirm_timeout` ran out, and those known
    /// lost (none on one machine, where applying is part of recording).
    pub(crate) async fn confirm(&self, revision: Revision) -> Vec<Lagging> {
        let Some(fleet) = self.fleet.get() else {
            return Vec::new();
        };
        self.reported.notify_one();
        let timeout = match &self.config().store {
            crate::config::StoreSettings::Etcd(etcd) => etcd.confirm_timeout,
            crate::config::StoreSettings::Sqlite => return Vec::new(),
        };
        let mut lagging = fleet
            .wait_applied(revision, timeout)
            .await
            .err()
            .unwrap_or_default();
        // Routers already lost when the change was made are not waited for, but they have not
        // applied it either: named too.
        for view in self.routers().await.unwrap_or_default() {
            if view.lost
                && view.report.applied < revision
                && !lagging.iter().any(|l| l.id == view.report.id)
            {
                lagging.push(Lagging {
                    id: view.report.id,
                    applied: None,
                });
            }
        }
        lagging
    }
}
