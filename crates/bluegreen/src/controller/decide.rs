//! The controller's decisions as pure functions: given the recorded state and a command, what to record — or why not.
//!
//! Nothing here touches a socket, a process, the store or the clock; the controller reads the
//! state, asks here, records what is decided, and only then acts on it.

use bluegreen_router::{Color, Split};

use super::command::Command;
use super::event::EventKind;
use super::release_record::{Release, ReleaseKind, ReleasePlan, ReleaseState};
use crate::store::RouterState;

/// What a traffic command comes to.
#[derive(Debug, PartialEq)]
pub enum TrafficDecision {
    /// The split is already the target: nothing to record.
    Unchanged,
    Change {
        target: Split,
        rollback_to: Option<Color>,
        /// The event kind to record, and its message.
        kind: EventKind,
        message: String,
    },
}

/// Decides a traffic command against the recorded state. Whether the router can take the
/// target (health) is asked of the data plane afterwards.
pub fn traffic(command: Command, state: &RouterState) -> Result<TrafficDecision, String> {
    let current = state.split;
    let target = match command {
        Command::Switch { to, from } => {
            if let Some(from) = from
                && current.weight(from) == 0
            {
                return Err(format!(
                    "--from {from} does not match the router: {from} takes no traffic ({}). Run `bluegreen status`, then switch --to {to} without --from",
                    describe(current)
                ));
            }
            Split::all(to)
        }
        Command::Weights(split) => split,
        Command::ReturnTo(color) => Split::all(color),
        Command::Rollback => Split::all(
            state
                .rollback_to
                .ok_or("nothing to roll back to: no switch has been made yet")?,
        ),
    };
    if target == current {
        return Ok(TrafficDecision::Unchanged);
    }
    let (kind, verb) = match command {
        Command::Rollback | Command::ReturnTo(_) => (EventKind::Rollback, "rolled back"),
        Command::Switch { .. } => (EventKind::Switch, "switched"),
        Command::Weights(_) => (EventKind::Weights, "weights set"),
    };
    let was = match current.sole_color() {
        Some(color) => color.to_string(),
        None => current.to_string(),
    };
    Ok(TrafficDecision::Change {
        target,
        rollback_to: rollback_color(current, target, state.rollback_to),
        kind,
        message: format!("{verb}: {} (was {was})", describe(target)),
    })
}

/// Leaving a color that had all traffic makes it the one to return to; leaving a split (a
/// canary in progress) keeps the color that was live before it began. Landing on that very
/// color makes the other one the way back.
pub fn rollback_color(current: Split, target: Split, before: Option<Color>) -> Option<Color> {
    let back = current.sole_color().or(before)?;
    Some(if target.sole_color() == Some(back) {
        back.other()
    } else {
        back
    })
}

pub fn describe(split: Split) -> String {
    match split.sole_color() {
        Some(color) => format!("{color} is live"),
        None => split.to_string(),
    }
}

/// What the controller knows when a release or shift is asked for.
#[derive(Debug)]
pub struct ReleaseAsk<'a> {
    pub kind: ReleaseKind,
    pub version: Option<&'a str>,
    /// The color asked for (a shift's `--to`), if any.
    pub to: Option<Color>,
    pub running: Option<&'a Release>,
    pub split: Split,
    /// Whether each color has something deployed (or is run by someone else: static).
    pub deployed: [bool; 2],
}

pub fn start_release(ask: &ReleaseAsk) -> Result<ReleasePlan, String> {
    if let Some(running) = ask.running {
        return Err(format!(
            "release #{} ({} to {}) is still {}; wait for it, or `bluegreen abort` it",
            running.id,
            running.version.as_deref().unwrap_or("shift"),
            running.color,
            running.state.as_str()
        ));
    }
    let Some(live) = ask.split.sole_color() else {
        return Err(format!(
            "traffic is split ({}); finish it with `bluegreen switch` or `bluegreen rollback` before a release",
            ask.split
        ));
    };
    let color = ask.to.unwrap_or(live.other());
    if ask.kind == ReleaseKind::Shift && color == live {
        return Err(format!("{color} is already live; nothing to shift"));
    }
    if let Some(version) = ask.version
        && version.trim().is_empty()
    {
        return Err("version is empty; give the version to release, e.g. --version 2.0".into());
    }
    Ok(ReleasePlan {
        color,
        from: live,
        first: ask.kind == ReleaseKind::Release && !ask.deployed[live.index()],
    })
}

/// Why a release stopped early.
#[derive(Clone, Debug, PartialEq)]
pub enum Stop {
    Failed(String),
    Aborted(String),
    /// A breach, failure or abort after traffic moved.
    RollBack(String),
}

/// How a release that stopped ends: rolled back when traffic had moved (and the reason
/// calls for it), else failed or aborted where it stood.
#[derive(Debug, PartialEq)]
pub enum Ending {
    Succeeded,
    Failed(String),
    Aborted(String),
    RollBack(String),
}

pub fn ending(outcome: Result<(), Stop>, traffic_moved: bool) -> Ending {
    match outcome {
        Ok(()) => Ending::Succeeded,
        Err(Stop::Failed(reason)) => Ending::Failed(reason),
        Err(Stop::Aborted(reason)) if !traffic_moved => Ending::Aborted(reason),
        Err(Stop::Aborted(reason) | Stop::RollBack(reason)) => Ending::RollBack(reason),
    }
}

/// Where a shift goes after a step's hold: the next step, or the last one (100 %) when
/// promoted with `--full`.
pub fn next_step(index: usize, steps: usize, full: bool) -> usize {
    if full { steps - 1 } else { index + 1 }
}

/// What a restarted daemon does with the release the previous one left unfinished.
#[derive(Debug, PartialEq)]
pub enum Recovery {
    /// No unfinished release.
    Nothing,
    /// No traffic had moved: the live color never changed; the release is abandoned.
    Abandon { state: ReleaseState, reason: String },
    /// Traffic had moved: all of it goes back to the old color, whose instances kept running.
    RollBackTo { color: Color, reason: String },
}

pub fn after_restart(release: Option<&Release>) -> Recovery {
    let Some(release) = release.filter(|r| !r.state.is_final()) else {
        return Recovery::Nothing;
    };
    let was = release.state.as_str();
    if release.traffic_moved {
        Recovery::RollBackTo {
            color: release.from_color,
            reason: format!(
                "the daemon stopped while the release was {was} ({}% on {}); rolled back to {} on restart",
                release.percent, release.color, release.from_color
            ),
        }
    } else {
        Recovery::Abandon {
            state: ReleaseState::Aborted,
            reason: format!(
                "the daemon stopped while the release was {was}, before any traffic moved; abandoned, {} stays live",
                release.from_color
            ),
        }
    }
}

/// Where a release goes on in the process a binary upgrade handed it to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Continuation {
    /// The pipeline stage to go on from. A stage before the switch runs again from its start
    /// (deploy and tests are safe to repeat); the switch picks up at `step`.
    pub stage: usize,
    /// The shift step in progress, and what was left of its hold (`None`: all of it, as when
    /// it was paused or waits for promote).
    pub step: usize,
    pub left: Option<std::time::Duration>,
    /// The shift was over and the new color being watched at 100 %.
    pub monitoring: bool,
}

/// How the release a previous process handed over goes on, given the pipeline's stage names
/// now; `Err` says why it cannot (then the restart rule settles it).
pub fn after_upgrade(
    release: Option<&Release>,
    stages: &[&str],
    now_ms: i64,
) -> Result<Option<Continuation>, String> {
    let Some(release) = release.filter(|r| !r.state.is_final()) else {
        return Ok(None);
    };
    let stage = stages
        .iter()
        .position(|name| *name == release.stage)
        .ok_or_else(|| {
            format!(
                "its stage `{}` is not in the pipeline any more ({})",
                release.stage,
                stages.join(", ")
            )
        })?;
    let left = match release.step_ends_ms {
        Some(end) if !release.paused => Some(std::time::Duration::from_millis(
            (end - now_ms).max(0) as u64,
        )),
        _ => None,
    };
    Ok(Some(Continuation {
        stage,
        step: release.step,
        left,
        monitoring: release.state == ReleaseState::Monitoring,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::strategy::Strategy;

    fn state(split: Split, rollback_to: Option<Color>) -> RouterState {
        RouterState {
            split,
            rollback_to,
            upstreams: Default::default(),
        }
    }

    fn change(decision: TrafficDecision) -> (Split, Option<Color>, EventKind, String) {
        match decision {
            TrafficDecision::Change {
                target,
                rollback_to,
                kind,
                message,
            } => (target, rollback_to, kind, message),
            TrafficDecision::Unchanged => panic!("expected a change"),
        }
    }

    #[test]
    fn a_switch_records_the_old_color_as_the_way_back() {
        let blue = state(Split::all(Color::Blue), None);
        let (target, back, kind, message) = change(
            traffic(
                Command::Switch {
                    to: Color::Green,
                    from: None,
                },
                &blue,
            )
            .unwrap(),
        );
        assert_eq!(target, Split::all(Color::Green));
        assert_eq!(back, Some(Color::Blue));
        assert_eq!(kind, EventKind::Switch);
        assert_eq!(message, "switched: green is live (was blue)");
    }

    #[test]
    fn a_switch_from_a_color_without_traffic_is_refused() {
        let blue = state(Split::all(Color::Blue), None);
        let refused = traffic(
            Command::Switch {
                to: Color::Blue,
                from: Some(Color::Green),
            },
            &blue,
        )
        .unwrap_err();
        assert!(
            refused.contains("--from green does not match the router"),
            "{refused}"
        );
    }

    #[test]
    fn switching_to_the_live_color_changes_nothing() {
        let blue = state(Split::all(Color::Blue), None);
        let decision = traffic(
            Command::Switch {
                to: Color::Blue,
                from: None,
            },
            &blue,
        );
        assert_eq!(decision, Ok(TrafficDecision::Unchanged));
    }

    #[test]
    fn rollback_with_no_switch_yet_is_refused() {
        let fresh = state(Split::all(Color::Blue), None);
        let refused = traffic(Command::Rollback, &fresh).unwrap_err();
        assert!(refused.starts_with("nothing to roll back to"), "{refused}");
    }

    #[test]
    fn rollback_during_a_canary_returns_to_the_color_live_before_it() {
        let canary = state(Split::green_percent(30).unwrap(), Some(Color::Blue));
        let (target, back, kind, _) = change(traffic(Command::Rollback, &canary).unwrap());
        assert_eq!(target, Split::all(Color::Blue));
        assert_eq!(back, Some(Color::Green), "the way back is now green");
        assert_eq!(kind, EventKind::Rollback);
        // A release's own return is recorded as a rollback too.
        let (_, _, kind, _) = change(traffic(Command::ReturnTo(Color::Blue), &canary).unwrap());
        assert_eq!(kind, EventKind::Rollback);
    }

    #[test]
    fn weights_keep_the_color_live_before_the_split_as_the_way_back() {
        let blue = state(Split::all(Color::Blue), None);
        let (target, back, kind, message) =
            change(traffic(Command::Weights(Split::green_percent(10).unwrap()), &blue).unwrap());
        assert_eq!(target.weight(Color::Green), 10);
        assert_eq!(back, Some(Color::Blue));
        assert_eq!(kind, EventKind::Weights);
        assert!(message.starts_with("weights set:"), "{message}");
        let ten = state(target, back);
        let (_, back, _, _) =
            change(traffic(Command::Weights(Split::green_percent(50).unwrap()), &ten).unwrap());
        assert_eq!(back, Some(Color::Blue), "still blue, mid-canary");
    }

    fn release(state: ReleaseState, traffic_moved: bool) -> Release {
        Release {
            id: 4,
            revision: 0,
            kind: ReleaseKind::Release,
            version: Some("2.0".into()),
            color: Color::Green,
            from_color: Color::Blue,
            from_version: Some("1.0".into()),
            strategy: Strategy::instant(),
            state,
            stage: String::new(),
            step: 0,
            percent: if traffic_moved { 10 } else { 0 },
            traffic_moved,
            paused: false,
            started_ms: 0,
            ended_ms: None,
            reason: None,
            extra_env: Default::default(),
            verdict: None,
            step_ends_ms: None,
            first: false,
            expanded: false,
            mirror: None,
        }
    }

    fn ask(kind: ReleaseKind, split: Split, deployed: [bool; 2]) -> ReleaseAsk<'static> {
        ReleaseAsk {
            kind,
            version: Some("2.0"),
            to: None,
            running: None,
            split,
            deployed,
        }
    }

    #[test]
    fn a_release_goes_to_the_idle_color() {
        let plan = start_release(&ask(
            ReleaseKind::Release,
            Split::all(Color::Blue),
            [true, false],
        ))
        .unwrap();
        assert_eq!(
            plan,
            ReleasePlan {
                color: Color::Green,
                from: Color::Blue,
                first: false
            }
        );
    }

    #[test]
    fn the_first_release_has_no_baseline_and_switches_at_once() {
        let plan = start_release(&ask(
            ReleaseKind::Release,
            Split::all(Color::Blue),
            [false, false],
        ))
        .unwrap();
        assert!(plan.first);
    }

    #[test]
    fn releases_are_refused_while_one_runs_while_split_or_without_a_version() {
        let running = release(ReleaseState::Shifting, true);
        let mut busy = ask(ReleaseKind::Release, Split::all(Color::Blue), [true, true]);
        busy.running = Some(&running);
        assert!(
            start_release(&busy)
                .unwrap_err()
                .contains("is still shifting")
        );
        let split = ask(
            ReleaseKind::Release,
            Split::green_percent(50).unwrap(),
            [true, true],
        );
        assert!(
            start_release(&split)
                .unwrap_err()
                .starts_with("traffic is split")
        );
        let mut empty = ask(ReleaseKind::Release, Split::all(Color::Blue), [true, true]);
        empty.version = Some("  ");
        assert!(
            start_release(&empty)
                .unwrap_err()
                .starts_with("version is empty")
        );
        let mut to_live = ask(ReleaseKind::Shift, Split::all(Color::Blue), [true, true]);
        to_live.to = Some(Color::Blue);
        assert_eq!(
            start_release(&to_live).unwrap_err(),
            "blue is already live; nothing to shift"
        );
    }

    #[test]
    fn a_stop_after_traffic_moved_rolls_back_before_it_does_not() {
        assert_eq!(ending(Ok(()), true), Ending::Succeeded);
        assert_eq!(
            ending(Err(Stop::Aborted("by hand".into())), false),
            Ending::Aborted("by hand".into())
        );
        assert_eq!(
            ending(Err(Stop::Aborted("by hand".into())), true),
            Ending::RollBack("by hand".into())
        );
        assert_eq!(
            ending(Err(Stop::RollBack("p99".into())), true),
            Ending::RollBack("p99".into())
        );
        assert_eq!(
            ending(Err(Stop::Failed("tests failed".into())), false),
            Ending::Failed("tests failed".into())
        );
    }

    #[test]
    fn promote_full_jumps_to_the_last_step() {
        assert_eq!(next_step(0, 3, false), 1);
        assert_eq!(next_step(0, 3, true), 2);
    }

    #[test]
    fn a_restart_abandons_a_release_before_traffic_moved_and_rolls_back_after() {
        for state in [
            ReleaseState::Deploying,
            ReleaseState::Testing,
            ReleaseState::Running,
        ] {
            assert!(matches!(
                after_restart(Some(&release(state, false))),
                Recovery::Abandon {
                    state: ReleaseState::Aborted,
                    ..
                }
            ));
        }
        for state in [ReleaseState::Shifting, ReleaseState::Monitoring] {
            match after_restart(Some(&release(state, true))) {
                Recovery::RollBackTo { color, reason } => {
                    assert_eq!(color, Color::Blue);
                    assert!(reason.contains("10% on green"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        for state in [
            ReleaseState::Succeeded,
            ReleaseState::RolledBack,
            ReleaseState::Failed,
            ReleaseState::Aborted,
        ] {
            assert_eq!(
                after_restart(Some(&release(state, true))),
                Recovery::Nothing
            );
        }
        assert_eq!(after_restart(None), Recovery::Nothing);
    }

    #[test]
    fn after_an_upgrade_a_release_goes_on_from_its_stage_and_what_was_left_of_its_hold() {
        let stages = ["deploy", "test", "switch", "cleanup"];
        let mut shifting = release(ReleaseState::Shifting, true);
        shifting.stage = "switch".into();
        shifting.step = 1;
        shifting.step_ends_ms = Some(10_500);
        assert_eq!(
            after_upgrade(Some(&shifting), &stages, 10_000),
            Ok(Some(Continuation {
                stage: 2,
                step: 1,
                left: Some(std::time::Duration::from_millis(500)),
                monitoring: false,
            }))
        );
        // Overdue (the hand-over took longer than the hold had left): no time left, not negative.
        let late = after_upgrade(Some(&shifting), &stages, 11_000)
            .unwrap()
            .unwrap();
        assert_eq!(late.left, Some(std::time::Duration::ZERO));
        // Paused, or waiting for promote: the hold starts over.
        shifting.paused = true;
        let paused = after_upgrade(Some(&shifting), &stages, 10_000)
            .unwrap()
            .unwrap();
        assert_eq!(paused.left, None);

        let mut testing = release(ReleaseState::Testing, false);
        testing.stage = "test".into();
        let again = after_upgrade(Some(&testing), &stages, 0).unwrap().unwrap();
        assert_eq!((again.stage, again.monitoring), (1, false));

        let mut monitoring = release(ReleaseState::Monitoring, true);
        monitoring.stage = "switch".into();
        assert!(
            after_upgrade(Some(&monitoring), &stages, 0)
                .unwrap()
                .unwrap()
                .monitoring
        );
    }

    #[test]
    fn after_an_upgrade_a_stage_gone_from_the_pipeline_or_an_ended_release_does_not_go_on() {
        let mut running = release(ReleaseState::Running, false);
        running.stage = "migrate.sh".into();
        let why = after_upgrade(Some(&running), &["deploy", "switch"], 0).unwrap_err();
        assert!(why.contains("`migrate.sh` is not in the pipeline"), "{why}");
        let ended = release(ReleaseState::Succeeded, true);
        assert_eq!(after_upgrade(Some(&ended), &["switch"], 0), Ok(None));
        assert_eq!(after_upgrade(None, &["switch"], 0), Ok(None));
    }
}
