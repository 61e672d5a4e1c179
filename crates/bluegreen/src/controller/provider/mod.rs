//! The provider seam: turning "color + version" into running instances, stopping them, and adopting them after a restart.
//!
//! Implementations, one file each: [`process`] (supervised local processes, the default),
//! [`static`](static_upstreams) (fixed addresses someone else runs) and [`command`] (the
//! user's deploy and stop scripts) and [`docker`] (containers through the Docker Engine API).
//! A provider keeps what it needs to find its instances again in the environment record, as
//! its own [`ProviderState`].

pub mod command;
pub mod docker;
pub mod process;
#[path = "static.rs"]
pub mod static_upstreams;
pub mod supervisor;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use async_trait::async_trait;
use bluegreen_router::Color;

use super::hooks::Facts;
use crate::config::controller::EnvironmentSpec;
use crate::store::{EnvironmentRecord, ProviderState};
pub use supervisor::InstanceEvent;

/// One line an instance (or a hook, or a test) wrote, and where it came from.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LogLine {
    pub source: String,
    pub line: String,
}

/// Log lines as they are written.
pub type LogLines = futures_util::stream::BoxStream<'static, LogLine>;

/// What a deploy asks of a provider.
pub struct DeployRequest {
    pub color: Color,
    pub version: String,
    pub spec: EnvironmentSpec,
    pub extra_env: BTreeMap<String, String>,
    /// The facts scripts receive (`BLUEGREEN_*`).
    pub facts: Facts,
    pub logs_dir: PathBuf,
    /// The router's upstreams of the color now.
    pub current_upstreams: Vec<SocketAddr>,
}

/// What stopping a color needs.
pub struct StopRequest {
    pub color: Color,
    pub spec: EnvironmentSpec,
    pub facts: Facts,
    pub logs_dir: PathBuf,
}

/// What a provider started: where to route, and what to record of it.
pub struct Started {
    pub upstreams: Vec<SocketAddr>,
    /// The provider's state now that its instances exist (`None`: what `prepare` recorded).
    pub state: Option<ProviderState>,
    /// Something the operator should hear about this deploy (e.g. retained containers reused).
    pub note: Option<String>,
}

impl Started {
    pub fn at(upstreams: Vec<SocketAddr>) -> Started {
        Started {
            upstreams,
            state: None,
            note: None,
        }
    }
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// As the config names it.
    fn name(&self) -> &'static str;

    /// Someone else runs the instances (fixed addresses): a color counts as running whether
    /// or not bluegreen deployed it, and health tells.
    fn runs_elsewhere(&self) -> bool {
        false
    }

    /// Refuses a version this provider cannot deploy (checked before anything is recorded).
    fn check_version(&self, _version: &str) -> Result<(), String> {
        Ok(())
    }

    /// What to record before anything starts, so a daemon killed mid-deploy can find what
    /// the deploy started (the process provider: the ports it will use).
    fn prepare(&self, _request: &DeployRequest) -> Result<ProviderState, String> {
        Ok(ProviderState::None)
    }

    /// Starts `request.version` on `request.color` (its previous instances are replaced);
    /// returns the upstream addresses to route to. Health is the controller's to wait for.
    async fn start(
        &self,
        request: &DeployRequest,
        prepared: &ProviderState,
    ) -> Result<Started, String>;

    /// Stops a color's instances (cleanup, `bluegreen` stopping a color).
    async fn stop(&self, request: &StopRequest) -> Result<(), String>;

    /// Stops whatever a deploy that did not finish started (an abort, a restart mid-deploy).
    async fn abandon(&self, _color: Color) {}

    /// After a daemon restart: takes over the instances the record says run, starting again
    /// those that died. Returns what it did, for the event log.
    async fn adopt(
        &self,
        _request: &DeployRequest,
        _record: &EnvironmentRecord,
    ) -> Result<Option<String>, String> {
        Ok(None)
    }

    /// The stream of instance events (started, exited, crash loop), taken once.
    fn take_events(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<InstanceEvent>> {
        None
    }

    /// Whether an event comes from the instances running now (not a replaced generation).
    fn is_current(&self, _color: Color, _generation: u64) -> bool {
        true
    }

    /// Stops everything this provider supervises (the daemon is stopping).
    async fn shutdown(&self) {}

    /// A binary upgrade: stop watching the instances and let go of them, running, for the
    /// successor to adopt. Nothing is stopped.
    async fn detach(&self) {}

    /// The newest log lines of a color's instances, when the provider keeps them itself (not
    /// in files under the logs folder): one (source, lines) per instance.
    async fn logs(&self, _color: Color, _lines: usize) -> Option<Vec<(String, Vec<String>)>> {
        None
    }

    /// A color's instances' log lines as they are written, the newest `lines` of each first,
    /// when the provider keeps them itself. Ends when the instances followed are gone.
    async fn follow_logs(&self, _color: Color, _lines: usize) -> Option<LogLines> {
        None
    }
}
