//! Runs wrk and h2load (Debian's) and reads their reports.

use std::process::Command;

/// One wrk run.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

pub fn wrk_command(url: &str, connections: u32, seconds: u64) -> Vec<String> {
    [
        "wrk",
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
        url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn run_wrk(url: &str, connections: u32, seconds: u64) -> Result<WrkResult, String> {
    let args = wrk_command(url, connections, seconds);
    let output = Command::new(&args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_wrk(&text).ok_or_else(|| {
        format!(
            "cannot read wrk's report:\n{text}{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// wrk prints latencies as `812.00us`, `1.23ms` or `1.01s`.
fn millis(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let value: f64 = text[..split].parse().ok()?;
    match &text[split..] {
        "us" => Some(value / 1000.0),
        "ms" => Some(value),
        "s" => Some(value * 1000.0),
        "m" => Some(value * 60_000.0),
        _ => None,
    }
}

pub fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut result = WrkResult::default();
    let mut found_rate = false;
    for line in text.lines().map(str::trim) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["50%", value] => result.p50_ms = millis(value)?,
            ["99%", value] => result.p99_ms = millis(value)?,
            ["Requests/sec:", value] => {
                result.requests_per_sec = value.parse().ok()?;
                found_rate = true;
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => result.non_2xx = n.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                result.socket_errors = rest
                    .iter()
                    .filter_map(|f| f.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    found_rate.then_some(result)
}

/// One h2load run.
#[derive(Clone, Debug, Default)]
pub struct H2Result {
    pub requests_per_sec: f64,
    pub failed: u64,
}

pub fn h2load_command(url: &str, clients: u32, streams: u32, seconds: u64) -> Vec<String> {
    [
        "h2load",
        "-t1",
        &format!("-c{clients}"),
        &format!("-m{streams}"),
        &format!("-D{seconds}"),
        url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn run_h2load(url: &str, clients: u32, streams: u32, seconds: u64) -> Result<H2Result, String> {
    let args = h2load_command(url, clients, streams, seconds);
    let output = Command::new(&args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("h2load: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_h2load(&text).ok_or_else(|| format!("cannot read h2load's report:\n{text}"))
}

pub fn parse_h2load(text: &str) -> Option<H2Result> {
    let mut result = H2Result::default();
    let mut found = false;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let rate = rest.split(',').nth(1)?.trim().strip_suffix(" req/s")?;
            result.requests_per_sec = rate.parse().ok()?;
            found = true;
        }
        if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(',').map(str::trim) {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                if matches!(what, "failed" | "errored" | "timeout") {
                    result.failed += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    found.then_some(result)
}

/// `program --version`-style output, first line.
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() {
                output.stderr
            } else {
                output.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        }
        Err(_) => "not found".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 5s test @ http://127.0.0.1:8080/\n  1 threads and 64 connections\n  Latency Distribution\n     50%  812.00us\n     75%    1.40ms\n     90%    1.80ms\n     99%    3.20ms\n  259000 requests in 5.00s, 30.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 12\nRequests/sec:  51800.25\nTransfer/sec:      6.00MB\n";
        let r = parse_wrk(report).unwrap();
        assert_eq!(r.requests_per_sec, 51800.25);
        assert_eq!(r.p50_ms, 0.812);
        assert_eq!(r.p99_ms, 3.2);
        assert_eq!(r.non_2xx, 12);
        assert_eq!(r.socket_errors, 3);
    }

    #[test]
    fn reads_an_h2load_report() {
        let report = "finished in 5.00s, 40123.40 req/s, 3.00MB/s\nrequests: 200000 total, 200000 started, 200000 done, 199990 succeeded, 10 failed, 0 errored, 0 timeout\n";
        let r = parse_h2load(report).unwrap();
        assert_eq!(r.requests_per_sec, 40123.4);
        assert_eq!(r.failed, 10);
    }
}
