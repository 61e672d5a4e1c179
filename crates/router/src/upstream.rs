//! One upstream address: its health lifecycle, its in-flight count and why it was last ejected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::pool::ConnPool;
use crate::protocol::Connector;
use crate::table::Color;

/// Where an upstream is in its life. Only `Healthy` upstreams receive traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet; the first check decides.
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    fn from_u8(value: u8) -> Health {
        match value {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Health::Unknown => 0,
            Health::Healthy => 1,
            Health::Unhealthy => 2,
        }
    }
}

/// How many consecutive results flip an upstream.
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub healthy: u32,
    pub unhealthy: u32,
}

/// Counts consecutive check results and decides when the state flips.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    state: Health,
    successes: u32,
    failures: u32,
}

impl Default for HealthTracker {
    fn default() -> Self {
        HealthTracker {
            state: Health::Unknown,
            successes: 0,
            failures: 0,
        }
    }
}

impl HealthTracker {
    pub fn state(&self) -> Health {
        self.state
    }

    /// Records one active-check result; returns the new state when it changed.
    pub fn record(&mut self, ok: bool, thresholds: Thresholds) -> Option<Health> {
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let next = match self.state {
            // The first check decides, so a fresh router serves as soon as it has looked once.
            Health::Unknown if ok => Health::Healthy,
            Health::Unknown => Health::Unhealthy,
            Health::Healthy if self.failures >= thresholds.unhealthy => Health::Unhealthy,
            Health::Unhealthy if self.successes >= thresholds.healthy => Health::Healthy,
            state => state,
        };
        self.transition(next)
    }

    /// A connection to the upstream failed while proxying: take it out at once; active checks
    /// bring it back after `healthy` consecutive successes.
    pub fn eject(&mut self) -> Option<Health> {
        self.successes = 0;
        self.transition(Health::Unhealthy)
    }

    fn transition(&mut self, next: Health) -> Option<Health> {
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }
}

pub struct Upstream {
    pub color: Color,
    pub addr: SocketAddr,
    /// `host:port` as written in the config, used as the upstream request's authority.
    pub authority: http::uri::Authority,
    health: AtomicU8,
    tracker: Mutex<HealthTracker>,
    in_flight: AtomicUsize,
    last_error: Mutex<Option<String>>,
    /// Connections to this upstream, in its environment's protocol.
    pub pool: ConnPool,
}

impl Upstream {
    pub fn new(color: Color, addr: SocketAddr, connector: Arc<Connector>) -> Upstream {
        let authority = addr
            .to_string()
            .parse()
            .expect("a socket address is a valid authority");
        Upstream {
            color,
            addr,
            authority,
            health: AtomicU8::new(Health::Unknown.as_u8()),
            tracker: Mutex::new(HealthTracker::default()),
            in_flight: AtomicUsize::new(0),
            last_error: Mutex::new(None),
            pool: ConnPool::new(connector),
        }
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Acquire))
    }

    pub fn is_routable(&self) -> bool {
        self.health() == Health::Healthy
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("lock").clone()
    }

    /// Counts a request against this upstream until [`Upstream::end_request`].
    pub fn begin_request(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn end_request(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn record_check(&self, result: Result<(), String>, thresholds: Thresholds) {
        let ok = result.is_ok();
        let mut tracker = self.tracker.lock().expect("lock");
        if let Err(reason) = result {
            *self.last_error.lock().expect("lock") = Some(reason);
        }
        if let Some(next) = tracker.record(ok, thresholds) {
            self.publish(next);
        }
    }

    pub fn eject(&self, reason: String) {
        let mut tracker = self.tracker.lock().expect("lock");
        *self.last_error.lock().expect("lock") = Some(reason);
        if let Some(next) = tracker.eject() {
            self.publish(next);
        }
    }

    fn publish(&self, next: Health) {
        self.health.store(next.as_u8(), Ordering::Release);
        match next {
            Health::Healthy => {
                tracing::info!(color = %self.color, upstream = %self.addr, "upstream healthy")
            }
            _ => tracing::warn!(
                color = %self.color,
                upstream = %self.addr,
                reason = self.last_error().unwrap_or_default(),
                "upstream unhealthy"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        healthy: 2,
        unhealthy: 3,
    };

    #[test]
    fn first_check_decides_then_thresholds_apply() {
        let mut t = HealthTracker::default();
        assert_eq!(t.record(true, T), Some(Health::Healthy));
        assert_eq!(t.record(false, T), None);
        assert_eq!(t.record(false, T), None);
        assert_eq!(
            t.record(true, T),
            None,
            "a success resets the failure count"
        );
        assert_eq!(t.record(false, T), None);
        assert_eq!(t.record(false, T), None);
        assert_eq!(t.record(false, T), Some(Health::Unhealthy));
        assert_eq!(t.record(true, T), None);
        assert_eq!(t.record(true, T), Some(Health::Healthy));
    }

    #[test]
    fn ejection_is_immediate_and_recovery_needs_the_threshold() {
        let mut t = HealthTracker::default();
        t.record(true, T);
        assert_eq!(t.eject(), Some(Health::Unhealthy));
        assert_eq!(t.eject(), None);
        assert_eq!(t.record(true, T), None);
        assert_eq!(t.record(true, T), Some(Health::Healthy));
    }

    #[test]
    fn unknown_that_fails_is_unhealthy() {
        let mut t = HealthTracker::default();
        assert_eq!(t.record(false, T), Some(Health::Unhealthy));
    }
}
