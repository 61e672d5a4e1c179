//! What operators ask of the traffic, and why the controller may say no.

use bluegreen_router::{Color, Split};

/// A change to the traffic split, as the CLI and admin API ask for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Command {
    Switch {
        to: Color,
        from: Option<Color>,
    },
    Weights(Split),
    Rollback,
    /// All traffic back to this color: how a release rolls back (recorded as a rollback).
    ReturnTo(Color),
}

/// Why a command was not carried out. Nothing changed in any case.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}
