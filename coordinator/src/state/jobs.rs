//! Jobs: loading a submitted job, the FIFO (enqueue, start, end, cancel, shutdown) and what a
//! process polling for work is told.

use super::*;

/// A submitted job with its config checked and its dataset read.
#[derive(Debug, Clone)]
pub struct LoadedJob {
    pub config: RunConfig,
    pub samples: Vec<Bytes>,
    /// Samples left out because a modality file they name is broken (see `dataset.rs`).
    pub skipped: Vec<SkippedSample>,
}

/// Parses and validates a submitted config (overrides applied) and reads its dataset, checking
/// every sample's modality files (`data.strict` refuses the job at the first broken one). Does
/// file I/O: call it outside the state lock. Errors name the file and line or the config key.
pub fn load_job(config_toml: &str, overrides: &[String]) -> Result<LoadedJob, StateError> {
    let config = medtvt_config::parse_run_config(config_toml, Path::new("submitted config"), overrides)
        .map_err(|e| StateError::InvalidJob(e.to_string()))?;
    let loaded = dataset::load_samples(&config.data.dir, config.run.stage, config.data.strict)
        .map_err(|e| StateError::InvalidJob(e.to_string()))?;
    Ok(LoadedJob { config, samples: loaded.samples, skipped: loaded.skipped })
}

/// What a process polling for work is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Assignment {
    Job {
        job_id: JobId,
        name: String,
        stage: Stage,
        config_toml: String,
    },
    Shutdown,
    /// Nothing yet: poll again.
    Wait,
}

impl Job {
    /// A queued job, once its config is checked against the cluster. Errors name the key.
    pub(super) fn new(id: JobId, config: RunConfig, samples: Arc<Vec<Bytes>>) -> Result<Job, StateError> {
        let invalid =
            |key: &str, problem: String| Err(StateError::InvalidJob(format!("job {id} config: `{key}` {problem}")));
        let world_size = config.cluster.learners;
        if samples.is_empty() {
            return invalid("data.dir", "holds no samples for this stage".into());
        }
        let rollouts = match (&config.grpo, config.run.stage) {
            (Some(g), Stage::Grpo) => {
                if g.prompts_per_step % world_size != 0 {
                    return invalid(
                        "grpo.prompts_per_step",
                        format!("= {} is not divisible by cluster.learners = {world_size}", g.prompts_per_step),
                    );
                }
                Some(Rollouts {
                    group_size: g.group_size,
                    prompts_per_step: g.prompts_per_step as u64,
                    max_staleness: g.max_staleness as u64,
                    filter_tied_groups: g.filter_tied_groups,
                    lease_timeout: Duration::from_secs_f64(config.cluster.lease_timeout_s),
                    next_fresh: 0,
                    requeued: VecDeque::new(),
                    leases: HashMap::new(),
                    expired_leases: HashSet::new(),
                    accepted: HashSet::new(),
                    ready: VecDeque::new(),
                    assembling: Vec::new(),
                    steps: Vec::new(),
                    pruned_below: 0,
                    retain_steps: config.train.checkpoint_every,
                    last_step_lag: 0,
                })
            }
            (None, Stage::Grpo) => return invalid("grpo", "is required for a GRPO job".into()),
            _ => {
                if !config.train.batch_size.is_multiple_of(world_size as usize) {
                    return invalid(
                        "train.batch_size",
                        format!("= {} is not divisible by cluster.learners = {world_size}", config.train.batch_size),
                    );
                }
                None
            }
        };
        let config_toml =
            toml::to_string(&config).map_err(|e| StateError::InvalidJob(format!("job {id} config: {e}")))?;
        Ok(Job {
            id,
            order: EpochOrder::new(config.run.seed, samples.len()),
            samples,
            config_toml,
            state: JobState::Queued,
            message: String::new(),
            world_size,
            total_steps: config.train.steps,
            policy_version: 0,
            reported: BTreeMap::new(),
            steps_completed: 0,
            finish_requested: None,
            latest_metrics: BTreeMap::new(),
            counters: JobCounters::default(),
            rollouts,
            group: Default::default(),
            config,
        })
    }

    pub(super) fn stage(&self) -> Stage {
        self.config.run.stage
    }
}

impl RunState {
    /// Queues a job whose config and samples are loaded (see [`load_job`]), starting it when
    /// nothing runs. Errors name the config key.
    pub fn enqueue(&mut self, config: RunConfig, samples: Vec<Bytes>) -> Result<JobId, StateError> {
        if self.shutting_down {
            return Err(StateError::ShuttingDown);
        }
        let id = JobId(self.next_job);
        let job = Job::new(id, config, Arc::new(samples))?;
        self.next_job += 1;
        self.events.push(Event::JobQueued { job_id: id, name: job.config.run.name.clone(), stage: job.stage() });
        self.journal.push(Durable::JobQueued {
            job_id: id,
            config_toml: job.config_toml.clone(),
            samples: job.samples.clone(),
        });
        self.jobs.insert(id, job);
        self.queue.push_back(id);
        self.start_next();
        Ok(id)
    }

    /// [`RunState::enqueue`] for a job from [`load_job`]: also records the skipped samples (one
    /// event each, and the job's `samples_skipped` counter).
    pub fn enqueue_loaded(&mut self, loaded: LoadedJob) -> Result<JobId, StateError> {
        let LoadedJob { config, samples, skipped } = loaded;
        let id = self.enqueue(config, samples)?;
        if let Some(job) = self.jobs.get_mut(&id) {
            job.counters.samples_skipped = skipped.len() as u64;
        }
        for SkippedSample { line, sample, problem } in skipped {
            self.events.push(Event::SampleSkipped { job_id: id, line, sample, problem });
        }
        Ok(id)
    }

    pub(super) fn start_next(&mut self) {
        if self.running.is_some() {
            return;
        }
        if let Some(id) = self.queue.pop_front() {
            if let Some(job) = self.jobs.get_mut(&id) {
                job.state = JobState::Running;
                self.running = Some(id);
                self.events.push(Event::JobStarted { job_id: id });
            }
        }
    }

    pub(super) fn end_job(&mut self, id: JobId, state: JobState, message: String) {
        let Some(job) = self.jobs.get_mut(&id) else { return };
        if job.state.is_terminal() {
            return;
        }
        job.state = state;
        job.message = message.clone();
        if let Some(r) = &mut job.rollouts {
            // Nothing more will be trained: leases are void.
            r.leases.clear();
        }
        self.queue.retain(|q| *q != id);
        self.rendezvous.retain(|(job, _), _| *job != id);
        if self.running == Some(id) {
            self.running = None;
        }
        self.events.push(Event::JobEnded { job_id: id, state, message });
        self.start_next();
    }

    pub fn running_job(&self) -> Option<JobId> {
        self.running
    }

    pub fn job_state(&self, id: JobId) -> Result<JobState, StateError> {
        self.jobs.get(&id).map(|j| j.state).ok_or(StateError::UnknownJob(id))
    }

    /// The running job's policy version (0 when nothing runs).
    pub fn policy_version(&self, id: JobId) -> Result<u64, StateError> {
        self.jobs.get(&id).map(|j| j.policy_version).ok_or(StateError::UnknownJob(id))
    }

    pub fn cancel_job(&mut self, id: JobId) -> Result<JobState, StateError> {
        let state = self.job_state(id)?;
        if !state.is_terminal() {
            self.end_job(id, JobState::Cancelled, "cancelled".into());
        }
        self.job_state(id)
    }

    /// Stop accepting jobs; unless `drain`, cancel the queued and running ones.
    pub fn shutdown(&mut self, drain: bool) {
        self.shutting_down = true;
        self.events.push(Event::ShutdownRequested { drain });
        if !drain {
            let pending: Vec<JobId> = self.running.iter().copied().chain(self.queue.iter().copied()).collect();
            for id in pending {
                self.end_job(id, JobState::Cancelled, "cancelled by shutdown".into());
            }
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Shutting down and nothing left to run: the server may stop.
    pub fn finished(&self) -> bool {
        self.shutting_down && self.running.is_none() && self.queue.is_empty()
    }

    /// What a process that last ran `after` should do next.
    pub fn assignment(&self, after: JobId) -> Assignment {
        if let Some(job) = self.running.and_then(|id| self.jobs.get(&id)) {
            if job.id > after {
                return Assignment::Job {
                    job_id: job.id,
                    name: job.config.run.name.clone(),
                    stage: job.stage(),
                    config_toml: job.config_toml.clone(),
                };
            }
        }
        if self.shutting_down && self.queue.is_empty() {
            Assignment::Shutdown
        } else {
            Assignment::Wait
        }
    }

    pub(super) fn running_job_mut(&mut self, id: JobId) -> Result<&mut Job, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        if job.state != JobState::Running {
            return Err(StateError::JobNotRunning { job: id, state: job.state });
        }
        Ok(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::*;

    #[test]
    fn jobs_run_fifo_and_succeed_after_all_steps_and_finish() {
        let mut st = RunState::new(StateOptions::default());
        st.enqueue(config("pt", ""), samples(4)).unwrap();
        st.enqueue(config("sft", ""), samples(4)).unwrap();
        assert_eq!(st.job_state(JobId(2)).unwrap(), JobState::Queued);
        assert!(matches!(st.assignment(JobId(0)), Assignment::Job { job_id: JobId(1), .. }));
        assert_eq!(st.assignment(JobId(1)), Assignment::Wait);
        for step in 0..3 {
            for rank in 0..2 {
                st.report_step(JobId(1), rank, step, BTreeMap::new(), step + 1).unwrap();
            }
        }
        assert!(matches!(st.finish_job(JobId(1), 1, "c".into(), String::new()), Err(StateError::BadRank(_))));
        assert_eq!(st.finish_job(JobId(1), 0, "ckpt".into(), String::new()).unwrap(), JobState::Succeeded);
        assert_eq!(st.job_state(JobId(2)).unwrap(), JobState::Running);
        assert!(matches!(st.assignment(JobId(1)), Assignment::Job { job_id: JobId(2), .. }));
        st.shutdown(true);
        assert!(!st.finished());
        assert_eq!(st.cancel_job(JobId(2)).unwrap(), JobState::Cancelled);
        assert_eq!(st.assignment(JobId(1)), Assignment::Shutdown);
        assert!(st.finished());
        assert_eq!(st.enqueue(config("pt", ""), samples(1)), Err(StateError::ShuttingDown));
    }

    #[test]
    fn batch_size_not_divisible_by_learners_names_the_field() {
        let mut st = RunState::new(StateOptions::default());
        let err = st.enqueue(config("grpo", "").tap_grpo(3), samples(4)).unwrap_err();
        assert!(
            err.to_string().contains("`grpo.prompts_per_step` = 3 is not divisible by cluster.learners = 2"),
            "{err}"
        );
    }

    #[test]
    fn skipped_samples_are_counted_and_each_logged_as_an_event() {
        let mut st = RunState::new(StateOptions::default());
        let problem = "ecg/enc-3.dat: WFDB signal data: too short".to_string();
        let skipped = vec![SkippedSample { line: 3, sample: "enc-3-dx".into(), problem: problem.clone() }];
        let id = st.enqueue_loaded(LoadedJob { config: config("pt", ""), samples: samples(4), skipped }).unwrap();
        assert_eq!(st.snapshot(Some(id)).unwrap()[0].counters.samples_skipped, 1);
        let events = st.drain_events();
        assert!(
            events.contains(&Event::SampleSkipped { job_id: id, line: 3, sample: "enc-3-dx".into(), problem }),
            "{events:?}"
        );
        // The counter is part of the durable job record, so a resumed coordinator still shows it.
        let records = st.drain_journal();
        assert!(records.iter().any(|r| matches!(r, Durable::Job(rec) if rec.progress.counters.samples_skipped == 1)));
    }
}
