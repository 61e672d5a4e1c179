//! The controller's part of the config: the app and its environments, tests, strategies, analysis, hooks, pipeline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bluegreen_router::Color;
use bluegreen_router::protocol::{Connector, UpstreamProtocol};
use serde::{Deserialize, Serialize};

use super::mirror::MirrorSpec;
use super::{Validator, parse_socket_addr};
use crate::config::strategy::{Hold, Strategy};
use crate::duration::HumanDuration;

// ---- raw ----

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnvironment {
    pub upstreams: Option<Vec<String>>,
    pub instances: Option<u32>,
    pub command: Option<String>,
    pub env: Option<BTreeMap<String, String>>,
    pub deploy: Option<String>,
    pub stop: Option<String>,
    pub upstream_protocol: Option<String>,
    pub upstream_tls: Option<RawUpstreamTls>,
}

/// How an `h2` upstream's certificate is checked.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstreamTls {
    ca: Option<String>,
    server_name: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApp {
    #[serde(default = "default_provider")]
    provider: String,
    command: Option<String>,
    #[serde(default = "default_instances")]
    instances: u32,
    #[serde(default)]
    env: BTreeMap<String, String>,
    deploy: Option<String>,
    stop: Option<String>,
    #[serde(default = "default_ready_timeout")]
    ready_timeout: HumanDuration,
    #[serde(default = "default_stop_timeout")]
    stop_timeout: HumanDuration,
    // The docker provider's own keys (refused with other providers).
    image: Option<String>,
    port: Option<u16>,
    labels: Option<BTreeMap<String, String>>,
    volumes: Option<Vec<String>>,
    network: Option<String>,
    reach: Option<String>,
    cpus: Option<f64>,
    memory: Option<String>,
    stop_grace: Option<HumanDuration>,
    pull: Option<String>,
    retain: Option<u32>,
    upstream_protocol: Option<String>,
    upstream_tls: Option<RawUpstreamTls>,
}

impl RawApp {
    pub(super) fn is_static(&self) -> bool {
        self.provider == "static"
    }
}

fn default_provider() -> String {
    "process".into()
}
fn default_instances() -> u32 {
    1
}
fn default_ready_timeout() -> HumanDuration {
    HumanDuration::secs(60)
}
fn default_stop_timeout() -> HumanDuration {
    HumanDuration::secs(10)
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTest {
    checks: Vec<RawCheck>,
    command: Option<String>,
    timeout: HumanDuration,
}

impl Default for RawTest {
    fn default() -> Self {
        RawTest {
            checks: Vec::new(),
            command: None,
            timeout: HumanDuration::secs(60),
        }
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(default = "default_method")]
    method: String,
    path: String,
    #[serde(default = "default_status")]
    status: u16,
    body_contains: Option<String>,
    max_latency: Option<HumanDuration>,
}

fn default_method() -> String {
    "GET".into()
}
fn default_status() -> u16 {
    200
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(super) struct RawStrategy {
    #[serde(rename = "type")]
    kind: String,
    steps: Option<Vec<u8>>,
    wait: Option<String>,
    step: Option<u8>,
    every: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRelease {
    strategy: String,
    monitor_window: HumanDuration,
    scale_down_delay: HumanDuration,
    /// `None`: the default, [deploy, test, switch, cleanup] (with mirror before switch when
    /// `mirror:` is configured).
    pipeline: Option<Vec<String>>,
}

impl Default for RawRelease {
    fn default() -> Self {
        RawRelease {
            strategy: "canary-10-5m".into(),
            monitor_window: HumanDuration::secs(60),
            scale_down_delay: HumanDuration::secs(600),
            pipeline: None,
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimit {
    max: Option<HumanDuration>,
    max_increase: Option<HumanDuration>,
}

/// Keys left out keep their defaults; `null` switches a limit off.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawErrorRate {
    max_percent: Option<f64>,
    max_increase_percent: Option<f64>,
}

impl Default for RawErrorRate {
    fn default() -> Self {
        RawErrorRate {
            max_percent: Some(5.0),
            max_increase_percent: Some(2.0),
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
struct RawThroughput {
    min_ratio: Option<f64>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAnalysis {
    interval: HumanDuration,
    min_requests: u64,
    error_rate: RawErrorRate,
    latency_p50: RawLimit,
    latency_p95: RawLimit,
    latency_p99: RawLimit,
    throughput: RawThroughput,
    on_too_few_requests: String,
    mirror_mismatch_rate: RawMismatch,
    mirror_latency_p99: RawLimit,
}

/// The share of mirrored answers allowed to differ from the live ones.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, default)]
struct RawMismatch {
    max_percent: Option<f64>,
}

impl Default for RawMismatch {
    fn default() -> Self {
        RawMismatch {
            max_percent: Some(1.0),
        }
    }
}

impl Default for RawAnalysis {
    fn default() -> Self {
        RawAnalysis {
            interval: HumanDuration::secs(1),
            min_requests: 50,
            on_too_few_requests: "wait".into(),
            error_rate: RawErrorRate::default(),
            latency_p50: RawLimit::default(),
            latency_p95: RawLimit::default(),
            latency_p99: RawLimit {
                max: None,
                max_increase: Some(HumanDuration(Duration::from_millis(500))),
            },
            throughput: RawThroughput::default(),
            mirror_mismatch_rate: RawMismatch::default(),
            mirror_latency_p99: RawLimit {
                max: None,
                max_increase: Some(HumanDuration(Duration::from_millis(500))),
            },
        }
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHooks {
    pre_deploy: Option<String>,
    post_deploy: Option<String>,
    pre_switch: Option<String>,
    post_switch: Option<String>,
    on_rollback: Option<String>,
    cleanup: Option<String>,
    migrate_expand: Option<String>,
    migrate_contract: Option<String>,
    migrate_rollback: Option<String>,
    timeout: Option<HumanDuration>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    url: String,
    ca_file: Option<String>,
    #[serde(default = "default_webhook_timeout")]
    timeout: HumanDuration,
}

fn default_webhook_timeout() -> HumanDuration {
    HumanDuration::secs(5)
}

/// The command a color runs, and the key it came from: its own, or the shared `app.command`.
fn command_source(color: Color, app: &RawApp, own: &RawEnvironment) -> (String, Option<String>) {
    match (&own.command, &app.command) {
        (Some(c), _) => (format!("environments.{color}.command"), Some(c.clone())),
        (None, c) => ("app.command".to_string(), c.clone()),
    }
}

/// What both colors take from the `app` section.
struct SharedSpec {
    app: RawApp,
    provider: ProviderKind,
    ready_timeout: Duration,
    stop_timeout: Duration,
}

// ---- validated ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Fixed addresses per color; deploying only records the version and waits for health.
    Static,
    /// The embedded default: N supervised instances of a command template on free ports.
    Process,
    /// User scripts deploy and stop, printing upstream addresses.
    Command,
    /// Containers of `image:version` through the Docker Engine API, published on loopback.
    Docker,
}

/// When the docker provider asks the engine to pull `image:version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Only images the engine has (built or loaded locally); a missing one fails the deploy.
    Never,
    /// Pull only when the engine does not have the image (the default).
    IfMissing,
    /// Pull before every deploy (a moving tag gets its newest image).
    Always,
}

/// How the router reaches the docker provider's containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Reach {
    /// At a port published on 127.0.0.1 (the default: bluegreen runs on the engine's host).
    Published,
    /// At the container's own address on `app.network`, nothing published (bluegreen itself
    /// runs in a container on that network).
    Network,
}

/// The container port an app listens on when `app.port` is not given.
pub const DEFAULT_CONTAINER_PORT: u16 = 8080;
/// How many versions' stopped containers the docker provider keeps for fast rollbacks.
pub const DEFAULT_RETAIN: u32 = 3;

/// Each provider's own part of a color's spec.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(tag = "provider", rename_all = "snake_case")]
pub enum ProviderSpec {
    /// argv of the instance command, with `{port}`, `{version}`, `{color}` still in it.
    Process { command: Vec<String> },
    Static {
        #[schema(value_type = Vec<String>)]
        upstreams: Vec<SocketAddr>,
    },
    /// argv of the deploy and stop scripts.
    Command {
        deploy: Vec<String>,
        stop: Vec<String>,
    },
    /// Containers of `image:<version>`.
    Docker(DockerSpec),
}

/// The docker provider's part of a color's spec.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DockerSpec {
    pub image: String,
    /// The port the app listens on inside the container.
    pub port: u16,
    /// The container's arguments (the image's CMD when empty), with `{port}`, `{version}`,
    /// `{color}` still in them.
    pub command: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// `source:target[:ro]` binds and named volumes, host paths made absolute.
    pub volumes: Vec<String>,
    pub network: Option<String>,
    /// How the router reaches each container.
    pub reach: Reach,
    pub cpus: Option<f64>,
    /// In bytes.
    pub memory: Option<u64>,
    /// In milliseconds.
    #[serde(with = "crate::config::controller::ms")]
    #[schema(value_type = u64)]
    pub stop_grace: Duration,
    pub pull: PullPolicy,
    pub retain: u32,
}

impl ProviderSpec {
    pub fn kind(&self) -> ProviderKind {
        match self {
            ProviderSpec::Process { .. } => ProviderKind::Process,
            ProviderSpec::Static { .. } => ProviderKind::Static,
            ProviderSpec::Command { .. } => ProviderKind::Command,
            ProviderSpec::Docker(_) => ProviderKind::Docker,
        }
    }
}

/// One color's effective spec: the shared `app` with this color's overrides applied.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct EnvironmentSpec {
    pub color: Color,
    /// The provider and what it alone needs.
    #[serde(flatten)]
    pub provider: ProviderSpec,
    pub instances: u32,
    pub env: BTreeMap<String, String>,
    /// In milliseconds.
    #[serde(with = "crate::config::controller::ms")]
    #[schema(value_type = u64)]
    pub ready_timeout: Duration,
    /// In milliseconds.
    #[serde(with = "crate::config::controller::ms")]
    #[schema(value_type = u64)]
    pub stop_timeout: Duration,
    /// Keys this color sets over the shared spec.
    pub overrides: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub body_contains: Option<String>,
    pub max_latency: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TestSpec {
    pub checks: Vec<Check>,
    pub command: Option<Vec<String>>,
    pub timeout: Duration,
}

/// An absolute ceiling and a ceiling over the baseline color, either optional.
#[derive(Clone, Copy, Debug, PartialEq, Default, Serialize)]
pub struct Limit {
    pub max: Option<f64>,
    pub max_increase: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AnalysisSpec {
    #[serde(with = "crate::config::controller::ms")]
    pub interval: Duration,
    pub min_requests: u64,
    /// In percent.
    pub error_rate: Limit,
    /// In milliseconds.
    pub latency_p50: Limit,
    pub latency_p95: Limit,
    pub latency_p99: Limit,
    /// The new color's requests per second per percent of weight, over the baseline's.
    pub min_throughput_ratio: Option<f64>,
    /// A step whose time is up but whose new color never had `min_requests` waits for them
    /// (true) or goes on unjudged (false).
    pub wait_for_data: bool,
    /// Percent of mirrored answers that may differ from (or fail to match) the live ones.
    pub mirror_mismatch_rate: Option<f64>,
    /// In milliseconds: the copies' p99, absolute and over the live answers' p99.
    pub mirror_latency_p99: Limit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPoint {
    PreDeploy,
    PostDeploy,
    MigrateExpand,
    PreSwitch,
    PostSwitch,
    OnRollback,
    Cleanup,
    MigrateContract,
    /// A release that ran `migrate_expand` ended without its new version live.
    MigrateRollback,
}

impl HookPoint {
    pub fn as_str(self) -> &'static str {
        match self {
            HookPoint::PreDeploy => "pre_deploy",
            HookPoint::PostDeploy => "post_deploy",
            HookPoint::MigrateExpand => "migrate_expand",
            HookPoint::PreSwitch => "pre_switch",
            HookPoint::PostSwitch => "post_switch",
            HookPoint::OnRollback => "on_rollback",
            HookPoint::Cleanup => "cleanup",
            HookPoint::MigrateContract => "migrate_contract",
            HookPoint::MigrateRollback => "migrate_rollback",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hooks {
    pub commands: BTreeMap<HookPoint, Vec<String>>,
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct Webhook {
    pub url: http::Uri,
    pub addr: SocketAddr,
    pub timeout: Duration,
    /// For `https://`: the TLS client (Mozilla's roots, plus `ca_file`) and the name to verify.
    pub tls: Option<crate::transport::TlsClient>,
}

/// A stage of `bluegreen release`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Deploy,
    Test,
    /// Shadow traffic: copies of live requests to the new color, compared, before the switch.
    Mirror,
    Switch,
    Cleanup,
    /// A user command, named after its file.
    Run {
        name: String,
        argv: Vec<String>,
    },
}

impl Stage {
    pub fn name(&self) -> &str {
        match self {
            Stage::Deploy => "deploy",
            Stage::Test => "test",
            Stage::Mirror => "mirror",
            Stage::Switch => "switch",
            Stage::Cleanup => "cleanup",
            Stage::Run { name, .. } => name,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    pub environments: [EnvironmentSpec; 2],
    pub test: TestSpec,
    pub strategy: Strategy,
    pub strategies: BTreeMap<String, Strategy>,
    pub analysis: AnalysisSpec,
    pub monitor_window: Duration,
    pub scale_down_delay: Duration,
    pub hooks: Hooks,
    pub webhook: Option<Webhook>,
    pub pipeline: Vec<Stage>,
    /// Shadow traffic, when configured: the pipeline's mirror stage and its comparison.
    pub mirror: Option<MirrorSpec>,
}

impl ControllerConfig {
    pub fn environment(&self, color: Color) -> &EnvironmentSpec {
        &self.environments[color.index()]
    }

    /// A strategy by name: the config's own first, then the presets.
    pub fn strategy(&self, name: Option<&str>) -> Result<Strategy, String> {
        match name {
            None => Ok(self.strategy.clone()),
            Some(name) => match self.strategies.get(name) {
                Some(strategy) => Ok(strategy.clone()),
                None => Strategy::preset(name).map_err(|e| {
                    if self.strategies.is_empty() {
                        e
                    } else {
                        let own: Vec<&str> = self.strategies.keys().map(String::as_str).collect();
                        format!("{e} (this config defines: {})", own.join(", "))
                    }
                }),
            },
        }
    }
}

pub(crate) mod ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// The placeholders a command template may use.
const PLACEHOLDERS: [&str; 3] = ["{port}", "{version}", "{color}"];

pub(super) struct RawController {
    pub app: Option<RawApp>,
    pub environments: BTreeMap<String, RawEnvironment>,
    pub test: RawTest,
    pub release: RawRelease,
    pub strategies: BTreeMap<String, RawStrategy>,
    pub analysis: RawAnalysis,
    pub hooks: RawHooks,
    pub webhook: Option<RawWebhook>,
    pub mirror: Option<super::mirror::RawMirror>,
}

impl Validator<'_> {
    /// Splits a command line like a shell would (quotes, escapes) and resolves a relative
    /// program path against the config's folder. `executable` also checks the program runs.
    pub(super) fn command_line(&mut self, key: &str, text: &str) -> Option<Vec<String>> {
        let Some(mut argv) = shlex::split(text).filter(|a| !a.is_empty()) else {
            self.issue(
                key,
                format!("{text:?} is not a command line; check its quotes"),
            );
            return None;
        };
        if argv[0].contains('/') {
            argv[0] = self.resolve(&argv[0]).to_string_lossy().into_owned();
        }
        Some(argv)
    }

    /// A hook, test command or script must exist and be executable, or the release would fail
    /// only when it reaches it.
    pub(super) fn executable(&mut self, key: &str, text: &str) -> Option<Vec<String>> {
        let argv = self.command_line(key, text)?;
        match find_executable(&argv[0]) {
            Ok(_) => Some(argv),
            Err(why) => {
                self.issue(key, why);
                None
            }
        }
    }

    /// What each color's upstreams speak: the color's own `upstream_protocol` (and
    /// `upstream_tls`), else the app's, else HTTP/1.1. An `h2` client is set up here, so a
    /// bad CA file is reported by `check` and `reload`, not at the first connection.
    pub(super) fn upstream_protocols(
        &mut self,
        app: Option<&RawApp>,
        environments: &BTreeMap<String, RawEnvironment>,
    ) -> [UpstreamProtocol; 2] {
        Color::ALL.map(|color| {
            let own = environments.get(color.as_str());
            let (prefix, name, tls) = match own.and_then(|e| e.upstream_protocol.as_ref()) {
                Some(name) => (
                    format!("environments.{color}"),
                    Some(name),
                    own.and_then(|e| e.upstream_tls.as_ref()),
                ),
                None => (
                    "app".to_string(),
                    app.and_then(|a| a.upstream_protocol.as_ref()),
                    app.and_then(|a| a.upstream_tls.as_ref()),
                ),
            };
            if own.is_some_and(|e| e.upstream_protocol.is_none() && e.upstream_tls.is_some()) {
                self.issue(
                    format!("environments.{color}.upstream_tls"),
                    "is given without this color's upstream_protocol; set upstream_protocol: h2 beside it",
                );
            }
            let protocol = match name.map(String::as_str) {
                None | Some("http1") => UpstreamProtocol::Http1,
                Some("h2c") => UpstreamProtocol::H2c,
                Some("h2") => {
                    let tls = tls.cloned().unwrap_or_default();
                    UpstreamProtocol::H2 {
                        ca: tls.ca.map(|ca| self.resolve(&ca)),
                        server_name: tls.server_name,
                    }
                }
                Some(other) => {
                    self.issue(
                        format!("{prefix}.upstream_protocol"),
                        format!("{other:?} is not a protocol bluegreen speaks to upstreams; use http1, h2c (HTTP/2 without TLS, as most gRPC services) or h2 (HTTP/2 over TLS)"),
                    );
                    UpstreamProtocol::Http1
                }
            };
            if tls.is_some() && !matches!(protocol, UpstreamProtocol::H2 { .. }) {
                self.issue(
                    format!("{prefix}.upstream_tls"),
                    format!("is only used with upstream_protocol: h2, not {}; remove it or set upstream_protocol: h2", protocol.name()),
                );
            }
            if let Err(e) = Connector::new(&protocol) {
                self.issue(format!("{prefix}.upstream_tls"), e.to_string());
            }
            protocol
        })
    }

    pub(super) fn controller(
        &mut self,
        raw: RawController,
        static_upstreams: &[Vec<SocketAddr>; 2],
    ) -> ControllerConfig {
        let environments = self.environments(raw.app, &raw.environments, static_upstreams);
        let test = self.test(raw.test);
        let mut strategies = BTreeMap::new();
        for (name, s) in raw.strategies {
            if let Some(strategy) = self.user_strategy(&name, s) {
                strategies.insert(name, strategy);
            }
        }
        let r = raw.release;
        let strategy = match strategies.get(&r.strategy) {
            Some(s) => s.clone(),
            None => Strategy::preset(&r.strategy).unwrap_or_else(|e| {
                self.issue("release.strategy", e);
                Strategy::instant()
            }),
        };
        let default_pipeline = r.pipeline.is_none();
        let raw_pipeline = r.pipeline.unwrap_or_else(|| {
            ["deploy", "test", "switch", "cleanup"]
                .map(String::from)
                .to_vec()
        });
        let mut pipeline = self.pipeline(&raw_pipeline);
        let mirror = raw.mirror.map(|m| self.mirror(m));
        match &mirror {
            // Configured shadow traffic runs before the switch unless the pipeline says where.
            Some(_) if default_pipeline => {
                let switch = pipeline.iter().position(|s| *s == Stage::Switch).unwrap_or(0);
                pipeline.insert(switch, Stage::Mirror);
            }
            Some(spec) if !pipeline.contains(&Stage::Mirror) && !spec.beside_canary => self.issue(
                "mirror",
                "is configured but release.pipeline has no mirror stage; add mirror before switch, or set mirror.beside_canary: true",
            ),
            None if pipeline.contains(&Stage::Mirror) => self.issue(
                "release.pipeline",
                "has a mirror stage but no mirror: section says what to copy; add e.g. `mirror: { percent: 10, duration: 1m }`",
            ),
            _ => {}
        }
        let analysis = self.analysis(raw.analysis);
        let hooks = self.hooks(raw.hooks);
        let webhook = raw.webhook.and_then(|w| self.webhook(w));
        ControllerConfig {
            environments,
            test,
            strategy,
            strategies,
            analysis,
            monitor_window: r.monitor_window.0,
            scale_down_delay: r.scale_down_delay.0,
            hooks,
            webhook,
            pipeline,
            mirror,
        }
    }

    fn environments(
        &mut self,
        app: Option<RawApp>,
        raw: &BTreeMap<String, RawEnvironment>,
        static_upstreams: &[Vec<SocketAddr>; 2],
    ) -> [EnvironmentSpec; 2] {
        let Some(app) = app else {
            return self.fixed_environments(raw, static_upstreams);
        };
        let provider = match app.provider.as_str() {
            "process" => ProviderKind::Process,
            "static" => ProviderKind::Static,
            "command" => ProviderKind::Command,
            "docker" => ProviderKind::Docker,
            other => {
                self.issue(
                    "app.provider",
                    format!("unknown provider {other:?}; use process, static, command or docker"),
                );
                ProviderKind::Process
            }
        };
        if provider != ProviderKind::Docker {
            self.docker_keys_unused(&app);
        }
        let shared = SharedSpec {
            provider,
            ready_timeout: self.positive("app.ready_timeout", app.ready_timeout),
            stop_timeout: self.positive("app.stop_timeout", app.stop_timeout),
            app,
        };
        Color::ALL.map(|color| {
            let own = raw.get(color.as_str()).cloned().unwrap_or_default();
            self.environment(color, &shared, own, &static_upstreams[color.index()])
        })
    }

    /// No app: the environments' fixed upstreams (checked by the router part).
    fn fixed_environments(
        &mut self,
        raw: &BTreeMap<String, RawEnvironment>,
        static_upstreams: &[Vec<SocketAddr>; 2],
    ) -> [EnvironmentSpec; 2] {
        for color in Color::ALL {
            if raw
                .get(color.as_str())
                .is_some_and(|e| e.upstreams.is_none())
            {
                self.issue(
                    format!("environments.{color}.upstreams"),
                    "is required without an app section (the static provider); list host:port addresses, or add app: with a command",
                );
            }
        }
        Color::ALL.map(|color| EnvironmentSpec {
            color,
            provider: ProviderSpec::Static {
                upstreams: static_upstreams[color.index()].clone(),
            },
            instances: static_upstreams[color.index()].len() as u32,
            env: BTreeMap::new(),
            ready_timeout: default_ready_timeout().0,
            stop_timeout: default_stop_timeout().0,
            overrides: raw
                .get(color.as_str())
                .map(|_| vec!["upstreams".to_string()])
                .unwrap_or_default(),
        })
    }

    /// One color: the shared `app` with the color's own keys over it.
    fn environment(
        &mut self,
        color: Color,
        shared: &SharedSpec,
        own: RawEnvironment,
        static_upstreams: &[SocketAddr],
    ) -> EnvironmentSpec {
        let app = &shared.app;
        let at = |key: &str| format!("environments.{color}.{key}");
        let mut overrides = Vec::new();
        let instances = match own.instances {
            Some(n) => {
                overrides.push("instances".to_string());
                n
            }
            None => app.instances,
        };
        if !(1..=64).contains(&instances) {
            let key = if own.instances.is_some() {
                at("instances")
            } else {
                "app.instances".into()
            };
            self.issue(key, format!("{instances} is out of range; use 1 to 64"));
        }
        let mut env = app.env.clone();
        if let Some(extra) = &own.env {
            overrides.push("env".to_string());
            env.extend(extra.clone());
        }
        if own.command.is_some() {
            overrides.push("command".to_string());
        }
        let provider = match shared.provider {
            ProviderKind::Process => self.process_spec(color, app, &own, &env),
            ProviderKind::Static => {
                if static_upstreams.is_empty() && own.upstreams.is_none() {
                    self.issue(at("upstreams"), "is required for the static provider; list host:port addresses, e.g. [\"127.0.0.1:9001\"]");
                }
                ProviderSpec::Static {
                    upstreams: static_upstreams.to_vec(),
                }
            }
            ProviderKind::Command => self.command_spec(color, app, &own),
            ProviderKind::Docker => self.docker_spec(color, app, &own, &env, shared.stop_timeout),
        };
        EnvironmentSpec {
            color,
            provider,
            instances,
            env,
            ready_timeout: shared.ready_timeout,
            stop_timeout: shared.stop_timeout,
            overrides,
        }
    }

    /// The instance command: required, with `{port}`, and only known placeholders (in the
    /// command and in the environment).
    fn process_spec(
        &mut self,
        color: Color,
        app: &RawApp,
        own: &RawEnvironment,
        env: &BTreeMap<String, String>,
    ) -> ProviderSpec {
        let at = |key: &str| format!("environments.{color}.{key}");
        if own.upstreams.is_some() {
            self.issue(at("upstreams"), "the process provider picks the upstreams itself; remove it, or set app.provider: static");
        }
        let (command_key, command_text) = command_source(color, app, own);
        let Some(text) = command_text else {
            self.issue(
                command_key,
                "is required for the process provider; e.g. \"./my-app --listen 127.0.0.1:{port}\"",
            );
            return ProviderSpec::Process {
                command: Vec::new(),
            };
        };
        if !text.contains("{port}") {
            self.issue(&command_key, "has no {port}; the process provider starts each instance on a free port and passes it there, e.g. --listen 127.0.0.1:{port}");
        }
        self.placeholders(&command_key, &text);
        self.env_placeholders(color, own, env);
        let command = self.command_line(&command_key, &text).unwrap_or_default();
        ProviderSpec::Process { command }
    }

    /// Only known placeholders in the environment, each issue at the key that set the value.
    fn env_placeholders(
        &mut self,
        color: Color,
        own: &RawEnvironment,
        env: &BTreeMap<String, String>,
    ) {
        for (key, value) in env {
            let at_key = if own.env.as_ref().is_some_and(|e| e.contains_key(key)) {
                format!("environments.{color}.env.{key}")
            } else {
                format!("app.env.{key}")
            };
            self.placeholders(&at_key, value);
        }
    }

    /// The deploy and stop scripts: both required and executable.
    fn command_spec(&mut self, color: Color, app: &RawApp, own: &RawEnvironment) -> ProviderSpec {
        let pick = |key: &str, own: &Option<String>, shared: &Option<String>| match own {
            Some(text) => Some((format!("environments.{color}.{key}"), text.clone())),
            None => shared.clone().map(|text| (format!("app.{key}"), text)),
        };
        let deploy = match pick("deploy", &own.deploy, &app.deploy) {
            Some((key, text)) => self.executable(&key, &text),
            None => {
                self.issue("app.deploy", "is required for the command provider: a script that starts the version and prints host:port lines");
                None
            }
        };
        let stop = match pick("stop", &own.stop, &app.stop) {
            Some((key, text)) => self.executable(&key, &text),
            None => {
                self.issue(
                    "app.stop",
                    "is required for the command provider: a script that stops a color",
                );
                None
            }
        };
        ProviderSpec::Command {
            deploy: deploy.unwrap_or_default(),
            stop: stop.unwrap_or_default(),
        }
    }

    /// The docker provider's keys under another provider would be silently ignored: refused.
    fn docker_keys_unused(&mut self, app: &RawApp) {
        let given = [
            ("image", app.image.is_some()),
            ("port", app.port.is_some()),
            ("labels", app.labels.is_some()),
            ("volumes", app.volumes.is_some()),
            ("network", app.network.is_some()),
            ("reach", app.reach.is_some()),
            ("cpus", app.cpus.is_some()),
            ("memory", app.memory.is_some()),
            ("stop_grace", app.stop_grace.is_some()),
            ("pull", app.pull.is_some()),
            ("retain", app.retain.is_some()),
        ];
        for (key, _) in given.iter().filter(|(_, given)| *given) {
            self.issue(
                format!("app.{key}"),
                format!(
                    "only the docker provider uses it; set app.provider: docker, or remove app.{key}"
                ),
            );
        }
    }

    /// The image (a repository; the version is its tag) and how its containers run.
    fn docker_spec(
        &mut self,
        color: Color,
        app: &RawApp,
        own: &RawEnvironment,
        env: &BTreeMap<String, String>,
        stop_timeout: Duration,
    ) -> ProviderSpec {
        let at = |key: &str| format!("environments.{color}.{key}");
        if own.upstreams.is_some() {
            self.issue(at("upstreams"), "the docker provider publishes each container on a free local port and routes there; remove it, or set app.provider: static");
        }
        let image = self.docker_image(app);
        let port = app.port.unwrap_or(DEFAULT_CONTAINER_PORT);
        if port == 0 {
            self.issue(
                "app.port",
                "0 is not a port; give the port the app listens on inside the container, e.g. 8080",
            );
        }
        let command = self.docker_command(color, app, own, env);
        let labels = app.labels.clone().unwrap_or_default();
        for key in labels.keys().filter(|k| k.starts_with("bluegreen.")) {
            self.issue(
                format!("app.labels.{key}"),
                "bluegreen.* labels are bluegreen's own (service, color, version, release); use another prefix",
            );
        }
        let volumes = app
            .volumes
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, text)| self.volume(&format!("app.volumes[{i}]"), text))
            .collect();
        let network = app.network.clone();
        if let Some(mode @ ("host" | "none")) = network.as_deref() {
            self.issue(
                "app.network",
                format!("{mode:?} cannot be used: the router reaches each container at a published port or at its address on a bridge network; name a bridge network, or remove app.network"),
            );
        }
        let reach = self.reach(app);
        let memory = self.docker_resources(app);
        let stop_grace = match app.stop_grace {
            Some(grace) => grace.0,
            None => stop_timeout,
        };
        let pull = self.pull_policy(app);
        let retain = app.retain.unwrap_or(DEFAULT_RETAIN);
        if retain > 100 {
            self.issue(
                "app.retain",
                format!("{retain} is out of range; keep 0 to 100 versions' stopped containers"),
            );
        }
        ProviderSpec::Docker(DockerSpec {
            image,
            port,
            command,
            labels,
            volumes,
            network,
            reach,
            cpus: app.cpus,
            memory,
            stop_grace,
            pull,
            retain,
        })
    }

    /// The image repository, without a tag (each deploy runs `image:VERSION`).
    fn docker_image(&mut self, app: &RawApp) -> String {
        match app.image.as_deref().map(str::trim) {
            None | Some("") => {
                self.issue(
                    "app.image",
                    "is required for the docker provider: the image repository without a tag, e.g. registry.example/web (each deploy runs image:VERSION)",
                );
                String::new()
            }
            Some(image) => {
                if let Some(problem) = image_repository_problem(image) {
                    self.issue("app.image", problem);
                }
                image.to_string()
            }
        }
    }

    /// The container's command, if any (the image's own otherwise), with known placeholders
    /// in it and in the environment.
    fn docker_command(
        &mut self,
        color: Color,
        app: &RawApp,
        own: &RawEnvironment,
        env: &BTreeMap<String, String>,
    ) -> Vec<String> {
        let (command_key, command_text) = command_source(color, app, own);
        let command = match command_text {
            Some(text) => {
                self.placeholders(&command_key, &text);
                match shlex::split(&text) {
                    Some(argv) => argv,
                    None => {
                        self.issue(
                            &command_key,
                            format!("{text:?} is not a command line; check its quotes"),
                        );
                        Vec::new()
                    }
                }
            }
            None => Vec::new(),
        };
        self.env_placeholders(color, own, env);
        command
    }

    /// CPU and memory limits in range; returns the memory limit in bytes.
    fn docker_resources(&mut self, app: &RawApp) -> Option<u64> {
        if let Some(cpus) = app.cpus
            && !(cpus > 0.0 && cpus <= 1024.0)
        {
            self.issue(
                "app.cpus",
                format!(
                    "{cpus} is out of range; give the CPUs each container may use, e.g. 0.5 or 2"
                ),
            );
        }
        app.memory
            .as_deref()
            .and_then(|text| match parse_memory(text) {
                Ok(bytes) if bytes >= 6 * 1024 * 1024 => Some(bytes),
                Ok(_) => {
                    self.issue(
                        "app.memory",
                        format!(
                            "{text:?} is below the engine's minimum of 6m; give e.g. 256m or 1g"
                        ),
                    );
                    None
                }
                Err(e) => {
                    self.issue("app.memory", e);
                    None
                }
            })
    }

    /// `published` (the default) or `network`, which needs the network to reach them on.
    fn reach(&mut self, app: &RawApp) -> Reach {
        match app.reach.as_deref() {
            None | Some("published") => Reach::Published,
            Some("network") if app.network.is_none() => {
                self.issue(
                    "app.reach",
                    "network needs app.network: the user network bluegreen and the containers share (docker network create NAME; run bluegreen's container on it too)",
                );
                Reach::Network
            }
            Some("network") => Reach::Network,
            Some(other) => {
                self.issue(
                    "app.reach",
                    format!("unknown way {other:?}; use published (a port on 127.0.0.1, the default) or network (the container's address on app.network)"),
                );
                Reach::Published
            }
        }
    }

    fn pull_policy(&mut self, app: &RawApp) -> PullPolicy {
        match app.pull.as_deref() {
            None | Some("if-missing") => PullPolicy::IfMissing,
            Some("never") => PullPolicy::Never,
            Some("always") => PullPolicy::Always,
            Some(other) => {
                self.issue(
                    "app.pull",
                    format!("unknown policy {other:?}; use never (local images only), if-missing or always"),
                );
                PullPolicy::IfMissing
            }
        }
    }

    /// `source:target[:ro|rw]`: a host path (made absolute against the config's folder) or a
    /// named volume, mounted at an absolute path.
    fn volume(&mut self, key: &str, text: &str) -> Option<String> {
        let parts: Vec<&str> = text.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [source, target] => (*source, *target, None),
            [source, target, mode] => (*source, *target, Some(*mode)),
            _ => {
                self.issue(
                    key,
                    format!("{text:?} is not source:target[:ro]; e.g. ./data:/var/lib/app or cache:/cache:ro"),
                );
                return None;
            }
        };
        if source.is_empty() || !target.starts_with('/') {
            self.issue(
                key,
                format!("{text:?}: give a host path or volume name, then an absolute path in the container, e.g. ./data:/data"),
            );
            return None;
        }
        if let Some(mode) = mode
            && !matches!(mode, "ro" | "rw")
        {
            self.issue(
                key,
                format!("{text:?}: unknown mode {mode:?}; use ro or rw"),
            );
            return None;
        }
        // A source with a slash or a dot is a host path; a bare word names a volume.
        let source = if source.contains('/') || source.starts_with('.') {
            self.resolve(source).to_string_lossy().into_owned()
        } else {
            source.to_string()
        };
        Some(match mode {
            Some(mode) => format!("{source}:{target}:{mode}"),
            None => format!("{source}:{target}"),
        })
    }

    fn placeholders(&mut self, key: &str, text: &str) {
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let word = &rest[open..open + close + 1];
            if !PLACEHOLDERS.contains(&word) {
                self.issue(
                    key,
                    format!(
                        "unknown placeholder {word}; use {}",
                        PLACEHOLDERS.join(", ")
                    ),
                );
            }
            rest = &rest[open + close + 1..];
        }
    }

    fn test(&mut self, raw: RawTest) -> TestSpec {
        let mut checks = Vec::new();
        for (i, c) in raw.checks.into_iter().enumerate() {
            let at = |key: &str| format!("test.checks[{i}].{key}");
            if !c.path.starts_with('/') {
                self.issue(
                    at("path"),
                    format!("{:?} must start with /, e.g. /healthz", c.path),
                );
            }
            let method = c
                .method
                .to_ascii_uppercase()
                .parse::<http::Method>()
                .unwrap_or_else(|_| {
                    self.issue(
                        at("method"),
                        format!("{:?} is not an HTTP method; e.g. GET", c.method),
                    );
                    http::Method::GET
                });
            if !(100..=599).contains(&c.status) {
                self.issue(
                    at("status"),
                    format!("{} is not an HTTP status; use 100 to 599", c.status),
                );
            }
            checks.push(Check {
                method,
                path: c.path,
                status: c.status,
                body_contains: c.body_contains,
                max_latency: c.max_latency.map(|d| d.0),
            });
        }
        let command = raw
            .command
            .as_deref()
            .and_then(|text| self.executable("test.command", text));
        let timeout = self.positive("test.timeout", raw.timeout);
        TestSpec {
            checks,
            command,
            timeout,
        }
    }

    fn user_strategy(&mut self, name: &str, raw: RawStrategy) -> Option<Strategy> {
        let at = |key: &str| format!("strategies.{name}.{key}");
        let hold = |this: &mut Self, key: &str, text: Option<&String>| -> Option<Hold> {
            match text.map(String::as_str) {
                None => {
                    this.issue(at(key), "is required; give a duration like 1m, or manual to wait for `bluegreen promote`");
                    None
                }
                Some("manual") => Some(Hold::UntilPromoted),
                Some(text) => match crate::duration::parse(text) {
                    Ok(d) => Some(Hold::For(d)),
                    Err(e) => {
                        this.issue(at(key), format!("{e}, or manual"));
                        None
                    }
                },
            }
        };
        let result = match raw.kind.as_str() {
            "canary" => {
                let Some(steps) = raw.steps.as_ref().filter(|s| !s.is_empty()) else {
                    self.issue(
                        at("steps"),
                        "is required for a canary: the percents to hold at, e.g. [10, 50]",
                    );
                    return None;
                };
                let hold = hold(self, "wait", raw.wait.as_ref())?;
                Strategy::canary(name, steps, hold).map_err(|e| (at("steps"), e))
            }
            "linear" => {
                let Some(step) = raw.step else {
                    self.issue(
                        at("step"),
                        "is required for linear: the percent added each time, e.g. 10",
                    );
                    return None;
                };
                let hold = hold(self, "every", raw.every.as_ref())?;
                Strategy::linear(name, step, hold).map_err(|e| (at("step"), e))
            }
            "instant" => Ok(Strategy {
                name: name.into(),
                ..Strategy::instant()
            }),
            other => Err((
                at("type"),
                format!("unknown type {other:?}; use canary, linear or instant"),
            )),
        };
        result
            .map_err(|(key, message)| self.issue(key, message))
            .ok()
    }

    fn pipeline(&mut self, raw: &[String]) -> Vec<Stage> {
        let mut stages = Vec::new();
        for (i, text) in raw.iter().enumerate() {
            let key = format!("release.pipeline[{i}]");
            let stage = match text.as_str() {
                "deploy" | "deploy_green" | "deploy_idle" => Stage::Deploy,
                "test" | "test_green" | "test_idle" => Stage::Test,
                "switch" | "switch_traffic" => Stage::Switch,
                "mirror" => Stage::Mirror,
                "cleanup" | "cleanup_blue" | "cleanup_old" => Stage::Cleanup,
                other => match other.strip_prefix("run ") {
                    Some(command) => match self.executable(&key, command.trim()) {
                        Some(argv) => Stage::Run {
                            name: Path::new(&argv[0])
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_else(|| argv[0].clone()),
                            argv,
                        },
                        None => continue,
                    },
                    None => {
                        self.issue(key, format!("unknown stage {other:?}; use deploy, test, mirror, switch, cleanup (the seed's deploy_green, test_green, switch_traffic, cleanup_blue also work) or \"run ./script\""));
                        continue;
                    }
                },
            };
            if stages.contains(&stage) && !matches!(stage, Stage::Run { .. }) {
                self.issue(key, format!("stage {} is listed twice", stage.name()));
                continue;
            }
            stages.push(stage);
        }
        let position = |stages: &[Stage], wanted: &Stage| stages.iter().position(|s| s == wanted);
        match position(&stages, &Stage::Switch) {
            None => self.issue(
                "release.pipeline",
                "has no switch stage; a release must move traffic, e.g. [deploy, test, switch, cleanup]",
            ),
            Some(switch) => {
                for (before, name) in [
                    (Stage::Deploy, "deploy"),
                    (Stage::Test, "test"),
                    (Stage::Mirror, "mirror"),
                ] {
                    if position(&stages, &before).is_some_and(|p| p > switch) {
                        self.issue("release.pipeline", format!("{name} must come before switch"));
                    }
                }
                if position(&stages, &Stage::Cleanup).is_some_and(|p| p < switch) {
                    self.issue("release.pipeline", "cleanup must come after switch");
                }
                if position(&stages, &Stage::Test).is_some_and(|t| {
                    position(&stages, &Stage::Deploy).is_some_and(|d| d > t)
                }) {
                    self.issue("release.pipeline", "test must come after deploy");
                }
                if position(&stages, &Stage::Mirror).is_some_and(|m| {
                    position(&stages, &Stage::Deploy).is_some_and(|d| d > m)
                }) {
                    self.issue("release.pipeline", "mirror must come after deploy");
                }
            }
        }
        stages
    }

    fn analysis(&mut self, raw: RawAnalysis) -> AnalysisSpec {
        let interval = self.positive("analysis.interval", raw.interval);
        let percent = |this: &mut Self, key: &str, value: Option<f64>| {
            if let Some(v) = value
                && !(0.0..=100.0).contains(&v)
            {
                this.issue(
                    key,
                    format!("{v} is out of range; give a percent from 0 to 100"),
                );
            }
            value
        };
        let error_rate = Limit {
            max: percent(
                self,
                "analysis.error_rate.max_percent",
                raw.error_rate.max_percent,
            ),
            max_increase: percent(
                self,
                "analysis.error_rate.max_increase_percent",
                raw.error_rate.max_increase_percent,
            ),
        };
        let ms = |d: Option<HumanDuration>| d.map(|d| d.0.as_secs_f64() * 1000.0);
        let latency = |l: &RawLimit| Limit {
            max: ms(l.max),
            max_increase: ms(l.max_increase),
        };
        if let Some(ratio) = raw.throughput.min_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            self.issue(
                "analysis.throughput.min_ratio",
                format!("{ratio} is out of range; give a ratio from 0 to 1, e.g. 0.5"),
            );
        }
        let wait_for_data = match raw.on_too_few_requests.as_str() {
            "wait" => true,
            "proceed" => false,
            other => {
                self.issue(
                    "analysis.on_too_few_requests",
                    format!(
                        "unknown choice {other:?}; use wait (hold the step until judged) or proceed"
                    ),
                );
                true
            }
        };
        AnalysisSpec {
            interval,
            min_requests: raw.min_requests,
            wait_for_data,
            error_rate,
            latency_p50: latency(&raw.latency_p50),
            latency_p95: latency(&raw.latency_p95),
            latency_p99: latency(&raw.latency_p99),
            min_throughput_ratio: raw.throughput.min_ratio,
            mirror_mismatch_rate: percent(
                self,
                "analysis.mirror_mismatch_rate.max_percent",
                raw.mirror_mismatch_rate.max_percent,
            ),
            mirror_latency_p99: latency(&raw.mirror_latency_p99),
        }
    }

    fn hooks(&mut self, raw: RawHooks) -> Hooks {
        let mut commands = BTreeMap::new();
        for (point, text) in [
            (HookPoint::PreDeploy, &raw.pre_deploy),
            (HookPoint::PostDeploy, &raw.post_deploy),
            (HookPoint::MigrateExpand, &raw.migrate_expand),
            (HookPoint::PreSwitch, &raw.pre_switch),
            (HookPoint::PostSwitch, &raw.post_switch),
            (HookPoint::OnRollback, &raw.on_rollback),
            (HookPoint::Cleanup, &raw.cleanup),
            (HookPoint::MigrateContract, &raw.migrate_contract),
            (HookPoint::MigrateRollback, &raw.migrate_rollback),
        ] {
            if let Some(text) = text
                && let Some(argv) = self.executable(&format!("hooks.{}", point.as_str()), text)
            {
                commands.insert(point, argv);
            }
        }
        let timeout = match raw.timeout {
            Some(t) => self.positive("hooks.timeout", t),
            None => Duration::from_secs(300),
        };
        Hooks { commands, timeout }
    }

    fn webhook(&mut self, raw: RawWebhook) -> Option<Webhook> {
        let timeout = self.positive("webhook.timeout", raw.timeout);
        let uri: http::Uri = match raw.url.parse() {
            Ok(uri) => uri,
            Err(e) => {
                self.issue("webhook.url", format!("{:?} is not a URL: {e}", raw.url));
                return None;
            }
        };
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                self.issue(
                    "webhook.url",
                    format!("{:?}: give an http:// or https:// URL", raw.url),
                );
                return None;
            }
        };
        let Some(host) = uri.host().map(str::to_string) else {
            self.issue("webhook.url", format!("{:?} has no host", raw.url));
            return None;
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = match parse_socket_addr(&format!("{host}:{port}")) {
            Ok(addr) => addr,
            Err(e) => {
                self.issue("webhook.url", e);
                return None;
            }
        };
        if raw.ca_file.is_some() && !https {
            self.issue(
                "webhook.ca_file",
                "only used with an https:// url; remove it or use https",
            );
        }
        let tls = if https {
            self.webhook_tls(&host, raw.ca_file.as_deref())
        } else {
            None
        };
        Some(Webhook {
            url: uri,
            addr,
            timeout,
            tls,
        })
    }

    /// A TLS client that trusts Mozilla's roots and the certificates in `ca_file`.
    fn webhook_tls(
        &mut self,
        host: &str,
        ca_file: Option<&str>,
    ) -> Option<crate::transport::TlsClient> {
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(file) = ca_file {
            let path = self.resolve(file);
            let certs = std::fs::File::open(&path)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    rustls_pemfile::certs(&mut std::io::BufReader::new(f))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| e.to_string())
                });
            match certs {
                Ok(certs) if !certs.is_empty() => {
                    for cert in certs {
                        if let Err(e) = roots.add(cert) {
                            self.issue("webhook.ca_file", format!("{}: {e}", path.display()));
                        }
                    }
                }
                Ok(_) => self.issue(
                    "webhook.ca_file",
                    format!("{} holds no PEM certificate", path.display()),
                ),
                Err(e) => self.issue(
                    "webhook.ca_file",
                    format!("cannot read {}: {e}", path.display()),
                ),
            }
        }
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let name = match rustls::pki_types::ServerName::try_from(bare) {
            Ok(name) => name,
            Err(e) => {
                self.issue(
                    "webhook.url",
                    format!("{host:?} is not a TLS server name: {e}"),
                );
                return None;
            }
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(builder) => Some((
                std::sync::Arc::new(builder.with_root_certificates(roots).with_no_client_auth()),
                name,
            )),
            Err(e) => {
                self.issue("webhook.url", format!("TLS: {e}"));
                None
            }
        }
    }
}

/// Why `version` cannot be an image tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`), if it cannot.
pub fn image_tag_problem(version: &str) -> Option<String> {
    let mut chars = version.chars();
    let valid = version.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    (!valid).then(|| {
        format!(
            "version {version:?} is not a valid image tag (letters, digits, _ . - up to 128 characters, not starting with . or -); the docker provider runs image:VERSION"
        )
    })
}

/// Why `image` is not an image repository to add a tag to, if it is not.
fn image_repository_problem(image: &str) -> Option<String> {
    if image.contains('@') {
        return Some(format!(
            "{image:?} has a digest; give the repository only, e.g. registry.example/web (the version is the tag)"
        ));
    }
    let (registry, path) = match image.split_once('/') {
        // A first part with a dot, a colon or "localhost" is a registry host[:port].
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (Some(first), rest)
        }
        _ => (None, image),
    };
    if path.contains(':') {
        return Some(format!(
            "{image:?} has a tag; give the repository only, e.g. {}: each deploy runs image:VERSION",
            image
                .rsplit_once(':')
                .map_or(image, |(repository, _)| repository)
        ));
    }
    let component_ok = |part: &str| {
        !part.is_empty()
            && part.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
            && part.starts_with(|c: char| c.is_ascii_alphanumeric())
            && part.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    let registry_ok = registry.is_none_or(|r| {
        !r.is_empty()
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
    });
    if !registry_ok || !path.split('/').all(component_ok) {
        return Some(format!(
            "{image:?} is not an image repository; use lowercase letters, digits and . _ - between slashes, e.g. registry.example/team/web"
        ));
    }
    None
}

/// A byte size as the engine takes it: a number with an optional b, k, m or g (1024-based).
fn parse_memory(text: &str) -> Result<u64, String> {
    let trimmed = text.trim().to_ascii_lowercase();
    let (digits, unit) = match trimmed.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => trimmed.split_at(at),
        None => (trimmed.as_str(), ""),
    };
    let factor: u64 = match unit {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => 0,
    };
    match digits.parse::<u64>() {
        Ok(n) if factor > 0 => n
            .checked_mul(factor)
            .ok_or_else(|| format!("{text:?} is too large")),
        _ => Err(format!(
            "{text:?} is not a size; give a number with k, m or g, e.g. 256m or 1g"
        )),
    }
}

/// Finds a program as `execve` would: a path as given, a bare name on `PATH`.
pub fn find_executable(program: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return match std::fs::metadata(&path) {
            Err(e) => Err(format!(
                "{program}: {e}; give the path of an executable file"
            )),
            Ok(_) if !is_executable(&path) => Err(format!(
                "{program} is not executable; run chmod +x {program}"
            )),
            Ok(_) => Ok(path),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("{program} is not on PATH; give its full path"))
}
