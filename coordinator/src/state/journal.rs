//! Durability: the records a resumed run needs ([`Durable`]: jobs, their progress, sealed steps,
//! id counters), drained by the service after each call and written by `store.rs`, and
//! [`RunState::resume`], which rebuilds the state from what was stored.

use super::*;

/// A change to record so that a killed coordinator can resume (see the module doc).
#[derive(Debug, Clone)]
pub enum Durable {
    /// A new job: its resolved config and the samples it leases or batches from.
    JobQueued { job_id: JobId, config_toml: String, samples: Arc<Vec<Bytes>> },
    /// The job's progress as it is now (replaces the previous record).
    Job(JobRecord),
    /// Step `step` of a GRPO job was assembled; it never changes.
    StepSealed { job_id: JobId, step: u64, groups: Vec<Arc<RolloutGroup>> },
    /// The groups of steps below `below` were freed (their keys stay recorded).
    StepsPruned { job_id: JobId, below: u64 },
    /// The next ids to hand out; ids are never reused across restarts.
    Ids(IdCounters),
}

/// The next job, worker and lease ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdCounters {
    pub next_job: u64,
    pub next_worker: u64,
    pub next_lease: u64,
}

/// The progress of one job, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub job_id: JobId,
    pub state: JobState,
    pub message: String,
    pub policy_version: u64,
    pub steps_completed: u64,
    /// GRPO: positions of the epoch order handed out so far.
    pub next_fresh: u64,
    /// GRPO: steps below this have had their groups freed.
    pub pruned_below: u64,
    pub finish_requested: Option<String>,
    pub progress: JobProgress,
}

/// The less structured part of a [`JobRecord`] (stored as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobProgress {
    /// Ranks that reported each step not yet completed.
    pub reported: BTreeMap<u64, BTreeSet<u32>>,
    pub latest_metrics: BTreeMap<String, f64>,
    pub counters: JobCounters,
}

/// One sealed GRPO step as stored: its prompt keys in order, and its groups unless pruned.
#[derive(Debug, Clone, Default)]
pub struct SealedStep {
    pub keys: Vec<PromptKey>,
    pub groups: Vec<Arc<RolloutGroup>>,
}

/// Everything stored about one job, to resume it.
#[derive(Debug, Clone)]
pub struct ResumedJob {
    pub config_toml: String,
    pub samples: Vec<Bytes>,
    pub record: JobRecord,
    pub sealed: Vec<SealedStep>,
}

impl Job {
    pub(super) fn record(&self) -> JobRecord {
        JobRecord {
            job_id: self.id,
            state: self.state,
            message: self.message.clone(),
            policy_version: self.policy_version,
            steps_completed: self.steps_completed,
            next_fresh: self.rollouts.as_ref().map_or(0, |r| r.next_fresh),
            pruned_below: self.rollouts.as_ref().map_or(0, |r| r.pruned_below),
            finish_requested: self.finish_requested.clone(),
            progress: JobProgress {
                reported: self.reported.clone(),
                latest_metrics: self.latest_metrics.clone(),
                counters: self.counters.clone(),
            },
        }
    }

    /// Rebuilds a stored job (see [`RunState::resume`]).
    pub(super) fn resume(stored: ResumedJob) -> Result<Job, StateError> {
        let ResumedJob { config_toml, samples, record, sealed } = stored;
        let id = record.job_id;
        let source = format!("stored config of job {id}");
        let config = medtvt_config::parse_run_config(&config_toml, Path::new(&source), &[])
            .map_err(|e| StateError::InvalidJob(e.to_string()))?;
        let mut job = Job::new(id, config, Arc::new(samples))?;
        job.state = record.state;
        job.message = record.message;
        job.policy_version = record.policy_version;
        job.steps_completed = record.steps_completed;
        job.finish_requested = record.finish_requested;
        job.reported = record.progress.reported;
        job.latest_metrics = record.progress.latest_metrics;
        job.counters = record.progress.counters;
        let stored_steps = sealed.len() as u64;
        if let Some(r) = &mut job.rollouts {
            if stored_steps < job.steps_completed {
                return Err(StateError::InvalidJob(format!(
                    "job {id}: {} steps completed but only {stored_steps} sealed steps stored",
                    job.steps_completed
                )));
            }
            r.next_fresh = record.next_fresh;
            r.pruned_below = record.pruned_below;
            r.accepted = sealed.iter().flat_map(|s| s.keys.iter().copied()).collect();
            // Everything handed out but not in a sealed step was leased, or accepted and
            // waiting: none of it survived, so it is leased again, oldest first.
            for position in 0..r.next_fresh {
                let (prompt_id, epoch) = job.order.at(position);
                let key = PromptKey { prompt_id, epoch };
                if !r.accepted.contains(&key) {
                    r.requeued.push_back(key);
                }
            }
            r.steps = sealed.into_iter().map(|s| s.groups).collect();
        } else if stored_steps > 0 {
            return Err(StateError::InvalidJob(format!(
                "job {id} is not a GRPO job but has {stored_steps} sealed steps stored"
            )));
        }
        Ok(job)
    }
}

impl RunState {
    /// Rebuilds a run from what the durable store recorded (see the module doc): the jobs in id
    /// order, RUNNING and QUEUED ones continuing. No workers, leases or rendezvous rounds: the
    /// processes register again.
    pub fn resume(options: StateOptions, jobs: Vec<ResumedJob>, ids: IdCounters) -> Result<Self, StateError> {
        let mut st = RunState::new(options);
        for stored in jobs {
            // What the store holds now: the first drain writes only what differs from it.
            st.written.insert(stored.record.job_id, stored.record.clone());
            let job = Job::resume(stored)?;
            let id = job.id;
            if id.0 >= ids.next_job {
                return Err(StateError::InvalidJob(format!(
                    "stored job {id} is not below the stored next job id {}",
                    ids.next_job
                )));
            }
            match job.state {
                JobState::Running if st.running.is_some() => {
                    return Err(StateError::InvalidJob(format!(
                        "stored jobs {} and {id} are both RUNNING",
                        st.running.map_or(0, |j| j.0)
                    )));
                }
                JobState::Running => st.running = Some(id),
                JobState::Queued => st.queue.push_back(id),
                _ => {}
            }
            st.jobs.insert(id, job);
        }
        st.next_job = ids.next_job;
        st.next_worker = ids.next_worker;
        st.next_lease = ids.next_lease;
        st.written_ids = ids;
        st.start_next();
        Ok(st)
    }

    /// The durable records since the last call, in order; then the job records and the id
    /// counters that differ from the ones last drained.
    pub fn drain_journal(&mut self) -> Vec<Durable> {
        let mut out = std::mem::take(&mut self.journal);
        // What to persist is computed: each job's record as it is now, where it differs from the
        // one last handed out, so that no transition has to remember to flag its job.
        for (id, job) in &self.jobs {
            let record = job.record();
            if self.written.get(id) != Some(&record) {
                self.written.insert(*id, record.clone());
                out.push(Durable::Job(record));
            }
        }
        let ids = self.ids();
        if ids != self.written_ids {
            self.written_ids = ids;
            out.push(Durable::Ids(ids));
        }
        out
    }

    pub fn ids(&self) -> IdCounters {
        IdCounters { next_job: self.next_job, next_worker: self.next_worker, next_lease: self.next_lease }
    }

    /// Everything a long-poll may wait for, summarised: the service wakes its long-polls when this
    /// differs before and after a transition. Computed from the state, so that no transition has
    /// to remember to announce itself.
    pub fn wake_key(&self) -> WakeKey {
        let jobs = self
            .jobs
            .values()
            .map(|job| JobWake {
                id: job.id.0,
                state: job.state,
                policy_version: job.policy_version,
                steps_completed: job.steps_completed,
                step_reports: job.reported.values().map(|ranks| ranks.len() as u64).sum(),
                rollouts: job.rollouts.as_ref().map(|r| {
                    [
                        r.next_fresh,
                        r.requeued.len() as u64,
                        r.leases.len() as u64,
                        r.ready.len() as u64,
                        r.assembling.len() as u64,
                        r.steps.len() as u64,
                    ]
                }),
                learner_group: (
                    job.group.epoch,
                    job.group.forming.is_some(),
                    job.group.forming.as_ref().map_or(0, |f| f.joined.len()),
                ),
            })
            .collect();
        WakeKey {
            shutting_down: self.shutting_down,
            running: self.running.map(|id| id.0),
            alive_workers: self.workers.values().filter(|w| w.alive).count(),
            rendezvous_payloads: self.rendezvous.values().flat_map(|r| &r.payloads).filter(|p| p.is_some()).count(),
            jobs,
        }
    }
}

/// What long-polls wait on (see [`RunState::wake_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeKey {
    shutting_down: bool,
    running: Option<u64>,
    alive_workers: usize,
    rendezvous_payloads: usize,
    jobs: Vec<JobWake>,
}

/// One job's part of a [`WakeKey`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct JobWake {
    id: u64,
    state: JobState,
    policy_version: u64,
    steps_completed: u64,
    /// Step reports received for steps not yet completed.
    step_reports: u64,
    /// GRPO queues: next fresh prompt, requeued, leases, ready, assembling, sealed steps.
    rollouts: Option<[u64; 6]>,
    /// The learner group: epoch, whether a new one is forming, and how many asked for a seat.
    learner_group: (u64, bool, usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::*;

    #[test]
    fn the_wake_key_moves_with_what_long_polls_wait_for_and_not_with_heartbeats() {
        let (mut st, now, w, job) = grpo_state(10);
        let key = st.wake_key();
        st.touch(now + Duration::from_secs(1), w).unwrap();
        assert_eq!(st.wake_key(), key, "a heartbeat wakes nobody");
        let grant = st.lease(now, w, job, 1).unwrap();
        let leased = st.wake_key();
        assert_ne!(leased, key, "a lease changes what is left to lease");
        let k = keys(&grant)[0];
        st.submit_group(now, group(w, job, grant.lease_id.unwrap(), k, 0, [1.0, 0.0])).unwrap();
        assert_ne!(st.wake_key(), leased, "an accepted group is something a learner waits for");
        let before_cancel = st.wake_key();
        st.cancel_job(job).unwrap();
        assert_ne!(st.wake_key(), before_cancel);
    }

    /// What a store would hold after applying `records`, as [`RunState::resume`] takes it.
    fn stored(records: Vec<Durable>) -> (Vec<ResumedJob>, IdCounters) {
        let mut jobs: BTreeMap<JobId, ResumedJob> = BTreeMap::new();
        let mut ids = IdCounters { next_job: 1, next_worker: 1, next_lease: 1 };
        for record in records {
            match record {
                Durable::JobQueued { job_id, config_toml, samples } => {
                    let record = JobRecord {
                        job_id,
                        state: JobState::Queued,
                        message: String::new(),
                        policy_version: 0,
                        steps_completed: 0,
                        next_fresh: 0,
                        pruned_below: 0,
                        finish_requested: None,
                        progress: JobProgress::default(),
                    };
                    jobs.insert(
                        job_id,
                        ResumedJob { config_toml, samples: samples.to_vec(), record, sealed: Vec::new() },
                    );
                }
                Durable::Job(r) => {
                    let id = r.job_id;
                    jobs.get_mut(&id).unwrap().record = r;
                }
                Durable::StepSealed { job_id, step, groups } => {
                    let sealed = &mut jobs.get_mut(&job_id).unwrap().sealed;
                    assert_eq!(sealed.len() as u64, step, "steps are sealed in order");
                    let keys = groups.iter().map(|g| PromptKey { prompt_id: g.prompt_id, epoch: g.epoch }).collect();
                    sealed.push(SealedStep { keys, groups });
                }
                Durable::StepsPruned { job_id, below } => {
                    for step in &mut jobs.get_mut(&job_id).unwrap().sealed[..below as usize] {
                        step.groups.clear();
                    }
                }
                Durable::Ids(i) => ids = i,
            }
        }
        (jobs.into_values().collect(), ids)
    }

    #[test]
    fn a_resumed_state_continues_where_the_journal_ends() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 5).unwrap();
        let k = keys(&grant);
        for key in &k[..4] {
            st.submit_group(now, group(w, job, grant.lease_id.unwrap(), *key, 0, [0.0, 1.0])).unwrap();
        }
        for rank in 0..2 {
            st.pull_batch(job, rank, 2, 0).unwrap();
            st.report_step(job, rank, 0, BTreeMap::from([("loss".into(), 0.5)]), 1).unwrap();
        }
        let step1 = st.pull_batch(job, 0, 2, 1).unwrap();
        st.report_step(job, 0, 1, BTreeMap::new(), 2).unwrap();
        let (jobs, ids) = stored(st.drain_journal());

        let mut resumed = RunState::resume(StateOptions::default(), jobs, ids).unwrap();
        let (before, after) = (&st.snapshot(None).unwrap()[0], &resumed.snapshot(None).unwrap()[0]);
        assert_eq!((after.state, after.steps_completed, after.policy_version), (JobState::Running, 1, 2));
        assert_eq!((&after.latest_metrics, &after.counters), (&before.latest_metrics, &before.counters));
        let shard = |outcome: BatchOutcome| match outcome {
            BatchOutcome::Groups { groups, .. } => groups,
            other => panic!("{other:?}"),
        };
        assert_eq!(shard(resumed.pull_batch(job, 0, 2, 1).unwrap()), shard(step1), "the sealed step is the same shard");
        assert!(resumed.touch(now, w).is_err(), "workers register again");
        let w2 = resumed.register(now, Role::RolloutWorker, "w2".into(), 0, 0);
        assert!(w2 > w);
        // The unsubmitted fifth prompt is leased again first; then fresh ones.
        let again = resumed.lease(now, w2, job, 2).unwrap();
        assert!(again.lease_id > grant.lease_id);
        assert_eq!(keys(&again)[0], k[4]);
        assert!(!k.contains(&keys(&again)[1]));
        // Rank 0's report of step 1 survived: rank 1's completes it.
        assert_eq!(resumed.report_step(job, 1, 1, BTreeMap::new(), 2).unwrap(), 2);
    }

    /// A transition nobody flagged (a group accepted changes only the job's counters) still
    /// reaches the journal, because the record to persist is computed; an unchanged state
    /// journals nothing.
    #[test]
    fn the_journal_holds_what_changed_without_any_flag() {
        let (mut st, now, w, job) = grpo_state(10);
        st.drain_journal();
        assert!(st.drain_journal().is_empty(), "nothing changed");
        let grant = st.lease(now, w, job, 1).unwrap();
        let lease_records = st.drain_journal();
        assert!(lease_records.iter().any(|r| matches!(r, Durable::Ids(_))), "a lease id was handed out");
        let key = keys(&grant)[0];
        st.submit_group(now, group(w, job, grant.lease_id.unwrap(), key, 0, [0.0, 1.0])).unwrap();
        let records = st.drain_journal();
        let accepted = records.iter().find_map(|r| match r {
            Durable::Job(record) if record.job_id == job => Some(record.progress.counters.groups_accepted),
            _ => None,
        });
        assert_eq!(accepted, Some(1), "{records:?}");
        assert!(st.drain_journal().is_empty());
    }
}
