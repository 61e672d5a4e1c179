//! The state store seam: what the controller persists, written compare-and-set on revisions and watched as a stream of changes.
//!
//! Every write names the revision at which it read each record it changes; a writer holding
//! a stale revision is refused with [`StoreError::Conflict`], never interleaved. Each commit
//! makes one new store-wide revision, and [`StateStore::watch`] streams the commits after a
//! revision, so a follower (a router on another host, a live view) misses nothing.
//!
//! Implementations: [`sqlite`] (the embedded default) and [`etcd`] (a fleet's). The contract every implementation
//! keeps is the test suite in [`contract`]; a new store runs the same suite.

pub mod contract;
pub mod etcd;
mod records;
pub mod sqlite;

use std::path::PathBuf;

use async_trait::async_trait;
use bluegreen_router::Color;
use futures_util::stream::BoxStream;

pub use records::{
    ContainerRecord, EnvironmentRecord, EnvironmentStatus, Event, InstanceRecord, ProviderState,
    RouterState, StepRecord, StoredRelease, now_ms,
};
pub use sqlite::SqliteStore;

/// A store-wide counter: every commit makes the next one. `0` means "never written".
pub type Revision = i64;

/// A record and the revision of the commit that last changed it (`0`: never written).
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: Revision,
}

/// The records a commit can change, as `watch` names them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    RouterState,
    Environment(Color),
    Release(i64),
    Step(i64),
    Event(i64),
}

/// One commit, as `watch` streams it.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub revision: Revision,
    pub keys: Vec<Key>,
    /// The router state the commit wrote, when the store's watch carries values (etcd's
    /// does): a follower applies it without reading it back.
    pub router_state: Option<RouterState>,
}

/// What a commit does to a release's steps.
#[derive(Clone, Debug, PartialEq)]
pub enum StepWrite {
    /// Opens a step row, `running`; its id comes back in [`Committed::step_id`].
    Start { name: String, detail: String },
    /// Closes a step, conditional on the revision at which it was opened (or last read).
    End {
        id: i64,
        revision: Revision,
        status: String,
        detail: String,
    },
    /// Closes every step of the release still marked running as `interrupted`.
    InterruptRunning,
}

/// An audit event that goes with a commit.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEvent {
    pub kind: String,
    pub message: String,
    pub release_id: Option<i64>,
}

/// One atomic, conditional write: each part carries the revision its writer read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Write {
    pub router_state: Option<(Revision, RouterState)>,
    pub environment: Option<(Revision, EnvironmentRecord)>,
    /// A release with id `0` is inserted (expected revision `0`) and gets the next id.
    pub release: Option<(Revision, StoredRelease)>,
    /// Steps of the release in `release`, or of the release with this id.
    pub steps: Option<(i64, StepWrite)>,
    pub event: Option<NewEvent>,
}

impl Write {
    pub fn event(kind: impl AsRef<str>, message: &str, release_id: Option<i64>) -> Write {
        Write {
            event: Some(NewEvent {
                kind: kind.as_ref().to_string(),
                message: message.to_string(),
                release_id,
            }),
            ..Write::default()
        }
    }

    pub fn with_event(
        mut self,
        kind: impl AsRef<str>,
        message: &str,
        release_id: Option<i64>,
    ) -> Write {
        self.event = Write::event(kind, message, release_id).event;
        self
    }
}

/// What a commit made.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Committed {
    pub revision: Revision,
    /// The id of a release the commit inserted (or of the one it saved).
    pub release_id: Option<i64>,
    pub step_id: Option<i64>,
    pub event_id: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state store {path} has schema {found}, newer than this binary understands ({supported}); upgrade bluegreen"
    )]
    TooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "state store {path} holds a record that does not parse ({source}); move the file aside to start from the config"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot import the older state file {path}: {reason}")]
    Legacy { path: PathBuf, reason: String },
    /// Someone wrote the record since the writer read it: read again and decide again.
    #[error(
        "{key:?} changed since it was read (read at revision {expected}, now {found}); read it again and retry"
    )]
    Conflict {
        key: Key,
        expected: Revision,
        found: Revision,
    },
    /// The changes after this revision are no longer kept: read everything again.
    #[error(
        "revision {asked} is compacted (the oldest kept is {oldest}); read the whole state again"
    )]
    Compacted { asked: Revision, oldest: Revision },
    #[error("state store etcd {endpoints}: {source}")]
    Etcd {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("state store: {0}")]
    Other(String),
}

/// Everything the controller persists: the split and upstream overrides, both environments,
/// releases and their steps, and the audit log.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Where the state lives, for messages ("sqlite .bluegreen/state.db").
    fn describe(&self) -> String;

    /// The newest revision.
    async fn revision(&self) -> Result<Revision, StoreError>;

    /// The recorded split and overrides, if a switch has ever been recorded.
    async fn router_state(&self) -> Result<Versioned<Option<RouterState>>, StoreError>;

    /// The router state as of `revision` or later, for a follower that just saw a commit at
    /// `revision` (a store may answer it from a nearer copy than `router_state` does).
    async fn router_state_since(
        &self,
        _revision: Revision,
    ) -> Result<Versioned<Option<RouterState>>, StoreError> {
        self.router_state().await
    }

    /// Both colors' records (a color never deployed reads as stopped, revision 0).
    async fn environments(&self) -> Result<[Versioned<EnvironmentRecord>; 2], StoreError>;

    /// The newest `limit` releases, newest first.
    async fn releases(&self, limit: usize) -> Result<Vec<Versioned<StoredRelease>>, StoreError>;

    async fn steps(&self, release: i64) -> Result<Vec<StepRecord>, StoreError>;

    /// From `after == 0`: the newest `limit` events; after an event: the oldest `limit` after
    /// it, so a follower asking again with the last id it saw misses nothing. Oldest first.
    async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError>;

    /// Applies every part of `write` in one atomic commit, or nothing: refused with
    /// [`StoreError::Conflict`] when any record changed since the revision its part names.
    async fn commit(&self, write: Write) -> Result<Committed, StoreError>;

    /// The commits after `from`, in order, then each new one as it lands. The first item is
    /// [`StoreError::Compacted`] when the commits after `from` are no longer kept.
    fn watch(&self, from: Revision) -> BoxStream<'static, Result<Change, StoreError>>;
}
