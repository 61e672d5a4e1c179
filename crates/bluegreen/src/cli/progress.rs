//! How a running release reads as text: its progress line, a step's time left, a traffic window.

use serde_json::Value;

/// `, 41s left` while a step's time runs, `, paused`, `, waiting for promote`, or nothing.
pub fn time_left(release: &Value) -> String {
    match release["step_ends_ms"].as_i64() {
        Some(end) => format!(
            ", {}s left",
            ((end - crate::store::now_ms()).max(0) + 999) / 1000
        ),
        None if release["paused"] == true => ", paused".into(),
        None if release["state"] == "shifting" => ", waiting for promote".into(),
        None => String::new(),
    }
}

/// `[shifting 1/2: green 10%, 41s left] green 152 req 0.00% err p99 2.5ms | verdict`.
pub fn progress_line(release: &Value) -> String {
    let state = release["state"].as_str().unwrap_or("?");
    let steps = release["strategy"]["steps"]
        .as_array()
        .map(|s| s.len())
        .unwrap_or(0);
    let left = time_left(release);
    let head = match state {
        "shifting" => format!(
            "[shifting {}/{steps}: {} {}%{left}]",
            release["step"].as_u64().unwrap_or(0) + 1,
            release["color"].as_str().unwrap_or("?"),
            release["percent"]
        ),
        "monitoring" => format!("[monitoring{left}]"),
        "deploying" => format!(
            "[deploying {} to {}: waiting until its upstreams pass health checks]",
            release["version"].as_str().unwrap_or("?"),
            release["color"].as_str().unwrap_or("?")
        ),
        "testing" => format!(
            "[testing {} through the router's preview route]",
            release["color"].as_str().unwrap_or("?")
        ),
        "mirroring" => format!(
            "[mirroring: copies of the live requests answered by {} and compared]",
            release["color"].as_str().unwrap_or("?")
        ),
        "running" => format!(
            "[running stage {}]",
            release["stage"].as_str().unwrap_or("?")
        ),
        other => format!("[{other}]"),
    };
    let mirror = &release["mirror"];
    if state == "mirroring" && !mirror.is_null() {
        return format!(
            "{head} {} | {}",
            mirror_text(mirror),
            mirror["note"].as_str().unwrap_or("")
        );
    }
    let verdict = &release["verdict"];
    if verdict.is_null() {
        return head;
    }
    format!(
        "{head} {} | {}",
        window_text(&verdict["new"]),
        verdict["note"].as_str().unwrap_or("")
    )
}

/// A mirror verdict's window: `146 compared, 2 differ (1.37%), p99 live 5ms mirrored 10ms`.
pub fn mirror_text(verdict: &Value) -> String {
    let w = &verdict["window"];
    let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x}ms"));
    format!(
        "{} compared, {} differ ({:.2}%), p99 live {} mirrored {}",
        w["compared"].as_u64().unwrap_or(0) + w["failed"].as_u64().unwrap_or(0),
        w["mismatched"].as_u64().unwrap_or(0) + w["failed"].as_u64().unwrap_or(0),
        w["mismatch_rate_percent"].as_f64().unwrap_or(0.0),
        ms(&w["live_p99_ms"]),
        ms(&w["mirror_p99_ms"])
    )
}

/// One color's traffic window: `green 12 req/s 152 req 0.00% err p50 1ms p99 2.5ms`.
pub fn window_text(w: &Value) -> String {
    let ms = |v: &Value| {
        v.as_f64()
            .map(|x| format!("{x}ms"))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "{} {:.0} req/s {} req {:.2}% err p50 {} p99 {}",
        w["color"].as_str().unwrap_or("?"),
        w["requests_per_second"].as_f64().unwrap_or(0.0),
        w["requests"],
        w["error_rate_percent"].as_f64().unwrap_or(0.0),
        ms(&w["p50_ms"]),
        ms(&w["p99_ms"]),
    )
}
