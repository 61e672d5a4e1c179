//! The log lines of a color's instances, of the hooks and of the tests: the newest, or followed as they are written.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use bluegreen_router::Color;
use futures_util::{StreamExt, stream};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::provider::supervisor::Launch;
use super::provider::{LogLine, LogLines};
use super::{CommandError, Controller};

/// How often followed log files are checked for new lines.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

impl Controller {
    /// The newest log lines of a color's instances (or of the hooks, for `hooks`): from the
    /// provider when it keeps them (the engine's container logs), else from the logs folder.
    pub async fn logs(
        &self,
        name: &str,
        lines: usize,
    ) -> Result<Vec<(String, Vec<String>)>, CommandError> {
        if let Ok(color) = name.parse::<Color>()
            && let Some(logs) = self.provider(color).logs(color, lines).await
        {
            return Ok(logs);
        }
        Ok(self
            .log_files(name)?
            .into_iter()
            .filter(|f| f.exists())
            .map(|file| {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = all[all.len().saturating_sub(lines)..]
                    .iter()
                    .map(|l| l.to_string())
                    .collect();
                (file.display().to_string(), tail)
            })
            .collect())
    }

    /// The same logs followed: the newest `lines` of each, then every line as it is written.
    /// A provider's own logs end with the instances followed; files are followed until the
    /// reader leaves.
    pub async fn follow_logs(&self, name: &str, lines: usize) -> Result<LogLines, CommandError> {
        if let Ok(color) = name.parse::<Color>()
            && let Some(followed) = self.provider(color).follow_logs(color, lines).await
        {
            return Ok(followed);
        }
        Ok(follow_files(self.log_files(name)?, lines))
    }

    /// The files under the logs folder that hold `name`'s lines (some may not exist yet).
    fn log_files(&self, name: &str) -> Result<Vec<PathBuf>, CommandError> {
        let dir = &self.logs_dir;
        match name.parse::<Color>() {
            Ok(color) => {
                let count = self.environment(color).provider.instances().len().max(1);
                let mut files: Vec<PathBuf> = (0..count)
                    .map(|slot| Launch::log_path(dir, color, slot))
                    .collect();
                files.push(dir.join(format!("{color}-deploy.log")));
                Ok(files)
            }
            Err(_) if name == "hooks" || name == "tests" => {
                Ok(vec![dir.join(format!("{name}.log"))])
            }
            Err(_) => Err(CommandError::Refused(format!(
                "unknown log {name:?}; use blue, green, hooks or tests"
            ))),
        }
    }
}

/// One followed file: how far it has been read, and a last line not yet ended.
struct Tail {
    path: PathBuf,
    /// Bytes read so far.
    read: u64,
    unfinished: Vec<u8>,
}

/// Follows files like `tail -F`: the newest `lines` of each first, then what is appended. A
/// file that appears later is read from its start; one that shrinks (truncated or replaced)
/// is read again from its start.
fn follow_files(paths: Vec<PathBuf>, lines: usize) -> LogLines {
    let tails: Vec<Tail> = paths
        .into_iter()
        .map(|path| Tail {
            path,
            read: 0,
            unfinished: Vec::new(),
        })
        .collect();
    stream::unfold(
        (
            tails,
            VecDeque::new(),
            tokio::time::interval(FOLLOW_INTERVAL),
            true,
        ),
        move |(mut tails, mut pending, mut tick, first)| async move {
            let mut first = first;
            loop {
                if let Some(line) = pending.pop_front() {
                    return Some((line, (tails, pending, tick, first)));
                }
                tick.tick().await;
                for tail in &mut tails {
                    let newest = first.then_some(lines);
                    pending.extend(read_new(tail, newest).await);
                }
                first = false;
            }
        },
    )
    .boxed()
}

/// What was appended to the file since it was last read, as whole lines (only the newest
/// `newest` of them, when given).
async fn read_new(tail: &mut Tail, newest: Option<usize>) -> Vec<LogLine> {
    let Ok(mut file) = tokio::fs::File::open(&tail.path).await else {
        return Vec::new();
    };
    let Ok(length) = file.metadata().await.map(|m| m.len()) else {
        return Vec::new();
    };
    let mut from = tail.read;
    if length < from {
        from = 0;
        tail.unfinished.clear();
    }
    if length == from {
        tail.read = from;
        return Vec::new();
    }
    let mut bytes = std::mem::take(&mut tail.unfinished);
    let carried = bytes.len();
    if file.seek(std::io::SeekFrom::Start(from)).await.is_err()
        || file.read_to_end(&mut bytes).await.is_err()
    {
        return Vec::new();
    }
    tail.read = from + (bytes.len() - carried) as u64;
    let ended = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    tail.unfinished = bytes.split_off(ended);
    let source = tail.path.display().to_string();
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let skip = newest.map_or(0, |n| all.len().saturating_sub(n));
    all[skip..]
        .iter()
        .map(|line| LogLine {
            source: source.clone(),
            line: line.to_string(),
        })
        .collect()
}
