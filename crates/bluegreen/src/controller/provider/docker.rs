//! The docker provider: N containers of `image:version` through the Docker Engine API, reached on 127.0.0.1 or on a user network, found again by their labels.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bluegreen_router::Color;
use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, HostConfig, PortBinding,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::{StreamExt, stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::supervisor::free_ports;
use super::{DeployRequest, InstanceEvent, LogLine, LogLines, Provider, Started, StopRequest};
use crate::config::controller::{DockerSpec, ProviderSpec, PullPolicy, Reach, image_tag_problem};
use crate::store::{ContainerRecord, EnvironmentRecord, ProviderState};

/// The labels every container bluegreen creates carries: how it finds them again.
pub const LABEL_SERVICE: &str = "bluegreen.service";
pub const LABEL_COLOR: &str = "bluegreen.color";
pub const LABEL_VERSION: &str = "bluegreen.version";
pub const LABEL_RELEASE: &str = "bluegreen.release";
/// When bluegreen created the container, in milliseconds since the epoch: the engine's own
/// `Created` has whole seconds, too coarse to order versions created in the same second.
const LABEL_CREATED: &str = "bluegreen.created_ms";
/// A digest of everything the container was created with: a stopped container is reused
/// only when the config that would create it anew is the same.
const LABEL_CONFIG: &str = "bluegreen.config";

/// How often a color's containers are checked for having stopped by themselves.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Log lines quoted when a container exits on its own.
const EXIT_LOG_LINES: usize = 20;

/// The containers of one color that the provider runs now, and their watcher.
struct Current {
    generation: u64,
    cancel: CancellationToken,
    /// (id, name) of each container.
    containers: Vec<(String, String)>,
}

pub struct DockerProvider {
    service: String,
    /// Connected on first use: the daemon starts (and serves the live color) without an engine.
    engine: tokio::sync::Mutex<Option<Docker>>,
    current: Mutex<[Option<Current>; 2]>,
    events_out: mpsc::UnboundedSender<InstanceEvent>,
    events: Mutex<Option<mpsc::UnboundedReceiver<InstanceEvent>>>,
    next_generation: AtomicU64,
}

/// The docker provider's part of a color's spec.
fn docker_spec(spec: &ProviderSpec) -> Result<&DockerSpec, String> {
    match spec {
        ProviderSpec::Docker(docker) => Ok(docker),
        _ => Err("the docker provider needs app.image".into()),
    }
}

impl DockerSpec {
    /// Seconds the engine waits after SIGTERM before SIGKILL.
    fn grace_seconds(&self) -> i32 {
        self.stop_grace.as_secs().clamp(1, i32::MAX as u64) as i32
    }
}

/// The engine at `DOCKER_HOST` or the local socket, its API version negotiated (an older
/// engine refuses a newer client's version).
pub async fn connect_engine() -> Result<Docker, String> {
    let cannot_reach = |e: EngineError| {
        format!(
            "cannot reach the Docker Engine ({}): {e}; start it, or point DOCKER_HOST at its socket (podman's `podman system service` offers the same API)",
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
        )
    };
    Docker::connect_with_local_defaults()
        .map_err(cannot_reach)?
        .negotiate_version()
        .await
        .map_err(cannot_reach)
}

/// `<service>-<color>-<version>-<n>`, n from 1.
fn container_name(service: &str, color: Color, version: &str, n: usize) -> String {
    format!("{service}-{color}-{version}-{n}")
}

/// FNV-1a: a digest that stays the same across builds and Rust versions (unlike `DefaultHasher`),
/// so a restarted or upgraded daemon still recognises the containers it created.
fn fnv1a(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

fn is_missing(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Stopping a container that is gone (404) or stopped already (304) is done.
fn gone_or_stopped(error: &EngineError) -> bool {
    matches!(
        error,
        EngineError::DockerResponseServerError {
            status_code: 304 | 404,
            ..
        }
    )
}

fn state_of(summary: &ContainerSummary) -> String {
    summary
        .state
        .map(|s| s.to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn label<'a>(summary: &'a ContainerSummary, key: &str) -> Option<&'a str> {
    summary.labels.as_ref()?.get(key).map(String::as_str)
}

fn name_of(summary: &ContainerSummary) -> String {
    summary
        .names
        .iter()
        .flatten()
        .next()
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default()
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

impl DockerProvider {
    pub fn new(service: &str) -> DockerProvider {
        let (events_out, receiver) = mpsc::unbounded_channel();
        DockerProvider {
            service: service.to_string(),
            engine: tokio::sync::Mutex::new(None),
            current: Mutex::new([None, None]),
            events_out,
            events: Mutex::new(Some(receiver)),
            next_generation: AtomicU64::new(1),
        }
    }

    /// The engine, connected once.
    async fn engine(&self) -> Result<Docker, String> {
        let mut engine = self.engine.lock().await;
        if let Some(docker) = engine.as_ref() {
            return Ok(docker.clone());
        }
        let docker = connect_engine().await?;
        *engine = Some(docker.clone());
        Ok(docker)
    }

    /// This service's containers, stopped ones too, that carry every label in `labels`.
    async fn list(
        &self,
        docker: &Docker,
        labels: &[(&str, &str)],
    ) -> Result<Vec<ContainerSummary>, String> {
        let mut wanted = vec![format!("{LABEL_SERVICE}={}", self.service)];
        wanted.extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
        let filters = HashMap::from([("label".to_string(), wanted)]);
        docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(|e| format!("cannot list containers: {e}"))
    }

    /// Ends the watcher of `color`'s containers and forgets them; returns them.
    fn release(&self, color: Color) -> Vec<(String, String)> {
        let current = self.current.lock().expect("lock")[color.index()].take();
        current
            .map(|c| {
                c.cancel.cancel();
                c.containers
            })
            .unwrap_or_default()
    }

    /// Makes `containers` the color's current ones and watches them for exiting by themselves.
    fn watch(&self, color: Color, docker: Docker, containers: Vec<(String, String)>) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        tokio::spawn(watch_containers(
            docker,
            color,
            generation,
            containers.clone(),
            cancel.clone(),
            self.events_out.clone(),
        ));
        let previous = self.current.lock().expect("lock")[color.index()].replace(Current {
            generation,
            cancel,
            containers,
        });
        if let Some(previous) = previous {
            previous.cancel.cancel();
        }
    }

    /// The image as `pull` wants it: local only, pulled when missing, or pulled every time.
    async fn ensure_image(
        &self,
        docker: &Docker,
        image: &str,
        version: &str,
        pull: PullPolicy,
    ) -> Result<(), String> {
        let reference = format!("{image}:{version}");
        if pull != PullPolicy::Always {
            match docker.inspect_image(&reference).await {
                Ok(_) => return Ok(()),
                Err(e) if is_missing(&e) => {
                    if pull == PullPolicy::Never {
                        return Err(format!(
                            "image {reference} is not on the engine and app.pull is never; build or load it first (e.g. docker build -t {reference} .), or set app.pull: if-missing"
                        ));
                    }
                }
                Err(e) => return Err(format!("cannot inspect image {reference}: {e}")),
            }
        }
        let mut pulling = std::pin::pin!(
            docker.create_image(
                Some(
                    CreateImageOptionsBuilder::default()
                        .from_image(image)
                        .tag(version)
                        .build(),
                ),
                None,
                None,
            )
        );
        while let Some(progress) = pulling.next().await {
            progress.map_err(|e| {
                format!("cannot pull {reference} (app.pull is {pull:?}): {e}; push it to a registry the engine reaches, or build it locally and set app.pull: never")
            })?;
        }
        Ok(())
    }

    /// Stops this color's running containers: they stay, stopped, for a rollback (until
    /// [`DockerProvider::prune`] removes them).
    async fn stop_running(&self, docker: &Docker, color: Color, grace: i32) -> Result<(), String> {
        let running = self
            .list(docker, &[(LABEL_COLOR, color.as_str())])
            .await?
            .into_iter()
            .filter(|c| state_of(c) == "running");
        for container in running {
            let id = container.id.clone().unwrap_or_default();
            docker
                .stop_container(
                    &id,
                    Some(StopContainerOptionsBuilder::default().t(grace).build()),
                )
                .await
                .or_else(|e| if gone_or_stopped(&e) { Ok(()) } else { Err(e) })
                .map_err(|e| format!("cannot stop container {}: {e}", name_of(&container)))?;
        }
        Ok(())
    }

    /// Keeps the stopped containers of the `retain` newest versions (for rollbacks that start
    /// them again) and removes older ones. Running containers are never touched.
    async fn prune(&self, docker: &Docker, retain: u32) -> Result<Vec<String>, String> {
        let all = self.list(docker, &[]).await?;
        let running: Vec<&str> = all
            .iter()
            .filter(|c| state_of(c) == "running")
            .filter_map(|c| label(c, LABEL_VERSION))
            .collect();
        // Newest first: a version's age is its newest container's.
        let mut versions: Vec<(i64, &str)> = Vec::new();
        for container in all.iter().filter(|c| state_of(c) != "running") {
            let Some(version) = label(container, LABEL_VERSION) else {
                continue;
            };
            if running.contains(&version) {
                continue;
            }
            let created = label(container, LABEL_CREATED)
                .and_then(|ms| ms.parse().ok())
                .unwrap_or_else(|| container.created.unwrap_or(0) * 1000);
            match versions.iter_mut().find(|(_, v)| *v == version) {
                Some(entry) => entry.0 = entry.0.max(created),
                None => versions.push((created, version)),
            }
        }
        versions.sort_by(|a, b| b.cmp(a));
        let removed_versions: Vec<&str> = versions
            .iter()
            .skip(retain as usize)
            .map(|(_, v)| *v)
            .collect();
        let mut removed = Vec::new();
        for container in all.iter().filter(|c| {
            state_of(c) != "running"
                && label(c, LABEL_VERSION).is_some_and(|v| removed_versions.contains(&v))
        }) {
            let id = container.id.clone().unwrap_or_default();
            remove(docker, &id)
                .await
                .map_err(|e| format!("cannot remove container {}: {e}", name_of(container)))?;
            removed.push(name_of(container));
        }
        Ok(removed)
    }

    /// The container body for instance `n` of the request's version.
    fn container_body(
        &self,
        request: &DeployRequest,
        spec: &DockerSpec,
        host_port: u16,
    ) -> ContainerCreateBody {
        let (color, version) = (request.color, request.version.as_str());
        let fill = |text: &str| {
            text.replace("{port}", &spec.port.to_string())
                .replace("{version}", version)
                .replace("{color}", color.as_str())
        };
        let mut env: BTreeMap<String, String> = request
            .spec
            .env
            .iter()
            .chain(request.extra_env.iter())
            .map(|(k, v)| (k.clone(), fill(v)))
            .collect();
        env.insert("PORT".into(), spec.port.to_string());
        env.insert("BLUEGREEN_SERVICE".into(), self.service.clone());
        env.insert("BLUEGREEN_COLOR".into(), color.to_string());
        env.insert("BLUEGREEN_VERSION".into(), version.to_string());
        let command: Vec<String> = spec.command.iter().map(|a| fill(a)).collect();
        let port_key = format!("{}/tcp", spec.port);
        let published = HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(host_port.to_string()),
            }]),
        )]);
        let host_config = HostConfig {
            port_bindings: (spec.reach == Reach::Published).then_some(published),
            binds: (!spec.volumes.is_empty()).then(|| spec.volumes.to_vec()),
            network_mode: spec.network.clone(),
            nano_cpus: spec.cpus.map(|cpus| (cpus * 1e9) as i64),
            memory: spec.memory.map(|bytes| bytes as i64),
            ..Default::default()
        };
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let image = format!("{}:{version}", spec.image);
        // Everything that shapes the container, so a config change is never hidden by reuse.
        let digest = fnv1a(&format!(
            "{image}\n{command:?}\n{env:?}\n{port_key}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}{}",
            spec.volumes,
            spec.network,
            spec.cpus,
            spec.memory,
            spec.labels,
            // Appended only when not the default, so digests of earlier containers still match.
            if spec.reach == Reach::Network {
                "\nreach: network"
            } else {
                ""
            }
        ));
        let mut labels: HashMap<String, String> = spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_SERVICE.into(), self.service.clone());
        labels.insert(LABEL_COLOR.into(), color.to_string());
        labels.insert(LABEL_VERSION.into(), version.to_string());
        labels.insert(
            LABEL_RELEASE.into(),
            request
                .facts
                .release_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        );
        labels.insert(LABEL_CONFIG.into(), digest);
        labels.insert(LABEL_CREATED.into(), crate::store::now_ms().to_string());
        ContainerCreateBody {
            image: Some(image),
            cmd: (!command.is_empty()).then_some(command),
            env: Some(env),
            labels: Some(labels),
            exposed_ports: Some(vec![port_key]),
            stop_timeout: Some(i64::from(spec.grace_seconds())),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Starts again this color's retained (stopped) containers of the version, when there are
    /// exactly as many as wanted and they were created from the same config. Returns them
    /// (with their ports), or `None` when new ones must be created.
    async fn restart_retained(
        &self,
        docker: &Docker,
        request: &DeployRequest,
        spec: &DockerSpec,
        bodies: &[ContainerCreateBody],
        existing: &[ContainerSummary],
    ) -> Option<Vec<ContainerRecord>> {
        let digest = |body: &ContainerCreateBody| {
            body.labels
                .as_ref()
                .and_then(|l| l.get(LABEL_CONFIG).cloned())
        };
        let mut retained = Vec::new();
        for (slot, body) in bodies.iter().enumerate() {
            let name = container_name(&self.service, request.color, &request.version, slot + 1);
            let found = existing.iter().find(|c| name_of(c) == name)?;
            let reusable = state_of(found) != "running"
                && label(found, LABEL_CONFIG).map(str::to_string) == digest(body);
            if !reusable {
                return None;
            }
            retained.push((found.id.clone().unwrap_or_default(), name));
        }
        let mut records = Vec::new();
        for (id, name) in &retained {
            if docker.start_container(id, None).await.is_err() {
                return None;
            }
            let inspected = docker.inspect_container(id, None).await.ok()?;
            let (host_port, address) = reached_at(&inspected, spec).ok()?;
            records.push(ContainerRecord {
                id: id.clone(),
                name: name.clone(),
                host_port,
                address,
                state: "running".into(),
            });
        }
        Some(records)
    }
}

/// Removes a container (and its anonymous volumes); one already gone is fine.
async fn remove(docker: &Docker, id: &str) -> Result<(), EngineError> {
    docker
        .remove_container(
            id,
            Some(
                RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build(),
            ),
        )
        .await
        .or_else(|e| if is_missing(&e) { Ok(()) } else { Err(e) })
}

/// The newest `lines` lines a container wrote (stdout and stderr, interleaved as written).
async fn tail(docker: &Docker, id: &str, lines: usize) -> Vec<String> {
    let mut output = std::pin::pin!(
        docker.logs(
            id,
            Some(
                LogsOptionsBuilder::default()
                    .stdout(true)
                    .stderr(true)
                    .tail(&lines.to_string())
                    .build(),
            ),
        )
    );
    let mut text = String::new();
    while let Some(chunk) = output.next().await {
        match chunk {
            Ok(chunk) => text.push_str(&chunk.to_string()),
            Err(e) => {
                text.push_str(&format!("(cannot read the logs: {e})\n"));
                break;
            }
        }
    }
    text.lines().map(str::to_string).collect()
}

/// Polls a color's containers; the first one found stopped (it exited or was killed outside
/// bluegreen) is reported with its exit code and last log lines, which fails the color.
async fn watch_containers(
    docker: Docker,
    color: Color,
    generation: u64,
    containers: Vec<(String, String)>,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<InstanceEvent>,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
        for (id, name) in &containers {
            let (state, exit_code) = match docker.inspect_container(id, None).await {
                Ok(inspected) => {
                    let state = inspected.state.unwrap_or_default();
                    let status = state
                        .status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "unknown".into());
                    if matches!(status.as_str(), "running" | "created" | "restarting") {
                        continue;
                    }
                    (status, state.exit_code)
                }
                Err(e) if is_missing(&e) => ("removed".to_string(), None),
                // The engine is briefly unreachable: nothing is known to have stopped.
                Err(_) => continue,
            };
            if cancel.is_cancelled() {
                return; // stopped by bluegreen itself meanwhile
            }
            let lines = tail(&docker, id, EXIT_LOG_LINES).await;
            let code = exit_code
                .map(|c| format!(" with code {c}"))
                .unwrap_or_default();
            let logs = if lines.is_empty() {
                "it wrote no log lines".to_string()
            } else {
                format!("its last log lines: {}", lines.join(" | "))
            };
            let _ = events.send(InstanceEvent::ContainerExited {
                color,
                generation,
                id: id.clone(),
                state: state.clone(),
                reason: match state.as_str() {
                    "removed" => format!("container {name} ({}) was removed; {logs}", short(id)),
                    "exited" => format!("container {name} ({}) exited{code}; {logs}", short(id)),
                    other => format!("container {name} ({}) is {other}{code}; {logs}", short(id)),
                },
            });
            return;
        }
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn check_version(&self, version: &str) -> Result<(), String> {
        match image_tag_problem(version) {
            Some(problem) => Err(problem),
            None => Ok(()),
        }
    }

    /// A name and a free host port per container (none with `app.reach: network`), recorded
    /// before anything is created.
    fn prepare(&self, request: &DeployRequest) -> Result<ProviderState, String> {
        let count = request.spec.instances as usize;
        let host_ports = match docker_spec(&request.spec.provider)?.reach {
            Reach::Published => free_ports(count).map_err(|e| format!("no free port: {e}"))?,
            Reach::Network => vec![0; count],
        };
        let containers = host_ports
            .into_iter()
            .zip(1..)
            .map(|(host_port, n)| ContainerRecord {
                id: String::new(),
                name: container_name(&self.service, request.color, &request.version, n),
                host_port,
                address: None,
                state: "creating".into(),
            })
            .collect();
        Ok(ProviderState::Docker { containers })
    }

    async fn start(
        &self,
        request: &DeployRequest,
        prepared: &ProviderState,
    ) -> Result<Started, String> {
        let spec = docker_spec(&request.spec.provider)?;
        let docker = self.engine().await?;
        let color = request.color;
        // First, so a missing image fails the deploy before anything is stopped.
        self.ensure_image(&docker, &spec.image, &request.version, spec.pull)
            .await?;
        self.release(color);
        // Listed before anything stops: only containers stopped already count as retained.
        let existing = self
            .list(
                &docker,
                &[
                    (LABEL_COLOR, color.as_str()),
                    (LABEL_VERSION, &request.version),
                ],
            )
            .await?;
        self.stop_running(&docker, color, spec.grace_seconds())
            .await?;
        let planned = prepared.containers();
        let bodies: Vec<ContainerCreateBody> = planned
            .iter()
            .map(|c| self.container_body(request, spec, c.host_port))
            .collect();
        if let Some(records) = self
            .restart_retained(&docker, request, spec, &bodies, &existing)
            .await
        {
            let names: Vec<String> = records
                .iter()
                .map(|r| format!("{} ({})", r.name, short(&r.id)))
                .collect();
            self.watch(
                color,
                docker,
                records
                    .iter()
                    .map(|r| (r.id.clone(), r.name.clone()))
                    .collect(),
            );
            let note = format!(
                "started the retained stopped container(s) {} again instead of creating new ones",
                names.join(", ")
            );
            return Ok(started(records, Some(note)));
        }
        // Same names from an earlier deploy of this version: replaced.
        for container in &existing {
            remove(&docker, container.id.as_deref().unwrap_or_default())
                .await
                .map_err(|e| format!("cannot remove container {}: {e}", name_of(container)))?;
        }
        let (records, created, outcome) = create_and_start(&docker, spec, planned, bodies).await;
        // Watched (and so removed by `abandon`) even when one failed to start.
        self.watch(color, docker, created);
        outcome?;
        Ok(started(records, None))
    }

    /// Stops the color's containers (kept for rollbacks) and prunes versions beyond `retain`.
    async fn stop(&self, request: &StopRequest) -> Result<(), String> {
        let spec = docker_spec(&request.spec.provider)?;
        self.release(request.color);
        let docker = self.engine().await?;
        self.stop_running(&docker, request.color, spec.grace_seconds())
            .await?;
        let removed = self.prune(&docker, spec.retain).await?;
        if !removed.is_empty() {
            tracing::info!(
                removed = removed.join(", "),
                retain = spec.retain,
                "removed stopped containers of versions beyond app.retain"
            );
        }
        Ok(())
    }

    /// A deploy that did not finish: its containers never proved healthy, so they are removed.
    async fn abandon(&self, color: Color) {
        let containers = self.release(color);
        if containers.is_empty() {
            return;
        }
        let Ok(docker) = self.engine().await else {
            return;
        };
        for (id, name) in containers {
            if let Err(e) = remove(&docker, &id).await {
                tracing::warn!(container = name, error = %e, "cannot remove an abandoned container");
            }
        }
    }

    /// Takes over the recorded containers as they run (never restarted); a stopped one is
    /// started again. Found by name and checked by labels, so a record without ids (a daemon
    /// killed between create and record) still finds them.
    async fn adopt(
        &self,
        request: &DeployRequest,
        record: &EnvironmentRecord,
    ) -> Result<Option<String>, String> {
        let recorded = record.provider.containers();
        if recorded.is_empty() {
            return Ok(None);
        }
        let docker = self.engine().await?;
        let color = request.color;
        let found = self
            .list(
                &docker,
                &[
                    (LABEL_COLOR, color.as_str()),
                    (LABEL_VERSION, &request.version),
                ],
            )
            .await?;
        let (mut adopted, mut started, mut missing) = (Vec::new(), Vec::new(), Vec::new());
        let mut watched = Vec::new();
        for container in recorded {
            let Some(summary) = found.iter().find(|c| name_of(c) == container.name) else {
                missing.push(container.name.clone());
                continue;
            };
            let id = summary.id.clone().unwrap_or_default();
            if state_of(summary) == "running" {
                adopted.push(format!("{} ({})", container.name, short(&id)));
            } else {
                docker
                    .start_container(&id, None)
                    .await
                    .map_err(|e| format!("cannot start container {} again: {e}", container.name))?;
                started.push(container.name.clone());
            }
            watched.push((id, container.name.clone()));
        }
        self.watch(color, docker, watched);
        let mut message = format!(
            "{color} {}: {} container(s) adopted as they run",
            request.version,
            adopted.len()
        );
        if !adopted.is_empty() {
            message.push_str(&format!(" ({})", adopted.join(", ")));
        }
        if !started.is_empty() {
            message.push_str(&format!(
                "; stopped, so started again: {}",
                started.join(", ")
            ));
        }
        if !missing.is_empty() {
            message.push_str(&format!("; gone from the engine: {}", missing.join(", ")));
        }
        Ok(Some(message))
    }

    fn take_events(&self) -> Option<mpsc::UnboundedReceiver<InstanceEvent>> {
        self.events.lock().expect("lock").take()
    }

    fn is_current(&self, color: Color, generation: u64) -> bool {
        self.current.lock().expect("lock")[color.index()]
            .as_ref()
            .is_some_and(|c| c.generation == generation)
    }

    /// The containers keep running: the next daemon adopts them (no dropped requests across a
    /// daemon restart). Only the watchers end.
    async fn shutdown(&self) {
        for color in Color::ALL {
            self.release(color);
        }
    }

    async fn detach(&self) {
        self.shutdown().await;
    }

    /// The engine's logs of the color's current containers (all of the color's, when none is
    /// current: the retained ones of a stopped color).
    async fn logs(&self, color: Color, lines: usize) -> Option<Vec<(String, Vec<String>)>> {
        let (docker, containers) = match self.logged(color).await {
            Ok(found) => found,
            Err(e) => return Some(vec![("docker".into(), vec![e])]),
        };
        let mut logs = Vec::new();
        for (id, name) in containers {
            let lines = tail(&docker, &id, lines).await;
            logs.push((source_of(&id, &name), lines));
        }
        Some(logs)
    }

    /// The same containers' logs followed through the engine, until each container stops.
    async fn follow_logs(&self, color: Color, lines: usize) -> Option<LogLines> {
        let (docker, containers) = match self.logged(color).await {
            Ok(found) => found,
            Err(line) => {
                let source = "docker".to_string();
                return Some(stream::iter([LogLine { source, line }]).boxed());
            }
        };
        let followed = containers.into_iter().map(|(id, name)| {
            let source = source_of(&id, &name);
            let options = LogsOptionsBuilder::default()
                .follow(true)
                .stdout(true)
                .stderr(true)
                .tail(&lines.to_string())
                .build();
            docker
                .logs(&id, Some(options))
                .flat_map(move |chunk| {
                    let text = match chunk {
                        Ok(chunk) => chunk.to_string(),
                        Err(e) => format!("(cannot read the logs: {e})"),
                    };
                    let source = source.clone();
                    let lines: Vec<LogLine> = text
                        .lines()
                        .map(|line| LogLine {
                            source: source.clone(),
                            line: line.to_string(),
                        })
                        .collect();
                    stream::iter(lines)
                })
                .boxed()
        });
        Some(stream::select_all(followed).boxed())
    }
}

impl DockerProvider {
    /// The containers whose logs `logs` shows: the color's current ones, or all of the
    /// color's when none is current.
    async fn logged(&self, color: Color) -> Result<(Docker, Vec<(String, String)>), String> {
        let docker = self.engine().await?;
        let current: Vec<(String, String)> = self.current.lock().expect("lock")[color.index()]
            .as_ref()
            .map(|c| c.containers.clone())
            .unwrap_or_default();
        if !current.is_empty() {
            return Ok((docker, current));
        }
        let found = self.list(&docker, &[(LABEL_COLOR, color.as_str())]).await?;
        let containers = found
            .iter()
            .map(|c| (c.id.clone().unwrap_or_default(), name_of(c)))
            .collect();
        Ok((docker, containers))
    }
}

/// How a container's log lines are headed.
fn source_of(id: &str, name: &str) -> String {
    format!("container {name} ({})", short(id))
}

/// Where a started container is reached: its published host port, or (with `app.reach:
/// network`) its own address on `app.network` and no host port.
fn reached_at(
    inspected: &ContainerInspectResponse,
    spec: &DockerSpec,
) -> Result<(u16, Option<SocketAddr>), String> {
    match spec.reach {
        Reach::Published => inspected
            .host_config
            .as_ref()
            .and_then(|h| h.port_bindings.as_ref())
            .and_then(|bindings| bindings.values().flatten().flatten().next())
            .and_then(|binding| binding.host_port.as_deref())
            .and_then(|port| port.parse().ok())
            .map(|port| (port, None))
            .ok_or_else(|| format!("port {} is not published", spec.port)),
        Reach::Network => {
            let network = spec.network.as_deref().unwrap_or_default();
            let ip = inspected
                .network_settings
                .as_ref()
                .and_then(|settings| settings.networks.as_ref())
                .and_then(|networks| networks.get(network))
                .and_then(|endpoint| endpoint.ip_address.as_deref())
                .filter(|ip| !ip.is_empty())
                .ok_or_else(|| format!("has no address on network {network}"))?;
            let ip: std::net::IpAddr = ip
                .parse()
                .map_err(|e| format!("address {ip:?} on network {network}: {e}"))?;
            Ok((0, Some(SocketAddr::new(ip, spec.port))))
        }
    }
}

/// What a deploy started: each container's address, and the records to keep.
fn started(records: Vec<ContainerRecord>, note: Option<String>) -> Started {
    Started {
        upstreams: records.iter().map(ContainerRecord::upstream).collect(),
        state: Some(ProviderState::Docker {
            containers: records,
        }),
        note,
    }
}

/// Creates and starts the planned containers in order, stopping at the first failure.
/// Returns the records of those running, every container created (id, name), and the outcome.
async fn create_and_start(
    docker: &Docker,
    spec: &DockerSpec,
    planned: &[ContainerRecord],
    bodies: Vec<ContainerCreateBody>,
) -> (
    Vec<ContainerRecord>,
    Vec<(String, String)>,
    Result<(), String>,
) {
    let mut records = Vec::new();
    let mut created = Vec::new();
    let mut outcome = Ok(());
    for (planned, body) in planned.iter().zip(bodies) {
        let made = docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&planned.name)
                        .build(),
                ),
                body,
            )
            .await
            .map_err(|e| format!("cannot create container {}: {e}", planned.name));
        let id = match made {
            Ok(made) => made.id,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        created.push((id.clone(), planned.name.clone()));
        if let Err(e) = docker.start_container(&id, None).await {
            outcome = Err(format!("cannot start container {}: {e}", planned.name));
            break;
        }
        let address = match spec.reach {
            Reach::Published => None,
            Reach::Network => match docker.inspect_container(&id, None).await {
                Ok(inspected) => match reached_at(&inspected, spec) {
                    Ok((_, address)) => address,
                    Err(e) => {
                        outcome = Err(format!("container {}: {e}", planned.name));
                        break;
                    }
                },
                Err(e) => {
                    outcome = Err(format!("cannot inspect container {}: {e}", planned.name));
                    break;
                }
            },
        };
        records.push(ContainerRecord {
            id,
            name: planned.name.clone(),
            host_port: planned.host_port,
            address,
            state: "running".into(),
        });
    }
    (records, created, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_carry_service_color_version_and_number() {
        assert_eq!(
            container_name("web", Color::Green, "2.0", 1),
            "web-green-2.0-1"
        );
    }

    #[test]
    fn the_config_digest_is_stable_across_builds() {
        // FNV-1a of "a": a fixed value, so containers created by an older daemon still match.
        assert_eq!(fnv1a("a"), "af63dc4c8601ec8c");
    }
}
