//! A process's membership in a run, shared by learners and rollout workers: connect and
//! Register, keep a heartbeat task going, long-poll WaitForJob for the next job, and leave
//! (Deregister, stop the heartbeat and await it). The heartbeat and Ctrl-C / SIGTERM raise the
//! process's [`StopFlag`] when the coordinator is shutting down or the process is asked to stop.
//! After a coordinator restart the heartbeat, WaitForJob and every job call register the process
//! again on their own (see [`crate::registration`]).

use crate::registration::Registration;
use crate::rpc::{is_transient, CoordinatorLink, StopFlag};
use medtvt_proto::client::{self, is_unknown_worker, Client, ClientError};
use medtvt_proto::v1::{DeregisterRequest, HeartbeatRequest, JobAssignment, RegisterRequest, Role, WaitForJobRequest};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("registering with the coordinator: {}", refusal(.0))]
    Register(tonic::Status),
    #[error("waiting for a job: the coordinator stayed unreachable for {waited:?}: {status}")]
    Unreachable { waited: Duration, status: tonic::Status },
    #[error("waiting for a job: {0}")]
    WaitForJob(tonic::Status),
}

/// Says plainly when the coordinator refused the caller's credentials.
fn refusal(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unauthenticated => {
            format!("refused by the coordinator (UNAUTHENTICATED: check --auth-token-file): {}", status.message())
        }
        tonic::Code::PermissionDenied => {
            format!("refused by the coordinator (PERMISSION_DENIED): {}", status.message())
        }
        _ => status.to_string(),
    }
}

/// Who registers and where.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    pub coordinator: String,
    pub auth_token_file: Option<PathBuf>,
    pub role: Role,
    pub name: String,
    pub rank: u32,
    pub world_size: u32,
    /// Largest gRPC message sent or accepted.
    pub max_message_bytes: usize,
}

/// A registered process.
pub struct Membership {
    client: Client,
    registration: Arc<Registration>,
    stop: StopFlag,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// How long WaitForJob keeps retrying an unreachable coordinator before the process gives up.
    pub unreachable_limit: Duration,
}

/// A default process name: host name and pid.
pub fn default_name(role: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    format!("{role}@{host}:{}", std::process::id())
}

impl Membership {
    pub async fn join(options: &JoinOptions) -> Result<Membership, MembershipError> {
        let token = options.auth_token_file.as_deref().map(client::read_token_file).transpose()?;
        let connect = client::ConnectOptions {
            max_message_bytes: options.max_message_bytes,
            ..client::ConnectOptions::default()
        };
        let client = client::connect_with(&options.coordinator, token.as_deref(), &connect).await?;
        let request = RegisterRequest {
            role: options.role as i32,
            name: options.name.clone(),
            rank: options.rank,
            world_size: options.world_size,
        };
        let registration = Registration::register(client.clone(), request).await.map_err(MembershipError::Register)?;
        let stop = StopFlag::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(heartbeat(client.clone(), registration.clone(), stop.clone(), stop_rx.clone())),
            tokio::spawn(watch_signals(stop.clone(), stop_tx.clone(), stop_rx)),
        ];
        Ok(Membership { client, registration, stop, stop_tx, tasks, unreachable_limit: Duration::from_secs(300) })
    }

    /// The worker id the process holds now.
    pub fn worker_id(&self) -> u64 {
        self.registration.worker_id()
    }

    pub fn stop_flag(&self) -> &StopFlag {
        &self.stop
    }

    /// A link for blocking threads of this process.
    pub fn link(&self) -> CoordinatorLink {
        CoordinatorLink::new(
            tokio::runtime::Handle::current(),
            self.client.clone(),
            self.registration.clone(),
            self.stop.clone(),
        )
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The next running job newer than `after_job_id`; `None` when the process should exit.
    pub async fn next_job(&mut self, after_job_id: u64) -> Result<Option<JobAssignment>, MembershipError> {
        let mut backoff = Duration::from_millis(100);
        let mut unreachable_since: Option<Instant> = None;
        loop {
            if self.stop.is_stopped() {
                return Ok(None);
            }
            let worker_id = self.registration.worker_id();
            let request = WaitForJobRequest { worker_id, after_job_id, wait_ms: 2_000 };
            let answer = match self.client.wait_for_job(request).await {
                // Registered again: ask at once with the new id.
                Err(status) if is_unknown_worker(&status) => {
                    match self.registration.renew(self.client.clone(), worker_id).await {
                        Ok(_) => continue,
                        Err(status) if is_transient(status.code()) => Err(status),
                        Err(status) => return Err(MembershipError::Register(status)),
                    }
                }
                other => other,
            };
            match answer {
                Ok(response) => {
                    unreachable_since = None;
                    backoff = Duration::from_millis(100);
                    let job = response.into_inner();
                    if job.shutdown {
                        self.stop.stop();
                        return Ok(None);
                    }
                    if job.job_id != 0 {
                        return Ok(Some(job));
                    }
                }
                Err(status) if is_transient(status.code()) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.unreachable_limit {
                        return Err(MembershipError::Unreachable { waited: since.elapsed(), status });
                    }
                    tracing::warn!(code = ?status.code(), "coordinator unreachable; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(status) => return Err(MembershipError::WaitForJob(status)),
            }
        }
    }

    /// Leaves the run: Deregister (best effort), stop the background tasks and await them.
    pub async fn leave(mut self) {
        let request = DeregisterRequest { worker_id: self.registration.worker_id() };
        if let Err(status) = tokio::time::timeout(Duration::from_secs(2), self.client.deregister(request))
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("deregister")))
        {
            tracing::debug!(%status, "deregister failed (the coordinator may be gone)");
        }
        self.stop.stop();
        let _ = self.stop_tx.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// Sends a heartbeat every interval until stopped; raises the stop flag when the coordinator
/// says it is shutting down; registers again when the coordinator no longer knows the process.
async fn heartbeat(
    mut client: Client,
    registration: Arc<Registration>,
    stop: StopFlag,
    mut stop_rx: watch::Receiver<bool>,
) {
    let interval = registration.heartbeat_interval();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop_rx.changed() => return,
        }
        let worker_id = registration.worker_id();
        let (step, phase) = registration.progress().get();
        match client.heartbeat(HeartbeatRequest { worker_id, step, phase: phase.to_string() }).await {
            Ok(response) if response.get_ref().shutdown => {
                tracing::info!("the coordinator is shutting down");
                stop.stop();
                return;
            }
            Ok(_) => {}
            Err(status) if is_unknown_worker(&status) => {
                if let Err(status) = registration.renew(client.clone(), worker_id).await {
                    tracing::warn!(%status, "registering again failed; retrying at the next heartbeat");
                }
            }
            Err(status) => tracing::debug!(%status, "heartbeat failed"),
        }
    }
}

/// Ctrl-C or SIGTERM: raise the stop flag (the job threads notice at their next call).
async fn watch_signals(stop: StopFlag, stop_tx: watch::Sender<bool>, mut stop_rx: watch::Receiver<bool>) {
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
        _ = stop_rx.changed() => return,
    }
    tracing::info!("stop requested");
    stop.stop();
    let _ = stop_tx.send(true);
}
