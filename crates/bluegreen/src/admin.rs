//! The admin API: JSON over a 0600 unix socket, or over TCP behind a bearer token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use axum::Router as Routes;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, serve};
use bluegreen_router::table::constant_time_eq;
use bluegreen_router::{Color, Split};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, watch};

use crate::config::{AdminEndpoint, parse_socket_addr};
use crate::controller::release::{ReleaseKind, ReleaseRequest};
use crate::controller::reload::ReloadError;
use crate::controller::{Command, CommandError, Controller, Gate};

/// An error the API returns: an HTTP status, the field at fault (if any) and what to do.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

impl ApiError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.into()).filter(|f: &String| !f.is_empty() && f != "." && f != "?"),
            message: message.into(),
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        let status = match error {
            CommandError::Refused(_) => StatusCode::CONFLICT,
            CommandError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            field: None,
            message: error.to_string(),
        }
    }
}

/// The longest field path or message an error carries: a refused value is quoted only in
/// part, so a caller's megabyte is never sent back (or logged) whole.
const ERROR_TEXT_LIMIT: usize = 300;

fn excerpt(text: String) -> String {
    if text.len() <= ERROR_TEXT_LIMIT {
        return text;
    }
    let mut end = ERROR_TEXT_LIMIT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let field = self.field.map(excerpt);
        let message = excerpt(self.message);
        let body = json!({ "error": { "status": self.status.as_u16(), "field": field, "message": message } });
        (self.status, Json(body)).into_response()
    }
}

/// Parses a JSON body strictly, naming the field at fault.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("body is not valid JSON: {inner}")
        } else {
            inner.to_string()
        };
        ApiError::invalid(field, message)
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchBody {
    to: Color,
    #[serde(default)]
    from: Option<Color>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsBody {
    #[serde(default)]
    green: Option<u64>,
    #[serde(default)]
    blue: Option<u64>,
}

impl WeightsBody {
    fn split(&self) -> Result<Split, ApiError> {
        let percent = |field: &str, value: u64| {
            if value > 100 {
                Err(ApiError::invalid(
                    field,
                    format!("{value} is out of range; give a whole percent from 0 to 100"),
                ))
            } else {
                Ok(value)
            }
        };
        let green = match (self.green, self.blue) {
            (None, None) => {
                return Err(ApiError::invalid(
                    "green",
                    "missing; give green (or blue) as a percent, e.g. {\"green\": 10}",
                ));
            }
            (Some(green), None) => percent("green", green)?,
            (None, Some(blue)) => 100 - percent("blue", blue)?,
            (Some(green), Some(blue)) => {
                let green = percent("green", green)?;
                if green + percent("blue", blue)? != 100 {
                    return Err(ApiError::invalid(
                        "blue",
                        format!(
                            "blue {blue} + green {green} must add up to 100; give only one of them"
                        ),
                    ));
                }
                green
            }
        };
        Split::green_percent(green).map_err(|e| ApiError::invalid("green", e.to_string()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamsBody {
    environment: Color,
    upstreams: Vec<String>,
}

async fn upstreams(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (environment, addrs) = upstreams_request(&body)?;
    let message = controller.set_upstreams(environment, addrs).await?;
    Ok(Json(json!({ "message": message })).into_response())
}

/// The body of `POST /v1/upstreams` parsed and checked: the color and its distinct addresses.
fn upstreams_request(body: &Bytes) -> Result<(Color, Vec<SocketAddr>), ApiError> {
    let body: UpstreamsBody = parse_body(body)?;
    if body.upstreams.is_empty() {
        return Err(ApiError::invalid(
            "upstreams",
            "is empty; give at least one host:port, e.g. [\"127.0.0.1:9002\"]",
        ));
    }
    let mut addrs = Vec::with_capacity(body.upstreams.len());
    for (i, text) in body.upstreams.iter().enumerate() {
        let addr = parse_socket_addr(text)
            .map_err(|message| ApiError::invalid(format!("upstreams[{i}]"), message))?;
        if addrs.contains(&addr) {
            return Err(ApiError::invalid(
                format!("upstreams[{i}]"),
                format!("{text:?} is listed twice"),
            ));
        }
        addrs.push(addr);
    }
    Ok((body.environment, addrs))
}

async fn history(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (limit, after) = history_query(request.uri().query())?;
    Ok(Json(json!({ "events": controller.history_after(after, limit).await? })).into_response())
}

/// `GET /v1/history`'s query: how many events, and after which id.
fn history_query(query: Option<&str>) -> Result<(usize, i64), ApiError> {
    let query = Query::parse(query, &["limit", "after"])?;
    let limit = query.number("limit", 1..=10_000, 50)? as usize;
    let after = query.number("after", 0..=i64::MAX as u64, 0)? as i64;
    Ok((limit, after))
}

/// Query parameters, each known by name, numbers checked for range.
struct Query<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Query<'a> {
    fn parse(query: Option<&'a str>, known: &[&str]) -> Result<Query<'a>, ApiError> {
        let mut pairs = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !known.contains(&key) {
                return Err(ApiError::invalid(
                    key,
                    format!("unknown query parameter; accepted: {}", known.join(", ")),
                ));
            }
            pairs.push((key, value));
        }
        Ok(Query(pairs))
    }

    fn text(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn number(
        &self,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64, ApiError> {
        let Some(value) = self.text(key) else {
            return Ok(default);
        };
        value
            .parse()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    key,
                    format!(
                        "{value:?} is out of range; use a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )
            })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    environment: Color,
    version: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

async fn deploy(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = deploy_request(&body)?;
    controller.refuse_during_release("a deploy")?;
    let _exclusive = controller.exclusive.lock().await;
    let message = controller
        .deploy(body.environment, &body.version, body.env, None)
        .await?;
    Ok(
        Json(
            json!({ "message": message, "environment": controller.environment(body.environment) }),
        )
        .into_response(),
    )
}

/// The body of `POST /v1/deploy` parsed and checked.
fn deploy_request(body: &Bytes) -> Result<DeployBody, ApiError> {
    let body: DeployBody = parse_body(body)?;
    check_version(&body.version)?;
    check_env(&body.env)?;
    Ok(body)
}

fn check_version(version: &str) -> Result<(), ApiError> {
    if version.trim().is_empty() {
        return Err(ApiError::invalid(
            "version",
            "is empty; give the version to deploy, e.g. \"2.0\"",
        ));
    }
    if version.len() > 128 || version.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid(
            "version",
            format!(
                "{version:?} must be at most 128 characters without spaces or control characters, e.g. \"2.0\" or a git sha"
            ),
        ));
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for key in env.keys() {
        let valid = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(ApiError::invalid(
                format!("env.{key}"),
                "is not a valid environment variable name; use letters, digits and _, e.g. FEATURE_X",
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestBody {
    environment: Color,
}

async fn test(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: TestBody = parse_body(&body)?;
    let results = controller.test_environment(body.environment, None).await?;
    let passed = results.iter().all(|r| r.passed);
    let status = if passed {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    Ok((
        status,
        Json(json!({ "passed": passed, "results": results })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    version: String,
    #[serde(default)]
    strategy: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

async fn start_release(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = release_request(&body)?;
    let release = controller
        .start_release(ReleaseRequest {
            kind: ReleaseKind::Release,
            version: Some(body.version),
            strategy: body.strategy,
            extra_env: body.env,
            to: None,
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "release": release }))).into_response())
}

/// The body of `POST /v1/releases` parsed and checked.
fn release_request(body: &Bytes) -> Result<ReleaseBody, ApiError> {
    let body: ReleaseBody = parse_body(body)?;
    check_version(&body.version)?;
    check_env(&body.env)?;
    Ok(body)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShiftBody {
    to: Color,
    #[serde(default)]
    from: Option<Color>,
    strategy: String,
}

async fn shift(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: ShiftBody = parse_body(&body)?;
    if let Some(from) = body.from
        && controller.plane.split().weight(from) == 0
    {
        return Err(CommandError::Refused(format!(
            "--from {from} does not match the router: {from} takes no traffic"
        ))
        .into());
    }
    let release = controller
        .start_release(ReleaseRequest {
            kind: ReleaseKind::Shift,
            version: None,
            strategy: Some(body.strategy),
            extra_env: BTreeMap::new(),
            to: Some(body.to),
        })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "release": release }))).into_response())
}

async fn releases(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let limit = releases_query(request.uri().query())?;
    Ok(
        Json(json!({ "releases": controller.releases(limit).await?, "active": controller.active_release() }))
            .into_response(),
    )
}

/// `GET /v1/releases`'s query: how many releases.
fn releases_query(query: Option<&str>) -> Result<usize, ApiError> {
    let query = Query::parse(query, &["limit"])?;
    Ok(query.number("limit", 1..=1000, 20)? as usize)
}

fn release_id(id: &str) -> Result<i64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::invalid("id", format!("{id:?} is not a release number, e.g. 3")))
}

async fn release_by_id(
    State(controller): State<Arc<Controller>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = release_id(&id)?;
    let release = match controller.active_release().filter(|r| r.id == id) {
        Some(active) => Some(active),
        None => controller
            .releases(10_000)
            .await?
            .into_iter()
            .find(|r| r.id == id),
    };
    let Some(release) = release else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            field: Some("id".into()),
            message: format!("no release #{id}; see GET /v1/releases"),
        });
    };
    let steps = controller.release_steps(id).await?;
    Ok(Json(json!({ "release": release, "steps": steps })).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ControlBody {
    #[serde(default)]
    full: bool,
    #[serde(default)]
    reason: Option<String>,
}

async fn control(
    controller: Arc<Controller>,
    gate: Gate,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (gate, reason) = control_request(gate, &body)?;
    let message = controller.control(gate, reason).await?;
    Ok(Json(json!({ "message": message })).into_response())
}

/// The body of promote, pause, resume or abort parsed and checked against the gate it is for.
fn control_request(gate: Gate, body: &Bytes) -> Result<(Gate, Option<String>), ApiError> {
    let body: ControlBody = parse_body(body)?;
    let gate = match gate {
        Gate::Promote { .. } => Gate::Promote { full: body.full },
        _ if body.full => return Err(ApiError::invalid("full", "only promote takes full")),
        other => other,
    };
    if body.reason.is_some() && gate != Gate::Abort {
        return Err(ApiError::invalid("reason", "only abort takes a reason"));
    }
    Ok((gate, body.reason))
}

async fn promote(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    control(controller, Gate::Promote { full: false }, body).await
}

async fn abort(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    control(controller, Gate::Abort, body).await
}

async fn pause(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    control(controller, Gate::Pause, body).await
}

async fn resume(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    control(controller, Gate::Resume, body).await
}

async fn diff(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (a, b) = diff_query(request.uri().query())?;
    Ok(Json(json!({ "a": a, "b": b, "differences": controller.diff(a, b) })).into_response())
}

/// `GET /v1/diff`'s query: the two colors compared.
fn diff_query(query: Option<&str>) -> Result<(Color, Color), ApiError> {
    let query = Query::parse(query, &["a", "b"])?;
    let color = |key: &str, default: Color| match query.text(key) {
        None => Ok(default),
        Some(text) => text
            .parse::<Color>()
            .map_err(|e| ApiError::invalid(key, e.to_string())),
    };
    Ok((color("a", Color::Blue)?, color("b", Color::Green)?))
}

/// Server-sent events: a `snapshot` at once and every second after, and an `event` for each
/// event as it is stored, so a watcher misses none. Ends when the daemon stops.
async fn stream(State(controller): State<Arc<Controller>>) -> Response {
    let events = controller.watch_events();
    let tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let body = futures_util::stream::unfold(
        (controller, events, tick),
        |(controller, mut events, mut tick)| async move {
            let chunk = tokio::select! {
                _ = tick.tick() => {
                    if controller.plane.is_stopping() {
                        return None;
                    }
                    format!("event: snapshot\ndata: {}\n\n", controller.snapshot().await)
                }
                received = events.recv() => match received {
                    Ok(event) => format!("event: event\ndata: {}\n\n", json!(event)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        format!("event: lagged\ndata: {missed}\n\n")
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            Some((
                Ok::<_, std::convert::Infallible>(Bytes::from(chunk)),
                (controller, events, tick),
            ))
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

async fn environments(State(controller): State<Arc<Controller>>) -> Response {
    Json(json!({ "environments": controller.environments() })).into_response()
}

async fn logs(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (name, lines) = logs_query(request.uri().query())?;
    let files: Vec<_> = controller
        .logs(name, lines)
        .await?
        .into_iter()
        .map(|(file, lines)| json!({ "file": file, "lines": lines }))
        .collect();
    Ok(Json(json!({ "logs": files })).into_response())
}

/// `GET /v1/logs`'s query: whose log, and how many lines.
fn logs_query(query: Option<&str>) -> Result<(&str, usize), ApiError> {
    let query = Query::parse(query, &["environment", "lines"])?;
    let name = query.text("environment").ok_or_else(|| {
        ApiError::invalid(
            "environment",
            "missing; give environment=blue, green, hooks or tests",
        )
    })?;
    let lines = query.number("lines", 1..=100_000, 100)? as usize;
    Ok((name, lines))
}

fn monitor_query(query: Option<&str>) -> Result<u64, ApiError> {
    let query = Query::parse(query, &["seconds"])?;
    query.number("seconds", 1..=600, 10)
}

async fn monitor(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let seconds = monitor_query(request.uri().query())?;
    Ok(Json(controller.monitor(seconds)).into_response())
}

async fn status(State(controller): State<Arc<Controller>>) -> Response {
    Json(controller.status().await).into_response()
}

async fn metrics(State(controller): State<Arc<Controller>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        controller.plane.prometheus(),
    )
        .into_response()
}

/// `POST /v1/reload`: the config file read again and put in force, or nothing changed (400
/// with every issue of an invalid file, 409 with what cannot change in place).
async fn reload(State(controller): State<Arc<Controller>>) -> Response {
    match controller.reload().await {
        Ok(message) => Json(json!({ "message": message })).into_response(),
        Err(ReloadError::Invalid { path, issues }) => {
            let message = format!(
                "{path} is invalid; the running config stays in force:\n{}",
                issues
                    .iter()
                    .map(|i| format!("  - {i}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            let issues: Vec<_> = issues
                .iter()
                .map(|i| json!({ "field": i.path, "message": i.message }))
                .collect();
            let body = json!({ "error": { "status": 400, "field": null, "message": message, "issues": issues } });
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        Err(refused @ ReloadError::Refused(_)) => ApiError {
            status: StatusCode::CONFLICT,
            field: None,
            message: refused.to_string(),
        }
        .into_response(),
    }
}

async fn switch(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: SwitchBody = parse_body(&body)?;
    let outcome = controller
        .apply(Command::Switch {
            to: body.to,
            from: body.from,
        })
        .await?;
    Ok(Json(outcome).into_response())
}

async fn weights(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: WeightsBody = parse_body(&body)?;
    let outcome = controller.apply(Command::Weights(body.split()?)).await?;
    Ok(Json(outcome).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    to_version: Option<String>,
}

async fn rollback(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Some(version) = rollback_request(&body)? {
        let message = controller.rollback_to_version(&version).await?;
        let split = controller.plane.split();
        return Ok(Json(
            json!({ "message": message, "weights": crate::controller::Weights::from(split) }),
        )
        .into_response());
    }
    let outcome = controller.apply(Command::Rollback).await?;
    Ok(Json(outcome).into_response())
}

/// The body of `POST /v1/rollback` parsed and checked: the version asked for, if any.
fn rollback_request(body: &Bytes) -> Result<Option<String>, ApiError> {
    let body: RollbackBody = parse_body(body)?;
    if let Some(version) = &body.to_version {
        check_version(version).map_err(|e| ApiError {
            field: Some("to_version".into()),
            ..e
        })?;
    }
    Ok(body.to_version)
}

/// Every admin request's input (JSON body, query or path) parsed and checked the way its
/// handler does before it asks the controller anything; `endpoint` is the route's last part
/// (`switch`, `weights`, …; `history?`, `releases?`, `diff?`, `logs?`, `monitor?` for the
/// queries, `releases/` for the id in the path). The fuzz target drives this.
#[doc(hidden)]
pub fn check_request(endpoint: &str, input: &[u8]) -> Result<(), ApiError> {
    let body = Bytes::copy_from_slice(input);
    let text = String::from_utf8_lossy(input);
    match endpoint {
        "switch" => parse_body::<SwitchBody>(&body).map(drop),
        "weights" => parse_body::<WeightsBody>(&body)?.split().map(drop),
        "upstreams" => upstreams_request(&body).map(drop),
        "deploy" => deploy_request(&body).map(drop),
        "test" => parse_body::<TestBody>(&body).map(drop),
        "releases" => release_request(&body).map(drop),
        "shift" => parse_body::<ShiftBody>(&body).map(drop),
        "promote" => control_request(Gate::Promote { full: false }, &body).map(drop),
        "pause" => control_request(Gate::Pause, &body).map(drop),
        "resume" => control_request(Gate::Resume, &body).map(drop),
        "abort" => control_request(Gate::Abort, &body).map(drop),
        "rollback" => rollback_request(&body).map(drop),
        "history?" => history_query(Some(&text)).map(drop),
        "releases?" => releases_query(Some(&text)).map(drop),
        "diff?" => diff_query(Some(&text)).map(drop),
        "logs?" => logs_query(Some(&text)).map(drop),
        "monitor?" => monitor_query(Some(&text)).map(drop),
        "releases/" => release_id(&text).map(drop),
        other => panic!("check_request: no endpoint {other:?}"),
    }
}

/// The admin endpoints [`check_request`] knows.
#[doc(hidden)]
pub const CHECKED_ENDPOINTS: [&str; 18] = [
    "switch",
    "weights",
    "upstreams",
    "deploy",
    "test",
    "releases",
    "shift",
    "promote",
    "pause",
    "resume",
    "abort",
    "rollback",
    "history?",
    "releases?",
    "diff?",
    "logs?",
    "monitor?",
    "releases/",
];

impl ApiError {
    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        field: None,
        message: format!(
            "no such endpoint {} {}; see GET /v1/status, /v1/environments, /v1/diff, /v1/releases, /v1/history, /v1/monitor, /v1/logs, /metrics; POST /v1/deploy, /v1/test, /v1/releases, /v1/shift, /v1/switch, /v1/weights, /v1/rollback, /v1/promote, /v1/pause, /v1/resume, /v1/abort, /v1/upstreams",
            request.method(),
            request.uri().path()
        ),
    }
}

/// TCP callers must send `Authorization: Bearer <token>`.
async fn require_token(
    State(token): State<Arc<String>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
    if !ok {
        let message = if given.is_none() {
            "missing bearer token: send Authorization: Bearer <token> (the token in router.admin_token_file)"
        } else {
            "wrong bearer token"
        };
        let mut response = ApiError {
            status: StatusCode::UNAUTHORIZED,
            field: None,
            message: message.into(),
        }
        .into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            "Bearer realm=\"bluegreen\"".parse().expect("valid header"),
        );
        return response;
    }
    next.run(request).await
}

fn routes(controller: Arc<Controller>) -> Routes {
    Routes::new()
        .route("/v1/status", get(status))
        .route("/v1/switch", post(switch))
        .route("/v1/reload", post(reload))
        .route("/v1/weights", post(weights))
        .route("/v1/rollback", post(rollback))
        .route("/v1/upstreams", post(upstreams))
        .route("/v1/history", get(history))
        .route("/v1/deploy", post(deploy))
        .route("/v1/test", post(test))
        .route("/v1/releases", post(start_release).get(releases))
        .route("/v1/releases/{id}", get(release_by_id))
        .route("/v1/shift", post(shift))
        .route("/v1/promote", post(promote))
        .route("/v1/abort", post(abort))
        .route("/v1/pause", post(pause))
        .route("/v1/resume", post(resume))
        .route("/v1/environments", get(environments))
        .route("/v1/diff", get(diff))
        .route("/v1/logs", get(logs))
        .route("/v1/monitor", get(monitor))
        .route("/v1/stream", get(stream))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(controller)
}

/// The dashboard page: one HTML file with its script, served by the binary (no build step).
const DASHBOARD_PAGE: &str = include_str!("dashboard.html");

async fn dashboard_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_PAGE,
    )
        .into_response()
}

/// The web dashboard: the page, its live stream and release history for anyone who can reach
/// `dashboard.listen` (loopback by default); its buttons' calls need the dashboard token.
fn dashboard_routes(controller: Arc<Controller>, token: Arc<String>) -> Routes {
    let actions = Routes::new()
        .route("/api/switch", post(switch))
        .route("/api/promote", post(promote))
        .route("/api/pause", post(pause))
        .route("/api/resume", post(resume))
        .route("/api/abort", post(abort))
        .route("/api/rollback", post(rollback))
        .layer(middleware::from_fn_with_state(token, require_token));
    Routes::new()
        .route("/", get(dashboard_page))
        .route("/api/stream", get(stream))
        .route("/api/releases", get(releases))
        .route("/api/history", get(history))
        .route("/api/status", get(status))
        .merge(actions)
        .fallback(not_found)
        .with_state(controller)
}

/// Serves the dashboard until `shutdown` turns true.
pub async fn run_dashboard(
    listener: TcpListener,
    token: String,
    controller: Arc<Controller>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let app = dashboard_routes(controller, Arc::new(token));
    if let Err(error) = serve(listener, app).with_graceful_shutdown(stop).await {
        tracing::error!(%error, "dashboard stopped");
    }
}

/// The dashboard token: read from its file, or created there (mode 0600) on first start.
pub fn dashboard_token(path: &std::path::Path) -> Result<String, String> {
    if let Ok(token) = std::fs::read_to_string(path) {
        let token = token.trim().to_string();
        if token.len() < 16 {
            return Err(format!(
                "dashboard.token_file: {} holds a token shorter than 16 characters; write a long random one",
                path.display()
            ));
        }
        return Ok(token);
    }
    let mut bytes = [0u8; 24];
    let mut filled = 0;
    while filled < bytes.len() {
        filled +=
            rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
                .map_err(|e| format!("dashboard: no randomness for a token: {e}"))?;
    }
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            format!(
                "dashboard.token_file: cannot create {}: {e}",
                path.display()
            )
        })?;
    writeln!(file, "{token}")
        .map_err(|e| format!("dashboard.token_file: cannot write {}: {e}", path.display()))?;
    Ok(token)
}

/// A bound admin listener, ready to serve.
pub enum AdminListener {
    Unix(UnixListener),
    Tcp(TcpListener, Arc<String>),
}

/// Binds the admin endpoint. A unix socket is created mode 0600; a leftover socket from a
/// daemon that died is replaced, a live one is an error.
pub async fn bind(endpoint: &AdminEndpoint, token: Option<&str>) -> Result<AdminListener, String> {
    match endpoint {
        AdminEndpoint::Unix(path) => {
            if path.exists() {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(format!(
                        "router.admin: another bluegreen daemon is already listening on {}; stop it first",
                        path.display()
                    ));
                }
                std::fs::remove_file(path).map_err(|e| {
                    format!(
                        "router.admin: cannot remove stale socket {}: {e}",
                        path.display()
                    )
                })?;
            }
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("router.admin: cannot create {}: {e}", dir.display()))?;
            }
            let listener = UnixListener::bind(path)
                .map_err(|e| format!("router.admin: cannot bind {}: {e}", path.display()))?;
            set_owner_only(path)?;
            Ok(AdminListener::Unix(listener))
        }
        AdminEndpoint::Tcp(addr) => {
            let token = token.ok_or("router.admin_token_file: required for a TCP admin address")?;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("router.admin: cannot bind {addr}: {e}"))?;
            Ok(AdminListener::Tcp(listener, Arc::new(token.to_string())))
        }
    }
}

fn set_owner_only(path: &std::path::Path) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("router.admin: cannot chmod 0600 {}: {e}", path.display()))
}

pub async fn run(
    listener: AdminListener,
    controller: Arc<Controller>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let result = match listener {
        AdminListener::Unix(listener) => {
            serve(listener, routes(controller))
                .with_graceful_shutdown(stop)
                .await
        }
        AdminListener::Tcp(listener, token) => {
            let app =
                routes(controller).layer(middleware::from_fn_with_state(token, require_token));
            serve(listener, app).with_graceful_shutdown(stop).await
        }
    };
    if let Err(error) = result {
        tracing::error!(%error, "admin API stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz target's entry point: each endpoint takes its good input and refuses junk
    /// with a 400, so a fuzzed refusal that is not a 400 is a finding, not the harness.
    #[test]
    fn check_request_knows_every_endpoint_it_lists() {
        let good: [(&str, &str); 18] = [
            ("switch", r#"{"to":"green"}"#),
            ("weights", r#"{"green":40,"blue":60}"#),
            (
                "upstreams",
                r#"{"environment":"blue","upstreams":["127.0.0.1:9001"]}"#,
            ),
            (
                "deploy",
                r#"{"environment":"green","version":"2.0","env":{"A_1":"x"}}"#,
            ),
            ("test", r#"{"environment":"green"}"#),
            ("releases", r#"{"version":"2.0","strategy":"careful"}"#),
            ("shift", r#"{"to":"green","strategy":"steady"}"#),
            ("promote", r#"{"full":true}"#),
            ("pause", ""),
            ("resume", "{}"),
            ("abort", r#"{"reason":"errors up"}"#),
            ("rollback", r#"{"to_version":"1.9"}"#),
            ("history?", "limit=10&after=3"),
            ("releases?", "limit=5"),
            ("diff?", "a=green&b=blue"),
            ("logs?", "environment=blue&lines=20"),
            ("monitor?", "seconds=30"),
            ("releases/", "42"),
        ];
        assert_eq!(good.map(|(e, _)| e), CHECKED_ENDPOINTS);
        for (endpoint, input) in good {
            assert!(
                check_request(endpoint, input.as_bytes()).is_ok(),
                "{endpoint}"
            );
            let refused = check_request(endpoint, b"\xff{\"x\": [").unwrap_err();
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{endpoint}");
        }
    }
}
