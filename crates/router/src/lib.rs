//! bluegreen's data plane: a reverse proxy that routes every request by one immutable routing table.
//!
//! The router knows nothing of releases, providers or stores. The control plane builds a
//! [`RoutingTable`] and hands the router a new [`Split`]; the router checks that the split
//! would not send traffic to a color with no healthy upstream, swaps the table atomically,
//! and drains whatever was still running on a color that stopped receiving traffic.

pub mod drain;
pub mod error;
pub mod health;
pub mod http1;
pub mod metrics;
pub mod mirror;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod server;
pub mod table;
pub mod upstream;
pub mod websocket;

pub use error::{ProxyError, SwitchError};
pub use health::HealthSettings;
pub use metrics::{ColorSnapshot, Metrics};
pub use mirror::{Compare, CompareHeaders, JsonPath, MirrorDifference, MirrorRule, MirrorSnapshot};
pub use protocol::UpstreamProtocol;
pub use proxy::{ForwardedHeaders, ProxySettings};
pub use server::{ListenerSettings, Router, RouterConfig, RouterStatus, StartError, TlsFiles};
pub use table::{Color, PreviewRule, RoutingTable, Split, StickyRule};
pub use upstream::{Health, Upstream};
