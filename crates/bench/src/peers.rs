//! The routers under test (and the backend alone), started with comparable configs and pinned to one core.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How many restarts the restart row makes of each router (the last reloads an invalid config).
pub const RESTARTS: usize = 7;

/// The core the router under test owns; the load generator and the backend share the other.
pub const ROUTER_CORE: &str = "1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Bluegreen,
    Nginx,
    Haproxy,
    /// HAProxy switched by bluegreen (`router.driver: haproxy`).
    DrivenHaproxy,
    /// nginx switched by bluegreen (`router.driver: nginx`).
    DrivenNginx,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "backend direct",
            Kind::Bluegreen => "bluegreen",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
            Kind::DrivenHaproxy => "haproxy, bluegreen driver",
            Kind::DrivenNginx => "nginx, bluegreen driver",
        }
    }
}

/// One target of the load: its HTTP/1.1 address, its h2c address and how to switch it.
pub struct Peer {
    pub kind: Kind,
    pub http: SocketAddr,
    pub h2: Option<SocketAddr>,
    pub dir: PathBuf,
    child: Option<Child>,
    backends: Backends,
    /// bluegreen's process after `restart_in_place` upgraded it (no longer `child`'s).
    upgraded_to: std::sync::atomic::AtomicU32,
    /// The bluegreen daemon driving this router (the driven kinds).
    driver: Option<Child>,
}

/// The two colors' backends.
#[derive(Clone, Copy, Debug)]
pub struct Backends {
    pub blue: SocketAddr,
    pub green: SocketAddr,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts the example app for one color on the load generator's core; returns it and its address.
pub fn start_backend(
    bin_dir: &Path,
    color: &str,
    version: &str,
) -> Result<(Child, SocketAddr), String> {
    let port = free_port();
    let child = Command::new(bin_dir.join("bluegreen-example-app"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--color",
            color,
            "--app-version",
            version,
        ])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start the example app from {}: {e}",
                bin_dir.display()
            )
        })?;
    Ok((child, loopback(port)))
}

fn pinned(program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", ROUTER_CORE]).arg(program);
    command
}

/// The hard limit on open files, which a benchmark process cannot raise.
pub fn fd_hard_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(4)?.parse().ok()
        })
        .unwrap_or(1024)
}

/// HAProxy reserves two descriptors per connection and refuses to start past the limit.
pub fn haproxy_maxconn() -> u64 {
    (fd_hard_limit() / 2).saturating_sub(300).min(19_000)
}

impl Peer {
    pub fn direct(backends: Backends, dir: &Path) -> Peer {
        Peer {
            kind: Kind::Direct,
            http: backends.blue,
            h2: None,
            dir: dir.to_path_buf(),
            child: None,
            backends,
            upgraded_to: Default::default(),
            driver: None,
        }
    }

    pub fn bluegreen(bin_dir: &Path, backends: Backends, work: &Path) -> Result<Peer, String> {
        let dir = work.join("bluegreen");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port = free_port();
        let config = format!(
            "service: bench\nrouter:\n  listen: 127.0.0.1:{port}\n  admin: admin.sock\n  drain_timeout: 5s\n  max_connections: 19000\n\
             environments:\n  blue: {{ upstreams: [\"{}\"] }}\n  green: {{ upstreams: [\"{}\"] }}\n\
             health: {{ path: /healthz, interval: 1s, timeout: 1s }}\ndashboard: {{ enabled: false }}\nrelease: {{ monitor_window: 1m }}\n",
            backends.blue, backends.green
        );
        std::fs::write(dir.join("bluegreen.yaml"), config).map_err(|e| e.to_string())?;
        let child = pinned(&bin_dir.join("bluegreen"))
            .arg("--config")
            .arg(dir.join("bluegreen.yaml"))
            .arg("up")
            .env("BLUEGREEN_WORKER_THREADS", "1")
            .env("BLUEGREEN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("bluegreen.log")).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("cannot start bluegreen: {e}"))?;
        Ok(Peer {
            kind: Kind::Bluegreen,
            http: loopback(port),
            // One port speaks HTTP/1.1 and h2c (prior knowledge) alike.
            h2: Some(loopback(port)),
            dir,
            child: Some(child),
            backends,
            upgraded_to: Default::default(),
            driver: None,
        })
    }

    pub fn nginx(backends: Backends, work: &Path) -> Result<Peer, String> {
        let dir = work.join("nginx");
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
        let (port, h2_port) = (free_port(), free_port());
        // As a competent operator would: one worker per core it owns, upstream keep-alive,
        // HTTP/1.1 to the upstream, no access log (bluegreen keeps none either).
        let config = format!(
            "worker_processes 1;\nworker_rlimit_nofile 20000;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\ndaemon off;\n\
             events {{ worker_connections 19000; multi_accept on; }}\n\
             http {{\n  access_log off;\n  keepalive_timeout 75s;\n  keepalive_requests 1000000;\n  include {dir}/upstream.conf;\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n    listen 127.0.0.1:{h2_port} http2;\n\
             \x20   location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), config).map_err(|e| e.to_string())?;
        write_nginx_upstream(&dir, backends.blue)?;
        let child = pinned(Path::new("nginx"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?;
        Ok(Peer {
            kind: Kind::Nginx,
            http: loopback(port),
            h2: Some(loopback(h2_port)),
            dir,
            child: Some(child),
            backends,
            upgraded_to: Default::default(),
            driver: None,
        })
    }

    pub fn haproxy(backends: Backends, work: &Path) -> Result<Peer, String> {
        let dir = work.join("haproxy");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (port, h2_port) = (free_port(), free_port());
        // One thread for its one core, keep-alive both sides, connection reuse to the servers;
        // green is in the backend at weight 0, ready for a runtime weight change.
        let mut config = String::new();
        let _ = write!(
            config,
            "global\n  nbthread 1\n  maxconn {}\n  stats socket {dir}/admin.sock level admin\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n  option http-keep-alive\n  http-reuse always\n\
             frontend web\n  bind 127.0.0.1:{port}\n  bind 127.0.0.1:{h2_port} proto h2\n  default_backend app\n\
             backend app\n  server blue {} weight 100\n  server green {} weight 0\n",
            haproxy_maxconn(),
            backends.blue,
            backends.green,
            dir = dir.display()
        );
        std::fs::write(dir.join("haproxy.cfg"), config).map_err(|e| e.to_string())?;
        let child = pinned(Path::new("haproxy"))
            .args(["-db", "-f"])
            .arg(dir.join("haproxy.cfg"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start haproxy: {e}"))?;
        Ok(Peer {
            kind: Kind::Haproxy,
            http: loopback(port),
            h2: Some(loopback(h2_port)),
            dir,
            child: Some(child),
            backends,
            upgraded_to: Default::default(),
            driver: None,
        })
    }

    /// HAProxy with one blue and one green server slot, switched by a bluegreen daemon
    /// through its runtime API (`router.driver: haproxy`).
    pub fn driven_haproxy(bin_dir: &Path, backends: Backends, work: &Path) -> Result<Peer, String> {
        let dir = work.join("driven-haproxy");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port = free_port();
        let config = format!(
            "global\n  nbthread 1\n  maxconn {}\n  stats socket {dir}/admin.sock level admin\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  timeout http-keep-alive 60s\n  option http-keep-alive\n  http-reuse always\n\
             frontend web\n  bind 127.0.0.1:{port}\n  default_backend app\n\
             backend app\n  default-server check inter 1s\n  server-template blue 1-1 127.0.0.1:1 disabled\n  server-template green 1-1 127.0.0.1:1 disabled\n",
            haproxy_maxconn(),
            dir = dir.display()
        );
        std::fs::write(dir.join("haproxy.cfg"), config).map_err(|e| e.to_string())?;
        let child = pinned(Path::new("haproxy"))
            .args(["-db", "-f"])
            .arg(dir.join("haproxy.cfg"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start haproxy: {e}"))?;
        wait_for_file(&dir.join("admin.sock"))?;
        let keys = format!(
            "  driver: haproxy\n  socket: {}\n  backend: app\n",
            dir.join("admin.sock").display()
        );
        let driver = start_driver(bin_dir, &dir, backends, &keys)?;
        Ok(Peer {
            kind: Kind::DrivenHaproxy,
            http: loopback(port),
            h2: None,
            dir,
            child: Some(child),
            backends,
            upgraded_to: Default::default(),
            driver: Some(driver),
        })
    }

    /// nginx configured as [`Peer::nginx`], its upstream's servers written and reloaded by a
    /// bluegreen daemon (`router.driver: nginx`), an access log in bluegreen's format.
    pub fn driven_nginx(bin_dir: &Path, backends: Backends, work: &Path) -> Result<Peer, String> {
        let dir = work.join("driven-nginx");
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
        let port = free_port();
        let config = format!(
            "worker_processes 1;\nworker_rlimit_nofile 20000;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\ndaemon off;\n\
             events {{ worker_connections 19000; multi_accept on; }}\n\
             http {{\n  log_format bluegreen '$upstream_addr $status $request_time';\n  access_log {dir}/access.log bluegreen buffer=64k flush=1s;\n\
             \x20 keepalive_timeout 75s;\n  keepalive_requests 1000000;\n  upstream app {{ include {dir}/servers.conf; keepalive 64; }}\n\
             \x20 server {{\n    listen 127.0.0.1:{port};\n\
             \x20   location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), config).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("servers.conf"),
            format!("server {};\n", backends.blue),
        )
        .map_err(|e| e.to_string())?;
        let child = pinned(Path::new("nginx"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?;
        wait_for_file(&dir.join("nginx.pid"))?;
        let nginx = format!("nginx -p {dir} -c {dir}/nginx.conf", dir = dir.display());
        let keys = format!(
            "  driver: nginx\n  upstream_file: {dir}/servers.conf\n  check: \"{nginx} -t -q\"\n  reload: \"{nginx} -s reload\"\n  access_log: {dir}/access.log\n  pid_file: {dir}/nginx.pid\n",
            dir = dir.display()
        );
        let driver = start_driver(bin_dir, &dir, backends, &keys)?;
        Ok(Peer {
            kind: Kind::DrivenNginx,
            http: loopback(port),
            h2: None,
            dir,
            child: Some(child),
            backends,
            upgraded_to: Default::default(),
            driver: Some(driver),
        })
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The config this peer was started with, for the report (the backend alone has none).
    pub fn config_text(&self) -> Option<String> {
        let file = match self.kind {
            Kind::Direct => return None,
            Kind::Bluegreen => "bluegreen.yaml",
            Kind::Nginx | Kind::DrivenNginx => "nginx.conf",
            Kind::Haproxy | Kind::DrivenHaproxy => "haproxy.cfg",
        };
        let mut text = std::fs::read_to_string(self.dir.join(file)).ok()?;
        if self.kind == Kind::Nginx
            && let Ok(upstream) = std::fs::read_to_string(self.dir.join("upstream.conf"))
        {
            text.push_str(&format!(
                "\n# upstream.conf (rewritten for each switch)\n{upstream}"
            ));
        }
        Some(text)
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.http)
    }

    /// Waits until the peer answers on its HTTP port.
    pub async fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(mut stream) = tokio::net::TcpStream::connect(self.http).await {
                let _ = stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    .await;
                let mut answer = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut answer))
                        .await;
                if answer.starts_with(b"HTTP/1.1 200") {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "{} did not answer 200 on {} within 15s (logs in {})",
            self.name(),
            self.http,
            self.dir.display()
        ))
    }

    /// Sends all traffic to one color, the way an operator of this router would; returns when
    /// the router has accepted the change.
    pub async fn switch_to(&self, color: &str) -> Result<(), String> {
        let to = if color == "green" {
            self.backends.green
        } else {
            self.backends.blue
        };
        match self.kind {
            Kind::Direct => Err("the backend alone cannot switch".into()),
            Kind::Bluegreen | Kind::DrivenHaproxy | Kind::DrivenNginx => {
                let body = format!("{{\"to\":\"{color}\"}}");
                let socket = match self.kind {
                    Kind::Bluegreen => self.dir.join("admin.sock"),
                    _ => self.dir.join("bluegreen").join("admin.sock"),
                };
                let (status, answer) = unix_request(&socket, "POST", "/v1/switch", &body).await?;
                if status == 200 {
                    Ok(())
                } else {
                    Err(format!("bluegreen refused the switch: {answer}"))
                }
            }
            Kind::Nginx => {
                write_nginx_upstream(&self.dir, to)?;
                self.nginx_signal("reload")
            }
            Kind::Haproxy => {
                // The new server's weight goes up before the old one's goes down, in one command.
                let (up, down) = if color == "green" {
                    ("green", "blue")
                } else {
                    ("blue", "green")
                };
                let command = format!("set weight app/{up} 100; set weight app/{down} 0\n");
                let mut socket = UnixStream::connect(self.dir.join("admin.sock"))
                    .await
                    .map_err(|e| e.to_string())?;
                socket
                    .write_all(command.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut answer = String::new();
                socket
                    .read_to_string(&mut answer)
                    .await
                    .map_err(|e| e.to_string())?;
                if answer.trim().is_empty() {
                    Ok(())
                } else {
                    Err(format!("haproxy answered {answer:?}"))
                }
            }
        }
    }

    /// The `i`-th of the restarts of [`RESTARTS`], the way an operator of this router does
    /// them: bluegreen alternates `POST /v1/upgrade` (the same binary) with SIGHUP reloads of a
    /// changed config, then reloads an invalid one; nginx reloads a changed config
    /// (`nginx -s reload`) each time, then an invalid one.
    pub async fn restart_in_place(&self, i: usize) -> Result<(), String> {
        let invalid = i + 1 == RESTARTS;
        match self.kind {
            Kind::Bluegreen if !invalid && i.is_multiple_of(2) => {
                let socket = self.dir.join("admin.sock");
                let (status, answer) = unix_request(&socket, "POST", "/v1/upgrade", "{}").await?;
                if status != 200 {
                    return Err(format!("bluegreen upgrade: {answer}"));
                }
                let (_, status) = unix_request(&socket, "GET", "/v1/status", "").await?;
                let pid = serde_json::from_str::<serde_json::Value>(&status)
                    .ok()
                    .and_then(|s| s["pid"].as_u64())
                    .ok_or_else(|| format!("bluegreen status without a pid: {status}"))?;
                self.upgraded_to
                    .store(pid as u32, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
            Kind::Bluegreen => {
                let path = self.dir.join("bluegreen.yaml");
                let config = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
                let changed = if invalid {
                    "router: [not, a, map]\n".to_string()
                } else {
                    // An in-place key, so the reload puts a changed config in force.
                    let release = format!("release: {{ monitor_window: {}m }}", i + 1);
                    let lines: Vec<&str> = config
                        .lines()
                        .map(|l| {
                            if l.starts_with("release:") {
                                &release
                            } else {
                                l
                            }
                        })
                        .collect();
                    lines.join("\n") + "\n"
                };
                std::fs::write(&path, &changed).map_err(|e| e.to_string())?;
                signal(self.current_pid(), "HUP")?;
                if invalid {
                    // Refused whole; the file is put back for whoever reads it next.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    std::fs::write(&path, config).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Kind::Nginx => {
                let upstream = self.dir.join("upstream.conf");
                if invalid {
                    let valid = std::fs::read_to_string(&upstream).map_err(|e| e.to_string())?;
                    std::fs::write(&upstream, "upstream app {\n").map_err(|e| e.to_string())?;
                    // `nginx -s reload` checks the file first and refuses it (exit 1); the
                    // running master keeps its config.
                    if self.nginx_signal("reload").is_ok() {
                        return Err("nginx took an invalid config".into());
                    }
                    std::fs::write(&upstream, valid).map_err(|e| e.to_string())
                } else {
                    // A changed file (the keep-alive pool size), so the reload does real work.
                    let text = format!(
                        "upstream app {{ server {}; keepalive {}; }}\n",
                        self.backends.blue,
                        64 + i % 2
                    );
                    std::fs::write(&upstream, text).map_err(|e| e.to_string())?;
                    self.nginx_signal("reload")
                }
            }
            Kind::Direct | Kind::Haproxy | Kind::DrivenHaproxy | Kind::DrivenNginx => {
                Err(format!("{}: restarts not measured", self.name()))
            }
        }
    }

    fn nginx_signal(&self, signal: &str) -> Result<(), String> {
        run_quietly(
            Command::new("nginx")
                .arg("-p")
                .arg(&self.dir)
                .arg("-c")
                .arg(self.dir.join("nginx.conf"))
                .args(["-s", signal]),
            &format!("nginx -s {signal}"),
        )
    }

    /// The router's main process now (bluegreen's changes at each upgrade).
    fn current_pid(&self) -> u32 {
        match self.upgraded_to.load(std::sync::atomic::Ordering::Relaxed) {
            0 => self.child.as_ref().map_or(0, Child::id),
            pid => pid,
        }
    }

    fn pids(&self) -> Vec<u32> {
        match &self.child {
            Some(child) => process_tree(child.id()),
            None => Vec::new(),
        }
    }

    /// Resident memory of the router's processes (nginx: master and workers), in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids()
            .iter()
            .map(|pid| proc_status_kib(*pid, "VmRSS:"))
            .sum()
    }

    /// Peak resident memory since start, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.pids()
            .iter()
            .map(|pid| proc_status_kib(*pid, "VmHWM:"))
            .sum()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            let _ = driver.kill();
            let _ = driver.wait();
        }
        // An upgraded bluegreen is no child of ours: asked to stop, then waited for.
        let upgraded = *self.upgraded_to.get_mut();
        if upgraded != 0 && signal(upgraded, "TERM").is_ok() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && Path::new(&format!("/proc/{upgraded}")).exists() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = signal(upgraded, "KILL");
        }
        if let Some(mut child) = self.child.take() {
            // Ask first (nginx's master stops its workers and does not respawn them), then
            // kill whatever is left of the tree.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            for pid in process_tree(child.id()).into_iter().rev() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A bluegreen daemon in `router_dir/bluegreen` driving the router there (`keys`: its
/// `router.driver` keys); its own listener serves only previews.
fn start_driver(
    bin_dir: &Path,
    router_dir: &Path,
    backends: Backends,
    keys: &str,
) -> Result<Child, String> {
    let dir = router_dir.join("bluegreen");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = format!(
        "service: bench\nrouter:\n  listen: 127.0.0.1:{}\n  admin: admin.sock\n{keys}\
         environments:\n  blue: {{ upstreams: [\"{}\"] }}\n  green: {{ upstreams: [\"{}\"] }}\n\
         health: {{ path: /healthz, interval: 1s, timeout: 1s }}\ndashboard: {{ enabled: false }}\n",
        free_port(),
        backends.blue,
        backends.green
    );
    std::fs::write(dir.join("bluegreen.yaml"), config).map_err(|e| e.to_string())?;
    let child = Command::new(bin_dir.join("bluegreen"))
        .arg("--config")
        .arg(dir.join("bluegreen.yaml"))
        .arg("up")
        .env("BLUEGREEN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("bluegreen.log")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot start bluegreen as a driver: {e}"))?;
    wait_for_file(&dir.join("admin.sock"))?;
    Ok(child)
}

/// Waits up to 10 s for a router to create `path` (its socket or pid file).
fn wait_for_file(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear within 10 s", path.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn write_nginx_upstream(dir: &Path, server: SocketAddr) -> Result<(), String> {
    let text = format!("upstream app {{ server {server}; keepalive 64; }}\n");
    let temp = dir.join("upstream.conf.tmp");
    std::fs::write(&temp, text).map_err(|e| e.to_string())?;
    std::fs::rename(&temp, dir.join("upstream.conf")).map_err(|e| e.to_string())
}

/// The process and its descendants, parents first.
fn process_tree(root: u32) -> Vec<u32> {
    let mut tree = vec![root];
    let mut i = 0;
    let all: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    let after_name = stat.rsplit_once(')')?.1;
                    let ppid = after_name.split_whitespace().nth(1)?.parse().ok()?;
                    Some((pid, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            all.iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    tree
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn unix_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bluegreen")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

fn signal(pid: u32, name: &str) -> Result<(), String> {
    run_quietly(
        Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string()),
        &format!("kill -{name} {pid}"),
    )
}

/// Runs `command` with its errors unprinted; an error names `what` and how it ended.
fn run_quietly(command: &mut Command, what: &str) -> Result<(), String> {
    let status = command
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} exited {status}"))
    }
}
