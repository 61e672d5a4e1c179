//! Replacing an environment's upstreams at runtime: checked first, refused if it would blackhole, kept across restarts.

mod support;

use support::{Backend, Daemon, client, config, get};

#[tokio::test(flavor = "multi_thread")]
async fn green_can_be_pointed_at_a_new_deployment_and_keeps_it_after_a_restart() {
    let blue = Backend::start("blue-1").await;
    let green_old = Backend::start("green-old").await;
    let green_new = Backend::start("green-new").await;
    let text = config(&[&blue], &[&green_old], "");
    let daemon = Daemon::start(&text).await;

    let new_addr = green_new.addr.to_string();
    let out = daemon.cli(&["upstreams", "--environment", "green", &new_addr]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "green now routes to 1 upstream(s), 1 healthy"
    );
    let http = client();
    let (_, served_by, _) = get(&http, &daemon.url("/"), &[("x-bluegreen-env", "green")])
        .await
        .unwrap();
    assert_eq!(
        served_by, "green-new",
        "the preview reaches the new deployment"
    );

    let dir = daemon.into_dir();
    let daemon = Daemon::start_in(dir, &text).await;
    let status = daemon.status().await;
    assert_eq!(
        status["colors"][1]["upstreams"][0]["address"], new_addr,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_color_cannot_be_pointed_at_dead_upstreams() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let dead = Backend::start("dead").await;
    dead.kill();
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let before = daemon.status().await;

    let body = format!(r#"{{"environment":"blue","upstreams":["{}"]}}"#, dead.addr);
    let (code, answer) = daemon.admin("POST", "/v1/upstreams", Some(&body)).await;
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("environment blue has no healthy upstream")
    );
    let after = daemon.status().await;
    assert_eq!(after["generation"], before["generation"]);
    let (_, served_by, _) = get(&client(), &daemon.url("/"), &[]).await.unwrap();
    assert_eq!(served_by, "blue-1");

    for (body, field, message) in [
        (
            r#"{"environment":"green","upstreams":[]}"#,
            "upstreams",
            "is empty",
        ),
        (
            r#"{"environment":"green","upstreams":["127.0.0.1"]}"#,
            "upstreams[0]",
            "has no port",
        ),
        (
            r#"{"environment":"teal","upstreams":["127.0.0.1:1"]}"#,
            "environment",
            "unknown variant",
        ),
    ] {
        let (code, answer) = daemon.admin("POST", "/v1/upstreams", Some(body)).await;
        assert_eq!(code, 400, "{answer}");
        assert_eq!(answer["error"]["field"], field, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{answer}"
        );
    }
    // The idle color may be pointed anywhere (it is checked, and a switch to it is refused
    // while it has no healthy upstream).
    let body = format!(r#"{{"environment":"green","upstreams":["{}"]}}"#, dead.addr);
    let (code, answer) = daemon.admin("POST", "/v1/upstreams", Some(&body)).await;
    assert_eq!(code, 200, "{answer}");
    assert!(answer["message"].as_str().unwrap().ends_with("0 healthy"));
    let (code, _) = daemon
        .admin("POST", "/v1/switch", Some(r#"{"to":"green"}"#))
        .await;
    assert_eq!(code, 409);
}
