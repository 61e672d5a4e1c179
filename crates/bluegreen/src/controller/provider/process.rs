//! The process provider (the default): N instances of a command template on free local ports, supervised and adopted after a restart.

use std::net::SocketAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use bluegreen_router::Color;
use tokio::sync::mpsc;

use super::supervisor::{Launch, Supervisor, Unrecorded, free_ports};
use super::{DeployRequest, InstanceEvent, Provider, Started, StopRequest};
use crate::config::controller::ProviderSpec;
use crate::store::{EnvironmentRecord, InstanceRecord, ProviderState};

pub struct ProcessProvider {
    supervisor: Supervisor,
    events: Mutex<Option<mpsc::UnboundedReceiver<InstanceEvent>>>,
}

impl Default for ProcessProvider {
    fn default() -> ProcessProvider {
        ProcessProvider::new()
    }
}

impl ProcessProvider {
    pub fn new() -> ProcessProvider {
        let (events, receiver) = mpsc::unbounded_channel();
        ProcessProvider {
            supervisor: Supervisor::new(events),
            events: Mutex::new(Some(receiver)),
        }
    }

    fn launch(request: &DeployRequest) -> Launch {
        let mut env = request.spec.env.clone();
        env.extend(request.extra_env.clone());
        Launch {
            color: request.color,
            version: request.version.clone(),
            argv: match &request.spec.provider {
                ProviderSpec::Process { command } => command.clone(),
                _ => Vec::new(),
            },
            env,
            stop_timeout: request.spec.stop_timeout,
            logs_dir: request.logs_dir.clone(),
        }
    }
}

#[async_trait]
impl Provider for ProcessProvider {
    fn name(&self) -> &'static str {
        "process"
    }

    /// A free port per instance, recorded before anything starts.
    fn prepare(&self, request: &DeployRequest) -> Result<ProviderState, String> {
        let instances = free_ports(request.spec.instances as usize)
            .map_err(|e| format!("no free port: {e}"))?
            .into_iter()
            .map(|port| InstanceRecord {
                port,
                pid: None,
                restarts: 0,
            })
            .collect();
        Ok(ProviderState::Process { instances })
    }

    async fn start(
        &self,
        request: &DeployRequest,
        prepared: &ProviderState,
    ) -> Result<Started, String> {
        let instances = prepared.instances().to_vec();
        let addrs = instances
            .iter()
            .map(|i| SocketAddr::from(([127, 0, 0, 1], i.port)))
            .collect();
        self.supervisor
            .start(
                ProcessProvider::launch(request),
                instances,
                Unrecorded::Ignore,
            )
            .await
            .map_err(|e| format!("cannot start instances: {e}"))?;
        Ok(Started::at(addrs))
    }

    async fn stop(&self, request: &StopRequest) -> Result<(), String> {
        self.supervisor.stop(request.color).await;
        Ok(())
    }

    async fn abandon(&self, color: Color) {
        self.supervisor.stop(color).await;
    }

    async fn adopt(
        &self,
        request: &DeployRequest,
        record: &EnvironmentRecord,
    ) -> Result<Option<String>, String> {
        let instances = record.provider.instances();
        if instances.is_empty() {
            return Ok(None);
        }
        let adopted = instances.iter().filter(|i| i.pid.is_some()).count();
        self.supervisor
            .start(
                ProcessProvider::launch(request),
                instances.to_vec(),
                Unrecorded::Adopt,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(Some(format!(
            "{} {}: {} instance(s) brought back ({adopted} recorded as running are adopted if still alive)",
            request.color,
            request.version,
            instances.len()
        )))
    }

    fn take_events(&self) -> Option<mpsc::UnboundedReceiver<InstanceEvent>> {
        self.events.lock().expect("lock").take()
    }

    fn is_current(&self, color: Color, generation: u64) -> bool {
        self.supervisor.generation(color) == Some(generation)
    }

    async fn shutdown(&self) {
        self.supervisor.stop_all().await;
    }

    async fn detach(&self) {
        self.supervisor.detach_all().await;
    }
}
