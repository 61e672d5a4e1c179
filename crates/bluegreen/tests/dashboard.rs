//! The web dashboard in headless Chromium (driven over the DevTools protocol): live numbers for both colors, a rollback button that changes the daemon.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Backend, Daemon, Load, client, config};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Headless Chromium with one page, spoken to over the DevTools protocol.
struct Browser {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    socket: Socket,
    session: String,
    next_id: u64,
}

impl Browser {
    async fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium runs (scripts/test installs Debian's chromium package)");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let endpoint = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(at) = line.find("ws://") {
                    return line[at..].trim().to_string();
                }
            }
            panic!("chromium exited without a DevTools endpoint");
        })
        .await
        .expect("chromium printed its DevTools endpoint");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(endpoint.as_str())
            .await
            .unwrap();
        let mut browser = Browser {
            _child: child,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 0,
        };
        let target = browser
            .call("Target.createTarget", json!({ "url": url }), false)
            .await;
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
                false,
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser
    }

    async fn call(&mut self, method: &str, params: Value, in_page: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if in_page {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::Text(message.to_string().into()))
            .await
            .unwrap();
        loop {
            let answer = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .expect("DevTools answers")
                .unwrap()
                .unwrap();
            let Message::Text(text) = answer else {
                continue;
            };
            let value: Value = serde_json::from_str(&text).unwrap();
            if value["id"] == id {
                assert!(value["error"].is_null(), "{method}: {value}");
                return value["result"].clone();
            }
        }
    }

    /// Evaluates JavaScript in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
                true,
            )
            .await;
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {result}"
        );
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    async fn wait_for(&mut self, expression: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.eval(expression).await == json!(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let page = self.eval("document.body.innerText").await;
        panic!("the page never showed {what}: {page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_both_colors_live_and_its_rollback_button_rolls_back() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    daemon.wait_healthy("green", 1).await;
    daemon.switch("green").await;
    let load = Load::start(daemon.url("/"), 2);

    // `bluegreen dashboard` prints the URL with the token.
    let out = daemon.cli(&["dashboard"]);
    assert!(out.status.success(), "{out:?}");
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.contains("/#token="),
        "{url}"
    );
    let base = url.split('#').next().unwrap().to_string();

    // The buttons' API refuses calls without the token, and changes nothing.
    let refused = client()
        .request(
            http::Request::post(format!("{base}api/rollback"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(daemon.status().await["live"], "green");

    let mut page = Browser::open(&url).await;
    page.wait_for(
        "!!document.querySelector('#card-blue h2') && !!document.querySelector('#card-green h2')",
        "both colors",
    )
    .await;
    page.wait_for(
        "document.querySelector('#card-green .weight').textContent === '100%' && document.querySelector('#card-blue .weight').textContent === '0%'",
        "the weights",
    )
    .await;
    page.wait_for(
        "parseFloat(document.querySelector('#card-green .rps').textContent) > 0",
        "green's live request rate",
    )
    .await;
    let upstreams = page
        .eval("document.querySelector('#card-green .upstreams').textContent")
        .await;
    assert!(
        upstreams
            .as_str()
            .unwrap()
            .contains(&green.addr.to_string()),
        "each upstream is listed: {upstreams}"
    );
    // Live: the snapshot the page shows keeps changing.
    let first = page
        .eval("document.getElementById('conn').textContent")
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = page
        .eval("document.getElementById('conn').textContent")
        .await;
    assert_ne!(first, second, "the page follows the daemon's stream");
    assert_eq!(
        page.eval("document.getElementById('live').textContent")
            .await,
        "live: green"
    );

    // Rollback asks first; confirming rolls the daemon back to blue.
    let asked = page
        .eval("document.getElementById('rollback').click(); document.getElementById('confirm').classList.contains('open') && document.getElementById('confirm-text').textContent")
        .await;
    assert!(asked.as_str().unwrap().contains("blue"), "{asked}");
    assert_eq!(
        daemon.status().await["live"],
        "green",
        "nothing before confirming"
    );
    page.eval("document.getElementById('confirm-yes').click(); true")
        .await;
    daemon
        .wait_status("the rollback to blue", |s| s["live"] == "blue")
        .await;
    page.wait_for(
        "document.getElementById('result').textContent.includes('rolled back')",
        "the rollback's answer",
    )
    .await;
    page.wait_for(
        "document.getElementById('live').textContent === 'live: blue'",
        "blue live",
    )
    .await;
    page.wait_for(
        "document.querySelector('#events').innerText.includes('rolled back')",
        "the rollback event",
    )
    .await;
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}
