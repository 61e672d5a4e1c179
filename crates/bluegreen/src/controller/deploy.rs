//! Deploying a version to a color through its provider, waiting for health, stopping and scaling down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bluegreen_router::Color;

use super::provider::{DeployRequest, StopRequest};
use super::{CommandError, Controller, EventKind};
use crate::config::controller::HookPoint;
use crate::store::{EnvironmentRecord, EnvironmentStatus, ProviderState, now_ms};

impl Controller {
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
        self.provider(color)
            .check_version(version)
            .map_err(CommandError::Refused)?;
        let weight = self.plane.split().weight(color);
        // A live color with nothing running serves no one: its first deploy is allowed.
        let bootstrap = self.environment(color).status != EnvironmentStatus::Running
            && self.plane.healthy_count(color) == 0;
        if weight > 0 && !bootstrap {
            return Err(CommandError::Refused(format!(
                "{color} takes {weight}% of traffic; deploy to the idle color {} (or switch away from {color} first)",
                color.other()
            )));
        }
        let spec = self.spec(color);
        let started = Instant::now();
        let mut record = self
            .update_environment(color, release, |record| {
                record.version = Some(version.to_string());
                record.status = EnvironmentStatus::Deploying;
                record.extra_env = extra_env;
                record.reason = None;
                record.scale_down_at_ms = None;
                record.deployed_at_ms = Some(now_ms());
                Some((
                    EventKind::Deploy,
                    format!(
                        "deploying {version} to {color} ({} instance(s), {} provider)",
                        spec.instances,
                        self.provider(color).name()
                    ),
                ))
            })
            .await?;
        let outcome = if self.deploys_per_host(color) {
            self.deploy_on_hosts(color, &record, release)
                .await
                .map(Some)
        } else {
            self.run_provider(color, &mut record, release).await
        };
        let upstreams = record.upstreams;
        match outcome {
            Ok(note) => {
                let healthy = if self.deploys_per_host(color) {
                    String::new()
                } else {
                    format!(": {} healthy upstream(s)", self.plane.healthy_count(color))
                };
                let message = format!(
                    "{color} runs {version}{healthy} in {:.1}s{}",
                    started.elapsed().as_secs_f64(),
                    note.map(|n| format!(" ({n})")).unwrap_or_default()
                );
                self.update_environment(color, release, |record| {
                    record.upstreams = upstreams;
                    record.status = EnvironmentStatus::Running;
                    Some((EventKind::Deployed, message.clone()))
                })
                .await?;
                Ok(message)
            }
            Err(reason) => {
                self.abandon_instances(color).await;
                let message = format!("deploying {version} to {color} failed: {reason}");
                self.update_environment(color, release, |record| {
                    record.upstreams = upstreams;
                    record.provider.mark_stopped();
                    record.status = EnvironmentStatus::Failed;
                    record.reason = Some(reason);
                    Some((EventKind::DeployFailed, message.clone()))
                })
                .await?;
                Err(CommandError::Failed(message))
            }
        }
    }

    /// What a provider needs to deploy (or adopt) `record`'s version on `color`.
    pub(crate) fn deploy_request(
        &self,
        color: Color,
        record: &EnvironmentRecord,
        release: Option<i64>,
    ) -> DeployRequest {
        let mut facts = self.facts(color, None);
        facts.version = record.version.clone();
        facts.release_id = release;
        DeployRequest {
            color,
            version: record.version.clone().unwrap_or_default(),
            spec: self.spec(color),
            extra_env: record.extra_env.clone(),
            facts,
            logs_dir: self.logs_dir.clone(),
            current_upstreams: self.plane.upstreams(color).iter().map(|u| u.addr).collect(),
        }
    }

    /// Stops whatever an unfinished deploy of `color` started: here, or on every host of a
    /// fleet that deploys per host.
    async fn abandon_instances(&self, color: Color) {
        if !self.deploys_per_host(color) {
            return self.provider(color).abandon(color).await;
        }
        if let Err(e) = self.stop_on_hosts(color).await {
            self.event(
                EventKind::StopFailed,
                &format!("stopping the abandoned deploy of {color}: {e}"),
                None,
            )
            .await;
        }
    }

    /// The provider's part of a deploy: record what it will start, start it, record what it
    /// started, point the router at it, wait for health. Returns the provider's note, if any.
    /// In a fleet that deploys per host, each host runs this for its own instances, and
    /// routes to them without recording it: its upstreams are its own.
    pub(crate) async fn run_provider(
        &self,
        color: Color,
        record: &mut EnvironmentRecord,
        release: Option<i64>,
    ) -> Result<Option<String>, String> {
        let provider = self.provider(color);
        let request = self.deploy_request(color, record, release);
        let prepared = provider.prepare(&request)?;
        if prepared != ProviderState::None {
            // Recorded before anything starts: a daemon killed now finds what it started.
            record.provider = prepared.clone();
            self.update_instances(color, |saved| {
                saved.provider = prepared.clone();
                None
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        let started = provider.start(&request, &prepared).await?;
        if let Some(state) = started.state {
            record.provider = state.clone();
            self.update_instances(color, |saved| {
                saved.provider = state;
                None
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        let addrs = started.upstreams;
        record.upstreams = addrs.clone();
        if self.deploys_per_host(color) {
            self.plane.set_upstreams(color, &addrs).await?;
        } else if !provider.runs_elsewhere() {
            self.set_upstreams(color, addrs.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        self.wait_healthy(color, addrs.len(), request.spec.ready_timeout)
            .await
            .map(|()| started.note)
    }

    /// A deploy that never proved healthy (aborted, or cut off by a restart): its instances
    /// are stopped and the color is marked failed, so it does not stay "deploying".
    pub(crate) async fn abandon_deploy(
        &self,
        color: Color,
        release: Option<i64>,
        kind: EventKind,
        why: &str,
    ) {
        if self.environment(color).status != EnvironmentStatus::Deploying {
            return;
        }
        self.abandon_instances(color).await;
        let saved = self
            .update_environment(color, release, |record| {
                record.provider.mark_stopped();
                record.status = EnvironmentStatus::Failed;
                record.reason = Some(why.to_string());
                Some((
                    kind,
                    format!(
                        "{color} {}: {why}; its instances were stopped",
                        record.version.as_deref().unwrap_or("")
                    ),
                ))
            })
            .await;
        if let Err(e) = saved {
            tracing::error!(error = %e, "cannot record the abandoned deploy");
        }
    }

    /// Waits until `wanted` upstreams of `color` pass their health checks, or the color's
    /// instances crash-loop, or the time is up.
    pub(crate) async fn wait_healthy(
        &self,
        color: Color,
        wanted: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let upstreams = self.plane.upstreams(color);
            let healthy = self.plane.healthy_count(color);
            if healthy >= wanted.max(1) {
                return Ok(());
            }
            let record = self.instances_record(color);
            if record.status == EnvironmentStatus::Failed {
                return Err(record.reason.unwrap_or_else(|| "instances failed".into()));
            }
            if Instant::now() >= deadline {
                let errors: Vec<String> = upstreams
                    .iter()
                    .filter_map(|u| u.last_error.as_ref().map(|e| format!("{}: {e}", u.addr)))
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
        if self.plane.split().weight(color) > 0 {
            return Err(CommandError::Refused(format!(
                "{color} takes traffic; it cannot be stopped"
            )));
        }
        let stopped = if self.deploys_per_host(color) {
            self.stop_on_hosts(color).await
        } else {
            let request = StopRequest {
                color,
                spec: self.spec(color),
                facts: self.facts(color, None),
                logs_dir: self.logs_dir.clone(),
            };
            self.provider(color).stop(&request).await
        };
        if let Err(e) = stopped {
            self.event(EventKind::StopFailed, &e, None).await;
        }
        self.update_environment(color, None, |record| {
            record.provider.mark_stopped();
            record.status = EnvironmentStatus::Stopped;
            record.scale_down_at_ms = None;
            Some((
                EventKind::Stopped,
                format!(
                    "{color} {} stopped: {why}",
                    record.version.as_deref().unwrap_or("")
                ),
            ))
        })
        .await
        .map(|_| ())
    }

    /// Arms the timer that stops a warm old color at `at_ms`, unless it takes traffic again or
    /// is redeployed by then.
    pub(crate) fn schedule_scale_down(self: &Arc<Self>, color: Color, at_ms: i64) {
        let controller = Arc::downgrade(self);
        tokio::spawn(async move {
            let wait = (at_ms - now_ms()).max(0) as u64;
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let Some(controller) = controller.upgrade() else {
                return;
            };
            let _exclusive = controller.exclusive.lock().await;
            // Handed over: the successor armed its own timer.
            if controller.is_handed_over() {
                return;
            }
            let record = controller.environment(color);
            if record.scale_down_at_ms != Some(at_ms) {
                return; // redeployed or rescheduled since
            }
            if controller.plane.split().weight(color) > 0 {
                let _ = controller
                    .update_environment(color, None, |record| {
                        record.scale_down_at_ms = None;
                        Some((
                            EventKind::Cleanup,
                            format!("{color} takes traffic again; not stopped"),
                        ))
                    })
                    .await;
                return;
            }
            controller.clean_up(color).await;
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
            self.event(
                EventKind::Cleanup,
                &format!("cleanup of {color} failed: {e}"),
                None,
            )
            .await;
            return;
        }
        if let Err(e) = self.hook(HookPoint::MigrateContract, &facts, None).await {
            tracing::warn!(error = %e, "migrate_contract hook failed");
        }
    }
}
