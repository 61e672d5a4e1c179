//! How a command ends: the exit codes scripts branch on, and the error that carries one.

use http::StatusCode;
use serde_json::{Value, json};

use crate::client::ClientError;
use crate::config::ConfigError;

pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const BAD_CONFIG: u8 = 3;
pub const REFUSED: u8 = 4;
pub const UNREACHABLE: u8 = 5;
/// The release (or shift) was rolled back: analysis found a breach, or an operator asked.
pub const ROLLED_BACK: u8 = 6;
/// The release was aborted before any traffic moved.
pub const ABORTED: u8 = 7;
/// In a fleet: the change is recorded, but some routers had not applied it in time.
pub const NOT_CONFIRMED: u8 = 8;

/// A failure to report: what went wrong, and the exit code that tells scripts which kind.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }
}

impl From<ConfigError> for CliError {
    fn from(error: ConfigError) -> Self {
        CliError::new(BAD_CONFIG, error.to_string())
    }
}

impl From<ClientError> for CliError {
    fn from(error: ClientError) -> Self {
        let code = match error {
            ClientError::Unreachable { .. } => UNREACHABLE,
            ClientError::Protocol { .. } => FAILURE,
        };
        CliError::new(code, error.to_string())
    }
}

/// The daemon's answer as JSON, or its error message with the matching exit code.
pub fn expect_ok((status, body): (StatusCode, bytes::Bytes)) -> Result<Value, CliError> {
    let value: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| json!({ "message": String::from_utf8_lossy(&body) }));
    if status.is_success() {
        return Ok(value);
    }
    let error = &value["error"];
    let message = error["message"]
        .as_str()
        .unwrap_or("the daemon refused the request")
        .to_string();
    let message = match error["field"].as_str() {
        Some(field) => format!("{field}: {message}"),
        None => message,
    };
    let code = if status.is_client_error() {
        REFUSED
    } else {
        FAILURE
    };
    Err(CliError::new(code, message))
}
