//! `bluegreen monitor` in a real terminal (tmux): what the screen shows, and its keys acting on the daemon.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{BIN, Backend, Daemon, Load, config};

/// A tmux server of its own, killed when the test ends.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let tmux = Tmux {
            socket: format!("bluegreen-test-{}", std::process::id()),
        };
        let status = Command::new("tmux")
            .args([
                "-L",
                &tmux.socket,
                "new-session",
                "-d",
                "-s",
                "monitor",
                "-x",
                "150",
                "-y",
                "45",
            ])
            .arg(command)
            .status()
            .expect("tmux runs (scripts/test installs it)");
        assert!(status.success());
        tmux
    }

    fn screen(&self) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-t", "monitor"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", "monitor", keys])
            .status()
            .unwrap();
    }

    fn running(&self) -> bool {
        Command::new("tmux")
            .args(["-L", &self.socket, "has-session", "-t", "monitor"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until the screen satisfies `shows`.
    async fn wait_for(&self, what: &str, shows: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let screen = self.screen();
            if shows(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {what}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Some "N req/s" on the screen with N > 0.
fn a_rate_above_zero(screen: &str) -> bool {
    let words: Vec<&str> = screen.split_whitespace().collect();
    words.windows(2).any(|w| {
        let number = w[0].trim_start_matches(|c: char| !c.is_ascii_digit());
        w[1] == "req/s" && number.parse::<f64>().is_ok_and(|rate| rate > 0.0)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_monitor_shows_both_colors_live_and_r_then_y_rolls_back() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    daemon.wait_healthy("green", 1).await;
    daemon.switch("green").await;
    let load = Load::start(daemon.url("/"), 2);

    let tmux = Tmux::start(&format!(
        "{BIN} --config {} monitor",
        daemon.config_path.display()
    ));
    let screen = tmux
        .wait_for("both colors with green's live rate", |s| {
            s.contains("live: green")
                && s.contains(" blue ")
                && s.contains(" green ")
                && s.contains("green 100%")
                && a_rate_above_zero(s)
        })
        .await;
    assert!(screen.contains("upstreams 1/1 healthy"), "{screen}");
    assert!(
        screen.contains(&format!("{} healthy", green.addr)),
        "each upstream: {screen}"
    );
    assert!(screen.contains("no release running"), "{screen}");
    assert!(
        screen.contains("req/s, last minute") && screen.contains("p99 ms (max"),
        "{screen}"
    );

    // r asks; anything but y cancels.
    tmux.keys("r");
    tmux.wait_for("the rollback question", |s| {
        s.contains("Roll back: all traffic to blue? y/n")
    })
    .await;
    tmux.keys("n");
    tmux.wait_for("the cancel", |s| s.contains("cancelled"))
        .await;
    assert_eq!(daemon.status().await["live"], "green");
    // r then y rolls back, and the screen follows.
    tmux.keys("r");
    tmux.wait_for("the rollback question", |s| s.contains("y/n"))
        .await;
    tmux.keys("y");
    daemon
        .wait_status("the rollback to blue", |s| s["live"] == "blue")
        .await;
    tmux.wait_for("blue live and the rollback event", |s| {
        s.contains("live: blue") && s.contains("rolled back: blue is live")
    })
    .await;
    // p without a release says so; q quits.
    tmux.keys("p");
    tmux.wait_for("the pause answer", |s| s.contains("nothing to pause"))
        .await;
    tmux.keys("q");
    let deadline = Instant::now() + Duration::from_secs(5);
    while tmux.running() {
        assert!(
            Instant::now() < deadline,
            "q did not quit:\n{}",
            tmux.screen()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.stop().await;
}
