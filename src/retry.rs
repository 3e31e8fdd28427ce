//! The one home of retry and polling policy (the `backoff` crate).
//!
//! Polls start small (the emulator finishes instantly; a fixed 2 s first
//! poll would slow every CI run) and grow with jitter to a cap fit for real
//! stacks that take minutes. Throttling is answered by backing off, never by
//! failing the run. All sleeps are tokio's, so paused-clock tests cover them.

use std::future::Future;
use std::time::Duration;

use backoff::ExponentialBackoff;
use backoff::backoff::Backoff;

use crate::cloud::{CloudError, CloudResult};

/// First poll interval.
pub const POLL_INITIAL: Duration = Duration::from_millis(200);
/// Longest poll interval.
pub const POLL_MAX: Duration = Duration::from_secs(30);
/// The longest one logical call keeps retrying while it is throttled or the
/// network fails; then its last error is the answer. With no retries in the
/// SDK, this bounds the time a CLI command spends on one call.
pub const CALL_BUDGET: Duration = Duration::from_secs(120);
/// The longest one logical call keeps retrying when no connection can be
/// made at all: a wrong endpoint or no network is said within seconds (with
/// the SDK's connect timeout, a command gives up within 10 s); the daemon
/// tries again at its next pass.
pub const CONNECT_BUDGET: Duration = Duration::from_secs(6);
/// The longest pause between two attempts of one call.
const CALL_PAUSE_MAX: Duration = Duration::from_secs(20);

/// The instant `d` from now, saturating far in the future instead of
/// overflowing: no duration, however large, may panic the process.
pub fn instant_after(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// A point further away than any real wait (about 30 years).
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

tokio::task_local! {
    /// The jitter source of the task (a pass): seeded, a simulated history
    /// replays exactly; without one, the thread's random numbers.
    static JITTER: std::cell::RefCell<rand::rngs::StdRng>;
}

/// Runs `f` with its retry and poll jitter drawn from `seed` (when given),
/// so a run on the simulated cloud with the same seeds replays exactly.
pub async fn with_jitter_seed<F: Future>(seed: Option<u64>, f: F) -> F::Output {
    use rand::SeedableRng;
    match seed {
        Some(s) => {
            let rng = std::cell::RefCell::new(rand::rngs::StdRng::seed_from_u64(s));
            JITTER.scope(rng, f).await
        }
        None => f.await,
    }
}

/// `d` spread by up to ±`factor`, from the task's jitter source.
pub fn jittered(d: Duration, factor: f64) -> Duration {
    use rand::Rng;
    let r: f64 = JITTER
        .try_with(|j| j.borrow_mut().gen_range(-1.0..=1.0))
        .unwrap_or_else(|_| rand::thread_rng().gen_range(-1.0..=1.0));
    d.mul_f64((1.0 + factor * r).clamp(0.0, 2.0))
}

/// How far poll waits are spread around their backoff.
pub const POLL_JITTER: f64 = 0.3;

/// Backoff for polling an operation: 200 ms growing x1.5 to 30 s, no end.
/// Its waits are spread by [`POLL_JITTER`] with [`jittered`] (the backoff
/// crate's own randomness cannot be seeded).
pub fn poll_backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        current_interval: POLL_INITIAL,
        initial_interval: POLL_INITIAL,
        randomization_factor: 0.0,
        multiplier: 1.5,
        max_interval: POLL_MAX,
        // The caller owns the deadline (the operation timeout, on tokio's clock).
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// Longest interval between two polls of a stack operation. A third of
/// [`POLL_MAX`]: a stack poll is one call (its events), not two, and its
/// intervals double (not x1.5) to the cap, so a stack is polled more often
/// for fewer calls than it used to cost, and the end of an operation is
/// seen 5 s after it on average instead of 15 s.
pub const STACK_POLL_MAX: Duration = Duration::from_secs(10);

/// While polling a stack's events, the stack itself is read at least this
/// often, in case its events lag behind its status.
pub const DESCRIBE_EVERY: Duration = Duration::from_secs(300);

/// Backoff for polling a stack operation: 200 ms doubling to
/// [`STACK_POLL_MAX`], no end.
pub fn stack_poll_backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        max_interval: STACK_POLL_MAX,
        multiplier: 2.0,
        ..poll_backoff()
    }
}

/// Runs one cloud call, retrying transient errors (throttling, transport,
/// 5xx) with backoff, for at most [`CALL_BUDGET`]. Every retry is logged
/// as a warning (on stderr for the CLI), so throttling is seen as it happens.
///
/// # Errors
/// The first permanent error, or the last transient one once the budget is
/// spent.
pub async fn call<T, F, Fut>(mut f: F) -> CloudResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = CloudResult<T>>,
{
    let mut backoff = ExponentialBackoff {
        current_interval: Duration::from_millis(500),
        initial_interval: Duration::from_millis(500),
        max_interval: CALL_PAUSE_MAX,
        max_elapsed_time: None,
        randomization_factor: 0.0,
        ..ExponentialBackoff::default()
    };
    let started = tokio::time::Instant::now();
    // When the current run of connection failures began: the connect
    // budget counts from there, not from a call that was throttled first.
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut attempt = 1u32;
    loop {
        match f().await {
            Err(e) if e.is_transient() => {
                // No connection at all: the error itself says so in one
                // line, soon; its retries are not worth a warning each.
                let unreachable = matches!(e, CloudError::Unreachable(_));
                let left = if unreachable {
                    let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                    CONNECT_BUDGET
                        .saturating_sub(since.elapsed())
                        .min(CALL_BUDGET.saturating_sub(started.elapsed()))
                } else {
                    unreachable_since = None;
                    CALL_BUDGET.saturating_sub(started.elapsed())
                };
                let spent = started.elapsed();
                if left.is_zero() {
                    if !unreachable {
                        tracing::warn!(message = "Giving up on a call after retrying.", error = %e, attempts = attempt, seconds = spent.as_secs());
                    }
                    return Err(e);
                }
                let wait =
                    jittered(backoff.next_backoff().unwrap_or(CALL_PAUSE_MAX), 0.5).min(left);
                if unreachable {
                    tracing::debug!(message = "AWS unreachable; retrying.", error = %e, attempt, retry_in_ms = wait.as_millis() as u64);
                } else {
                    tracing::warn!(message = "AWS call failed transiently; retrying.", error = %e, attempt, retry_in_ms = wait.as_millis() as u64);
                }
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Whether an error deserves a retry by the caller's next pass rather than
/// a failure report.
pub fn is_transient(e: &CloudError) -> bool {
    e.is_transient()
}

/// Sleeps for the next poll interval, or fails when the deadline is reached.
pub async fn pause(
    backoff: &mut ExponentialBackoff,
    deadline: tokio::time::Instant,
) -> Result<(), ()> {
    let now = tokio::time::Instant::now();
    if now >= deadline {
        return Err(());
    }
    let wait =
        jittered(backoff.next_backoff().unwrap_or(POLL_MAX), POLL_JITTER).min(deadline - now);
    tokio::time::sleep(wait).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_then_succeeds() {
        let n = AtomicU32::new(0);
        let r = call(|| async {
            if n.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(CloudError::Throttled("Rate exceeded".into()))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r, Ok(7));
        assert_eq!(n.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let n = AtomicU32::new(0);
        let r: CloudResult<()> = call(|| async {
            n.fetch_add(1, Ordering::SeqCst);
            Err(CloudError::Validation("bad".into()))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn endless_throttling_gives_up_within_the_call_budget() {
        let n = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let r: CloudResult<()> = call(|| async {
            n.fetch_add(1, Ordering::SeqCst);
            Err(CloudError::Throttled("Rate exceeded".into()))
        })
        .await;
        assert!(matches!(r, Err(CloudError::Throttled(_))));
        let took = started.elapsed();
        // The budget, plus the one last attempt made at its end.
        assert!(
            took >= CALL_BUDGET && took <= CALL_BUDGET + Duration::from_millis(1),
            "{took:?}"
        );
        assert!(n.load(Ordering::SeqCst) > 3);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_endpoint_is_given_up_on_within_the_connect_budget() {
        let started = tokio::time::Instant::now();
        let r: CloudResult<()> =
            call(|| async { Err(CloudError::Unreachable("http://127.0.0.1:1".into())) }).await;
        assert!(matches!(r, Err(CloudError::Unreachable(_))));
        assert!(
            started.elapsed() <= CONNECT_BUDGET,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_connect_budget_counts_from_the_first_connection_failure() {
        let started = tokio::time::Instant::now();
        // Seeded: the jitter replays, so the bounds below hold every run.
        let r: CloudResult<()> = with_jitter_seed(
            Some(42),
            call(|| async {
                if started.elapsed() < Duration::from_secs(30) {
                    Err(CloudError::Throttled("Rate exceeded".into()))
                } else {
                    Err(CloudError::Unreachable("http://127.0.0.1:1".into()))
                }
            }),
        )
        .await;
        assert!(matches!(r, Err(CloudError::Unreachable(_))));
        let took = started.elapsed();
        // Throttled for 30 s, then still retried while unreachable.
        assert!(took >= Duration::from_secs(33), "{took:?}");
        assert!(
            took <= Duration::from_secs(30) + CONNECT_BUDGET + CALL_PAUSE_MAX,
            "{took:?}"
        );
    }

    #[test]
    fn polls_start_small_and_are_capped() {
        let mut b = poll_backoff();
        let first = b.next_backoff().unwrap();
        assert!(first <= Duration::from_millis(260), "{first:?}");
        let last = (0..100).map(|_| b.next_backoff().unwrap()).last().unwrap();
        assert!(last <= POLL_MAX.mul_f64(1.3), "{last:?}");
    }
}
