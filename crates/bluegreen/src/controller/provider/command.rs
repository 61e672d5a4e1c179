//! The command provider: the user's deploy script starts a version and prints `host:port` lines; their stop script stops a color.

use std::time::Duration;

use async_trait::async_trait;

use super::{DeployRequest, Provider, Started, StopRequest};
use crate::config::controller::ProviderSpec;
use crate::controller::hooks;
use crate::store::ProviderState;

pub struct CommandProvider;

#[async_trait]
impl Provider for CommandProvider {
    fn name(&self) -> &'static str {
        "command"
    }

    async fn start(
        &self,
        request: &DeployRequest,
        _prepared: &ProviderState,
    ) -> Result<Started, String> {
        let ProviderSpec::Command { deploy, .. } = &request.spec.provider else {
            return Err("the command provider needs app.deploy".into());
        };
        let _ = std::fs::create_dir_all(&request.logs_dir);
        let mut env: Vec<(String, String)> = request.spec.env.clone().into_iter().collect();
        env.extend(request.extra_env.clone());
        env.push((
            "BLUEGREEN_INSTANCES".into(),
            request.spec.instances.to_string(),
        ));
        let stdout = hooks::run(
            "deploy",
            deploy,
            &request.facts,
            &env,
            request.spec.ready_timeout,
            &request
                .logs_dir
                .join(format!("{}-deploy.log", request.color)),
        )
        .await?;
        let mut addrs = Vec::new();
        for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let addr = crate::config::parse_socket_addr(line).map_err(|e| {
                format!("the deploy script printed {line:?}, not an upstream address: {e}")
            })?;
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(
                "the deploy script printed no upstream address (one host:port per line on stdout)"
                    .into(),
            );
        }
        Ok(Started::at(addrs))
    }

    async fn stop(&self, request: &StopRequest) -> Result<(), String> {
        let ProviderSpec::Command { stop, .. } = &request.spec.provider else {
            return Ok(());
        };
        hooks::run(
            "stop",
            stop,
            &request.facts,
            &[],
            request.spec.stop_timeout.max(Duration::from_secs(30)),
            &request
                .logs_dir
                .join(format!("{}-deploy.log", request.color)),
        )
        .await
        .map(|_| ())
    }
}
