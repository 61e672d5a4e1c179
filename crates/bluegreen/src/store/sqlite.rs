//! The embedded state store: SQLite in WAL mode with synchronous commits, in `state_dir/state.db`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bluegreen_router::Color;
use futures_util::stream::{self, BoxStream, StreamExt};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::watch;

use super::{
    Change, Committed, EnvironmentRecord, Event, Key, NewEvent, Revision, RouterState, StateStore,
    StepRecord, StepWrite, StoreError, StoredRelease, Versioned, Write, now_ms,
};

/// The schema this binary writes; `PRAGMA user_version` holds the one on disk.
pub const SCHEMA_VERSION: u32 = 3;

/// How many commits `watch` can replay; older ones are compacted.
const KEPT_CHANGES: i64 = 10_000;

/// Schema changes, in order: entry `i` takes version `i` to `i + 1`.
pub(crate) const MIGRATIONS: &[&str] = &[
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
    // 3: revisions. Each commit is a row of `changes`; each record names the commit that
    // last changed it. What was there before counts as revision 1.
    "CREATE TABLE changes (
         revision INTEGER PRIMARY KEY AUTOINCREMENT,
         at_ms INTEGER NOT NULL,
         keys TEXT NOT NULL
     );
     INSERT INTO changes (at_ms, keys) VALUES (0, '[]');
     ALTER TABLE router_state ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE environments ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE releases ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
     ALTER TABLE steps ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;",
];

/// The SQLite store. Its calls run on tokio's blocking pool: a commit waiting for the disk
/// never holds a runtime worker the router needs.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    connection: Mutex<Connection>,
    /// The newest revision, for watchers to wake on.
    newest: watch::Sender<Revision>,
}

impl SqliteStore {
    /// Opens (or creates) `dir/state.db`, brings its schema up to date, and imports the JSON
    /// state file older versions wrote, if one is there.
    pub fn open(dir: &Path) -> Result<SqliteStore, StoreError> {
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
            return Err(StoreError::TooNew {
                path,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        let migrate = connection.transaction().map_err(sqlite)?;
        for migration in &MIGRATIONS[found as usize..] {
            migrate.execute_batch(migration).map_err(sqlite)?;
        }
        migrate
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sqlite)?;
        migrate.commit().map_err(sqlite)?;
        let newest = newest_revision(&connection).map_err(sqlite)?;
        let store = SqliteStore {
            inner: Arc::new(Inner {
                path,
                connection: Mutex::new(connection),
                newest: watch::Sender::new(newest),
            }),
        };
        store.inner.import_legacy(dir)?;
        Ok(store)
    }

    /// Runs `work` on the blocking pool with the connection.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| StoreError::Other(format!("the store's worker stopped: {e}")))?
    }
}

#[async_trait]
impl StateStore for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite {}", self.inner.path.display())
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        self.blocking(|inner| {
            let connection = inner.connection.lock().expect("lock");
            newest_revision(&connection).map_err(|e| inner.sqlite(e))
        })
        .await
    }

    async fn router_state(&self) -> Result<Versioned<Option<RouterState>>, StoreError> {
        self.blocking(|inner| inner.router_state()).await
    }

    async fn environments(&self) -> Result<[Versioned<EnvironmentRecord>; 2], StoreError> {
        self.blocking(|inner| inner.environments()).await
    }

    async fn releases(&self, limit: usize) -> Result<Vec<Versioned<StoredRelease>>, StoreError> {
        self.blocking(move |inner| inner.releases(limit)).await
    }

    async fn steps(&self, release: i64) -> Result<Vec<StepRecord>, StoreError> {
        self.blocking(move |inner| inner.steps(release)).await
    }

    async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        self.blocking(move |inner| inner.events_after(after, limit))
            .await
    }

    async fn commit(&self, write: Write) -> Result<Committed, StoreError> {
        let committed = self.blocking(move |inner| inner.commit(write)).await?;
        self.inner.newest.send_replace(committed.revision);
        Ok(committed)
    }

    fn watch(&self, from: Revision) -> BoxStream<'static, Result<Change, StoreError>> {
        let follower = Follower {
            store: self.clone(),
            newest: self.inner.newest.subscribe(),
            after: from,
            ready: VecDeque::new(),
            failed: false,
        };
        stream::unfold(follower, |mut follower| async move {
            let next = follower.next().await?;
            Some((next, follower))
        })
        .boxed()
    }
}

/// One `watch` stream's position.
struct Follower {
    store: SqliteStore,
    newest: watch::Receiver<Revision>,
    after: Revision,
    ready: VecDeque<Change>,
    failed: bool,
}

impl Follower {
    /// The next commit, waiting for one if need be; `None` once the store is gone or failed.
    async fn next(&mut self) -> Option<Result<Change, StoreError>> {
        loop {
            if self.failed {
                return None;
            }
            if let Some(change) = self.ready.pop_front() {
                self.after = change.revision;
                return Some(Ok(change));
            }
            // Seen before reading, so a commit landing meanwhile wakes the wait below.
            self.newest.borrow_and_update();
            let after = self.after;
            match self
                .store
                .blocking(move |inner| inner.changes_after(after))
                .await
            {
                Ok(changes) if !changes.is_empty() => self.ready.extend(changes),
                Ok(_) => {
                    if self.newest.changed().await.is_err() {
                        return None;
                    }
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

fn newest_revision(connection: &Connection) -> rusqlite::Result<Revision> {
    connection.query_row(
        "SELECT COALESCE(MAX(revision), 0) FROM changes",
        [],
        |row| row.get(0),
    )
}

fn key_text(key: &Key) -> String {
    match key {
        Key::RouterState => "router_state".into(),
        Key::Environment(color) => format!("environment/{color}"),
        Key::Release(id) => format!("release/{id}"),
        Key::Step(id) => format!("step/{id}"),
        Key::Event(id) => format!("event/{id}"),
    }
}

fn parse_key(text: &str) -> Option<Key> {
    let (kind, rest) = text.split_once('/').unwrap_or((text, ""));
    Some(match kind {
        "router_state" => Key::RouterState,
        "environment" => Key::Environment(match rest {
            "blue" => Color::Blue,
            "green" => Color::Green,
            _ => return None,
        }),
        "release" => Key::Release(rest.parse().ok()?),
        "step" => Key::Step(rest.parse().ok()?),
        "event" => Key::Event(rest.parse().ok()?),
        _ => return None,
    })
}

impl Inner {
    fn sqlite(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, source: serde_json::Error) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            source,
        }
    }

    fn router_state(&self) -> Result<Versioned<Option<RouterState>>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        let row: Option<(String, Revision)> = connection
            .query_row(
                "SELECT state, revision FROM router_state WHERE id = 1",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(|e| self.sqlite(e))?;
        Ok(match row {
            Some((text, revision)) => Versioned {
                value: Some(serde_json::from_str(&text).map_err(|e| self.corrupt(e))?),
                revision,
            },
            None => Versioned {
                value: None,
                revision: 0,
            },
        })
    }

    fn environments(&self) -> Result<[Versioned<EnvironmentRecord>; 2], StoreError> {
        let connection = self.connection.lock().expect("lock");
        let mut found = Color::ALL.map(|color| Versioned {
            value: EnvironmentRecord::stopped(color),
            revision: 0,
        });
        let mut statement = connection
            .prepare("SELECT record, revision FROM environments")
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get(1)?)))
            .map_err(|e| self.sqlite(e))?;
        for row in rows {
            let (text, revision) = row.map_err(|e| self.sqlite(e))?;
            let record = EnvironmentRecord::from_json(&text).map_err(|e| self.corrupt(e))?;
            let index = record.color.index();
            found[index] = Versioned {
                value: record,
                revision,
            };
        }
        Ok(found)
    }

    fn releases(&self, limit: usize) -> Result<Vec<Versioned<StoredRelease>>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        let mut statement = connection
            .prepare(
                "SELECT id, version, color, state, started_ms, ended_ms, record, revision
                 FROM releases ORDER BY id DESC LIMIT ?1",
            )
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map(params![limit as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, Option<i64>>(5)?,
                    row.get::<_, String>(6)?,
                    row.get::<_, Revision>(7)?,
                ))
            })
            .map_err(|e| self.sqlite(e))?;
        let mut releases = Vec::new();
        for row in rows {
            let (id, version, color, state, started_ms, ended_ms, text, revision) =
                row.map_err(|e| self.sqlite(e))?;
            releases.push(Versioned {
                value: StoredRelease {
                    id,
                    version,
                    color: if color == "blue" {
                        Color::Blue
                    } else {
                        Color::Green
                    },
                    state,
                    started_ms,
                    ended_ms,
                    document: serde_json::from_str(&text).map_err(|e| self.corrupt(e))?,
                },
                revision,
            });
        }
        Ok(releases)
    }

    fn steps(&self, release: i64) -> Result<Vec<StepRecord>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        let mut statement = connection
            .prepare(
                "SELECT id, release_id, name, status, started_ms, ended_ms, detail, revision
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
                    revision: row.get(7)?,
                })
            })
            .map_err(|e| self.sqlite(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.sqlite(e))
    }

    fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let connection = self.connection.lock().expect("lock");
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

    fn changes_after(&self, after: Revision) -> Result<Vec<Change>, StoreError> {
        let connection = self.connection.lock().expect("lock");
        let oldest: Revision = connection
            .query_row(
                "SELECT COALESCE(MIN(revision), 1) FROM changes",
                [],
                |row| row.get(0),
            )
            .map_err(|e| self.sqlite(e))?;
        if after + 1 < oldest {
            return Err(StoreError::Compacted {
                asked: after,
                oldest,
            });
        }
        let mut statement = connection
            .prepare("SELECT revision, keys FROM changes WHERE revision > ?1 ORDER BY revision LIMIT 1000")
            .map_err(|e| self.sqlite(e))?;
        let rows = statement
            .query_map(params![after], |row| {
                Ok((row.get::<_, Revision>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(|e| self.sqlite(e))?;
        let mut changes = Vec::new();
        for row in rows {
            let (revision, keys) = row.map_err(|e| self.sqlite(e))?;
            let keys: Vec<String> = serde_json::from_str(&keys).map_err(|e| self.corrupt(e))?;
            changes.push(Change {
                revision,
                keys: keys.iter().filter_map(|k| parse_key(k)).collect(),
                router_state: None,
            });
        }
        Ok(changes)
    }

    /// One transaction that takes the write lock before reading any revision, so no other
    /// writer lands between the check and the write. A refused part rolls all of it back.
    fn commit(&self, write: Write) -> Result<Committed, StoreError> {
        let mut connection = self.connection.lock().expect("lock");
        let tx = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.sqlite(e))?;
        let mut commit = Commit {
            tx: &tx,
            path: &self.path,
            revision: 0,
            keys: Vec::new(),
            committed: Committed {
                revision: 0,
                release_id: None,
                step_id: None,
                event_id: None,
            },
        };
        commit.begin().map_err(|e| self.sqlite(e))?;
        if let Some((expected, state)) = &write.router_state {
            commit.router_state(*expected, state)?;
        }
        if let Some((expected, record)) = &write.environment {
            commit.environment(*expected, record)?;
        }
        if let Some((expected, release)) = &write.release {
            commit.release(*expected, release)?;
        }
        if let Some((release_id, step)) = &write.steps {
            commit.steps(*release_id, step)?;
        }
        if let Some(event) = &write.event {
            commit.event(event).map_err(|e| self.sqlite(e))?;
        }
        let committed = commit.finish().map_err(|e| self.sqlite(e))?;
        tx.commit().map_err(|e| self.sqlite(e))?;
        Ok(committed)
    }

    /// Versions before the SQLite store kept `router-state.json`; take its state over once.
    fn import_legacy(&self, dir: &Path) -> Result<(), StoreError> {
        let legacy = dir.join("router-state.json");
        if !legacy.exists() || self.router_state()?.value.is_some() {
            return Ok(());
        }
        let fail = |reason: String| StoreError::Legacy {
            path: legacy.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&legacy).map_err(|e| fail(e.to_string()))?;
        let state: RouterState = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let message = format!("imported {} from {}", state.split, legacy.display());
        let write = Write {
            router_state: Some((0, state)),
            ..Write::event("import", &message, None)
        };
        let committed = self.commit(write)?;
        self.newest.send_replace(committed.revision);
        std::fs::rename(&legacy, dir.join("router-state.json.imported"))
            .map_err(|e| fail(e.to_string()))
    }
}

/// A commit in progress: its revision, the keys it changed, what it made.
struct Commit<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    path: &'a Path,
    revision: Revision,
    keys: Vec<Key>,
    committed: Committed,
}

/// A refused part of a write: what changed since it was read.
fn check(key: Key, expected: Revision, found: Option<Revision>) -> Result<(), StoreError> {
    let found = found.unwrap_or(0);
    if found == expected {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            key,
            expected,
            found,
        })
    }
}

impl Commit<'_> {
    fn sqlite(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.to_path_buf(),
            source,
        }
    }

    /// Takes the next revision (a row of `changes`, its keys filled in by `finish`).
    fn begin(&mut self) -> rusqlite::Result<()> {
        self.tx.execute(
            "INSERT INTO changes (at_ms, keys) VALUES (?1, '[]')",
            params![now_ms()],
        )?;
        self.revision = self.tx.last_insert_rowid();
        self.committed.revision = self.revision;
        Ok(())
    }

    fn revision_of(
        &self,
        sql: &str,
        key: impl rusqlite::Params,
    ) -> Result<Option<Revision>, StoreError> {
        self.tx
            .query_row(sql, key, |r| r.get(0))
            .optional()
            .map_err(|e| self.sqlite(e))
    }

    fn router_state(&mut self, expected: Revision, state: &RouterState) -> Result<(), StoreError> {
        let found = self.revision_of("SELECT revision FROM router_state WHERE id = 1", [])?;
        check(Key::RouterState, expected, found)?;
        self.tx
            .execute(
                "INSERT INTO router_state (id, state, revision) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, revision = excluded.revision",
                params![serde_json::to_string(state).expect("state serializes"), self.revision],
            )
            .map_err(|e| self.sqlite(e))?;
        self.keys.push(Key::RouterState);
        Ok(())
    }

    fn environment(
        &mut self,
        expected: Revision,
        record: &EnvironmentRecord,
    ) -> Result<(), StoreError> {
        let key = Key::Environment(record.color);
        let found = self.revision_of(
            "SELECT revision FROM environments WHERE color = ?1",
            params![record.color.as_str()],
        )?;
        check(key.clone(), expected, found)?;
        let status = serde_json::to_value(record.status).expect("status serializes");
        self.tx
            .execute(
                "INSERT INTO environments (color, version, status, record, updated_ms, revision)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (color) DO UPDATE SET version = excluded.version,
                   status = excluded.status, record = excluded.record,
                   updated_ms = excluded.updated_ms, revision = excluded.revision",
                params![
                    record.color.as_str(),
                    record.version,
                    status.as_str().unwrap_or("?"),
                    serde_json::to_string(record).expect("record serializes"),
                    now_ms(),
                    self.revision
                ],
            )
            .map_err(|e| self.sqlite(e))?;
        self.keys.push(key);
        Ok(())
    }

    /// Inserts a release with id 0 (it gets the next id), or saves an existing one.
    fn release(&mut self, expected: Revision, release: &StoredRelease) -> Result<(), StoreError> {
        let id = if release.id == 0 {
            check(Key::Release(0), expected, None)?;
            self.tx
                .execute(
                    "INSERT INTO releases (version, color, state, started_ms, record, revision)
                     VALUES (?1, ?2, ?3, ?4, '{}', ?5)",
                    params![
                        release.version,
                        release.color.as_str(),
                        release.state,
                        release.started_ms,
                        self.revision
                    ],
                )
                .map_err(|e| self.sqlite(e))?;
            self.tx.last_insert_rowid()
        } else {
            let found = self.revision_of(
                "SELECT revision FROM releases WHERE id = ?1",
                params![release.id],
            )?;
            check(Key::Release(release.id), expected, found)?;
            release.id
        };
        let mut document = release.document.clone();
        if let Some(object) = document.as_object_mut() {
            object.insert("id".into(), id.into());
        }
        self.tx
            .execute(
                "UPDATE releases SET state = ?2, ended_ms = ?3, record = ?4, revision = ?5
                 WHERE id = ?1",
                params![
                    id,
                    release.state,
                    release.ended_ms,
                    document.to_string(),
                    self.revision
                ],
            )
            .map_err(|e| self.sqlite(e))?;
        self.committed.release_id = Some(id);
        self.keys.push(Key::Release(id));
        Ok(())
    }

    /// A release id of 0 names the release of this very write.
    fn steps(&mut self, release_id: i64, step: &StepWrite) -> Result<(), StoreError> {
        let release_id = match (release_id, self.committed.release_id) {
            (0, Some(id)) => id,
            (id, _) => id,
        };
        let sqlite = |e| self.sqlite(e);
        match step {
            StepWrite::Start { name, detail } => {
                self.tx
                    .execute(
                        "INSERT INTO steps (release_id, name, status, started_ms, detail, revision)
                         VALUES (?1, ?2, 'running', ?3, ?4, ?5)",
                        params![release_id, name, now_ms(), detail, self.revision],
                    )
                    .map_err(sqlite)?;
                let id = self.tx.last_insert_rowid();
                self.committed.step_id = Some(id);
                self.keys.push(Key::Step(id));
            }
            StepWrite::End {
                id,
                revision: expected,
                status,
                detail,
            } => {
                let found = self.revision_of(
                    "SELECT revision FROM steps WHERE id = ?1 AND release_id = ?2",
                    params![id, release_id],
                )?;
                check(Key::Step(*id), *expected, found)?;
                self.tx
                    .execute(
                        "UPDATE steps SET status = ?2, ended_ms = ?3, detail = ?4, revision = ?5
                         WHERE id = ?1",
                        params![id, status, now_ms(), detail, self.revision],
                    )
                    .map_err(sqlite)?;
                self.committed.step_id = Some(*id);
                self.keys.push(Key::Step(*id));
            }
            StepWrite::InterruptRunning => {
                let mut running = self
                    .tx
                    .prepare("SELECT id FROM steps WHERE release_id = ?1 AND status = 'running'")
                    .map_err(sqlite)?;
                let ids: Vec<i64> = running
                    .query_map(params![release_id], |r| r.get(0))
                    .map_err(sqlite)?
                    .collect::<Result<_, _>>()
                    .map_err(sqlite)?;
                drop(running);
                self.tx
                    .execute(
                        "UPDATE steps SET status = 'interrupted', ended_ms = ?2, revision = ?3
                         WHERE release_id = ?1 AND status = 'running'",
                        params![release_id, now_ms(), self.revision],
                    )
                    .map_err(sqlite)?;
                self.keys.extend(ids.into_iter().map(Key::Step));
            }
        }
        Ok(())
    }

    /// An event with no release of its own belongs to the release of its write.
    fn event(&mut self, event: &NewEvent) -> rusqlite::Result<()> {
        self.tx.execute(
            "INSERT INTO events (at_ms, kind, message, release_id) VALUES (?1, ?2, ?3, ?4)",
            params![
                now_ms(),
                event.kind,
                event.message,
                event.release_id.or(self.committed.release_id)
            ],
        )?;
        let id = self.tx.last_insert_rowid();
        self.committed.event_id = Some(id);
        self.keys.push(Key::Event(id));
        Ok(())
    }

    /// Names the keys the revision changed, and forgets revisions `watch` no longer replays.
    fn finish(self) -> rusqlite::Result<Committed> {
        let keys: Vec<String> = self.keys.iter().map(key_text).collect();
        self.tx.execute(
            "UPDATE changes SET keys = ?2 WHERE revision = ?1",
            params![
                self.revision,
                serde_json::to_string(&keys).expect("keys serialize")
            ],
        )?;
        self.tx.execute(
            "DELETE FROM changes WHERE revision <= ?1",
            params![self.revision - KEPT_CHANGES],
        )?;
        Ok(self.committed)
    }
}

#[cfg(test)]
mod tests {
    use bluegreen_router::Split;

    use super::*;
    use crate::store::{EnvironmentStatus, ProviderState};

    crate::store_contract!(async {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        // The folder lives as long as the test's process; each test has its own.
        std::mem::forget(dir);
        store
    });

    #[tokio::test]
    async fn a_recorded_state_and_its_events_load_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let state = RouterState {
            split: Split::all(Color::Green),
            rollback_to: Some(Color::Blue),
            upstreams: crate::store::records::UpstreamOverrides {
                blue: None,
                green: Some(vec!["127.0.0.1:9005".parse().unwrap()]),
            },
        };
        let committed = store
            .commit(Write {
                router_state: Some((0, state.clone())),
                ..Write::event("switch", "switched: green is live", None)
            })
            .await
            .unwrap();
        drop(store);
        let store = SqliteStore::open(dir.path()).unwrap();
        let loaded = store.router_state().await.unwrap();
        assert_eq!(loaded.value, Some(state));
        assert_eq!(loaded.revision, committed.revision);
        assert_eq!(store.revision().await.unwrap(), committed.revision);
        let events = store.events_after(0, 10).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, "switch");
    }

    #[tokio::test]
    async fn the_json_state_of_older_versions_is_imported_once() {
        let dir = tempfile::tempdir().unwrap();
        // As the first release wrote it: schema 1, the split and the rollback color.
        std::fs::write(
            dir.path().join("router-state.json"),
            r#"{"schema":1,"split":{"green_percent":40},"rollback_to":"blue"}"#,
        )
        .unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let loaded = store.router_state().await.unwrap().value.unwrap();
        assert_eq!(loaded.split, Split::green_percent(40).unwrap());
        assert_eq!(loaded.rollback_to, Some(Color::Blue));
        assert_eq!(store.events_after(0, 10).await.unwrap()[0].kind, "import");
        assert!(!dir.path().join("router-state.json").exists());
        assert!(dir.path().join("router-state.json.imported").exists());
    }

    #[tokio::test]
    async fn a_schema_1_store_is_migrated_and_keeps_its_state_and_events() {
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
        let store = SqliteStore::open(dir.path()).unwrap();
        let loaded = store.router_state().await.unwrap();
        assert_eq!(loaded.value.unwrap().split, Split::all(Color::Green));
        assert_eq!(loaded.revision, 1, "what was there counts as revision 1");
        let events = store.events_after(0, 10).await.unwrap();
        assert_eq!(events[0].message, "switched: green is live");
        assert_eq!(events[0].release_id, None);
        // The new tables are there and usable.
        let environments = store.environments().await.unwrap();
        assert_eq!(environments[0].value.status, EnvironmentStatus::Stopped);
        let mut green = EnvironmentRecord::stopped(Color::Green);
        green.version = Some("2.0".into());
        green.status = EnvironmentStatus::Running;
        store
            .commit(Write {
                environment: Some((0, green.clone())),
                ..Write::event("deploy", "green runs 2.0", None)
            })
            .await
            .unwrap();
        assert_eq!(store.environments().await.unwrap()[1].value, green);
    }

    #[tokio::test]
    async fn a_schema_2_environment_keeps_its_instances_as_the_process_providers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let connection = Connection::open(dir.path().join("state.db")).unwrap();
            connection.execute_batch(MIGRATIONS[0]).unwrap();
            connection.execute_batch(MIGRATIONS[1]).unwrap();
            connection.pragma_update(None, "user_version", 2).unwrap();
            connection
                .execute(
                    "INSERT INTO environments (color, version, status, record, updated_ms) VALUES ('blue', '1.0', 'running', ?1, 1)",
                    params![r#"{"color":"blue","version":"1.0","status":"running","instances":[{"port":4001,"pid":77,"restarts":0}],"upstreams":["127.0.0.1:4001"],"extra_env":{},"deployed_at_ms":1,"scale_down_at_ms":null,"reason":null}"#],
                )
                .unwrap();
        }
        let store = SqliteStore::open(dir.path()).unwrap();
        let blue = &store.environments().await.unwrap()[0];
        assert_eq!(blue.revision, 1);
        assert!(
            matches!(&blue.value.provider, ProviderState::Process { instances } if instances[0].pid == Some(77))
        );
    }

    #[test]
    fn a_store_from_a_newer_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let connection = Connection::open(dir.path().join("state.db")).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
        drop(connection);
        assert!(matches!(
            SqliteStore::open(dir.path()),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[tokio::test]
    async fn a_watch_from_a_compacted_revision_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        store.commit(Write::event("a", "a", None)).await.unwrap();
        {
            let connection = store.inner.connection.lock().unwrap();
            connection
                .execute("DELETE FROM changes WHERE revision <= 1", [])
                .unwrap();
        }
        let mut watch = store.watch(0);
        assert!(matches!(
            watch.next().await,
            Some(Err(StoreError::Compacted { asked: 0, .. }))
        ));
        assert!(watch.next().await.is_none(), "the stream ends: read again");
    }
}
