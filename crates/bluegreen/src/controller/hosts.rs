//! Per-host deploys in a fleet: the leader orders every host to deploy or stop a color, in batches, and waits for their records; each host's daemon does it with its local provider and tests its new color through its own router.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bluegreen_router::Color;

use super::provider::StopRequest;
use super::{CommandError, Controller, EventKind};
use crate::config::controller::Stage;
use crate::fleet::{HostAction, HostEnvironment, HostOrder};
use crate::store::{EnvironmentRecord, EnvironmentStatus, Revision, now_ms};

/// How long a host waits on the orders' watch before reading them again (a watch can hang
/// on a connection a partition wedged).
const ORDERS_PATIENCE: Duration = Duration::from_secs(3);
/// How often the leader reads the hosts' records while it waits for a batch.
const POLL: Duration = Duration::from_millis(200);
/// Beyond the instances' own timeouts: how long the leader waits for a host's record.
const HOST_SLACK: Duration = Duration::from_secs(20);

impl Controller {
    /// Whether each host of a fleet runs its own instances of `color` (its provider starts
    /// them on the host), rather than all routers sharing fixed upstreams.
    pub(crate) fn deploys_per_host(&self, color: Color) -> bool {
        self.fleet.get().is_some() && !self.provider(color).runs_elsewhere()
    }

    /// This host's record of its own instances of `color`.
    pub(crate) fn hosted(&self, color: Color) -> HostEnvironment {
        self.hosted.lock().expect("lock")[color.index()].clone()
    }

    /// The record that holds `color`'s instances on this daemon: this host's own in a fleet
    /// that deploys per host, else the color's.
    pub(crate) fn instances_record(&self, color: Color) -> EnvironmentRecord {
        if self.deploys_per_host(color) {
            self.hosted(color).record
        } else {
            self.environment(color)
        }
    }

    /// How an event about `color`'s instances here begins: the host's name in a fleet that
    /// deploys per host (every host writes such events), else nothing.
    pub(crate) fn on_this_host(&self, color: Color) -> String {
        if self.deploys_per_host(color) {
            format!("host {}: ", self.config().router.id)
        } else {
            String::new()
        }
    }

    /// Changes this host's record of `color` and saves it in the fleet. A record the fleet
    /// could not take is kept here and saved again by the host's order loop.
    async fn update_host(&self, color: Color, change: impl FnOnce(&mut HostEnvironment)) {
        let _turn = self.host_writes.lock().await;
        let mut host = self.hosted(color);
        change(&mut host);
        self.hosted.lock().expect("lock")[color.index()] = host.clone();
        let fleet = self.fleet.get().expect("in a fleet");
        if let Err(e) = fleet.save_host(&host).await {
            tracing::warn!(error = %e, "cannot record this host's instances; trying again");
            self.host_unsaved.store(true, Ordering::SeqCst);
        }
    }

    /// Changes the record of `color`'s instances: this host's own in a fleet that deploys
    /// per host (its event names the host), else the color's.
    pub(crate) async fn update_instances(
        &self,
        color: Color,
        change: impl FnOnce(&mut EnvironmentRecord) -> Option<(EventKind, String)>,
    ) -> Result<(), CommandError> {
        if !self.deploys_per_host(color) {
            return self
                .update_environment(color, None, change)
                .await
                .map(|_| ());
        }
        let mut event = None;
        self.update_host(color, |host| event = change(&mut host.record))
            .await;
        if let Some((kind, message)) = event {
            let message = format!("{}{message}", self.on_this_host(color));
            self.event(kind, &message, None).await;
        }
        Ok(())
    }

    // ---- each host ----

    /// Adopts what this host's records say runs, then acts on each order the leader records
    /// for this host, one at a time, until the daemon stops or hands over.
    pub(crate) fn serve_host_orders(self: &Arc<Self>) {
        let controller = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(this) = controller.upgrade() else {
                return;
            };
            this.adopt_hosted().await;
            let fleet = Arc::clone(this.fleet.get().expect("in a fleet"));
            drop(this);
            let mut seen: Revision = 0;
            loop {
                let read = fleet.orders(seen, ORDERS_PATIENCE).await;
                let Some(this) = controller.upgrade() else {
                    return;
                };
                if this.is_handed_over() || this.plane.is_stopping() {
                    return;
                }
                if this.host_unsaved.swap(false, Ordering::SeqCst) {
                    for color in Color::ALL {
                        this.update_host(color, |_| {}).await;
                    }
                }
                match read {
                    Ok((orders, at)) => {
                        seen = at;
                        for order in orders {
                            this.act_on(order).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the leader's orders");
                        drop(this);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
    }

    /// Reads this host's records: instances recorded as running are adopted (started again
    /// on their ports if they died) and routed to; a deploy a previous daemon did not finish
    /// is stopped and marked failed.
    async fn adopt_hosted(&self) {
        let fleet = self.fleet.get().expect("in a fleet");
        let id = self.config().router.id.clone();
        let mine = loop {
            match fleet.hosts().await {
                Ok(hosts) => break hosts.into_iter().filter(|h| h.host == id),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read this host's records; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        for host in mine {
            let color = host.record.color;
            if !self.deploys_per_host(color) {
                continue;
            }
            self.hosted.lock().expect("lock")[color.index()] = host.clone();
            match host.record.status {
                EnvironmentStatus::Deploying => {
                    self.provider(color).abandon(color).await;
                    self.update_instances(color, |record| {
                        record.provider.mark_stopped();
                        record.status = EnvironmentStatus::Failed;
                        let why = "the deploy was interrupted by a daemon restart; its instances were stopped";
                        record.reason = Some(why.into());
                        Some((EventKind::Recover, format!("{color}: {why}")))
                    })
                    .await
                    .ok();
                }
                EnvironmentStatus::Running => {
                    let request = self.deploy_request(color, &host.record, None);
                    match self.provider(color).adopt(&request, &host.record).await {
                        Ok(Some(message)) => {
                            self.event(EventKind::Recover, &format!("host {id}: {message}"), None)
                                .await
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(%color, error = %e, "cannot restart instances"),
                    }
                    if let Err(e) = self
                        .plane
                        .set_upstreams(color, &host.record.upstreams)
                        .await
                    {
                        tracing::warn!(%color, error = %e, "cannot route to the adopted instances");
                    }
                }
                EnvironmentStatus::Stopped | EnvironmentStatus::Failed => {}
            }
        }
    }

    /// Acts on `order` when it is new to this host and names it.
    async fn act_on(&self, order: HostOrder) {
        let color = order.color;
        let id = self.config().router.id.clone();
        if !self.deploys_per_host(color)
            || order.id <= self.hosted(color).order
            || order
                .hosts
                .as_ref()
                .is_some_and(|hosts| !hosts.contains(&id))
        {
            return;
        }
        match order.action {
            HostAction::Deploy {
                version,
                extra_env,
                test,
            } => {
                self.deploy_here(color, order.id, version, extra_env, test, order.release)
                    .await
            }
            HostAction::Stop => self.stop_here(color, order.id).await,
        }
    }

    /// One host's part of a deploy: its provider starts the version here, this host's router
    /// routes to it once healthy, and (`test`) the release's tests run through this router.
    async fn deploy_here(
        &self,
        color: Color,
        order: i64,
        version: String,
        extra_env: BTreeMap<String, String>,
        test: bool,
        release: Option<i64>,
    ) {
        let mut record = EnvironmentRecord {
            version: Some(version.clone()),
            status: EnvironmentStatus::Deploying,
            extra_env,
            deployed_at_ms: Some(now_ms()),
            ..EnvironmentRecord::stopped(color)
        };
        self.update_host(color, |host| {
            host.order = order;
            host.test_failures = None;
            host.record = record.clone();
        })
        .await;
        let outcome = self.run_provider(color, &mut record, release).await;
        let test_failures = match (&outcome, test) {
            // The release's tests through this host's router.
            (Ok(_), true) => Some(
                self.failed_tests(color, None)
                    .await
                    .unwrap_or_else(|e| vec![e.to_string()]),
            ),
            _ => None,
        };
        if outcome.is_err() {
            self.provider(color).abandon(color).await;
        }
        let message = match &outcome {
            Ok(_) => format!("{color} runs {version}"),
            Err(reason) => format!("deploying {version} to {color} failed: {reason}"),
        };
        tracing::info!("{message}");
        self.update_host(color, |host| {
            host.test_failures = test_failures;
            host.record.upstreams = record.upstreams;
            match outcome {
                Ok(_) => host.record.status = EnvironmentStatus::Running,
                Err(reason) => {
                    host.record.provider.mark_stopped();
                    host.record.status = EnvironmentStatus::Failed;
                    host.record.reason = Some(reason);
                }
            }
        })
        .await;
    }

    async fn stop_here(&self, color: Color, order: i64) {
        let request = StopRequest {
            color,
            spec: self.spec(color),
            facts: self.facts(color, None),
            logs_dir: self.logs_dir.clone(),
        };
        let stopped = self.provider(color).stop(&request).await;
        self.update_host(color, |host| {
            host.order = order;
            host.test_failures = None;
            host.record.provider.mark_stopped();
            host.record.scale_down_at_ms = None;
            match stopped {
                Ok(()) => host.record.status = EnvironmentStatus::Stopped,
                Err(e) => {
                    host.record.status = EnvironmentStatus::Failed;
                    host.record.reason = Some(format!("stopping failed: {e}"));
                }
            }
        })
        .await;
    }

    // ---- the leader ----

    /// Deploys `record`'s version to every live host, `deploy.batch` hosts at a time: a batch
    /// is ordered once the previous one runs healthy and passed its tests (when the release
    /// tests). A failed host fails the deploy, naming it; failed tests stop the batches there
    /// (the test stage names the hosts). Returns what to add to the deploy's message.
    pub(crate) async fn deploy_on_hosts(
        &self,
        color: Color,
        record: &EnvironmentRecord,
        release: Option<i64>,
    ) -> Result<String, String> {
        let fleet = self.fleet.get().expect("in a fleet");
        let config = self.config();
        let mut hosts: Vec<String> = fleet.routers().await?.into_iter().map(|r| r.id).collect();
        hosts.sort();
        if hosts.is_empty() {
            return Err(
                "no router of the fleet reports itself (not even this one): nothing to deploy to; see `bluegreen status`"
                    .into(),
            );
        }
        let batch = config.deploy_batch.size(hosts.len());
        let test = release.is_some() && config.controller.pipeline.contains(&Stage::Test);
        let spec = self.spec(color);
        let patience = spec.ready_timeout
            + if test {
                config.controller.test.timeout * 2
            } else {
                Duration::ZERO
            }
            + HOST_SLACK;
        let mut order = HostOrder {
            id: self.next_order_id().await?,
            color,
            action: HostAction::Deploy {
                version: record.version.clone().unwrap_or_default(),
                extra_env: record.extra_env.clone(),
                test,
            },
            hosts: Some(Vec::new()),
            release,
        };
        let batches = hosts.len().div_ceil(batch);
        for (n, chunk) in hosts.chunks(batch).enumerate() {
            order
                .hosts
                .get_or_insert_default()
                .extend(chunk.iter().cloned());
            fleet.order(&order).await?;
            let done = self
                .wait_for_hosts(color, order.id, chunk, patience)
                .await?;
            let tested_bad: Vec<&String> = done
                .iter()
                .filter(|h| h.test_failures.as_ref().is_some_and(|f| !f.is_empty()))
                .map(|h| &h.host)
                .collect();
            let ran = order.hosts.as_ref().map_or(0, Vec::len);
            let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
            self.event(
                EventKind::Deploy,
                &format!(
                    "{color} {} runs on {} (batch {} of {batches}; {ran} of {} hosts){}",
                    record.version.as_deref().unwrap_or(""),
                    names.join(", "),
                    n + 1,
                    hosts.len(),
                    if tested_bad.is_empty() {
                        String::new()
                    } else {
                        format!("; its tests failed on {tested_bad:?}: no further batch")
                    }
                ),
                release,
            )
            .await;
            if !tested_bad.is_empty() {
                return Ok(format!("on {ran} of {} hosts", hosts.len()));
            }
        }
        // Every host, also one that joins or comes back later.
        order.hosts = None;
        fleet.order(&order).await?;
        Ok(format!("on {} host(s), {batch} at a time", hosts.len()))
    }

    /// An order id newer than every recorded one (ids are times in ms, kept increasing).
    async fn next_order_id(&self) -> Result<i64, String> {
        let fleet = self.fleet.get().expect("in a fleet");
        let (orders, _) = fleet.orders(-1, Duration::ZERO).await?;
        let newest = orders.iter().map(|o| o.id).max().unwrap_or(0);
        Ok(now_ms().max(newest + 1))
    }

    /// Waits until each of `hosts` recorded the outcome of order `id` for `color`. A host
    /// whose deploy failed, that went away, or that did not answer within `patience` fails
    /// the wait, named with its reason.
    async fn wait_for_hosts(
        &self,
        color: Color,
        id: i64,
        hosts: &[String],
        patience: Duration,
    ) -> Result<Vec<HostEnvironment>, String> {
        let fleet = self.fleet.get().expect("in a fleet");
        let started = Instant::now();
        let mut last_seen: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let records = fleet.hosts().await.unwrap_or_default();
            let live: Vec<String> = match fleet.routers().await {
                Ok(reports) => reports.into_iter().map(|r| r.id).collect(),
                Err(_) => hosts.to_vec(),
            };
            let mut done = Vec::new();
            let mut failed = Vec::new();
            for name in hosts {
                let record = records
                    .iter()
                    .find(|h| &h.host == name && h.record.color == color && h.order == id);
                match record.map(|h| (h, &h.record.status)) {
                    Some((host, EnvironmentStatus::Running | EnvironmentStatus::Stopped)) => {
                        done.push(host.clone())
                    }
                    Some((host, EnvironmentStatus::Failed)) => failed.push(format!(
                        "host {name}: {}",
                        host.record.reason.as_deref().unwrap_or("failed")
                    )),
                    Some((_, EnvironmentStatus::Deploying)) => {
                        last_seen.insert(name.clone(), "still deploying".into());
                    }
                    None if !live.contains(name) => failed.push(format!(
                        "host {name}: its router went away (stopped, or lost etcd)"
                    )),
                    None => {
                        last_seen.insert(name.clone(), "has not taken the order".into());
                    }
                }
            }
            if !failed.is_empty() {
                return Err(failed.join("; "));
            }
            if done.len() == hosts.len() {
                return Ok(done);
            }
            if started.elapsed() >= patience {
                let late: Vec<String> = hosts
                    .iter()
                    .filter(|h| !done.iter().any(|d| &d.host == *h))
                    .map(|h| format!("host {h} {}", last_seen.get(h).map_or("", |s| s)))
                    .collect();
                return Err(format!(
                    "no outcome within {}s: {}",
                    patience.as_secs(),
                    late.join("; ")
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops `color` on every host (cleanup, an abandoned deploy) and waits for the hosts
    /// live now to record it. Fails naming the hosts that did not, with why.
    pub(crate) async fn stop_on_hosts(&self, color: Color) -> Result<(), String> {
        let fleet = self.fleet.get().expect("in a fleet");
        let hosts: Vec<String> = fleet.routers().await?.into_iter().map(|r| r.id).collect();
        let order = HostOrder {
            id: self.next_order_id().await?,
            color,
            action: HostAction::Stop,
            hosts: None,
            release: None,
        };
        fleet.order(&order).await?;
        // A host may first finish a deploy it is in the middle of (one order at a time).
        let spec = self.spec(color);
        let patience = spec.ready_timeout + spec.stop_timeout + HOST_SLACK;
        self.wait_for_hosts(color, order.id, &hosts, patience)
            .await
            .map(|_| ())
    }

    /// The tests each host ran of `color`'s `version` through its own router during the
    /// deploy: the failures, named by host; `None` when no host ran them (the deploy did not
    /// test: the tests then run here).
    pub(crate) async fn tests_on_hosts(
        &self,
        color: Color,
        version: Option<&str>,
    ) -> Option<Result<usize, Vec<String>>> {
        let fleet = self.fleet.get()?;
        let hosts = fleet.hosts().await.ok()?;
        let tested: Vec<&HostEnvironment> = hosts
            .iter()
            .filter(|h| {
                h.record.color == color
                    && h.record.version.as_deref() == version
                    && h.record.status == EnvironmentStatus::Running
                    && h.test_failures.is_some()
            })
            .collect();
        if tested.is_empty() {
            return None;
        }
        let failures: Vec<String> = tested
            .iter()
            .flat_map(|h| {
                let failures = h.test_failures.as_deref().unwrap_or_default();
                failures.iter().map(|f| format!("host {}: {f}", h.host))
            })
            .collect();
        Some(if failures.is_empty() {
            Ok(tested.len())
        } else {
            Err(failures)
        })
    }

    /// Every host's record of its instances (for status); none on one machine.
    pub async fn hosts(&self) -> Option<Vec<HostEnvironment>> {
        let fleet = self.fleet.get()?;
        if !Color::ALL.into_iter().any(|c| self.deploys_per_host(c)) {
            return None;
        }
        let mut hosts = fleet.hosts().await.ok()?;
        hosts.sort_by(|a, b| (&a.host, a.record.color).cmp(&(&b.host, b.record.color)));
        Some(hosts)
    }
}
