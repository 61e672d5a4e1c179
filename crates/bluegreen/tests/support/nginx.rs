//! A real nginx (Debian's) for the driver tests: one server on a loopback port proxying to the upstream `app`, whose servers file bluegreen writes, and an access log in bluegreen's format.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Nginx {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub servers: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx serving on a free loopback port; its upstream starts with one server marked
    /// down, until bluegreen writes the colors'.
    pub async fn start() -> Nginx {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().to_path_buf();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let servers = dir.join("servers.conf");
        std::fs::write(&servers, "server 127.0.0.1:1 down;\n").unwrap();
        let config = dir.join("nginx.conf");
        std::fs::write(
            &config,
            format!(
                "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\ndaemon off;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  log_format bluegreen '$upstream_addr $status $request_time';\n  access_log {d}/access.log bluegreen;\n\
                 \x20 upstream app {{ include {servers}; keepalive 16; }}\n\
                 \x20 server {{\n    listen 127.0.0.1:{port};\n\
                 \x20   location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
                d = dir.display(),
                servers = servers.display()
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian's package) runs; scripts/test installs it");
        let nginx = Nginx {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            config,
            servers,
            child: Some(child),
            _dir: temp,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(nginx.addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not listen: {}",
                std::fs::read_to_string(nginx.dir.join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        nginx
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The `router:` keys that make bluegreen drive this nginx.
    pub fn router_keys(&self) -> String {
        let nginx = format!(
            "nginx -p {} -c {}",
            self.dir.display(),
            self.config.display()
        );
        format!(
            "  driver: nginx\n  upstream_file: {}\n  check: \"{nginx} -t -q\"\n  reload: \"{nginx} -s reload\"\n  access_log: {}\n  pid_file: {}\n",
            self.servers.display(),
            self.dir.join("access.log").display(),
            self.dir.join("nginx.pid").display()
        )
    }

    /// Stops nginx: SIGTERM, on which the master ends its workers with it (a SIGKILL would
    /// leave them running as orphans, named only `nginx: worker process`); SIGKILL after 5 s.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}
