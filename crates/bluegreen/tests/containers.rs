//! The docker provider against the real Docker Engine: releases under load, adoption after kill -9, exits, retention, bad config.
//!
//! Each test builds its own images of the example app (a static binary in a `FROM scratch`
//! image, built once per run and cached in the target folder) and removes every container and
//! image it made, found by the labels. No Docker socket is a failure, never a skip.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
};
use futures_util::StreamExt;
use serde_json::Value;
use support::{BIN, Daemon, Load, client, get, run_cli};

/// Marks the images the tests build (which test made them).
const TEST_LABEL: &str = "bluegreen.test";

/// How each tag of a test image behaves.
#[derive(Clone, Copy)]
enum Behaviour {
    Good,
    /// Answers 20% of requests with 500 (it passes health checks).
    Erroring,
    /// Refuses its arguments and exits at once, with a message on stderr.
    Exits,
}

/// The example app as a static binary (no libc in a `FROM scratch` image), built once per run
/// into its own target folder, so the flags do not invalidate the tests' own build.
fn static_example_app() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let target = Path::new(BIN)
            .parent()
            .and_then(Path::parent)
            .expect("the binary sits in <target>/<profile>/")
            .join("container-app");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&workspace)
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "bluegreen-example-app",
                "--target",
                "x86_64-unknown-linux-gnu",
            ])
            .env("CARGO_TARGET_DIR", &target)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            // A test fixture: a fast build matters more than a fast binary.
            .env("CARGO_PROFILE_RELEASE_LTO", "false")
            .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the static example app failed");
        target.join("x86_64-unknown-linux-gnu/release/bluegreen-example-app")
    })
}

/// The engine, or a failure that says how to get one.
async fn engine() -> Docker {
    let socket = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
        .unwrap_or_else(|| "/var/run/docker.sock".into());
    assert!(
        Path::new(&socket).exists(),
        "no Docker socket at {socket}: the container tests need a Docker Engine (or podman's `podman system service`, with DOCKER_HOST=unix://PATH)"
    );
    Docker::connect_with_local_defaults()
        .expect("a Docker client")
        .negotiate_version()
        .await
        .unwrap_or_else(|e| panic!("the Docker Engine at {socket} does not answer: {e}"))
}

/// One test's service name and image repository; removes their containers and images when
/// dropped (also when the test fails).
struct Fixture {
    docker: Docker,
    service: String,
    repository: String,
    /// The tags built, each removed at the end.
    tags: Vec<String>,
    /// A user network the test made, removed at the end.
    network: Option<String>,
}

impl Fixture {
    async fn new(name: &str, tags: &[(&str, Behaviour)]) -> Fixture {
        let docker = engine().await;
        let unique = format!("{name}-{}", std::process::id());
        let fixture = Fixture {
            docker,
            service: format!("bgt-{unique}"),
            repository: format!("bluegreen-test/{unique}"),
            tags: tags.iter().map(|(tag, _)| tag.to_string()).collect(),
            network: None,
        };
        let binary = static_example_app();
        for (tag, behaviour) in tags {
            fixture.build(binary, tag, *behaviour).await;
        }
        fixture
    }

    /// `docker build` of a two-line image through the Engine API, from a tar context.
    async fn build(&self, binary: &Path, tag: &str, behaviour: Behaviour) {
        let env = match behaviour {
            Behaviour::Good => "",
            Behaviour::Erroring => "ENV EXAMPLE_ERROR_RATE=0.2\n",
            Behaviour::Exits => "ENV EXAMPLE_ERROR_RATE=7\n",
        };
        let dockerfile = format!(
            "FROM scratch\nCOPY example-app /example-app\n{env}LABEL {TEST_LABEL}={}\nENTRYPOINT [\"/example-app\"]\nCMD [\"--listen\", \"0.0.0.0:8080\"]\n",
            self.service
        );
        // Plain ustar entries: the engine's tar reader refuses GNU sparse ones.
        let mut context = tar::Builder::new(Vec::new());
        let program = std::fs::read(binary).unwrap();
        for (name, bytes, mode) in [
            ("Dockerfile", dockerfile.as_bytes(), 0o644),
            ("example-app", program.as_slice(), 0o755),
        ] {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(mode);
            header.set_cksum();
            context.append_data(&mut header, name, bytes).unwrap();
        }
        let context = context.into_inner().unwrap();
        let reference = format!("{}:{tag}", self.repository);
        let options = BuildImageOptionsBuilder::default()
            .dockerfile("Dockerfile")
            .t(&reference)
            .rm(true)
            .forcerm(true)
            .build();
        let mut build = std::pin::pin!(self.docker.build_image(
            options,
            None,
            Some(bollard::body_full(context.into()))
        ));
        while let Some(step) = build.next().await {
            let step = step.unwrap_or_else(|e| panic!("building {reference}: {e}"));
            if let Some(error) = step.error_detail.and_then(|d| d.message) {
                panic!("building {reference}: {error}");
            }
        }
    }

    /// A user (bridge) network of this test's, removed with the fixture.
    async fn create_network(&mut self) -> String {
        let name = format!("{}-net", self.service);
        self.docker
            .create_network(bollard::models::NetworkCreateRequest {
                name: name.clone(),
                labels: Some(HashMap::from([(
                    TEST_LABEL.to_string(),
                    self.service.clone(),
                )])),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("creating network {name}: {e}"));
        self.network = Some(name.clone());
        name
    }

    /// This test's containers as the engine lists them.
    async fn containers(&self) -> Vec<bollard::models::ContainerSummary> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("bluegreen.service={}", self.service)],
        )]);
        self.docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .unwrap()
    }

    /// (name, state) of this test's containers, sorted by name.
    async fn names_and_states(&self) -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = self
            .containers()
            .await
            .iter()
            .map(|c| {
                (
                    c.names.as_ref().unwrap()[0]
                        .trim_start_matches('/')
                        .to_string(),
                    c.state.map(|s| s.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        found.sort();
        found
    }

    /// When the container last started, as the engine says.
    async fn started_at(&self, id: &str) -> String {
        self.docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .unwrap()
            .state
            .unwrap()
            .started_at
            .unwrap()
    }

    /// The config of a daemon running this fixture's images: two containers per color.
    fn config(&self, extra_app: &str) -> String {
        format!(
            r#"service: {service}
router:
  listen: 127.0.0.1:0
  admin: .bluegreen/admin.sock
  drain_timeout: 2s
app:
  provider: docker
  image: {repository}
  port: 8080
  command: "--listen 0.0.0.0:{{port}} --color {{color}} --app-version {{version}}"
  instances: 2
  pull: never
  ready_timeout: 20s
  stop_timeout: 2s
{extra_app}health: {{ path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2 }}
dashboard: {{ listen: "127.0.0.1:0" }}
test:
  checks:
    - {{ path: /healthz, status: 200 }}
release:
  strategy: quick
  monitor_window: 1s
  scale_down_delay: 0s
strategies:
  quick: {{ type: canary, steps: [20, 60], wait: 1s }}
analysis:
  interval: 200ms
  min_requests: 20
  on_too_few_requests: proceed
  error_rate: {{ max_percent: 5, max_increase_percent: 2 }}
"#,
            service = self.service,
            repository = self.repository,
        )
    }
}

impl Drop for Fixture {
    /// Removes the test's containers and images on a runtime of its own (drop cannot await).
    fn drop(&mut self) {
        let service = self.service.clone();
        let network = self.network.clone();
        let tags: Vec<String> = self
            .tags
            .iter()
            .map(|tag| format!("{}:{tag}", self.repository))
            .collect();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let docker = Docker::connect_with_local_defaults()
                    .unwrap()
                    .negotiate_version()
                    .await
                    .unwrap();
                let filters = HashMap::from([(
                    "label".to_string(),
                    vec![format!("bluegreen.service={service}")],
                )]);
                let containers = docker
                    .list_containers(Some(
                        ListContainersOptionsBuilder::default()
                            .all(true)
                            .filters(&filters)
                            .build(),
                    ))
                    .await
                    .unwrap_or_default();
                for container in containers {
                    let _ = docker
                        .remove_container(
                            container.id.as_deref().unwrap_or_default(),
                            Some(
                                RemoveContainerOptionsBuilder::default()
                                    .force(true)
                                    .v(true)
                                    .build(),
                            ),
                        )
                        .await;
                }
                if let Some(network) = network {
                    let _ = docker.remove_network(&network).await;
                }
                for reference in tags {
                    let _ = docker
                        .remove_image(
                            &reference,
                            Some(RemoveImageOptionsBuilder::default().force(true).build()),
                            None,
                        )
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn deploy(daemon: &Daemon, color: &str, version: &str) -> std::process::Output {
    daemon.cli(&["deploy", "--environment", color, "--version", version])
}

/// The recorded containers of a color in `status`: (id, name, state).
fn recorded(status: &Value, color: usize) -> Vec<(String, String, String)> {
    status["environments"][color]["containers"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|c| {
                    (
                        c["id"].as_str().unwrap().to_string(),
                        c["name"].as_str().unwrap().to_string(),
                        c["state"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn body_of(daemon: &Daemon) -> String {
    body_of_path(daemon, "/").await
}

async fn body_of_path(daemon: &Daemon, path: &str) -> String {
    let (code, _, body) = get(&client(), &daemon.url(path), &[]).await.unwrap();
    assert_eq!(code, 200, "{body}");
    body.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releases_of_containers_under_load_fail_no_request_and_roll_back_to_retained_containers() {
    let fixture = Fixture::new(
        "release",
        &[
            ("1.0", Behaviour::Good),
            ("2.0", Behaviour::Good),
            ("2.1", Behaviour::Good),
        ],
    )
    .await;
    let daemon = Daemon::start(&fixture.config("  retain: 1\n")).await;
    let out = deploy(&daemon, "blue", "1.0");
    assert!(out.status.success(), "{}", text(&out));
    let blue_1 = recorded(&daemon.status().await, 0);
    assert_eq!(blue_1.len(), 2);

    let load = Load::start(daemon.url("/"), 6);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = daemon.cli(&["release", "--version", "2.0"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.stop().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(
        report.bodies.contains("blue 1.0") && report.bodies.contains("green 2.0"),
        "{:?}",
        report.bodies
    );

    // status shows the containers; the cleanup stopped blue's, which are kept.
    let status = daemon.status().await;
    let green = recorded(&status, 1);
    let prefix = format!("{}-green-2.0-", fixture.service);
    assert!(
        green.iter().all(|(id, name, state)| id.len() == 64
            && name.starts_with(&prefix)
            && state == "running"),
        "{green:?}"
    );
    assert_eq!(status["environments"][0]["status"], "stopped", "{status}");
    let printed = text(&daemon.cli(&["status"]));
    assert!(
        printed.contains(&format!("container {prefix}1 {}", &green[0].0[..12])),
        "{printed}"
    );
    let states = fixture.names_and_states().await;
    let blue_prefix = format!("{}-blue-1.0-", fixture.service);
    assert_eq!(
        states
            .iter()
            .filter(|(name, state)| name.starts_with(&blue_prefix) && state == "exited")
            .count(),
        2,
        "{states:?}"
    );

    // logs come from the engine.
    let out = daemon.cli(&["logs", "--environment", "green"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("container {prefix}1"))
            && printed.contains("listening on 0.0.0.0:8080 (green 2.0)"),
        "{printed}"
    );

    // A third version: blue runs 2.1, the cleanup stops green 2.0, and with retain: 1 the
    // older stopped version (1.0) is removed.
    let out = daemon.cli(&["release", "--version", "2.1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let states = fixture.names_and_states().await;
    assert!(
        !states
            .iter()
            .any(|(name, _)| name.starts_with(&blue_prefix)),
        "1.0 is beyond retain: 1 and removed: {states:?}"
    );
    let green_ids: Vec<String> = green.iter().map(|(id, ..)| id.clone()).collect();
    assert!(
        fixture
            .containers()
            .await
            .iter()
            .filter(|c| green_ids.contains(c.id.as_ref().unwrap()))
            .all(|c| c.state.map(|s| s.to_string()).as_deref() == Some("exited")),
        "{states:?}"
    );

    // rollback --to 2.0 starts the retained containers again, and says so.
    let out = daemon.cli(&["rollback", "--to", "2.0"]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("retained"), "{printed}");
    let status = daemon.status().await;
    assert_eq!(status["live"], "green", "{status}");
    let again: Vec<String> = recorded(&status, 1)
        .into_iter()
        .map(|(id, ..)| id)
        .collect();
    assert_eq!(again, green_ids, "the same containers, not new ones");
    assert_eq!(body_of(&daemon).await, "green 2.0");
    drop(daemon);
}

/// `app.reach: network` (bluegreen in a container on a user network): the router reaches
/// each container at its own address there, nothing is published on the host; `logs
/// --follow` streams the containers' lines as they are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containers_on_a_user_network_are_reached_at_their_address_and_their_logs_followed() {
    let mut fixture = Fixture::new(
        "network",
        &[("1.0", Behaviour::Good), ("2.0", Behaviour::Good)],
    )
    .await;
    let network = fixture.create_network().await;
    let config = fixture
        .config(&format!("  network: {network}\n  reach: network\n"))
        .replace(
            "--app-version {version}",
            "--app-version {version} --access-log",
        );
    let daemon = Daemon::start(&config).await;
    let out = deploy(&daemon, "blue", "1.0");
    assert!(out.status.success(), "{}", text(&out));

    let load = Load::start(daemon.url("/"), 4);
    let out = daemon.cli(&["release", "--version", "2.0"]);
    let report = load.stop().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.bodies.contains("green 2.0"), "{:?}", report.bodies);

    let status = daemon.status().await;
    let containers = status["environments"][1]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2, "{status}");
    for container in containers {
        let id = container["id"].as_str().unwrap();
        let inspected = fixture
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .unwrap();
        let on_network = inspected
            .network_settings
            .as_ref()
            .unwrap()
            .networks
            .as_ref()
            .unwrap()[&network]
            .ip_address
            .clone()
            .unwrap();
        assert_eq!(
            container["address"],
            format!("{on_network}:8080"),
            "routed to the container's own address: {status}"
        );
        assert_eq!(container["host_port"], 0, "{status}");
        let published = inspected
            .host_config
            .and_then(|h| h.port_bindings)
            .unwrap_or_default();
        assert!(
            published
                .values()
                .flatten()
                .all(|bindings| bindings.is_empty()),
            "nothing published: {published:?}"
        );
    }
    let printed = text(&daemon.cli(&["status"]));
    assert!(
        printed.contains(&format!(
            "on {}",
            containers[0]["address"].as_str().unwrap()
        )),
        "{printed}"
    );

    // logs --follow: the newest lines, then each request's line as the app writes it.
    let mut following = daemon.cli_following(&[
        "logs",
        "--environment",
        "green",
        "--follow",
        "--lines",
        "100000",
    ]);
    following.wait_for(
        "listening on 0.0.0.0:8080 (green 2.0)",
        Duration::from_secs(10),
    );
    for _ in 0..4 {
        assert_eq!(body_of_path(&daemon, "/followed").await, "green 2.0");
    }
    following.wait_for("GET /followed 200", Duration::from_secs(10));
    assert!(
        following
            .seen
            .iter()
            .any(|l| l.starts_with(&format!("==> container {}-green-2.0-", fixture.service))),
        "{:?}",
        following.seen
    );
    // The stream ends when the containers followed stop (here: stopped outside bluegreen).
    let ids: Vec<String> = containers
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids {
        fixture
            .docker
            .stop_container(id, None::<bollard::query_parameters::StopContainerOptions>)
            .await
            .unwrap();
    }
    assert_eq!(following.wait_exit(Duration::from_secs(30)), Some(0));
    drop(daemon);

    // reach: network without a network is refused, naming the key.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bluegreen.yaml");
    std::fs::write(&path, fixture.config("  reach: network\n")).unwrap();
    let (code, stdout, stderr) = run_cli(&path, &["check"]);
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("app.reach: network needs app.network"),
        "{stdout}{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containers_are_adopted_after_kill_9_of_the_daemon_and_a_bad_version_is_rolled_back() {
    let fixture = Fixture::new(
        "adopt",
        &[("1.0", Behaviour::Good), ("3.0", Behaviour::Erroring)],
    )
    .await;
    let config = fixture.config("");
    let daemon = Daemon::start(&config).await;
    let out = deploy(&daemon, "blue", "1.0");
    assert!(out.status.success(), "{}", text(&out));
    let before = recorded(&daemon.status().await, 0);
    let mut started = Vec::new();
    for (id, ..) in &before {
        started.push(fixture.started_at(id).await);
    }

    let dir = daemon.into_dir(); // SIGKILL: no shutdown of any kind
    let daemon = Daemon::start_in(dir, &config).await;
    daemon.wait_healthy("blue", 2).await;
    let after = recorded(&daemon.status().await, 0);
    assert_eq!(
        after.iter().map(|c| &c.0).collect::<Vec<_>>(),
        before.iter().map(|c| &c.0).collect::<Vec<_>>()
    );
    for ((id, ..), at) in before.iter().zip(&started) {
        assert_eq!(&fixture.started_at(id).await, at, "adopted, not restarted");
    }
    assert_eq!(body_of(&daemon).await, "blue 1.0");
    let history = text(&daemon.cli(&["history"]));
    assert!(history.contains("adopted as they run"), "{history}");

    // The erroring 3.0 passes health checks; analysis rolls it back under load.
    let load = Load::start(daemon.url("/"), 6);
    let out = daemon.cli(&["release", "--version", "3.0"]);
    load.stop().await;
    let printed = text(&out);
    assert_eq!(
        out.status.code(),
        Some(6),
        "exit 6 = rolled back: {printed}"
    );
    assert!(printed.contains("error_rate"), "{printed}");
    assert_eq!(daemon.status().await["live"], "blue");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_that_exits_fails_the_deploy_with_its_logs_and_bad_input_is_refused_first() {
    let fixture = Fixture::new("exits", &[("4.0", Behaviour::Exits)]).await;
    let config = fixture.config("");
    let daemon = Daemon::start(&config).await;

    let out = deploy(&daemon, "green", "4.0");
    let printed = text(&out);
    assert!(!out.status.success(), "{printed}");
    assert!(
        printed.contains("exited with code 2")
            && printed.contains("--error-rate: 7 is out of range"),
        "the exit and its last log lines: {printed}"
    );
    let status = daemon.status().await;
    assert_eq!(status["environments"][1]["status"], "failed", "{status}");
    assert!(
        fixture.containers().await.is_empty(),
        "the failed deploy's containers are removed: {:?}",
        fixture.names_and_states().await
    );

    // A version that is not an image tag is refused before anything is recorded or started.
    let out = deploy(&daemon, "green", "2.0+build");
    let printed = text(&out);
    assert!(!out.status.success(), "{printed}");
    assert!(printed.contains("not a valid image tag"), "{printed}");
    let out = daemon.cli(&["release", "--version", "1.0/rc1"]);
    assert!(
        text(&out).contains("not a valid image tag"),
        "{}",
        text(&out)
    );
    assert_eq!(daemon.status().await["environments"][1]["version"], "4.0");

    // pull: never and an image the engine does not have: a clear error.
    let out = deploy(&daemon, "green", "9.9");
    let printed = text(&out);
    assert!(!out.status.success(), "{printed}");
    assert!(
        printed.contains(&format!(
            "image {}:9.9 is not on the engine and app.pull is never",
            fixture.repository
        )),
        "{printed}"
    );
    drop(daemon);

    // Bad config: each key named with its fix, before any daemon starts.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bluegreen.yaml");
    let bad = config
        .replace(&format!("  image: {}\n", fixture.repository), "")
        .replace("pull: never", "pull: sometimes");
    std::fs::write(&path, bad).unwrap();
    let (code, stdout, stderr) = run_cli(&path, &["check"]);
    assert_ne!(code, 0, "{stdout}{stderr}");
    let printed = format!("{stdout}{stderr}");
    assert!(printed.contains("app.image: is required"), "{printed}");
    assert!(printed.contains("app.pull: unknown policy"), "{printed}");
}

/// `bluegreen demo --docker`: the demo's story on containers of an image of this binary,
/// built locally, and nothing of it left on the engine afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_runs_its_story_on_containers_and_cleans_up() {
    let docker = engine().await;
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["demo", "--docker", "--rate", "150", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("docker provider"), "{printed}");
    assert!(
        printed
            .contains("done: 2.0 released with 0 failed requests; 3.0 stopped by the mirror before any client saw it; 4.0 rolled back automatically"),
        "{printed}"
    );
    let filters = HashMap::from([(
        "label".to_string(),
        vec!["bluegreen.service=demo".to_string()],
    )]);
    let left = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .unwrap();
    assert!(left.is_empty(), "containers left: {left:?}");
    assert!(
        docker
            .inspect_image("bluegreen-demo-app:1.0")
            .await
            .is_err(),
        "the demo's image was removed"
    );
}

/// An engine that cannot be reached, and an `app.port` the app does not listen on: each deploy
/// fails with an error that says what to fix, and the live color is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_engine_or_a_wrong_port_fails_the_deploy_saying_why() {
    let fixture = Fixture::new("wrong", &[("1.0", Behaviour::Good)]).await;
    let config = fixture.config("");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-engine.sock");
    let host = format!("unix://{}", missing.display());
    let daemon = Daemon::start_with_env(dir, &config, &[("DOCKER_HOST", &host)]).await;
    let out = deploy(&daemon, "blue", "1.0");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("cannot reach the Docker Engine") && text(&out).contains(&host),
        "{}",
        text(&out)
    );
    drop(daemon);

    // The app listens on 8080 inside the container; the config says 9999.
    let wrong_port = config
        .replace("  port: 8080\n", "  port: 9999\n")
        .replace("0.0.0.0:{port}", "0.0.0.0:8080")
        .replace("ready_timeout: 20s", "ready_timeout: 3s");
    assert_ne!(wrong_port, config);
    let daemon = Daemon::start(&wrong_port).await;
    let out = deploy(&daemon, "blue", "1.0");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("0 of 2 upstream(s) healthy after 3s"),
        "{}",
        text(&out)
    );
    assert!(
        fixture.containers().await.is_empty(),
        "the failed deploy's containers are removed"
    );
    drop(daemon);
}
