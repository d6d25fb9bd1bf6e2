//! Calling the coordinator from the blocking threads that do the tensor work.
//!
//! A learner's step loop and a worker's rollout loop run on a dedicated thread (never on the
//! async executor); [`CoordinatorLink`] lets them make a gRPC call by blocking on the process's
//! one tokio runtime through its [`Handle`]. Transient failures (the coordinator restarting or
//! briefly unreachable) are retried with exponential backoff for up to [`RetryPolicy::window`].
//! A call rejected because the coordinator no longer knows this process's worker id (it was
//! restarted) registers the process again through its shared [`Registration`] and is retried
//! with the new id. Anything else is returned at once.

use crate::registration::Registration;
use medtvt_proto::client::{is_unknown_worker, Client};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tonic::Code;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("coordinator call {call} failed: {status}")]
    Status { call: &'static str, status: tonic::Status },
    #[error("coordinator call {call}: coordinator unreachable for {waited:?}: {status}")]
    GaveUp { call: &'static str, waited: Duration, status: tonic::Status },
    #[error("coordinator call {call} abandoned: this process is shutting down")]
    ShuttingDown { call: &'static str },
    #[error("coordinator call {call}: registering again after the coordinator forgot this process failed: {status}")]
    Reregister { call: &'static str, status: tonic::Status },
}

/// How many times one call registers the process again before giving up (each renewal needs
/// the coordinator to forget the new id too, i.e. another restart, during the same call).
const MAX_RENEWALS_PER_CALL: u32 = 5;

/// How long and how often a transient failure is retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub window: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Codes that mean "try again": the server is restarting, the connection dropped or the call was
/// cut short. Everything else (invalid argument, auth, not found, ...) is final.
pub fn is_transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

/// A process-wide "stop now" flag, set on coordinator shutdown or a signal.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The coordinator as seen from a blocking thread.
#[derive(Clone)]
pub struct CoordinatorLink {
    handle: Handle,
    client: Client,
    registration: Arc<Registration>,
    stop: StopFlag,
    retry: RetryPolicy,
}

impl CoordinatorLink {
    pub fn new(handle: Handle, client: Client, registration: Arc<Registration>, stop: StopFlag) -> Self {
        CoordinatorLink { handle, client, registration, stop, retry: RetryPolicy::default() }
    }

    /// This link with another retry policy (tests use short windows).
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The worker id calls carry now (it changes when the process registers again).
    pub fn worker_id(&self) -> u64 {
        self.registration.worker_id()
    }

    pub fn stop_flag(&self) -> &StopFlag {
        &self.stop
    }

    /// Records the training loop's progress for the next heartbeats.
    pub fn set_progress(&self, step: u64, phase: &'static str) {
        self.registration.progress().set(step, phase);
    }

    /// Runs `f(client)` to completion on the runtime, retrying transient failures. Must be called
    /// from a thread outside the runtime (a `spawn_blocking` task or a std thread).
    pub fn call<T, F, Fut>(&self, call: &'static str, mut f: F) -> Result<T, RpcError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_as_worker(call, |client, _| f(client))
    }

    /// Like [`CoordinatorLink::call`] for requests that carry the worker id: `f(client, id)` is
    /// given the current id on every attempt, and when the coordinator answers that it does not
    /// know the id, the process registers again and `f` is retried with the new one.
    pub fn call_as_worker<T, F, Fut>(&self, call: &'static str, mut f: F) -> Result<T, RpcError>
    where
        F: FnMut(Client, u64) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = Instant::now();
        let mut backoff = self.retry.initial_backoff;
        let mut renewals = 0;
        loop {
            let worker_id = self.registration.worker_id();
            let status = match self.handle.block_on(f(self.client.clone(), worker_id)) {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if is_unknown_worker(&status) && renewals < MAX_RENEWALS_PER_CALL => {
                    renewals += 1;
                    match self.handle.block_on(self.registration.renew(self.client.clone(), worker_id)) {
                        Ok(_) => continue,
                        Err(status) if !is_transient(status.code()) => {
                            return Err(RpcError::Reregister { call, status })
                        }
                        Err(status) => status,
                    }
                }
                Err(status) => status,
            };
            if !is_transient(status.code()) {
                return Err(RpcError::Status { call, status });
            }
            if started.elapsed() >= self.retry.window {
                return Err(RpcError::GaveUp { call, waited: started.elapsed(), status });
            }
            tracing::warn!(call, code = ?status.code(), message = status.message(), "transient coordinator error; retrying");
            if self.stop.is_stopped() {
                return Err(RpcError::ShuttingDown { call });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(self.retry.max_backoff);
        }
    }

    /// Sleeps `duration` in small slices; false when the stop flag was raised meanwhile.
    pub fn pause(&self, duration: Duration) -> bool {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            if self.stop.is_stopped() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
        }
        !self.stop.is_stopped()
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connection_level_codes_are_retried() {
        assert!(is_transient(Code::Unavailable));
        assert!(is_transient(Code::Unknown));
        assert!(!is_transient(Code::InvalidArgument));
        assert!(!is_transient(Code::Unauthenticated));
        assert!(!is_transient(Code::NotFound));
        assert!(!is_transient(Code::FailedPrecondition));
    }
}
