//! The release state machine: pipeline stages, the traffic shift with analysis gates, rollback, and its recovery rule.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bluegreen_router::{Color, MirrorSnapshot, Split};
use tokio::sync::watch;
use tokio::time::Instant;

use super::analysis::{
    MirrorWindow, WindowStats, fleet_windows, judge, judge_mirror, name_routers,
};
use super::decide::{self, Continuation, Ending, Recovery, ReleaseAsk, Stop};
use super::{Command, CommandError, Controller, EventKind, Gate};
use crate::config::controller::{HookPoint, Stage};
use crate::config::strategy::{Hold, Strategy};
use crate::store::{EnvironmentStatus, StepWrite, Write, now_ms};

pub use super::release_record::{Control, Release, ReleaseKind, ReleaseRequest, ReleaseState};

impl Controller {
    /// The release in progress: the one this daemon drives, or in a fleet the one the leader
    /// drives, as last recorded.
    pub fn active_release(&self) -> Option<Release> {
        let driven = self
            .active
            .lock()
            .expect("lock")
            .as_ref()
            .map(|(r, _)| r.clone());
        driven.or_else(|| {
            let followed = self.followed_release.lock().expect("lock").clone();
            followed.filter(|r| r.ended_ms.is_none() && !self.is_leading())
        })
    }

    /// In a fleet, away from the leader: reads the newest release, for status and the live
    /// views.
    pub(crate) async fn follow_release(&self) {
        match self.releases(1).await {
            Ok(releases) => {
                *self.followed_release.lock().expect("lock") = releases.into_iter().next()
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the release in progress"),
        }
    }

    pub async fn releases(&self, limit: usize) -> Result<Vec<Release>, CommandError> {
        let stored = self
            .store
            .releases(limit)
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        stored
            .into_iter()
            .map(|r| Release::from_stored(r).map_err(CommandError::Failed))
            .collect()
    }

    pub async fn release_steps(
        &self,
        id: i64,
    ) -> Result<Vec<crate::store::StepRecord>, CommandError> {
        self.store
            .steps(id)
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))
    }

    /// Records the release (compare-and-set on the revision it was read at) with its event.
    async fn save_release(
        &self,
        release: &mut Release,
        kind: EventKind,
        message: &str,
    ) -> Result<(), CommandError> {
        self.save_release_with(release, None, kind, message)
            .await
            .map(|_| ())
    }

    /// Records the release together with a change to its steps; returns the step's id.
    async fn save_release_with(
        &self,
        release: &mut Release,
        step: Option<StepWrite>,
        kind: EventKind,
        message: &str,
    ) -> Result<Option<i64>, CommandError> {
        tracing::info!(release = release.id, %kind, "{message}");
        let committed = self
            .store
            .commit(Write {
                release: Some((release.revision, release.to_stored())),
                steps: step.map(|step| (release.id, step)),
                ..Write::event(kind, message, None)
            })
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        release.revision = committed.revision;
        if let Some(id) = committed.release_id {
            release.id = id;
        }
        if let Some((current, _)) = self.active.lock().expect("lock").as_mut()
            && current.id == release.id
        {
            *current = release.clone();
        }
        self.notify(kind, message, Some(release.id));
        Ok(committed.step_id)
    }

    /// Opens a step row of a release; returns its id and revision for closing it.
    async fn start_step(&self, release: i64, name: &str) -> Result<(i64, i64), String> {
        let committed = self
            .store
            .commit(Write {
                steps: Some((
                    release,
                    StepWrite::Start {
                        name: name.to_string(),
                        detail: String::new(),
                    },
                )),
                ..Write::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok((committed.step_id.unwrap_or(0), committed.revision))
    }

    /// Closes a step row opened by [`Controller::start_step`].
    async fn end_step(&self, release: i64, (id, revision): (i64, i64), status: &str, detail: &str) {
        let write = Write {
            steps: Some((
                release,
                StepWrite::End {
                    id,
                    revision,
                    status: status.to_string(),
                    detail: detail.to_string(),
                },
            )),
            ..Write::default()
        };
        if let Err(e) = self.store.commit(write).await {
            tracing::error!(error = %e, "cannot record the end of a step");
        }
    }

    /// Refuses anything that would change traffic by hand while a release runs.
    pub fn refuse_during_release(&self, what: &str) -> Result<(), CommandError> {
        match self.active_release() {
            Some(r) => Err(CommandError::Refused(format!(
                "release #{} ({} to {}) is {}; {what} would fight it. Use promote, pause, resume or abort (rollback aborts it)",
                r.id,
                r.version.as_deref().unwrap_or("shift"),
                r.color,
                r.state.as_str()
            ))),
            None => Ok(()),
        }
    }

    /// Checks and records a new release, then runs it in the background.
    pub async fn start_release(
        self: &Arc<Self>,
        request: ReleaseRequest,
    ) -> Result<Release, CommandError> {
        if let Some(version) = &request.version {
            for color in Color::ALL {
                self.provider(color)
                    .check_version(version)
                    .map_err(CommandError::Refused)?;
            }
        }
        // Held from the decision to the recording, so two asks never both start a release.
        let starting = self.starting.lock().await;
        let split = self.plane.split();
        let deployed = Color::ALL.map(|color| {
            self.provider(color).runs_elsewhere()
                || self.environment(color).status != EnvironmentStatus::Stopped
        });
        let running = self.active_release();
        let plan = decide::start_release(&ReleaseAsk {
            kind: request.kind,
            version: request.version.as_deref(),
            to: request.to,
            running: running.as_ref(),
            split,
            deployed,
        })
        .map_err(CommandError::Refused)?;
        let (color, live) = (plan.color, plan.from);
        let strategy = if plan.first {
            Strategy::instant()
        } else {
            self.config()
                .controller
                .strategy(request.strategy.as_deref())
                .map_err(CommandError::Refused)?
        };
        let target = self.environment(color);
        if request.kind == ReleaseKind::Shift {
            if !self.provider(color).runs_elsewhere() && target.status != EnvironmentStatus::Running
            {
                return Err(CommandError::Refused(format!(
                    "{color} is not deployed ({}); run `bluegreen deploy --environment {color} --version V` first",
                    serde_json::to_value(target.status).expect("status")
                )));
            }
            self.plane
                .check_split(Split::all(color))
                .map_err(CommandError::Refused)?;
        }
        let from_version = self.environment(live).version;
        let mut release = Release::new(request, &plan, strategy, target.version, from_version);
        let message = release.start_message();
        self.save_release(&mut release, EventKind::Release, &message)
            .await?;
        if !plan.first {
            self.warn_of_differences(live, color, release.id).await;
        }
        self.run_in_background(release.clone(), Control::default(), None);
        drop(starting);
        Ok(release)
    }

    /// Makes `release` the active one and runs it (from `from`, after an upgrade) on a task
    /// that a hand-over can stop.
    fn run_in_background(
        self: &Arc<Self>,
        release: Release,
        control: Control,
        from: Option<Continuation>,
    ) {
        let (control, receiver) = watch::channel(control);
        *self.active.lock().expect("lock") = Some((release.clone(), control));
        let controller = Arc::clone(self);
        let runner =
            tokio::spawn(async move { controller.run_release(release, receiver, from).await });
        *self.runner.lock().expect("lock") = Some(runner.abort_handle());
    }

    /// After a binary upgrade: the release the previous process was running goes on where it
    /// was (docs/lifecycle.md); one that cannot is settled by the restart rule.
    pub(crate) async fn continue_release(self: &Arc<Self>) {
        let release = match self.releases(1).await {
            Ok(releases) => releases.into_iter().next(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the release to continue");
                return;
            }
        };
        let config = self.config();
        let stages: Vec<&str> = match release.as_ref().map(|r| r.kind) {
            Some(ReleaseKind::Shift) => vec![Stage::Switch.name()],
            _ => config.controller.pipeline.iter().map(Stage::name).collect(),
        };
        match decide::after_upgrade(release.as_ref(), &stages, now_ms()) {
            Ok(None) => {}
            Ok(Some(from)) => {
                let mut release = release.expect("a release to continue");
                let message = format!(
                    "release #{} goes on after the upgrade: {} stage ({}, {}% on {})",
                    release.id,
                    release.stage,
                    release.state.as_str(),
                    release.percent,
                    release.color
                );
                // The step the previous process was holding ends here; the runner opens its own.
                let interrupt = Some(StepWrite::InterruptRunning);
                if let Err(e) = self
                    .save_release_with(&mut release, interrupt, EventKind::Recover, &message)
                    .await
                {
                    tracing::warn!(error = %e, "cannot record that the release goes on");
                }
                let control = Control {
                    paused: release.paused,
                    ..Control::default()
                };
                self.run_in_background(release, control, Some(from));
            }
            Err(why) => {
                tracing::warn!("the release cannot go on after the upgrade: {why}");
                self.settle_interrupted_release().await;
            }
        }
    }

    /// A release between colors configured differently says so in its events.
    async fn warn_of_differences(&self, live: Color, color: Color, release: i64) {
        let differences: Vec<String> = self
            .diff(live, color)
            .into_iter()
            .filter(|d| d.key.starts_with("spec."))
            .map(|d| format!("{} ({} vs {})", &d.key[5..], d.values[1], d.values[0]))
            .collect();
        if !differences.is_empty() {
            self.event(
                EventKind::Warning,
                &format!(
                    "{color} is not configured like {live}: {}; see `bluegreen diff {live} {color}`",
                    differences.join(", ")
                ),
                Some(release),
            )
            .await;
        }
    }

    /// Sends an operator's request to the running release.
    pub async fn control(
        &self,
        gate: Gate,
        reason: Option<String>,
    ) -> Result<String, CommandError> {
        let action = gate.as_str();
        let message = {
            let active = self.active.lock().expect("lock");
            let Some((release, control)) = active.as_ref() else {
                return Err(CommandError::Refused(format!(
                    "{action}: no release or shift is running; see `bluegreen status`"
                )));
            };
            let shifting = matches!(
                release.state,
                ReleaseState::Mirroring | ReleaseState::Shifting | ReleaseState::Monitoring
            );
            match gate {
                Gate::Promote { .. } if !shifting => {
                    return Err(CommandError::Refused(format!(
                        "promote: release #{} is {}, not shifting traffic yet; promote applies to a running shift",
                        release.id,
                        release.state.as_str()
                    )));
                }
                Gate::Promote { full } => {
                    control.send_modify(|c| {
                        c.promotions += 1;
                        c.full |= full;
                    });
                    if full {
                        format!("release #{}: promoting straight to 100%", release.id)
                    } else {
                        format!("release #{}: promoting to the next step", release.id)
                    }
                }
                Gate::Pause => {
                    control.send_modify(|c| c.paused = true);
                    format!(
                        "release #{} paused: steps hold (analysis still runs and can roll back)",
                        release.id
                    )
                }
                Gate::Resume => {
                    control.send_modify(|c| c.paused = false);
                    format!("release #{} resumed", release.id)
                }
                Gate::Abort => {
                    let why = reason.unwrap_or_else(|| "aborted by operator".into());
                    control.send_modify(|c| c.abort = Some(why.clone()));
                    format!("release #{} aborting: {why}", release.id)
                }
            }
        };
        self.event(EventKind::Gate(gate), &message, None).await;
        Ok(message)
    }

    async fn run_release(
        self: Arc<Self>,
        mut release: Release,
        mut control: watch::Receiver<Control>,
        from: Option<Continuation>,
    ) {
        let _exclusive = self.exclusive.lock().await;
        let outcome = self.drive(&mut release, &mut control, from).await;
        // A mirror the release started ends with it, however it ended.
        let _ = self.plane.set_mirror(None);
        if outcome.is_err() {
            let why = "the deploy was aborted";
            self.abandon_deploy(release.color, Some(release.id), EventKind::Stopped, why)
                .await;
        }
        let (state, reason) = match decide::ending(outcome, release.traffic_moved) {
            Ending::Succeeded => (ReleaseState::Succeeded, self.success_message(&release)),
            Ending::Failed(reason) => (ReleaseState::Failed, reason),
            Ending::Aborted(reason) => (ReleaseState::Aborted, reason),
            Ending::RollBack(reason) => match self.roll_back_release(&mut release, &reason).await {
                Ok(message) => (ReleaseState::RolledBack, format!("{reason}; {message}")),
                Err(e) => (
                    ReleaseState::Failed,
                    format!("{reason}; and the rollback failed: {e}"),
                ),
            },
        };
        if state != ReleaseState::Succeeded {
            self.roll_back_schema(&release).await;
        }
        release.state = state;
        release.ended_ms = Some(now_ms());
        release.step_ends_ms = None;
        release.reason = Some(reason.clone());
        let kind = match state {
            ReleaseState::Succeeded => EventKind::Succeeded,
            ReleaseState::RolledBack => EventKind::RolledBack,
            ReleaseState::Aborted => EventKind::Aborted,
            _ => EventKind::Failed,
        };
        let message = format!("release #{} {}: {reason}", release.id, state.as_str());
        if let Err(e) = self.save_release(&mut release, kind, &message).await {
            tracing::error!(error = %e, "cannot record the end of the release");
        }
        *self.active.lock().expect("lock") = None;
    }

    fn success_message(&self, release: &Release) -> String {
        let old = self.environment(release.from_color);
        let warm = match old.scale_down_at_ms {
            Some(at) if old.status == EnvironmentStatus::Running => format!(
                "; {} stays warm until {} (rollback is a table swap until then)",
                release.from_color,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(at.max(0) as u64)
                )
            ),
            _ => String::new(),
        };
        format!(
            "{} {} is live{warm}",
            release.color,
            release.version.as_deref().unwrap_or("")
        )
    }

    /// Records the stage, runs it, records how it ended.
    async fn stage<T>(
        &self,
        release: &mut Release,
        name: &str,
        state: ReleaseState,
        work: impl std::future::Future<Output = Result<T, Stop>>,
    ) -> Result<T, Stop> {
        release.state = state;
        release.stage = name.to_string();
        let step = self
            .save_release_with(
                release,
                Some(StepWrite::Start {
                    name: name.to_string(),
                    detail: String::new(),
                }),
                EventKind::Stage,
                &format!("release #{}: {name}", release.id),
            )
            .await
            .map_err(|e| Stop::Failed(e.to_string()))?
            .unwrap_or(0);
        let opened = release.revision;
        let outcome = work.await;
        let (status, detail) = match &outcome {
            Ok(_) => ("ok", String::new()),
            Err(Stop::Failed(r) | Stop::Aborted(r) | Stop::RollBack(r)) => ("failed", r.clone()),
        };
        self.end_step(release.id, (step, opened), status, &detail)
            .await;
        outcome
    }

    async fn drive(
        self: &Arc<Self>,
        release: &mut Release,
        control: &mut watch::Receiver<Control>,
        mut from: Option<Continuation>,
    ) -> Result<(), Stop> {
        let stages = match release.kind {
            ReleaseKind::Release => self.config().controller.pipeline.clone(),
            ReleaseKind::Shift => vec![Stage::Switch],
        };
        let first = from.map_or(0, |c| c.stage);
        for stage in stages.into_iter().skip(first) {
            if let Some(reason) = control.borrow().abort.clone() {
                return Err(Stop::Aborted(reason));
            }
            // Only the stage in progress at the hand-over picks up where it was.
            let from = from.take();
            match &stage {
                Stage::Deploy => self.deploy_stage(release, control).await?,
                Stage::Test => self.test_stage(release, control).await?,
                Stage::Mirror => self.mirror_stage(release, control).await?,
                Stage::Run { name, argv } => self.user_stage(release, control, name, argv).await?,
                Stage::Switch => self.switch_stage(release, control, from).await?,
                Stage::Cleanup => self.cleanup_stage(release).await?,
            }
        }
        Ok(())
    }

    /// `pre_deploy`, the deploy to the new color, `post_deploy`.
    async fn deploy_stage(
        &self,
        release: &mut Release,
        control: &watch::Receiver<Control>,
    ) -> Result<(), Stop> {
        let (color, id) = (release.color, Some(release.id));
        let facts = self.facts(color, Some(release));
        let version = release.version.clone().unwrap_or_default();
        let env = release.extra_env.clone();
        let expand = self.expand_schema(release, control).await;
        if let Err(stop) = expand {
            // Recorded as the deploy stage's failure: traffic never moved.
            let failed = async { Err::<(), Stop>(stop) };
            return self
                .stage(release, "deploy", ReleaseState::Deploying, failed)
                .await;
        }
        let work = async {
            self.hook(HookPoint::PreDeploy, &facts, id)
                .await
                .map_err(Stop::Failed)?;
            self.deploy(color, &version, env, id)
                .await
                .map_err(|e| Stop::Failed(e.to_string()))?;
            self.hook(HookPoint::PostDeploy, &facts, id)
                .await
                .map_err(Stop::Failed)
        };
        let work = until_aborted(control.clone(), work);
        self.stage(release, "deploy", ReleaseState::Deploying, work)
            .await
    }

    /// `migrate_expand`, before the new version deploys, then the live (old) version's tests
    /// again through the router: it must still work against the expanded schema, or the
    /// release stops here, before anything deploys or any traffic moves.
    async fn expand_schema(
        &self,
        release: &mut Release,
        control: &watch::Receiver<Control>,
    ) -> Result<(), Stop> {
        if !self
            .config()
            .controller
            .hooks
            .commands
            .contains_key(&HookPoint::MigrateExpand)
        {
            return Ok(());
        }
        let facts = self.facts(release.color, Some(release));
        let (live, id) = (release.from_color, release.id);
        release.expanded = true;
        let work = async {
            self.hook(HookPoint::MigrateExpand, &facts, Some(id))
                .await
                .map_err(Stop::Failed)?;
            // Nothing runs on the live color yet (a first release): nothing to break.
            if self.plane.healthy_count(live) == 0 {
                return Ok(());
            }
            let failed = self
                .failed_tests(live, None)
                .await
                .map_err(|e| Stop::Failed(e.to_string()))?;
            if failed.is_empty() {
                return Ok(());
            }
            Err(Stop::Failed(format!(
                "the live {live} {} fails its tests against the expanded schema ({}); nothing was deployed and traffic never moved",
                self.instances_record(live).version.as_deref().unwrap_or(""),
                failed.join("; ")
            )))
        };
        until_aborted(control.clone(), work).await
    }

    /// A release that ran `migrate_expand` and ends without its version live: the expanded
    /// schema stays (the old version works with it, as its tests showed); `migrate_rollback`
    /// runs when configured.
    async fn roll_back_schema(&self, release: &Release) {
        if !release.expanded {
            return;
        }
        let facts = self.facts(release.color, Some(release));
        if let Err(e) = self
            .hook(HookPoint::MigrateRollback, &facts, Some(release.id))
            .await
        {
            tracing::warn!(error = %e, "migrate_rollback hook failed");
        }
    }

    /// The smoke tests of the new color; a failure blocks the switch.
    async fn test_stage(
        &self,
        release: &mut Release,
        control: &watch::Receiver<Control>,
    ) -> Result<(), Stop> {
        let color = release.color;
        let snapshot = release.clone();
        let work = async {
            // In a fleet that deploys per host, each host tested its own through its router.
            if self.deploys_per_host(color) {
                match self
                    .tests_on_hosts(color, snapshot.version.as_deref())
                    .await
                {
                    Some(Ok(hosts)) => {
                        let message = format!(
                            "release #{}: the tests of {color} passed on {hosts} host(s), each through its own router",
                            snapshot.id
                        );
                        self.event(EventKind::Test, &message, Some(snapshot.id))
                            .await;
                        return Ok(());
                    }
                    Some(Err(failed)) => {
                        return Err(Stop::Failed(format!(
                            "tests of {color} failed, the switch is blocked ({}); {color} keeps running for inspection through each host's preview route",
                            failed.join("; ")
                        )));
                    }
                    None => {}
                }
            }
            let failed = self
                .failed_tests(color, Some(&snapshot))
                .await
                .map_err(|e| Stop::Failed(e.to_string()))?;
            if failed.is_empty() {
                Ok(())
            } else {
                Err(Stop::Failed(format!(
                    "tests of {color} failed, the switch is blocked ({}); {color} keeps running for inspection through the preview route",
                    failed.join("; ")
                )))
            }
        };
        let work = until_aborted(control.clone(), work);
        self.stage(release, "test", ReleaseState::Testing, work)
            .await
    }

    /// Shadow traffic before the switch: a share of the live color's requests is copied to the
    /// new color and the answers compared for `mirror.duration` (`promote` ends it sooner).
    /// Too many differing or slow answers fail the release before any traffic moved.
    async fn mirror_stage(
        &self,
        release: &mut Release,
        control: &mut watch::Receiver<Control>,
    ) -> Result<(), Stop> {
        let Some(spec) = self.config().controller.mirror.clone() else {
            return Ok(());
        };
        // A first release has no live color whose requests could be copied.
        if release.first {
            return Ok(());
        }
        let color = release.color;
        release.state = ReleaseState::Mirroring;
        release.stage = "mirror".into();
        release.mirror = None;
        let mut shown = release.clone();
        let work = async {
            // Counted from before the first copy.
            let from = self.plane.status().mirror;
            self.plane
                .set_mirror(Some(spec.rule(shown.id, color)))
                .map_err(Stop::Failed)?;
            let message = format!(
                "release #{}: mirroring {}% of {}'s {} requests to {color} for {}",
                shown.id,
                spec.percent,
                shown.from_color,
                spec.methods
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join("/"),
                crate::duration::format(spec.duration)
            );
            self.event(EventKind::Mirror, &message, Some(shown.id))
                .await;
            self.watch_mirror(&mut shown, control, &from, spec.duration)
                .await
        };
        let outcome = self
            .stage(release, "mirror", ReleaseState::Mirroring, work)
            .await;
        release.mirror = shown.mirror;
        if outcome.is_err() || !spec.beside_canary {
            let _ = self.plane.set_mirror(None);
        }
        if outcome.is_ok()
            && let Some(verdict) = &release.mirror
        {
            let message = format!(
                "release #{}: the mirror of {color} passed: {}",
                release.id, verdict.note
            );
            self.event(EventKind::Mirror, &message, Some(release.id))
                .await;
        }
        outcome
    }

    /// Judges the mirror every analysis interval until `duration` is over and it was judged
    /// (or `promote`); shows each verdict in `status`.
    async fn watch_mirror(
        &self,
        shown: &mut Release,
        control: &mut watch::Receiver<Control>,
        from: &MirrorSnapshot,
        duration: Duration,
    ) -> Result<(), Stop> {
        let config = self.config();
        let spec = &config.controller.analysis;
        let color = shown.color;
        let started = Instant::now();
        let mut tick = tokio::time::interval(spec.interval.min(Duration::from_millis(500)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_judged = Instant::now();
        let mut judged = !spec.wait_for_data;
        let seen_promotions = control.borrow().promotions;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = control.changed() => {
                    if changed.is_err() {
                        return Err(Stop::Aborted("the daemon is stopping".into()));
                    }
                }
            }
            let state = control.borrow().clone();
            if let Some(reason) = state.abort {
                return Err(Stop::Aborted(reason));
            }
            if state.promotions != seen_promotions {
                return Ok(());
            }
            if last_judged.elapsed() >= spec.interval {
                last_judged = Instant::now();
                let now = self.plane.status().mirror;
                let window = MirrorWindow::between(color, from, &now, started.elapsed());
                let verdict = judge_mirror(spec, window);
                judged |= verdict.judged;
                let breach = verdict.breach.clone();
                shown.mirror = Some(verdict);
                if let Some(active) = self.active.lock().expect("lock").as_mut() {
                    active.0.mirror = shown.mirror.clone();
                    active.0.state = ReleaseState::Mirroring;
                    active.0.stage = "mirror".into();
                }
                if let Some(breach) = breach {
                    return Err(Stop::Failed(format!(
                        "mirror of {color}: {breach}; no traffic moved, {color} keeps running for inspection (`bluegreen diff --mirror` shows the differing answers)"
                    )));
                }
            }
            if started.elapsed() >= duration && judged && !state.paused {
                return Ok(());
            }
        }
    }

    /// A `run ./script` stage of the pipeline: a failure after traffic moved rolls back.
    async fn user_stage(
        &self,
        release: &mut Release,
        control: &watch::Receiver<Control>,
        name: &str,
        argv: &[String],
    ) -> Result<(), Stop> {
        let facts = self.facts(release.color, Some(release));
        let moved = release.traffic_moved;
        let log = self.logs_dir.join("hooks.log");
        let timeout = self.config().controller.hooks.timeout;
        let work = async {
            super::hooks::run(name, argv, &facts, &[], timeout, &log)
                .await
                .map(|_| ())
                .map_err(|e| {
                    if moved {
                        Stop::RollBack(e)
                    } else {
                        Stop::Failed(e)
                    }
                })
        };
        let work = until_aborted(control.clone(), work);
        self.stage(release, name, ReleaseState::Running, work).await
    }

    /// `migrate_expand` and `pre_switch`, the shift, `post_switch`. A shift continued after
    /// an upgrade does not run the hooks before it again once traffic has moved.
    async fn switch_stage(
        &self,
        release: &mut Release,
        control: &mut watch::Receiver<Control>,
        from: Option<Continuation>,
    ) -> Result<(), Stop> {
        let (color, id) = (release.color, Some(release.id));
        let facts = self.facts(color, Some(release));
        if !(from.is_some() && release.traffic_moved) {
            // A shift deploys nothing: its expand runs here, before any traffic moves.
            if release.kind == ReleaseKind::Shift {
                self.expand_schema(release, control).await?;
            }
            self.hook(HookPoint::PreSwitch, &facts, id)
                .await
                .map_err(Stop::Failed)?;
        }
        self.shift(release, control, from).await?;
        let facts = self.facts(color, Some(release));
        self.hook(HookPoint::PostSwitch, &facts, id)
            .await
            .map_err(Stop::RollBack)
    }

    /// The old color stays warm for `scale_down_delay`, then a timer cleans it up.
    async fn cleanup_stage(self: &Arc<Self>, release: &Release) -> Result<(), Stop> {
        let old = release.from_color;
        let delay = self.config().controller.scale_down_delay;
        if self.environment(old).status == EnvironmentStatus::Stopped {
            return Ok(());
        }
        if delay.is_zero() {
            self.clean_up(old).await;
            return Ok(());
        }
        let at = now_ms() + delay.as_millis() as i64;
        self.update_environment(old, Some(release.id), |record| {
            record.scale_down_at_ms = Some(at);
            Some((
                EventKind::Cleanup,
                format!(
                    "{old} {} stays warm for {} (scale_down_delay), then stops",
                    record.version.as_deref().unwrap_or(""),
                    crate::duration::format(delay)
                ),
            ))
        })
        .await
        .map_err(|e| Stop::Failed(e.to_string()))?;
        self.schedule_scale_down(old, at);
        Ok(())
    }

    /// The shift: each step's weight, held while analysis judges the new color, then the
    /// monitor window at 100 %.
    async fn shift(
        &self,
        release: &mut Release,
        control: &mut watch::Receiver<Control>,
        from: Option<Continuation>,
    ) -> Result<(), Stop> {
        let color = release.color;
        self.plane
            .check_split(Split::all(color))
            .map_err(|e| Stop::Failed(format!("cannot shift: {e}")))?;
        // The old color's numbers before the shift: the baseline once it has no traffic left.
        let now = Instant::now();
        let before = self
            .snapshots_since(now - Duration::from_secs(60))
            .map(|(at, snapshots)| {
                WindowStats::between(
                    &snapshots[release.from_color.index()],
                    &self.snapshots()[release.from_color.index()],
                    now.duration_since(at),
                )
            });
        let mut baseline = before;
        // Shadow traffic beside the canary: copies of the old color's share go on being
        // compared (started here when no mirror stage started them).
        if let Some(spec) = self.config().controller.mirror.as_ref()
            && spec.beside_canary
            && !release.first
            && self.plane.status().mirror.to != Some(color)
        {
            self.plane
                .set_mirror(Some(spec.rule(release.id, color)))
                .map_err(Stop::Failed)?;
        }
        let steps = release.strategy.steps.clone();
        // After an upgrade: the step in progress, with what was left of its hold.
        let mut index = match from {
            Some(from) if from.monitoring => steps.len(),
            Some(from) => from.step.min(steps.len().saturating_sub(1)),
            None => 0,
        };
        let mut left = from.and_then(|from| from.left);
        let mut seen_promotions = control.borrow().promotions;
        while index < steps.len() {
            let step = steps[index];
            let hold = match (left.take(), step.hold) {
                (Some(left), Hold::For(_)) => Hold::For(left),
                (_, hold) => hold,
            };
            release.state = ReleaseState::Shifting;
            release.stage = "switch".into();
            release.step = index;
            release.percent = step.percent;
            release.traffic_moved = true;
            let message = format!(
                "release #{}: step {}/{}: {color} {}%",
                release.id,
                index + 1,
                steps.len(),
                step.percent
            );
            // Recorded before the router acts: a crash right after restarts into a known rule.
            self.save_release(release, EventKind::Step, &message)
                .await
                .map_err(|e| Stop::RollBack(e.to_string()))?;
            let split = split_with(color, step.percent);
            self.apply_internal(Command::Weights(split))
                .await
                .map_err(|e| {
                    Stop::RollBack(format!("cannot set {color} to {}%: {e}", step.percent))
                })?;
            self.confirm_release_step(release.id, &format!("{color} at {}%", step.percent))
                .await;
            let db_step = self
                .start_step(release.id, &format!("{}%", step.percent))
                .await
                .map_err(Stop::RollBack)?;
            let outcome = self
                .hold(release, control, hold, &mut baseline, &mut seen_promotions)
                .await;
            self.end_held_step(db_step, outcome.is_ok(), release).await;
            index = decide::next_step(index, steps.len(), outcome? == Held::Full);
            if step.percent == 100 {
                break;
            }
        }
        // Every request is the new color's now: nothing is left to copy.
        let _ = self.plane.set_mirror(None);
        // A first release has nothing to go back to: watching it could only end in a
        // rollback to nothing.
        let mut window = self.config().controller.monitor_window;
        if let Some(from) = from.filter(|from| from.monitoring) {
            window = from.left.unwrap_or(window);
        }
        if !window.is_zero() && !release.first {
            release.state = ReleaseState::Monitoring;
            let message = format!(
                "release #{}: {color} has 100%; monitoring for {}",
                release.id,
                crate::duration::format(window)
            );
            self.save_release(release, EventKind::Monitor, &message)
                .await
                .map_err(|e| Stop::RollBack(e.to_string()))?;
            let step = self
                .start_step(release.id, "monitor")
                .await
                .map_err(Stop::RollBack)?;
            let outcome = self
                .hold(
                    release,
                    control,
                    Hold::For(window),
                    &mut baseline,
                    &mut seen_promotions,
                )
                .await;
            self.end_held_step(step, outcome.is_ok(), release).await;
            outcome?;
        }
        Ok(())
    }

    /// Closes a shift step's row with the last analysis note as its detail.
    async fn end_held_step(&self, step: (i64, i64), ok: bool, release: &Release) {
        let detail = release
            .verdict
            .as_ref()
            .map(|v| v.note.clone())
            .unwrap_or_default();
        let status = if ok { "ok" } else { "failed" };
        self.end_step(release.id, step, status, &detail).await;
    }

    /// Holds a step: judges the new color every analysis interval, follows pause, promote and
    /// abort, and ends when the hold is over.
    async fn hold(
        &self,
        release: &mut Release,
        control: &mut watch::Receiver<Control>,
        hold: Hold,
        baseline: &mut Option<WindowStats>,
        seen_promotions: &mut u64,
    ) -> Result<Held, Stop> {
        let config = self.config();
        let spec = &config.controller.analysis;
        let color = release.color;
        let old = release.from_color;
        let started = Instant::now();
        // Every router's counters in a fleet (this router's alone on one machine).
        let from = self.counters_by_router().await;
        // Shadow traffic beside the canary: copies of the old color's requests still compared.
        let mirror_from = Some(self.plane.status().mirror).filter(|m| m.to == Some(color));
        release.verdict = None;
        let mut remaining = match hold {
            Hold::For(d) => Some(d),
            Hold::UntilPromoted => None,
        };
        let mut last_tick = Instant::now();
        let mut tick = tokio::time::interval(spec.interval.min(Duration::from_millis(500)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_judged = Instant::now();
        // A hold of zero (the 100 % step) needs no judgement: the monitor window follows.
        let mut judged = hold == Hold::For(Duration::ZERO) || !spec.wait_for_data;
        loop {
            let paused = control.borrow().paused;
            release.step_ends_ms = match (remaining, paused) {
                (Some(left), false) => Some(now_ms() + left.as_millis() as i64),
                _ => None,
            };
            if let Some(left) = remaining
                && left.is_zero()
                && judged
            {
                return Ok(Held::Done);
            }
            tokio::select! {
                _ = tick.tick() => {}
                changed = control.changed() => {
                    if changed.is_err() {
                        return Err(Stop::Aborted("the daemon is stopping".into()));
                    }
                }
            }
            let now = Instant::now();
            let state = control.borrow().clone();
            if let Some(reason) = state.abort {
                return Err(Stop::Aborted(reason));
            }
            if state.promotions != *seen_promotions {
                *seen_promotions = state.promotions;
                return Ok(if state.full { Held::Full } else { Held::Done });
            }
            if state.paused != release.paused {
                release.paused = state.paused;
                let kind = if state.paused {
                    EventKind::Paused
                } else {
                    EventKind::Resumed
                };
                let _ = self
                    .save_release(release, kind, &format!("release #{} {kind}", release.id))
                    .await;
            }
            if let Some(left) = remaining.as_mut()
                && !state.paused
            {
                *left = left.saturating_sub(now.duration_since(last_tick));
            }
            last_tick = now;
            let environment = self.environment(color);
            if environment.status == EnvironmentStatus::Failed {
                return Err(Stop::RollBack(format!(
                    "{color} failed: {}",
                    environment.reason.unwrap_or_default()
                )));
            }
            if now.duration_since(last_judged) < spec.interval {
                continue;
            }
            last_judged = now;
            let current = self.counters_by_router().await;
            let elapsed = now.duration_since(started);
            let (total, routers) = fleet_windows(&from, &current, elapsed);
            let [new, old_now] = [color, old].map(|c| total[c.index()].clone());
            if old_now.requests >= spec.min_requests {
                *baseline = Some(old_now);
            }
            let split = self.plane.split();
            let weights = (split.weight(color), split.weight(old));
            let verdict = judge(spec, new, baseline.clone(), weights);
            let verdict = name_routers(spec, verdict, &routers, (color, old), weights);
            let mut breach = verdict.breach.clone();
            judged |= verdict.judged;
            release.verdict = Some(verdict);
            if let Some(mirror_from) = &mirror_from {
                let now = self.plane.status().mirror;
                let window = MirrorWindow::between(color, mirror_from, &now, elapsed);
                let verdict = judge_mirror(spec, window);
                if breach.is_none()
                    && let Some(mirror_breach) = &verdict.breach
                {
                    breach = Some(mirror_breach.clone());
                }
                release.mirror = Some(verdict);
            }
            if let Some(active) = self.active.lock().expect("lock").as_mut() {
                active.0 = release.clone();
            }
            if let Some(breach) = breach {
                return Err(Stop::RollBack(format!("analysis of {color}: {breach}")));
            }
        }
    }

    /// Sends all traffic back to the old color (still warm), runs `on_rollback`.
    async fn roll_back_release(
        &self,
        release: &mut Release,
        reason: &str,
    ) -> Result<String, CommandError> {
        let old = release.from_color;
        let started = Instant::now();
        self.apply_internal(Command::ReturnTo(old)).await?;
        let swapped = started.elapsed();
        self.confirm_release_step(release.id, &format!("all traffic back on {old}"))
            .await;
        let message = format!(
            "all traffic back on {old} {} in {:.1}ms",
            release.from_version.as_deref().unwrap_or(""),
            swapped.as_secs_f64() * 1000.0
        );
        let mut facts = self.facts(release.color, Some(release));
        facts.reason = Some(reason.to_string());
        if let Err(e) = self
            .hook(HookPoint::OnRollback, &facts, Some(release.id))
            .await
        {
            tracing::warn!(error = %e, "on_rollback hook failed");
        }
        Ok(message)
    }

    /// The rule for a release a previous daemon left unfinished (docs/lifecycle.md): before
    /// any traffic moved it is abandoned (the live color never changed); after, it is rolled
    /// back to the old color, whose instances kept running.
    pub(crate) async fn settle_interrupted_release(&self) {
        let Ok(releases) = self.releases(1).await else {
            return;
        };
        let Some(mut release) = releases.into_iter().next() else {
            return;
        };
        let (state, reason) = match decide::after_restart(Some(&release)) {
            Recovery::Nothing => return,
            Recovery::Abandon { state, reason } => (state, reason),
            Recovery::RollBackTo { color, reason } => {
                // Wait for the old color's instances to answer again before moving traffic back.
                let ready_timeout = self.spec(color).ready_timeout;
                let _ = self.wait_healthy(color, 1, ready_timeout).await;
                match self.apply_internal(Command::ReturnTo(color)).await {
                    Ok(_) => (ReleaseState::RolledBack, reason),
                    Err(e) => (
                        ReleaseState::Failed,
                        format!(
                            "the daemon stopped while the release was {}; rolling back on restart failed: {e}",
                            release.state.as_str()
                        ),
                    ),
                }
            }
        };
        self.roll_back_schema(&release).await;
        release.state = state;
        release.ended_ms = Some(now_ms());
        release.reason = Some(reason.clone());
        let message = format!("release #{}: {reason}", release.id);
        let _ = self
            .save_release_with(
                &mut release,
                Some(StepWrite::InterruptRunning),
                EventKind::Recovered,
                &message,
            )
            .await;
    }

    /// `rollback --to VERSION`: the idle color runs it already (a table swap), or it is
    /// deployed there first (which takes as long as a deploy).
    pub async fn rollback_to_version(&self, version: &str) -> Result<String, CommandError> {
        self.refuse_during_release("a rollback to a version")?;
        let _exclusive = self.exclusive.lock().await;
        let split = self.plane.split();
        let live = split.sole_color().ok_or_else(|| {
            CommandError::Refused(format!(
                "traffic is split ({split}); run `bluegreen rollback` without --to first"
            ))
        })?;
        if self.environment(live).version.as_deref() == Some(version) {
            return Ok(format!(
                "unchanged: {live} already runs {version} and is live"
            ));
        }
        let idle = live.other();
        let record = self.environment(idle);
        let mut deployed = String::new();
        if record.version.as_deref() != Some(version) || record.status != EnvironmentStatus::Running
        {
            let env = if record.version.as_deref() == Some(version) {
                record.extra_env.clone()
            } else {
                BTreeMap::new()
            };
            deployed = format!("{}; ", self.deploy(idle, version, env, None).await?);
        }
        let outcome = self
            .apply_internal(Command::Switch {
                to: idle,
                from: None,
            })
            .await?;
        Ok(format!("{deployed}{}", outcome.message))
    }

    /// `rollback` after cleanup: the old color was stopped, so its version is deployed again first.
    pub async fn redeploy_for_rollback(&self) -> Result<Option<String>, CommandError> {
        let Some(back) = self.rollback_target().await else {
            return Ok(None);
        };
        let record = self.environment(back);
        if self.provider(back).runs_elsewhere()
            || record.status == EnvironmentStatus::Running
            || self.plane.split().weight(back) > 0
        {
            return Ok(None);
        }
        let Some(version) = record.version.clone() else {
            return Ok(None);
        };
        let _exclusive = self.exclusive.lock().await;
        let message = self
            .deploy(back, &version, record.extra_env.clone(), None)
            .await?;
        Ok(Some(format!(
            "{back} had been scaled down, so {version} was deployed again ({message})"
        )))
    }
}

#[derive(PartialEq)]
enum Held {
    Done,
    /// Promoted with --full: go to 100 % now.
    Full,
}

/// `percent` to `color`, the rest to the other.
pub fn split_with(color: Color, percent: u8) -> Split {
    let green = match color {
        Color::Green => percent,
        Color::Blue => 100 - percent,
    };
    Split::green_percent(green as u64).expect("a percent from 0 to 100")
}

/// Runs `work` unless the release is aborted first.
async fn until_aborted<T>(
    mut control: watch::Receiver<Control>,
    work: impl std::future::Future<Output = Result<T, Stop>>,
) -> Result<T, Stop> {
    let aborted = async {
        loop {
            if let Some(reason) = control.borrow_and_update().abort.clone() {
                return reason;
            }
            if control.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        outcome = work => outcome,
        reason = aborted => Err(Stop::Aborted(reason)),
    }
}

#[cfg(test)]
mod tests {
    //! Holds on paused tokio time: a 30 s hold takes no wall time to test.

    use std::time::Duration;

    use bluegreen_router::Color;
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::config::Config;
    use crate::controller::release_record::ReleasePlan;
    use crate::daemon::Daemon;

    /// A real controller (SQLite in a temp folder, the embedded router, not serving) whose
    /// analysis goes on without traffic.
    async fn controller(dir: &std::path::Path) -> Arc<Controller> {
        let text = "service: web\nrouter: { listen: 127.0.0.1:0, admin: .bluegreen/admin.sock }\n\
                    environments:\n  blue: { upstreams: [\"127.0.0.1:9\"] }\n  green: { upstreams: [\"127.0.0.1:9\"] }\n\
                    analysis: { interval: 1s, on_too_few_requests: proceed }\n";
        let config = Config::parse(text, dir).expect("a valid config");
        crate::daemon::create_private_dir(&config.state_dir).unwrap();
        let daemon = Daemon::build(config, None, "127.0.0.1:0".parse().unwrap(), None)
            .await
            .expect("the daemon builds");
        daemon.controller
    }

    fn shift() -> Release {
        let request = ReleaseRequest {
            kind: ReleaseKind::Shift,
            version: None,
            strategy: None,
            extra_env: Default::default(),
            to: Some(Color::Green),
        };
        let plan = ReleasePlan {
            color: Color::Green,
            from: Color::Blue,
            first: false,
        };
        Release::new(request, &plan, Strategy::instant(), None, None)
    }

    fn hold_in_background(
        controller: Arc<Controller>,
        hold: Hold,
    ) -> (watch::Sender<Control>, JoinHandle<Result<Held, Stop>>) {
        let (control, mut receiver) = watch::channel(Control::default());
        let held = tokio::spawn(async move {
            let mut release = shift();
            controller
                .hold(&mut release, &mut receiver, hold, &mut None, &mut 0)
                .await
        });
        (control, held)
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_hold_counts_only_the_time_it_was_not_paused() {
        let dir = tempfile::tempdir().unwrap();
        let controller = controller(dir.path()).await;
        let (control, held) = hold_in_background(controller, Hold::For(Duration::from_secs(30)));
        tokio::time::sleep(Duration::from_secs(20)).await;
        control.send_modify(|c| c.paused = true);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!held.is_finished(), "paused: the hold does not run out");
        control.send_modify(|c| c.paused = false);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(!held.is_finished(), "10 s were left when it paused");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(held.is_finished(), "30 s of unpaused hold are over");
        assert!(held.await.unwrap() == Ok(Held::Done));
    }

    #[tokio::test(start_paused = true)]
    async fn a_manual_hold_waits_for_promote_and_an_abort_stops_it() {
        let dir = tempfile::tempdir().unwrap();
        let controller = controller(dir.path()).await;
        let (control, held) = hold_in_background(Arc::clone(&controller), Hold::UntilPromoted);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(
            !held.is_finished(),
            "an hour later it still waits for promote"
        );
        control.send_modify(|c| {
            c.promotions += 1;
            c.full = true;
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(held.await.unwrap() == Ok(Held::Full));

        let (control, held) = hold_in_background(controller, Hold::For(Duration::from_secs(600)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        control.send_modify(|c| c.abort = Some("by hand".into()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(held.await.unwrap() == Err(Stop::Aborted("by hand".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn the_old_color_stops_when_its_scale_down_delay_is_over() {
        let dir = tempfile::tempdir().unwrap();
        let controller = controller(dir.path()).await;
        let at = now_ms() + 600_000;
        controller
            .update_environment(Color::Green, None, |record| {
                record.scale_down_at_ms = Some(at);
                None
            })
            .await
            .unwrap();
        controller.schedule_scale_down(Color::Green, at);
        tokio::time::sleep(Duration::from_secs(599)).await;
        assert_eq!(
            controller.environment(Color::Green).status,
            EnvironmentStatus::Running,
            "still warm a second before the delay is over"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        for _ in 0..100 {
            if controller.environment(Color::Green).status == EnvironmentStatus::Stopped {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let green = controller.environment(Color::Green);
        assert_eq!(green.status, EnvironmentStatus::Stopped, "{green:?}");
        assert_eq!(green.scale_down_at_ms, None);
    }
}
