//! `bluegreen monitor` on a terminal: both colors, the release and the event log, live from the daemon's stream.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::time::Duration;

use crossterm::event::{self, Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use http::Method;
use http_body_util::BodyExt;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color as Tint, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Sparkline, Wrap};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::progress::{mirror_text, time_left};
use crate::client::AdminClient;
use crate::exit::{self, CliError, expect_ok};
use crate::timestamp::utc_time;

/// What the stream and the keyboard deliver to the screen loop.
enum Input {
    Snapshot(Value),
    Event(Value),
    Disconnected(String),
    Key(KeyCode, KeyModifiers),
}

/// An action waiting for `y`.
#[derive(Clone, Copy)]
enum Pending {
    Rollback,
}

struct Screen {
    /// `--environment`: show this color alone.
    only: Option<bluegreen_router::Color>,
    snapshot: Option<Value>,
    events: VecDeque<Value>,
    pending: Option<Pending>,
    message: String,
    connected: bool,
}

/// Runs the terminal UI until `q`; keys act through the admin API like the CLI does.
pub async fn run(
    client: AdminClient,
    only: Option<bluegreen_router::Color>,
) -> Result<(), CliError> {
    // Fail before taking over the terminal if the daemon is not there.
    let body = client.stream("/v1/stream").await?;
    let (inputs, mut received) = mpsc::channel::<Input>(256);
    tokio::spawn(follow_stream(body, inputs.clone()));
    let keys = inputs.clone();
    std::thread::spawn(move || read_keys(keys));

    // The recent past first, so the event log is not empty until something happens.
    let recent = match client
        .call(Method::GET, "/v1/history?limit=100", None)
        .await
    {
        Ok(answer) => expect_ok(answer)?,
        Err(e) => return Err(e.into()),
    };
    let events: VecDeque<Value> = recent["events"]
        .as_array()
        .map(|e| e.iter().rev().cloned().collect())
        .unwrap_or_default();
    let mut terminal = ratatui::init();
    let mut screen = Screen {
        only,
        snapshot: None,
        events,
        pending: None,
        message: "p pause/resume · r rollback · q quit".into(),
        connected: true,
    };
    let outcome = loop {
        if let Err(e) = terminal.draw(|frame| draw(frame, &screen)) {
            break Err(CliError::new(exit::FAILURE, format!("cannot draw: {e}")));
        }
        let Some(input) = received.recv().await else {
            break Ok(());
        };
        match input {
            Input::Snapshot(snapshot) => {
                screen.connected = true;
                screen.snapshot = Some(snapshot);
            }
            Input::Event(event) => {
                // The stream opened before the history was read: an event may come twice.
                if !screen.events.iter().any(|e| e["id"] == event["id"]) {
                    screen.events.push_front(event);
                    screen.events.truncate(100);
                }
            }
            Input::Disconnected(why) => {
                screen.connected = false;
                screen.message = format!("lost the daemon: {why} (q quits)");
            }
            Input::Key(code, modifiers) => {
                if on_key(&mut screen, &client, code, modifiers)
                    .await
                    .is_break()
                {
                    break Ok(());
                }
            }
        }
    };
    ratatui::restore();
    outcome
}

/// Acts on one key: `q` (or Ctrl-C) quits, `r` asks before rolling back, `p` pauses or resumes.
async fn on_key(
    screen: &mut Screen,
    client: &AdminClient,
    code: KeyCode,
    modifiers: KeyModifiers,
) -> ControlFlow<()> {
    let ctrl_c = code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL);
    match (code, screen.pending) {
        (KeyCode::Char('q') | KeyCode::Esc, None) => return ControlFlow::Break(()),
        _ if ctrl_c => return ControlFlow::Break(()),
        (KeyCode::Char('y'), Some(Pending::Rollback)) => {
            screen.pending = None;
            screen.message = act(client, "/v1/rollback").await;
        }
        (_, Some(_)) => {
            screen.pending = None;
            screen.message = "cancelled".into();
        }
        (KeyCode::Char('r'), None) => {
            let target = screen
                .snapshot
                .as_ref()
                .and_then(|s| s["rollback_to"].as_str())
                .unwrap_or("the previous color")
                .to_string();
            screen.pending = Some(Pending::Rollback);
            screen.message = format!("Roll back: all traffic to {target}? y/n");
        }
        (KeyCode::Char('p'), None) => {
            let release = screen
                .snapshot
                .as_ref()
                .map(|s| s["monitor"]["release"].clone())
                .unwrap_or(Value::Null);
            screen.message = if release.is_null() {
                "no release is running: nothing to pause".into()
            } else if release["paused"] == true {
                act(client, "/v1/resume").await
            } else {
                act(client, "/v1/pause").await
            };
        }
        _ => {}
    }
    ControlFlow::Continue(())
}

async fn act(client: &AdminClient, path: &str) -> String {
    match client.call(Method::POST, path, Some(json!({}))).await {
        Ok(answer) => match expect_ok(answer) {
            Ok(value) => value["message"].as_str().unwrap_or("done").to_string(),
            Err(e) => format!("refused: {}", e.message),
        },
        Err(e) => format!("failed: {e}"),
    }
}

/// Reads server-sent events (`event:` and `data:` lines, a blank line ends one).
async fn follow_stream(mut body: hyper::body::Incoming, inputs: mpsc::Sender<Input>) {
    let mut buffer = String::new();
    loop {
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                let _ = inputs.send(Input::Disconnected(e.to_string())).await;
                return;
            }
            None => {
                let _ = inputs
                    .send(Input::Disconnected("the stream ended".into()))
                    .await;
                return;
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = buffer.find("\n\n") {
            let message: String = buffer.drain(..end + 2).collect();
            let mut kind = "";
            let mut payload = String::new();
            for line in message.lines() {
                if let Some(rest) = line.strip_prefix("event: ") {
                    kind = rest;
                } else if let Some(rest) = line.strip_prefix("data: ") {
                    payload.push_str(rest);
                }
            }
            let value: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
            let input = match kind {
                "snapshot" => Input::Snapshot(value),
                "event" => Input::Event(value),
                _ => continue,
            };
            if inputs.send(input).await.is_err() {
                return;
            }
        }
    }
}

fn read_keys(inputs: mpsc::Sender<Input>) {
    loop {
        match event::poll(Duration::from_millis(200)) {
            Ok(true) => {
                if let Ok(TermEvent::Key(key)) = event::read()
                    && key.kind == KeyEventKind::Press
                    && inputs
                        .blocking_send(Input::Key(key.code, key.modifiers))
                        .is_err()
                {
                    return;
                }
            }
            Ok(false) => {
                if inputs.is_closed() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn tint(color: &str) -> Tint {
    paint(match color {
        "blue" => Tint::Blue,
        "green" => Tint::Green,
        _ => Tint::Gray,
    })
}

/// A color, or the terminal's own when `NO_COLOR` is set.
fn paint(color: Tint) -> Tint {
    if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
        Tint::Reset
    } else {
        color
    }
}

fn draw(frame: &mut Frame, screen: &Screen) {
    let [header, colors, release, events, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Length(12),
        Constraint::Length(6),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let Some(snapshot) = &screen.snapshot else {
        frame.render_widget(
            Paragraph::new("waiting for the daemon's first snapshot …"),
            header,
        );
        return;
    };
    draw_header(frame, header, snapshot, screen.connected);
    match screen.only {
        Some(color) => draw_color(frame, colors, snapshot, color.as_str()),
        None => {
            let [left, right] =
                Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                    .areas(colors);
            for (area, color) in [(left, "blue"), (right, "green")] {
                draw_color(frame, area, snapshot, color);
            }
        }
    }
    draw_release(
        frame,
        release,
        &snapshot["monitor"]["release"],
        &snapshot["mirror"],
    );
    let lines: Vec<Line> = screen
        .events
        .iter()
        .take(events.height.saturating_sub(2) as usize)
        .map(|e| {
            Line::from(vec![
                Span::styled(
                    format!("{} ", utc_time(e["at_ms"].as_i64().unwrap_or(0))),
                    Style::default().fg(paint(Tint::DarkGray)),
                ),
                Span::styled(
                    format!("{:<11} ", e["kind"].as_str().unwrap_or("?")),
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::raw(e["message"].as_str().unwrap_or("").to_string()),
            ])
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" events ")),
        events,
    );
    let style = if screen.pending.is_some() {
        Style::default()
            .fg(paint(Tint::Black))
            .bg(paint(Tint::Yellow))
    } else {
        Style::default().fg(paint(Tint::DarkGray))
    };
    frame.render_widget(Paragraph::new(screen.message.as_str()).style(style), footer);
}

/// In a fleet: how many routers, which leads, and which are behind or stale.
fn fleet_summary(snapshot: &Value) -> String {
    let Some(routers) = snapshot["routers"].as_array() else {
        return String::new();
    };
    let behind: Vec<&str> = routers
        .iter()
        .filter(|r| r["lag"].as_i64().unwrap_or(0) > 0 || r["stale"].as_bool() == Some(true))
        .filter_map(|r| r["id"].as_str())
        .collect();
    let mut summary = format!(
        " · fleet: {} routers, leader {}",
        routers.len(),
        snapshot["leader"].as_str().unwrap_or("none")
    );
    if !behind.is_empty() {
        summary.push_str(&format!(", behind: {}", behind.join(" ")));
    }
    summary
}

fn draw_header(frame: &mut Frame, area: Rect, snapshot: &Value, connected: bool) {
    let live = snapshot["live"].as_str().unwrap_or("split");
    let green = snapshot["weights"]["green"].as_u64().unwrap_or(0);
    let title = format!(
        " bluegreen · {} · live: {live}{} · {} ",
        snapshot["service"].as_str().unwrap_or("?"),
        fleet_summary(snapshot),
        if connected {
            "connected"
        } else {
            "disconnected"
        }
    );
    let gauge = Gauge::default()
        .block(Block::default().borders(Borders::ALL).title(title))
        .gauge_style(
            Style::default()
                .fg(paint(Tint::Green))
                .bg(paint(Tint::Blue)),
        )
        .percent(green.min(100) as u16)
        .label(format!(
            "blue {}% │ green {green}%",
            snapshot["weights"]["blue"]
        ));
    frame.render_widget(gauge, area);
}

fn draw_color(frame: &mut Frame, area: Rect, snapshot: &Value, color: &str) {
    let monitor = snapshot["monitor"]["colors"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["color"] == color))
        .cloned()
        .unwrap_or(Value::Null);
    let env = snapshot["environments"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["color"] == color))
        .cloned()
        .unwrap_or(Value::Null);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(Style::default().fg(tint(color)))
        .title(Span::styled(
            format!(
                " {color} {} — {} ",
                env["version"].as_str().unwrap_or("–"),
                env["status"].as_str().unwrap_or("?")
            ),
            Style::default()
                .fg(tint(color))
                .add_modifier(Modifier::BOLD),
        ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [numbers, spark] =
        Layout::vertical([Constraint::Length(6), Constraint::Min(1)]).areas(inner);
    frame.render_widget(Paragraph::new(color_numbers(&monitor)), numbers);
    draw_sparklines(frame, spark, &monitor, color);
}

/// Weight and health, rate, errors, latency and each upstream's health, a line each.
fn color_numbers(monitor: &Value) -> Vec<Line<'static>> {
    let w = &monitor["window"];
    let ms = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x} ms"))
            .unwrap_or_else(|| "–".into())
    };
    let error_rate = w["error_rate_percent"].as_f64().unwrap_or(0.0);
    vec![
        Line::from(format!(
            "traffic {:>3}%   upstreams {}/{} healthy",
            monitor["weight"], monitor["healthy_upstreams"], monitor["upstreams"]
        )),
        Line::from(format!(
            "{:.1} req/s   {} requests in {:.0}s",
            w["requests_per_second"].as_f64().unwrap_or(0.0),
            w["requests"],
            w["seconds"].as_f64().unwrap_or(0.0)
        )),
        Line::from(Span::styled(
            format!("errors {error_rate:.2}%"),
            if error_rate > 1.0 {
                Style::default()
                    .fg(paint(Tint::Red))
                    .add_modifier(Modifier::BOLD)
            } else {
                Style::default()
            },
        )),
        Line::from(format!(
            "p50 {}   p95 {}   p99 {}",
            ms(&w["p50_ms"]),
            ms(&w["p95_ms"]),
            ms(&w["p99_ms"])
        )),
        Line::from(
            monitor["upstream_health"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|u| {
                    let health = u[1].as_str().unwrap_or("?");
                    let mark = match health {
                        "healthy" => Style::default().fg(paint(Tint::Green)),
                        "unhealthy" => Style::default().fg(paint(Tint::Red)),
                        _ => Style::default().fg(paint(Tint::DarkGray)),
                    };
                    [
                        Span::styled("● ", mark),
                        Span::raw(format!("{} {health}  ", u[0].as_str().unwrap_or("?"))),
                    ]
                })
                .collect::<Vec<_>>(),
        ),
    ]
}

/// The last minute of requests per second and p99 latency, side by side.
fn draw_sparklines(frame: &mut Frame, area: Rect, monitor: &Value, color: &str) {
    let series = |key: &str| -> Vec<u64> {
        monitor[key]
            .as_array()
            .map(|h| {
                h.iter()
                    .map(|v| v.as_f64().unwrap_or(0.0).round() as u64)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (rps, p99) = (series("rps_history"), series("p99_history"));
    let [rps_area, p99_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(area);
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().title("req/s, last minute"))
            .data(&rps)
            .style(Style::default().fg(tint(color))),
        rps_area,
    );
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().title(format!(
                "p99 ms (max {})",
                p99.iter().max().copied().unwrap_or(0)
            )))
            .data(&p99)
            .style(Style::default().fg(paint(Tint::Magenta))),
        p99_area,
    );
}

fn draw_release(frame: &mut Frame, area: Rect, release: &Value, mirror: &Value) {
    let block = Block::default().borders(Borders::ALL).title(" release ");
    if release.is_null() {
        frame.render_widget(Paragraph::new("no release running").block(block), area);
        return;
    }
    let steps = release["strategy"]["steps"]
        .as_array()
        .map_or(0, |s| s.len());
    let left = time_left(release);
    let head = format!(
        "#{} {} → {}: {}{}{left}",
        release["id"],
        release["version"].as_str().unwrap_or("shift"),
        release["color"].as_str().unwrap_or("?"),
        release["state"].as_str().unwrap_or("?"),
        if release["state"] == "shifting" {
            format!(
                " step {}/{steps} at {}%",
                release["step"].as_u64().unwrap_or(0) + 1,
                release["percent"]
            )
        } else {
            String::new()
        }
    );
    let verdict = &release["verdict"];
    let note = Line::from(Span::styled(
        format!(
            "analysis: {}",
            verdict["note"].as_str().unwrap_or("not judged yet")
        ),
        if verdict["breach"].is_null() {
            Style::default()
        } else {
            Style::default().fg(paint(Tint::Red))
        },
    ));
    let mut lines = vec![Line::from(head), note];
    // Shadow traffic: its verdict, and the first answer that differed.
    let verdict = &release["mirror"];
    if !verdict.is_null() {
        lines.push(Line::from(Span::styled(
            format!(
                "mirror: {} | {}",
                mirror_text(verdict),
                verdict["note"].as_str().unwrap_or("")
            ),
            if verdict["breach"].is_null() {
                Style::default()
            } else {
                Style::default().fg(paint(Tint::Red))
            },
        )));
        if let Some(first) = mirror["differences"].as_array().and_then(|d| d.first()) {
            lines.push(Line::from(Span::styled(
                format!(
                    "≠ {} {}: {} (bluegreen diff --mirror shows all)",
                    first["request"].as_str().unwrap_or("?"),
                    first["what"].as_str().unwrap_or("?"),
                    first["detail"].as_str().unwrap_or("")
                ),
                Style::default().fg(paint(Tint::DarkGray)),
            )));
        }
    }
    frame.render_widget(
        Paragraph::new(lines).wrap(Wrap { trim: true }).block(block),
        area,
    );
}
