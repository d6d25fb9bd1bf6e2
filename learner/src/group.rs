//! A learner's seat in its job's learner group, for jobs with `cluster.on_learner_loss` =
//! `shrink` or `wait` (the coordinator's side is `coordinator/src/state/groups.rs`).
//!
//! A learner asks the coordinator for a seat (JoinLearnerGroup) when the job starts, and again
//! whenever its group breaks: a collective failed or timed out (a peer died, stopped or was cut
//! off), or the coordinator answered STALE_GROUP (a rank was lost or a replacement joined). Before
//! asking it closes its old collective, so that the peers still waiting on it notice at once
//! instead of after their timeout. With the seat (epoch, rank, world size) it connects the new
//! group's collective and takes rank 0's whole training state (rank 0 holds the most steps), then
//! trains on from there: survivors resume from memory, not from a checkpoint.

use crate::collective::Disconnected;
use crate::job::{connect_collective, JobError, LearnerIdentity};
use crate::trainer::{TrainError, Trainer};
use medtvt_model::policy::Policy;
use medtvt_proto::v1::JoinGroupRequest;
use medtvt_role::rpc::{CoordinatorLink, RpcError};
use std::time::Duration;
use tch::Device;

/// Where a learner sits in its job's learners now. Epoch 0: no group (`on_learner_loss =
/// "fail"`): the process's own `--rank` and `--world-size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seat {
    pub epoch: u64,
    pub rank: usize,
    pub world_size: usize,
}

impl Seat {
    pub fn ungrouped(me: &LearnerIdentity) -> Self {
        Seat { epoch: 0, rank: me.rank, world_size: me.world_size }
    }
}

/// Whether `err` means the learner group broke (and a new one can carry on), as opposed to a
/// fault of this learner or of the job.
pub fn is_group_fault(err: &JobError) -> bool {
    match err {
        JobError::Collective(_) | JobError::Train(TrainError::Collective(_)) => true,
        JobError::Rpc(RpcError::Status { status, .. }) => medtvt_proto::client::is_stale_group(status),
        _ => false,
    }
}

/// Leaves the group of `after_epoch` (0: none yet) and takes a seat in the next one, its
/// collective connected and this rank holding rank 0's state; `None` when the job ended.
pub fn regroup<P: Policy>(
    link: &CoordinatorLink,
    me: &LearnerIdentity,
    job_id: u64,
    device: Device,
    trainer: &mut Trainer<P>,
    mut after_epoch: u64,
    timeout: Duration,
) -> Result<Option<Seat>, JobError> {
    loop {
        // Closes the old sockets: peers blocked on this rank see the group break at once.
        drop(trainer.replace_collective(Box::new(Disconnected)));
        link.set_progress(trainer.step_index(), "regroup");
        let Some(seat) = ask_seat(link, job_id, me.rank as u32, trainer.step_index(), after_epoch)? else {
            return Ok(None);
        };
        tracing::info!(
            job = job_id,
            epoch = seat.epoch,
            rank = seat.rank,
            world_size = seat.world_size,
            step = trainer.step_index(),
            "took a seat in the learner group"
        );
        let joined = connect_collective(me, seat, device, link, job_id, &format!("e{}", seat.epoch), timeout, timeout)
            .and_then(|collective| {
                trainer.replace_collective(collective);
                trainer.sync_from_root().map_err(JobError::from)
            });
        match joined {
            Ok(()) => return Ok(Some(seat)),
            Err(err) if is_group_fault(&err) => {
                tracing::warn!(error = %err, epoch = seat.epoch, "the new learner group broke while forming");
                after_epoch = seat.epoch;
            }
            Err(err) => return Err(err),
        }
    }
}

/// Long-polls JoinLearnerGroup until the group formed (`None`: the job ended).
fn ask_seat(
    link: &CoordinatorLink,
    job_id: u64,
    slot: u32,
    step: u64,
    after_epoch: u64,
) -> Result<Option<Seat>, JobError> {
    loop {
        let answer = link.call_as_worker("JoinLearnerGroup", |mut c, worker_id| async move {
            let request = JoinGroupRequest { job_id, worker_id, slot, step, after_epoch, wait_ms: 5_000 };
            c.join_learner_group(request).await
        })?;
        if answer.done {
            return Ok(None);
        }
        if !answer.pending {
            let seat = Seat { epoch: answer.epoch, rank: answer.rank as usize, world_size: answer.world_size as usize };
            return Ok(Some(seat));
        }
        if link.stop_flag().is_stopped() {
            return Err(RpcError::ShuttingDown { call: "JoinLearnerGroup" }.into());
        }
    }
}
