//! The example app answers with its color and version, and misbehaves exactly as its flags say.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct App {
    child: Child,
    addr: String,
}

impl App {
    fn start(args: &[&str]) -> App {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bluegreen-example-app"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .nth(2)
            .expect("listening on ADDR")
            .to_string();
        App { child, addr }
    }

    /// One request on a fresh connection: status code and body.
    fn get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn answers_with_color_and_version() {
    let app = App::start(&["--color", "green", "--app-version", "2.0"]);
    assert_eq!(app.get("/"), (200, "green 2.0\n".to_string()));
    assert_eq!(app.get("/healthz").0, 200);
}

#[test]
fn error_rate_latency_and_health_flags_take_effect() {
    let failing = App::start(&["--error-rate", "1.0"]);
    assert_eq!(failing.get("/").0, 500);
    let sometimes = App::start(&["--error-rate", "0.2"]);
    let errors = (0..300).filter(|_| sometimes.get("/").0 == 500).count();
    // Binomial(300, 0.2): mean 60, standard deviation about 7; allow 5 of them.
    assert!((25..=95).contains(&errors), "{errors} of 300 failed");

    let slow = App::start(&["--latency-ms", "150"]);
    let started = Instant::now();
    assert_eq!(slow.get("/").0, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    let sick = App::start(&["--unhealthy"]);
    assert_eq!(sick.get("/healthz").0, 503);
    assert_eq!(sick.get("/").0, 200, "only the health check fails");

    let starting = App::start(&["--slow-start-ms", "400"]);
    assert_eq!(starting.get("/healthz").0, 503);
    std::thread::sleep(Duration::from_millis(450));
    assert_eq!(starting.get("/healthz").0, 200);
}

#[test]
fn a_bad_flag_is_refused_with_its_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_bluegreen-example-app"))
        .args(["--error-rate", "1.5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--error-rate: 1.5 is out of range"));
}
