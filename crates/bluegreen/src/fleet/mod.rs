//! The fleet seam: every router's report of the state it applied, the wait until all of them applied a change, and the one router that leads.
//!
//! Implementations: [`etcd`] (reports under leased keys beside the state). One machine runs
//! without a fleet: its router is the only one and applies each change as it records it.

pub mod etcd;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use bluegreen_router::Color;

use crate::controller::Weights;
use crate::store::{EnvironmentRecord, Revision};

/// What one router says of itself, about once a second and at each change it applies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouterReport {
    /// `router.id` (the host's name unless configured).
    pub id: String,
    /// The revision of the router state (split and upstream overrides) it serves.
    pub applied: Revision,
    /// It lost the store and serves the last state it applied, which may be behind.
    pub stale: bool,
    /// Why the newest recorded state could not be applied here (no healthy upstream for a
    /// color it would send traffic to); it serves the last one it could.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    pub weights: Weights,
    /// Where it serves traffic.
    pub listen: String,
    pub pid: u32,
    pub version: String,
    /// Blue's and green's requests and errors (5xx answers and failed upstream attempts)
    /// since the router started, and healthy upstreams now.
    pub requests: [u64; 2],
    pub errors: [u64; 2],
    pub healthy: [usize; 2],
    /// Both colors' cumulative counters (answers by class, latency histogram): what the
    /// leader's analysis sums over the fleet and judges router by router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub counters: Option<[bluegreen_router::ColorSnapshot; 2]>,
    /// When it wrote this report, in milliseconds since the epoch.
    pub reported_ms: i64,
}

/// A router that had not applied a change when the wait ended.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Lagging {
    pub id: String,
    /// What it had applied (`None`: its report is gone — it stopped or lost the store).
    pub applied: Option<Revision>,
}

/// What the leader asks of every host's own instances of one color: each host's daemon does
/// it with its local provider and records the outcome as a [`HostEnvironment`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostOrder {
    /// Increases with each new order for the color; a host acts once on each.
    pub id: i64,
    pub color: Color,
    pub action: HostAction,
    /// The hosts that may act on it now (a deploy in batches widens the list); `None`: every
    /// host, also one that joins or comes back later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "do")]
pub enum HostAction {
    /// Deploy `version`, wait for health through this host's router, and (`test`) run the
    /// release's tests through this host's router.
    Deploy {
        version: String,
        #[serde(default)]
        extra_env: std::collections::BTreeMap<String, String>,
        test: bool,
    },
    /// Stop the color's instances (cleanup, an abandoned deploy).
    Stop,
}

/// One host's instances of one color as that host last recorded them (kept, not leased: a
/// restarted daemon adopts what its host record says runs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostEnvironment {
    /// The host's `router.id`.
    pub host: String,
    /// The last order it acted on (0: none).
    pub order: i64,
    /// Its tests' outcome for that order: `None` when none ran, else the failures (empty:
    /// passed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failures: Option<Vec<String>>,
    /// What runs there: version, status, the provider's state, upstreams, why it failed.
    pub record: EnvironmentRecord,
}

#[async_trait]
pub trait Fleet: Send + Sync + 'static {
    /// Publishes this router's report (kept while this process lives and reaches the store).
    async fn publish(&self, report: &RouterReport) -> Result<(), String>;

    /// Every live router's newest report, by id.
    async fn routers(&self) -> Result<Vec<RouterReport>, String>;

    /// Waits until every router live now (but this one, which applied it before asking) has
    /// applied `revision`; after `timeout`, the ones that have not.
    async fn wait_applied(&self, revision: Revision, timeout: Duration)
    -> Result<(), Vec<Lagging>>;

    /// Waits until this router leads the fleet: it alone drives releases and takes changes.
    /// The leadership lasts until the returned token is cancelled (its lease lapsed: this
    /// router lost the cluster, or `resign`).
    async fn lead(&self) -> Result<tokio_util::sync::CancellationToken, String>;

    /// Gives the leadership up at once (a binary upgrade hands over, the daemon stops).
    async fn resign(&self);

    /// Opens a new connection to the cluster for the store and the fleet alike (the old one
    /// may be wedged after a network partition).
    async fn reconnect(&self) -> Result<(), String>;

    /// The id of the router leading now, if any.
    async fn leader(&self) -> Option<String>;

    /// Records an order for every host (replacing the color's previous one).
    async fn order(&self, order: &HostOrder) -> Result<(), String>;

    /// The newest order of each color, and the revision they were read at; waits up to
    /// `patience` for an order newer than `after` (a revision this returned before).
    async fn orders(
        &self,
        after: Revision,
        patience: Duration,
    ) -> Result<(Vec<HostOrder>, Revision), String>;

    /// Records this host's instances of a color.
    async fn save_host(&self, host: &HostEnvironment) -> Result<(), String>;

    /// Every host's record of its instances (of both colors).
    async fn hosts(&self) -> Result<Vec<HostEnvironment>, String>;
}
