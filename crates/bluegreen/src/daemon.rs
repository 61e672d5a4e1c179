//! The composition root behind `bluegreen up`: opens the state store, builds the router and its data plane, and hands them to the controller.

use std::net::SocketAddr;
use std::sync::Arc;

use bluegreen_router::{
    Color, ListenerSettings, PreviewRule, ProxySettings, Router, Split, StickyRule,
};

use crate::config::{Config, Driver, StoreSettings};
use crate::controller::decide::describe;
use crate::controller::{Controller, Endpoints, EventKind, loopback_of};
use crate::dataplane::haproxy::HaproxyPlane;
use crate::dataplane::nginx::{NginxPlane, NginxSettings};
use crate::dataplane::{DataPlane, EmbeddedRouter, PreviewRoute};
use crate::fleet::Fleet;
use crate::fleet::etcd::EtcdFleet;
use crate::store::etcd::EtcdStore;
use crate::store::{RouterState, SqliteStore, StateStore, StoreError, Versioned, Write};

/// What `bluegreen up` runs: the controller, and the embedded router it serves traffic with.
pub struct Daemon {
    pub controller: Arc<Controller>,
    pub router: Router,
}

impl Daemon {
    /// Builds the router from the config and the saved state (which wins over `initial_live`).
    pub async fn build(
        config: Config,
        config_path: Option<std::path::PathBuf>,
        listen: SocketAddr,
        dashboard: Option<SocketAddr>,
    ) -> Result<Daemon, String> {
        let (store, fleet) = open_store(&config).await?;
        let state = recorded_or_first_state(store.as_ref(), &config).await?;
        let router =
            Router::new(router_config(&config, &state.value)).map_err(|e| e.to_string())?;
        let embedded = EmbeddedRouter::new(router.clone(), preview_route(&config, listen));
        let plane: Arc<dyn DataPlane> = match &config.router.driver {
            Driver::Embedded => Arc::new(embedded),
            Driver::Haproxy { socket, backend } => {
                HaproxyPlane::connect(embedded, socket, backend).await?
            }
            Driver::Nginx {
                upstream_file,
                check,
                reload,
                access_log,
                pid_file,
            } => {
                let settings = NginxSettings {
                    upstream_file: upstream_file.clone(),
                    check: check.clone(),
                    reload: reload.clone(),
                    access_log: access_log.clone(),
                    pid_file: pid_file.clone(),
                };
                NginxPlane::start(embedded, settings).await?
            }
        };
        let endpoints = Endpoints {
            listen,
            dashboard,
            config: config_path,
        };
        let controller = Arc::new(Controller::open(config, store, plane, endpoints, state).await?);
        if let Some(fleet) = fleet {
            controller.join_fleet(fleet);
        }
        Ok(Daemon { controller, router })
    }
}

/// The store the config names: SQLite under `state_dir`, or the fleet's etcd cluster (and
/// then the fleet this router reports to).
pub async fn open_store(
    config: &Config,
) -> Result<(Arc<dyn StateStore>, Option<Arc<dyn Fleet>>), String> {
    Ok(match &config.store {
        StoreSettings::Sqlite => (
            Arc::new(SqliteStore::open(&config.state_dir).map_err(|e| e.to_string())?),
            None,
        ),
        StoreSettings::Etcd(settings) => {
            let store = EtcdStore::connect(settings)
                .await
                .map_err(|e| format!("{e}; check store.etcd.endpoints and that etcd runs"))?;
            let fleet = EtcdFleet::new(store.clone(), &config.router.id);
            (Arc::new(store), Some(Arc::new(fleet)))
        }
    })
}

/// The state a previous run recorded, or the config's `initial_live`, recorded now.
async fn recorded_or_first_state(
    store: &dyn StateStore,
    config: &Config,
) -> Result<Versioned<RouterState>, String> {
    let recorded = store.router_state().await.map_err(|e| e.to_string())?;
    if let Some(state) = recorded.value {
        tracing::info!(split = %state.split, store = %store.describe(), "restored router state");
        return Ok(Versioned {
            value: state,
            revision: recorded.revision,
        });
    }
    let state = RouterState {
        split: Split::all(config.router.initial_live),
        rollback_to: None,
        upstreams: Default::default(),
    };
    let message = format!("first start: {}", describe(state.split));
    let committed = store
        .commit(Write {
            router_state: Some((0, state.clone())),
            ..Write::event(EventKind::Start, &message, None)
        })
        .await;
    match committed {
        Ok(committed) => Ok(Versioned {
            value: state,
            revision: committed.revision,
        }),
        // Another router of the fleet started first and recorded its state: that one holds.
        Err(StoreError::Conflict { .. }) => {
            let recorded = store.router_state().await.map_err(|e| e.to_string())?;
            match recorded.value {
                Some(value) => Ok(Versioned {
                    value,
                    revision: recorded.revision,
                }),
                None => Err("the router state was recorded and is gone again".into()),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

fn router_config(config: &Config, state: &RouterState) -> bluegreen_router::RouterConfig {
    let r = &config.router;
    bluegreen_router::RouterConfig {
        upstreams: Color::ALL.map(|color| match state.upstreams.get(color) {
            Some(addrs) => addrs.clone(),
            None => config.upstreams[color.index()].clone(),
        }),
        upstream_protocols: config.upstream_protocols.clone(),
        split: state.split,
        preview: r.preview.as_ref().map(|p| PreviewRule {
            header: p.header.clone(),
            cookie: p.cookie.clone(),
            secret: p.secret.clone(),
            secret_header: p.secret_header.clone(),
        }),
        sticky: r.sticky_cookie.as_ref().map(|cookie| StickyRule {
            cookie: cookie.clone(),
        }),
        proxy: ProxySettings {
            connect_timeout: r.connect_timeout,
            upstream_timeout: r.upstream_timeout,
            retries: r.retries,
            forwarded: r.forwarded.clone(),
            drain_timeout: r.drain_timeout,
            close_grace: std::time::Duration::from_secs(1),
        },
        listener: ListenerSettings {
            header_read_timeout: r.header_read_timeout,
            idle_timeout: r.idle_timeout,
            max_header_bytes: r.max_header_bytes,
            max_connections: r.max_connections,
            tls: r.tls.clone(),
            park_at_once_above: park_at_once_above(),
        },
        health: config.health.clone(),
    }
}

/// How our own requests (smoke tests, hooks) reach the embedded router.
fn preview_route(config: &Config, listen: SocketAddr) -> PreviewRoute {
    let preview = config.router.preview.as_ref();
    PreviewRoute {
        router: loopback_of(listen),
        tls: config.router.tls.is_some(),
        header: preview.map(|p| p.header.to_string()),
        secret: preview.and_then(|p| {
            p.secret
                .as_ref()
                .map(|secret| (p.secret_header.to_string(), secret.clone()))
        }),
    }
}

/// The state folder holds the admin socket and state: only its owner may enter.
pub fn create_private_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create state_dir {}: {e}", dir.display()))?;
    } else if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(dir = %dir.display(), "state_dir is open to other users; consider chmod 700");
    }
    Ok(())
}

/// `BLUEGREEN_PARK_AT_ONCE_ABOVE`: over this many open client connections, keep-alive
/// connections are parked as soon as they have answered (0: always). Unset: the router's
/// default; not a number: the default, with a warning.
fn park_at_once_above() -> usize {
    let default = bluegreen_router::server::PARK_AT_ONCE_ABOVE;
    let Ok(value) = std::env::var("BLUEGREEN_PARK_AT_ONCE_ABOVE") else {
        return default;
    };
    value.trim().parse().unwrap_or_else(|_| {
        tracing::warn!(
            %value,
            default,
            "BLUEGREEN_PARK_AT_ONCE_ABOVE is not a number of connections; the default applies"
        );
        default
    })
}
