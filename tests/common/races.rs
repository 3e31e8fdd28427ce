//! Writers racing on the state table, whatever the store (DynamoDB on the
//! emulator, or in memory): its conditional writes must lose no update.

use stackwarden::state::{Expect, State, StateError, Store, StoredEpisode, Suspension};

/// Ten suspensions at once: exactly one is made, the nine others see it.
pub async fn one_suspension_of_ten_is_made<S: Store>(state: &State<S>) {
    let who = |i: usize| Suspension {
        by: format!("arn:aws:iam::123456789012:user/u{i}"),
        since: 1,
        reason: format!("r{i}"),
    };
    let tries = (0..10).map(|i| async move { state.suspend("dev", &who(i), false).await });
    let answers = futures::future::join_all(tries).await;
    let made = answers.iter().filter(|a| matches!(a, Ok(None))).count();
    assert_eq!(made, 1, "{answers:?}");
    let kept = state.suspension("dev").await.unwrap().unwrap();
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Ok(None)) || a == &Ok(Some(kept.clone()))),
        "{answers:?}"
    );
}

/// Eight writers each add an episode by read-modify-write: a writer that
/// lost the race reads again; none of the eight is lost, and a stale
/// version is refused.
pub async fn no_episode_of_eight_writers_is_lost<S: Store>(state: &State<S>) {
    let add = |i: usize| async move {
        loop {
            let (mut open, expect) = state.episodes("dev").await.unwrap();
            open.push(StoredEpisode {
                finding: stackwarden::notify::Finding {
                    detail: None,
                    object: format!("stack:s{i}"),
                    kind: stackwarden::notify::Kind::Drift,
                    difference: "differs".into(),
                },
                last_alert: 1,
            });
            match state.save_episodes("dev", &open, expect).await {
                Ok(_) => return,
                Err(StateError::Conflict(_)) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    };
    futures::future::join_all((0..8).map(add)).await;
    let (open, _) = state.episodes("dev").await.unwrap();
    assert_eq!(open.len(), 8, "{open:#?}");
    assert!(matches!(
        state.save_episodes("dev", &[], Expect::Version(1)).await,
        Err(StateError::Conflict(_))
    ));
}
