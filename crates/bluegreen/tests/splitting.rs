//! Weighted splits, sticky clients and preview routing.

mod support;

use std::collections::HashMap;

use support::{Backend, Daemon, client, color_of, config, get};

#[tokio::test(flavor = "multi_thread")]
async fn a_weighted_split_lands_within_statistical_tolerance() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let http = client();
    for (green_percent, n) in [(10u64, 2000u64), (50, 2000), (90, 2000)] {
        let (code, body) = daemon
            .admin(
                "POST",
                "/v1/weights",
                Some(&format!("{{\"green\":{green_percent}}}")),
            )
            .await;
        assert_eq!(code, 200, "{body}");
        let mut to_green = 0u64;
        for _ in 0..n {
            let (_, served_by, _) = get(&http, &daemon.url("/"), &[]).await.unwrap();
            to_green += u64::from(color_of(&served_by) == "green");
        }
        // Binomial: mean n·p, standard deviation sqrt(n·p·(1-p)); allow 5 standard deviations,
        // which a correct router misses about once in 3.5 million runs.
        let p = green_percent as f64 / 100.0;
        let mean = n as f64 * p;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        let got = to_green as f64;
        assert!(
            (got - mean).abs() <= 5.0 * sd,
            "green {green_percent}%: {to_green} of {n} went to green (expected {mean} ± {})",
            5.0 * sd
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sticky_clients_stay_on_green_as_its_share_grows() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "  sticky: true\n")).await;
    let http = client();
    daemon
        .admin("POST", "/v1/weights", Some(r#"{"green":10}"#))
        .await;

    // 300 clients arrive without a cookie and are each handed one.
    let mut cookies = Vec::new();
    for _ in 0..300 {
        let response = support::get_response(&http, &daemon.url("/")).await;
        let cookie = response
            .headers()
            .get("set-cookie")
            .expect("a sticky cookie is set")
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            cookie.starts_with("bluegreen_sticky=") && cookie.contains("HttpOnly"),
            "{cookie}"
        );
        cookies.push(cookie.split(';').next().unwrap().to_string());
    }

    let mut on_green: HashMap<String, bool> = HashMap::new();
    for green_percent in [10, 25, 50, 75, 100] {
        daemon
            .admin(
                "POST",
                "/v1/weights",
                Some(&format!("{{\"green\":{green_percent}}}")),
            )
            .await;
        let mut greens = 0;
        for cookie in &cookies {
            // Each client asks three times: it must get the same color every time.
            let mut colors = Vec::new();
            for _ in 0..3 {
                let (_, served_by, _) = get(&http, &daemon.url("/"), &[("cookie", cookie)])
                    .await
                    .unwrap();
                colors.push(color_of(&served_by).to_string());
            }
            assert!(
                colors.iter().all(|c| *c == colors[0]),
                "{cookie} flipped within one split: {colors:?}"
            );
            let green_now = colors[0] == "green";
            if on_green.get(cookie) == Some(&true) {
                assert!(
                    green_now,
                    "{cookie} went back to blue at green {green_percent}%"
                );
            }
            on_green.insert(cookie.clone(), green_now);
            greens += usize::from(green_now);
        }
        let expected = cookies.len() * green_percent / 100;
        assert!(
            greens.abs_diff(expected) <= 45,
            "green {green_percent}%: {greens} of 300 sticky clients on green"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn preview_routes_to_the_idle_color_by_header_or_cookie() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(&[&blue], &[&green], "")).await;
    let http = client();
    let url = daemon.url("/");
    for _ in 0..10 {
        let (_, served_by, _) = get(&http, &url, &[("x-bluegreen-env", "green")])
            .await
            .unwrap();
        assert_eq!(served_by, "green-1");
        let (_, served_by, _) = get(&http, &url, &[("cookie", "bluegreen_env=green")])
            .await
            .unwrap();
        assert_eq!(served_by, "green-1");
        let (_, served_by, _) = get(&http, &url, &[]).await.unwrap();
        assert_eq!(served_by, "blue-1", "everyone else stays on the live color");
    }
    let (_, served_by, _) = get(&http, &url, &[("x-bluegreen-env", "purple")])
        .await
        .unwrap();
    assert_eq!(served_by, "blue-1", "an unknown color is routed by weight");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_secret_only_requests_that_carry_it_get_the_preview() {
    let blue = Backend::start("blue-1").await;
    let green = Backend::start("green-1").await;
    let daemon = Daemon::start(&config(
        &[&blue],
        &[&green],
        "  preview: { secret: let-me-in }\n",
    ))
    .await;
    let http = client();
    let url = daemon.url("/");

    let response = http
        .request(
            http::Request::get(&url)
                .header("x-bluegreen-env", "green")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-served-by"],
        "blue-1",
        "no secret, no preview"
    );
    assert!(
        response.headers()["x-bluegreen-preview"]
            .to_str()
            .unwrap()
            .starts_with("refused")
    );

    let (_, served_by, _) = get(
        &http,
        &url,
        &[
            ("x-bluegreen-env", "green"),
            ("x-bluegreen-secret", "wrong"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(served_by, "blue-1", "a wrong secret, no preview");

    let headers_url = daemon.url("/headers");
    let (_, served_by, body) = get(
        &http,
        &headers_url,
        &[
            ("x-bluegreen-env", "green"),
            ("x-bluegreen-secret", "let-me-in"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(served_by, "green-1");
    let seen: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        seen.get("x-bluegreen-secret").is_none(),
        "the secret is not passed upstream: {seen}"
    );
}
