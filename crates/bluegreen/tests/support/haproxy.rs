//! A real HAProxy (Debian's) for the driver tests: one frontend on a loopback port, and a backend `app` whose `blue1..N` and `green1..N` servers bluegreen points and weighs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Haproxy {
    pub addr: SocketAddr,
    pub socket: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// HAProxy with `slots` servers per color, all in maintenance until bluegreen points them.
    pub async fn start(slots: usize) -> Haproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let socket = dir.path().join("admin.sock");
        let config = format!(
            "global\n  stats socket {socket} level admin\n  maxconn 4000\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  timeout http-keep-alive 30s\n  option http-keep-alive\n\
             frontend web\n  bind 127.0.0.1:{port}\n  default_backend app\n\
             backend app\n  balance roundrobin\n  default-server check inter 100ms fall 2 rise 1\n\
             \x20 server-template blue 1-{slots} 127.0.0.1:1 disabled\n  server-template green 1-{slots} 127.0.0.1:1 disabled\n",
            socket = socket.display()
        );
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("haproxy (Debian's package) runs; scripts/test installs it");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy did not open its socket: {}",
                std::fs::read_to_string(dir.path().join("haproxy.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Haproxy {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            socket,
            child: Some(child),
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The `router:` keys that make bluegreen drive this HAProxy.
    pub fn router_keys(&self) -> String {
        format!(
            "  driver: haproxy\n  socket: {}\n  backend: app\n",
            self.socket.display()
        )
    }

    /// A runtime API command's answer.
    pub fn command(&self, command: &str) -> String {
        use std::io::{Read, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        stream.write_all(format!("{command}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.kill();
    }
}
