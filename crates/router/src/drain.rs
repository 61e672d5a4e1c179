//! Draining: what was opened on a color that stopped taking traffic finishes, or is cut at a deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::table::Color;

/// The requests and tunnels opened on one color while it was live. When the color stops
/// taking traffic the group is handed to [`Drains`], which cancels it at the deadline.
pub struct DrainGroup {
    pub color: Color,
    token: CancellationToken,
    active: AtomicUsize,
}

impl DrainGroup {
    pub fn new(color: Color, parent: &CancellationToken) -> Arc<DrainGroup> {
        Arc::new(DrainGroup {
            color,
            token: parent.child_token(),
            active: AtomicUsize::new(0),
        })
    }

    pub fn join(self: &Arc<Self>) -> DrainMember {
        self.active.fetch_add(1, Ordering::Relaxed);
        DrainMember {
            group: Arc::clone(self),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// Membership of one request or tunnel in a drain group; dropping it leaves the group.
pub struct DrainMember {
    group: Arc<DrainGroup>,
}

impl DrainMember {
    pub fn token(&self) -> &CancellationToken {
        &self.group.token
    }

    pub fn color(&self) -> Color {
        self.group.color
    }
}

impl Drop for DrainMember {
    fn drop(&mut self) {
        self.group.active.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Pending {
    group: Arc<DrainGroup>,
    deadline: JoinHandle<()>,
}

/// Groups that are draining, each with a timer that cancels it at its deadline.
#[derive(Default)]
pub struct Drains {
    pending: Mutex<Vec<Pending>>,
}

impl Drains {
    /// Starts the clock on a group whose color no longer takes traffic.
    pub fn start(&self, group: Arc<DrainGroup>, timeout: Duration) {
        let timer_group = Arc::clone(&group);
        let deadline = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if timer_group.active() > 0 {
                tracing::info!(
                    color = %timer_group.color,
                    remaining = timer_group.active(),
                    "drain timeout reached; closing what is left"
                );
            }
            timer_group.token.cancel();
        });
        let mut pending = self.pending.lock().expect("lock");
        prune(&mut pending);
        pending.push(Pending { group, deadline });
    }

    /// The color takes traffic again (a rollback inside the drain window): what was draining
    /// on it may stay open.
    pub fn revive(&self, color: Color) {
        let mut pending = self.pending.lock().expect("lock");
        pending.retain(|p| {
            let keep = p.group.color != color;
            if !keep {
                p.deadline.abort();
            }
            keep
        });
    }

    /// How many requests and tunnels are still draining on the color.
    pub fn draining(&self, color: Color) -> usize {
        let mut pending = self.pending.lock().expect("lock");
        prune(&mut pending);
        pending
            .iter()
            .filter(|p| p.group.color == color)
            .map(|p| p.group.active())
            .sum()
    }
}

/// Forgets groups whose deadline has passed and whose last member has left. A group that is
/// empty before its deadline stays: a request that read the old table just before the swap
/// may still join it, and must still be cut at the deadline.
fn prune(pending: &mut Vec<Pending>) {
    pending.retain(|p| !(p.group.is_cancelled() && p.group.active() == 0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drained_group_is_cancelled_at_the_deadline_not_before() {
        let root = CancellationToken::new();
        let drains = Drains::default();
        let group = DrainGroup::new(Color::Blue, &root);
        let member = group.join();
        drains.start(Arc::clone(&group), Duration::from_secs(30));
        assert_eq!(drains.draining(Color::Blue), 1);
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(!member.token().is_cancelled());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(member.token().is_cancelled());
        drop(member);
        assert_eq!(drains.draining(Color::Blue), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn reviving_a_color_keeps_its_connections_open() {
        let root = CancellationToken::new();
        let drains = Drains::default();
        let group = DrainGroup::new(Color::Green, &root);
        let member = group.join();
        drains.start(Arc::clone(&group), Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(1)).await;
        drains.revive(Color::Green);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!member.token().is_cancelled());
        assert_eq!(
            drains.draining(Color::Green),
            0,
            "revived is live, not draining"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_the_root_cuts_every_group() {
        let root = CancellationToken::new();
        let group = DrainGroup::new(Color::Blue, &root);
        let member = group.join();
        root.cancel();
        assert!(member.token().is_cancelled());
    }
}
