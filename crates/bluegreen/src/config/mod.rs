//! The config file: raw YAML structs, then validation into a typed [`Config`] with key-path errors.

pub mod controller;
pub mod mirror;
pub mod store;
pub mod strategy;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bluegreen_router::{Color, ForwardedHeaders, HealthSettings, TlsFiles, UpstreamProtocol};
use http::HeaderName;
use serde::Deserialize;

use crate::duration::HumanDuration;
use controller::{
    ControllerConfig, RawAnalysis, RawApp, RawController, RawEnvironment, RawHooks, RawRelease,
    RawStrategy, RawTest, RawWebhook,
};
pub use store::{EtcdSettings, EtcdTls, StoreSettings};

/// One problem in the config, with the key path that holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigIssue {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {}:\n{}", path.display(), issues.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        issues: Vec<ConfigIssue>,
    },
}

// ---- raw: what the YAML says, with defaults ----

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    service: String,
    #[serde(default = "default_state_dir")]
    state_dir: String,
    #[serde(default)]
    router: RawRouter,
    #[serde(default)]
    app: Option<RawApp>,
    #[serde(default)]
    environments: BTreeMap<String, RawEnvironment>,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    test: RawTest,
    #[serde(default)]
    release: RawRelease,
    #[serde(default)]
    strategies: BTreeMap<String, RawStrategy>,
    #[serde(default)]
    analysis: RawAnalysis,
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    webhook: Option<RawWebhook>,
    #[serde(default)]
    dashboard: RawDashboard,
    #[serde(default)]
    store: Option<store::RawStore>,
    #[serde(default)]
    deploy: RawDeploy,
    #[serde(default)]
    mirror: Option<mirror::RawMirror>,
}

/// `router.driver` and the keys of every driver, as the YAML gives them.
struct DriverKeys {
    name: String,
    socket: Option<String>,
    backend: Option<String>,
    upstream_file: Option<String>,
    check: Option<String>,
    reload: Option<String>,
    access_log: Option<String>,
    pid_file: Option<String>,
}

/// How a fleet deploys to its hosts.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct RawDeploy {
    batch: Option<RawBatch>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum RawBatch {
    Hosts(i64),
    Text(String),
}

/// How many hosts of a fleet deploy at once: the next batch starts when the previous one
/// runs healthy (and passed its tests). One machine is one batch of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batch {
    Hosts(usize),
    Percent(u8),
}

impl Batch {
    /// Hosts per batch out of `hosts` (at least one).
    pub fn size(self, hosts: usize) -> usize {
        match self {
            Batch::Hosts(n) => n,
            Batch::Percent(p) => (hosts * p as usize).div_ceil(100),
        }
        .clamp(1, hosts.max(1))
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawDashboard {
    enabled: bool,
    listen: String,
    token_file: Option<String>,
}

impl Default for RawDashboard {
    fn default() -> Self {
        RawDashboard {
            enabled: true,
            listen: "127.0.0.1:9900".into(),
            token_file: None,
        }
    }
}

fn default_state_dir() -> String {
    ".bluegreen".into()
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawRouter {
    id: Option<String>,
    listen: String,
    admin: String,
    admin_token_file: Option<String>,
    initial_live: String,
    drain_timeout: HumanDuration,
    connect_timeout: HumanDuration,
    upstream_timeout: HumanDuration,
    retries: u32,
    header_read_timeout: HumanDuration,
    idle_timeout: HumanDuration,
    max_header_bytes: u64,
    max_connections: u64,
    tls: Option<RawTls>,
    sticky: bool,
    sticky_cookie: String,
    preview: RawPreview,
    forwarded: RawForwarded,
    /// Which router switches the traffic: `embedded` (bluegreen's own) or `haproxy`.
    driver: String,
    /// The haproxy driver: HAProxy's runtime API socket and the backend holding the colors.
    socket: Option<String>,
    backend: Option<String>,
    /// The nginx driver: the servers file bluegreen writes (included in an `upstream`
    /// block), how nginx checks and reloads its config, and the access log it counts from.
    upstream_file: Option<String>,
    check: Option<String>,
    reload: Option<String>,
    access_log: Option<String>,
    pid_file: Option<String>,
}

impl Default for RawRouter {
    fn default() -> Self {
        RawRouter {
            id: None,
            listen: "127.0.0.1:8080".into(),
            admin: ".bluegreen/admin.sock".into(),
            admin_token_file: None,
            initial_live: "blue".into(),
            drain_timeout: HumanDuration::secs(30),
            connect_timeout: HumanDuration::secs(5),
            upstream_timeout: HumanDuration::secs(60),
            retries: 1,
            header_read_timeout: HumanDuration::secs(30),
            idle_timeout: HumanDuration::secs(60),
            max_header_bytes: 64 * 1024,
            max_connections: 20_000,
            tls: None,
            sticky: false,
            sticky_cookie: "bluegreen_sticky".into(),
            preview: RawPreview::default(),
            forwarded: RawForwarded::default(),
            driver: "embedded".into(),
            socket: None,
            backend: None,
            upstream_file: None,
            check: None,
            reload: None,
            access_log: None,
            pid_file: None,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawPreview {
    enabled: bool,
    header: String,
    cookie: String,
    secret: Option<String>,
    secret_file: Option<String>,
    secret_header: String,
}

impl Default for RawPreview {
    fn default() -> Self {
        RawPreview {
            enabled: true,
            header: "X-Bluegreen-Env".into(),
            cookie: "bluegreen_env".into(),
            secret: None,
            secret_file: None,
            secret_header: "X-Bluegreen-Secret".into(),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawForwarded {
    x_forwarded_for: bool,
    x_forwarded_proto: bool,
    x_forwarded_host: bool,
    forwarded: bool,
    trust_incoming: bool,
}

impl Default for RawForwarded {
    fn default() -> Self {
        RawForwarded {
            x_forwarded_for: true,
            x_forwarded_proto: true,
            x_forwarded_host: true,
            forwarded: false,
            trust_incoming: false,
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawHealth {
    path: String,
    grpc_service: Option<String>,
    interval: HumanDuration,
    timeout: HumanDuration,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Default for RawHealth {
    fn default() -> Self {
        RawHealth {
            path: "/healthz".into(),
            grpc_service: None,
            interval: HumanDuration::secs(1),
            timeout: HumanDuration::secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

// ---- validated ----

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminEndpoint {
    /// A unix socket, mode 0600: the file system decides who may call.
    Unix(PathBuf),
    /// TCP, where every call must carry the bearer token.
    Tcp(SocketAddr),
}

impl AdminEndpoint {
    /// `host:port` is TCP; anything else (a path, a `*.sock` name) is a unix socket, resolved
    /// against `base` when relative.
    pub fn parse(text: &str, base: &Path) -> AdminEndpoint {
        let looks_like_path = text.contains('/') || text.ends_with(".sock");
        match parse_socket_addr(text) {
            Ok(addr) if !looks_like_path => AdminEndpoint::Tcp(addr),
            _ => AdminEndpoint::Unix(base.join(text)),
        }
    }
}

impl fmt::Display for AdminEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminEndpoint::Unix(path) => write!(f, "{}", path.display()),
            AdminEndpoint::Tcp(addr) => write!(f, "http://{addr}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreviewConfig {
    pub header: HeaderName,
    pub cookie: String,
    pub secret: Option<String>,
    pub secret_header: HeaderName,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouterConfig {
    /// How this router names itself in a fleet's reports (default: the host's name).
    pub id: String,
    pub listen: SocketAddr,
    pub admin: AdminEndpoint,
    /// The token TCP admin callers must present.
    pub admin_token: Option<String>,
    pub initial_live: Color,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub retries: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub tls: Option<TlsFiles>,
    pub sticky_cookie: Option<String>,
    pub preview: Option<PreviewConfig>,
    pub forwarded: ForwardedHeaders,
    pub driver: Driver,
}

/// The router that switches the traffic.
#[derive(Debug, Clone, PartialEq)]
pub enum Driver {
    /// bluegreen's own router, on `router.listen`.
    Embedded,
    /// An HAProxy bluegreen drives through its runtime API: blue and green are the servers
    /// named `blue…` and `green…` of `backend`.
    Haproxy { socket: PathBuf, backend: String },
    /// An nginx whose upstream servers bluegreen writes to `upstream_file`, checks with
    /// `check` and puts in force with `reload`; per-color counters come from `access_log`.
    Nginx {
        upstream_file: PathBuf,
        check: Vec<String>,
        reload: Vec<String>,
        access_log: PathBuf,
        /// nginx's pid file: a reload counts once its master's new workers serve.
        pid_file: PathBuf,
    },
}

impl Driver {
    pub fn name(&self) -> &'static str {
        match self {
            Driver::Embedded => "embedded",
            Driver::Haproxy { .. } => "haproxy",
            Driver::Nginx { .. } => "nginx",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub service: String,
    pub state_dir: PathBuf,
    /// Where the state lives (SQLite under `state_dir` unless `store.etcd` is given).
    pub store: StoreSettings,
    /// `deploy.batch`: how many hosts of a fleet deploy at once (all by default).
    pub deploy_batch: Batch,
    pub router: RouterConfig,
    /// Fixed upstreams per color (static provider), indexed by [`Color::index`].
    pub upstreams: [Vec<SocketAddr>; 2],
    /// What each color's upstreams speak, indexed by [`Color::index`].
    pub upstream_protocols: [UpstreamProtocol; 2],
    pub health: HealthSettings,
    pub controller: ControllerConfig,
    pub dashboard: Option<DashboardConfig>,
}

/// The web dashboard: where it listens, and the file holding the token its buttons need
/// (created with a random token on first start when it does not exist).
#[derive(Debug, Clone, PartialEq)]
pub struct DashboardConfig {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, &base).map_err(|issues| ConfigError::Invalid {
            path: path.to_path_buf(),
            issues,
        })
    }

    /// Parses and validates; relative paths are resolved against `base` (the config's folder).
    pub fn parse(text: &str, base: &Path) -> Result<Config, Vec<ConfigIssue>> {
        let mut located: Option<ConfigIssue> = None;
        let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize::<_, RawConfig>(de).map_err(|e| {
                let path = e.path().to_string();
                located = Some(ConfigIssue {
                    path: if path == "." { String::new() } else { path },
                    message: e.inner().to_string(),
                });
                e.into_inner()
            })
        });
        let raw = parsed.map_err(|e| {
            vec![located.take().unwrap_or_else(|| ConfigIssue {
                path: String::new(),
                message: format!("YAML syntax: {}", e.to_string().trim()),
            })]
        })?;
        Validator::new(base).validate(raw)
    }
}

struct Validator<'a> {
    base: &'a Path,
    issues: Vec<ConfigIssue>,
}

impl<'a> Validator<'a> {
    fn new(base: &'a Path) -> Self {
        Validator {
            base,
            issues: Vec::new(),
        }
    }

    /// Records a problem once: a shared `app` key checked for each color is reported once.
    fn issue(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let issue = ConfigIssue {
            path: path.into(),
            message: message.into(),
        };
        if !self
            .issues
            .iter()
            .any(|i| i.path == issue.path && i.message == issue.message)
        {
            self.issues.push(issue);
        }
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    fn positive(&mut self, path: &str, value: HumanDuration) -> Duration {
        if value.0.is_zero() {
            self.issue(path, "must be longer than 0; write e.g. 1s or 500ms");
        }
        value.0
    }

    fn validate(mut self, raw: RawConfig) -> Result<Config, Vec<ConfigIssue>> {
        if raw.service.trim().is_empty() {
            self.issue(
                "service",
                "must not be empty; name the service, e.g. `service: web`",
            );
        }
        let upstreams = self.static_upstreams(raw.app.as_ref(), &raw.environments);
        let upstream_protocols = self.upstream_protocols(raw.app.as_ref(), &raw.environments);
        let router = self.router(raw.router);
        let health = self.health(raw.health);
        if health.grpc_service.is_some() {
            for color in Color::ALL {
                let protocol = &upstream_protocols[color.index()];
                if *protocol == UpstreamProtocol::Http1 {
                    self.issue(
                        "health.grpc_service",
                        format!("gRPC health checks need HTTP/2 upstreams, and environment {color} speaks http1; set its upstream_protocol to h2c or h2, or remove health.grpc_service"),
                    );
                }
            }
        }
        if router.driver != Driver::Embedded
            && let Some(color) = Color::ALL
                .into_iter()
                .find(|c| upstream_protocols[c.index()] != UpstreamProtocol::Http1)
        {
            self.issue(
                format!("environments.{color}.upstream_protocol"),
                format!("is {}, but with router.driver {} that router connects to the upstreams, not bluegreen; configure HTTP/2 to the servers there and leave upstream_protocol out", upstream_protocols[color.index()].name(), router.driver.name()),
            );
        }
        let controller = self.controller(
            RawController {
                app: raw.app,
                environments: raw.environments,
                test: raw.test,
                release: raw.release,
                strategies: raw.strategies,
                analysis: raw.analysis,
                hooks: raw.hooks,
                webhook: raw.webhook,
                mirror: raw.mirror,
            },
            &upstreams,
        );
        let containers = controller
            .environments
            .iter()
            .any(|e| e.provider.kind() == controller::ProviderKind::Docker);
        let container_name_ok = raw
            .service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            && raw.service.starts_with(|c: char| c.is_ascii_alphanumeric());
        if containers && !container_name_ok {
            self.issue(
                "service",
                format!(
                    "{:?} cannot start a container name (<service>-<color>-<version>-<n>); use letters, digits and _ . -, starting with a letter or digit",
                    raw.service
                ),
            );
        }
        let state_dir = self.resolve(&raw.state_dir);
        let dashboard = self.dashboard(raw.dashboard, &state_dir);
        let store = self.store(raw.store, &raw.service);
        let deploy_batch = self.deploy_batch(raw.deploy);
        if controller.mirror.is_some() {
            // The copies are made by the router the requests pass through.
            if router.driver != Driver::Embedded {
                self.issue(
                    "mirror",
                    "shadow traffic needs bluegreen's own router: HAProxy or nginx answers the requests itself (router.driver: embedded, or remove mirror:)",
                );
            }
            if matches!(store, StoreSettings::Etcd(_)) {
                self.issue(
                    "mirror",
                    "shadow traffic runs on one router: a fleet (store.etcd) cannot mirror yet; remove mirror: or run one router",
                );
            }
        }
        if !self.issues.is_empty() {
            return Err(self.issues);
        }
        Ok(Config {
            controller,
            dashboard,
            service: raw.service,
            state_dir,
            store,
            deploy_batch,
            router,
            upstreams,
            upstream_protocols,
            health,
        })
    }

    /// The fixed upstreams of each color under `environments:` (static provider only).
    fn static_upstreams(
        &mut self,
        app: Option<&RawApp>,
        environments: &BTreeMap<String, RawEnvironment>,
    ) -> [Vec<SocketAddr>; 2] {
        let is_static = app.is_none_or(|a| a.is_static());
        let mut upstreams: [Vec<SocketAddr>; 2] = [Vec::new(), Vec::new()];
        for (name, env) in environments {
            let Ok(color) = name.parse::<Color>() else {
                self.issue(
                    format!("environments.{name}"),
                    "unknown environment; valid: blue, green",
                );
                continue;
            };
            let Some(env_upstreams) = env.upstreams.as_ref().filter(|_| is_static) else {
                continue;
            };
            if env_upstreams.is_empty() {
                self.issue(
                    format!("environments.{name}.upstreams"),
                    "is empty; list at least one host:port, e.g. [\"127.0.0.1:9001\"]",
                );
            }
            for (i, text) in env_upstreams.iter().enumerate() {
                let path = format!("environments.{name}.upstreams[{i}]");
                match parse_socket_addr(text) {
                    Ok(addr) if upstreams[color.index()].contains(&addr) => {
                        self.issue(path, format!("{text:?} is listed twice"));
                    }
                    Ok(addr) => upstreams[color.index()].push(addr),
                    Err(message) => self.issue(path, message),
                }
            }
        }
        for color in Color::ALL {
            if app.is_none() && !environments.contains_key(color.as_str()) {
                self.issue(
                    format!("environments.{color}"),
                    format!("is missing; both blue and green need upstreams, e.g. `{color}: {{ upstreams: [\"127.0.0.1:9001\"] }}`"),
                );
            }
        }
        upstreams
    }

    /// `router.id`, or the host's name: letters, digits and `_ . -` (it is part of an etcd key).
    fn router_id(&mut self, id: Option<String>) -> String {
        let id = id.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_string())
                .ok()
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "router".into())
        });
        let fits = !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !fits {
            self.issue(
                "router.id",
                format!(
                    "{id:?} cannot name a router; use 1 to 64 letters, digits and _ . -, e.g. web-1"
                ),
            );
        }
        id
    }

    fn router(&mut self, r: RawRouter) -> RouterConfig {
        let listen = parse_socket_addr(&r.listen).unwrap_or_else(|message| {
            self.issue("router.listen", message);
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        if r.admin.trim().is_empty() {
            self.issue(
                "router.admin",
                "must not be empty; give a socket path like .bluegreen/admin.sock or host:port",
            );
        }
        let admin = AdminEndpoint::parse(&r.admin, self.base);
        let admin_token = self.admin_token(&admin, r.admin_token_file.as_deref());
        let initial_live = r.initial_live.parse::<Color>().unwrap_or_else(|e| {
            self.issue("router.initial_live", e.to_string());
            Color::Blue
        });
        let drain_timeout = r.drain_timeout.0;
        let connect_timeout = self.positive("router.connect_timeout", r.connect_timeout);
        let upstream_timeout = self.positive("router.upstream_timeout", r.upstream_timeout);
        let header_read_timeout =
            self.positive("router.header_read_timeout", r.header_read_timeout);
        let idle_timeout = self.positive("router.idle_timeout", r.idle_timeout);
        self.check_router_limits(&r);
        let tls = r.tls.map(|t| self.tls_files(t));
        let sticky_cookie = r.sticky.then(|| self.sticky_cookie(&r.sticky_cookie));
        let preview = if r.preview.enabled {
            Some(self.preview(r.preview))
        } else {
            None
        };
        RouterConfig {
            id: self.router_id(r.id),
            listen,
            admin,
            admin_token,
            initial_live,
            drain_timeout,
            connect_timeout,
            upstream_timeout,
            retries: r.retries as usize,
            header_read_timeout,
            idle_timeout,
            max_header_bytes: r.max_header_bytes as usize,
            max_connections: r.max_connections as usize,
            tls,
            sticky_cookie,
            preview,
            forwarded: ForwardedHeaders {
                x_forwarded_for: r.forwarded.x_forwarded_for,
                x_forwarded_proto: r.forwarded.x_forwarded_proto,
                x_forwarded_host: r.forwarded.x_forwarded_host,
                forwarded: r.forwarded.forwarded,
                trust_incoming: r.forwarded.trust_incoming,
            },
            driver: self.driver(DriverKeys {
                name: r.driver,
                socket: r.socket,
                backend: r.backend,
                upstream_file: r.upstream_file,
                check: r.check,
                reload: r.reload,
                access_log: r.access_log,
                pid_file: r.pid_file,
            }),
        }
    }

    /// A key `driver` needs: an issue naming it when absent or empty (`why` says which driver
    /// and what to give).
    fn required(&mut self, key: &str, value: Option<String>, why: &str) -> String {
        match value.filter(|v| !v.trim().is_empty()) {
            Some(value) => value,
            None => {
                self.issue(key, format!("required with router.driver: {why}"));
                String::new()
            }
        }
    }

    /// `router.driver` and the keys of the driver it names (refused with another driver).
    fn driver(&mut self, keys: DriverKeys) -> Driver {
        let given = [
            ("socket", "haproxy", keys.socket.is_some()),
            ("backend", "haproxy", keys.backend.is_some()),
            ("upstream_file", "nginx", keys.upstream_file.is_some()),
            ("check", "nginx", keys.check.is_some()),
            ("reload", "nginx", keys.reload.is_some()),
            ("access_log", "nginx", keys.access_log.is_some()),
            ("pid_file", "nginx", keys.pid_file.is_some()),
        ];
        for (key, driver, given) in given {
            if given && keys.name != driver {
                self.issue(
                    format!("router.{key}"),
                    format!("belongs to router.driver: {driver}; remove it, or set the driver"),
                );
            }
        }
        match keys.name.as_str() {
            "embedded" => Driver::Embedded,
            "haproxy" => {
                let socket = self.required(
                    "router.socket",
                    keys.socket,
                    "haproxy; give HAProxy's runtime API socket (its `stats socket PATH level admin`), e.g. /run/haproxy/admin.sock",
                );
                let backend = self.required(
                    "router.backend",
                    keys.backend,
                    "haproxy; name the backend whose servers blue… and green… are the colors, e.g. app",
                );
                Driver::Haproxy {
                    socket: self.resolve(&socket),
                    backend,
                }
            }
            "nginx" => {
                let upstream_file = self.required(
                    "router.upstream_file",
                    keys.upstream_file,
                    "nginx; give the file bluegreen writes the servers to, included in your upstream block (`upstream app { include /etc/nginx/bluegreen-servers.conf; }`)",
                );
                let access_log = self.required(
                    "router.access_log",
                    keys.access_log,
                    "nginx; give the access log written with `log_format bluegreen '$upstream_addr $status $request_time';` (bluegreen counts each color's answers from it)",
                );
                let mut command = |key: &str, text: Option<String>, default: &str| {
                    let text = text.unwrap_or_else(|| default.to_string());
                    self.command_line(&format!("router.{key}"), &text)
                        .unwrap_or_default()
                };
                let check = command("check", keys.check, "nginx -t");
                let reload = command("reload", keys.reload, "nginx -s reload");
                Driver::Nginx {
                    upstream_file: self.resolve(&upstream_file),
                    check,
                    reload,
                    access_log: self.resolve(&access_log),
                    pid_file: self.resolve(keys.pid_file.as_deref().unwrap_or("/run/nginx.pid")),
                }
            }
            other => {
                self.issue(
                    "router.driver",
                    format!("{other:?} is not a router bluegreen drives; write embedded (bluegreen's own, the default), haproxy or nginx"),
                );
                Driver::Embedded
            }
        }
    }

    /// The token TCP admin callers must present, read from `router.admin_token_file`.
    fn admin_token(&mut self, admin: &AdminEndpoint, token_file: Option<&str>) -> Option<String> {
        let admin_token_file = token_file.map(|p| self.resolve(p));
        match (admin, &admin_token_file) {
            (AdminEndpoint::Tcp(_), None) => {
                self.issue(
                    "router.admin_token_file",
                    "is required when router.admin is host:port (TCP); point it at a file holding a long random token, or use a unix socket path",
                );
                None
            }
            (_, Some(file)) => match std::fs::read_to_string(file) {
                Ok(token) if token.trim().len() >= 16 => Some(token.trim().to_string()),
                Ok(_) => {
                    self.issue("router.admin_token_file", format!("{} holds a token shorter than 16 characters; write a long random one (e.g. `openssl rand -hex 32`)", file.display()));
                    None
                }
                Err(e) => {
                    self.issue(
                        "router.admin_token_file",
                        format!("cannot read {}: {e}", file.display()),
                    );
                    None
                }
            },
            (AdminEndpoint::Unix(_), None) => None,
        }
    }

    /// Header size, connection count and retries within what the router can serve.
    fn check_router_limits(&mut self, r: &RawRouter) {
        if !(1024..=1024 * 1024).contains(&r.max_header_bytes) {
            self.issue(
                "router.max_header_bytes",
                format!(
                    "{} is out of range; use 1024 to 1048576 (bytes)",
                    r.max_header_bytes
                ),
            );
        }
        if r.max_connections == 0 || r.max_connections > 1_000_000 {
            self.issue(
                "router.max_connections",
                format!("{} is out of range; use 1 to 1000000", r.max_connections),
            );
        }
        if r.retries > 10 {
            self.issue(
                "router.retries",
                format!("{} is too many; use 0 to 10", r.retries),
            );
        }
    }

    fn tls_files(&mut self, t: RawTls) -> TlsFiles {
        for (key, value) in [("router.tls.cert", &t.cert), ("router.tls.key", &t.key)] {
            if !self.resolve(value).is_file() {
                self.issue(
                    key,
                    format!("{value:?} is not a readable file; give a PEM file path"),
                );
            }
        }
        TlsFiles {
            cert: self.resolve(&t.cert),
            key: self.resolve(&t.key),
        }
    }

    fn sticky_cookie(&mut self, name: &str) -> String {
        if !is_cookie_name(name) {
            self.issue(
                "router.sticky_cookie",
                format!("{name:?} is not a valid cookie name; use letters, digits, - and _"),
            );
        }
        name.to_string()
    }

    fn preview(&mut self, p: RawPreview) -> PreviewConfig {
        let mut header = |key: &str, value: &str| {
            HeaderName::from_bytes(value.as_bytes()).unwrap_or_else(|_| {
                self.issue(key, format!("{value:?} is not a valid header name"));
                HeaderName::from_static("x-invalid")
            })
        };
        let header_name = header("router.preview.header", &p.header);
        let secret_header = header("router.preview.secret_header", &p.secret_header);
        if !is_cookie_name(&p.cookie) {
            self.issue(
                "router.preview.cookie",
                format!("{:?} is not a valid cookie name", p.cookie),
            );
        }
        let secret = self.preview_secret(p.secret, p.secret_file);
        PreviewConfig {
            header: header_name,
            cookie: p.cookie,
            secret,
            secret_header,
        }
    }

    /// The preview secret, given inline or in a file (not both).
    fn preview_secret(
        &mut self,
        secret: Option<String>,
        secret_file: Option<String>,
    ) -> Option<String> {
        match (secret, secret_file) {
            (Some(_), Some(_)) => {
                self.issue(
                    "router.preview.secret",
                    "give either secret or secret_file, not both",
                );
                None
            }
            (Some(s), None) if s.trim().is_empty() => {
                self.issue(
                    "router.preview.secret",
                    "is empty; remove it or give a non-empty secret",
                );
                None
            }
            (Some(s), None) => Some(s),
            (None, Some(file)) => match std::fs::read_to_string(self.resolve(&file)) {
                Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Ok(_) => {
                    self.issue("router.preview.secret_file", format!("{file} is empty"));
                    None
                }
                Err(e) => {
                    self.issue(
                        "router.preview.secret_file",
                        format!("cannot read {file}: {e}"),
                    );
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn health(&mut self, h: RawHealth) -> HealthSettings {
        if !h.path.starts_with('/') {
            self.issue(
                "health.path",
                format!("{:?} must start with /, e.g. /healthz", h.path),
            );
        }
        let interval = self.positive("health.interval", h.interval);
        let timeout = self.positive("health.timeout", h.timeout);
        for (key, value) in [
            ("health.healthy_threshold", h.healthy_threshold),
            ("health.unhealthy_threshold", h.unhealthy_threshold),
        ] {
            if value == 0 {
                self.issue(key, "must be at least 1");
            }
        }
        HealthSettings {
            path: h.path,
            grpc_service: h.grpc_service,
            interval,
            timeout,
            healthy_threshold: h.healthy_threshold,
            unhealthy_threshold: h.unhealthy_threshold,
        }
    }

    /// The web dashboard, unless `dashboard.enabled: false`; its token file defaults to the
    /// state folder.
    fn deploy_batch(&mut self, raw: RawDeploy) -> Batch {
        const FIX: &str = "write a number of hosts (e.g. 1) or a share of them (e.g. 25%)";
        match raw.batch {
            None => Batch::Percent(100),
            Some(RawBatch::Hosts(n)) if n >= 1 => Batch::Hosts(n as usize),
            Some(RawBatch::Hosts(n)) => {
                self.issue(
                    "deploy.batch",
                    format!("{n} hosts cannot be a batch; {FIX}"),
                );
                Batch::Percent(100)
            }
            Some(RawBatch::Text(text)) => {
                let percent = text
                    .trim()
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<u8>().ok())
                    .filter(|p| (1..=100).contains(p));
                match (percent, text.trim().parse::<usize>()) {
                    (Some(p), _) => Batch::Percent(p),
                    (None, Ok(n)) if n >= 1 => Batch::Hosts(n),
                    _ => {
                        self.issue(
                            "deploy.batch",
                            format!("{text:?} is not a batch; {FIX}, from 1% to 100%"),
                        );
                        Batch::Percent(100)
                    }
                }
            }
        }
    }

    fn dashboard(&mut self, d: RawDashboard, state_dir: &Path) -> Option<DashboardConfig> {
        d.enabled.then(|| {
            let listen = parse_socket_addr(&d.listen).unwrap_or_else(|message| {
                self.issue("dashboard.listen", message);
                SocketAddr::from(([127, 0, 0, 1], 0))
            });
            DashboardConfig {
                listen,
                token_file: d
                    .token_file
                    .as_deref()
                    .map(|f| self.resolve(f))
                    .unwrap_or_else(|| state_dir.join("dashboard.token")),
            }
        })
    }
}

fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `host:port` → one socket address; names are resolved once, now.
pub fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} has no port; write it as host:port, e.g. \"127.0.0.1:9001\""
        ));
    };
    if host.is_empty() {
        return Err(format!(
            "{text:?} has no host; write it as host:port, e.g. \"127.0.0.1{text}\""
        ));
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "{text:?}: an IPv6 address needs brackets, e.g. \"[::1]:9001\""
        ));
    }
    let Ok(port) = port.parse::<u16>() else {
        return Err(format!(
            "{text:?} has an invalid port {port:?}; use a number from 1 to 65535"
        ));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match (host, port).to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => Ok(addr),
        _ => Err(format!("{text:?}: cannot resolve host {host:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
service: web
router:
  listen: 127.0.0.1:8080
  admin: .bluegreen/admin.sock
  drain_timeout: 30s
environments:
  blue:  { upstreams: ["127.0.0.1:9001", "127.0.0.1:9003"] }
  green: { upstreams: ["127.0.0.1:9002"] }
health: { path: /healthz, interval: 1s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3 }
"#;

    fn issues(text: &str) -> Vec<String> {
        Config::parse(text, Path::new("/tmp/x"))
            .expect_err("config must be refused")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_minimal_config_loads_with_defaults() {
        let config = Config::parse(GOOD, Path::new("/srv/app")).unwrap();
        assert_eq!(config.upstreams[Color::Blue.index()].len(), 2);
        assert_eq!(config.router.drain_timeout, Duration::from_secs(30));
        assert_eq!(
            config.router.admin,
            AdminEndpoint::Unix(PathBuf::from("/srv/app/.bluegreen/admin.sock"))
        );
        assert_eq!(config.router.initial_live, Color::Blue);
        assert_eq!(config.health.unhealthy_threshold, 3);
        assert!(config.router.preview.is_some());
    }

    #[test]
    fn an_etcd_store_loads_with_its_defaults_and_bad_ones_name_the_key() {
        let config = Config::parse(
            &format!("{GOOD}store:\n  etcd:\n    endpoints: [\"10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n"),
            Path::new("/srv/app"),
        )
        .unwrap();
        let StoreSettings::Etcd(etcd) = &config.store else {
            panic!("an etcd store: {:?}", config.store)
        };
        assert_eq!(
            etcd.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(etcd.prefix, "/bluegreen/web");
        assert_eq!(etcd.confirm_timeout, Duration::from_secs(10));

        let bad = format!(
            "{GOOD}store:\n  etcd:\n    endpoints: [\"https://10.0.0.1:2379\", \"10.0.0.2\", \"ftp://x:1\"]\n    prefix: bluegreen\n    user: ops\n    timeout: 0s\n"
        );
        let found = issues(&bad);
        for expected in [
            "store.etcd.endpoints[0]: https needs store.etcd.tls",
            "store.etcd.endpoints[1]: \"10.0.0.2\" is not host:port",
            "store.etcd.endpoints[2]: unknown scheme \"ftp\"",
            "store.etcd.prefix: \"bluegreen\" is not a key prefix",
            "store.etcd.password_file: is required with store.etcd.user",
            "store.etcd.timeout: must be longer than 0s",
        ] {
            assert!(
                found.iter().any(|i| i.starts_with(expected)),
                "{expected}: {found:?}"
            );
        }
        assert!(
            issues(&format!("{GOOD}store:\n  etcd:\n    endpoints: []\n"))[0]
                .starts_with("store.etcd.endpoints: is empty")
        );
        let tls = issues(&format!(
            "{GOOD}store:\n  etcd:\n    endpoints: [\"http://10.0.0.1:2379\"]\n    tls: {{ ca_file: no-such-ca.pem, cert_file: me.pem }}\n"
        ));
        for expected in [
            "store.etcd.tls.ca_file: cannot read /tmp/x/no-such-ca.pem",
            "store.etcd.tls: cert_file and key_file go together",
        ] {
            assert!(
                tls.iter().any(|i| i.starts_with(expected)),
                "{expected}: {tls:?}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "PEM").unwrap();
        let mixed = format!(
            "{GOOD}store:\n  etcd:\n    endpoints: [\"http://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\n    tls: {{ ca_file: ca.pem }}\n"
        );
        let found: Vec<String> = Config::parse(&mixed, dir.path())
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "store.etcd.endpoints[0]: http with store.etcd.tls set; write https://host:port, or remove store.etcd.tls"
            ]
        );
        let id = GOOD.replace(
            "  listen: 127.0.0.1:8080",
            "  id: \"web 1\"\n  listen: 127.0.0.1:8080",
        );
        assert!(issues(&id)[0].starts_with("router.id: \"web 1\" cannot name a router"));
        // A fleet deploys the process provider's instances on each host, in batches.
        let local = "service: web\napp:\n  command: \"app --port {port}\"\nstore: { etcd: { endpoints: [\"127.0.0.1:2379\"] } }\n";
        let batch = |b: &str| {
            Config::parse(
                &format!("{local}deploy: {{ batch: {b} }}\n"),
                Path::new("/tmp/x"),
            )
        };
        assert_eq!(batch("1").unwrap().deploy_batch, Batch::Hosts(1));
        assert_eq!(batch("25%").unwrap().deploy_batch, Batch::Percent(25));
        assert_eq!(Batch::Percent(25).size(10), 3);
        assert_eq!(Batch::Hosts(5).size(3), 3);
        assert_eq!(
            Config::parse(local, Path::new("/tmp/x"))
                .unwrap()
                .deploy_batch
                .size(7),
            7
        );
        for bad in ["0", "-2", "0%", "150%", "half"] {
            let found = batch(bad)
                .unwrap_err()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>();
            assert!(found[0].starts_with("deploy.batch: "), "{bad}: {found:?}");
            assert!(found[0].contains("e.g. 25%"), "{bad}: {found:?}");
        }
    }

    #[test]
    fn a_driver_and_its_keys_are_checked_together() {
        let with = |keys: &str| {
            GOOD.replace(
                "  listen: 127.0.0.1:8080",
                &format!("  listen: 127.0.0.1:8080\n{keys}"),
            )
        };
        assert!(
            issues(&with("  driver: traefik"))[0]
                .starts_with("router.driver: \"traefik\" is not a router bluegreen drives")
        );
        let found = issues(&with("  driver: haproxy"));
        assert!(
            found[0].starts_with("router.socket: required with router.driver: haproxy"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("router.backend: required with router.driver: haproxy"),
            "{found:?}"
        );
        let found = issues(&with("  driver: nginx\n  upstream_file: \" \""));
        assert!(
            found[0].starts_with("router.upstream_file: required with router.driver: nginx"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("router.access_log: required"),
            "{found:?}"
        );
        let found = issues(&with("  socket: /run/haproxy.sock"));
        assert_eq!(
            found,
            ["router.socket: belongs to router.driver: haproxy; remove it, or set the driver"]
        );
        let nginx = Config::parse(&with("  driver: nginx\n  upstream_file: servers.conf\n  access_log: /var/log/nginx/bg.log"), Path::new("/tmp/x")).unwrap();
        assert_eq!(
            nginx.router.driver,
            Driver::Nginx {
                upstream_file: "/tmp/x/servers.conf".into(),
                check: vec!["nginx".into(), "-t".into()],
                reload: vec!["nginx".into(), "-s".into(), "reload".into()],
                access_log: "/var/log/nginx/bg.log".into(),
                pid_file: "/run/nginx.pid".into(),
            }
        );
    }

    #[test]
    fn an_upstream_without_port_names_its_path() {
        let text = GOOD.replace("\"127.0.0.1:9002\"", "\"127.0.0.1\"");
        assert_eq!(
            issues(&text),
            vec![
                "environments.green.upstreams[0]: \"127.0.0.1\" has no port; write it as host:port, e.g. \"127.0.0.1:9001\""
            ]
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_name_their_path() {
        let unknown = issues(&GOOD.replace("drain_timeout: 30s", "drain_timout: 30s"));
        assert!(
            unknown[0]
                .starts_with("router.drain_timout: unknown field `drain_timout`, expected one of"),
            "{unknown:?}"
        );
        let wrong_type = issues(&GOOD.replace("healthy_threshold: 2", "healthy_threshold: two"));
        assert!(
            wrong_type[0].starts_with("health.healthy_threshold:"),
            "{wrong_type:?}"
        );
        let bad_duration = issues(&GOOD.replace("drain_timeout: 30s", "drain_timeout: 30"));
        assert!(
            bad_duration[0].starts_with("router.drain_timeout:")
                && bad_duration[0].contains("unit"),
            "{bad_duration:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = GOOD
            .replace(
                "green: { upstreams: [\"127.0.0.1:9002\"] }",
                "purple: { upstreams: [] }",
            )
            .replace("path: /healthz", "path: healthz");
        let found = issues(&text);
        assert!(
            found
                .iter()
                .any(|i| i.starts_with("environments.purple: unknown environment")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|i| i.starts_with("environments.green: is missing")),
            "{found:?}"
        );
        assert!(
            found.iter().any(|i| i.starts_with("health.path:")),
            "{found:?}"
        );
    }

    #[test]
    fn tcp_admin_requires_a_token_file() {
        let found = issues(&GOOD.replace("admin: .bluegreen/admin.sock", "admin: 127.0.0.1:9900"));
        assert!(
            found[0].starts_with("router.admin_token_file: is required"),
            "{found:?}"
        );
    }

    #[test]
    fn yaml_syntax_errors_are_reported() {
        let found = issues("service: [web\n");
        assert!(
            found[0].contains("YAML") || found[0].contains("line"),
            "{found:?}"
        );
    }

    const DOCKER: &str = r#"
service: web
router: { listen: 127.0.0.1:8080, admin: .bluegreen/admin.sock }
app:
  provider: docker
  image: registry.example:5000/team/web
  command: "--listen 0.0.0.0:{port} --color {color}"
  instances: 2
  labels: { team: payments }
  volumes: ["./data:/data:ro", "cache:/cache"]
  cpus: 0.5
  memory: 256m
  pull: never
health: { path: /healthz }
"#;

    #[test]
    fn a_docker_app_loads_with_its_keys_and_defaults() {
        let config = Config::parse(DOCKER, Path::new("/srv/app")).unwrap();
        let spec = config.controller.environment(Color::Green);
        assert_eq!(spec.instances, 2);
        let controller::ProviderSpec::Docker(controller::DockerSpec {
            image,
            port,
            command,
            volumes,
            cpus,
            memory,
            stop_grace,
            pull,
            retain,
            ..
        }) = &spec.provider
        else {
            panic!("not the docker provider: {:?}", spec.provider);
        };
        assert_eq!(image, "registry.example:5000/team/web");
        assert_eq!(*port, controller::DEFAULT_CONTAINER_PORT);
        assert_eq!(command[0], "--listen");
        assert_eq!(volumes, &["/srv/app/./data:/data:ro", "cache:/cache"]);
        assert_eq!(*cpus, Some(0.5));
        assert_eq!(*memory, Some(256 << 20));
        assert_eq!(*stop_grace, Duration::from_secs(10));
        assert_eq!(*pull, controller::PullPolicy::Never);
        assert_eq!(*retain, controller::DEFAULT_RETAIN);
    }

    #[test]
    fn every_bad_docker_key_is_named_with_its_fix() {
        let without_image = DOCKER.replace("  image: registry.example:5000/team/web\n", "");
        let found = issues(&without_image);
        assert!(found[0].starts_with("app.image: is required"), "{found:?}");

        let bad = DOCKER
            .replace("team/web", "team/web:1.0")
            .replace("cpus: 0.5", "cpus: 0")
            .replace("memory: 256m", "memory: lots")
            .replace("pull: never", "pull: sometimes")
            .replace("cache:/cache", "cache")
            .replace("team: payments", "bluegreen.color: red");
        let found = issues(&bad);
        for key in [
            "app.image: \"registry.example:5000/team/web:1.0\" has a tag",
            "app.cpus:",
            "app.memory:",
            "app.pull: unknown policy",
            "app.volumes[1]:",
            "app.labels.bluegreen.color:",
        ] {
            assert!(found.iter().any(|i| i.starts_with(key)), "{key}: {found:?}");
        }
        let found = issues(&DOCKER.replace("pull: never", "pull: never\n  network: host"));
        assert!(
            found[0].starts_with("app.network: \"host\" cannot be used"),
            "{found:?}"
        );
        let found = issues(
            &DOCKER
                .replace(
                    "provider: docker",
                    "provider: process\n  command: ./app {port}",
                )
                .replacen(
                    "  command: \"--listen 0.0.0.0:{port} --color {color}\"\n",
                    "",
                    1,
                ),
        );
        assert!(
            found
                .iter()
                .any(|i| i.starts_with("app.image: only the docker provider uses it")),
            "{found:?}"
        );
        let found = issues(&DOCKER.replace("service: web", "service: \"my web\""));
        assert!(
            found[0].starts_with("service: \"my web\" cannot start a container name"),
            "{found:?}"
        );
    }

    #[test]
    fn versions_must_be_image_tags() {
        for good in ["1.0", "v2", "2026-11-28_1", "_x", &"a".repeat(128)] {
            assert_eq!(controller::image_tag_problem(good), None, "{good}");
        }
        for bad in ["", ".1", "-rc", "1.0+build", "a/b", "1 0", &"a".repeat(129)] {
            assert!(controller::image_tag_problem(bad).is_some(), "{bad:?}");
        }
    }
}
