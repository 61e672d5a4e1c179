//! `GET /v1/openapi.json`: the admin API described from the handlers' own annotations, so the document cannot drift from what they do.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "bluegreen admin API",
        description = "Drives the daemon: traffic, deploys, releases, history. Served on the unix socket `router.admin` (no token), or on a TCP `router.admin` address where every call needs `Authorization: Bearer <token>` (the token in `router.admin_token_file`). A refused call (4xx) changes nothing.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    tags(
        (name = "status", description = "What runs and how traffic flows now"),
        (name = "traffic", description = "Operators' changes to the traffic"),
        (name = "environments", description = "The two colors: deploy, test, compare, logs"),
        (name = "releases", description = "Releases and traffic shifts, and their controls"),
        (name = "history", description = "The audit log"),
        (name = "config", description = "The config file")
    )
)]
pub struct ApiDoc;

/// The whole document: every route the admin router serves, with the bearer token each call
/// needs on a TCP address.
pub fn description() -> OpenApi {
    let mut doc = super::api().into_openapi();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    let unauthorized = ResponseBuilder::new()
        .description("Only on a TCP admin address: the bearer token is missing or wrong")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            require_token(operation, &unauthorized);
        }
    }
    doc
}

fn require_token(operation: &mut Operation, unauthorized: &utoipa::openapi::Response) {
    // No token on the unix socket (`{}`), the bearer token on TCP.
    operation.security = Some(vec![
        SecurityRequirement::default(),
        SecurityRequirement::new("bearer", Vec::<String>::new()),
    ]);
    operation
        .responses
        .responses
        .insert("401".into(), unauthorized.clone().into());
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "status",
    responses(
        (status = 200, description = "This document (OpenAPI 3.1)", body = Object)
    )
)]
pub(super) async fn document() -> Response {
    static TEXT: LazyLock<String> = LazyLock::new(|| {
        description()
            .to_pretty_json()
            .expect("the document serializes")
    });
    ([(header::CONTENT_TYPE, "application/json")], TEXT.as_str()).into_response()
}
