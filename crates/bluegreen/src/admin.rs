//! The admin API: JSON over a 0600 unix socket, or over TCP behind a bearer token.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::Router as Routes;
use axum::body::Bytes;
use axum::extract::{Request, State};
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
use tokio::sync::watch;

use crate::config::{AdminEndpoint, parse_socket_addr};
use crate::daemon::{Command, CommandError, Daemon};

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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "status": self.status.as_u16(), "field": self.field, "message": self.message } });
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

async fn upstreams(State(daemon): State<Arc<Daemon>>, body: Bytes) -> Result<Response, ApiError> {
    let body: UpstreamsBody = parse_body(&body)?;
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
    let message = daemon.set_upstreams(body.environment, addrs).await?;
    Ok(Json(json!({ "message": message })).into_response())
}

async fn history(
    State(daemon): State<Arc<Daemon>>,
    request: Request,
) -> Result<Response, ApiError> {
    let limit = history_limit(request.uri().query().unwrap_or(""))?;
    Ok(Json(json!({ "events": daemon.history(limit)? })).into_response())
}

/// `limit=N` (1 to 10000, default 50) is the only query parameter.
fn history_limit(query: &str) -> Result<usize, ApiError> {
    let mut limit = 50;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some(("limit", value)) = pair.split_once('=') else {
            return Err(ApiError::invalid(
                pair,
                "unknown query parameter; only limit=N is accepted",
            ));
        };
        limit = value
            .parse()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(
                    "limit",
                    format!("{value:?} is out of range; use a whole number from 1 to 10000"),
                )
            })?;
    }
    Ok(limit)
}

async fn status(State(daemon): State<Arc<Daemon>>) -> Response {
    Json(daemon.status().await).into_response()
}

async fn metrics(State(daemon): State<Arc<Daemon>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        daemon.router.prometheus(),
    )
        .into_response()
}

async fn switch(State(daemon): State<Arc<Daemon>>, body: Bytes) -> Result<Response, ApiError> {
    let body: SwitchBody = parse_body(&body)?;
    let outcome = daemon
        .apply(Command::Switch {
            to: body.to,
            from: body.from,
        })
        .await?;
    Ok(Json(outcome).into_response())
}

async fn weights(State(daemon): State<Arc<Daemon>>, body: Bytes) -> Result<Response, ApiError> {
    let body: WeightsBody = parse_body(&body)?;
    let outcome = daemon.apply(Command::Weights(body.split()?)).await?;
    Ok(Json(outcome).into_response())
}

async fn rollback(State(daemon): State<Arc<Daemon>>, body: Bytes) -> Result<Response, ApiError> {
    let _: Empty = parse_body(&body)?;
    let outcome = daemon.apply(Command::Rollback).await?;
    Ok(Json(outcome).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

async fn not_found(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        field: None,
        message: format!(
            "no such endpoint {} {}; see GET /v1/status, POST /v1/switch, /v1/weights, /v1/rollback, /v1/upstreams, GET /v1/history, GET /metrics",
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

fn routes(daemon: Arc<Daemon>) -> Routes {
    Routes::new()
        .route("/v1/status", get(status))
        .route("/v1/switch", post(switch))
        .route("/v1/weights", post(weights))
        .route("/v1/rollback", post(rollback))
        .route("/v1/upstreams", post(upstreams))
        .route("/v1/history", get(history))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(daemon)
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

fn set_owner_only(path: &Path) -> Result<(), String> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("router.admin: cannot chmod 0600 {}: {e}", path.display()))
}

pub async fn run(
    listener: AdminListener,
    daemon: Arc<Daemon>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    let result = match listener {
        AdminListener::Unix(listener) => {
            serve(listener, routes(daemon))
                .with_graceful_shutdown(stop)
                .await
        }
        AdminListener::Tcp(listener, token) => {
            let app = routes(daemon).layer(middleware::from_fn_with_state(token, require_token));
            serve(listener, app).with_graceful_shutdown(stop).await
        }
    };
    if let Err(error) = result {
        tracing::error!(%error, "admin API stopped");
    }
}
