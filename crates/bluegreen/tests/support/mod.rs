//! Test helpers: real backends on port 0 that count what they served, and the real daemon binary.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::{TcpListener, UnixStream};
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

pub const BIN: &str = env!("CARGO_BIN_EXE_bluegreen");

/// An HTTP backend that answers with its name, counts requests, and can be made unhealthy
/// or killed (listener and every open connection dropped at once).
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    state: Arc<BackendState>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

struct BackendState {
    name: String,
    served: AtomicU64,
    healthy: AtomicBool,
    /// Answers every request but health checks with 500.
    failing: AtomicBool,
    /// Connections that carried at least one request other than a health check.
    used_connections: Mutex<std::collections::HashSet<u64>>,
    next_connection: AtomicU64,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState {
            name: name.to_string(),
            served: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            failing: AtomicBool::new(false),
            used_connections: Mutex::new(Default::default()),
            next_connection: AtomicU64::new(0),
        });
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let accept_state = Arc::clone(&state);
        let accept_tasks = Arc::clone(&tasks);
        tasks.lock().unwrap().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let state = Arc::clone(&accept_state);
                let connection = state.next_connection.fetch_add(1, Ordering::Relaxed);
                accept_tasks.lock().unwrap().spawn(async move {
                    let service =
                        service_fn(move |request| respond(Arc::clone(&state), connection, request));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            state,
            tasks,
        }
    }

    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::Relaxed)
    }

    /// How many connections carried requests other than health checks.
    pub fn used_connections(&self) -> usize {
        self.state.used_connections.lock().unwrap().len()
    }

    /// Every request but health checks answered with 500 (it stays healthy).
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::Relaxed);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Like kill -9 of the backend process: the port closes and open connections reset.
    pub fn kill(&self) {
        self.tasks.lock().unwrap().abort_all();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

type BackendBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(text: impl Into<Bytes>) -> BackendBody {
    Full::new(text.into()).boxed()
}

fn query_number(request: &Request<Incoming>, key: &str) -> Option<u64> {
    request
        .uri()
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn respond(
    state: Arc<BackendState>,
    connection: u64,
    mut request: Request<Incoming>,
) -> Result<Response<BackendBody>, Infallible> {
    let name = state.name.clone();
    let path = request.uri().path().to_string();
    if path != "/healthz" {
        state.used_connections.lock().unwrap().insert(connection);
    }
    let builder = Response::builder().header("x-served-by", &name);
    let response = match path.as_str() {
        "/healthz" => {
            if state.healthy.load(Ordering::Relaxed) {
                builder.body(full("ok"))
            } else {
                builder
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(full("sick"))
            }
        }
        "/ws" => {
            let key = request.headers().get("sec-websocket-key").cloned();
            let Some(key) = key else {
                return Ok(builder.status(400).body(full("not a websocket")).unwrap());
            };
            state.served.fetch_add(1, Ordering::Relaxed);
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let mut socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                while let Some(Ok(message)) = socket.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    let reply = Message::text(format!("{name}:{text}"));
                    if socket.send(reply).await.is_err() {
                        return;
                    }
                }
            });
            builder
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "websocket")
                .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                .body(full(""))
        }
        _ if state.failing.load(Ordering::Relaxed) => {
            state.served.fetch_add(1, Ordering::Relaxed);
            builder
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(full(format!("{name} failed")))
        }
        _ => {
            state.served.fetch_add(1, Ordering::Relaxed);
            if let Some(ms) = query_number(&request, "sleep_ms") {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if path == "/headers" {
                let headers: serde_json::Map<String, Value> = request
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value::String(v.to_str().unwrap_or("").to_string()),
                        )
                    })
                    .collect();
                builder
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(full(Value::Object(headers).to_string()))
            } else if path == "/close" {
                builder
                    .header(header::CONNECTION, "close")
                    .body(full(name.clone()))
            } else if path == "/echo" {
                let body = request
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                builder.body(full(body))
            } else if path == "/stream" {
                let chunks = query_number(&request, "chunks").unwrap_or(3);
                let gap = Duration::from_millis(query_number(&request, "gap_ms").unwrap_or(100));
                let stream = futures_util::stream::unfold(0u64, move |i| async move {
                    if i == chunks {
                        return None;
                    }
                    if i > 0 {
                        tokio::time::sleep(gap).await;
                    }
                    Some((
                        Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk{i}\n")))),
                        i + 1,
                    ))
                });
                builder.body(BodyExt::boxed(StreamBody::new(stream)))
            } else {
                builder.header("x-color", &name).body(full(name.clone()))
            }
        }
    };
    Ok(response.unwrap())
}

/// The config every test starts from: loopback on port 0, fast health checks.
pub fn config(blue: &[&Backend], green: &[&Backend], router_extra: &str) -> String {
    let list = |backends: &[&Backend]| {
        backends
            .iter()
            .map(|b| format!("\"{}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let drain = if router_extra.contains("drain_timeout") {
        ""
    } else {
        "  drain_timeout: 2s\n"
    };
    format!(
        "service: web\nrouter:\n  listen: 127.0.0.1:0\n  admin: .bluegreen/admin.sock\n{drain}{router_extra}\
         environments:\n  blue: {{ upstreams: [{}] }}\n  green: {{ upstreams: [{}] }}\n\
         health: {{ path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2 }}\n\
         dashboard: {{ listen: \"127.0.0.1:0\" }}\n",
        list(blue),
        list(green)
    )
}

/// The real `bluegreen up`, in a temp folder of its own.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
    /// The admin address and bearer token when the admin API is on TCP, not the unix socket.
    pub tcp_admin: Option<(SocketAddr, String)>,
}

impl Daemon {
    pub async fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Daemon::start_in(dir, config).await
    }

    pub async fn start_in(dir: tempfile::TempDir, config: &str) -> Daemon {
        Daemon::start_with_env(dir, config, &[]).await
    }

    /// Started with the admin API on a free 127.0.0.1 port behind a bearer token (the config
    /// must name the unix socket `.bluegreen/admin.sock`, which this replaces).
    pub async fn start_with_tcp_admin(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let token = "0123456789abcdef0123456789abcdef";
        write_file(dir.path(), "admin-token", &format!("{token}\n"));
        let admin: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = config.replace(
            "  admin: .bluegreen/admin.sock\n",
            &format!("  admin: {admin}\n  admin_token_file: admin-token\n"),
        );
        assert!(
            config.contains("admin_token_file"),
            "no admin socket to replace"
        );
        Daemon::launch(dir, &config, &[], Some((admin, token.to_string()))).await
    }

    /// Started with these variables in its environment (e.g. another `DOCKER_HOST`).
    pub async fn start_with_env(
        dir: tempfile::TempDir,
        config: &str,
        env: &[(&str, &str)],
    ) -> Daemon {
        Daemon::launch(dir, config, env, None).await
    }

    /// Started through `wrapper` (e.g. `ip netns exec NS`: the daemon on a test host).
    pub async fn start_wrapped(wrapper: &[&str], config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Daemon::start_wrapped_in(dir, wrapper, config).await
    }

    /// Started through `wrapper` in `dir` (a restart on a test host).
    pub async fn start_wrapped_in(
        dir: tempfile::TempDir,
        wrapper: &[&str],
        config: &str,
    ) -> Daemon {
        Daemon::launch_wrapped(dir, config, &[], None, wrapper).await
    }

    async fn launch(
        dir: tempfile::TempDir,
        config: &str,
        env: &[(&str, &str)],
        tcp_admin: Option<(SocketAddr, String)>,
    ) -> Daemon {
        Daemon::launch_wrapped(dir, config, env, tcp_admin, &[]).await
    }

    async fn launch_wrapped(
        dir: tempfile::TempDir,
        config: &str,
        env: &[(&str, &str)],
        tcp_admin: Option<(SocketAddr, String)>,
        wrapper: &[&str],
    ) -> Daemon {
        let config_path = dir.path().join("bluegreen.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        let child = command
            .envs(env.iter().copied())
            .arg("--config")
            .arg(&config_path)
            .arg("up")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut daemon = Daemon {
            dir,
            config_path,
            addr: "127.0.0.1:0".parse().unwrap(),
            child: Some(child),
            tcp_admin,
        };
        for _ in 0..200 {
            if let Some(status) = daemon.try_admin("GET", "/v1/status", None).await
                && status.0 == 200
            {
                daemon.addr = status.1["listen"].as_str().unwrap().parse().unwrap();
                return daemon;
            }
            if let Some(code) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daemon exited with {code}: {}", daemon.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "daemon did not answer on its admin socket: {}",
            daemon.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join(".bluegreen/admin.sock")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn try_admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Option<(u16, Value)> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "bluegreen");
        let mut sender = match &self.tcp_admin {
            None => {
                let stream = UnixStream::connect(self.socket()).await.ok()?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .ok()?;
                tokio::spawn(connection);
                sender
            }
            Some((addr, token)) => {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
                let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .ok()?;
                tokio::spawn(connection);
                sender
            }
        };
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .unwrap();
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.ok()?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Some((status, value))
    }

    /// One admin API call over the unix socket.
    pub async fn admin(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.try_admin(method, path, body)
            .await
            .expect("admin API answers")
    }

    pub async fn status(&self) -> Value {
        let (code, status) = self.admin("GET", "/v1/status", None).await;
        assert_eq!(code, 200, "{status}");
        status
    }

    pub async fn switch(&self, to: &str) -> Value {
        let (code, body) = self
            .admin("POST", "/v1/switch", Some(&format!("{{\"to\":\"{to}\"}}")))
            .await;
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Runs the CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .output()
            .unwrap()
    }

    /// Starts a CLI command that keeps printing (`logs --follow`); its lines are read as
    /// they come, and it is killed when dropped.
    pub fn cli_following(&self, args: &[&str]) -> Following {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_out, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_out.send(line).is_err() {
                    break;
                }
            }
        });
        Following {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Blue runs 1.0, and a release (`release --detach` with `args`) has started.
    pub fn release_over_blue(&self, args: &[&str]) {
        let out = self.cli(&["deploy", "--environment", "blue", "--version", "1.0"]);
        assert!(out.status.success(), "{out:?}");
        let mut release = vec!["release", "--detach"];
        release.extend_from_slice(args);
        let out = self.cli(&release);
        assert!(out.status.success(), "{out:?}");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.take().unwrap().wait().unwrap()
    }

    /// Sends a signal and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        child.wait().unwrap()
    }

    /// The daemon's folder survives, for a restart.
    pub fn into_dir(mut self) -> tempfile::TempDir {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Polls `GET /v1/status` until `done` holds (10 s at most) and returns that status.
    pub async fn wait_status(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never reached {what}: {status}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the color has this many healthy upstreams.
    pub async fn wait_healthy(&self, color: &str, healthy: u64) {
        self.wait_for(
            color,
            "healthy upstreams",
            healthy,
            |c| &c["healthy_upstreams"],
        )
        .await;
    }

    /// Waits until the router has this many requests (and tunnels) open on the color.
    pub async fn wait_open(&self, color: &str, open: u64) {
        self.wait_for(color, "open requests", open, |c| &c["metrics"]["open"])
            .await;
    }

    async fn wait_for(
        &self,
        color: &str,
        what: &str,
        expected: u64,
        field: impl Fn(&Value) -> &Value,
    ) {
        for _ in 0..200 {
            let status = self.status().await;
            let colors = status["colors"].as_array().unwrap();
            let entry = colors.iter().find(|c| c["color"] == color).unwrap();
            if field(entry).as_u64() == Some(expected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{color} never reached {expected} {what}: {}",
            self.status().await
        );
    }
}

impl Drop for Daemon {
    /// SIGTERM first, so the daemon stops the app instances it supervises; SIGKILL only if it
    /// hangs well past a graceful stop (drain, a 1 s grace for idle keep-alive connections,
    /// the instances' stop timeouts), since a killed daemon leaves its instances running.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            for _ in 0..400 {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A config for the process provider running the example app from the `bluegreen` binary
/// (two instances per color), with fast health checks, a short canary and quick analysis.
pub fn process_config() -> String {
    format!(
        r#"service: web
router:
  listen: 127.0.0.1:0
  admin: .bluegreen/admin.sock
  drain_timeout: 2s
app:
  command: "{BIN} example-app --listen 127.0.0.1:{{port}} --color {{color}} --app-version {{version}}"
  instances: 2
  ready_timeout: 15s
  stop_timeout: 2s
health: {{ path: /healthz, interval: 100ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 2 }}
dashboard: {{ listen: "127.0.0.1:0" }}
test:
  checks:
    - {{ path: /healthz, status: 200 }}
    - {{ path: /, status: 200, body_contains: "{{version}}" }}
release:
  strategy: quick
  monitor_window: 1s
  scale_down_delay: 30s
strategies:
  quick: {{ type: canary, steps: [20, 60], wait: 1s }}
analysis:
  interval: 200ms
  min_requests: 20
  error_rate: {{ max_percent: 5, max_increase_percent: 2 }}
  latency_p99: {{ max_increase: 150ms }}
"#
    )
}

/// Status and body, or why there was no answer.
type Answer = Result<(u16, String), String>;

/// Steady keep-alive clients through the router, counting answers per color and failures.
pub struct Load {
    running: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<Answer>>>,
}

pub struct LoadReport {
    pub blue: usize,
    pub green: usize,
    /// Non-2xx answers and transport errors, as text.
    pub failures: Vec<String>,
    /// Every answer body seen, once each ("blue 1.0" …).
    pub bodies: std::collections::BTreeSet<String>,
}

impl Load {
    pub fn start(url: String, clients: usize) -> Load {
        let running = Arc::new(AtomicBool::new(true));
        let workers = (0..clients)
            .map(|_| {
                let running = Arc::clone(&running);
                let url = url.clone();
                tokio::spawn(async move {
                    let client = client();
                    let mut seen = Vec::new();
                    let deadline = std::time::Instant::now() + Duration::from_secs(120);
                    while running.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                        seen.push(get(&client, &url, &[]).await.map(|(s, _, b)| (s, b)));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    seen
                })
            })
            .collect();
        Load { running, workers }
    }

    pub async fn stop(self) -> LoadReport {
        self.running.store(false, Ordering::Relaxed);
        let mut report = LoadReport {
            blue: 0,
            green: 0,
            failures: Vec::new(),
            bodies: Default::default(),
        };
        for worker in self.workers {
            for result in worker.await.unwrap() {
                match result {
                    Ok((200, body)) => {
                        if body.starts_with("blue") {
                            report.blue += 1;
                        } else if body.starts_with("green") {
                            report.green += 1;
                        }
                        report.bodies.insert(body.trim().to_string());
                    }
                    Ok((status, body)) => report.failures.push(format!("{status} {body}")),
                    Err(e) => report.failures.push(e),
                }
            }
        }
        report
    }
}

/// Runs the CLI with this config and returns (exit code, stdout, stderr).
pub fn run_cli(config: &Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A keep-alive client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client that opens a new connection for every request.
pub fn fresh_connection_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// GET a URL and hand back the whole response, for tests that look at its headers.
pub async fn get_response(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
) -> http::Response<Incoming> {
    let request = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    client.request(request).await.unwrap()
}

/// How long [`get`] waits for a whole answer. hyper's client has been seen (twice in a day,
/// under nginx reloads) to leave a request pending forever with no socket left under it; a
/// bounded wait turns that into a counted failure instead of a hung test.
const GET_TIMEOUT: Duration = Duration::from_secs(60);

/// GET a URL; returns status, the `x-served-by` header and the body, or why there was none
/// (within [`GET_TIMEOUT`]).
pub async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, String), String> {
    tokio::time::timeout(GET_TIMEOUT, get_unbounded(client, url, headers))
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {url} within {GET_TIMEOUT:?}")))
}

async fn get_unbounded(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, String), String> {
    let mut request = Request::get(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = client
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-served-by")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, served_by, String::from_utf8_lossy(&body).into()))
}

/// The color a backend name belongs to ("blue-2" → "blue").
pub fn color_of(served_by: &str) -> &str {
    served_by.split('-').next().unwrap_or(served_by)
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A client that never sends a request twice: hyper's pool would otherwise resend one that a
/// closing keep-alive connection did not take, which hides exactly the failures measured here.
pub fn strict_client(
    keep_alive: bool,
) -> Client<HttpConnector, http_body_util::Full<bytes::Bytes>> {
    let mut builder = Client::builder(TokioExecutor::new());
    builder.retry_canceled_requests(false);
    if !keep_alive {
        builder.pool_max_idle_per_host(0);
    }
    builder.build_http()
}

/// A client's count of answers and what failed.
pub type Worker = tokio::task::JoinHandle<(usize, Vec<String>)>;

/// Strict clients at work (see [`strict_clients`]).
pub struct StrictLoad {
    running: Arc<AtomicBool>,
    workers: Vec<Worker>,
}

impl StrictLoad {
    /// Stops the clients; the answers counted, and what failed.
    pub async fn stop(self) -> (usize, Vec<String>) {
        self.running.store(false, Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for worker in self.workers {
            let (answered, failures) = worker.await.unwrap();
            ok += answered;
            failed.extend(failures);
        }
        (ok, failed)
    }
}

/// Clients that never resend a request: half keep their connection alive, half open a new
/// one for every request; each request gets its answer, or counts as failed.
pub fn strict_clients(url: String, clients: usize) -> StrictLoad {
    let running = Arc::new(AtomicBool::new(true));
    let workers = (0..clients)
        .map(|i| {
            let running = Arc::clone(&running);
            let url = url.clone();
            tokio::spawn(async move {
                let client = strict_client(i % 2 == 0);
                let (mut ok, mut failed) = (0, Vec::new());
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while running.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    match get(&client, &url, &[]).await {
                        Ok((200, _, _)) => ok += 1,
                        Ok((status, _, body)) => failed.push(format!("{status} {body}")),
                        Err(e) => failed.push(e),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed)
            })
        })
        .collect();
    StrictLoad { running, workers }
}

/// The process runs (it is not gone, nor a zombie waiting to be reaped).
pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// The daemon's process now (it changes at each upgrade): stopped when the test ends, so no
/// upgraded daemon outlives it.
/// A CLI command that keeps printing, started by [`Daemon::cli_following`].
pub struct Following {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line printed so far.
    pub seen: Vec<String>,
}

impl Following {
    /// Reads lines until one contains `needle` (returned); fails after `within`, or when the
    /// command ends first, showing what it printed.
    pub fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {needle:?} within {within:?} ({e}); printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the command to end by itself; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(line);
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "still running after {within:?}; printed:\n{}",
            self.seen.join("\n")
        );
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Current(pub u32);

impl Current {
    pub fn alive(&self) -> bool {
        alive(self.0.into())
    }

    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.0.to_string()])
            .status();
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        self.signal("TERM");
        for _ in 0..400 {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.signal("KILL");
    }
}
