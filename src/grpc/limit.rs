//! A bound on convo.v1 calls in progress. Past it a call is refused at once
//! with RESOURCE_EXHAUSTED, so a flood meets a fast, retryable answer instead
//! of an ever longer queue and ever more memory.
//!
//! A call takes its permit in its handler, that is once its request has been
//! received and decoded, not when its headers arrive: a client that opens
//! streams and never sends their bodies holds no permit (only stream slots on
//! its own connection, which HTTP/2's concurrent-stream limit bounds), so it
//! cannot starve well-behaved callers.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// The permits of calls in progress, shared by every handler.
#[derive(Debug, Clone)]
pub struct CallPermits {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl CallPermits {
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// A permit held for as long as the call runs (for a stream: until it
    /// has started), or the refusal.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.permits.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the server is at its limit of {} calls in progress; retry with backoff",
                self.limit
            ))
        })
    }
}
