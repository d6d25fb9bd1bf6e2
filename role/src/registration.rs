//! A process's registration with the coordinator: the worker id it currently holds, and
//! registering again (same role, name, rank and world size) when the coordinator answers that it
//! no longer knows that id ([`medtvt_proto::client::is_unknown_worker`]: it was restarted from its
//! run directory, or declared the process dead).
//!
//! One [`Registration`] is shared by everything in a process that talks to the coordinator (the
//! heartbeat task, the job-polling loop, and the blocking job threads through
//! [`crate::rpc::CoordinatorLink`]), so an id taken by one of them is used by all; renewals are
//! serialised, and a caller holding an id that someone else already replaced just picks up the
//! new one instead of registering a second time.

use medtvt_proto::client::Client;
use medtvt_proto::v1::RegisterRequest;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a learner's training loop is doing: optimizer steps done and the phase it is in. Every
/// heartbeat carries it, so the coordinator tells a rank stuck in one phase (hung) from one that
/// moves slowly, although the heartbeat itself comes from a separate task.
#[derive(Debug, Default)]
pub struct Progress {
    step: AtomicU64,
    phase: std::sync::Mutex<&'static str>,
}

impl Progress {
    pub fn set(&self, step: u64, phase: &'static str) {
        self.step.store(step, Ordering::SeqCst);
        *self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = phase;
    }

    pub fn get(&self) -> (u64, &'static str) {
        let phase = *self.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        (self.step.load(Ordering::SeqCst), phase)
    }
}

/// The process's current membership credentials.
#[derive(Debug)]
pub struct Registration {
    request: RegisterRequest,
    worker_id: AtomicU64,
    heartbeat_interval_ms: u64,
    progress: Progress,
    /// Held while registering again, so that concurrent callers register only once.
    renewing: tokio::sync::Mutex<()>,
}

impl Registration {
    /// Registers with `request` and remembers it for later renewals.
    pub async fn register(mut client: Client, request: RegisterRequest) -> Result<Arc<Registration>, tonic::Status> {
        let response = client.register(request.clone()).await?.into_inner();
        tracing::info!(worker_id = response.worker_id, name = %request.name, "registered with the coordinator");
        Ok(Arc::new(Registration {
            request,
            worker_id: AtomicU64::new(response.worker_id),
            heartbeat_interval_ms: response.heartbeat_interval_ms,
            progress: Progress::default(),
            renewing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The id every call should carry now.
    pub fn worker_id(&self) -> u64 {
        self.worker_id.load(Ordering::SeqCst)
    }

    /// The training progress the heartbeats carry.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The heartbeat period the coordinator asked for at the first registration (100 ms..60 s).
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.clamp(100, 60_000))
    }

    /// Registers again because the coordinator rejected `stale`; returns the id to use. When
    /// another caller already replaced `stale`, returns that id without registering.
    pub async fn renew(&self, mut client: Client, stale: u64) -> Result<u64, tonic::Status> {
        let _one_at_a_time = self.renewing.lock().await;
        let current = self.worker_id();
        if current != stale {
            return Ok(current);
        }
        let response = client.register(self.request.clone()).await?.into_inner();
        self.worker_id.store(response.worker_id, Ordering::SeqCst);
        tracing::warn!(
            old_worker_id = stale,
            worker_id = response.worker_id,
            name = %self.request.name,
            "the coordinator no longer knew this process (restarted?); registered again"
        );
        Ok(response.worker_id)
    }
}
