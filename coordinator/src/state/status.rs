//! Status: per-job snapshots and the running GRPO job's pipeline gauges.

use super::*;

#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub job_id: JobId,
    pub name: String,
    pub stage: Stage,
    pub state: JobState,
    pub message: String,
    pub steps_completed: u64,
    pub total_steps: u64,
    pub policy_version: u64,
    pub counters: JobCounters,
    pub queue_depth: u64,
    pub leased_prompts_outstanding: u64,
    pub latest_metrics: BTreeMap<String, f64>,
    /// The learner group: epoch (0 = none formed), ranks now, members lost over the job.
    pub group_epoch: u64,
    pub learners: u32,
    pub learners_lost: u64,
}

/// The rollout pipeline of the running GRPO job, as the coordinator's gauges report it (all 0
/// when no GRPO job runs). A prompt moves from waiting to leased to a queued group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipelineGauges {
    /// Prompts a LeasePrompts call would hand out now: the pipeline has room and no rollout
    /// worker has taken them. Workers are the bottleneck while this stays above 0.
    pub prompts_waiting: u64,
    /// Prompts leased to rollout workers whose groups have not come back.
    pub leased_prompts: u64,
    /// Accepted groups waiting for the learners (not yet trained in a sealed step).
    pub queue_depth: u64,
    /// Staleness of the last sealed step: the policy version it was assembled at minus the
    /// oldest version that sampled one of its groups.
    pub policy_lag: u64,
}

impl RunState {
    /// The running GRPO job's pipeline (all 0 when no GRPO job runs).
    pub fn pipeline_gauges(&self) -> PipelineGauges {
        let Some(job) = self.running.and_then(|id| self.jobs.get(&id)) else { return PipelineGauges::default() };
        let Some(r) = job.rollouts.as_ref().filter(|_| job.state == JobState::Running) else {
            return PipelineGauges::default();
        };
        PipelineGauges {
            prompts_waiting: r.leasable(job.total_steps),
            leased_prompts: r.outstanding(),
            queue_depth: r.queued_groups(),
            policy_lag: r.last_step_lag,
        }
    }

    pub fn snapshot(&self, only: Option<JobId>) -> Result<Vec<JobSnapshot>, StateError> {
        if let Some(id) = only {
            if !self.jobs.contains_key(&id) {
                return Err(StateError::UnknownJob(id));
            }
        }
        Ok(self
            .jobs
            .values()
            .filter(|j| only.is_none_or(|id| id == j.id))
            .map(|j| JobSnapshot {
                job_id: j.id,
                name: j.config.run.name.clone(),
                stage: j.stage(),
                state: j.state,
                message: j.message.clone(),
                steps_completed: j.steps_completed,
                total_steps: j.total_steps,
                policy_version: j.policy_version,
                counters: j.counters.clone(),
                queue_depth: j.rollouts.as_ref().map_or(0, Rollouts::queued_groups),
                leased_prompts_outstanding: j.rollouts.as_ref().map_or(0, |r| r.outstanding()),
                latest_metrics: j.latest_metrics.clone(),
                group_epoch: j.group.epoch,
                learners: j.world_size,
                learners_lost: j.group.lost,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::*;

    #[test]
    fn pipeline_gauges_follow_prompts_from_waiting_to_leased_to_queued() {
        let (mut st, now, w, job) = grpo_state(10);
        let gauges = |st: &RunState| {
            let g = st.pipeline_gauges();
            (g.prompts_waiting, g.leased_prompts, g.queue_depth, g.policy_lag)
        };
        // 3 steps x 2 prompts, a window of (1 + 2) steps: 6 prompts may be leased.
        assert_eq!(gauges(&st), (6, 0, 0, 0));
        let first = st.lease(now, w, job, 3).unwrap();
        assert_eq!(gauges(&st), (3, 3, 0, 0));
        let k = keys(&first);
        let lease = first.lease_id.unwrap();
        for key in &k[..2] {
            st.submit_group(now, group(w, job, lease, *key, 0, [0.0, 1.0])).unwrap();
        }
        assert_eq!(gauges(&st), (3, 1, 2, 0));
        // Step 0 is sealed from two version-0 groups at version 0; 2 steps = 4 prompts remain.
        for rank in 0..2 {
            st.pull_batch(job, rank, 2, 0).unwrap();
            st.report_step(job, rank, 0, BTreeMap::new(), 2).unwrap();
        }
        assert_eq!(gauges(&st), (3, 1, 0, 0));
        st.submit_group(now, group(w, job, lease, k[2], 1, [0.0, 1.0])).unwrap();
        assert_eq!(gauges(&st), (3, 0, 1, 0));
        let second = st.lease(now, w, job, 10).unwrap();
        assert_eq!(gauges(&st), (0, 3, 1, 0));
        st.submit_group(now, group(w, job, second.lease_id.unwrap(), keys(&second)[0], 2, [0.0, 1.0])).unwrap();
        // Step 1 is sealed at version 2 from groups sampled at versions 1 and 2: lag 1.
        assert!(matches!(st.pull_batch(job, 0, 2, 1).unwrap(), BatchOutcome::Groups { .. }));
        assert_eq!(gauges(&st), (0, 2, 0, 1));
        st.cancel_job(job).unwrap();
        assert_eq!(st.pipeline_gauges(), PipelineGauges::default());
    }
}
