//! The fleet on etcd: each router's report under `<prefix>/routers/<id>`, bound to a lease that lapses when its router stops or loses the cluster, and the election of the leader under `<prefix>/leader`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions,
};
use tokio_util::sync::CancellationToken;

use super::{Fleet, HostEnvironment, HostOrder, Lagging, RouterReport};
use crate::store::Revision;
use crate::store::etcd::EtcdStore;

/// How long a report outlives its router's last keep-alive: a router gone (stopped, cut off)
/// leaves the list this long after its last word.
const LEASE_TTL_SECONDS: i64 = 5;
/// How many times a report is tried before the error is the caller's.
const PUBLISH_TRIES: usize = 3;

pub struct EtcdFleet {
    /// The store's connection (replaced when the store reconnects).
    store: EtcdStore,
    /// `<prefix>/routers/`.
    routers: String,
    /// `<prefix>/leader`: the election's name.
    election: String,
    /// `<prefix>/orders/<color>`: the leader's orders to every host.
    orders: String,
    /// `<prefix>/hosts/<id>/<color>`: each host's record of its own instances.
    hosts: String,
    id: String,
    lease: tokio::sync::Mutex<Option<Lease>>,
    /// The lease of this router's leadership (or candidacy), while it has one.
    leading: std::sync::Mutex<Option<i64>>,
    /// The connection campaigns wait on (no per-request timeout), made on first use.
    campaigner: tokio::sync::Mutex<Option<Client>>,
}

/// This router's lease and the stream that renews it.
struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
    renewed: tokio::time::Instant,
}

/// A report sooner than this after the last renewal goes without one (a report at each
/// change applied costs one put, not two round trips).
const RENEW_EVERY: Duration = Duration::from_millis(900);

impl EtcdFleet {
    pub fn new(store: EtcdStore, id: &str) -> EtcdFleet {
        let prefix = store.root().to_string();
        EtcdFleet {
            store,
            routers: format!("{prefix}/routers/"),
            election: format!("{prefix}/leader"),
            orders: format!("{prefix}/orders/"),
            hosts: format!("{prefix}/hosts/"),
            id: id.to_string(),
            lease: tokio::sync::Mutex::new(None),
            leading: std::sync::Mutex::new(None),
            campaigner: tokio::sync::Mutex::new(None),
        }
    }

    /// The lease this router's report is bound to, renewed now (a new one when it lapsed).
    async fn renewed_lease(&self) -> Result<i64, etcd_client::Error> {
        let mut held = self.lease.lock().await;
        if let Some(lease) = held.as_mut() {
            if lease.renewed.elapsed() < RENEW_EVERY {
                return Ok(lease.id);
            }
            lease.renewed = tokio::time::Instant::now();
            lease.keeper.keep_alive().await?;
            match lease.answers.message().await? {
                Some(answer) if answer.ttl() > 0 => return Ok(lease.id),
                // Lapsed (this router was cut off longer than the TTL): take a new one.
                _ => *held = None,
            }
        }
        let mut client = self.store.client();
        let granted = client.lease_grant(LEASE_TTL_SECONDS, None).await?;
        let (keeper, answers) = client.lease_keep_alive(granted.id()).await?;
        *held = Some(Lease {
            id: granted.id(),
            keeper,
            answers,
            renewed: tokio::time::Instant::now(),
        });
        Ok(granted.id())
    }

    async fn put_report(&self, value: &str) -> Result<(), etcd_client::Error> {
        let lease = self.renewed_lease().await?;
        let mut client = self.store.client();
        client
            .put(
                format!("{}{}", self.routers, self.id),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(())
    }

    fn parse(&self, value: &[u8]) -> Option<RouterReport> {
        serde_json::from_slice(value).ok()
    }
}

/// Renews `lease` on `stream` (opened first when there is none). `Ok(false)`: etcd says the
/// lease is gone.
async fn renew(
    client: &Client,
    lease: i64,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<bool, etcd_client::Error> {
    if stream.is_none() {
        *stream = Some(client.clone().lease_keep_alive(lease).await?);
    }
    let (keeper, answers) = stream.as_mut().expect("opened above");
    keeper.keep_alive().await?;
    match answers.message().await? {
        Some(answer) => Ok(answer.ttl() > 0),
        None => Err(etcd_client::Error::LeaseKeepAliveError(
            "the keep-alive stream ended".into(),
        )),
    }
}

#[async_trait]
impl Fleet for EtcdFleet {
    /// Tried a few times: with a member lost, a request may reach it before the client
    /// learns to avoid it.
    async fn publish(&self, report: &RouterReport) -> Result<(), String> {
        let value = serde_json::to_string(report).expect("a report serializes");
        let mut last = None;
        for _ in 0..PUBLISH_TRIES {
            match self.put_report(&value).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // The lease's stream may have broken with its connection: a new one.
                    *self.lease.lock().await = None;
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(format!(
            "cannot report router {}: {}",
            self.id,
            last.expect("tried at least once")
        ))
    }

    /// Tried again like the store's reads: a request may reach a lost member first.
    async fn routers(&self) -> Result<Vec<RouterReport>, String> {
        let found = self
            .store
            .get(self.routers.clone(), GetOptions::new().with_prefix())
            .await
            .map_err(|e| format!("cannot read the routers' reports: {e}"))?;
        Ok(found
            .iter()
            .filter_map(|kv| self.parse(kv.value()))
            .collect())
    }

    /// Campaigns under a lease of its own, kept alive every second; the token is cancelled
    /// when a keep-alive fails or finds the lease gone.
    async fn lead(&self) -> Result<CancellationToken, String> {
        let failed = |e: etcd_client::Error| format!("router {} cannot campaign: {e}", self.id);
        let mut client = self.store.client();
        let lease = client
            .lease_grant(LEASE_TTL_SECONDS, None)
            .await
            .map_err(failed)?
            .id();
        *self.leading.lock().expect("lock") = Some(lease);
        let lost = CancellationToken::new();
        // Kept alive while campaigning too: a candidate's key lives as long as its lease. A
        // failed renewal (a member lost, a wedged connection) is tried again on a new stream
        // of the store's current connection; the leadership is lost only when etcd says the
        // lease is gone, or nothing renewed it for its TTL.
        tokio::spawn({
            let (lost, store) = (lost.clone(), self.store.clone());
            async move {
                let ttl = Duration::from_secs(LEASE_TTL_SECONDS as u64);
                let mut renewed = tokio::time::Instant::now();
                let mut stream = None;
                while !lost.is_cancelled() && renewed.elapsed() < ttl {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    match renew(&store.client(), lease, &mut stream).await {
                        Ok(true) => renewed = tokio::time::Instant::now(),
                        Ok(false) => break,
                        Err(_) => stream = None,
                    }
                }
                lost.cancel();
            }
        });
        // A campaign waits until elected: on a connection without the per-request timeout.
        let campaigner = self.campaigner.lock().await.clone();
        let mut campaigner = match campaigner {
            Some(client) => client,
            None => match self.store.untimed_client().await {
                Ok(client) => {
                    *self.campaigner.lock().await = Some(client.clone());
                    client
                }
                Err(e) => {
                    lost.cancel();
                    return Err(format!("router {} cannot campaign: {e}", self.id));
                }
            },
        };
        let elected = tokio::select! {
            elected = campaigner.campaign(self.election.clone(), self.id.clone(), lease) => elected,
            _ = lost.cancelled() => {
                *self.campaigner.lock().await = None;
                return Err(format!("router {} lost its lease while campaigning", self.id));
            }
        };
        if let Err(e) = elected {
            lost.cancel();
            *self.campaigner.lock().await = None;
            return Err(failed(e));
        }
        Ok(lost)
    }

    async fn reconnect(&self) -> Result<(), String> {
        *self.lease.lock().await = None;
        *self.campaigner.lock().await = None;
        self.store.reconnect().await.map_err(|e| e.to_string())
    }

    async fn resign(&self) {
        let lease = self.leading.lock().expect("lock").take();
        if let Some(lease) = lease {
            let mut client = self.store.client();
            let _ = client.lease_revoke(lease).await;
        }
    }

    async fn order(&self, order: &HostOrder) -> Result<(), String> {
        let value = serde_json::to_string(order).expect("an order serializes");
        let key = format!("{}{}", self.orders, order.color);
        self.store
            .put(key, value)
            .await
            .map_err(|e| format!("cannot record the order to the hosts: {e}"))
    }

    /// One read; when nothing newer than `after` is there, a watch of the orders until one
    /// changes or `patience` runs out, then the read again.
    async fn orders(
        &self,
        after: Revision,
        patience: Duration,
    ) -> Result<(Vec<HostOrder>, Revision), String> {
        let failed = |e: etcd_client::Error| format!("cannot read the orders to the hosts: {e}");
        let read = async || {
            let mut client = self.store.client();
            let found = client
                .get(self.orders.clone(), Some(GetOptions::new().with_prefix()))
                .await?;
            let newest = found.kvs().iter().map(|kv| kv.mod_revision()).max();
            let orders: Vec<HostOrder> = found
                .kvs()
                .iter()
                .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
                .collect();
            let at = found.header().map_or(0, |h| h.revision());
            Ok::<_, etcd_client::Error>((orders, newest.unwrap_or(0), at))
        };
        let (orders, newest, at) = read().await.map_err(failed)?;
        if newest > after {
            return Ok((orders, newest));
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(at + 1);
        let mut client = self.store.client();
        let mut changes = client
            .watch(self.orders.clone(), Some(options))
            .await
            .map_err(failed)?;
        // A change, the end of the watch or the time running out: read again either way.
        let _ = tokio::time::timeout(patience, changes.message()).await;
        let (orders, newest, _) = read().await.map_err(failed)?;
        Ok((orders, newest))
    }

    async fn save_host(&self, host: &HostEnvironment) -> Result<(), String> {
        let value = serde_json::to_string(host).expect("a host record serializes");
        let key = format!("{}{}/{}", self.hosts, host.host, host.record.color);
        self.store
            .put(key, value)
            .await
            .map_err(|e| format!("cannot record host {}'s instances: {e}", host.host))
    }

    async fn hosts(&self) -> Result<Vec<HostEnvironment>, String> {
        let found = self
            .store
            .get(self.hosts.clone(), GetOptions::new().with_prefix())
            .await
            .map_err(|e| format!("cannot read the hosts' records: {e}"))?;
        Ok(found
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect())
    }

    async fn leader(&self) -> Option<String> {
        let mut client = self.store.client();
        let answer = client.leader(self.election.clone()).await.ok()?;
        let kv = answer.kv()?;
        Some(String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Reads the reports, then follows them as they change, until every router that was
    /// live at the first read has applied `revision`. A member lost meanwhile only means
    /// reading again from another one.
    async fn wait_applied(
        &self,
        revision: Revision,
        timeout: Duration,
    ) -> Result<(), Vec<Lagging>> {
        let deadline = tokio::time::Instant::now() + timeout;
        // The routers live at the first read, and what each has applied (`None`: its report
        // went away).
        let mut pending: Option<BTreeMap<String, Option<Revision>>> = None;
        let mut last_error = String::new();
        loop {
            match self.follow_reports(revision, &mut pending, deadline).await {
                Ok(()) => return Ok(()),
                Err(Some(error)) if tokio::time::Instant::now() < deadline => {
                    last_error = error;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => {
                    return Err(match pending {
                        Some(pending) => pending
                            .into_iter()
                            .map(|(id, applied)| Lagging { id, applied })
                            .collect(),
                        None => vec![Lagging {
                            id: format!("(the routers' reports cannot be read: {last_error})"),
                            applied: None,
                        }],
                    });
                }
            }
        }
    }
}

impl EtcdFleet {
    /// One read and watch of the reports, updating `pending`; `Err(Some(why))` when etcd
    /// failed (read again), `Err(None)` at the deadline.
    async fn follow_reports(
        &self,
        revision: Revision,
        pending: &mut Option<BTreeMap<String, Option<Revision>>>,
        deadline: tokio::time::Instant,
    ) -> Result<(), Option<String>> {
        let mut client = self.store.client();
        let found = client
            .get(self.routers.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| Some(e.to_string()))?;
        let reports: Vec<RouterReport> = found
            .kvs()
            .iter()
            .filter_map(|kv| self.parse(kv.value()))
            .collect();
        // This router applied the change before asking (its own report may lag behind).
        let waiting = pending.get_or_insert_with(|| {
            reports
                .iter()
                .filter(|report| report.id != self.id)
                .map(|report| (report.id.clone(), Some(report.applied)))
                .collect()
        });
        for report in &reports {
            if let Some(applied) = waiting.get_mut(&report.id) {
                *applied = Some(report.applied);
            }
        }
        waiting.retain(|_, applied| applied.is_none_or(|applied| applied < revision));
        if waiting.is_empty() {
            return Ok(());
        }
        let from = found.header().map_or(0, |h| h.revision()) + 1;
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut changes = client
            .watch(self.routers.clone(), Some(options))
            .await
            .map_err(|e| Some(e.to_string()))?;
        loop {
            let answer = tokio::select! {
                answer = changes.message() => answer,
                _ = tokio::time::sleep_until(deadline) => return Err(None),
            };
            let answer = match answer {
                Ok(Some(answer)) => answer,
                Ok(None) => return Err(Some("the watch of the reports ended".into())),
                Err(e) => return Err(Some(e.to_string())),
            };
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                let id = String::from_utf8_lossy(&kv.key()[self.routers.len()..]).into_owned();
                let Some(applied) = waiting.get_mut(&id) else {
                    continue;
                };
                match event.event_type() {
                    // Gone (stopped, or cut off past its lease): it cannot confirm.
                    EventType::Delete => *applied = None,
                    EventType::Put => {
                        if let Some(report) = self.parse(kv.value()) {
                            *applied = Some(report.applied);
                        }
                    }
                }
            }
            waiting.retain(|_, applied| applied.is_none_or(|applied| applied < revision));
            if waiting.is_empty() {
                return Ok(());
            }
        }
    }
}
