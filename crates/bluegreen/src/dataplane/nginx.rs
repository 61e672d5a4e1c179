//! nginx as the router: bluegreen writes the `server` lines of an upstream block (weights per color) to a file nginx includes, checks the config with `nginx -t` and reloads; per-color counters come from an access log it tails.
//!
//! Open-source nginx has no API to change weights and no per-upstream statistics: each split
//! is one rewrite and one reload, and health is bluegreen's own checks. bluegreen's own router
//! stays on `router.listen` with the same upstreams, as the preview route smoke tests take.

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bluegreen_router::metrics::{latency_bucket_bounds_us, quantile_ms};
use bluegreen_router::{Color, ColorSnapshot, RouterStatus, Split};

use super::{DataPlane, EmbeddedRouter, PreviewRoute, UpstreamHealth};

/// How often the access log is read for new lines.
const TAIL_EVERY: Duration = Duration::from_millis(500);
/// How long `check` and `reload` may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// What nginx needs to be driven: the file, the commands, the log.
pub struct NginxSettings {
    pub upstream_file: PathBuf,
    pub check: Vec<String>,
    pub reload: Vec<String>,
    pub access_log: PathBuf,
    /// nginx's pid file: its master's workers show when a reload has been taken.
    pub pid_file: PathBuf,
}

/// The access log as read so far, and each color's counters from it.
struct Tail {
    offset: u64,
    /// An unfinished last line, kept until its end is written.
    partial: String,
    totals: [ColorSnapshot; 2],
}

pub struct NginxPlane {
    /// bluegreen's own router: the colors' upstream sets, health and the preview route.
    embedded: EmbeddedRouter,
    settings: NginxSettings,
    tail: Mutex<Tail>,
    /// A rewrite, its check and its reload happen one at a time.
    writing: tokio::sync::Mutex<()>,
    /// Whether "cannot tell when nginx took a reload" was logged already (once is enough).
    unwatched_said: std::sync::atomic::AtomicBool,
}

impl NginxPlane {
    /// Writes the servers for the recorded state (so nginx can start with it) and reloads nginx
    /// if it runs; then tails the access log from its end.
    pub async fn start(
        embedded: EmbeddedRouter,
        settings: NginxSettings,
    ) -> Result<Arc<NginxPlane>, String> {
        let offset = std::fs::metadata(&settings.access_log).map_or(0, |m| m.len());
        let plane = Arc::new(NginxPlane {
            embedded,
            settings,
            tail: Mutex::new(Tail {
                offset,
                partial: String::new(),
                totals: Color::ALL.map(ColorSnapshot::empty),
            }),
            writing: tokio::sync::Mutex::new(()),
            unwatched_said: std::sync::atomic::AtomicBool::new(false),
        });
        let upstreams = Color::ALL.map(|c| plane.addrs(c));
        if let Err(e) = plane.put_in_force(plane.embedded.split(), &upstreams).await {
            // nginx may start after bluegreen: the file is there for it.
            tracing::warn!(error = %e, "nginx did not take the servers at start; it reads them when it starts");
        }
        tokio::spawn(tail(Arc::downgrade(&plane)));
        Ok(plane)
    }

    fn addrs(&self, color: Color) -> Vec<SocketAddr> {
        self.embedded
            .upstreams(color)
            .iter()
            .map(|u| u.addr)
            .collect()
    }

    /// Writes the servers for `split` over `upstreams` (temp file, then rename), has nginx
    /// check its config and reloads it. When the check or the reload fails, the previous file
    /// is put back and nothing changed.
    async fn put_in_force(
        &self,
        split: Split,
        upstreams: &[Vec<SocketAddr>; 2],
    ) -> Result<(), String> {
        let _turn = self.writing.lock().await;
        let file = &self.settings.upstream_file;
        let previous = std::fs::read(file).ok();
        let staged = file.with_extension("bluegreen-new");
        std::fs::write(&staged, servers_text(split, upstreams)).map_err(|e| {
            format!(
                "router.upstream_file: cannot write {}: {e}",
                staged.display()
            )
        })?;
        std::fs::rename(&staged, file).map_err(|e| {
            format!(
                "router.upstream_file: cannot replace {}: {e}",
                file.display()
            )
        })?;
        let outcome = match run("router.check", &self.settings.check).await {
            Ok(()) => self.reload().await,
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            let restored = match previous {
                Some(previous) => std::fs::write(file, previous),
                None => std::fs::remove_file(file),
            };
            if let Err(restore) = restored {
                tracing::error!(error = %restore, "cannot put the previous upstream file back");
            }
            return Err(format!("{e}; the previous servers were kept"));
        }
        Ok(())
    }

    /// Runs `reload` and waits until nginx took it: `nginx -s reload` only signals the master,
    /// which then starts new workers and tells the old ones to stop taking connections. Until
    /// then a request can still meet the old servers — a color just rolled back from. Without
    /// a readable pid file (nginx in another pid namespace) the change counts once signalled.
    async fn reload(&self) -> Result<(), String> {
        let watched = match master_pid(&self.settings.pid_file) {
            Ok(master) => Some((
                master,
                workers(master)
                    .into_iter()
                    .map(|w| w.pid)
                    .collect::<Vec<_>>(),
            )),
            Err(e) => {
                if !self.unwatched_said.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "router.pid_file: {e}; a switch through nginx is reported once nginx was told to reload, not once its workers took it"
                    );
                }
                None
            }
        };
        run("router.reload", &self.settings.reload).await?;
        let Some((master, before)) = watched else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
        loop {
            if !Path::new(&format!("/proc/{master}")).exists() {
                return Err(format!(
                    "router.reload: nginx's master (pid {master}) exited during the reload"
                ));
            }
            let now = workers(master);
            let serving = now.iter().filter(|w| !w.shutting_down);
            let (old, fresh): (Vec<&Worker>, Vec<&Worker>) =
                serving.partition(|w| before.contains(&w.pid));
            if !fresh.is_empty() && old.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "router.reload: nginx did not start workers with the new servers within {COMMAND_TIMEOUT:?} (its error log says why)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Reads the access log's new lines into the colors' counters (a log rotated or
    /// truncated is read from its start).
    fn read_log(&self) {
        let mut tail = self.tail.lock().expect("lock");
        let Ok(mut log) = std::fs::File::open(&self.settings.access_log) else {
            return;
        };
        let length = log.metadata().map_or(0, |m| m.len());
        if length < tail.offset {
            tail.offset = 0;
            tail.partial.clear();
        }
        let mut fresh = String::new();
        if log.seek(SeekFrom::Start(tail.offset)).is_err()
            || log.read_to_string(&mut fresh).is_err()
        {
            return;
        }
        tail.offset += fresh.len() as u64;
        let text = std::mem::take(&mut tail.partial) + &fresh;
        let (complete, partial) = text.rsplit_once('\n').unwrap_or(("", &text));
        tail.partial = partial.to_string();
        let upstreams = Color::ALL.map(|c| self.addrs(c));
        for line in complete.lines() {
            if let Some((color, status, seconds)) = parse_line(line, &upstreams) {
                count(&mut tail.totals[color.index()], status, seconds);
            }
        }
    }
}

/// One access log line (`$upstream_addr $status $request_time …`): the color that answered,
/// the status and the time taken. Lines of other upstreams, or without one, are skipped; a
/// request nginx retried on another upstream counts for the last one.
fn parse_line(line: &str, upstreams: &[Vec<SocketAddr>; 2]) -> Option<(Color, u16, f64)> {
    let mut fields = line.split_whitespace();
    let mut addr = fields.next()?;
    let mut status = fields.next()?;
    // `$upstream_addr` lists every upstream tried, "a, b": the answer is the last one's.
    while addr.ends_with(',') {
        addr = status;
        status = fields.next()?;
    }
    let addr: SocketAddr = addr.parse().ok()?;
    let color = Color::ALL
        .into_iter()
        .find(|c| upstreams[c.index()].contains(&addr))?;
    let status = status.parse().ok()?;
    let seconds = fields.next()?.parse().ok()?;
    Some((color, status, seconds))
}

fn count(total: &mut ColorSnapshot, status: u16, seconds: f64) {
    total.requests += 1;
    match status {
        100..=199 => total.responses_1xx += 1,
        200..=299 => total.responses_2xx += 1,
        300..=399 => total.responses_3xx += 1,
        400..=499 => total.responses_4xx += 1,
        _ => total.responses_5xx += 1,
    }
    let micros = (seconds * 1_000_000.0) as u64;
    total.latency_sum_us += micros;
    let bucket = latency_bucket_bounds_us()
        .iter()
        .position(|bound| micros <= *bound)
        .unwrap_or(total.latency_buckets.len() - 1);
    total.latency_buckets[bucket] += 1;
    total.latency_p50_ms = quantile_ms(&total.latency_buckets, 0.50);
    total.latency_p99_ms = quantile_ms(&total.latency_buckets, 0.99);
}

/// The `server` lines for `split`: each color's share spread over its upstreams (nginx has no
/// weight 0, so a color without traffic has no line).
fn servers_text(split: Split, upstreams: &[Vec<SocketAddr>; 2]) -> String {
    let mut text = format!(
        "# Written by bluegreen (router.driver: nginx) for {split}; rewritten at each switch.\n"
    );
    for color in Color::ALL {
        let percent = split.weight(color) as usize;
        let addrs = &upstreams[color.index()];
        if percent == 0 || addrs.is_empty() {
            continue;
        }
        // Weights in the split's proportion whatever the number of upstreams per color.
        let weight = (percent * 100).div_ceil(addrs.len()).max(1);
        for addr in addrs {
            text.push_str(&format!("server {addr} weight={weight}; # {color}\n"));
        }
    }
    text
}

/// nginx's master process, from its pid file (checked to be an nginx master: a stale file
/// may name another process).
fn master_pid(pid_file: &Path) -> Result<u32, String> {
    let text = std::fs::read_to_string(pid_file)
        .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{} holds {:?}, not a pid", pid_file.display(), text.trim()))?;
    let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&title).starts_with("nginx: master process") {
        return Err(format!(
            "{} names pid {pid}, which is not an nginx master process here",
            pid_file.display()
        ));
    }
    Ok(pid)
}

/// One of the master's worker processes.
struct Worker {
    pid: u32,
    /// An old worker after a reload: it stopped taking connections and ends with its last.
    shutting_down: bool,
}

/// The master's worker processes now (its other children — cache manager, loader — left out).
fn workers(master: u32) -> Vec<Worker> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            if ppid != master {
                return None;
            }
            let title = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let title = String::from_utf8_lossy(&title);
            title.contains("worker process").then(|| Worker {
                pid,
                shutting_down: title.contains("shutting down"),
            })
        })
        .collect()
}

/// Runs `argv` (`key` names it in errors); fails with its output when it fails.
async fn run(key: &str, argv: &[String]) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err(format!("{key}: no command"));
    };
    let output = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(COMMAND_TIMEOUT, output)
        .await
        .map_err(|_| {
            format!(
                "{key}: `{}` did not finish within {COMMAND_TIMEOUT:?}",
                argv.join(" ")
            )
        })?
        .map_err(|e| format!("{key}: cannot run `{}`: {e}", argv.join(" ")))?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stderr);
    let said = said.trim();
    Err(format!(
        "{key}: `{}` failed ({}){}",
        argv.join(" "),
        output.status,
        if said.is_empty() {
            String::new()
        } else {
            format!(": {said}")
        }
    ))
}

/// Reads the access log every `TAIL_EVERY` while the plane lives.
async fn tail(plane: Weak<NginxPlane>) {
    loop {
        tokio::time::sleep(TAIL_EVERY).await;
        let Some(plane) = plane.upgrade() else {
            return;
        };
        if plane.is_stopping() {
            return;
        }
        plane.read_log();
    }
}

#[async_trait]
impl DataPlane for NginxPlane {
    fn split(&self) -> Split {
        self.embedded.split()
    }

    fn check_split(&self, split: Split) -> Result<(), String> {
        self.embedded.check_split(split)
    }

    /// One rewrite and one reload; the embedded router's table follows once nginx took it.
    async fn apply_split(&self, split: Split) -> Result<(), String> {
        self.check_split(split)?;
        let upstreams = Color::ALL.map(|c| self.addrs(c));
        self.put_in_force(split, &upstreams).await?;
        self.embedded.apply_split(split).await
    }

    async fn set_upstreams(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String> {
        self.embedded.check_upstreams(color, upstreams).await?;
        let mut all = Color::ALL.map(|c| self.addrs(c));
        all[color.index()] = upstreams.to_vec();
        self.put_in_force(self.embedded.split(), &all).await?;
        self.embedded.set_upstreams(color, upstreams).await
    }

    async fn check_upstreams(&self, color: Color, upstreams: &[SocketAddr]) -> Result<(), String> {
        self.embedded.check_upstreams(color, upstreams).await
    }

    fn upstreams(&self, color: Color) -> Vec<UpstreamHealth> {
        self.embedded.upstreams(color)
    }

    fn healthy_count(&self, color: Color) -> usize {
        self.embedded.healthy_count(color)
    }

    /// As of the tail's last read (at most `TAIL_EVERY` ago).
    fn counters(&self) -> [ColorSnapshot; 2] {
        self.tail.lock().expect("lock").totals.clone()
    }

    fn preview(&self) -> PreviewRoute {
        self.embedded.preview()
    }

    /// The embedded router's picture, with the counters from nginx's access log.
    fn status(&self) -> RouterStatus {
        let mut status = self.embedded.status();
        let counters = self.counters();
        for color in &mut status.colors {
            color.metrics = counters[color.color.index()].clone();
        }
        status
    }

    fn prometheus(&self) -> String {
        super::driven_prometheus("nginx", &self.counters())
    }

    fn is_stopping(&self) -> bool {
        self.embedded.is_stopping()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_that_names_no_nginx_master_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nginx.pid");
        let missing = master_pid(&file).unwrap_err();
        assert!(missing.starts_with("cannot read "), "{missing}");
        std::fs::write(&file, "twelve\n").unwrap();
        let garbage = master_pid(&file).unwrap_err();
        assert!(
            garbage.ends_with("holds \"twelve\", not a pid"),
            "{garbage}"
        );
        // A stale file naming a live process that is not nginx (this test).
        std::fs::write(&file, format!("{}\n", std::process::id())).unwrap();
        let stale = master_pid(&file).unwrap_err();
        assert!(
            stale.contains("which is not an nginx master process here"),
            "{stale}"
        );
    }

    fn upstreams() -> [Vec<SocketAddr>; 2] {
        [
            vec!["127.0.0.1:9001".parse().unwrap()],
            vec![
                "127.0.0.1:9002".parse().unwrap(),
                "127.0.0.1:9003".parse().unwrap(),
            ],
        ]
    }

    #[test]
    fn the_servers_keep_the_split_in_proportion() {
        let text = servers_text(Split::green_percent(20).unwrap(), &upstreams());
        assert!(
            text.contains("server 127.0.0.1:9001 weight=8000; # blue\n"),
            "{text}"
        );
        assert!(
            text.contains("server 127.0.0.1:9002 weight=1000; # green\n"),
            "{text}"
        );
        assert!(
            text.contains("server 127.0.0.1:9003 weight=1000; # green\n"),
            "{text}"
        );
        let all_blue = servers_text(Split::green_percent(0).unwrap(), &upstreams());
        assert!(
            !all_blue.contains("green\n"),
            "no weight 0 in nginx: {all_blue}"
        );
    }

    #[test]
    fn log_lines_count_for_the_color_that_answered() {
        let up = upstreams();
        assert_eq!(
            parse_line("127.0.0.1:9002 502 0.004", &up),
            Some((Color::Green, 502, 0.004))
        );
        // Retried on blue after green failed: blue answered.
        assert_eq!(
            parse_line("127.0.0.1:9002, 127.0.0.1:9001 200 0.010 0.002", &up),
            Some((Color::Blue, 200, 0.010))
        );
        assert_eq!(parse_line("- 404 0.000", &up), None);
        assert_eq!(parse_line("10.0.0.9:80 200 0.1", &up), None);
        assert_eq!(parse_line("", &up), None);
    }
}
