//! The crate's error type: what can stop the coordinator from starting or serving.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Job(#[from] crate::state::StateError),
    #[error("cannot read config {path}: {source}")]
    ReadConfig { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Token(#[from] medtvt_proto::client::ClientError),
    #[error("cannot open the event log {path}: {source}")]
    EventLog { path: PathBuf, source: std::io::Error },
    #[error("run state: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot resume the run recorded in {path}: {source}")]
    Resume { path: PathBuf, source: crate::state::StateError },
    #[error("cannot start the run state's writer thread: {source}")]
    Writer { source: std::io::Error },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}
