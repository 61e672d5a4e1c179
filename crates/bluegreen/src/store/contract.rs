//! The behaviour every state store keeps, as tests any implementation runs with `store_contract!`.
//!
//! An implementation's test module calls `store_contract!(async { make_a_fresh_store() })`
//! (see the bottom of `sqlite.rs`); each case below becomes one `#[tokio::test]` there.

#![cfg(test)]

use std::collections::BTreeSet;
use std::time::Duration;

use bluegreen_router::{Color, Split};
use futures_util::StreamExt;

use super::{
    EnvironmentRecord, EnvironmentStatus, Key, ProviderState, RouterState, StateStore, StepWrite,
    StoreError, StoredRelease, Write,
};

/// Generates one test per contract case for the store `$make` (an async block yielding a
/// fresh, empty store).
#[macro_export]
macro_rules! store_contract {
    ($make:expr) => {
        $crate::store_contract!(@cases $make;
            a_fresh_store_is_empty,
            a_write_at_the_revision_read_lands_and_reads_back,
            a_writer_holding_a_stale_revision_is_refused,
            concurrent_writers_of_one_revision_never_interleave,
            no_update_is_lost_under_compare_and_set_retries,
            a_refused_write_changes_nothing,
            releases_get_ids_and_keep_their_events,
            steps_open_and_close_once,
            events_page_from_the_newest_or_after_an_id,
            watch_replays_from_a_revision_then_follows,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let store = $make.await;
                $crate::store::contract::$case(&store).await;
            }
        )*
    };
}

fn state(green: u64) -> RouterState {
    RouterState {
        split: Split::green_percent(green).expect("a percent"),
        rollback_to: Some(Color::Blue),
        upstreams: Default::default(),
    }
}

fn release(version: &str) -> StoredRelease {
    StoredRelease {
        id: 0,
        version: Some(version.into()),
        color: Color::Green,
        state: "deploying".into(),
        started_ms: 1,
        ended_ms: None,
        document: serde_json::json!({ "id": 0, "version": version }),
    }
}

fn is_conflict<T>(outcome: &Result<T, StoreError>) -> bool {
    matches!(outcome, Err(StoreError::Conflict { .. }))
}

pub async fn a_fresh_store_is_empty(store: &dyn StateStore) {
    let router = store.router_state().await.unwrap();
    assert_eq!((router.value, router.revision), (None, 0));
    let environments = store.environments().await.unwrap();
    for (color, env) in Color::ALL.into_iter().zip(&environments) {
        assert_eq!(env.value, EnvironmentRecord::stopped(color));
        assert_eq!(env.revision, 0);
    }
    assert!(store.releases(10).await.unwrap().is_empty());
    assert!(store.events_after(0, 10).await.unwrap().is_empty());
}

pub async fn a_write_at_the_revision_read_lands_and_reads_back(store: &dyn StateStore) {
    let before = store.revision().await.unwrap();
    let first = store
        .commit(Write {
            router_state: Some((0, state(0))),
            ..Write::event("switch", "blue is live", None)
        })
        .await
        .unwrap();
    assert!(first.revision > before, "a commit makes a new revision");
    let read = store.router_state().await.unwrap();
    assert_eq!(read.value, Some(state(0)));
    assert_eq!(read.revision, first.revision);
    let second = store
        .commit(Write {
            router_state: Some((read.revision, state(40))),
            ..Write::default()
        })
        .await
        .unwrap();
    assert!(second.revision > first.revision);
    assert_eq!(store.revision().await.unwrap(), second.revision);
    assert_eq!(store.router_state().await.unwrap().value, Some(state(40)));

    let mut green = EnvironmentRecord::stopped(Color::Green);
    green.version = Some("2.0".into());
    green.status = EnvironmentStatus::Running;
    green.provider = ProviderState::Process {
        instances: vec![super::InstanceRecord {
            port: 4001,
            pid: Some(7),
            restarts: 0,
        }],
    };
    let saved = store
        .commit(Write {
            environment: Some((0, green.clone())),
            ..Write::event("deployed", "green runs 2.0", None)
        })
        .await
        .unwrap();
    let environments = store.environments().await.unwrap();
    assert_eq!(environments[1].value, green);
    assert_eq!(environments[1].revision, saved.revision);
    assert_eq!(environments[0].revision, 0, "blue was not written");
}

pub async fn a_writer_holding_a_stale_revision_is_refused(store: &dyn StateStore) {
    let first = store
        .commit(Write {
            router_state: Some((0, state(0))),
            ..Write::default()
        })
        .await
        .unwrap();
    store
        .commit(Write {
            router_state: Some((first.revision, state(10))),
            ..Write::default()
        })
        .await
        .unwrap();
    // Written again from the first read: someone else wrote in between.
    let stale = store
        .commit(Write {
            router_state: Some((first.revision, state(90))),
            ..Write::default()
        })
        .await;
    assert!(is_conflict(&stale), "a stale writer is refused: {stale:?}");
    // Creating what already exists is stale too.
    let again = store
        .commit(Write {
            router_state: Some((0, state(90))),
            ..Write::default()
        })
        .await;
    assert!(is_conflict(&again), "{again:?}");
    assert_eq!(store.router_state().await.unwrap().value, Some(state(10)));
}

pub async fn concurrent_writers_of_one_revision_never_interleave(store: &dyn StateStore) {
    let base = store
        .commit(Write {
            router_state: Some((0, state(0))),
            ..Write::default()
        })
        .await
        .unwrap()
        .revision;
    let writers = (1..=8u64).map(|i| {
        store.commit(Write {
            router_state: Some((base, state(i * 10))),
            ..Write::event("weights", &format!("writer {i}"), None)
        })
    });
    let outcomes = futures_util::future::join_all(writers).await;
    let winners: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.is_ok())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one writer wins: {outcomes:?}");
    for (i, outcome) in outcomes.iter().enumerate() {
        if !winners.contains(&i) {
            assert!(
                matches!(outcome, Err(StoreError::Conflict { .. })),
                "{outcome:?}"
            );
        }
    }
    let winner = winners[0] as u64 + 1;
    assert_eq!(
        store.router_state().await.unwrap().value,
        Some(state(winner * 10))
    );
    let events = store.events_after(0, 100).await.unwrap();
    assert_eq!(events.len(), 1, "only the winner's event is recorded");
    assert_eq!(events[0].message, format!("writer {winner}"));
}

pub async fn no_update_is_lost_under_compare_and_set_retries(store: &dyn StateStore) {
    store
        .commit(Write {
            router_state: Some((0, state(0))),
            ..Write::default()
        })
        .await
        .unwrap();
    // Six writers each add 5 points to the split ten times, retrying on conflict.
    let writer = || async {
        for _ in 0..10 {
            loop {
                let read = store.router_state().await.unwrap();
                let now = read.value.unwrap().split.weight(Color::Green) as u64;
                let write = Write {
                    router_state: Some((read.revision, state((now + 5).min(100)))),
                    ..Write::default()
                };
                match store.commit(write).await {
                    Ok(_) => break,
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => panic!("{e}"),
                }
            }
        }
    };
    let writers: Vec<_> = (0..2).map(|_| writer()).collect();
    futures_util::future::join_all(writers).await;
    let green = store
        .router_state()
        .await
        .unwrap()
        .value
        .unwrap()
        .split
        .weight(Color::Green);
    assert_eq!(green, 100, "2 writers × 10 × 5 points, none lost");
}

pub async fn a_refused_write_changes_nothing(store: &dyn StateStore) {
    let first = store
        .commit(Write {
            router_state: Some((0, state(0))),
            ..Write::default()
        })
        .await
        .unwrap();
    store
        .commit(Write {
            router_state: Some((first.revision, state(50))),
            ..Write::default()
        })
        .await
        .unwrap();
    let revision = store.revision().await.unwrap();
    let events = store.events_after(0, 100).await.unwrap().len();
    let mut blue = EnvironmentRecord::stopped(Color::Blue);
    blue.version = Some("9.9".into());
    // The environment part is fresh, the router part stale: all or nothing.
    let refused = store
        .commit(Write {
            environment: Some((0, blue)),
            router_state: Some((first.revision, state(100))),
            release: Some((0, release("9.9"))),
            ..Write::event("deploy", "half a change", None)
        })
        .await;
    assert!(is_conflict(&refused), "{refused:?}");
    assert_eq!(store.revision().await.unwrap(), revision);
    assert_eq!(store.events_after(0, 100).await.unwrap().len(), events);
    assert_eq!(store.environments().await.unwrap()[0].revision, 0);
    assert!(store.releases(10).await.unwrap().is_empty());
    assert_eq!(store.router_state().await.unwrap().value, Some(state(50)));
}

pub async fn releases_get_ids_and_keep_their_events(store: &dyn StateStore) {
    let first = store
        .commit(Write {
            release: Some((0, release("1.0"))),
            ..Write::event("release", "release started: 1.0", None)
        })
        .await
        .unwrap();
    let id = first.release_id.expect("an id");
    assert!(id > 0);
    let second = store
        .commit(Write {
            release: Some((0, release("2.0"))),
            ..Write::event("release", "release started: 2.0", None)
        })
        .await
        .unwrap();
    let releases = store.releases(10).await.unwrap();
    assert_eq!(releases.len(), 2);
    assert_eq!(
        releases[0].value.id,
        second.release_id.unwrap(),
        "newest first"
    );
    assert_eq!(
        releases[1].value.document["id"], id,
        "the record carries its id"
    );
    assert_eq!(releases[1].revision, first.revision);
    let events = store.events_after(0, 10).await.unwrap();
    assert_eq!(
        events[0].release_id,
        Some(id),
        "the event names its release"
    );

    let mut done = releases[1].value.clone();
    done.state = "succeeded".into();
    done.ended_ms = Some(2);
    store
        .commit(Write {
            release: Some((releases[1].revision, done.clone())),
            ..Write::event("succeeded", "done", Some(id))
        })
        .await
        .unwrap();
    let stale = store
        .commit(Write {
            release: Some((releases[1].revision, done)),
            ..Write::default()
        })
        .await;
    assert!(is_conflict(&stale), "{stale:?}");
    let reread = store.releases(10).await.unwrap();
    assert_eq!(reread[1].value.state, "succeeded");
    assert_eq!(reread[1].value.ended_ms, Some(2));
}

pub async fn steps_open_and_close_once(store: &dyn StateStore) {
    let id = store
        .commit(Write {
            release: Some((0, release("1.0"))),
            steps: Some((
                0,
                StepWrite::Start {
                    name: "deploy".into(),
                    detail: String::new(),
                },
            )),
            ..Write::default()
        })
        .await
        .unwrap();
    let release_id = id.release_id.unwrap();
    let opened = store.steps(release_id).await.unwrap();
    assert_eq!(
        opened.len(),
        1,
        "the step belongs to the release of its write"
    );
    assert_eq!(opened[0].status, "running");
    let end = |revision| Write {
        steps: Some((
            release_id,
            StepWrite::End {
                id: opened[0].id,
                revision,
                status: "ok".into(),
                detail: "healthy".into(),
            },
        )),
        ..Write::default()
    };
    store.commit(end(opened[0].revision)).await.unwrap();
    assert!(is_conflict(&store.commit(end(opened[0].revision)).await));
    for name in ["10%", "50%"] {
        store
            .commit(Write {
                steps: Some((
                    release_id,
                    StepWrite::Start {
                        name: name.into(),
                        detail: String::new(),
                    },
                )),
                ..Write::default()
            })
            .await
            .unwrap();
    }
    store
        .commit(Write {
            steps: Some((release_id, StepWrite::InterruptRunning)),
            ..Write::default()
        })
        .await
        .unwrap();
    let statuses: Vec<String> = store
        .steps(release_id)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.status)
        .collect();
    assert_eq!(statuses, ["ok", "interrupted", "interrupted"]);
}

pub async fn events_page_from_the_newest_or_after_an_id(store: &dyn StateStore) {
    for i in 0..5 {
        store
            .commit(Write::event("weights", &format!("step {i}"), None))
            .await
            .unwrap();
    }
    let newest: Vec<String> = store
        .events_after(0, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(newest, ["step 3", "step 4"], "the newest, oldest first");
    let all = store.events_after(0, 100).await.unwrap();
    let after: Vec<String> = store
        .events_after(all[1].id, 2)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(after, ["step 2", "step 3"], "the oldest after the id");
}

pub async fn watch_replays_from_a_revision_then_follows(store: &dyn StateStore) {
    let first = store
        .commit(Write {
            router_state: Some((0, state(0))),
            ..Write::event("switch", "blue is live", None)
        })
        .await
        .unwrap();
    let mut from_start = store.watch(0);
    let mut from_now = store.watch(first.revision);
    let replayed = tokio::time::timeout(Duration::from_secs(5), from_start.next())
        .await
        .expect("the past is replayed")
        .unwrap()
        .unwrap();
    let mut seen = vec![replayed];
    while seen.last().unwrap().revision < first.revision {
        seen.push(from_start.next().await.unwrap().unwrap());
    }
    let last = seen.last().unwrap();
    assert_eq!(last.revision, first.revision);
    assert!(last.keys.contains(&Key::RouterState), "{last:?}");
    // Nothing new yet: the follower waits.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), from_now.next())
            .await
            .is_err()
    );
    let mut green = EnvironmentRecord::stopped(Color::Green);
    green.version = Some("2.0".into());
    let second = store
        .commit(Write {
            environment: Some((0, green)),
            ..Write::default()
        })
        .await
        .unwrap();
    let third = store
        .commit(Write {
            router_state: Some((first.revision, state(30))),
            ..Write::default()
        })
        .await
        .unwrap();
    for watcher in [&mut from_start, &mut from_now] {
        let a = tokio::time::timeout(Duration::from_secs(5), watcher.next())
            .await
            .expect("a new commit arrives")
            .unwrap()
            .unwrap();
        let b = tokio::time::timeout(Duration::from_secs(5), watcher.next())
            .await
            .expect("a new commit arrives")
            .unwrap()
            .unwrap();
        assert_eq!((a.revision, b.revision), (second.revision, third.revision));
        assert_eq!(
            a.keys.into_iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([Key::Environment(Color::Green)])
        );
        assert_eq!(b.keys, vec![Key::RouterState]);
    }
}
