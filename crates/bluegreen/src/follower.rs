//! A release (or shift) started through the admin API and followed, event by event, to its end.

use std::time::Duration;

use http::Method;
use serde_json::Value;

use crate::client::AdminClient;
use crate::exit::{CliError, expect_ok};

/// Starts a release (or shift) with `POST path`; returns its id and the last event id before
/// it, from where to follow it.
pub async fn start(
    client: &AdminClient,
    path: &str,
    body: Value,
) -> Result<(i64, i64, Value), CliError> {
    let last = expect_ok(
        client
            .call(Method::GET, "/v1/history?limit=1", None)
            .await?,
    )?;
    let after = last["events"][0]["id"].as_i64().unwrap_or(0);
    let started = expect_ok(client.call(Method::POST, path, Some(body)).await?)?;
    let id = started["release"]["id"].as_i64().unwrap_or(0);
    Ok((id, after, started["release"].clone()))
}

/// Follows release `id` to its end: `on_event` gets each event stored after `after`,
/// `on_poll` the release as it stands after each poll. Returns `GET /v1/releases/{id}` at the end.
pub async fn follow(
    client: &AdminClient,
    id: i64,
    mut after: i64,
    mut on_event: impl FnMut(&Value),
    mut on_poll: impl FnMut(&Value),
) -> Result<Value, CliError> {
    loop {
        let events = expect_ok(
            client
                .call(
                    Method::GET,
                    &format!("/v1/history?after={after}&limit=500"),
                    None,
                )
                .await?,
        )?;
        for event in events["events"].as_array().into_iter().flatten() {
            after = event["id"].as_i64().unwrap_or(after);
            on_event(event);
        }
        let answer = expect_ok(
            client
                .call(Method::GET, &format!("/v1/releases/{id}"), None)
                .await?,
        )?;
        if matches!(
            answer["release"]["state"].as_str(),
            Some("succeeded" | "rolled_back" | "failed" | "aborted")
        ) {
            return Ok(answer);
        }
        on_poll(&answer["release"]);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
