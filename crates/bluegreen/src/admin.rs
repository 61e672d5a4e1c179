//! The admin API: JSON over a 0600 unix socket, or over TCP behind a bearer token.

mod openapi;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use axum::Router as Routes;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, serve};
use bluegreen_router::table::constant_time_eq;
use bluegreen_router::{Color, Split};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, watch};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::{AdminEndpoint, parse_socket_addr};
use crate::controller::checks::CheckResult;
use crate::controller::release::{Release, ReleaseKind, ReleaseRequest};
use crate::controller::reload::ReloadError;
use crate::controller::traffic::{ControllerStatus, Outcome, Weights};
use crate::controller::views::{Difference, MirrorView, MonitorView};
use crate::controller::{Command, CommandError, Controller, EnvironmentView, Gate};
use crate::store::{EnvironmentRecord, Event, StepRecord};

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

/// What every refused or failed call answers.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The HTTP status again, for scripts that only keep the body.
    status: u16,
    /// The request field at fault (`green`, `upstreams[1]`, `limit`…), if one is.
    field: Option<String>,
    message: String,
    /// Only from `POST /v1/reload`: every issue of the invalid config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    issues: Option<Vec<ConfigIssueBody>>,
}

/// One issue of an invalid config file: the key at fault (empty for the whole file) and why.
#[derive(Serialize, ToSchema)]
pub struct ConfigIssueBody {
    field: String,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                status: self.status.as_u16(),
                field: self.field.map(excerpt),
                message: excerpt(self.message),
                issues: None,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// A change carried out, in words.
#[derive(Serialize, ToSchema)]
pub struct MessageBody {
    message: String,
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchBody {
    to: Color,
    /// Refused unless this color is live now (a guard against a stale view).
    #[serde(default)]
    from: Option<Color>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightsBody {
    /// Percent of traffic to green (blue gets the rest).
    #[serde(default)]
    #[schema(maximum = 100)]
    green: Option<u64>,
    /// Percent of traffic to blue; with green too, the two must add up to 100.
    #[serde(default)]
    #[schema(maximum = 100)]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamsBody {
    environment: Color,
    /// `host:port` addresses, at least one, none twice.
    #[schema(min_items = 1, example = json!(["127.0.0.1:9002"]))]
    upstreams: Vec<String>,
}

/// Points a color at other upstreams (static and command providers), health-checked first.
#[utoipa::path(post, path = "/v1/upstreams", tag = "traffic", request_body = UpstreamsBody,
    responses(
        (status = 200, description = "The color's upstreams replaced (static and command providers)", body = MessageBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
async fn upstreams(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let (environment, addrs) = upstreams_request(&body)?;
    let message = controller.set_upstreams(environment, addrs).await?;
    Ok(Json(MessageBody { message }).into_response())
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

/// The audit log, oldest first.
#[derive(Serialize, ToSchema)]
pub struct HistoryBody {
    events: Vec<Event>,
}

/// The audit log: every change, who asked and what happened.
#[utoipa::path(get, path = "/v1/history", tag = "history",
    params(
        ("limit" = Option<u64>, Query, description = "At most this many events (default 50)", minimum = 1, maximum = 10000),
        ("after" = Option<u64>, Query, description = "Only events with a greater id (default 0)", maximum = 9223372036854775807_u64)
    ),
    responses(
        (status = 200, description = "Events after `after`, oldest first", body = HistoryBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody)
    )
)]
async fn history(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (limit, after) = history_query(request.uri().query())?;
    let events = controller.history_after(after, limit).await?;
    Ok(Json(HistoryBody { events }).into_response())
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployBody {
    environment: Color,
    /// At most 128 bytes, no spaces or control characters: e.g. `2.0` or a git sha.
    #[schema(min_length = 1, max_length = 128, example = "2.0")]
    version: String,
    /// Extra environment variables for the instances, named with letters, digits and `_`.
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// A color deployed: what was done, and its record now.
#[derive(Serialize, ToSchema)]
pub struct DeployResult {
    message: String,
    environment: EnvironmentRecord,
}

/// Deploys a version to a color, which takes no traffic until a switch.
#[utoipa::path(post, path = "/v1/deploy", tag = "environments", request_body = DeployBody,
    responses(
        (status = 200, description = "The version runs in the color and is healthy", body = DeployResult),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
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
    let environment = controller.environment(body.environment);
    Ok(Json(DeployResult {
        message,
        environment,
    })
    .into_response())
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TestBody {
    environment: Color,
}

/// The smoke tests' results.
#[derive(Serialize, ToSchema)]
pub struct TestResult {
    passed: bool,
    results: Vec<CheckResult>,
}

/// Runs the configured smoke tests against a color through the preview route.
#[utoipa::path(post, path = "/v1/test", tag = "environments", request_body = TestBody,
    responses(
        (status = 200, description = "Every check passed", body = TestResult),
        (status = 422, description = "A check failed (each result says why)", body = TestResult),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
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
    Ok((status, Json(TestResult { passed, results })).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    /// At most 128 bytes, no spaces or control characters: e.g. `2.0` or a git sha.
    #[schema(min_length = 1, max_length = 128, example = "2.0")]
    version: String,
    /// A strategy by name (`instant`, `canary-10-5m`, one under `strategies:`…); the
    /// config's `release.strategy` when not given.
    #[serde(default)]
    strategy: Option<String>,
    /// Extra environment variables for the instances, named with letters, digits and `_`.
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// A release accepted: it goes on in the background (follow it with `GET /v1/releases/{id}`).
#[derive(Serialize, ToSchema)]
pub struct ReleaseAccepted {
    release: Release,
}

/// Starts a release: deploy to the idle color, test, shift traffic by the strategy, monitor.
#[utoipa::path(post, path = "/v1/releases", tag = "releases", request_body = ReleaseBody,
    responses(
        (status = 202, description = "The release started", body = ReleaseAccepted),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
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
    Ok((StatusCode::ACCEPTED, Json(ReleaseAccepted { release })).into_response())
}

/// The body of `POST /v1/releases` parsed and checked.
fn release_request(body: &Bytes) -> Result<ReleaseBody, ApiError> {
    let body: ReleaseBody = parse_body(body)?;
    check_version(&body.version)?;
    check_env(&body.env)?;
    Ok(body)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShiftBody {
    to: Color,
    /// Refused unless this color takes traffic now (a guard against a stale view).
    #[serde(default)]
    from: Option<Color>,
    /// A strategy by name (`instant`, `canary-10-5m`, one under `strategies:`…).
    strategy: String,
}

/// Shifts traffic to a color already deployed, step by step by the strategy.
#[utoipa::path(post, path = "/v1/shift", tag = "releases", request_body = ShiftBody,
    responses(
        (status = 202, description = "The shift started", body = ReleaseAccepted),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
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
    Ok((StatusCode::ACCEPTED, Json(ReleaseAccepted { release })).into_response())
}

/// Recent releases, newest first, and the one in progress.
#[derive(Serialize, ToSchema)]
pub struct ReleaseList {
    releases: Vec<Release>,
    active: Option<Release>,
}

/// Recent releases and the one in progress.
#[utoipa::path(get, path = "/v1/releases", tag = "releases",
    params(("limit" = Option<u64>, Query, description = "At most this many releases (default 20)", minimum = 1, maximum = 1000)),
    responses(
        (status = 200, description = "Recent releases, newest first", body = ReleaseList),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody)
    )
)]
async fn releases(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let limit = releases_query(request.uri().query())?;
    Ok(Json(ReleaseList {
        releases: controller.releases(limit).await?,
        active: controller.active_release(),
    })
    .into_response())
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

/// One release and its steps.
#[derive(Serialize, ToSchema)]
pub struct ReleaseDetail {
    release: Release,
    steps: Vec<StepRecord>,
}

/// One release with its steps.
#[utoipa::path(get, path = "/v1/releases/{id}", tag = "releases",
    params(("id" = i64, Path, description = "The release number")),
    responses(
        (status = 200, description = "The release and its steps", body = ReleaseDetail),
        (status = 400, description = "`id` is not a release number", body = ErrorBody),
        (status = 404, description = "No release has this number", body = ErrorBody),
        (status = 500, description = "The store could not be read", body = ErrorBody)
    )
)]
async fn release_by_id(
    State(controller): State<Arc<Controller>>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    // A segment that is not UTF-8 once decoded gets our JSON error, not axum's plain text.
    let Path(id) = id.map_err(|e| ApiError::invalid("id", e.body_text()))?;
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
    Ok(Json(ReleaseDetail { release, steps }).into_response())
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlBody {
    /// Promote only: go straight to 100 % rather than to the next step.
    #[serde(default)]
    full: bool,
    /// Abort only: recorded with the release and in the history.
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
    Ok(Json(MessageBody { message }).into_response())
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

/// Lets the release in progress go on past its hold.
#[utoipa::path(post, path = "/v1/promote", tag = "releases", request_body = Option<ControlBody>,
    responses(
        (status = 200, description = "The release goes on to its next step (or to 100 % with `full`)", body = MessageBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
async fn promote(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    control(controller, Gate::Promote { full: false }, body).await
}

/// Stops the release in progress; traffic goes back.
#[utoipa::path(post, path = "/v1/abort", tag = "releases", request_body = Option<ControlBody>,
    responses(
        (status = 200, description = "The release stops and traffic returns to the color it came from", body = MessageBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
async fn abort(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    control(controller, Gate::Abort, body).await
}

/// Holds the release in progress at its step.
#[utoipa::path(post, path = "/v1/pause", tag = "releases", request_body = Option<ControlBody>,
    responses(
        (status = 200, description = "The release holds its step until resumed", body = MessageBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
async fn pause(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    control(controller, Gate::Pause, body).await
}

/// Lets a paused release go on.
#[utoipa::path(post, path = "/v1/resume", tag = "releases", request_body = Option<ControlBody>,
    responses(
        (status = 200, description = "The paused release goes on", body = MessageBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
async fn resume(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    control(controller, Gate::Resume, body).await
}

/// How two colors differ.
#[derive(Serialize, ToSchema)]
pub struct DiffBody {
    a: Color,
    b: Color,
    differences: Vec<Difference>,
}

/// How two colors differ: what they run and their effective specs.
#[utoipa::path(get, path = "/v1/diff", tag = "environments",
    params(
        ("a" = Option<Color>, Query, description = "The first color (default blue)"),
        ("b" = Option<Color>, Query, description = "The second color (default green)")
    ),
    responses(
        (status = 200, description = "What the two colors run and how their specs differ", body = DiffBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody)
    )
)]
async fn diff(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (a, b) = diff_query(request.uri().query())?;
    let differences = controller.diff(a, b);
    Ok(Json(DiffBody { a, b, differences }).into_response())
}

/// Shadow traffic: the running (else the last) release's mirror verdict, and the router's
/// mirror counters with the first differing pairs of answers.
#[utoipa::path(get, path = "/v1/mirror", tag = "releases",
    responses(
        (status = 200, description = "The mirror's verdict, counters and first differing pairs", body = MirrorView)
    )
)]
async fn mirror(State(controller): State<Arc<Controller>>) -> Json<MirrorView> {
    Json(controller.mirror_view().await)
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

/// How long the live stream waits for one snapshot before skipping it.
const SNAPSHOT_PATIENCE: std::time::Duration = std::time::Duration::from_millis(900);

/// Server-sent events: a `snapshot` at once and every second after, and an `event` for each
/// event as it is stored, so a watcher misses none. Ends when the daemon stops.
#[utoipa::path(get, path = "/v1/stream", tag = "status",
    responses(
        (status = 200, description = "Server-sent events: `snapshot` (the status, every second), `event` (each event as it is stored) and `lagged` (how many events a slow reader missed)", content_type = "text/event-stream", body = String)
    )
)]
async fn stream(State(controller): State<Arc<Controller>>) -> Response {
    let events = controller.watch_events();
    let tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let body = futures_util::stream::unfold(
        (controller, events, tick),
        |(controller, mut events, mut tick)| async move {
            let chunk = tokio::select! {
                // Events first: a snapshot never holds one back.
                biased;
                received = events.recv() => match received {
                    Ok(event) => format!("event: event\ndata: {}\n\n", serde_json::json!(event)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        format!("event: lagged\ndata: {missed}\n\n")
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = tick.tick() => {
                    if controller.plane.is_stopping() {
                        return None;
                    }
                    // A snapshot reads the fleet's reports from etcd; while the cluster is
                    // degraded that can take seconds, and the stream must go on meanwhile.
                    match tokio::time::timeout(SNAPSHOT_PATIENCE, controller.snapshot()).await {
                        Ok(snapshot) => format!("event: snapshot\ndata: {snapshot}\n\n"),
                        Err(_) => ": snapshot skipped (the state store is slow to answer)\n\n".to_string(),
                    }
                }
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

/// Both colors: what runs there and the effective spec.
#[derive(Serialize, ToSchema)]
pub struct EnvironmentsBody {
    environments: Vec<EnvironmentView>,
}

/// Both colors: record, instances and effective spec.
#[utoipa::path(get, path = "/v1/environments", tag = "environments",
    responses(
        (status = 200, description = "Both colors", body = EnvironmentsBody)
    )
)]
async fn environments(State(controller): State<Arc<Controller>>) -> Response {
    Json(EnvironmentsBody {
        environments: controller.environments(),
    })
    .into_response()
}

/// The newest lines of each log file of a color (or of the hooks or tests).
#[derive(Serialize, ToSchema)]
pub struct LogsBody {
    logs: Vec<LogFile>,
}

#[derive(Serialize, ToSchema)]
pub struct LogFile {
    file: String,
    lines: Vec<String>,
}

/// The newest log lines of a color's instances, or of the hooks or tests.
#[utoipa::path(get, path = "/v1/logs", tag = "environments",
    params(
        ("environment" = String, Query, description = "`blue`, `green`, `hooks` or `tests`", pattern = "^(blue|green|hooks|tests)$"),
        ("lines" = Option<u64>, Query, description = "At most this many lines per file (default 100)", minimum = 1, maximum = 100000)
    ),
    responses(
        (status = 200, description = "Each log file's newest lines", body = LogsBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
async fn logs(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (name, lines) = logs_query(request.uri().query())?;
    let files: Vec<_> = controller
        .logs(name, lines)
        .await?
        .into_iter()
        .map(|(file, lines)| LogFile { file, lines })
        .collect();
    Ok(Json(LogsBody { logs: files }).into_response())
}

/// The same logs followed as they are written: newline-delimited JSON, one
/// `{"source", "line"}` object per line. Ends when the containers followed stop (docker) or
/// the daemon stops.
#[utoipa::path(get, path = "/v1/logs/follow", tag = "environments",
    params(
        ("environment" = String, Query, description = "`blue`, `green`, `hooks` or `tests`", pattern = "^(blue|green|hooks|tests)$"),
        ("lines" = Option<u64>, Query, description = "Start with at most this many of each file's newest lines (default 100)", minimum = 1, maximum = 100000)
    ),
    responses(
        (status = 200, description = "One JSON object per line: `source` (the file or container) and `line`", content_type = "application/x-ndjson", body = String),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody)
    )
)]
async fn follow_logs(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (name, lines) = logs_query(request.uri().query())?;
    let followed = controller.follow_logs(name, lines).await?;
    let tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let body = futures_util::stream::unfold(
        (controller, followed, tick),
        |(controller, mut followed, mut tick)| async move {
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if controller.plane.is_stopping() {
                            return None;
                        }
                    }
                    line = futures_util::StreamExt::next(&mut followed) => {
                        let mut chunk = serde_json::to_vec(&line?).expect("a log line serializes");
                        chunk.push(b'\n');
                        return Some((
                            Ok::<_, std::convert::Infallible>(Bytes::from(chunk)),
                            (controller, followed, tick),
                        ));
                    }
                }
            }
        },
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response())
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
    if name.parse::<Color>().is_err() && name != "hooks" && name != "tests" {
        return Err(ApiError::invalid(
            "environment",
            format!("unknown log {name:?}; use blue, green, hooks or tests"),
        ));
    }
    let lines = query.number("lines", 1..=100_000, 100)? as usize;
    Ok((name, lines))
}

fn monitor_query(query: Option<&str>) -> Result<u64, ApiError> {
    let query = Query::parse(query, &["seconds"])?;
    query.number("seconds", 1..=600, 10)
}

/// Each color's numbers over a recent window, for `bluegreen monitor`.
#[utoipa::path(get, path = "/v1/monitor", tag = "status",
    params(("seconds" = Option<u64>, Query, description = "The window (default 10)", minimum = 1, maximum = 600)),
    responses(
        (status = 200, description = "Each color over the window, and the release in progress", body = MonitorView),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody)
    )
)]
async fn monitor(
    State(controller): State<Arc<Controller>>,
    request: Request,
) -> Result<Response, ApiError> {
    let seconds = monitor_query(request.uri().query())?;
    Ok(Json(controller.monitor(seconds)).into_response())
}

/// The router and controller now: live color, weights, both colors, the release.
#[utoipa::path(get, path = "/v1/status", tag = "status",
    responses(
        (status = 200, description = "The router, both colors and the release in progress", body = ControllerStatus)
    )
)]
async fn status(State(controller): State<Arc<Controller>>) -> Response {
    Json(controller.status().await).into_response()
}

/// The router's metrics for Prometheus.
#[utoipa::path(get, path = "/metrics", tag = "status",
    responses(
        (status = 200, description = "The router's counters in the Prometheus text format", content_type = "text/plain", body = String)
    )
)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    /// An absolute path; none: the binary the daemon was started from.
    #[schema(value_type = Option<String>, example = "/usr/local/bin/bluegreen")]
    binary: Option<std::path::PathBuf>,
    /// How long the new process has to take over (default 60s).
    timeout: Option<String>,
}

/// `POST /v1/upgrade`: the daemon hands its sockets, instances and release to a new process
/// of `binary`, answering once that one serves (200), or once it was given up and this one
/// goes on serving (502, with why).
#[utoipa::path(post, path = "/v1/upgrade", tag = "config", request_body = UpgradeBody,
    responses(
        (status = 200, description = "A new process of the binary serves and controls; this one drains and exits", body = MessageBody),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "An upgrade is already under way, or this daemon cannot upgrade itself; nothing changed", body = ErrorBody),
        (status = 502, description = "The new process failed or was not ready in time: it was stopped, and this one goes on serving and controlling", body = ErrorBody),
        (status = 503, description = "This daemon is handing over to a new binary; send the request again", body = ErrorBody)
    )
)]
async fn upgrade(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let message = upgrade_to(&controller, parse_body(&body)?).await?;
    Ok(Json(MessageBody { message }).into_response())
}

/// Asks the daemon process for the upgrade and waits for its outcome.
async fn upgrade_to(controller: &Controller, body: UpgradeBody) -> Result<String, ApiError> {
    let (binary, timeout) = upgrade_request(body)?;
    let Some(asks) = controller.upgrades.get() else {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            field: None,
            message: "this daemon cannot upgrade itself (it was not started by `bluegreen up`)"
                .into(),
        });
    };
    let (ask, outcome) = crate::handoff::UpgradeAsk::new(binary, timeout);
    let busy = || ApiError {
        status: StatusCode::CONFLICT,
        field: None,
        message: "an upgrade is already under way".into(),
    };
    asks.try_send(ask).map_err(|_| busy())?;
    match outcome.await {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(why)) => Err(ApiError {
            status: StatusCode::BAD_GATEWAY,
            field: None,
            message: why,
        }),
        Err(_) => Err(busy()),
    }
}

/// `POST /v1/reload`: the config file read again and put in force, or nothing changed (400
/// with every issue of an invalid file, 409 with what cannot change in place).
#[utoipa::path(post, path = "/v1/reload", tag = "config",
    responses(
        (status = 200, description = "The config file is in force", body = MessageBody),
        (status = 400, description = "The file is invalid (`issues` lists each problem); the running config stays in force", body = ErrorBody),
        (status = 409, description = "The file cannot be read, or changes what cannot change while the daemon runs; nothing changed", body = ErrorBody)
    )
)]
async fn reload(State(controller): State<Arc<Controller>>) -> Response {
    match controller.reload().await {
        Ok(message) => Json(MessageBody { message }).into_response(),
        Err(ReloadError::Invalid { path, issues }) => {
            let message = format!(
                "{path} is invalid; the running config stays in force:\n{}",
                issues
                    .iter()
                    .map(|i| format!("  - {i}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            let issues = issues
                .into_iter()
                .map(|i| ConfigIssueBody {
                    field: i.path,
                    message: i.message,
                })
                .collect();
            let body = ErrorBody {
                error: ErrorDetail {
                    status: 400,
                    field: None,
                    message,
                    issues: Some(issues),
                },
            };
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        Err(refused @ ReloadError::Refused(_)) => ApiError {
            status: StatusCode::CONFLICT,
            field: None,
            message: refused.to_string(),
        }
        .into_response(),
        // Built into the router: a new process of the same binary reads the file.
        Err(ReloadError::NeedsNewProcess(keys)) => {
            let body = UpgradeBody {
                binary: None,
                timeout: None,
            };
            match upgrade_to(&controller, body).await {
                Ok(message) => Json(MessageBody {
                    message: format!(
                        "config reloaded in a new process ({} changed): {message}",
                        keys.join(", ")
                    ),
                })
                .into_response(),
                Err(error) => error.into_response(),
            }
        }
    }
}

/// Sends all traffic to one color.
#[utoipa::path(post, path = "/v1/switch", tag = "traffic", request_body = SwitchBody,
    responses(
        (status = 200, description = "All traffic goes to `to` (`changed` is false when it already did)", body = Outcome),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
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

/// Splits traffic between the colors by percent.
#[utoipa::path(post, path = "/v1/weights", tag = "traffic", request_body = WeightsBody,
    responses(
        (status = 200, description = "Traffic is split as asked", body = Outcome),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
async fn weights(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: WeightsBody = parse_body(&body)?;
    let outcome = controller.apply(Command::Weights(body.split()?)).await?;
    Ok(Json(outcome).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// Redeploy this earlier version to the idle color and switch to it, rather than
    /// switching back to the color `rollback_to` names.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 128)]
    to_version: Option<String>,
}

/// A rollback to an earlier version: redeployed to the idle color, which now takes all traffic.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)] // `additionalProperties: false`, so an `Outcome` never matches it
pub struct VersionRollback {
    message: String,
    weights: Weights,
}

/// What a rollback did: traffic back to the previous color, or an earlier version redeployed.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum RollbackResult {
    Traffic(Outcome),
    Version(VersionRollback),
}

/// Sends traffic back to the color that had it before (or redeploys an earlier version).
#[utoipa::path(post, path = "/v1/rollback", tag = "traffic", request_body = Option<RollbackBody>,
    responses(
        (status = 200, description = "Traffic is back on the previous color (or on `to_version`)", body = RollbackResult),
        (status = 400, description = "The request is invalid (`field` names what); nothing changed", body = ErrorBody),
        (status = 409, description = "Refused in the current state (a release in progress, a guard that does not hold…); nothing changed", body = ErrorBody),
        (status = 500, description = "Tried and failed (the store, a provider, an app that never became healthy): the message says what, `GET /v1/history` what changed", body = ErrorBody)
    )
)]
async fn rollback(
    State(controller): State<Arc<Controller>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Some(version) = rollback_request(&body)? {
        let message = controller.rollback_to_version(&version).await?;
        let weights = Weights::from(controller.plane.split());
        return Ok(Json(RollbackResult::Version(VersionRollback {
            message,
            weights,
        }))
        .into_response());
    }
    let outcome = controller.apply(Command::Rollback).await?;
    Ok(Json(RollbackResult::Traffic(outcome)).into_response())
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

/// An upgrade's body checked: the new binary (if named) and how long it has to take over.
fn upgrade_request(
    body: UpgradeBody,
) -> Result<(Option<std::path::PathBuf>, std::time::Duration), ApiError> {
    let timeout = match body.timeout.as_deref() {
        None => std::time::Duration::from_secs(60),
        Some(text) => crate::duration::parse(text)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| ApiError::invalid("timeout", "a duration above zero, such as 60s"))?,
    };
    if let Some(binary) = &body.binary {
        use std::os::unix::fs::PermissionsExt as _;
        let runnable = binary.is_absolute()
            && std::fs::metadata(binary)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if !runnable {
            return Err(ApiError::invalid(
                "binary",
                "an absolute path to an executable file (the new bluegreen binary)",
            ));
        }
    }
    Ok((body.binary, timeout))
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
        "upgrade" => upgrade_request(parse_body(&body)?).map(drop),
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
pub const CHECKED_ENDPOINTS: [&str; 19] = [
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
    "upgrade",
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
            "no such endpoint {} {}; GET /v1/openapi.json describes every endpoint",
            request.method(),
            request.uri().path(),
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

/// Every admin route with its description: the router and `GET /v1/openapi.json` are both
/// made from this one list, so a route cannot be served undocumented.
fn api() -> OpenApiRouter<Arc<Controller>> {
    OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(status))
        .routes(routes!(switch))
        .routes(routes!(reload))
        .routes(routes!(upgrade))
        .routes(routes!(weights))
        .routes(routes!(rollback))
        .routes(routes!(upstreams))
        .routes(routes!(history))
        .routes(routes!(deploy))
        .routes(routes!(test))
        .routes(routes!(start_release, releases))
        .routes(routes!(release_by_id))
        .routes(routes!(shift))
        .routes(routes!(promote))
        .routes(routes!(abort))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(environments))
        .routes(routes!(diff))
        .routes(routes!(mirror))
        .routes(routes!(logs))
        .routes(routes!(follow_logs))
        .routes(routes!(monitor))
        .routes(routes!(stream))
        .routes(routes!(metrics))
        .routes(routes!(openapi::document))
}

pub use openapi::description;

fn routes(controller: Arc<Controller>) -> Routes {
    let (routes, _) = api().split_for_parts();
    routes
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&controller),
            refuse_unless_leading,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&controller),
            refuse_once_handed_over,
        ))
        .with_state(controller)
}

/// After a binary upgrade's hand-over, a change asked of this (old) process would be lost or
/// race the new one's: refused with 503, to be retried (the new process answers it).
async fn refuse_once_handed_over(
    State(controller): State<Arc<Controller>>,
    request: Request,
    next: Next,
) -> Response {
    if controller.is_handed_over() && request.method() != http::Method::GET {
        return ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            field: None,
            message: "this daemon is handing over to a new binary (bluegreen upgrade); send the request again in a moment".into(),
        }
        .into_response();
    }
    next.run(request).await
}

/// In a fleet, changes go to the leader: another router refuses them (409) and names it.
/// Reload and upgrade concern this daemon alone and are always taken.
async fn refuse_unless_leading(
    State(controller): State<Arc<Controller>>,
    request: Request,
    next: Next,
) -> Response {
    let own = matches!(request.uri().path(), "/v1/reload" | "/v1/upgrade");
    if request.method() != http::Method::GET && !own && !controller.is_leading() {
        let leader = controller
            .fleet_leader()
            .await
            .map(|id| format!("router {id}"))
            .unwrap_or_else(|| {
                "the leader (none is elected right now; try again in a few seconds)".into()
            });
        return ApiError {
            status: StatusCode::CONFLICT,
            field: None,
            message: format!(
                "router {} does not lead the fleet; send changes to {leader} (`bluegreen status` names it)",
                controller.config().router.id
            ),
        }
        .into_response();
    }
    next.run(request).await
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
        .layer(middleware::from_fn_with_state(
            Arc::clone(&controller),
            refuse_once_handed_over,
        ))
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
        let good: [(&str, &str); 19] = [
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
            ("upgrade", r#"{"binary":"/bin/sh","timeout":"30s"}"#),
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
