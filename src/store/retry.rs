//! Trying again what may pass: opening a session to a PostgreSQL that is
//! down, starting, or not reachable yet.

use std::time::Duration;

use tokio::time::{Instant, sleep};

/// Runs `attempt` until it succeeds, fails in a way `may_pass` says is
/// final, or `deadline` has passed (the last attempt starts at it). Between
/// attempts it pauses `first`, then twice as long each time, at most `most`;
/// `retrying` hears of each failure before its pause.
pub(super) async fn until<T, E, F: Future<Output = Result<T, E>>>(
    deadline: Instant,
    first: Duration,
    most: Duration,
    mut attempt: impl FnMut() -> F,
    may_pass: impl Fn(&E) -> bool,
    mut retrying: impl FnMut(&E),
) -> Result<T, E> {
    let mut pause = first;
    loop {
        let error = match attempt().await {
            Ok(done) => return Ok(done),
            Err(error) => error,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !may_pass(&error) {
            return Err(error);
        }
        retrying(&error);
        sleep(pause.min(left)).await;
        pause = (pause * 2).min(most);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pauses_double_up_to_the_most_and_stop_at_the_deadline() {
        let started = Instant::now();
        let mut starts = Vec::new();
        let result: Result<(), &str> = until(
            started + Duration::from_millis(1000),
            Duration::from_millis(100),
            Duration::from_millis(300),
            || {
                starts.push(started.elapsed().as_millis());
                std::future::ready(Err("down"))
            },
            |_| true,
            |_| {},
        )
        .await;
        assert_eq!(result, Err("down"));
        assert_eq!(starts, [0, 100, 300, 600, 900, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_failure_or_a_success_ends_it_at_once() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tries = 0;
        let refused: Result<(), &str> = until(
            deadline,
            Duration::from_millis(100),
            Duration::from_secs(1),
            || {
                tries += 1;
                std::future::ready(Err("refused"))
            },
            |error| *error != "refused",
            |_| {},
        )
        .await;
        assert_eq!((refused, tries), (Err("refused"), 1));
        let mut heard = 0;
        let answered = until(
            deadline,
            Duration::from_millis(100),
            Duration::from_secs(1),
            || {
                tries += 1;
                std::future::ready(if tries < 4 { Err("down") } else { Ok(tries) })
            },
            |_| true,
            |_| heard += 1,
        )
        .await;
        assert_eq!((answered, heard), (Ok(4), 2));
    }
}
