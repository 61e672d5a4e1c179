//! The records the state store keeps: the router's state, environments, releases, steps and the audit log.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use bluegreen_router::{Color, Split};
use serde::{Deserialize, Serialize};

/// What must survive a restart: the split in service, the color a rollback returns to, and
/// upstreams set at runtime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterState {
    pub split: Split,
    /// The color that last had all traffic before the current state; `None` until a change.
    #[serde(default)]
    pub rollback_to: Option<Color>,
    /// Upstreams set with `bluegreen upstreams`; they win over the config's.
    #[serde(default)]
    pub upstreams: UpstreamOverrides,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue: Option<Vec<SocketAddr>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub green: Option<Vec<SocketAddr>>,
}

impl UpstreamOverrides {
    pub fn get(&self, color: Color) -> Option<&Vec<SocketAddr>> {
        match color {
            Color::Blue => self.blue.as_ref(),
            Color::Green => self.green.as_ref(),
        }
    }

    pub fn set(&mut self, color: Color, addrs: Vec<SocketAddr>) {
        match color {
            Color::Blue => self.blue = Some(addrs),
            Color::Green => self.green = Some(addrs),
        }
    }
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub release_id: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentStatus {
    Stopped,
    Deploying,
    Running,
    /// Its instances crash-looped or never became healthy; `reason` says which.
    Failed,
}

/// One app instance the process provider runs: its port stays with it across restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InstanceRecord {
    pub port: u16,
    pub pid: Option<u32>,
    #[serde(default)]
    pub restarts: u32,
}

/// One container the docker provider runs: found again after a restart by its labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ContainerRecord {
    /// The engine's id (empty until the container is created).
    #[serde(default)]
    pub id: String,
    /// `<service>-<color>-<version>-<n>`.
    pub name: String,
    /// The port on 127.0.0.1 the container's port is published on (0 with `app.reach: network`).
    pub host_port: u16,
    /// The container's own address on `app.network`, with `app.reach: network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub address: Option<SocketAddr>,
    /// As the engine last reported it: created, running, exited…
    pub state: String,
}

impl ContainerRecord {
    /// Where the router reaches the container.
    pub fn upstream(&self) -> SocketAddr {
        self.address
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.host_port)))
    }
}

/// What a provider keeps to find its instances again after a restart: its own data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderState {
    /// Static and command providers keep nothing beyond the upstreams.
    #[default]
    None,
    /// The process provider: each instance's port and pid.
    Process { instances: Vec<InstanceRecord> },
    /// The docker provider: the color's containers.
    Docker { containers: Vec<ContainerRecord> },
}

impl ProviderState {
    /// The supervised instances (none for providers that run no processes).
    pub fn instances(&self) -> &[InstanceRecord] {
        match self {
            ProviderState::Process { instances } => instances,
            ProviderState::None | ProviderState::Docker { .. } => &[],
        }
    }

    /// The docker provider's containers (none for other providers).
    pub fn containers(&self) -> &[ContainerRecord] {
        match self {
            ProviderState::Docker { containers } => containers,
            _ => &[],
        }
    }

    /// Forgets the pids: the instances are no longer running.
    pub fn mark_stopped(&mut self) {
        match self {
            ProviderState::Process { instances } => instances.iter_mut().for_each(|i| i.pid = None),
            ProviderState::Docker { containers } => containers
                .iter_mut()
                .for_each(|c| c.state = "exited".into()),
            ProviderState::None => {}
        }
    }
}

/// What runs in one color.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvironmentRecord {
    pub color: Color,
    pub version: Option<String>,
    pub status: EnvironmentStatus,
    /// The provider's own state.
    #[serde(default)]
    pub provider: ProviderState,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub upstreams: Vec<SocketAddr>,
    /// Environment variables given with `deploy --env`, kept for restarts and redeploys.
    #[serde(default)]
    pub extra_env: BTreeMap<String, String>,
    pub deployed_at_ms: Option<i64>,
    /// When a warm, no longer live color is due to stop (set after a successful release).
    pub scale_down_at_ms: Option<i64>,
    pub reason: Option<String>,
}

impl EnvironmentRecord {
    pub fn stopped(color: Color) -> EnvironmentRecord {
        EnvironmentRecord {
            color,
            version: None,
            status: EnvironmentStatus::Stopped,
            provider: ProviderState::None,
            upstreams: Vec::new(),
            extra_env: BTreeMap::new(),
            deployed_at_ms: None,
            scale_down_at_ms: None,
            reason: None,
        }
    }

    /// Parses a saved record. Records written before providers kept their own state held the
    /// process provider's `instances` at the top level; they are read as that provider's.
    pub fn from_json(text: &str) -> Result<EnvironmentRecord, serde_json::Error> {
        let mut value: serde_json::Value = serde_json::from_str(text)?;
        if let Some(object) = value.as_object_mut()
            && !object.contains_key("provider")
            && let Some(instances) = object.remove("instances")
        {
            let has_instances = instances.as_array().is_some_and(|a| !a.is_empty());
            object.insert(
                "provider".into(),
                if has_instances {
                    serde_json::json!({ "process": { "instances": instances } })
                } else {
                    serde_json::json!("none")
                },
            );
        }
        serde_json::from_value(value)
    }
}

/// One step row of a release: a pipeline stage or a shift step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepRecord {
    pub id: i64,
    pub release_id: i64,
    pub name: String,
    pub status: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub detail: String,
    /// The commit that last changed the row.
    #[serde(default)]
    pub revision: i64,
}

/// A release as stored: the fields the store indexes, and the controller's whole record.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRelease {
    /// `0` until the store assigns one.
    pub id: i64,
    pub version: Option<String>,
    pub color: Color,
    pub state: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub document: serde_json::Value,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_from_before_provider_state_keeps_its_instances_as_the_process_providers() {
        let old = r#"{"color":"blue","version":"1.0","status":"running","instances":[{"port":4001,"pid":77,"restarts":1}],"upstreams":["127.0.0.1:4001"],"deployed_at_ms":1,"scale_down_at_ms":null,"reason":null}"#;
        let record = EnvironmentRecord::from_json(old).unwrap();
        assert_eq!(
            record.provider,
            ProviderState::Process {
                instances: vec![InstanceRecord {
                    port: 4001,
                    pid: Some(77),
                    restarts: 1
                }]
            }
        );
        let none = r#"{"color":"green","version":null,"status":"stopped","instances":[],"deployed_at_ms":null,"scale_down_at_ms":null,"reason":null}"#;
        assert_eq!(
            EnvironmentRecord::from_json(none).unwrap().provider,
            ProviderState::None
        );
    }
}
