//! Config reload: the whole file read and validated again, compared with the config in force, and put in force whole — or nothing changes.

use std::sync::Arc;

use bluegreen_router::Color;

use super::{Controller, EventKind};
use crate::config::{Config, ConfigError, ConfigIssue};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file does not parse or validate: every issue, each naming its key.
    #[error("{path}: the config is invalid ({} issue(s)); the running config stays in force", issues.len())]
    Invalid {
        path: String,
        issues: Vec<ConfigIssue>,
    },
    /// The file could not be read, or it changes what cannot change while the daemon runs.
    #[error("{0}")]
    Refused(String),
    /// Valid, but it changes what is built into the running router: a new process of the
    /// same binary (an upgrade) puts it in force. Nothing changed in this one.
    #[error("{} change only in a new process", .0.join(", "))]
    NeedsNewProcess(Vec<String>),
}

/// Keys a new process cannot change either: it serves on the sockets it is handed and the
/// state it finds.
const BOUND_TO_SOCKETS_AND_STATE: [&str; 6] = [
    "service",
    "state_dir",
    "store",
    "router.listen",
    "router.admin",
    "dashboard",
];

impl Controller {
    /// Reads the config file again. A valid config that changes only what can change in
    /// place (strategies, release, analysis, tests, hooks, webhook, the apps' specs) is put
    /// in force at once — a running release keeps the settings it started with where it
    /// copied them, and the next deploy or release uses the new ones. What is built into the
    /// router (its timeouts, TLS, health checks …) needs a new process: the caller upgrades
    /// to the same binary. What the sockets and the state are bound to is refused.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        let Some(path) = &self.config_path else {
            return Err(ReloadError::Refused(
                "this daemon was not started from a config file; nothing to read again".into(),
            ));
        };
        let new = Config::load(path).map_err(|e| match e {
            ConfigError::Invalid { path, issues } => ReloadError::Invalid {
                path: path.display().to_string(),
                issues,
            },
            other => ReloadError::Refused(format!("{other}; the running config stays in force")),
        })?;
        let old = self.config();
        let fixed = fixed_changes(&old, &new);
        let (bound, rebuilt): (Vec<String>, Vec<String>) = fixed
            .into_iter()
            .partition(|key| BOUND_TO_SOCKETS_AND_STATE.contains(&key.as_str()));
        if !bound.is_empty() {
            return Err(ReloadError::Refused(format!(
                "{} cannot change while the daemon runs (restart it with the new config to change them); nothing was changed",
                bound.join(", ")
            )));
        }
        if !rebuilt.is_empty() {
            return Err(ReloadError::NeedsNewProcess(rebuilt));
        }
        let changed = changes_in_place(&old, &new);
        if changed.is_empty() {
            return Ok(format!(
                "unchanged: {} is the config in force",
                path.display()
            ));
        }
        self.config.store(Arc::new(new));
        let message = format!(
            "config reloaded from {}: {} changed",
            path.display(),
            changed.join(", ")
        );
        self.event(EventKind::Reload, &message, None).await;
        Ok(message)
    }
}

/// The keys whose values differ, in the order they were compared.
#[derive(Default)]
struct Changed(Vec<String>);

impl Changed {
    fn compare<T: PartialEq + ?Sized>(&mut self, key: impl Into<String>, old: &T, new: &T) {
        if old != new {
            self.0.push(key.into());
        }
    }
}

/// What differs in the parts built into the running router, listeners and providers.
fn fixed_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Changed::default();
    changed.compare("service", &old.service, &new.service);
    changed.compare("state_dir", &old.state_dir, &new.state_dir);
    changed.compare("store", &old.store, &new.store);
    let (a, b) = (&old.router, &new.router);
    changed.compare("router.listen", &a.listen, &b.listen);
    changed.compare("router.admin", &a.admin, &b.admin);
    changed.compare("router.admin_token", &a.admin_token, &b.admin_token);
    changed.compare(
        "router.connect_timeout",
        &a.connect_timeout,
        &b.connect_timeout,
    );
    changed.compare(
        "router.upstream_timeout",
        &a.upstream_timeout,
        &b.upstream_timeout,
    );
    changed.compare("router.retries", &a.retries, &b.retries);
    changed.compare("router.drain_timeout", &a.drain_timeout, &b.drain_timeout);
    changed.compare(
        "router.header_read_timeout",
        &a.header_read_timeout,
        &b.header_read_timeout,
    );
    changed.compare("router.idle_timeout", &a.idle_timeout, &b.idle_timeout);
    changed.compare(
        "router.max_header_bytes",
        &a.max_header_bytes,
        &b.max_header_bytes,
    );
    changed.compare(
        "router.max_connections",
        &a.max_connections,
        &b.max_connections,
    );
    changed.compare("router.tls", &a.tls, &b.tls);
    changed.compare("router.sticky_cookie", &a.sticky_cookie, &b.sticky_cookie);
    changed.compare("router.preview", &a.preview, &b.preview);
    changed.compare("router.forwarded", &a.forwarded, &b.forwarded);
    changed.compare("router.driver", &a.driver, &b.driver);
    changed.compare("health", &old.health, &new.health);
    changed.compare("dashboard", &old.dashboard, &new.dashboard);
    for color in Color::ALL {
        changed.compare(
            format!("environments.{color}.upstreams"),
            &old.upstreams[color.index()],
            &new.upstreams[color.index()],
        );
        changed.compare(
            format!("environments.{color}.upstream_protocol"),
            &old.upstream_protocols[color.index()],
            &new.upstream_protocols[color.index()],
        );
        changed.compare(
            format!("app.provider ({color})"),
            &old.controller.environment(color).provider.kind(),
            &new.controller.environment(color).provider.kind(),
        );
    }
    // A router key the list above does not name yet still counts.
    let mut same_router = a.clone();
    same_router.initial_live = b.initial_live;
    if same_router != *b && !changed.0.iter().any(|k| k.starts_with("router.")) {
        changed.0.push("router".to_string());
    }
    changed.0
}

/// What differs in the parts read afresh at each use.
fn changes_in_place(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (&old.controller, &new.controller);
    let mut changed = Changed::default();
    for color in Color::ALL {
        changed.compare(
            format!("environments.{color}"),
            a.environment(color),
            b.environment(color),
        );
    }
    changed.compare("test", &a.test, &b.test);
    changed.compare("release.strategy", &a.strategy, &b.strategy);
    changed.compare("strategies", &a.strategies, &b.strategies);
    changed.compare("analysis", &a.analysis, &b.analysis);
    changed.compare(
        "release.monitor_window",
        &a.monitor_window,
        &b.monitor_window,
    );
    changed.compare(
        "release.scale_down_delay",
        &a.scale_down_delay,
        &b.scale_down_delay,
    );
    changed.compare("release.pipeline", &a.pipeline, &b.pipeline);
    changed.compare("hooks", &a.hooks, &b.hooks);
    changed.compare("deploy.batch", &old.deploy_batch, &new.deploy_batch);
    let webhook = |c: &crate::config::controller::ControllerConfig| {
        c.webhook
            .as_ref()
            .map(|w| (w.url.clone(), w.timeout, w.tls.is_some()))
    };
    changed.compare("webhook", &webhook(a), &webhook(b));
    changed.compare(
        "router.initial_live",
        &old.router.initial_live,
        &new.router.initial_live,
    );
    changed.0
}
