//! The controller's commands on the CLI side: deploy, test, release and shift (followed live), monitor, diff, logs.

use std::time::{Duration, Instant};

use bluegreen_router::Color;
use http::Method;
use serde_json::{Value, json};

use super::progress::{progress_line, window_text};
use super::{Cli, Output, admin_client};
use crate::exit::{self, CliError, expect_ok};
use crate::follower::{follow, start};
use crate::timestamp::utc_time;

/// A spinner on stderr with a step's name, its elapsed time and what it waits for; hidden when
/// stderr is not a terminal or the output is JSON.
pub(super) fn spinner(cli: &Cli, message: String) -> indicatif::ProgressBar {
    let visible =
        cli.output == Output::Text && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if visible {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {wide_msg}")
            .expect("a valid template"),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub async fn deploy(cli: &Cli, args: &super::DeployArgs) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let env: serde_json::Map<String, Value> = args
        .env
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let progress = spinner(
        cli,
        format!(
            "deploying {} to {}: waiting until all its upstreams pass health checks",
            args.version, args.environment
        ),
    );
    let body = json!({ "environment": args.environment, "version": args.version, "env": env });
    let answer = client.call(Method::POST, "/v1/deploy", Some(body)).await;
    progress.finish_and_clear();
    let answer = expect_ok(answer?)?;
    print_answer(cli, &answer);
    Ok(())
}

pub async fn test(cli: &Cli, environment: Color) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let progress = spinner(
        cli,
        format!("testing {environment} through the router's preview route"),
    );
    let answer = client
        .call(
            Method::POST,
            "/v1/test",
            Some(json!({ "environment": environment })),
        )
        .await;
    progress.finish_and_clear();
    let (status, body) = answer?;
    // 422 carries the results of a failed test run; anything else is an error.
    let answer = if status == http::StatusCode::UNPROCESSABLE_ENTITY {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    } else {
        expect_ok((status, body))?
    };
    match cli.output {
        Output::Json => println!("{}", pretty(&answer)),
        Output::Text => {
            for result in answer["results"].as_array().into_iter().flatten() {
                println!(
                    "{} {:<30} {}",
                    if result["passed"].as_bool() == Some(true) {
                        "PASS"
                    } else {
                        "FAIL"
                    },
                    result["name"].as_str().unwrap_or("?"),
                    result["detail"].as_str().unwrap_or("")
                );
            }
        }
    }
    if answer["passed"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(CliError::new(
            exit::FAILURE,
            format!("tests of {environment} failed; a release would not switch to it"),
        ))
    }
}

/// Starts a release or shift and, unless detached, follows it to its end; the exit code says
/// how it ended.
pub async fn start_and_follow(
    cli: &Cli,
    path: &str,
    body: Value,
    detach: bool,
) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let (id, after, started) = start(&client, path, body).await?;
    if detach {
        print_answer(
            cli,
            &json!({ "message": format!("release #{id} started; follow it with `bluegreen monitor`"), "release": started }),
        );
        return Ok(());
    }
    let text = cli.output == Output::Text;
    let progress = spinner(cli, format!("release #{id} starting"));
    let mut last_progress = Instant::now();
    let print_event = |event: &Value| {
        if text {
            progress.suspend(|| {
                println!(
                    "{}  {:<11} {}",
                    utc_time(event["at_ms"].as_i64().unwrap_or(0)),
                    event["kind"].as_str().unwrap_or("?"),
                    event["message"].as_str().unwrap_or("")
                )
            });
        }
    };
    let show_progress = |release: &Value| {
        if !progress.is_hidden() {
            progress.set_message(progress_line(release));
        } else if text && last_progress.elapsed() >= Duration::from_secs(3) {
            // Not a terminal (a CI log): a progress line now and then instead of a spinner.
            last_progress = Instant::now();
            println!("{}", progress_line(release));
        }
    };
    let final_answer = follow(&client, id, after, print_event, show_progress).await;
    progress.finish_and_clear();
    let final_answer = final_answer?;
    let release = &final_answer["release"];
    match cli.output {
        Output::Json => println!("{}", pretty(&final_answer)),
        Output::Text => println!(
            "release #{id} {}: {}",
            release["state"].as_str().unwrap_or("?"),
            release["reason"].as_str().unwrap_or("")
        ),
    }
    match release["state"].as_str() {
        Some("succeeded") => Ok(()),
        Some("rolled_back") => Err(CliError::new(
            exit::ROLLED_BACK,
            format!("release #{id} was rolled back"),
        )),
        Some("aborted") => Err(CliError::new(
            exit::ABORTED,
            format!("release #{id} was aborted"),
        )),
        _ => Err(CliError::new(
            exit::FAILURE,
            format!("release #{id} failed"),
        )),
    }
}

pub async fn monitor(cli: &Cli, args: &super::MonitorArgs) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    // On a terminal: the live screen; in a pipe or a log: one line per interval.
    if cli.output == Output::Text
        && args.count.is_none()
        && std::io::IsTerminal::is_terminal(&std::io::stdout())
    {
        return super::tui::run(client, args.environment).await;
    }
    let interval = args.interval.clamp(1, 600);
    let mut printed = 0;
    loop {
        let answer = expect_ok(
            client
                .call(
                    Method::GET,
                    &format!("/v1/monitor?seconds={interval}"),
                    None,
                )
                .await?,
        )?;
        match cli.output {
            Output::Json => println!("{answer}"),
            Output::Text => println!("{}", monitor_line(&answer, args.environment)),
        }
        printed += 1;
        if args.count.is_some_and(|count| printed >= count) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(interval)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn monitor_line(answer: &Value, only: Option<Color>) -> String {
    let now = utc_time(crate::store::now_ms());
    let colors: Vec<String> = answer["colors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| only.is_none_or(|o| c["color"].as_str() == Some(o.as_str())))
        .map(|c| {
            format!(
                "{} {} w{}% {}/{} healthy: {}",
                c["color"].as_str().unwrap_or("?"),
                c["version"].as_str().unwrap_or("-"),
                c["weight"],
                c["healthy_upstreams"],
                c["upstreams"],
                window_text(&c["window"])
                    .split_once(' ')
                    .map(|(_, rest)| rest.to_string())
                    .unwrap_or_default()
            )
        })
        .collect();
    let release = &answer["release"];
    let release = if release.is_null() {
        String::new()
    } else {
        format!(" || release #{} {}", release["id"], progress_line(release))
    };
    format!("{now}  {}{release}", colors.join(" | "))
}

pub async fn diff(cli: &Cli, a: Color, b: Color) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let answer = expect_ok(
        client
            .call(Method::GET, &format!("/v1/diff?a={a}&b={b}"), None)
            .await?,
    )?;
    let differences = answer["differences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    match cli.output {
        Output::Json => println!("{}", pretty(&answer)),
        Output::Text if differences.is_empty() => {
            println!("{a} and {b} run the same version from the same spec")
        }
        Output::Text => {
            println!("{:<22} {:<30} {:<30}", "KEY", a.as_str(), b.as_str());
            for d in &differences {
                println!(
                    "{:<22} {:<30} {:<30}",
                    d["key"].as_str().unwrap_or("?"),
                    compact(&d["values"][0]),
                    compact(&d["values"][1])
                );
            }
        }
    }
    Ok(())
}

/// `bluegreen diff --mirror`: the mirror's verdict and counters, then the first answers of
/// the mirrored color that differed from the live ones.
pub async fn mirror_diff(cli: &Cli) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let answer = expect_ok(client.call(Method::GET, "/v1/mirror", None).await?)?;
    if cli.output == Output::Json {
        println!("{}", pretty(&answer));
        return Ok(());
    }
    let router = &answer["router"];
    let verdict = &answer["verdict"];
    let count = |v: &Value| v.as_u64().unwrap_or(0);
    match (answer["release"].as_i64(), router["to"].as_str()) {
        (_, Some(to)) => println!(
            "mirroring {}% of the live requests to {to}",
            count(&router["percent"])
        ),
        (Some(id), None) if !verdict.is_null() => {
            println!("no mirror now; release #{id}'s mirror:")
        }
        _ => println!(
            "no mirror now, and the last release mirrored nothing (see `mirror:` in docs/mirror.md)"
        ),
    }
    if let Some(window) = verdict.get("window").filter(|w| !w.is_null()) {
        println!(
            "  {} copies: {} compared, {} differed, {} unanswered; {} dropped (queue full), {} skipped",
            count(&window["mirrored"]),
            count(&window["compared"]),
            count(&window["mismatched"]),
            count(&window["failed"]),
            count(&window["dropped"]),
            count(&window["skipped"])
        );
        let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |ms| format!("{ms}ms"));
        println!(
            "  mismatch {:.2}%; p99 live {}, mirrored {}",
            window["mismatch_rate_percent"].as_f64().unwrap_or(0.0),
            ms(&window["live_p99_ms"]),
            ms(&window["mirror_p99_ms"])
        );
        println!("  {}", verdict["note"].as_str().unwrap_or(""));
    }
    let differences = router["differences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if differences.is_empty() {
        println!("no differing answers kept");
        return Ok(());
    }
    println!(
        "first differing answers (release #{}, at most {} kept):",
        count(&router["differences_of"]),
        bluegreen_router::mirror::KEPT_DIFFERENCES
    );
    for d in &differences {
        let mirror_status = d["mirror_status"]
            .as_u64()
            .map_or("no answer".to_string(), |s| s.to_string());
        let times = match count(&d["times"]) {
            0 | 1 => String::new(),
            n => format!(" (×{n})"),
        };
        println!(
            "  {}  {}  {} {} / mirrored {}  {}: {}{times}",
            utc_time(d["at_ms"].as_i64().unwrap_or(0)),
            d["request"].as_str().unwrap_or("?"),
            d["live_color"].as_str().unwrap_or("?"),
            count(&d["live_status"]),
            mirror_status,
            d["what"].as_str().unwrap_or("?"),
            d["detail"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn compact(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub async fn logs(
    cli: &Cli,
    environment: &str,
    lines: usize,
    follow: bool,
) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let query = format!("environment={environment}&lines={lines}");
    let answer = expect_ok(
        client
            .call(Method::GET, &format!("/v1/logs?{query}"), None)
            .await?,
    )?;
    if follow {
        // Asked first without following, so a bad query gets the daemon's full answer.
        let followed = client.stream(&format!("/v1/logs/follow?{query}")).await?;
        return follow_logs(cli, followed).await;
    }
    match cli.output {
        Output::Json => println!("{}", pretty(&answer)),
        Output::Text => {
            let files = answer["logs"].as_array().cloned().unwrap_or_default();
            if files.is_empty() {
                println!("no logs yet for {environment}");
            }
            for file in files {
                println!("==> {} <==", file["file"].as_str().unwrap_or("?"));
                for line in file["lines"].as_array().into_iter().flatten() {
                    println!("{}", line.as_str().unwrap_or(""));
                }
            }
        }
    }
    Ok(())
}

/// Prints followed log lines as they arrive: JSON lines as sent, or the lines under a
/// `==> source <==` heading whenever the source changes (like `tail -f` of several files).
async fn follow_logs(cli: &Cli, mut body: hyper::body::Incoming) -> Result<(), CliError> {
    use http_body_util::BodyExt;
    let mut buffer = Vec::new();
    let mut last_source = String::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| CliError::new(exit::FAILURE, format!("the log stream broke off: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            if cli.output == Output::Json {
                print!("{text}");
                continue;
            }
            let Ok(entry) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let source = entry["source"].as_str().unwrap_or("?");
            if source != last_source {
                println!("==> {source} <==");
                last_source = source.to_string();
            }
            println!("{}", entry["line"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

pub async fn list(cli: &Cli, limit: usize) -> Result<(), CliError> {
    let client = admin_client(cli)?;
    let answer = expect_ok(
        client
            .call(Method::GET, &format!("/v1/releases?limit={limit}"), None)
            .await?,
    )?;
    match cli.output {
        Output::Json => println!("{}", pretty(&answer)),
        Output::Text => {
            println!(
                "{:<4} {:<20} {:<10} {:<6} {:<12} REASON",
                "ID", "STARTED", "VERSION", "TO", "STATE"
            );
            for r in answer["releases"].as_array().into_iter().flatten() {
                println!(
                    "{:<4} {:<20} {:<10} {:<6} {:<12} {}",
                    r["id"].to_string(),
                    utc_time(r["started_ms"].as_i64().unwrap_or(0)),
                    r["version"].as_str().unwrap_or("-"),
                    r["color"].as_str().unwrap_or("?"),
                    r["state"].as_str().unwrap_or("?"),
                    r["reason"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

fn print_answer(cli: &Cli, answer: &Value) {
    match cli.output {
        Output::Json => println!("{}", pretty(answer)),
        Output::Text => println!("{}", answer["message"].as_str().unwrap_or("done")),
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("json")
}
