//! The daemon's state on disk: SQLite (WAL) in `state_dir/state.db`: router state, environments, releases, steps, events.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use bluegreen_router::{Color, Split};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

/// The schema this binary writes; `PRAGMA user_version` holds the one on disk.
pub const SCHEMA_VERSION: u32 = 2;

/// Schema changes, in order: entry `i` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE router_state (
         id INTEGER PRIMARY KEY CHECK (id = 1),
         state TEXT NOT NULL
     );
     CREATE TABLE events (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         at_ms INTEGER NOT NULL,
         kind TEXT NOT NULL,
         message TEXT NOT NULL
     );",
    // 2: the controller's environments, releases and their steps; events name their release.
    "CREATE TABLE environments (
         color TEXT PRIMARY KEY,
         version TEXT,
         status TEXT NOT NULL,
         record TEXT NOT NULL,
         updated_ms INTEGER NOT NULL
     );
     CREATE TABLE releases (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         version TEXT,
         color TEXT NOT NULL,
         state TEXT NOT NULL,
         started_ms INTEGER NOT NULL,
         ended_ms INTEGER,
         record TEXT NOT NULL
     );
     CREATE TABLE steps (
         id INTEGER PRIMARY KEY AUTOINCREMENT,
         release_id INTEGER NOT NULL REFERENCES releases (id),
         name TEXT NOT NULL,
         status TEXT NOT NULL,
         started_ms INTEGER NOT NULL,
         ended_ms INTEGER,
         detail TEXT NOT NULL DEFAULT ''
     );
     ALTER TABLE events ADD COLUMN release_id INTEGER;",
];

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
    #[serde(default)]
    pub release_id: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentStatus {
    Stopped,
    Deploying,
    Running,
    /// Its instances crash-looped or never became healthy; `reason` says which.
    Failed,
}

/// One app instance the process provider runs: its port stays with it across restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub port: u16,
    pub pid: Option<u32>,
    #[serde(default)]
    pub restarts: u32,
}

/// What runs in one color.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnvironmentRecord {
    pub color: Color,
    pub version: Option<String>,
    pub status: EnvironmentStatus,
    #[serde(default)]
    pub instances: Vec<InstanceRecord>,
    #[serde(default)]
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
            instances: Vec::new(),
            upstreams: Vec::new(),
            extra_env: BTreeMap::new(),
            deployed_at_ms: None,
            scale_down_at_ms: None,
            reason: None,
        }
    }
}

/// One step row of a release: a pipeline stage or a shift step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub id: i64,
    pub release_id: i64,
    pub name: String,
    pub status: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub detail: String,
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
        insert_event(&transaction, kind, message, None).map_err(|e| self.sqlite(e))?;
        transaction.commit().map_err(|e| self.sqlite(e))
    }

    /// The newest `limit` events, oldest first.
    #[cfg(test)]
    pub fn events(&self, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.events_after(0, limit)
    }

    pub fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        // From the start: the newest `limit`. After an event: the oldest `limit` after it, so
        // a follower that asks again with the last id it saw misses nothing.
        let sql = if after == 0 {
            "SELECT id, at_ms, kind, message, release_id FROM
               (SELECT * FROM events ORDER BY id DESC LIMIT ?1)
             WHERE id > ?2 ORDER BY id"
        } else {
            "SELECT id, at_ms, kind, message, release_id FROM events
             WHERE id > ?2 ORDER BY id LIMIT ?1"
        };
        let mut statement = connection.prepare(sql).map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map(params![limit as i64, after], |row| {
                Ok(Event {
                    id: row.get(0)?,
                    at_ms: row.get(1)?,
                    kind: row.get(2)?,
                    message: row.get(3)?,
                    release_id: row.get(4)?,
                })
            })
            .map_err(|e| self.sqlite(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sqlite(e))
    }

    /// Appends an event that goes with no state change of its own.
    pub fn event(&self, kind: &str, message: &str, release: Option<i64>) -> Result<(), StoreError> {
        let connection = self.connection.lock().expect("lock");
        insert_event(&connection, kind, message, release).map_err(|e| self.sqlite(e))
    }

    /// Both colors' records (a color never deployed reads as stopped).
    pub fn environments(&self) -> Result<[EnvironmentRecord; 2], StoreError> {
        let connection = self.connection.lock().expect("lock");
        let mut found = Color::ALL.map(EnvironmentRecord::stopped);
        let mut statement = connection
            .prepare("SELECT record FROM environments")
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(|e| self.sqlite(e))?;
        for text in rows {
            let text = text.map_err(|e| self.sqlite(e))?;
            let record: EnvironmentRecord =
                serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                    path: self.path.clone(),
                    source,
                })?;
            let index = record.color.index();
            found[index] = record;
        }
        Ok(found)
    }

    /// Saves one color's record, and the event that explains it when there is one.
    pub fn save_environment(
        &self,
        record: &EnvironmentRecord,
        event: Option<(&str, &str, Option<i64>)>,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).expect("record serializes");
        let status = serde_json::to_value(record.status).expect("status serializes");
        let mut connection = self.connection.lock().expect("lock");
        let transaction = connection.transaction().map_err(|e| self.sqlite(e))?;
        transaction
            .execute(
                "INSERT INTO environments (color, version, status, record, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (color) DO UPDATE SET version = excluded.version,
                   status = excluded.status, record = excluded.record,
                   updated_ms = excluded.updated_ms",
                params![
                    record.color.as_str(),
                    record.version,
                    status.as_str().unwrap_or("?"),
                    json,
                    now_ms()
                ],
            )
            .map_err(|e| self.sqlite(e))?;
        if let Some((kind, message, release)) = event {
            insert_event(&transaction, kind, message, release).map_err(|e| self.sqlite(e))?;
        }
        transaction.commit().map_err(|e| self.sqlite(e))
    }

    /// Inserts a new release (its `id` is assigned) or saves an existing one, with its event.
    pub fn save_release<R: Serialize + ReleaseRow>(
        &self,
        release: &mut R,
        kind: &str,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.lock().expect("lock");
        let transaction = connection.transaction().map_err(|e| self.sqlite(e))?;
        if release.id() == 0 {
            transaction
                .execute(
                    "INSERT INTO releases (version, color, state, started_ms, record)
                     VALUES (?1, ?2, ?3, ?4, '{}')",
                    params![
                        release.version(),
                        release.color().as_str(),
                        release.state(),
                        release.started_ms()
                    ],
                )
                .map_err(|e| self.sqlite(e))?;
            release.set_id(transaction.last_insert_rowid());
        }
        let json = serde_json::to_string(release).expect("release serializes");
        transaction
            .execute(
                "UPDATE releases SET state = ?2, ended_ms = ?3, record = ?4 WHERE id = ?1",
                params![release.id(), release.state(), release.ended_ms(), json],
            )
            .map_err(|e| self.sqlite(e))?;
        insert_event(&transaction, kind, message, Some(release.id()))
            .map_err(|e| self.sqlite(e))?;
        transaction.commit().map_err(|e| self.sqlite(e))
    }

    /// The newest `limit` releases as saved, newest first.
    pub fn releases<R: serde::de::DeserializeOwned>(
        &self,
        limit: usize,
    ) -> Result<Vec<R>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        let mut statement = connection
            .prepare("SELECT record FROM releases ORDER BY id DESC LIMIT ?1")
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map(params![limit as i64], |row| row.get::<_, String>(0))
            .map_err(|e| self.sqlite(e))?;
        let mut releases = Vec::new();
        for text in rows {
            let text = text.map_err(|e| self.sqlite(e))?;
            releases.push(
                serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                    path: self.path.clone(),
                    source,
                })?,
            );
        }
        Ok(releases)
    }

    /// Opens a step row of a release; [`Store::end_step`] closes it.
    pub fn start_step(&self, release: i64, name: &str, detail: &str) -> Result<i64, StoreError> {
        let connection = self.connection.lock().expect("lock");
        connection
            .execute(
                "INSERT INTO steps (release_id, name, status, started_ms, detail)
                 VALUES (?1, ?2, 'running', ?3, ?4)",
                params![release, name, now_ms(), detail],
            )
            .map_err(|e| self.sqlite(e))?;
        Ok(connection.last_insert_rowid())
    }

    pub fn end_step(&self, step: i64, status: &str, detail: &str) -> Result<(), StoreError> {
        let connection = self.connection.lock().expect("lock");
        connection
            .execute(
                "UPDATE steps SET status = ?2, ended_ms = ?3, detail = ?4 WHERE id = ?1",
                params![step, status, now_ms(), detail],
            )
            .map(|_| ())
            .map_err(|e| self.sqlite(e))
    }

    /// Steps still marked running (left so by a daemon that died) are closed as interrupted.
    pub fn interrupt_steps(&self, release: i64) -> Result<(), StoreError> {
        let connection = self.connection.lock().expect("lock");
        connection
            .execute(
                "UPDATE steps SET status = 'interrupted', ended_ms = ?2
                 WHERE release_id = ?1 AND status = 'running'",
                params![release, now_ms()],
            )
            .map(|_| ())
            .map_err(|e| self.sqlite(e))
    }

    pub fn steps(&self, release: i64) -> Result<Vec<StepRecord>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        let mut statement = connection
            .prepare(
                "SELECT id, release_id, name, status, started_ms, ended_ms, detail
                 FROM steps WHERE release_id = ?1 ORDER BY id",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map(params![release], |row| {
                Ok(StepRecord {
                    id: row.get(0)?,
                    release_id: row.get(1)?,
                    name: row.get(2)?,
                    status: row.get(3)?,
                    started_ms: row.get(4)?,
                    ended_ms: row.get(5)?,
                    detail: row.get(6)?,
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

/// What the store needs to know of a release to index it; the rest is its JSON.
pub trait ReleaseRow {
    fn id(&self) -> i64;
    fn set_id(&mut self, id: i64);
    fn version(&self) -> Option<&str>;
    fn color(&self) -> Color;
    fn state(&self) -> &'static str;
    fn started_ms(&self) -> i64;
    fn ended_ms(&self) -> Option<i64>;
}

fn insert_event(
    connection: &Connection,
    kind: &str,
    message: &str,
    release: Option<i64>,
) -> rusqlite::Result<()> {
    connection
        .execute(
            "INSERT INTO events (at_ms, kind, message, release_id) VALUES (?1, ?2, ?3, ?4)",
            params![now_ms(), kind, message, release],
        )
        .map(|_| ())
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
    fn a_schema_1_store_is_migrated_and_keeps_its_state_and_events() {
        let dir = tempfile::tempdir().unwrap();
        {
            // As schema 1 (the router-only release) left it.
            let connection = Connection::open(dir.path().join("state.db")).unwrap();
            connection.execute_batch(MIGRATIONS[0]).unwrap();
            connection.pragma_update(None, "user_version", 1).unwrap();
            connection
                .execute(
                    "INSERT INTO router_state (id, state) VALUES (1, ?1)",
                    params![r#"{"split":{"green_percent":100},"rollback_to":"blue"}"#],
                )
                .unwrap();
            connection
                .execute(
                    "INSERT INTO events (at_ms, kind, message) VALUES (1, 'switch', 'switched: green is live')",
                    [],
                )
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.load().unwrap().unwrap().split,
            Split::all(Color::Green)
        );
        let events = store.events(10).unwrap();
        assert_eq!(events[0].message, "switched: green is live");
        assert_eq!(events[0].release_id, None);
        // The new tables are there and usable.
        let environments = store.environments().unwrap();
        assert_eq!(environments[0].status, EnvironmentStatus::Stopped);
        let mut green = EnvironmentRecord::stopped(Color::Green);
        green.version = Some("2.0".into());
        green.status = EnvironmentStatus::Running;
        store
            .save_environment(&green, Some(("deploy", "green runs 2.0", None)))
            .unwrap();
        assert_eq!(store.environments().unwrap()[1], green);
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
