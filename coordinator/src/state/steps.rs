//! Steps: the learners' side of a job: step batches (PT/SFT shards, sealed GRPO steps),
//! step reports, finishing a job, weight publication, and the learners' rendezvous.

use super::*;

/// A learner's shard of one step.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOutcome {
    /// Not ready yet; pull again.
    Pending,
    /// No more steps: the job finished (state says how) or `step` is past the last step.
    Done(JobState),
    Samples {
        samples: Vec<Bytes>,
        policy_version: u64,
    },
    Groups {
        groups: Vec<Arc<RolloutGroup>>,
        policy_version: u64,
    },
}

/// Rank `rank`'s part of a step's `len` items split over `world_size` ranks: contiguous, in rank
/// order, sizes differing by at most one (equal when `world_size` divides `len`, as it does for
/// the group a job starts with; a shrunk group may not divide it, and the trainer's global loss
/// normalisation makes uneven shards train exactly what even ones would).
fn shard_range(len: usize, rank: u32, world_size: u32) -> std::ops::Range<usize> {
    let (rank, world) = (rank as usize, world_size.max(1) as usize);
    len * rank / world..len * (rank + 1) / world
}

impl RunState {
    pub(super) fn check_rank(job: &Job, rank: u32, world_size: u32) -> Result<(), StateError> {
        if world_size != job.world_size {
            return Err(StateError::BadRank(format!(
                "world_size {world_size} does not match job {}'s cluster.learners = {}",
                job.id, job.world_size
            )));
        }
        if rank >= world_size {
            return Err(StateError::BadRank(format!("rank {rank} is not below world_size {world_size}")));
        }
        Ok(())
    }

    /// This rank's shard of step `step`. GRPO steps are assembled in order, each once the
    /// previous step was reported by every rank, from the ready groups in arrival order.
    pub fn pull_batch(&mut self, id: JobId, rank: u32, world_size: u32, step: u64) -> Result<BatchOutcome, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        Self::check_rank(job, rank, world_size)?;
        match job.state {
            JobState::Running => {}
            JobState::Queued => return Err(StateError::JobNotRunning { job: id, state: job.state }),
            state => return Ok(BatchOutcome::Done(state)),
        }
        if step >= job.total_steps {
            return Ok(BatchOutcome::Done(job.state));
        }
        let policy_version = job.policy_version;
        let Some(r) = &mut job.rollouts else {
            let batch = job.config.train.batch_size as u64;
            let shard = shard_range(batch as usize, rank, world_size);
            let start = step * batch;
            let samples = (start + shard.start as u64..start + shard.end as u64)
                .map(|p| job.samples[job.order.at(p).0 as usize].clone())
                .collect();
            return Ok(BatchOutcome::Samples { samples, policy_version });
        };
        // Steps are sealed in order and a learner only pulls step s after training s - 1, so a
        // step beyond the next one to seal comes from learners that resumed from another job's
        // checkpoint in the same run.out_dir: its rollouts would have to come from a policy
        // version this job never published. Refused at once rather than pending forever.
        if step > r.steps.len() as u64 {
            let out = job.config.run.out_dir.display();
            return Err(StateError::ForeignCheckpoint(format!(
                "job {id}: learner rank {rank} resumed at GRPO step {step} from a checkpoint in {out}/checkpoints, but this job has \
trained {} steps: the checkpoint was left by an earlier job with the same run.out_dir, and a GRPO job cannot continue \
another job's steps (its rollouts would come from a policy version it never published); submit it with a new \
run.out_dir, or remove {out}/checkpoints to start over",
                job.steps_completed
            )));
        }
        if step as usize == r.steps.len() && job.steps_completed >= step {
            let mut dropped = Vec::new();
            while (r.assembling.len() as u64) < r.prompts_per_step {
                let Some(group) = r.ready.pop_front() else { break };
                if policy_version - group.policy_version > r.max_staleness {
                    let key = PromptKey { prompt_id: group.prompt_id, epoch: group.epoch };
                    r.accepted.remove(&key);
                    dropped.push(key);
                    job.counters.groups_dropped_stale += 1;
                    self.events.push(Event::GroupDroppedStale {
                        job_id: id,
                        prompt_id: key.prompt_id,
                        epoch: key.epoch,
                        sampled_at: group.policy_version,
                        policy_version,
                    });
                } else {
                    r.assembling.push(group);
                }
            }
            if !dropped.is_empty() {
                r.requeue_front(dropped.into_iter());
            }
            if r.assembling.len() as u64 == r.prompts_per_step {
                let groups = std::mem::take(&mut r.assembling);
                r.last_step_lag =
                    groups.iter().map(|g| policy_version.saturating_sub(g.policy_version)).max().unwrap_or(0);
                self.journal.push(Durable::StepSealed { job_id: id, step, groups: groups.clone() });
                r.steps.push(groups);
            }
        }
        if step < r.pruned_below {
            return Err(StateError::StepPruned(format!(
                "step {step} of job {id} was trained more than train.checkpoint_every = {} steps ago; its groups are gone",
                r.retain_steps
            )));
        }
        let Some(sealed) = r.steps.get(step as usize) else { return Ok(BatchOutcome::Pending) };
        let groups = sealed[shard_range(sealed.len(), rank, world_size)].to_vec();
        Ok(BatchOutcome::Groups { groups, policy_version })
    }

    /// The sample bytes of a prompt of job `id` (attached to groups handed to learners).
    pub fn sample(&self, id: JobId, prompt_id: u64) -> Option<Bytes> {
        self.jobs.get(&id).and_then(|j| j.samples.get(prompt_id as usize).cloned())
    }

    /// A rank finished `step`. Returns the steps every rank has completed.
    pub fn report_step(
        &mut self,
        id: JobId,
        rank: u32,
        step: u64,
        metrics: BTreeMap<String, f64>,
        policy_version_after: u64,
    ) -> Result<u64, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        let world_size = job.world_size;
        Self::check_rank(job, rank, world_size)?;
        if job.state.is_terminal() {
            return Ok(job.steps_completed);
        }
        if job.state != JobState::Running {
            return Err(StateError::JobNotRunning { job: id, state: job.state });
        }
        if step >= job.total_steps {
            return Err(StateError::StepOutOfRange(format!(
                "step {step} is past job {id}'s train.steps = {}",
                job.total_steps
            )));
        }
        if let Some(r) = &job.rollouts {
            if step as usize >= r.steps.len() {
                return Err(StateError::StepNotReady(format!("step {step} of job {id} has not been handed out yet")));
            }
        }
        if step < job.steps_completed {
            return Ok(job.steps_completed); // a restarted learner re-reporting
        }
        job.reported.entry(step).or_default().insert(rank);
        job.policy_version = job.policy_version.max(policy_version_after);
        if rank == 0 {
            job.latest_metrics = metrics;
        }
        while job.reported.get(&job.steps_completed).is_some_and(|ranks| ranks.len() as u32 == world_size) {
            job.reported.remove(&job.steps_completed);
            if let Some(r) = &job.rollouts {
                job.counters.groups_trained += r.steps[job.steps_completed as usize].len() as u64;
            }
            self.events.push(Event::StepCompleted {
                job_id: id,
                step: job.steps_completed,
                policy_version: job.policy_version,
            });
            job.steps_completed += 1;
        }
        if let Some(r) = job.rollouts.as_mut().filter(|r| r.retain_steps > 0) {
            let floor = job.steps_completed.saturating_sub(r.retain_steps);
            for step in r.pruned_below..floor {
                r.steps[step as usize] = Vec::new();
            }
            if floor > r.pruned_below {
                r.pruned_below = floor;
                self.journal.push(Durable::StepsPruned { job_id: id, below: floor });
            }
        }
        let done = job.steps_completed;
        self.maybe_succeed(id);
        Ok(done)
    }

    /// Rank 0 ends the job: fails it with `failure`, or asks it to succeed once every rank has
    /// reported the last step.
    pub fn finish_job(
        &mut self,
        id: JobId,
        rank: u32,
        checkpoint_dir: String,
        failure: String,
    ) -> Result<JobState, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        if job.state.is_terminal() {
            return Ok(job.state);
        }
        if rank != 0 {
            return Err(StateError::BadRank(format!("only rank 0 finishes a job, not rank {rank}")));
        }
        if !failure.is_empty() {
            self.end_job(id, JobState::Failed, failure);
            return self.job_state(id);
        }
        let last = job.total_steps - 1;
        let rank0_done =
            job.steps_completed == job.total_steps || job.reported.get(&last).is_some_and(|r| r.contains(&0));
        if !rank0_done {
            return Err(StateError::LastStepNotReported(format!(
                "job {id}: rank 0 has not reported its last step {last} ({} of {} steps completed)",
                job.steps_completed, job.total_steps
            )));
        }
        job.finish_requested = Some(checkpoint_dir);
        self.maybe_succeed(id);
        self.job_state(id)
    }

    pub(super) fn maybe_succeed(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else { return };
        if job.steps_completed == job.total_steps {
            if let Some(checkpoint) = &job.finish_requested {
                let message = format!("final checkpoint: {checkpoint}");
                self.end_job(id, JobState::Succeeded, message);
            }
        }
    }

    /// New weights of `version` are available for job `id`.
    pub fn weights_published(&mut self, id: JobId, version: u64) -> Result<(), StateError> {
        let job = self.running_job_mut(id)?;
        if version > job.policy_version {
            job.policy_version = version;
        }
        Ok(())
    }

    /// Records this rank's payload; returns every payload once all ranks arrived.
    pub fn rendezvous(
        &mut self,
        id: JobId,
        key: &str,
        rank: u32,
        world_size: u32,
        payload: Bytes,
    ) -> Result<Option<Vec<Bytes>>, StateError> {
        self.running_job_mut(id)?;
        if world_size == 0 || rank >= world_size {
            return Err(StateError::BadRank(format!("rank {rank} is not below world_size {world_size}")));
        }
        let round = self
            .rendezvous
            .entry((id, key.to_string()))
            .or_insert_with(|| RendezvousRound { world_size, payloads: vec![None; world_size as usize] });
        if round.world_size != world_size {
            return Err(StateError::BadRank(format!(
                "rendezvous `{key}` has world_size {} but rank {rank} says {world_size}",
                round.world_size
            )));
        }
        let complete = round.payloads.iter().all(Option::is_some);
        let slot = &mut round.payloads[rank as usize];
        if !complete && slot.as_ref() != Some(&payload) {
            *slot = Some(payload);
        }
        Ok(round.payloads.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::*;

    /// Issue #12: learners that resumed from an earlier job's checkpoint ask a fresh GRPO job
    /// for a step it can never seal; the pull is refused with the reason instead of pending.
    #[test]
    fn a_grpo_step_beyond_the_next_one_to_seal_is_refused_with_the_reason() {
        let (mut st, _, _, job) = grpo_state(8);
        assert!(matches!(st.pull_batch(job, 0, 2, 0).unwrap(), BatchOutcome::Pending));
        let err = st.pull_batch(job, 0, 2, 2).unwrap_err().to_string();
        assert!(
            err.contains("resumed at GRPO step 2 from a checkpoint in o/checkpoints, but this job has trained 0 steps"),
            "{err}"
        );
        assert!(err.contains("new run.out_dir"), "{err}");
    }

    #[test]
    fn pt_shards_are_disjoint_cover_the_batch_and_repeat() {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("pt", ""), samples(6)).unwrap();
        let shard = |st: &mut RunState, rank, step| match st.pull_batch(JobId(1), rank, 2, step).unwrap() {
            BatchOutcome::Samples { samples, .. } => samples,
            other => panic!("{other:?}"),
        };
        let a = shard(&mut st, 0, 0);
        let b = shard(&mut st, 1, 0);
        assert_eq!((a.len(), b.len()), (2, 2));
        assert!(a.iter().all(|s| !b.contains(s)));
        assert_eq!(shard(&mut st, 0, 0), a);
        // Step 1 takes the rest of epoch 0 (2 samples) and the start of epoch 1.
        let mut epoch0: Vec<Bytes> = [a, b, shard(&mut st, 0, 1)].concat();
        epoch0.sort();
        epoch0.dedup();
        assert_eq!(epoch0.len(), 6);
        assert_eq!(st.pull_batch(JobId(1), 0, 2, 3).unwrap(), BatchOutcome::Done(JobState::Running));
        assert!(matches!(st.pull_batch(JobId(1), 2, 2, 0), Err(StateError::BadRank(_))));
        assert!(matches!(st.pull_batch(JobId(1), 0, 3, 0), Err(StateError::BadRank(_))));
    }

    #[test]
    fn finish_before_the_last_step_is_refused_and_success_waits_for_all_ranks() {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("pt", ""), samples(4)).unwrap();
        assert!(matches!(
            st.finish_job(JobId(1), 0, "c".into(), String::new()),
            Err(StateError::LastStepNotReported(_))
        ));
        for step in 0..3 {
            st.report_step(JobId(1), 0, step, BTreeMap::from([("loss".into(), 1.0)]), step + 1).unwrap();
        }
        assert_eq!(st.finish_job(JobId(1), 0, "c".into(), String::new()).unwrap(), JobState::Running);
        for step in 0..3 {
            st.report_step(JobId(1), 1, step, BTreeMap::new(), step + 1).unwrap();
        }
        assert_eq!(st.job_state(JobId(1)).unwrap(), JobState::Succeeded);
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!((snap.steps_completed, snap.policy_version), (3, 3));
        assert_eq!(snap.latest_metrics.get("loss"), Some(&1.0));
    }

    #[test]
    fn grpo_groups_flow_into_steps_and_are_trained_once() {
        let (mut st, now, w, job) = grpo_state(10);
        // 3 steps x 2 prompts; the window is (1 + 2) steps = 6 prompts in flight.
        assert_eq!(st.lease(now, w, job, 100).unwrap().prompts.len(), 6);
        st.cancel_job(job).unwrap();
        let job = st.enqueue(config("grpo", ""), samples(10)).unwrap();
        let (mut leased, mut trained) = (Vec::new(), Vec::new());
        for step in 0..3u64 {
            let grant = st.lease(now, w, job, 2).unwrap();
            assert_eq!(grant.policy_version, step);
            for key in keys(&grant) {
                let outcome =
                    st.submit_group(now, group(w, job, grant.lease_id.unwrap(), key, step, [0.0, 1.0])).unwrap();
                assert_eq!(outcome, GroupOutcome::Accepted);
                leased.push((key.prompt_id, key.epoch));
            }
            for rank in 0..2 {
                let BatchOutcome::Groups { groups, .. } = st.pull_batch(job, rank, 2, step).unwrap() else { panic!() };
                assert_eq!(groups.len(), 1);
                trained.extend(groups.iter().map(|g| (g.prompt_id, g.epoch)));
            }
            // Idempotent re-pull; the next step waits until this one is reported by both ranks.
            let BatchOutcome::Groups { groups, .. } = st.pull_batch(job, 1, 2, step).unwrap() else { panic!() };
            assert_eq!((groups[0].prompt_id, groups[0].epoch), *trained.last().unwrap());
            assert_eq!(
                st.pull_batch(job, 0, 2, step + 1).unwrap(),
                if step < 2 { BatchOutcome::Pending } else { BatchOutcome::Done(JobState::Running) }
            );
            for rank in 0..2 {
                st.report_step(job, rank, step, BTreeMap::new(), step + 1).unwrap();
            }
        }
        assert_eq!(trained, leased, "arrival order, each group exactly once");
        let c = &st.snapshot(Some(job)).unwrap()[0].counters;
        assert_eq!((c.groups_accepted, c.groups_trained, c.groups_dropped_stale), (6, 6, 0));
    }

    #[test]
    fn trained_steps_older_than_the_checkpoint_window_are_freed() {
        let mut st = RunState::new(StateOptions::default());
        let mut cfg = config("grpo", "");
        cfg.train.checkpoint_every = 1;
        let job = st.enqueue(cfg, samples(10)).unwrap();
        let now = Instant::now();
        let w = st.register(now, Role::RolloutWorker, "w".into(), 0, 0);
        for step in 0..2u64 {
            let grant = st.lease(now, w, job, 2).unwrap();
            for key in keys(&grant) {
                st.submit_group(now, group(w, job, grant.lease_id.unwrap(), key, step, [0.0, 1.0])).unwrap();
            }
            for rank in 0..2 {
                assert!(matches!(st.pull_batch(job, rank, 2, step).unwrap(), BatchOutcome::Groups { .. }));
                st.report_step(job, rank, step, BTreeMap::new(), step + 1).unwrap();
            }
        }
        // Step 1 is still within one step of the last completed; step 0 is not.
        assert!(matches!(st.pull_batch(job, 0, 2, 1).unwrap(), BatchOutcome::Groups { .. }));
        assert!(matches!(st.pull_batch(job, 0, 2, 0), Err(StateError::StepPruned(_))));
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!(snap.counters.groups_trained, 4);
        // The lease budget still counts the freed step: 1 step left = 2 prompts.
        assert_eq!(st.lease(now, w, job, 100).unwrap().prompts.len(), 2);
    }

    #[test]
    fn stale_group_in_the_ready_queue_is_dropped_at_step_time() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 6).unwrap();
        let lease = grant.lease_id.unwrap();
        for key in keys(&grant) {
            st.submit_group(now, group(w, job, lease, key, 0, [0.0, 1.0])).unwrap();
        }
        for rank in 0..2 {
            st.pull_batch(job, rank, 2, 0).unwrap();
            st.report_step(job, rank, 0, BTreeMap::new(), 2).unwrap();
        }
        // All four remaining version-0 groups are too old for step 1.
        assert_eq!(st.pull_batch(job, 0, 2, 1).unwrap(), BatchOutcome::Pending);
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!((snap.counters.groups_dropped_stale, snap.queue_depth), (4, 0));
        let again = st.lease(now, w, job, 10).unwrap();
        assert_eq!(keys(&again)[..4], keys(&grant)[2..]);
    }

    #[test]
    fn rendezvous_completes_when_every_rank_arrived() {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("pt", ""), samples(4)).unwrap();
        assert_eq!(st.rendezvous(JobId(1), "k", 1, 2, Bytes::from("b")).unwrap(), None);
        let all = st.rendezvous(JobId(1), "k", 0, 2, Bytes::from("a")).unwrap();
        assert_eq!(all, Some(vec![Bytes::from("a"), Bytes::from("b")]));
        assert!(st.rendezvous(JobId(1), "k", 0, 3, Bytes::new()).is_err());
        assert_eq!(
            st.rendezvous(JobId(1), "k", 1, 2, Bytes::from("changed")).unwrap(),
            all,
            "completed keys are frozen"
        );
    }
}
