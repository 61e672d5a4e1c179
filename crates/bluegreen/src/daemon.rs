//! The daemon behind `bluegreen up`: the router, its persisted switch state and the commands that change it.

use std::net::SocketAddr;
use std::sync::Arc;

use bluegreen_router::{
    Color, ListenerSettings, PreviewRule, ProxySettings, Router, RouterStatus, Split, StickyRule,
};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::config::Config;
use crate::controller::Controller;
use crate::controller::release::Release;
use crate::store::{Event, RouterState, Store};

/// A change to the traffic split, as the CLI and admin API ask for it.
#[derive(Clone, Copy, Debug)]
pub enum Command {
    Switch {
        to: Color,
        from: Option<Color>,
    },
    Weights(Split),
    Rollback,
    /// All traffic back to this color: how a release rolls back (recorded as a rollback).
    ReturnTo(Color),
}

/// Why a command was not carried out. Nothing changed in any case.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub changed: bool,
    pub message: String,
    pub weights: Weights,
    pub previous: Weights,
    pub rollback_to: Option<Color>,
}

/// A split as people read it.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Weights {
    pub blue: u8,
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

pub struct Daemon {
    pub config: Config,
    pub router: Router,
    pub listen: SocketAddr,
    /// Where the web dashboard listens, when it is enabled.
    pub dashboard: Option<SocketAddr>,
    state: Mutex<RouterState>,
    pub(crate) store: Store,
    pub(crate) controller: Controller,
}

#[derive(Serialize)]
pub struct DaemonStatus {
    pub service: String,
    pub listen: SocketAddr,
    pub admin: String,
    /// The web dashboard's address (`bluegreen dashboard` prints it with the token).
    pub dashboard: Option<String>,
    pub live: Option<Color>,
    pub weights: Weights,
    /// The color `rollback` would make live.
    pub rollback_to: Option<Color>,
    pub environments: Vec<crate::controller::EnvironmentView>,
    pub release: Option<Release>,
    #[serde(flatten)]
    pub router: RouterStatus,
}

impl Daemon {
    /// Builds the router from the config and the saved state (which wins over `initial_live`).
    pub fn new(
        config: Config,
        listen: SocketAddr,
        dashboard: Option<SocketAddr>,
    ) -> Result<Arc<Daemon>, String> {
        let store = Store::open(&config.state_dir).map_err(|e| e.to_string())?;
        let state = match store.load().map_err(|e| e.to_string())? {
            Some(state) => {
                tracing::info!(split = %state.split, store = %store.path().display(), "restored router state");
                state
            }
            None => {
                let state = RouterState {
                    split: Split::all(config.router.initial_live),
                    rollback_to: None,
                    upstreams: Default::default(),
                };
                let message = format!("first start: {}", describe(state.split));
                store
                    .record(&state, "start", &message)
                    .map_err(|e| e.to_string())?;
                state
            }
        };
        let mut environments = store.environments().map_err(|e| e.to_string())?;
        for record in &mut environments {
            // Fixed upstreams are run by someone else: they count as running, health tells.
            if config.controller.environment(record.color).provider
                == crate::config::controller::ProviderKind::Static
                && record.status == crate::store::EnvironmentStatus::Stopped
            {
                record.status = crate::store::EnvironmentStatus::Running;
            }
        }
        let last_event = store
            .events_after(0, 1)
            .map_err(|e| e.to_string())?
            .last()
            .map_or(0, |e| e.id);
        let logs_dir = config.state_dir.join("logs");
        let r = &config.router;
        let router = Router::new(bluegreen_router::RouterConfig {
            upstreams: Color::ALL.map(|color| match state.upstreams.get(color) {
                Some(addrs) => addrs.clone(),
                None => config.upstreams[color.index()].clone(),
            }),
            split: state.split,
            preview: r.preview.as_ref().map(|p| PreviewRule {
                header: p.header.clone(),
                cookie: p.cookie.clone(),
                secret: p.secret.clone(),
                secret_header: p.secret_header.clone(),
            }),
            sticky: r.sticky_cookie.as_ref().map(|cookie| StickyRule {
                cookie: cookie.clone(),
            }),
            proxy: ProxySettings {
                connect_timeout: r.connect_timeout,
                upstream_timeout: r.upstream_timeout,
                retries: r.retries,
                forwarded: r.forwarded.clone(),
                drain_timeout: r.drain_timeout,
                close_grace: std::time::Duration::from_secs(1),
            },
            listener: ListenerSettings {
                header_read_timeout: r.header_read_timeout,
                idle_timeout: r.idle_timeout,
                max_header_bytes: r.max_header_bytes,
                max_connections: r.max_connections,
                tls: r.tls.clone(),
            },
            health: config.health.clone(),
        })
        .map_err(|e| e.to_string())?;
        Ok(Arc::new(Daemon {
            config,
            router,
            listen,
            dashboard,
            state: Mutex::new(state),
            store,
            controller: Controller::new(environments, logs_dir, last_event),
        }))
    }

    pub async fn status(&self) -> DaemonStatus {
        let rollback_to = self.state.lock().await.rollback_to;
        let router = self.router.status();
        DaemonStatus {
            service: self.config.service.clone(),
            listen: self.listen,
            admin: self.config.router.admin.to_string(),
            dashboard: self.dashboard.map(|addr| format!("http://{addr}/")),
            live: router.live,
            weights: router.split.into(),
            rollback_to,
            environments: self.environments(),
            release: self.active_release(),
            router,
        }
    }

    /// The color `rollback` would make live now.
    pub async fn rollback_target(&self) -> Option<Color> {
        self.state.lock().await.rollback_to
    }

    /// A command from an operator: refused while a release drives the traffic (a rollback
    /// aborts that release instead, which sends traffic back).
    pub async fn apply(&self, command: Command) -> Result<Outcome, CommandError> {
        match command {
            Command::Rollback if self.active_release().is_some() => {
                let message = self.control("abort", false, Some("rollback requested".into()))?;
                for _ in 0..600 {
                    if self.active_release().is_none() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                let split = self.router.table().split;
                return Ok(Outcome {
                    changed: true,
                    message,
                    weights: split.into(),
                    previous: split.into(),
                    rollback_to: self.rollback_target().await,
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
        Ok(outcome)
    }

    /// Applies a command: check, persist, then swap, so a crash after persisting restarts into
    /// the recorded split and a refusal changes neither the file nor the table.
    pub(crate) async fn apply_internal(&self, command: Command) -> Result<Outcome, CommandError> {
        let mut state = self.state.lock().await;
        let current = state.split;
        let target = match command {
            Command::Switch { to, from } => {
                if let Some(from) = from
                    && current.weight(from) == 0
                {
                    return Err(CommandError::Refused(format!(
                        "--from {from} does not match the router: {from} takes no traffic ({}). Run `bluegreen status`, then switch --to {to} without --from",
                        describe(current)
                    )));
                }
                Split::all(to)
            }
            Command::Weights(split) => split,
            Command::ReturnTo(color) => Split::all(color),
            Command::Rollback => Split::all(state.rollback_to.ok_or_else(|| {
                CommandError::Refused("nothing to roll back to: no switch has been made yet".into())
            })?),
        };
        if target == current {
            return Ok(Outcome {
                changed: false,
                message: format!("unchanged: already {current}"),
                weights: current.into(),
                previous: current.into(),
                rollback_to: state.rollback_to,
            });
        }
        if let Err(refused) = self.router.check_split(target) {
            let undeployed = Color::ALL.into_iter().find(|c| {
                target.weight(*c) > 0
                    && self.environment(*c).status == crate::store::EnvironmentStatus::Stopped
                    && self.config.controller.environment(*c).provider
                        != crate::config::controller::ProviderKind::Static
            });
            return Err(CommandError::Refused(match undeployed {
                Some(color) => format!(
                    "{color} is not deployed; run `bluegreen deploy --environment {color} --version V` first ({refused})"
                ),
                None => refused.to_string(),
            }));
        }
        let next = RouterState {
            split: target,
            rollback_to: rollback_color(current, target, state.rollback_to),
            upstreams: state.upstreams.clone(),
        };
        let (kind, verb) = match command {
            Command::Rollback | Command::ReturnTo(_) => ("rollback", "rolled back"),
            Command::Switch { .. } => ("switch", "switched"),
            Command::Weights(_) => ("weights", "weights set"),
        };
        let was = match current.sole_color() {
            Some(color) => color.to_string(),
            None => current.to_string(),
        };
        let message = format!("{verb}: {} (was {was})", describe(target));
        self.persist(&next, kind, &message)?;
        if let Err(refused) = self.router.set_split(target) {
            // Health changed between the check and the swap: record the way back.
            return Err(self.revert(&state, refused.to_string()));
        }
        let rollback_to = next.rollback_to;
        *state = next;
        tracing::info!("{message}");
        Ok(Outcome {
            changed: true,
            message,
            weights: target.into(),
            previous: current.into(),
            rollback_to,
        })
    }
}

impl Daemon {
    /// The audit log, newest last.
    pub fn history_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, CommandError> {
        off_the_runtime(|| self.store.events_after(after, limit))
            .map_err(|e| CommandError::Failed(e.to_string()))
    }

    /// Records the next state before the router acts on it, so a crash right after restarts
    /// into what was recorded.
    fn persist(&self, next: &RouterState, kind: &str, message: &str) -> Result<(), CommandError> {
        off_the_runtime(|| self.store.record(next, kind, message))
            .map_err(|e| CommandError::Failed(e.to_string()))?;
        self.notify(kind, message, None);
        Ok(())
    }

    /// The router refused after the new state was recorded: record the old one again.
    fn revert(&self, old: &RouterState, refused: String) -> CommandError {
        let message = format!("not applied: {refused}");
        match off_the_runtime(|| self.store.record(old, "reverted", &message)) {
            Ok(()) => {
                self.notify("reverted", &message, None);
                CommandError::Refused(refused)
            }
            Err(e) => {
                CommandError::Failed(format!("{refused}; and recording the way back failed: {e}"))
            }
        }
    }

    /// Points a color at other upstreams, recorded so that a restart keeps them. Persisted
    /// first; if the router refuses (the color is live and none of them is healthy) the record
    /// is put back and nothing changed.
    pub async fn set_upstreams(
        &self,
        color: Color,
        addrs: Vec<SocketAddr>,
    ) -> Result<String, CommandError> {
        let mut state = self.state.lock().await;
        let mut next = state.clone();
        next.upstreams.set(color, addrs.clone());
        let listed: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        self.persist(
            &next,
            "upstreams",
            &format!("{color} upstreams set to {}", listed.join(", ")),
        )?;
        if let Err(refused) = self.router.set_upstreams(color, &addrs).await {
            return Err(self.revert(&state, refused.to_string()));
        }
        *state = next;
        let healthy = self.router.table().pool(color).healthy_count();
        Ok(format!(
            "{color} now routes to {} upstream(s), {healthy} healthy",
            addrs.len()
        ))
    }
}

/// Leaving a color that had all traffic makes it the one to return to; leaving a split (a
/// canary in progress) keeps the color that was live before it began. Landing on that very
/// color makes the other one the way back.
fn rollback_color(current: Split, target: Split, before: Option<Color>) -> Option<Color> {
    let back = current.sole_color().or(before)?;
    Some(if target.sole_color() == Some(back) {
        back.other()
    } else {
        back
    })
}

/// Store calls wait for the disk (fsync); meanwhile the proxying tasks of the current worker
/// move to another thread, so a switch never stalls traffic.
pub(crate) fn off_the_runtime<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

fn describe(split: Split) -> String {
    match split.sole_color() {
        Some(color) => format!("{color} is live"),
        None => split.to_string(),
    }
}

/// The state folder holds the admin socket and state: only its owner may enter.
pub fn create_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create state_dir {}: {e}", dir.display()))?;
    } else if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(dir = %dir.display(), "state_dir is open to other users; consider chmod 700");
    }
    Ok(())
}
