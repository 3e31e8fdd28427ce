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
/// Attempts of one call while it is throttled or the network fails.
const CALL_ATTEMPTS: u32 = 8;

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

/// Backoff for polling an operation: 200 ms growing x1.5 with 30% jitter to 30 s, no end.
pub fn poll_backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        current_interval: POLL_INITIAL,
        initial_interval: POLL_INITIAL,
        randomization_factor: 0.3,
        multiplier: 1.5,
        max_interval: POLL_MAX,
        // The caller owns the deadline (the operation timeout, on tokio's clock).
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// Runs one cloud call, retrying transient errors (throttling, transport)
/// with backoff, up to a bounded number of attempts.
///
/// # Errors
/// The first permanent error, or the last transient one.
pub async fn call<T, F, Fut>(mut f: F) -> CloudResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = CloudResult<T>>,
{
    let mut backoff = ExponentialBackoff {
        current_interval: Duration::from_millis(500),
        initial_interval: Duration::from_millis(500),
        max_interval: Duration::from_secs(20),
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    };
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if e.is_transient() && attempt < CALL_ATTEMPTS => {
                let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(20));
                tracing::debug!(message = "Retrying after a transient error.", error = %e, attempt, ?wait);
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
    async fn endless_throttling_gives_up_after_bounded_attempts() {
        let n = AtomicU32::new(0);
        let r: CloudResult<()> = call(|| async {
            n.fetch_add(1, Ordering::SeqCst);
            Err(CloudError::Throttled("Rate exceeded".into()))
        })
        .await;
        assert!(matches!(r, Err(CloudError::Throttled(_))));
        assert_eq!(n.load(Ordering::SeqCst), CALL_ATTEMPTS);
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
