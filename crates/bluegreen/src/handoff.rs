//! Binary upgrade: the running daemon hands its listening sockets, then control, to a new process over a unix socket.
//!
//! The exchange, one JSON line each way at a time:
//!
//! 1. the old process starts the new binary with `BLUEGREEN_UPGRADE_FROM=<socket>` and sends
//!    `Hello` with the listening sockets attached (`SCM_RIGHTS`): both accept from then on;
//! 2. the new one loads and checks the config, then answers `Loaded` (or `Failed`);
//! 3. the old one stops its release runner and lets go of the app instances, then sends
//!    `Released`;
//! 4. the new one adopts the instances, continues the release, serves, and answers `Ready`.
//!
//! The old one then drains and exits. Until `Ready`, it can take everything back.

use std::io::{IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Set in the new process's environment: where the old one waits for it.
pub const UPGRADE_FROM: &str = "BLUEGREEN_UPGRADE_FROM";
/// The most sockets a hand-over carries: router, admin, dashboard.
const MOST_SOCKETS: usize = 3;

/// The listening sockets a daemon serves on, as the kernel's descriptors: the same sockets
/// in both processes during a hand-over, so no connection is refused in between.
pub struct Sockets {
    pub router: OwnedFd,
    pub admin: OwnedFd,
    pub admin_kind: AdminKind,
    pub dashboard: Option<OwnedFd>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminKind {
    Unix,
    Tcp,
}

impl Sockets {
    /// Another descriptor of each socket (what a server takes, while these stay to hand over).
    pub fn try_clone(&self) -> std::io::Result<Sockets> {
        Ok(Sockets {
            router: self.router.try_clone()?,
            admin: self.admin.try_clone()?,
            admin_kind: self.admin_kind,
            dashboard: self
                .dashboard
                .as_ref()
                .map(OwnedFd::try_clone)
                .transpose()?,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    /// Old to new, with the sockets attached in this order: router, admin, dashboard.
    Hello {
        pid: u32,
        version: String,
        admin: AdminKind,
        dashboard: bool,
    },
    Loaded {
        version: String,
    },
    Released,
    Ready {
        pid: u32,
    },
    Failed {
        reason: String,
    },
}

/// An upgrade asked of the daemon (`POST /v1/upgrade`, SIGUSR2), and where its outcome goes.
pub struct UpgradeAsk {
    /// The new binary; `None`: the one the daemon was started from.
    pub binary: Option<PathBuf>,
    pub timeout: Duration,
    reply: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
}

impl UpgradeAsk {
    /// An ask whose outcome comes back through the returned receiver.
    pub fn new(
        binary: Option<PathBuf>,
        timeout: Duration,
    ) -> (
        UpgradeAsk,
        tokio::sync::oneshot::Receiver<Result<String, String>>,
    ) {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let ask = UpgradeAsk {
            binary,
            timeout,
            reply: Some(reply),
        };
        (ask, outcome)
    }

    /// SIGUSR2: the binary the daemon was started from; the outcome is only logged.
    pub fn from_signal(binary: PathBuf, timeout: Duration) -> UpgradeAsk {
        UpgradeAsk {
            binary: Some(binary),
            timeout,
            reply: None,
        }
    }

    pub fn answer(self, outcome: Result<String, String>) {
        if let Some(reply) = self.reply {
            let _ = reply.send(outcome);
        }
    }
}

/// The new process, seen from the old one.
pub struct Successor {
    child: Child,
    pub pid: u32,
    pub version: String,
    lines: BufReader<UnixStream>,
}

/// Starts `binary` with this process's own arguments and hands it `sockets`; returns once it
/// has loaded its config (it serves alongside from then on, controlling nothing yet).
pub async fn start_successor(
    binary: &Path,
    sockets: &Sockets,
    state_dir: &Path,
    deadline: Instant,
) -> Result<Successor, String> {
    let path = state_dir.join("upgrade.sock");
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    let mut child = Command::new(binary)
        .args(std::env::args_os().skip(1))
        .env(UPGRADE_FROM, &path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id().unwrap_or_default();
    let accepted = tokio::select! {
        accepted = tokio::time::timeout_at(deadline, listener.accept()) => accepted,
        status = child.wait() => {
            let _ = std::fs::remove_file(&path);
            return Err(exited(status));
        }
    };
    let _ = std::fs::remove_file(&path);
    let stream = match accepted {
        Ok(Ok((stream, _))) => stream,
        Ok(Err(e)) => return Err(abandon(child, format!("cannot accept it: {e}")).await),
        Err(_) => {
            return Err(abandon(child, "it did not ask for the sockets in time".into()).await);
        }
    };
    let hello = Message::Hello {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        admin: sockets.admin_kind,
        dashboard: sockets.dashboard.is_some(),
    };
    if let Err(e) = send_with_sockets(&stream, &hello, sockets).await {
        return Err(abandon(child, format!("cannot hand it the sockets: {e}")).await);
    }
    let mut successor = Successor {
        child,
        pid,
        version: String::new(),
        lines: BufReader::new(stream),
    };
    match successor.next(deadline).await {
        Ok(Message::Loaded { version }) => {
            successor.version = version;
            Ok(successor)
        }
        Ok(other) => Err(successor.abandon(unexpected(other)).await),
        Err(e) => Err(successor.abandon(e).await),
    }
}

impl Successor {
    /// Tells it that this process let go of control; returns once it serves and controls.
    pub async fn hand_over(&mut self, deadline: Instant) -> Result<(), String> {
        send(self.lines.get_mut(), &Message::Released).await?;
        match self.next(deadline).await? {
            Message::Ready { pid } if pid == self.pid => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Stops it for good (SIGKILL: a stopping daemon would stop the app instances) and says
    /// why it was given up.
    pub async fn abandon(self, why: String) -> String {
        abandon(self.child, why).await
    }

    async fn next(&mut self, deadline: Instant) -> Result<Message, String> {
        let mut line = String::new();
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, self.lines.read_line(&mut line)) => read,
            status = self.child.wait() => return Err(exited(status)),
        };
        match read {
            Err(_) => Err("it was not ready in time".into()),
            Ok(Err(e)) => Err(format!("lost touch with it: {e}")),
            Ok(Ok(0)) => {
                match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
                    Ok(status) => Err(exited(status)),
                    Err(_) => Err("it closed the hand-over socket".into()),
                }
            }
            Ok(Ok(_)) => match serde_json::from_str(&line) {
                Ok(Message::Failed { reason }) => Err(reason),
                Ok(message) => Ok(message),
                Err(e) => Err(format!("it said something unexpected ({e}): {line:?}")),
            },
        }
    }
}

/// The old process, seen from the new one.
pub struct Predecessor {
    pub pid: u32,
    /// Taken once, to serve on.
    pub sockets: Option<Sockets>,
    lines: BufReader<UnixStream>,
}

/// When this process was started by an upgrade: the old process and the sockets it handed
/// over. `None` for a plain start.
pub fn predecessor() -> Result<Option<Predecessor>, String> {
    let Some(path) = std::env::var_os(UPGRADE_FROM).map(PathBuf::from) else {
        return Ok(None);
    };
    let fail = |e: std::io::Error| format!("upgrade: the hand-over socket {}: {e}", path.display());
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(fail)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(fail)?;
    let (hello, mut fds) = receive_with_sockets(&mut stream).map_err(fail)?;
    let Message::Hello {
        pid,
        admin,
        dashboard,
        ..
    } = hello
    else {
        return Err(format!("upgrade: expected the sockets, got {hello:?}"));
    };
    let expected = 2 + usize::from(dashboard);
    if fds.len() != expected {
        return Err(format!(
            "upgrade: {} socket(s) handed over, {expected} expected",
            fds.len()
        ));
    }
    let dashboard = dashboard.then(|| fds.pop()).flatten();
    let admin_fd = fds.pop().expect("counted");
    let router = fds.pop().expect("counted");
    stream.set_nonblocking(true).map_err(fail)?;
    let stream = UnixStream::from_std(stream).map_err(fail)?;
    Ok(Some(Predecessor {
        pid,
        sockets: Some(Sockets {
            router,
            admin: admin_fd,
            admin_kind: admin,
            dashboard,
        }),
        lines: BufReader::new(stream),
    }))
}

impl Predecessor {
    /// The config is loaded: waits until the old process has let go of control.
    pub async fn loaded(&mut self) -> Result<(), String> {
        let loaded = Message::Loaded {
            version: env!("CARGO_PKG_VERSION").into(),
        };
        send(self.lines.get_mut(), &loaded).await?;
        let mut line = String::new();
        // The old process only waits for its runner and its providers: seconds at most.
        match tokio::time::timeout(Duration::from_secs(60), self.lines.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => match serde_json::from_str(&line) {
                Ok(Message::Released) => Ok(()),
                _ => Err(format!(
                    "upgrade: expected the release of control, got {line:?}"
                )),
            },
            Ok(Ok(_)) => Err("upgrade: the old process closed the hand-over socket".into()),
            Ok(Err(e)) => Err(format!("upgrade: the hand-over socket: {e}")),
            Err(_) => Err("upgrade: the old process did not let go of control in time".into()),
        }
    }

    pub async fn ready(mut self) -> Result<(), String> {
        let ready = Message::Ready {
            pid: std::process::id(),
        };
        send(self.lines.get_mut(), &ready).await
    }

    /// Tells the old process why this one gives up (it keeps serving).
    pub async fn failed(mut self, reason: &str) {
        let failed = Message::Failed {
            reason: reason.to_string(),
        };
        let _ = send(self.lines.get_mut(), &failed).await;
    }
}

async fn send(stream: &mut UnixStream, message: &Message) -> Result<(), String> {
    let mut line = serde_json::to_vec(message).expect("json");
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| format!("the hand-over socket: {e}"))
}

async fn send_with_sockets(
    stream: &UnixStream,
    message: &Message,
    sockets: &Sockets,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).expect("json");
    line.push(b'\n');
    let mut fds = vec![sockets.router.as_fd(), sockets.admin.as_fd()];
    fds.extend(sockets.dashboard.as_ref().map(|fd| fd.as_fd()));
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MOST_SOCKETS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // A fresh connection's buffer is empty: the line goes out whole, the sockets with its
    // first byte.
    stream.writable().await?;
    let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
        rustix::net::sendmsg(
            stream,
            &[IoSlice::new(&line)],
            &mut control,
            SendFlags::empty(),
        )
        .map_err(std::io::Error::from)
    })?;
    if sent != line.len() {
        return Err(std::io::Error::other("the hello went out in part"));
    }
    Ok(())
}

fn receive_with_sockets(
    stream: &mut std::os::unix::net::UnixStream,
) -> std::io::Result<(Message, Vec<OwnedFd>)> {
    let mut buffer = vec![0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MOST_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        &*stream,
        &mut [IoSliceMut::new(&mut buffer)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    buffer.truncate(received.bytes);
    // The rest of the line, should it come in another read.
    while !buffer.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::other("the hello ended early"));
        }
        buffer.push(byte[0]);
    }
    let message = serde_json::from_slice(&buffer).map_err(std::io::Error::other)?;
    Ok((message, fds))
}

async fn abandon(mut child: Child, why: String) -> String {
    let _ = child.start_kill();
    let _ = child.wait().await;
    why
}

fn exited(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => format!("it exited ({status}) before it was ready; its log says why"),
        Err(e) => format!("it could not be waited for: {e}"),
    }
}

fn unexpected(message: Message) -> String {
    format!("it answered out of turn: {message:?}")
}
