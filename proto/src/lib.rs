//! The MedTVT gRPC API, `medtvt.v1.Coordinator`: the generated message types and tonic
//! client/server (see `medtvt/v1/coordinator.proto` for the data flow it carries), plus
//! [`client`], the typed client the rollout workers and learners use, [`errors`], the reason
//! codes every error carries on the wire, [`groups`], the rules about rollout groups that both
//! ends apply, and [`weights`], the codec of policy weights as chunk streams.

pub mod client;
pub mod errors;
pub mod groups;
pub mod weights;

/// Generated from `medtvt/v1/coordinator.proto`.
pub mod v1 {
    tonic::include_proto!("medtvt.v1");
}

pub use v1::coordinator_client::CoordinatorClient;
pub use v1::coordinator_server::{Coordinator, CoordinatorServer};

/// The fully qualified service name, as the gRPC health service reports it.
pub const SERVICE_NAME: &str = "medtvt.v1.Coordinator";

/// Largest weight chunk the coordinator sends (and workers should send): 1 MiB.
pub const MAX_WEIGHT_CHUNK_BYTES: usize = 1 << 20;

/// Default gRPC message size limit on both sides: a chunk plus headroom, or a large batch.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The flag (and environment variable) that sets the gRPC message limit on every process.
pub const MAX_MESSAGE_FLAG: &str = "--max-message-mib (MEDTVT_MAX_MESSAGE_MIB)";
