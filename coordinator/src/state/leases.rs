//! Leases and groups: handing prompts to rollout workers, and accepting (exactly once), dropping
//! or ignoring the groups they submit.

use super::*;

/// One leased batch of prompts.
#[derive(Debug, Clone)]
pub struct LeaseGrant {
    pub lease_id: Option<LeaseId>,
    pub job_id: JobId,
    pub policy_version: u64,
    pub group_size: u32,
    pub timeout: Duration,
    pub prompts: Vec<(PromptKey, Bytes)>,
    pub job_state: JobState,
}

impl LeaseGrant {
    pub fn job_done(&self) -> bool {
        self.job_state.is_terminal()
    }
}

/// What happened to one submitted group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupOutcome {
    Accepted,
    Duplicate,
    /// Lease expired, job ended, or sampled too many versions ago.
    Stale,
    UnknownLease,
}

impl Rollouts {
    pub(super) fn outstanding(&self) -> u64 {
        self.leases.values().map(|l| l.outstanding.len() as u64).sum()
    }

    /// Accepted groups not yet in a sealed step.
    pub(super) fn queued_groups(&self) -> u64 {
        (self.ready.len() + self.assembling.len()) as u64
    }

    /// How many prompts may be leased now: no more than the remaining steps need, and no more
    /// than a pipeline of `max_staleness + 2` steps holds, less what is already in it.
    pub(super) fn leasable(&self, total_steps: u64) -> u64 {
        let needed_total = total_steps * self.prompts_per_step;
        let sealed = self.steps.len() as u64 * self.prompts_per_step;
        let in_flight = self.queued_groups() + self.outstanding();
        let window = self.prompts_per_step * (self.max_staleness + 2);
        needed_total.saturating_sub(sealed).min(window).saturating_sub(in_flight)
    }

    pub(super) fn requeue_front(&mut self, keys: impl DoubleEndedIterator<Item = PromptKey>) {
        for key in keys.rev() {
            self.requeued.push_front(key);
        }
    }
}

impl RunState {
    /// Leases up to `max_prompts` prompts of job `id` to a rollout worker, no more than the
    /// remaining steps (plus a pipeline of `max_staleness + 2` steps) need.
    pub fn lease(
        &mut self,
        now: Instant,
        worker: WorkerId,
        id: JobId,
        max_prompts: u32,
    ) -> Result<LeaseGrant, StateError> {
        let role = self.touch(now, worker)?.role;
        if role != Role::RolloutWorker {
            return Err(StateError::WrongRole { worker, role, needed: Role::RolloutWorker, what: "LeasePrompts" });
        }
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        let stage = job.stage();
        let (job_state, policy_version) = (job.state, job.policy_version);
        let Some(r) = &mut job.rollouts else {
            return Err(StateError::NotGrpo { job: id, stage, what: "LeasePrompts" });
        };
        let mut grant = LeaseGrant {
            lease_id: None,
            job_id: id,
            policy_version,
            group_size: r.group_size,
            timeout: r.lease_timeout,
            prompts: Vec::new(),
            job_state,
        };
        match job_state {
            JobState::Running => {}
            JobState::Queued => return Err(StateError::JobNotRunning { job: id, state: job_state }),
            _ => return Ok(grant),
        }
        let count = r.leasable(job.total_steps).min(max_prompts as u64) as usize;
        if count == 0 {
            return Ok(grant);
        }
        let mut keys = Vec::with_capacity(count);
        while keys.len() < count {
            let key = match r.requeued.pop_front() {
                Some(key) => key,
                None => {
                    let (prompt_id, epoch) = job.order.at(r.next_fresh);
                    r.next_fresh += 1;
                    PromptKey { prompt_id, epoch }
                }
            };
            keys.push(key);
        }
        let lease_id = LeaseId(self.next_lease);
        self.next_lease += 1;
        grant.prompts = keys.iter().map(|k| (*k, job.samples[k.prompt_id as usize].clone())).collect();
        grant.lease_id = Some(lease_id);
        job.counters.prompts_leased += keys.len() as u64;
        r.leases.insert(
            lease_id,
            LeaseRecord {
                worker,
                outstanding: keys.iter().copied().collect(),
                prompts: keys,
                deadline: now + r.lease_timeout,
            },
        );
        Ok(grant)
    }

    /// Takes one submitted group: accepted at most once per prompt occurrence, ignored (and
    /// counted) when late, duplicate or unknown. A malformed group is an error.
    pub fn submit_group(&mut self, now: Instant, group: RolloutGroup) -> Result<GroupOutcome, StateError> {
        let worker = WorkerId(group.worker_id);
        self.touch(now, worker)?;
        let id = JobId(group.job_id);
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        let stage = job.stage();
        let Some(r) = &mut job.rollouts else {
            return Err(StateError::NotGrpo { job: id, stage, what: "SubmitGroups" });
        };
        if group.completions.len() != r.group_size as usize {
            return Err(StateError::InvalidGroup(format!(
                "group for prompt {} has {} completions; job {id} has grpo.group_size = {}",
                group.prompt_id,
                group.completions.len(),
                r.group_size
            )));
        }
        if let Some(c) =
            group.completions.iter().find(|c| !c.logprobs.is_empty() && c.logprobs.len() != c.token_ids.len())
        {
            return Err(StateError::InvalidGroup(format!(
                "a completion of prompt {} has {} token ids but {} logprobs",
                group.prompt_id,
                c.token_ids.len(),
                c.logprobs.len()
            )));
        }
        if group.policy_version > job.policy_version {
            return Err(StateError::InvalidGroup(format!(
                "group sampled at policy version {} but job {id} is at version {}",
                group.policy_version, job.policy_version
            )));
        }
        if job.state != JobState::Running {
            job.counters.late_groups_ignored += 1;
            return Ok(GroupOutcome::Stale);
        }
        let key = PromptKey { prompt_id: group.prompt_id, epoch: group.epoch };
        let lease_id = LeaseId(group.lease_id);
        if r.accepted.contains(&key) {
            job.counters.duplicates_ignored += 1;
            return Ok(GroupOutcome::Duplicate);
        }
        let owned = r.leases.get(&lease_id).is_some_and(|l| l.worker == worker && l.outstanding.contains(&key));
        if !owned {
            if r.expired_leases.contains(&lease_id) {
                job.counters.late_groups_ignored += 1;
                return Ok(GroupOutcome::Stale);
            }
            job.counters.unknown_lease_groups += 1;
            return Ok(GroupOutcome::UnknownLease);
        }
        if let Some(lease) = r.leases.get_mut(&lease_id) {
            lease.outstanding.remove(&key);
            if lease.outstanding.is_empty() {
                r.leases.remove(&lease_id);
            }
        }
        if job.policy_version - group.policy_version > r.max_staleness {
            // It can only get older: drop it now rather than at step time.
            job.counters.groups_dropped_stale += 1;
            r.requeue_front(std::iter::once(key));
            self.events.push(Event::GroupDroppedStale {
                job_id: id,
                prompt_id: key.prompt_id,
                epoch: key.epoch,
                sampled_at: group.policy_version,
                policy_version: job.policy_version,
            });
            return Ok(GroupOutcome::Stale);
        }
        r.accepted.insert(key);
        job.counters.groups_accepted += 1;
        if group.is_tied() {
            job.counters.tied_groups += 1;
            if r.filter_tied_groups {
                // No signal: consumed without training; the lease budget refills the batch.
                return Ok(GroupOutcome::Accepted);
            }
        }
        r.ready.push_back(Arc::new(group));
        Ok(GroupOutcome::Accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::*;

    #[test]
    fn expired_lease_goes_back_to_the_front_and_late_submission_is_ignored() {
        let (mut st, now, w1, job) = grpo_state(10);
        let w2 = st.register(now, Role::RolloutWorker, "w2".into(), 0, 0);
        let first = st.lease(now, w1, job, 2).unwrap();
        let later = now + Duration::from_secs(11);
        st.touch(later, w1).unwrap();
        st.touch(later, w2).unwrap();
        assert!(st.expire(later));
        let second = st.lease(later, w2, job, 2).unwrap();
        assert_eq!(keys(&second), keys(&first), "re-leased first, in order");
        let late = group(w1, job, first.lease_id.unwrap(), keys(&first)[0], 0, [0.0, 1.0]);
        assert_eq!(st.submit_group(later, late).unwrap(), GroupOutcome::Stale);
        let on_time = group(w2, job, second.lease_id.unwrap(), keys(&first)[0], 0, [0.0, 1.0]);
        assert_eq!(st.submit_group(later, on_time.clone()).unwrap(), GroupOutcome::Accepted);
        assert_eq!(st.submit_group(later, on_time).unwrap(), GroupOutcome::Duplicate);
        let bogus = group(w2, job, LeaseId(999), keys(&first)[1], 0, [0.0, 1.0]);
        assert_eq!(st.submit_group(later, bogus).unwrap(), GroupOutcome::UnknownLease);
        let c = &st.snapshot(None).unwrap()[0].counters;
        assert_eq!(
            (c.late_groups_ignored, c.duplicates_ignored, c.unknown_lease_groups, c.leases_expired),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn stale_group_is_dropped_and_its_prompt_requeued() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 6).unwrap();
        let lease = grant.lease_id.unwrap();
        let k = keys(&grant);
        for key in &k[..2] {
            st.submit_group(now, group(w, job, lease, *key, 0, [0.0, 1.0])).unwrap();
        }
        // Step 0 trains and the policy moves to version 2 (e.g. two publishes).
        for rank in 0..2 {
            st.pull_batch(job, rank, 2, 0).unwrap();
            st.report_step(job, rank, 0, BTreeMap::new(), 2).unwrap();
        }
        // A version-0 group is now 2 versions old (> max_staleness 1): dropped on arrival.
        assert_eq!(st.submit_group(now, group(w, job, lease, k[2], 0, [0.0, 1.0])).unwrap(), GroupOutcome::Stale);
        assert_eq!(st.submit_group(now, group(w, job, lease, k[3], 1, [0.0, 1.0])).unwrap(), GroupOutcome::Accepted);
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!(snap.counters.groups_dropped_stale, 1);
        // The dropped prompt is the first to be leased again.
        let again = st.lease(now, w, job, 1).unwrap();
        assert_eq!(keys(&again), vec![k[2]]);
        st.submit_group(now, group(w, job, again.lease_id.unwrap(), k[2], 2, [0.0, 1.0])).unwrap();
        let BatchOutcome::Groups { .. } = st.pull_batch(job, 0, 2, 1).unwrap() else {
            panic!("step 1 should be ready")
        };
    }

    #[test]
    fn malformed_groups_are_errors() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 1).unwrap();
        let mut g = group(w, job, grant.lease_id.unwrap(), keys(&grant)[0], 0, [0.0, 1.0]);
        g.completions.pop();
        assert!(matches!(st.submit_group(now, g), Err(StateError::InvalidGroup(m)) if m.contains("group_size = 2")));
        let g = group(w, job, grant.lease_id.unwrap(), keys(&grant)[0], 5, [0.0, 1.0]);
        assert!(matches!(st.submit_group(now, g), Err(StateError::InvalidGroup(_))));
        let g = group(WorkerId(77), job, grant.lease_id.unwrap(), keys(&grant)[0], 0, [0.0, 1.0]);
        assert_eq!(st.submit_group(now, g), Err(StateError::UnknownWorker(WorkerId(77))));
    }

    #[test]
    fn tied_groups_are_counted_and_filtered_when_asked() {
        let mut st = RunState::new(StateOptions::default());
        let mut cfg = config("grpo", "");
        if let Some(g) = &mut cfg.grpo {
            g.filter_tied_groups = true;
        }
        st.enqueue(cfg, samples(10)).unwrap();
        let now = Instant::now() + T0;
        let w = st.register(now, Role::RolloutWorker, "w".into(), 0, 0);
        let grant = st.lease(now, w, JobId(1), 2).unwrap();
        let k = keys(&grant);
        st.submit_group(now, group(w, JobId(1), grant.lease_id.unwrap(), k[0], 0, [1.0, 1.0])).unwrap();
        st.submit_group(now, group(w, JobId(1), grant.lease_id.unwrap(), k[1], 0, [0.0, 1.0])).unwrap();
        let snap = &st.snapshot(None).unwrap()[0];
        assert_eq!((snap.counters.tied_groups, snap.queue_depth), (1, 1));
    }

    #[test]
    fn lease_stops_at_what_the_remaining_steps_need() {
        let mut st = RunState::new(StateOptions::default());
        let mut cfg = config("grpo", "");
        cfg.train.steps = 1;
        st.enqueue(cfg, samples(100)).unwrap();
        let now = Instant::now();
        let w = st.register(now, Role::RolloutWorker, "w".into(), 0, 0);
        assert_eq!(st.lease(now, w, JobId(1), 100).unwrap().prompts.len(), 2);
        let learner = st.register(now, Role::Learner, "l".into(), 0, 2);
        assert!(matches!(st.lease(now, learner, JobId(1), 1), Err(StateError::WrongRole { .. })));
        st.cancel_job(JobId(1)).unwrap();
        let grant = st.lease(now, w, JobId(1), 1).unwrap();
        assert!(grant.job_done() && grant.prompts.is_empty());
    }
}
