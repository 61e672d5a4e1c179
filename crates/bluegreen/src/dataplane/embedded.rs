//! bluegreen's own router as the data plane: the routing table in this process, swapped atomically.

use std::net::SocketAddr;

use async_trait::async_trait;
use bluegreen_router::{Color, ColorSnapshot, MirrorRule, Router, RouterStatus, Split};

use super::{DataPlane, PreviewRoute, UpstreamHealth};

/// The embedded router and how our own requests reach it.
pub struct EmbeddedRouter {
    router: Router,
    preview: PreviewRoute,
}

impl EmbeddedRouter {
    pub fn new(router: Router, preview: PreviewRoute) -> EmbeddedRouter {
        EmbeddedRouter { router, preview }
    }
}

#[async_trait]
impl DataPlane for EmbeddedRouter {
    fn split(&self) -> Split {
        self.router.table().split
    }

    fn check_split(&self, split: Split) -> Result<(), String> {
        self.router.check_split(split).map_err(|e| e.to_string())
    }

    async fn apply_split(&self, split: Split) -> Result<(), String> {
        self.router
            .set_split(split)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn set_upstreams(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String> {
        self.router
            .set_upstreams(color, upstreams)
            .await
            .map_err(|e| e.to_string())
    }

    async fn check_upstreams(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String> {
        self.router
            .check_upstreams(color, upstreams)
            .await
            .map_err(|e| e.to_string())
    }

    fn upstreams(&self, color: Color) -> Vec<UpstreamHealth> {
        self.router
            .table()
            .pool(color)
            .upstreams
            .iter()
            .map(|u| UpstreamHealth {
                addr: u.addr,
                health: u.health(),
                last_error: u.last_error(),
            })
            .collect()
    }

    fn healthy_count(&self, color: Color) -> usize {
        self.router.table().pool(color).healthy_count()
    }

    fn counters(&self) -> [ColorSnapshot; 2] {
        let status = self.router.status();
        Color::ALL.map(|color| {
            status
                .colors
                .iter()
                .find(|c| c.color == color)
                .map(|c| c.metrics.clone())
                .expect("the router reports both colors")
        })
    }

    fn preview(&self) -> PreviewRoute {
        self.preview.clone()
    }

    fn status(&self) -> RouterStatus {
        self.router.status()
    }

    fn set_mirror(&self, rule: Option<MirrorRule>) -> Result<(), String> {
        self.router.set_mirror(rule);
        Ok(())
    }

    fn prometheus(&self) -> String {
        self.router.prometheus()
    }

    fn is_stopping(&self) -> bool {
        self.router.is_stopping()
    }
}
