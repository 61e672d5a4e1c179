//! A state store that cannot write for 2 s stalls the switch, never the traffic: the data plane does not wait on the control plane.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::{Backend, Daemon, client, color_of, config, get};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_answered_at_once_while_the_store_cannot_write() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    daemon.wait_healthy("green", 1).await;
    let url = daemon.url("/");

    // Keep-alive clients send requests the whole time and time each one.
    let running = Arc::new(AtomicBool::new(true));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let running = Arc::clone(&running);
        let url = url.clone();
        workers.push(tokio::spawn(async move {
            let client = client();
            let mut seen = Vec::new();
            while running.load(Ordering::Relaxed) && seen.len() < 50_000 {
                let start = Instant::now();
                let result = get(&client, &url, &[]).await;
                seen.push((start, start.elapsed(), result));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Another process holds SQLite's write lock for 2 s: every commit waits behind it, as it
    // would behind a disk that takes 2 s to fsync.
    let db = daemon.dir.path().join(".bluegreen/state.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let connection = rusqlite::Connection::open(db).unwrap();
        connection.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(Instant::now()).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        connection.execute_batch("ROLLBACK").unwrap();
    });
    let locked_at = locked_rx.recv().unwrap();
    let switch_sent = Instant::now();
    let switched = daemon.switch("green").await;
    let switch_took = switch_sent.elapsed();
    holder.join().unwrap();
    let unlocked_at = locked_at + Duration::from_secs(2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    running.store(false, Ordering::Relaxed);

    assert_eq!(switched["weights"]["green"], 100, "{switched}");
    assert!(
        switch_took >= Duration::from_millis(1500),
        "the switch waited for the store (it records before it swaps): took {switch_took:?}"
    );

    let mut during = Vec::new();
    let mut failed = Vec::new();
    let mut after_switch = Vec::new();
    for worker in workers {
        for (start, took, result) in worker.await.unwrap() {
            match &result {
                Ok((200, served_by, _)) => {
                    if start > locked_at && start + took < unlocked_at {
                        during.push(took);
                    }
                    if start > switch_sent + switch_took {
                        after_switch.push(color_of(served_by).to_string());
                    }
                }
                _ => failed.push(result),
            }
        }
    }
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(
        during.len() >= 100,
        "clients kept being served while the store was locked: {} requests",
        during.len()
    );
    let slowest = during.iter().max().unwrap();
    assert!(
        *slowest < Duration::from_millis(100),
        "every request during the stall was answered well under 100 ms; the slowest took {slowest:?}"
    );
    assert!(
        !after_switch.is_empty() && after_switch.iter().all(|c| c == "green"),
        "green serves once the switch returned: {after_switch:?}"
    );
}
