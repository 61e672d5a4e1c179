//! A real etcd cluster for the fleet tests (Debian's etcd-server), and a network link between a router and it that a test can cut.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// `members` etcd members on loopback ports, forming one cluster. Each runs under a watchdog
/// shell that stops it (and removes its data) once this test process is gone, or when killed.
pub struct EtcdCluster {
    pub clients: Vec<SocketAddr>,
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

struct Member {
    /// The watchdog shell; etcd's pid is in `pid_file`.
    watchdog: std::process::Child,
    pid_file: PathBuf,
    log: PathBuf,
}

impl Member {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }
}

impl EtcdCluster {
    pub async fn start(members: usize) -> EtcdCluster {
        EtcdCluster::start_on([127, 0, 0, 1].into(), members).await
    }

    /// Members whose client URLs are on `ip` (their peer URLs stay on loopback). A port
    /// probed free can be taken by another test before etcd binds it (the member then
    /// exits): such a cluster is stopped and started again on new ports, up to three times.
    pub async fn start_on(ip: std::net::IpAddr, members: usize) -> EtcdCluster {
        let mut failures = Vec::new();
        for attempt in 1..=3 {
            let mut cluster = EtcdCluster::launch(ip, members);
            match cluster.wait_healthy().await {
                Ok(()) => return cluster,
                Err(why) => failures.push(format!("attempt {attempt}: {why}")),
            }
        }
        panic!("etcd cluster did not start:\n{}", failures.join("\n"));
    }

    fn launch(ip: std::net::IpAddr, members: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut started = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.path().join(format!("m{i}"));
            let pid_file = dir.path().join(format!("m{i}.pid"));
            let log = dir.path().join(format!("m{i}.log"));
            let script = format!(
                "etcd --name m{i} --data-dir {data} \
                 --listen-client-urls http://{ip}:{client} --advertise-client-urls http://{ip}:{client} \
                 --listen-peer-urls http://127.0.0.1:{peer} --initial-advertise-peer-urls http://127.0.0.1:{peer} \
                 --initial-cluster {cluster} --initial-cluster-state new --initial-cluster-token bgtest \
                 --heartbeat-interval 50 --election-timeout 500 >{log} 2>&1 & member=$!; echo $member >{pid}; \
                 while kill -0 {parent} 2>/dev/null && kill -0 $member 2>/dev/null; do sleep 0.2; done; \
                 kill $member 2>/dev/null; wait $member",
                data = data.display(),
                log = log.display(),
                pid = pid_file.display(),
                parent = std::process::id(),
            );
            let watchdog = Command::new("sh")
                .args(["-c", &script])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd (Debian's etcd-server; scripts/test installs it) starts");
            started.push(Member {
                watchdog,
                pid_file,
                log,
            });
        }
        EtcdCluster {
            clients: ports
                .iter()
                .map(|(client, _)| SocketAddr::new(ip, *client))
                .collect(),
            members: started,
            _dir: dir,
        }
    }

    /// `[“http://…”, …]` for a config's `store.etcd.endpoints`.
    pub fn endpoints_yaml(addrs: &[SocketAddr]) -> String {
        let list: Vec<String> = addrs.iter().map(|a| format!("\"http://{a}\"")).collect();
        format!("[{}]", list.join(", "))
    }

    /// Waits until every member answers a write (the cluster has a leader, and no member is
    /// still starting); an error names the member that exited or never answered, with the
    /// end of its log.
    async fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for (i, member) in self.clients.iter().enumerate() {
            let endpoint = [format!("http://{member}")];
            loop {
                let ok = match etcd_client::Client::connect(&endpoint, None).await {
                    Ok(mut client) => client.put("/bgtest/ready", "1", None).await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    break;
                }
                if let Some(gone) = self
                    .members
                    .iter_mut()
                    .position(|m| matches!(m.watchdog.try_wait(), Ok(Some(_))))
                {
                    return Err(format!(
                        "member m{gone} exited; its log ends:\n{}",
                        self.members[gone].log_tail()
                    ));
                }
                if std::time::Instant::now() >= deadline {
                    return Err(format!(
                        "member m{i} ({member}) did not join its cluster in 30 s; its log ends:\n{}",
                        self.members[i].log_tail()
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Kills member `i` with SIGKILL (its watchdog then ends).
    pub fn kill(&mut self, i: usize) {
        let pid = std::fs::read_to_string(&self.members[i].pid_file).unwrap();
        let status = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -9 etcd member {i}");
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Ok(pid) = std::fs::read_to_string(&member.pid_file) {
                let _ = Command::new("kill")
                    .arg(pid.trim())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = member.watchdog.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP relay standing for the network between one router and the etcd cluster: `cut`
/// drops every connection through it and refuses new ones until `restore`.
pub struct Link {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    relayed: Arc<std::sync::Mutex<JoinSet<()>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Relays each connection to the first of `targets` that accepts it.
    pub async fn start(targets: Vec<SocketAddr>) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let relayed = Arc::new(std::sync::Mutex::new(JoinSet::new()));
        let accept = {
            let (cut, relayed) = (Arc::clone(&cut), Arc::clone(&relayed));
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the peer sees the connection reset
                    }
                    let targets = targets.clone();
                    relayed.lock().unwrap().spawn(async move {
                        for target in targets {
                            if let Ok(mut outbound) = TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                                return;
                            }
                        }
                    });
                }
            })
        };
        Link {
            addr,
            cut,
            relayed,
            accept,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.relayed.lock().unwrap().abort_all();
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
        self.relayed.lock().unwrap().abort_all();
    }
}
