//! An example service for bluegreen: answers with its color and version, and misbehaves on request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "bluegreen-example-app",
    version,
    about = "A small HTTP service for trying bluegreen: reports its color and version, and misbehaves on request"
)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Color this instance belongs to, reported in every answer.
    #[arg(long, default_value = "blue")]
    color: String,
    /// Version this instance runs, reported in every answer.
    #[arg(long = "app-version", default_value = "1.0")]
    app_version: String,
    /// Fraction of requests (0.0-1.0) answered with 500.
    #[arg(long, env = "EXAMPLE_ERROR_RATE", default_value_t = 0.0)]
    error_rate: f64,
    /// The error rate applies only this long after start, in milliseconds: a fault that shows
    /// after a while (a leak, a pool running dry), not in the first requests.
    #[arg(long, env = "EXAMPLE_FAIL_AFTER_MS", default_value_t = 0)]
    fail_after_ms: u64,
    /// Added latency on every request, in milliseconds.
    #[arg(long, env = "EXAMPLE_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,
    /// Make /healthz fail.
    #[arg(long, env = "EXAMPLE_UNHEALTHY")]
    unhealthy: bool,
    /// /healthz fails for this long after start, in milliseconds.
    #[arg(long, env = "EXAMPLE_SLOW_START_MS", default_value_t = 0)]
    slow_start_ms: u64,
    /// Print a line on stdout for each request but health checks: method, path and status.
    #[arg(long, env = "EXAMPLE_ACCESS_LOG")]
    access_log: bool,
    /// PostgreSQL (a `postgres://` URL) to record each request in: a row of `visits` with its
    /// color and version; a request the database refuses is answered 500 with its error.
    #[arg(long, env = "EXAMPLE_DATABASE_URL")]
    database: Option<String>,
    /// Also write the `agent` column (the client's User-Agent), which a later schema adds:
    /// what a new version does that an old one does not.
    #[arg(long, env = "EXAMPLE_RECORD_AGENT")]
    record_agent: bool,
    /// Added to the price of every third item of `/api/items/N`: a version that answers some
    /// requests differently, for shadow traffic to catch.
    #[arg(long, env = "EXAMPLE_PRICE_DRIFT", default_value_t = 0)]
    price_drift: i64,
}

struct App {
    args: Args,
    started: Instant,
    database: Option<tokio_postgres::Client>,
}

/// Parses `argv` (the program name first) and serves until killed; returns only on bad input.
pub fn main_from<I, T>(argv: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match Args::try_parse_from(argv) {
        Ok(args) => args,
        Err(error) => {
            let _ = error.print();
            return std::process::ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(serve(args)),
        Err(error) => {
            complain(&format!("cannot start the async runtime: {error}"));
            std::process::ExitCode::from(1)
        }
    }
}

/// One line on stderr in one write: log collectors that frame each write (podman's) keep it
/// whole, where `eprintln!` may write it in pieces.
fn complain(message: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{message}\n").as_bytes());
}

async fn serve(args: Args) -> std::process::ExitCode {
    if !(0.0..=1.0).contains(&args.error_rate) {
        complain(&format!(
            "--error-rate: {} is out of range; give a fraction from 0.0 to 1.0",
            args.error_rate
        ));
        return std::process::ExitCode::from(2);
    }
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            complain(&format!("--listen: cannot bind {}: {error}", args.listen));
            return std::process::ExitCode::from(1);
        }
    };
    let database = match &args.database {
        Some(url) => match connect(url).await {
            Ok(client) => Some(client),
            Err(error) => {
                complain(&format!("--database: cannot connect to {url}: {error}"));
                return std::process::ExitCode::from(1);
            }
        },
        None => None,
    };
    let addr = listener.local_addr().expect("bound socket has an address");
    println!("listening on {addr} ({} {})", args.color, args.app_version);
    let app = Arc::new(App {
        args,
        started: Instant::now(),
        database,
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(Arc::clone(&app), request));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One connection to PostgreSQL, driven by a task of its own.
async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            complain(&format!("--database: the connection ended: {error}"));
        }
    });
    Ok(client)
}

/// Records one visit as this version writes it.
async fn record_visit(
    app: &App,
    database: &tokio_postgres::Client,
    agent: &str,
) -> Result<(), tokio_postgres::Error> {
    let args = &app.args;
    if args.record_agent {
        database
            .execute(
                "INSERT INTO visits (color, version, agent) VALUES ($1, $2, $3)",
                &[&args.color, &args.app_version, &agent],
            )
            .await?;
    } else {
        database
            .execute(
                "INSERT INTO visits (color, version) VALUES ($1, $2)",
                &[&args.color, &args.app_version],
            )
            .await?;
    }
    Ok(())
}

/// `/api/items/N`: an item as JSON (404 for an N that is not a number).
fn item_answer(args: &Args, item: &str) -> Response<Full<Bytes>> {
    let Ok(id) = item.parse::<i64>() else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(format!("no item {item:?}\n"))))
            .expect("valid response");
    };
    let drift = if id % 3 == 0 { args.price_drift } else { 0 };
    let body = format!(
        r#"{{"item":{id},"name":"item {id}","price":{},"color":"{}","version":"{}"}}"#,
        id * 100 + drift,
        args.color,
        args.app_version
    );
    Response::builder()
        .header("x-color", &args.color)
        .header("x-version", &args.app_version)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

async fn answer(
    app: Arc<App>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let args = &app.args;
    let reply = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("x-color", &args.color)
            .header("x-version", &args.app_version)
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from(body)))
            .expect("valid response")
    };
    if request.uri().path() == "/healthz" {
        let starting = app.started.elapsed() < Duration::from_millis(args.slow_start_ms);
        return Ok(if args.unhealthy || starting {
            reply(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n".into())
        } else {
            reply(StatusCode::OK, "ok\n".into())
        });
    }
    if args.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.latency_ms)).await;
    }
    if let Some(database) = &app.database {
        let agent = request
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Err(error) = record_visit(&app, database, agent).await {
            let detail = error
                .as_db_error()
                .map_or_else(|| error.to_string(), |e| e.message().to_string());
            return Ok(reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{} {}: database: {detail}\n", args.color, args.app_version),
            ));
        }
    }
    let failing = app.started.elapsed() >= Duration::from_millis(args.fail_after_ms);
    let failed = failing && args.error_rate > 0.0 && fastrand::f64() < args.error_rate;
    let status = if failed {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    if args.access_log {
        // A copy bluegreen mirrored to this color is marked so.
        let copy = if request.headers().contains_key("x-bluegreen-mirror") {
            " mirror"
        } else {
            ""
        };
        println!(
            "{} {} {}{copy}",
            request.method(),
            request.uri().path(),
            status.as_u16()
        );
    }
    if !failed && let Some(item) = request.uri().path().strip_prefix("/api/items/") {
        return Ok(item_answer(args, item));
    }
    Ok(if failed {
        reply(
            status,
            format!("{} {} failed on purpose\n", args.color, args.app_version),
        )
    } else {
        reply(status, format!("{} {}\n", args.color, args.app_version))
    })
}
