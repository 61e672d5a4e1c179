//! User commands the controller runs (hooks, test commands, pipeline stages, deploy scripts) and the webhook.

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use serde::Serialize;

use crate::config::controller::Webhook;
use crate::transport::http_request;

/// The facts of a release a command gets as `BLUEGREEN_*` environment variables.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Facts {
    pub service: String,
    pub release_id: Option<i64>,
    pub version: Option<String>,
    pub color: Option<String>,
    pub from_color: Option<String>,
    pub from_version: Option<String>,
    pub router_url: String,
    pub preview_header: Option<String>,
    /// `Header: secret` when previews need the secret.
    pub preview_secret: Option<String>,
    pub reason: Option<String>,
}

impl Facts {
    fn env(&self, step: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("BLUEGREEN_SERVICE", self.service.clone()),
            ("BLUEGREEN_STEP", step.to_string()),
            ("BLUEGREEN_ROUTER_URL", self.router_url.clone()),
        ];
        let optional = [
            (
                "BLUEGREEN_RELEASE_ID",
                self.release_id.map(|id| id.to_string()),
            ),
            ("BLUEGREEN_VERSION", self.version.clone()),
            ("BLUEGREEN_COLOR", self.color.clone()),
            ("BLUEGREEN_FROM_COLOR", self.from_color.clone()),
            ("BLUEGREEN_FROM_VERSION", self.from_version.clone()),
            ("BLUEGREEN_REASON", self.reason.clone()),
        ];
        env.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
        if let (Some(header), Some(color)) = (&self.preview_header, &self.color) {
            env.push(("BLUEGREEN_PREVIEW_URL", self.router_url.clone()));
            env.push(("BLUEGREEN_PREVIEW_HEADER", format!("{header}: {color}")));
            if let Some(secret) = &self.preview_secret {
                env.push(("BLUEGREEN_PREVIEW_SECRET_HEADER", secret.clone()));
            }
        }
        env
    }
}

/// Runs `argv` with the facts in its environment, its output appended to `log`. Fails on a
/// non-zero exit or the timeout, with the last lines of its output in the message.
pub async fn run(
    step: &str,
    argv: &[String],
    facts: &Facts,
    extra_env: &[(String, String)],
    timeout: Duration,
    log: &Path,
) -> Result<String, String> {
    let mut command = tokio::process::Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .envs(facts.env(step))
        .envs(extra_env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("{step}: cannot run {}: {e}", argv[0]))?;
    // Read the pipes in tasks of their own: a script that leaves a background child holding
    // them open (`./app &`) must not keep the step waiting once the script itself has exited.
    let stdout_sink = Arc::new(Mutex::new(Vec::new()));
    let stderr_sink = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        child
            .stdout
            .take()
            .map(|pipe| tokio::spawn(collect(pipe, Arc::clone(&stdout_sink)))),
        child
            .stderr
            .take()
            .map(|pipe| tokio::spawn(collect(pipe, Arc::clone(&stderr_sink)))),
    ];
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(format!("{step}: {} failed to run: {e}", argv[0])),
        Err(_) => {
            return Err(format!(
                "{step}: {} did not finish within {}s (killed)",
                argv[0],
                timeout.as_secs()
            ));
        }
    };
    for reader in readers.into_iter().flatten() {
        let abort = reader.abort_handle();
        if tokio::time::timeout(Duration::from_millis(500), reader)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let output = Output {
        status,
        stdout: std::mem::take(&mut *stdout_sink.lock().expect("lock")),
        stderr: std::mem::take(&mut *stderr_sink.lock().expect("lock")),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(
            file,
            "==> {step}: {} ({})\n{stdout}{stderr}",
            argv.join(" "),
            output.status
        );
    }
    if output.status.success() {
        Ok(stdout)
    } else {
        let tail: Vec<&str> = stderr.lines().chain(stdout.lines()).collect();
        let tail = tail[tail.len().saturating_sub(3)..].join(" | ");
        Err(format!(
            "{step}: {} exited with {}{}",
            argv[0],
            output.status,
            if tail.is_empty() {
                String::new()
            } else {
                format!(": {tail}")
            }
        ))
    }
}

/// Appends what a pipe yields to `sink` until it closes.
async fn collect(mut pipe: impl tokio::io::AsyncRead + Unpin, sink: Arc<Mutex<Vec<u8>>>) {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 8192];
    while let Ok(read) = pipe.read(&mut chunk).await {
        if read == 0 {
            break;
        }
        sink.lock().expect("lock").extend_from_slice(&chunk[..read]);
    }
}

/// Posts one event as JSON, best effort: a webhook that is down never holds a release back.
pub fn notify(webhook: &Webhook, payload: serde_json::Value) {
    let webhook = webhook.clone();
    tokio::spawn(async move {
        let path = webhook
            .url
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let host = webhook
            .url
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::HOST, host)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "bluegreen")
            .body(Full::new(Bytes::from(payload.to_string())))
            .expect("a valid request");
        let sent = http_request(webhook.addr, webhook.tls.as_ref(), request, webhook.timeout).await;
        match sent {
            Ok((status, _, _)) if status.is_success() => {}
            Ok((status, _, _)) => {
                tracing::warn!(%status, url = %webhook.url, "webhook refused the event")
            }
            Err(error) => tracing::warn!(%error, url = %webhook.url, "webhook not reached"),
        }
    });
}
