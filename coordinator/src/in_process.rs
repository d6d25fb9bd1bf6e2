//! A coordinator on its own tokio runtime inside the calling process, which can be killed the way
//! SIGKILL kills a process: shutting the runtime down in the background drops every task
//! (connections, reaper, handlers) where it stands, so no graceful shutdown path runs. Tests of
//! resume and reconnection (coordinator/tests/durability.rs, learner/tests/reconnect.rs) start one
//! on a run directory, kill it, and start the next on the same directory and address.

use crate::{Coordinator, ServerOptions};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One coordinator "process".
pub struct InProcessCoordinator {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    resumed: bool,
}

impl InProcessCoordinator {
    /// Binds `addr` (port 0 for any) and serves with `options`. A failed bind is retried for up to
    /// 10 s, while a killed predecessor's socket on the same address is still being torn down.
    pub async fn start(addr: SocketAddr, options: ServerOptions) -> Result<InProcessCoordinator, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map_err(|e| format!("starting the coordinator's runtime: {e}"))?;
            let (tx, rx) = oneshot::channel();
            let attempt = options.clone();
            runtime.spawn(async move {
                match Coordinator::bind(addr, attempt).await {
                    Ok(coordinator) => {
                        let _ = tx.send(Ok((coordinator.local_addr(), coordinator.resumed())));
                        let _ = coordinator.serve(std::future::pending()).await;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(err.to_string()));
                    }
                }
            });
            let outcome = rx.await.map_err(|_| "the coordinator's runtime ended before it bound".to_string())?;
            match outcome {
                Ok((addr, resumed)) => return Ok(InProcessCoordinator { runtime: Some(runtime), addr, resumed }),
                Err(err) if Instant::now() < deadline => {
                    runtime.shutdown_background();
                    tracing::warn!(%err, "coordinator bind failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether it resumed a run from its run directory.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// SIGKILL: every task of this coordinator is dropped where it stands.
    pub fn kill(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for InProcessCoordinator {
    fn drop(&mut self) {
        self.shut_down();
    }
}
