//! Fuzz target: every admin request's body, query or path id parsed and checked as its handler does.
#![no_main]

use std::sync::Once;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use bluegreen::admin::{CHECKED_ENDPOINTS, check_request};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    static NETWORK: Once = Once::new();
    NETWORK.call_once(common::require_no_network);
    // First byte: which endpoint; the rest: its input.
    let Some((&which, input)) = data.split_first() else {
        return;
    };
    let endpoint = CHECKED_ENDPOINTS[usize::from(which) % CHECKED_ENDPOINTS.len()];
    let Err(error) = check_request(endpoint, input) else {
        return;
    };
    // A caller's bad input is the caller's error.
    assert_eq!(
        error.status(),
        StatusCode::BAD_REQUEST,
        "{endpoint}: {error:?}"
    );
    // The error renders as JSON and quotes the caller's input only in part.
    let response = error.into_response();
    let body = response
        .into_body()
        .collect()
        .now_or_never()
        .expect("an error body is ready at once")
        .expect("an error body cannot fail")
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("error body is JSON");
    assert_eq!(json["error"]["status"], 400);
    assert!(
        body.len() <= 4096,
        "{endpoint}: a {}-byte error for a {}-byte input",
        body.len(),
        input.len()
    );
});
