//! The MedTVT coordinator: the control plane of a run. It owns a FIFO of jobs (PT, SFT, GRPO
//! stages), leases GRPO prompts to rollout workers, turns their groups into training batches
//! for the learners, relays policy weights as opaque bytes, and offers a rendezvous for the
//! learners' collective. It never touches tensors.
//!
//! Modules, in the order a request meets them: [`server`] (bind, serve, stop), `interceptor`
//! (auth, trace hook), [`service`] (the gRPC handlers), [`state`] (the pure job state
//! machine), [`store`] (the durable run state behind `--run-dir`), [`journal_writer`] (its writer thread), [`weights`] (weight
//! versions), [`dataset`] (the prompts), [`job_roots`] (where submitted jobs may point), [`tls`]
//! (the server certificate) and [`args`] (the CLI);
//! [`in_process`] runs a killable coordinator inside a test process.

pub mod args;
pub mod dataset;
pub mod error;
pub mod events;
pub mod ids;
pub mod in_process;
mod interceptor;
pub mod job_roots;
pub mod journal_writer;
pub mod server;
pub mod service;
pub mod state;
pub mod status_table;
pub mod store;
pub mod tls;
pub mod weights;

pub use args::{run, run_process, run_until, CoordinatorArgs};
pub use error::CoordinatorError;
pub use ids::{JobId, JobState, LeaseId, PromptKey, Role, WorkerId};
pub use server::{serve, Coordinator, ServerOptions};
