//! The static provider: fixed addresses per color that someone else runs; bluegreen only routes to them.

use async_trait::async_trait;

use super::{DeployRequest, Provider, Started, StopRequest};
use crate::store::ProviderState;

pub struct StaticProvider;

#[async_trait]
impl Provider for StaticProvider {
    fn name(&self) -> &'static str {
        "static"
    }

    fn runs_elsewhere(&self) -> bool {
        true
    }

    /// The router's upstreams: the config's, or those set with `bluegreen upstreams`.
    async fn start(
        &self,
        request: &DeployRequest,
        _prepared: &ProviderState,
    ) -> Result<Started, String> {
        Ok(Started::at(request.current_upstreams.clone()))
    }

    async fn stop(&self, _request: &StopRequest) -> Result<(), String> {
        Ok(())
    }
}
