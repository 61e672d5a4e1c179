//! Under systemd: socket activation (the listening socket outlives the daemon, so a restart refuses no connection) and `Type=notify` readiness, reload and stop notices.

mod support;

use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::{BIN, Backend, config, get, strict_client, strict_clients};

/// Starts `bluegreen up` the way systemd does with socket activation: the socket it holds is
/// fd 3, `LISTEN_FDS=1`, `LISTEN_PID` the daemon's own pid (sh execs into bluegreen, so `$$`
/// is that pid).
fn start_activated(listener: &TcpListener, dir: &std::path::Path) -> Running {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .unwrap();
    Command::new("sh")
        .arg("-c")
        .arg("exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec \"$0\" --config \"$1\" up")
        .arg(BIN)
        .arg(dir.join("bluegreen.yaml"))
        .current_dir(dir)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(
            listener.try_clone().unwrap(),
        )))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map(Running)
        .unwrap()
}

/// A daemon this test started: stopped (SIGTERM, then SIGKILL) if the test ends, passing or
/// failing, while it still runs.
struct Running(Child);

impl Running {
    fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_some() {
            return;
        }
        signal(self, "TERM");
        for _ in 0..400 {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(daemon: &Running, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &daemon.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Sends `signal` to the daemon while 8 strict clients send through the socket, starts the
/// next one on the same socket, and returns it with the answers counted and what failed.
async fn restart_under_load(
    mut daemon: Running,
    signal_name: &str,
    listener: &TcpListener,
    dir: &std::path::Path,
    url: &str,
) -> (Running, usize, Vec<String>) {
    let load = strict_clients(url.to_string(), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&daemon, signal_name);
    let stopped = daemon.wait();
    if signal_name == "TERM" {
        assert!(stopped.success(), "stops cleanly");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let daemon = start_activated(listener, dir);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, failed) = load.stop().await;
    (daemon, ok, failed)
}

async fn wait_serving(url: &str) {
    let client = strict_client(false);
    for _ in 0..200 {
        if let Ok((200, _, _)) = get(&client, url, &[]).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("bluegreen did not serve on the activated socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_under_socket_activation_refuses_no_connection() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let dir = tempfile::tempdir().unwrap();
    // The harness holds the socket, as systemd's bluegreen.socket does.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // router.listen names another port: the passed socket wins and that one is not bound.
    let text = config(&[&blue], &[&green], "");
    std::fs::write(dir.path().join("bluegreen.yaml"), &text).unwrap();
    let url = format!("http://{addr}/");
    let daemon = start_activated(&listener, dir.path());
    wait_serving(&url).await;

    // A plain restart: SIGTERM, then a new process on the same socket. Connections made
    // meanwhile wait in the socket's backlog.
    let (daemon, ok, failed) =
        restart_under_load(daemon, "TERM", &listener, dir.path(), &url).await;
    assert!(ok > 50, "served across the restart: {ok}");
    assert!(failed.is_empty(), "refused or failed: {failed:?}");

    // kill -9: only what was in flight inside the killed process may fail, at most one
    // request per client; everything after waits for the next start.
    let (mut daemon, ok, failed) =
        restart_under_load(daemon, "KILL", &listener, dir.path(), &url).await;
    assert!(ok > 50, "served across the kill: {ok}");
    assert!(
        failed.len() <= 8,
        "only requests in flight in the killed process fail, at most one per client: {failed:?}"
    );
    signal(&daemon, "TERM");
    assert!(daemon.wait().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_reloading_and_stopping() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bluegreen.yaml"),
        config(&[&blue], &[&green], ""),
    )
    .unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut daemon = Command::new(BIN)
        .arg("--config")
        .arg(dir.path().join("bluegreen.yaml"))
        .arg("up")
        .current_dir(dir.path())
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .unwrap();
    let next = || {
        let mut buffer = [0u8; 512];
        let n = notify.recv(&mut buffer).expect("a notification");
        String::from_utf8_lossy(&buffer[..n]).trim_end().to_string()
    };
    assert_eq!(next(), "READY=1");
    signal(&daemon, "HUP");
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(next(), "READY=1", "ready again after the reload");
    signal(&daemon, "TERM");
    assert_eq!(next(), "STOPPING=1");
    assert!(daemon.wait().success());
}

/// Debian's `systemd-socket-activate` (one start, as systemd's socket unit would).
#[tokio::test(flavor = "multi_thread")]
async fn systemd_socket_activate_starts_it_on_its_socket() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bluegreen.yaml"),
        config(&[&blue], &[&green], ""),
    )
    .unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut daemon = Command::new("systemd-socket-activate")
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(BIN)
        .arg("--config")
        .arg(dir.path().join("bluegreen.yaml"))
        .arg("up")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Running)
        .expect("systemd-socket-activate (Debian's systemd package) runs");
    wait_serving(&format!("http://127.0.0.1:{port}/")).await;
    signal(&daemon, "TERM");
    assert!(daemon.wait().success());
}

/// The daemon's pid, as its status tells it (it changes at each upgrade).
fn daemon_pid(config: &std::path::Path) -> u32 {
    let (code, out, err) = support::run_cli(config, &["status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    status["pid"].as_u64().unwrap() as u32
}

/// One strict load through everything that replaces or reconfigures bluegreen under systemd:
/// three upgrades, three SIGHUP reloads of a changed config, one of an invalid config, a
/// SIGTERM + restart on the activated socket (none may fail), then a kill -9 + restart (only
/// what was in flight inside the killed process may fail; counted apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrades_reloads_and_restarts_under_one_load_fail_only_inside_a_killed_process() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let config_path = dir.path().join("bluegreen.yaml");
    let base = config(&[&blue], &[&green], "");
    let with_window = |seconds: u32| format!("{base}release:\n  monitor_window: {seconds}s\n");
    std::fs::write(&config_path, with_window(1)).unwrap();
    let first = start_activated(&listener, dir.path());
    wait_serving(&url).await;
    let mut current = support::Current(first.0.id());

    let load = strict_clients(url.clone(), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..3u32 {
        let (code, out, err) = support::run_cli(&config_path, &["upgrade"]);
        assert_eq!(code, 0, "upgrade {round}: {out}{err}");
        let pid = daemon_pid(&config_path);
        assert_ne!(pid, current.0, "a new process serves");
        std::mem::forget(std::mem::replace(&mut current, support::Current(pid)));
        std::fs::write(&config_path, with_window(round + 2)).unwrap();
        current.signal("HUP");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    std::fs::write(&config_path, "router: [not, a, map]\n").unwrap();
    current.signal("HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&config_path, with_window(1)).unwrap();
    // A plain restart on the activated socket (the upgraded process is not our child: its
    // exit is watched for).
    current.signal("TERM");
    for _ in 0..200 {
        if !current.alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!current.alive(), "stopped on SIGTERM");
    let restarted = start_activated(&listener, dir.path());
    current = support::Current(restarted.0.id());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, failed) = load.stop().await;
    assert!(ok > 100, "served throughout: {ok}");
    assert!(
        failed.is_empty(),
        "{} of {} failed through 3 upgrades, 4 reloads and a restart: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert_eq!(
        log.matches("release.monitor_window changed kind=reload")
            .count(),
        3,
        "{log}"
    );
    assert!(log.contains("reload refused"), "{log}");
    println!(
        "{ok} answers, none failed, through 3 upgrades, 3 reloads, 1 invalid reload and a SIGTERM + restart"
    );

    // kill -9, counted apart.
    let (restarted, killed_ok, killed_failed) =
        restart_under_load(restarted, "KILL", &listener, dir.path(), &url).await;
    std::mem::forget(current);
    println!(
        "kill -9 + restart: {killed_ok} answers, {} failed (in flight inside the killed process)",
        killed_failed.len()
    );
    assert!(
        killed_failed.len() <= 8,
        "only requests in flight in the killed process fail, at most one per client: {killed_failed:?}"
    );
    drop(restarted);
}
