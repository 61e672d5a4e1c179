//! The fleet's state store: the same records in etcd, each commit one etcd transaction, watched from a revision.
//!
//! Layout under the configured prefix `P` (one per service):
//!
//! ```text
//! P/state/router                      the split and upstream overrides (RouterState)
//! P/state/environment/{blue,green}    each color's record
//! P/state/release/<id>                a release (ids zero-padded, so keys sort by id)
//! P/state/step/<release>/<id>         its steps
//! P/state/event/<id>                  the audit log
//! P/sequence/{release,step,event}     the last id handed out
//! P/commit                            the token of the last commit (see `commit`)
//! P/routers/<id>                      each router's report, leased (crate::fleet::etcd)
//! ```
//!
//! A record's revision is its key's `mod_revision`, and a commit's revision is the etcd
//! revision its transaction made, so compare-and-set is etcd's own `Compare` on
//! `mod_revision`, and `watch` is an etcd watch of `P/state/` from a revision. New ids come
//! from the sequence keys, compared in the same transaction: two writers never get one id.
//!
//! etcd compacts its history (by hand or with `--auto-compaction-retention`); a watch from a
//! compacted revision is resynced from the records themselves, which a bluegreen store never
//! deletes: each one that last changed since, at the revision it changed.

use std::collections::{BTreeMap, VecDeque};

use async_trait::async_trait;
use bluegreen_router::Color;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures_util::stream::{self, BoxStream, StreamExt};
use serde::{Deserialize, Serialize};

use super::{
    Change, Committed, EnvironmentRecord, Event, Key, NewEvent, Revision, RouterState, StateStore,
    StepRecord, StepWrite, StoreError, StoredRelease, Versioned, Write, now_ms,
};
use crate::config::EtcdSettings;

/// How often a commit is planned again when only bluegreen's own bookkeeping moved under it
/// (an id handed to another writer, a step closed meanwhile), before giving up.
const REPLANS: usize = 100;

/// The etcd client and the prefix this service's records live under.
#[derive(Clone)]
pub struct EtcdStore {
    /// Shared by every clone, and replaced whole by `reconnect`.
    client: std::sync::Arc<std::sync::RwLock<Client>>,
    settings: EtcdSettings,
    root: String,
    endpoints: String,
    /// How long a request is tried again while the cluster is unavailable (a member lost, a
    /// leader being elected) before the error is the caller's.
    patience: std::time::Duration,
}

/// The pause between tries of a request the cluster could not answer.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A release as stored (its id is in the key).
#[derive(Serialize, Deserialize)]
struct ReleaseValue {
    version: Option<String>,
    color: Color,
    state: String,
    started_ms: i64,
    ended_ms: Option<i64>,
    document: serde_json::Value,
}

impl EtcdStore {
    /// Connects to the cluster (any one reachable endpoint will do) and checks it answers.
    pub async fn connect(settings: &EtcdSettings) -> Result<EtcdStore, StoreError> {
        let endpoints = settings.endpoints.join(",");
        let client = connect_client(settings)
            .await
            .map_err(|source| StoreError::Etcd {
                endpoints: endpoints.clone(),
                source,
            })?;
        Ok(EtcdStore {
            client: std::sync::Arc::new(std::sync::RwLock::new(client)),
            settings: settings.clone(),
            root: settings.prefix.clone(),
            endpoints,
            patience: settings.timeout,
        })
    }

    /// A new connection to the cluster in place of the current one, for every clone: after a
    /// network partition a connection can stay wedged (requests time out, a watch waits
    /// forever) though the cluster is reachable again.
    pub async fn reconnect(&self) -> Result<(), StoreError> {
        let client = connect_client(&self.settings)
            .await
            .map_err(|e| self.failed(e))?;
        *self.client.write().expect("lock") = client;
        Ok(())
    }

    /// A connection of its own whose requests may wait as long as they need (a campaign
    /// returns only once elected).
    pub async fn untimed_client(&self) -> Result<Client, StoreError> {
        connect_with(&self.settings, None)
            .await
            .map_err(|e| self.failed(e))
    }

    /// The client, for the fleet's other uses of the cluster (router reports, the election).
    pub fn client(&self) -> Client {
        self.client.read().expect("lock").clone()
    }

    /// The prefix this service's keys live under.
    pub fn root(&self) -> &str {
        &self.root
    }

    fn failed(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &str, reason: impl std::fmt::Display) -> StoreError {
        StoreError::Other(format!(
            "etcd key {key} holds a record that does not parse ({reason}); delete it or restore it from a backup"
        ))
    }

    fn state_prefix(&self) -> String {
        format!("{}/state/", self.root)
    }

    fn key_of(&self, key: &Key) -> String {
        let rest = match key {
            Key::RouterState => "router".to_string(),
            Key::Environment(color) => format!("environment/{color}"),
            Key::Release(id) => format!("release/{id:016}"),
            Key::Step(_) => unreachable!("a step's key needs its release: step_key"),
            Key::Event(id) => format!("event/{id:016}"),
        };
        format!("{}{rest}", self.state_prefix())
    }

    fn step_prefix(&self, release: i64) -> String {
        format!("{}step/{release:016}/", self.state_prefix())
    }

    fn step_key(&self, release: i64, id: i64) -> String {
        format!("{}{id:016}", self.step_prefix(release))
    }

    fn sequence_key(&self, name: &str) -> String {
        format!("{}/sequence/{name}", self.root)
    }

    /// The record a key under `P/state/` names.
    fn parse_key(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.state_prefix())?;
        let (kind, rest) = rest.split_once('/').unwrap_or((rest, ""));
        Some(match kind {
            "router" => Key::RouterState,
            "environment" => Key::Environment(rest.parse().ok()?),
            "release" => Key::Release(rest.parse().ok()?),
            "step" => Key::Step(rest.split_once('/')?.1.parse().ok()?),
            "event" => Key::Event(rest.parse().ok()?),
            _ => return None,
        })
    }

    /// A read, tried again while the cluster cannot answer (reads change nothing).
    async fn range(&self, key: String, options: GetOptions) -> Result<Vec<KeyValue>, StoreError> {
        let mut response = retrying(self.patience, || {
            let mut client = self.client();
            let (key, options) = (key.clone(), options.clone());
            async move { client.get(key, Some(options)).await }
        })
        .await
        .map_err(|e| self.failed(e))?;
        Ok(response.take_kvs())
    }

    /// A read through the store's current connection, tried again like the store's own.
    pub(crate) async fn get(
        &self,
        key: String,
        options: GetOptions,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.range(key, options).await
    }

    /// A put outside the state's transactions (the fleet's orders and host records, each
    /// idempotent), tried again like the store's reads.
    pub(crate) async fn put(&self, key: String, value: String) -> Result<(), StoreError> {
        retrying(self.patience, || {
            let mut client = self.client();
            let (key, value) = (key.clone(), value.clone());
            async move { client.put(key, value, None).await }
        })
        .await
        .map(|_| ())
        .map_err(|e| self.failed(e))
    }

    fn parse<T: serde::de::DeserializeOwned>(&self, kv: &KeyValue) -> Result<T, StoreError> {
        serde_json::from_slice(kv.value())
            .map_err(|e| self.corrupt(&String::from_utf8_lossy(kv.key()), e))
    }

    fn release_of(&self, kv: &KeyValue) -> Result<Versioned<StoredRelease>, StoreError> {
        let Some(Key::Release(id)) = self.parse_key(kv.key()) else {
            return Err(self.corrupt(&String::from_utf8_lossy(kv.key()), "not a release key"));
        };
        let value: ReleaseValue = self.parse(kv)?;
        Ok(Versioned {
            value: StoredRelease {
                id,
                version: value.version,
                color: value.color,
                state: value.state,
                started_ms: value.started_ms,
                ended_ms: value.ended_ms,
                document: value.document,
            },
            revision: kv.mod_revision(),
        })
    }

    fn step_of(&self, kv: &KeyValue) -> Result<StepRecord, StoreError> {
        let mut step: StepRecord = self.parse(kv)?;
        step.revision = kv.mod_revision();
        Ok(step)
    }

    /// The records under this prefix that last changed after `after` and before `before`, as
    /// one change per revision, oldest first.
    async fn changed_between(
        &self,
        after: Revision,
        before: Revision,
    ) -> Result<Vec<Change>, StoreError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_min_mod_revision(after + 1)
            .with_max_mod_revision(before - 1)
            .with_keys_only();
        let mut changes: BTreeMap<Revision, Vec<Key>> = BTreeMap::new();
        for kv in self.range(self.state_prefix(), options).await? {
            if let Some(key) = self.parse_key(kv.key()) {
                changes.entry(kv.mod_revision()).or_default().push(key);
            }
        }
        Ok(changes
            .into_iter()
            .map(|(revision, keys)| Change {
                revision,
                keys,
                router_state: None,
            })
            .collect())
    }

    async fn read_router_state(
        &self,
        options: GetOptions,
    ) -> Result<Versioned<Option<RouterState>>, StoreError> {
        let found = self.range(self.key_of(&Key::RouterState), options).await?;
        Ok(match found.first() {
            Some(kv) => Versioned {
                value: Some(self.parse(kv)?),
                revision: kv.mod_revision(),
            },
            None => Versioned {
                value: None,
                revision: 0,
            },
        })
    }

    /// The last id of each sequence and the revision it was read at.
    async fn sequences(&self) -> Result<BTreeMap<String, (i64, Revision)>, StoreError> {
        let prefix = self.sequence_key("");
        let mut found = BTreeMap::new();
        for kv in self
            .range(prefix.clone(), GetOptions::new().with_prefix())
            .await?
        {
            let name = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
            let last: i64 = self.parse(&kv)?;
            found.insert(name, (last, kv.mod_revision()));
        }
        Ok(found)
    }

    /// The transaction for `write` as the store is now: the caller's revisions compared, the
    /// ids taken, and the gets that tell, when it fails, whose revision was stale.
    async fn plan(&self, write: &Write) -> Result<Plan, StoreError> {
        let mut plan = Plan::default();
        let mut sequences = self.sequences().await?;
        let mut next_id = |plan: &mut Plan, name: &str| {
            let (last, revision) = sequences.get(name).copied().unwrap_or((0, 0));
            let key = self.sequence_key(name);
            plan.compares.push(Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                revision,
            ));
            plan.puts
                .push(TxnOp::put(key, (last + 1).to_string(), None));
            sequences.insert(name.to_string(), (last + 1, revision));
            last + 1
        };
        if let Some((expected, state)) = &write.router_state {
            let key = self.key_of(&Key::RouterState);
            plan.read_at(Key::RouterState, &key, *expected);
            plan.put(key, state, Key::RouterState);
        }
        if let Some((expected, record)) = &write.environment {
            let name = Key::Environment(record.color);
            let key = self.key_of(&name);
            plan.read_at(name.clone(), &key, *expected);
            plan.put(key, record, name);
        }
        if let Some((expected, release)) = &write.release {
            let id = if release.id == 0 {
                if *expected != 0 {
                    return Err(StoreError::Conflict {
                        key: Key::Release(0),
                        expected: *expected,
                        found: 0,
                    });
                }
                next_id(&mut plan, "release")
            } else {
                let key = self.key_of(&Key::Release(release.id));
                plan.read_at(Key::Release(release.id), &key, *expected);
                plan.exists(&key);
                release.id
            };
            let mut document = release.document.clone();
            if let Some(object) = document.as_object_mut() {
                object.insert("id".into(), id.into());
            }
            let value = ReleaseValue {
                version: release.version.clone(),
                color: release.color,
                state: release.state.clone(),
                started_ms: release.started_ms,
                ended_ms: release.ended_ms,
                document,
            };
            plan.put(self.key_of(&Key::Release(id)), &value, Key::Release(id));
            plan.committed.release_id = Some(id);
        }
        if let Some((release_id, step)) = &write.steps {
            // A release id of 0 names the release of this very write.
            let release_id = match (*release_id, plan.committed.release_id) {
                (0, Some(id)) => id,
                (id, _) => id,
            };
            match step {
                StepWrite::Start { name, detail } => {
                    let id = next_id(&mut plan, "step");
                    let record = StepRecord {
                        id,
                        release_id,
                        name: name.clone(),
                        status: "running".into(),
                        started_ms: now_ms(),
                        ended_ms: None,
                        detail: detail.clone(),
                        revision: 0,
                    };
                    plan.put(self.step_key(release_id, id), &record, Key::Step(id));
                    plan.committed.step_id = Some(id);
                }
                StepWrite::End {
                    id,
                    revision,
                    status,
                    detail,
                } => {
                    let key = self.step_key(release_id, *id);
                    plan.read_at(Key::Step(*id), &key, *revision);
                    plan.exists(&key);
                    let found = self.range(key.clone(), GetOptions::new()).await?;
                    // Missing: the compare above refuses the write as a conflict.
                    if let Some(kv) = found.first() {
                        let mut step = self.step_of(kv)?;
                        step.status = status.clone();
                        step.ended_ms = Some(now_ms());
                        step.detail = detail.clone();
                        plan.puts.push(TxnOp::put(key, to_json(&step), None));
                    }
                    plan.committed.step_id = Some(*id);
                    plan.keys.push(Key::Step(*id));
                }
                StepWrite::InterruptRunning => {
                    let prefix = self.step_prefix(release_id);
                    for kv in self.range(prefix, GetOptions::new().with_prefix()).await? {
                        let mut step = self.step_of(&kv)?;
                        if step.status != "running" {
                            continue;
                        }
                        let key = kv.key().to_vec();
                        plan.compares.push(Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        ));
                        step.status = "interrupted".into();
                        step.ended_ms = Some(now_ms());
                        plan.put(key, &step, Key::Step(step.id));
                    }
                }
            }
        }
        if let Some(event) = &write.event {
            let id = next_id(&mut plan, "event");
            let NewEvent {
                kind,
                message,
                release_id,
            } = event;
            let record = Event {
                id,
                at_ms: now_ms(),
                kind: kind.clone(),
                message: message.clone(),
                release_id: release_id.or(plan.committed.release_id),
            };
            plan.put(self.key_of(&Key::Event(id)), &record, Key::Event(id));
            plan.committed.event_id = Some(id);
        }
        Ok(plan)
    }
}

/// One commit as an etcd transaction.
#[derive(Default)]
struct Plan {
    compares: Vec<Compare>,
    puts: Vec<TxnOp>,
    /// The records the caller named a revision for, in the order of `checks`.
    expected: Vec<(Key, Revision)>,
    /// A get of each of them, run when the transaction fails.
    checks: Vec<TxnOp>,
    keys: Vec<Key>,
    committed: Committed,
}

impl Plan {
    /// The caller read `name` (etcd key `key`) at `revision`: the write lands only if it is
    /// still so (`0`: the key must not exist).
    fn read_at(&mut self, name: Key, key: &str, revision: Revision) {
        self.compares
            .push(Compare::mod_revision(key, CompareOp::Equal, revision));
        self.checks.push(TxnOp::get(key, None));
        self.expected.push((name, revision));
    }

    /// Writes `value` as `record`'s etcd `key`, and names the record among the commit's.
    fn put(&mut self, key: impl Into<Vec<u8>>, value: &impl Serialize, record: Key) {
        self.puts.push(TxnOp::put(key, to_json(value), None));
        self.keys.push(record);
    }

    /// The key must exist (an update, never a creation under an id nobody handed out).
    fn exists(&mut self, key: &str) {
        self.compares
            .push(Compare::version(key, CompareOp::Greater, 0));
    }

    /// After a failed transaction: the first record whose revision moved, from the checks'
    /// answers. `None` when all were as read (only bookkeeping moved: plan again).
    fn conflict(&self, answers: &[TxnOpResponse]) -> Option<StoreError> {
        for ((key, expected), answer) in self.expected.iter().zip(answers) {
            let TxnOpResponse::Get(found) = answer else {
                continue;
            };
            let found = found.kvs().first().map_or(0, KeyValue::mod_revision);
            if found != *expected || found == 0 && matches!(key, Key::Release(_) | Key::Step(_)) {
                return Some(StoreError::Conflict {
                    key: key.clone(),
                    expected: *expected,
                    found,
                });
            }
        }
        None
    }
}

/// A client of the cluster, checked with one read (`Client::connect` is lazy).
async fn connect_client(settings: &EtcdSettings) -> Result<Client, etcd_client::Error> {
    connect_with(settings, Some(settings.timeout)).await
}

/// The same, with each request bounded by `timeout` (none: for requests that wait by design,
/// an election campaign).
async fn connect_with(
    settings: &EtcdSettings,
    timeout: Option<std::time::Duration>,
) -> Result<Client, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(settings.timeout)
        .with_keep_alive(std::time::Duration::from_secs(5), settings.timeout);
    if let Some(timeout) = timeout {
        options = options.with_timeout(timeout);
    }
    if let Some(tls) = &settings.tls {
        let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
        if let Some((cert, key)) = &tls.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(config);
    }
    if let Some((user, password)) = &settings.user {
        options = options.with_user(user, password);
    }
    let client = Client::connect(&settings.endpoints, Some(options)).await?;
    // Tried again: a member still starting refuses connections while the others answer.
    let prefix = format!("{}/state/", settings.prefix);
    retrying(settings.timeout, || {
        let (mut client, prefix) = (client.clone(), prefix.clone());
        async move {
            let options = GetOptions::new().with_prefix().with_count_only();
            client.get(prefix, Some(options)).await
        }
    })
    .await?;
    Ok(client)
}

/// `request` tried again every `RETRY_PAUSE` while etcd cannot answer it (a member lost, an
/// election, a member still starting), for `patience` at most; then its last error.
async fn retrying<T, F, Fut>(
    patience: std::time::Duration,
    mut request: F,
) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match request().await {
            Ok(answer) => return Ok(answer),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(RETRY_PAUSE).await,
        }
    }
}

/// A value no other commit writes: this process, the time, and a counter.
fn commit_token() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        now_ms(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("records serialize")
}

#[async_trait]
impl StateStore for EtcdStore {
    fn describe(&self) -> String {
        format!("etcd {} (prefix {})", self.endpoints, self.root)
    }

    /// The revision of the newest commit under this prefix (other writers to the cluster
    /// move etcd's own revision; they are not this store's commits).
    async fn revision(&self) -> Result<Revision, StoreError> {
        let newest = self
            .range(
                self.state_prefix(),
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Mod, SortOrder::Descend)
                    .with_limit(1)
                    .with_keys_only(),
            )
            .await?;
        Ok(newest.first().map_or(0, KeyValue::mod_revision))
    }

    async fn router_state(&self) -> Result<Versioned<Option<RouterState>>, StoreError> {
        self.read_router_state(GetOptions::new()).await
    }

    /// Read from the member the client talks to, without a round of consensus (each of a
    /// fleet's routers does this at every switch); read again through the leader when that
    /// member has not applied `revision` yet.
    async fn router_state_since(
        &self,
        revision: Revision,
    ) -> Result<Versioned<Option<RouterState>>, StoreError> {
        let near = self
            .read_router_state(GetOptions::new().with_serializable())
            .await?;
        if near.revision >= revision {
            return Ok(near);
        }
        self.router_state().await
    }

    async fn environments(&self) -> Result<[Versioned<EnvironmentRecord>; 2], StoreError> {
        let mut found = Color::ALL.map(|color| Versioned {
            value: EnvironmentRecord::stopped(color),
            revision: 0,
        });
        let prefix = format!("{}environment/", self.state_prefix());
        for kv in self.range(prefix, GetOptions::new().with_prefix()).await? {
            let text = String::from_utf8_lossy(kv.value());
            let record = EnvironmentRecord::from_json(&text)
                .map_err(|e| self.corrupt(&String::from_utf8_lossy(kv.key()), e))?;
            let index = record.color.index();
            found[index] = Versioned {
                value: record,
                revision: kv.mod_revision(),
            };
        }
        Ok(found)
    }

    async fn releases(&self, limit: usize) -> Result<Vec<Versioned<StoredRelease>>, StoreError> {
        let prefix = format!("{}release/", self.state_prefix());
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(limit as i64);
        self.range(prefix, options)
            .await?
            .iter()
            .map(|kv| self.release_of(kv))
            .collect()
    }

    async fn steps(&self, release: i64) -> Result<Vec<StepRecord>, StoreError> {
        let options = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        self.range(self.step_prefix(release), options)
            .await?
            .iter()
            .map(|kv| self.step_of(kv))
            .collect()
    }

    async fn events_after(&self, after: i64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let prefix = format!("{}event/", self.state_prefix());
        let found = if after == 0 {
            let options = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Key, SortOrder::Descend)
                .with_limit(limit as i64);
            let mut newest = self.range(prefix, options).await?;
            newest.reverse();
            newest
        } else {
            // From the key after `after` to the end of the event keys.
            let mut end = prefix.clone().into_bytes();
            *end.last_mut().expect("a non-empty prefix") += 1;
            let options = GetOptions::new()
                .with_range(end)
                .with_sort(SortTarget::Key, SortOrder::Ascend)
                .with_limit(limit as i64);
            self.range(self.key_of(&Key::Event(after + 1)), options)
                .await?
        };
        found.iter().map(|kv| self.parse(kv)).collect()
    }

    /// A commit the cluster could not confirm (a member lost, a leader changing) may still
    /// have landed: each carries a token written in the same transaction, read back before
    /// the commit is tried again, so it lands once and its writer learns so.
    async fn commit(&self, write: Write) -> Result<Committed, StoreError> {
        let mut client = self.client();
        let token = commit_token();
        let token_key = format!("{}/commit", self.root);
        let deadline = tokio::time::Instant::now() + self.patience;
        for _ in 0..REPLANS {
            let plan = self.plan(&write).await?;
            let mut puts = plan.puts.clone();
            puts.push(TxnOp::put(token_key.clone(), token.clone(), None));
            let txn = Txn::new()
                .when(plan.compares.clone())
                .and_then(puts)
                .or_else(plan.checks.clone());
            let response = match client.txn(txn).await {
                Ok(response) => response,
                Err(e) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(self.failed(e));
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                    let landed = self.range(token_key.clone(), GetOptions::new()).await?;
                    if let Some(kv) = landed.first().filter(|kv| kv.value() == token.as_bytes()) {
                        return Ok(Committed {
                            revision: kv.mod_revision(),
                            ..plan.committed
                        });
                    }
                    continue;
                }
            };
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                return Ok(Committed {
                    revision,
                    ..plan.committed
                });
            }
            if let Some(conflict) = plan.conflict(&response.op_responses()) {
                return Err(conflict);
            }
        }
        Err(StoreError::Other(format!(
            "etcd {}: the commit was planned {REPLANS} times and each time another writer's ids or steps moved first",
            self.endpoints
        )))
    }

    fn watch(&self, from: Revision) -> BoxStream<'static, Result<Change, StoreError>> {
        struct Following {
            store: EtcdStore,
            from: Revision,
            stream: Option<etcd_client::WatchStream>,
            ready: VecDeque<Change>,
            done: bool,
        }
        let following = Following {
            store: self.clone(),
            from,
            stream: None,
            ready: VecDeque::new(),
            done: false,
        };
        stream::unfold(following, |mut f| async move {
            loop {
                if let Some(change) = f.ready.pop_front() {
                    return Some((Ok(change), f));
                }
                if f.done {
                    return None;
                }
                if f.stream.is_none() {
                    let mut client = f.store.client();
                    let options = WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(f.from + 1);
                    match client.watch(f.store.state_prefix(), Some(options)).await {
                        Ok(stream) => f.stream = Some(stream),
                        Err(e) => {
                            f.done = true;
                            return Some((Err(f.store.failed(e)), f));
                        }
                    }
                }
                let stream = f.stream.as_mut().expect("opened above");
                let response = match stream.message().await {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        f.done = true;
                        let gone = StoreError::Other(format!(
                            "etcd {}: the watch ended",
                            f.store.endpoints
                        ));
                        return Some((Err(gone), f));
                    }
                    Err(e) => {
                        f.done = true;
                        return Some((Err(f.store.failed(e)), f));
                    }
                };
                if response.compact_revision() > 0 {
                    // etcd forgot its history before `oldest`. The records themselves are all
                    // still there (a bluegreen store never deletes one), so the commits the
                    // watch can no longer replay are read back from them: each record that
                    // last changed in between, at the revision it changed. A record changed
                    // then and again later comes with the later change.
                    let oldest = response.compact_revision();
                    match f.store.changed_between(f.from, oldest).await {
                        Ok(changes) => {
                            f.ready.extend(changes);
                            f.from = oldest - 1;
                            f.stream = None;
                            continue;
                        }
                        Err(e) => {
                            f.done = true;
                            return Some((Err(e), f));
                        }
                    }
                }
                if response.canceled() {
                    f.done = true;
                    let canceled = StoreError::Other(format!(
                        "etcd {}: the watch was canceled: {}",
                        f.store.endpoints,
                        response.cancel_reason()
                    ));
                    return Some((Err(canceled), f));
                }
                // Events come in revision order; one commit's keys share a revision.
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Some(key) = f.store.parse_key(kv.key()) else {
                        continue;
                    };
                    let revision = kv.mod_revision();
                    // The new router state comes with its event: no read back needed.
                    let router_state = match key {
                        Key::RouterState => serde_json::from_slice(kv.value()).ok(),
                        _ => None,
                    };
                    match f.ready.back_mut() {
                        Some(last) if last.revision == revision => {
                            last.keys.push(key);
                            last.router_state = last.router_state.take().or(router_state);
                        }
                        _ => f.ready.push_back(Change {
                            revision,
                            keys: vec![key],
                            router_state,
                        }),
                    }
                    f.from = revision;
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::controller::provider::supervisor::free_ports;

    /// One etcd member (Debian's etcd-server) for this test binary, on free loopback ports,
    /// its data in a temporary folder. A watchdog shell stops it, and removes the folder,
    /// once this test process is gone.
    fn etcd() -> &'static str {
        static ENDPOINT: OnceLock<String> = OnceLock::new();
        ENDPOINT.get_or_init(|| start_member(None))
    }

    /// Starts one etcd member on free loopback ports (https with `tls`: the certificate and
    /// key files it serves); returns its client URL. A watchdog shell stops it, and removes
    /// its data, once this test process is gone.
    fn start_member(tls: Option<(&std::path::Path, &std::path::Path)>) -> String {
        let ports = free_ports(2).expect("free ports");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (client, peer) = (
            format!("{scheme}://127.0.0.1:{}", ports[0]),
            format!("http://127.0.0.1:{}", ports[1]),
        );
        let certificates = tls
            .map(|(cert, key)| {
                format!(
                    "--cert-file {} --key-file {}",
                    cert.display(),
                    key.display()
                )
            })
            .unwrap_or_default();
        let dir = tempfile::tempdir().expect("a temporary folder").keep();
        let script = format!(
            "etcd --name unit --data-dir {dir} --listen-client-urls {client} \
             --advertise-client-urls {client} --listen-peer-urls {peer} \
             --initial-advertise-peer-urls {peer} --initial-cluster unit={peer} {certificates} \
             >{dir}.log 2>&1 & member=$!; \
             while kill -0 {parent} 2>/dev/null && kill -0 $member 2>/dev/null; do sleep 0.2; done; \
             kill $member 2>/dev/null; wait $member; rm -rf {dir} {dir}.log",
            dir = dir.display(),
            parent = std::process::id(),
        );
        let mut watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server; scripts/test installs it) starts");
        std::thread::spawn(move || watchdog.wait());
        client
    }

    async fn fresh_store() -> EtcdStore {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let settings = EtcdSettings {
            endpoints: vec![etcd().to_string()],
            prefix: format!(
                "/test/{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ),
            user: None,
            timeout: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(5),
            tls: None,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match EtcdStore::connect(&settings).await {
                Ok(store) => return store,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("etcd at {} did not answer: {e}", etcd())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    crate::store_contract!(fresh_store());

    /// etcd compacts its history (by hand, or every so often with auto-compaction): a watch
    /// from before that resyncs from the records instead of failing, and misses nothing.
    #[tokio::test]
    async fn a_watch_from_a_compacted_revision_reads_the_records_back() {
        let store = fresh_store().await;
        let mut committed = Vec::new();
        for i in 0..3 {
            let revision = store
                .commit(Write::event("weights", &format!("step {i}"), None))
                .await
                .unwrap()
                .revision;
            committed.push(revision);
        }
        let newest = store.revision().await.unwrap();
        let mut client = store.client();
        client
            .put("/test/unrelated", "moves etcd's revision", None)
            .await
            .unwrap();
        let compacted_at =
            client.get("/test/unrelated", None).await.unwrap().kvs()[0].mod_revision();
        client.compact(compacted_at, None).await.unwrap();

        let mut watch = store.watch(0);
        let mut replayed = Vec::new();
        while replayed.len() < 3 {
            let change = tokio::time::timeout(Duration::from_secs(5), watch.next())
                .await
                .expect("the compacted commits, read back")
                .unwrap()
                .unwrap();
            assert!(matches!(change.keys[..], [Key::Event(_)]), "{change:?}");
            replayed.push(change.revision);
        }
        assert_eq!(replayed, committed);
        assert_eq!(newest, committed[2]);
        // Then it follows as always.
        let next = store
            .commit(Write::event("weights", "after the compaction", None))
            .await
            .unwrap();
        let change = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("the new commit")
            .unwrap()
            .unwrap();
        assert_eq!(change.revision, next.revision);
    }

    #[tokio::test]
    async fn two_services_under_other_prefixes_do_not_see_each_other() {
        let (a, b) = (fresh_store().await, fresh_store().await);
        a.commit(Write::event("start", "a", None)).await.unwrap();
        assert!(b.events_after(0, 10).await.unwrap().is_empty());
        assert_eq!(b.revision().await.unwrap(), 0);
        let ids: Vec<i64> = a
            .events_after(0, 10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [1]);
    }

    /// https to a member: its CA trusted, commits land and read back; a CA that did not sign
    /// its certificate is refused at connect, before anything is written.
    #[tokio::test]
    async fn a_member_behind_tls_is_reached_with_its_ca_and_refused_with_another() {
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let (cert, key) = (dir.path().join("member.pem"), dir.path().join("member.key"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let endpoint = start_member(Some((&cert, &key)));
        let settings = |ca: String| EtcdSettings {
            endpoints: vec![endpoint.clone()],
            prefix: format!("/test/tls-{}", std::process::id()),
            user: None,
            timeout: Duration::from_secs(5),
            confirm_timeout: Duration::from_secs(5),
            tls: Some(crate::config::EtcdTls { ca, identity: None }),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let store = loop {
            match EtcdStore::connect(&settings(certified.cert.pem())).await {
                Ok(store) => break store,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let committed = store
            .commit(Write::event("start", "over tls", None))
            .await
            .unwrap();
        assert_eq!(store.revision().await.unwrap(), committed.revision);
        assert_eq!(
            store.events_after(0, 1).await.unwrap()[0].message,
            "over tls"
        );

        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let refused = EtcdStore::connect(&settings(other.cert.pem())).await;
        assert!(
            refused.is_err(),
            "a CA that did not sign the member is refused"
        );
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_a_clear_error() {
        let port = free_ports(1).unwrap()[0];
        let settings = EtcdSettings {
            endpoints: vec![format!("http://127.0.0.1:{port}")],
            prefix: "/test/unreachable".into(),
            user: None,
            timeout: Duration::from_millis(500),
            confirm_timeout: Duration::from_secs(5),
            tls: None,
        };
        let error = EtcdStore::connect(&settings).await.err().expect("refused");
        assert!(
            error.to_string().contains(&format!("127.0.0.1:{port}")),
            "{error}"
        );
    }
}
