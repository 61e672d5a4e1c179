//! Operators' changes to the traffic: switch, weights, rollback and upstreams — decided, recorded, then applied to the data plane.

use std::net::SocketAddr;

use bluegreen_router::{Color, RouterStatus, Split};
use serde::Serialize;

use super::command::{Command, CommandError};
use super::decide::{self, TrafficDecision};
use super::release::Release;
use super::{Controller, EnvironmentView, EventKind, Gate};
use crate::store::{Event, RouterState, Write};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Outcome {
    pub changed: bool,
    pub message: String,
    pub weights: Weights,
    pub previous: Weights,
    pub rollback_to: Option<Color>,
    /// In a fleet: the routers that had not applied the change when
    /// `store.etcd.confirm_timeout` ran out (the change is recorded, and they will apply it
    /// once they can). Empty when every live router applied it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<crate::fleet::Lagging>,
}

/// A split as people read it.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Weights {
    #[schema(maximum = 100)]
    pub blue: u8,
    #[schema(maximum = 100)]
    pub green: u8,
}

impl From<Split> for Weights {
    fn from(split: Split) -> Self {
        Weights {
            blue: split.weight(Color::Blue),
            green: split.weight(Color::Green),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ControllerStatus {
    pub service: String,
    /// The daemon's process (it changes at each `bluegreen upgrade`).
    pub pid: u32,
    /// The daemon's version.
    pub version: &'static str,
    #[schema(value_type = String, example = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    pub admin: String,
    /// The web dashboard's address (`bluegreen dashboard` prints it with the token).
    pub dashboard: Option<String>,
    pub live: Option<Color>,
    pub weights: Weights,
    /// The color `rollback` would make live.
    pub rollback_to: Option<Color>,
    pub environments: Vec<EnvironmentView>,
    pub release: Option<Release>,
    /// In a fleet: every live router, its applied revision, lag and last report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routers: Option<Vec<super::fleet::RouterView>>,
    /// In a fleet: the router leading it (it drives releases and takes changes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// In a fleet that deploys per host: each host's own instances of each color.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<crate::fleet::HostEnvironment>>,
    #[serde(flatten)]
    pub router: RouterStatus,
}

impl Controller {
    pub async fn status(&self) -> ControllerStatus {
        let rollback_to = self.state.lock().await.value.rollback_to;
        let router = self.plane.status();
        ControllerStatus {
            service: self.config().service.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
            listen: self.endpoints.listen,
            admin: self.config().router.admin.to_string(),
            dashboard: self
                .endpoints
                .dashboard
                .map(|addr| format!("http://{addr}/")),
            live: router.live,
            weights: router.split.into(),
            rollback_to,
            environments: self.environments(),
            release: self.active_release(),
            routers: self.routers().await,
            leader: self.fleet_leader().await,
            hosts: self.hosts().await,
            router,
        }
    }

    /// The color `rollback` would make live now.
    pub async fn rollback_target(&self) -> Option<Color> {
        self.state.lock().await.value.rollback_to
    }

    /// A command from an operator: refused while a release drives the traffic (a rollback
    /// aborts that release instead, which sends traffic back).
    pub async fn apply(&self, command: Command) -> Result<Outcome, CommandError> {
        match command {
            Command::Rollback if self.active_release().is_some() => {
                let message = self
                    .control(Gate::Abort, Some("rollback requested".into()))
                    .await?;
                for _ in 0..600 {
                    if self.active_release().is_none() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                let split = self.plane.split();
                return Ok(Outcome {
                    changed: true,
                    message,
                    weights: split.into(),
                    previous: split.into(),
                    rollback_to: self.rollback_target().await,
                    unconfirmed: Vec::new(),
                });
            }
            Command::Rollback => {}
            Command::Switch { .. } | Command::ReturnTo(_) => {
                self.refuse_during_release("a switch")?
            }
            Command::Weights(_) => self.refuse_during_release("setting weights")?,
        }
        let redeployed = match command {
            Command::Rollback => self.redeploy_for_rollback().await?,
            _ => None,
        };
        let mut outcome = self.apply_internal(command).await?;
        if let Some(redeployed) = redeployed {
            outcome.message = format!("{redeployed}; {}", outcome.message);
        }
        if outcome.changed {
            let revision = self.state.lock().await.revision;
            outcome.unconfirmed = self.confirm(revision).await;
        }
        Ok(outcome)
    }

    /// Applies a command: decide, record, then swap, so a crash after recording restarts into
    /// the recorded split and a refusal changes neither the store nor the table.
    pub(crate) async fn apply_internal(&self, command: Command) -> Result<Outcome, CommandError> {
        let mut state = self.state.lock().await;
        let current = state.value.clone();
        let (target, rollback_to, kind, message) =
            match decide::traffic(command, &current).map_err(CommandError::Refused)? {
                TrafficDecision::Unchanged => {
                    return Ok(Outcome {
                        changed: false,
                        message: format!("unchanged: already {}", current.split),
                        weights: current.split.into(),
                        previous: current.split.into(),
                        rollback_to: current.rollback_to,
                        unconfirmed: Vec::new(),
                    });
                }
                TrafficDecision::Change {
                    target,
                    rollback_to,
                    kind,
                    message,
                } => (target, rollback_to, kind, message),
            };
        if let Err(refused) = self.plane.check_split(target) {
            let undeployed = Color::ALL.into_iter().find(|c| {
                target.weight(*c) > 0
                    && self.environment(*c).status == crate::store::EnvironmentStatus::Stopped
                    && !self.provider(*c).runs_elsewhere()
            });
            return Err(CommandError::Refused(match undeployed {
                Some(color) => format!(
                    "{color} is not deployed; run `bluegreen deploy --environment {color} --version V` first ({refused})"
                ),
                None => refused,
            }));
        }
        let next = RouterState {
            split: target,
            rollback_to,
            upstreams: current.upstreams.clone(),
        };
        self.record(&mut state, next, kind, &message).await?;
        if let Err(refused) = self.plane.apply_split(target).await {
            // Health changed between the check and the swap: record the way back.
            return Err(self.revert(&mut state, current, refused).await);
        }
        tracing::info!("{message}");
        Ok(Outcome {
            changed: true,
            message,
            weights: target.into(),
            previous: current.split.into(),
            rollback_to,
            unconfirmed: Vec::new(),
        })
    }

    /// The audit log, newest last.
    pub async fn history_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Event>, CommandError> {
        self.store
            .events_after(after, limit)
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))
    }

    /// Records the next state (compare-and-set on the revision read) before the router acts
    /// on it, so a crash right after restarts into what was recorded.
    async fn record(
        &self,
        state: &mut crate::store::Versioned<RouterState>,
        next: RouterState,
        kind: EventKind,
        message: &str,
    ) -> Result<(), CommandError> {
        let committed = self
            .store
            .commit(Write {
                router_state: Some((state.revision, next.clone())),
                ..Write::event(kind, message, None)
            })
            .await
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        state.value = next;
        state.revision = committed.revision;
        // Applied right after by the caller (or recorded back if the router refuses).
        self.applied
            .store(committed.revision, std::sync::atomic::Ordering::SeqCst);
        self.saw_router_state(committed.revision);
        self.reported.notify_one();
        self.notify(kind, message, None);
        Ok(())
    }

    /// The router refused after the new state was recorded: record the old one again.
    async fn revert(
        &self,
        state: &mut crate::store::Versioned<RouterState>,
        old: RouterState,
        refused: String,
    ) -> CommandError {
        let message = format!("not applied: {refused}");
        match self.record(state, old, EventKind::Reverted, &message).await {
            Ok(()) => CommandError::Refused(refused),
            Err(e) => {
                CommandError::Failed(format!("{refused}; and recording the way back failed: {e}"))
            }
        }
    }

    /// Points a color at other upstreams, recorded so that a restart keeps them. Checked
    /// first (the color is live and none of them is healthy: refused, nothing recorded), then
    /// recorded and applied; if health changed in between, the record is put back.
    pub async fn set_upstreams(
        &self,
        color: Color,
        addrs: Vec<SocketAddr>,
    ) -> Result<String, CommandError> {
        let mut state = self.state.lock().await;
        self.plane
            .check_upstreams(color, &addrs)
            .await
            .map_err(CommandError::Refused)?;
        let old = state.value.clone();
        let mut next = old.clone();
        next.upstreams.set(color, addrs.clone());
        let listed: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        self.record(
            &mut state,
            next,
            EventKind::Upstreams,
            &format!("{color} upstreams set to {}", listed.join(", ")),
        )
        .await?;
        if let Err(refused) = self.plane.set_upstreams(color, &addrs).await {
            return Err(self.revert(&mut state, old, refused).await);
        }
        let healthy = self.plane.healthy_count(color);
        Ok(format!(
            "{color} now routes to {} upstream(s), {healthy} healthy",
            addrs.len()
        ))
    }
}
