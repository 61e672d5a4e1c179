//! What the controller records in the audit log, as a typed kind; the stored and shown name is its `as_str`.

use std::fmt;

/// The kind of an audit event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The daemon's first start recorded the config's live color.
    Start,
    Switch,
    Weights,
    Rollback,
    /// A recorded change the router then refused, recorded back.
    Reverted,
    Upstreams,
    Deploy,
    Deployed,
    DeployFailed,
    Stopped,
    StopFailed,
    Cleanup,
    /// After a restart: instances adopted, interrupted deploys stopped.
    Recover,
    Instance,
    Failed,
    Release,
    Stage,
    Step,
    Monitor,
    /// Shadow traffic started for a release.
    Mirror,
    Paused,
    Resumed,
    Succeeded,
    RolledBack,
    Aborted,
    /// A release a previous daemon left unfinished, settled.
    Recovered,
    Hook,
    Test,
    Warning,
    /// The config file was read again and put in force.
    Reload,
    /// An operator's gate on a running release.
    Gate(Gate),
}

/// What an operator asks of a running release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// The next step now; `full`: straight to 100 %.
    Promote {
        full: bool,
    },
    Pause,
    Resume,
    Abort,
}

impl Gate {
    pub fn as_str(self) -> &'static str {
        match self {
            Gate::Promote { .. } => "promote",
            Gate::Pause => "pause",
            Gate::Resume => "resume",
            Gate::Abort => "abort",
        }
    }
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Start => "start",
            EventKind::Switch => "switch",
            EventKind::Weights => "weights",
            EventKind::Rollback => "rollback",
            EventKind::Reverted => "reverted",
            EventKind::Upstreams => "upstreams",
            EventKind::Deploy => "deploy",
            EventKind::Deployed => "deployed",
            EventKind::DeployFailed => "deploy-failed",
            EventKind::Stopped => "stopped",
            EventKind::StopFailed => "stop-failed",
            EventKind::Cleanup => "cleanup",
            EventKind::Recover => "recover",
            EventKind::Instance => "instance",
            EventKind::Failed => "failed",
            EventKind::Release => "release",
            EventKind::Stage => "stage",
            EventKind::Step => "step",
            EventKind::Monitor => "monitor",
            EventKind::Mirror => "mirror",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::Succeeded => "succeeded",
            EventKind::RolledBack => "rolled-back",
            EventKind::Aborted => "aborted",
            EventKind::Recovered => "recovered",
            EventKind::Hook => "hook",
            EventKind::Test => "test",
            EventKind::Warning => "warning",
            EventKind::Reload => "reload",
            EventKind::Gate(gate) => gate.as_str(),
        }
    }
}

impl AsRef<str> for EventKind {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
