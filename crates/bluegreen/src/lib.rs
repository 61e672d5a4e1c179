//! bluegreen as a library: the binary, the fuzz targets and the benches call into it.

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod demo;
pub mod demo_image;
pub mod duration;
pub mod exit;
pub mod fleet;
pub mod follower;
pub mod handoff;
pub mod store;
pub mod timestamp;
pub mod transport;
