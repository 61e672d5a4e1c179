//! A release as recorded: what it moves where, its state, how far it got, and what operators ask of it.

use std::collections::BTreeMap;

use bluegreen_router::Color;
use serde::{Deserialize, Serialize};

use super::analysis::{MirrorVerdict, Verdict};
use crate::config::strategy::Strategy;
use crate::store::{StoredRelease, now_ms};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseKind {
    /// `bluegreen release`: the whole pipeline.
    Release,
    /// `bluegreen switch --strategy`: only the shift, to a color already deployed.
    Shift,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    Deploying,
    Testing,
    /// Shadow traffic: copies of live requests answered by the new color, compared.
    Mirroring,
    /// A user stage of the pipeline.
    Running,
    Shifting,
    Monitoring,
    Succeeded,
    RolledBack,
    Failed,
    Aborted,
}

impl ReleaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseState::Deploying => "deploying",
            ReleaseState::Testing => "testing",
            ReleaseState::Mirroring => "mirroring",
            ReleaseState::Running => "running",
            ReleaseState::Shifting => "shifting",
            ReleaseState::Monitoring => "monitoring",
            ReleaseState::Succeeded => "succeeded",
            ReleaseState::RolledBack => "rolled_back",
            ReleaseState::Failed => "failed",
            ReleaseState::Aborted => "aborted",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            ReleaseState::Succeeded
                | ReleaseState::RolledBack
                | ReleaseState::Failed
                | ReleaseState::Aborted
        )
    }
}

/// A release as recorded: what it moves where, how far it got, and how it ended.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Release {
    pub id: i64,
    /// The store's revision of this record when it was last read or written.
    #[serde(skip)]
    pub revision: i64,
    pub kind: ReleaseKind,
    pub version: Option<String>,
    /// The color the release moves traffic to.
    pub color: Color,
    pub from_color: Color,
    pub from_version: Option<String>,
    pub strategy: Strategy,
    pub state: ReleaseState,
    /// The pipeline stage in progress.
    pub stage: String,
    /// The shift step in progress (index into the strategy's steps) and its percent.
    pub step: usize,
    pub percent: u8,
    /// Whether any traffic has reached the new color: decides rollback versus abandon.
    pub traffic_moved: bool,
    pub paused: bool,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub reason: Option<String>,
    #[serde(default)]
    pub extra_env: BTreeMap<String, String>,
    /// The last analysis of the new color.
    pub verdict: Option<Verdict>,
    /// When the step in progress is due to end (Unix ms; `None` while waiting for promote).
    pub step_ends_ms: Option<i64>,
    /// The first release of a service: nothing ran before it, so it switched at once.
    #[serde(default)]
    pub first: bool,
    /// `migrate_expand` ran: a release that ends without its version live runs
    /// `migrate_rollback`.
    #[serde(default)]
    pub expanded: bool,
    /// The last judgement of shadow traffic (the mirror stage, or beside the canary).
    #[serde(default)]
    pub mirror: Option<MirrorVerdict>,
}

impl Release {
    /// A release as asked for and planned, before it is recorded (its id is then assigned).
    pub fn new(
        request: ReleaseRequest,
        plan: &ReleasePlan,
        strategy: Strategy,
        deployed_version: Option<String>,
        from_version: Option<String>,
    ) -> Release {
        Release {
            id: 0,
            revision: 0,
            kind: request.kind,
            version: match request.kind {
                ReleaseKind::Release => request.version,
                ReleaseKind::Shift => deployed_version,
            },
            color: plan.color,
            from_color: plan.from,
            from_version: if plan.first { None } else { from_version },
            strategy,
            state: match request.kind {
                ReleaseKind::Release => ReleaseState::Deploying,
                ReleaseKind::Shift => ReleaseState::Shifting,
            },
            stage: String::new(),
            step: 0,
            percent: 0,
            traffic_moved: false,
            paused: false,
            started_ms: now_ms(),
            ended_ms: None,
            reason: None,
            extra_env: request.extra_env,
            verdict: None,
            step_ends_ms: None,
            first: plan.first,
            expanded: false,
            mirror: None,
        }
    }

    /// What the release's first event says: what goes where, from what, and how.
    pub fn start_message(&self) -> String {
        let version = self.version.as_deref().unwrap_or("shift");
        let (color, live) = (self.color, self.from_color);
        let from = match &self.from_version {
            Some(version) => format!("{live} {version}"),
            None if self.first => "nothing".to_string(),
            None => format!("{live} ?"),
        };
        if self.first {
            format!(
                "release started: {version} to {color} (from {from}); first release: no baseline to compare with, switching at once"
            )
        } else {
            format!(
                "release started: {version} to {color} (from {from}), strategy {}, {} of planned holds",
                self.strategy.describe(),
                crate::duration::format(self.strategy.planned())
            )
        }
    }

    /// The record as the store keeps it.
    pub fn to_stored(&self) -> StoredRelease {
        StoredRelease {
            id: self.id,
            version: self.version.clone(),
            color: self.color,
            state: self.state.as_str().to_string(),
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            document: serde_json::to_value(self).expect("a release serializes"),
        }
    }

    pub fn from_stored(stored: crate::store::Versioned<StoredRelease>) -> Result<Release, String> {
        let mut release: Release = serde_json::from_value(stored.value.document)
            .map_err(|e| format!("release #{} does not parse: {e}", stored.value.id))?;
        release.revision = stored.revision;
        Ok(release)
    }
}

/// How a release will run.
#[derive(Debug, PartialEq)]
pub struct ReleasePlan {
    pub color: Color,
    pub from: Color,
    /// The live color runs nothing: there is no baseline to compare with, so the release
    /// switches at once instead of shifting step by step.
    pub first: bool,
}

/// What operators ask of a running release.
#[derive(Clone, Debug, Default)]
pub struct Control {
    pub paused: bool,
    /// Bumped by each promote; `full` skips to 100 %.
    pub promotions: u64,
    pub full: bool,
    pub abort: Option<String>,
}

/// What `release` and `switch --strategy` ask for.
pub struct ReleaseRequest {
    pub kind: ReleaseKind,
    pub version: Option<String>,
    pub strategy: Option<String>,
    pub extra_env: BTreeMap<String, String>,
    /// For a shift: the color to move to (default: the idle one).
    pub to: Option<Color>,
}
