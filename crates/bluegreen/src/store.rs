//! The daemon's state on disk: SQLite (WAL) in `state_dir/state.db`, the router state and an append-only event log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bluegreen_router::{Color, Split};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The schema this binary writes; `PRAGMA user_version` holds the one on disk.
pub const SCHEMA_VERSION: u32 = 1;

/// Schema changes, in order: entry `i` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &["CREATE TABLE router_state (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         state TEXT NOT NULL
     );
     CREATE TABLE events (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         at_ms INTEGER NOT NULL,
         kind TEXT NOT NULL,
         message TEXT NOT NULL
     );"];

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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: i64,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state store {path} has schema {found}, newer than this binary understands ({SCHEMA_VERSION}); upgrade bluegreen"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error(
        "state store {path} holds a router state that does not parse ({source}); move the file aside to start from the config"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot import the older state file {path}: {reason}")]
    Legacy { path: PathBuf, reason: String },
}

pub struct Store {
    path: PathBuf,
    connection: Mutex<Connection>,
}

impl Store {
    /// Opens (or creates) `dir/state.db`, brings its schema up to date, and imports the JSON
    /// state file older versions wrote, if one is there.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("state.db");
        let sqlite = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let mut connection = Connection::open(&path).map_err(sqlite)?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(sqlite)?;
        // Every commit reaches the disk before the router acts on it.
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        let found: u32 = connection
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(sqlite)?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path, found });
        }
        let migrate = connection.transaction().map_err(sqlite)?;
        for migration in &MIGRATIONS[found as usize..] {
            migrate.execute_batch(migration).map_err(sqlite)?;
        }
        migrate
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sqlite)?;
        migrate.commit().map_err(sqlite)?;
        let store = Store {
            path,
            connection: Mutex::new(connection),
        };
        store.import_legacy(dir)?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sqlite(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// The recorded router state, if any.
    pub fn load(&self) -> Result<Option<RouterState>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        let text: Option<String> = connection
            .query_row("SELECT state FROM router_state WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()
            .map_err(|e| self.sqlite(e))?;
        text.map(|text| {
            serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                path: self.path.clone(),
                source,
            })
        })
        .transpose()
    }

    /// Records a new state and the event that explains it, in one transaction.
    pub fn record(&self, state: &RouterState, kind: &str, message: &str) -> Result<(), StoreError> {
        let json = serde_json::to_string(state).expect("state serializes");
        let mut connection = self.connection.lock().expect("lock");
        let transaction = connection.transaction().map_err(|e| self.sqlite(e))?;
        transaction
            .execute(
                "INSERT INTO router_state (id, state) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state",
                params![json],
            )
            .map_err(|e| self.sqlite(e))?;
        transaction
            .execute(
                "INSERT INTO events (at_ms, kind, message) VALUES (?1, ?2, ?3)",
                params![now_ms(), kind, message],
            )
            .map_err(|e| self.sqlite(e))?;
        transaction.commit().map_err(|e| self.sqlite(e))
    }

    /// The newest `limit` events, oldest first.
    pub fn events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        let mut statement = connection
            .prepare(
                "SELECT id, at_ms, kind, message FROM
                   (SELECT * FROM events ORDER BY id DESC LIMIT ?1)
                 ORDER BY id",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map(params![limit as i64], |row| {
                Ok(Event {
                    id: row.get(0)?,
                    at_ms: row.get(1)?,
                    kind: row.get(2)?,
                    message: row.get(3)?,
                })
            })
            .map_err(|e| self.sqlite(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sqlite(e))
    }

    /// Versions before the SQLite store kept `router-state.json`; take its state over once.
    fn import_legacy(&self, dir: &Path) -> Result<(), StoreError> {
        let legacy = dir.join("router-state.json");
        if !legacy.exists() || self.load()?.is_some() {
            return Ok(());
        }
        let fail = |reason: String| StoreError::Legacy {
            path: legacy.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&legacy).map_err(|e| fail(e.to_string()))?;
        let state: RouterState = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
        self.record(
            &state,
            "import",
            &format!("imported {} from {}", state.split, legacy.display()),
        )?;
        std::fs::rename(&legacy, dir.join("router-state.json.imported"))
            .map_err(|e| fail(e.to_string()))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> RouterState {
        RouterState {
            split: Split::all(Color::Green),
            rollback_to: Some(Color::Blue),
            upstreams: UpstreamOverrides {
                blue: None,
                green: Some(vec!["127.0.0.1:9005".parse().unwrap()]),
            },
        }
    }

    #[test]
    fn a_recorded_state_and_its_events_load_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store
            .record(&state(), "switch", "switched: green is live")
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load().unwrap(), Some(state()));
        let events = store.events(10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, "switch");
    }

    #[test]
    fn events_come_newest_last_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            store
                .record(&state(), "weights", &format!("step {i}"))
                .unwrap();
        }
        let events = store.events(2).unwrap();
        let messages: Vec<_> = events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["step 3", "step 4"]);
    }

    #[test]
    fn the_json_state_of_older_versions_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        // As the first release wrote it: schema 1, the split and the rollback color.
        std::fs::write(
            dir.path().join("router-state.json"),
            r#"{"schema":1,"split":{"green_percent":40},"rollback_to":"blue"}"#,
        )
        .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded.split, Split::green_percent(40).unwrap());
        assert_eq!(loaded.rollback_to, Some(Color::Blue));
        assert_eq!(store.events(10).unwrap()[0].kind, "import");
        assert!(!dir.path().join("router-state.json").exists());
        assert!(dir.path().join("router-state.json.imported").exists());
    }

    #[test]
    fn a_store_from_a_newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let connection = Connection::open(dir.path().join("state.db")).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        drop(connection);
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
