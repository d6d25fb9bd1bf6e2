//! The learner group of a job whose `cluster.on_learner_loss` is `shrink` or `wait`: which
//! learner processes train it now and in which rank order (an epoch of the group), and the
//! forming of the next epoch when a rank is lost or a replacement joins.
//!
//! A group forms from the learners that ask for a seat (`join_group`). The first one waits for
//! every rank of `cluster.learners`. A later one starts when a member says its group broke (a
//! collective failed or timed out), when a member stops heart-beating, or when a learner that is
//! not a member asks (a replacement, or a member left out earlier). It waits for each member of
//! the old group until that member asks too, stops heart-beating, or `cluster.collective_timeout_s`
//! passes since the group broke and since the member's last progress (the step and phase its
//! heartbeats carry: a rank still computing its step comes, a hung one does not); under `wait`, a
//! lost member's place is then held for a replacement with the same slot (the learner's
//! `--rank`) until `cluster.replacement_timeout_s`. While a group forms, calls
//! that name the old epoch get `STALE_GROUP`, so every member comes to ask at its next call.
//!
//! Members are ordered by the optimizer steps they hold, most first: rank 0 of the new group holds
//! the newest state and broadcasts it to the others. A member ahead of the coordinator's count
//! completed a step whose collective finished everywhere it reached (a step is applied only after
//! all its collectives succeeded), so the group resumes from there and those steps count as
//! completed; reports of unfinished steps are dropped and the interrupted step is redone by the
//! new group, on the same batch resharded over its ranks.

use super::*;
use medtvt_config::{LearnerLossPolicy, ReplacementTimeout};
use std::cmp::Reverse;

/// A learner process in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Member {
    pub worker: WorkerId,
    /// The learner's `--rank`: a replacement takes the place of the lost member of its slot.
    pub slot: u32,
    /// Optimizer steps the learner held when it asked.
    pub step: u64,
}

/// A job's learner group.
#[derive(Debug, Default)]
pub(super) struct LearnerGroup {
    /// 0 until the first group formed.
    pub epoch: u64,
    /// The members in rank order.
    pub members: Vec<Member>,
    pub forming: Option<Forming>,
    /// Members left out of a new group, over the job.
    pub lost: u64,
}

#[derive(Debug)]
pub(super) struct Forming {
    started: Instant,
    /// The slots the new group waits for, with the old member's worker (none for the first group).
    expected: BTreeMap<u32, Option<WorkerId>>,
    pub(super) joined: BTreeMap<WorkerId, Member>,
}

/// What a learner asking for its seat is told.
#[derive(Debug, Clone, PartialEq)]
pub enum GroupSeat {
    /// The group has not formed yet: ask again.
    Pending,
    /// The job has ended.
    Done(JobState),
    Seat {
        epoch: u64,
        rank: u32,
        world_size: u32,
        resume_step: u64,
    },
}

impl LearnerGroup {
    fn seat_of(&self, worker: WorkerId) -> Option<GroupSeat> {
        let rank = self.members.iter().position(|m| m.worker == worker)?;
        Some(GroupSeat::Seat {
            epoch: self.epoch,
            rank: rank as u32,
            world_size: self.members.len() as u32,
            resume_step: self.members[0].step,
        })
    }

    fn start_forming(&mut self, now: Instant, learners: u32) {
        if self.forming.is_some() {
            return;
        }
        let expected = if self.epoch == 0 {
            (0..learners).map(|slot| (slot, None)).collect()
        } else {
            self.members.iter().map(|m| (m.slot, Some(m.worker))).collect()
        };
        self.forming = Some(Forming { started: now, expected, joined: BTreeMap::new() });
    }
}

impl RunState {
    /// A learner (`worker`, started as `--rank slot`, holding `step` optimizer steps) asks for its
    /// seat in job `id`'s learner group, leaving epoch `after_epoch` (0 = none).
    pub fn join_group(
        &mut self,
        now: Instant,
        id: JobId,
        worker: WorkerId,
        slot: u32,
        step: u64,
        after_epoch: u64,
    ) -> Result<GroupSeat, StateError> {
        let job = self.jobs.get_mut(&id).ok_or(StateError::UnknownJob(id))?;
        match job.state {
            JobState::Running => {}
            JobState::Queued => return Err(StateError::JobNotRunning { job: id, state: job.state }),
            state => return Ok(GroupSeat::Done(state)),
        }
        let learners = job.config.cluster.learners;
        if job.config.cluster.on_learner_loss == LearnerLossPolicy::Fail {
            return Err(StateError::BadRank(format!(
                "job {id} has cluster.on_learner_loss = \"fail\": its learners form no group"
            )));
        }
        if slot >= learners {
            return Err(StateError::BadRank(format!(
                "rank {slot} is not below job {id}'s cluster.learners = {learners}"
            )));
        }
        let group = &mut job.group;
        if group.forming.is_none() {
            if let Some(seat) = group.seat_of(worker).filter(|_| after_epoch < group.epoch) {
                return Ok(seat);
            }
            group.start_forming(now, learners);
        }
        if let Some(forming) = &mut group.forming {
            forming.joined.insert(worker, Member { worker, slot, step });
        }
        self.advance_group(now, id);
        let group = &self.jobs[&id].group;
        Ok(match (&group.forming, group.seat_of(worker)) {
            (None, Some(seat)) => seat,
            _ => GroupSeat::Pending,
        })
    }

    /// Refuses a call made for a learner group that is no longer job `id`'s (epoch 0: the caller
    /// is in no group, as under `on_learner_loss = "fail"`).
    pub fn check_group(&self, id: JobId, epoch: u64) -> Result<(), StateError> {
        let job = self.jobs.get(&id).ok_or(StateError::UnknownJob(id))?;
        if epoch == 0 || job.state != JobState::Running {
            return Ok(());
        }
        let group = &job.group;
        if group.forming.is_some() || group.epoch != epoch {
            let now = if group.forming.is_some() {
                "a new group is forming".to_string()
            } else {
                format!("now {}", group.epoch)
            };
            return Err(StateError::StaleGroup(format!(
                "learner group {epoch} of job {id} was replaced ({now}): ask for a seat in the new one"
            )));
        }
        Ok(())
    }

    /// Members of the running job's group that stopped heart-beating start a new group.
    pub(super) fn on_learners_dead(&mut self, now: Instant, dead: &[WorkerId]) {
        let Some(job) = self.running.and_then(|id| self.jobs.get_mut(&id)) else { return };
        if job.config.cluster.on_learner_loss == LearnerLossPolicy::Fail || job.group.epoch == 0 {
            return;
        }
        if job.group.members.iter().any(|m| dead.contains(&m.worker)) && job.group.forming.is_none() {
            job.group.start_forming(now, job.config.cluster.learners);
        }
    }

    /// Completes the forming group of job `id` once every awaited member asked or is given up
    /// on. Returns whether it did.
    pub(super) fn advance_group(&mut self, now: Instant, id: JobId) -> bool {
        let Some(job) = self.jobs.get_mut(&id) else { return false };
        let Some(forming) = &job.group.forming else { return false };
        let cluster = &job.config.cluster;
        let window = Duration::from_secs_f64(cluster.collective_timeout_s);
        let hold = Duration::from_secs_f64(cluster.replacement_timeout_s);
        let waited = now.saturating_duration_since(forming.started);
        let first = job.group.epoch == 0;
        let mut lost = Vec::new();
        for (slot, old) in &forming.expected {
            if forming.joined.values().any(|m| m.slot == *slot) {
                continue;
            }
            let worker = old.and_then(|w| self.workers.get(&w)).filter(|w| w.alive);
            // A member still heart-beating is waited for until `window` after the later of the
            // group breaking and its last progress: a slow rank finishing its step's compute
            // comes; a hung one (its phase stuck) is left out like a dead one.
            let stuck =
                worker.is_none_or(|w| now.saturating_duration_since(w.phase_since.max(forming.started)) >= window);
            let given_up = !first && stuck;
            let held = cluster.on_learner_loss == LearnerLossPolicy::Wait && waited < hold;
            if !given_up || held {
                return false;
            }
            lost.push(*slot);
        }
        if forming.joined.is_empty() {
            return false;
        }
        let waiting = cluster.on_learner_loss == LearnerLossPolicy::Wait;
        if waiting && !lost.is_empty() && cluster.on_replacement_timeout == ReplacementTimeout::Fail {
            let message = format!(
                "learner rank(s) {lost:?} lost and not replaced within cluster.replacement_timeout_s = {}",
                cluster.replacement_timeout_s
            );
            self.end_job(id, JobState::Failed, message);
            return true;
        }
        let mut members: Vec<Member> = forming.joined.values().copied().collect();
        members.sort_by_key(|m| (Reverse(m.step), m.slot, m.worker));
        let resume = members[0].step.min(job.total_steps);
        let group = &mut job.group;
        group.epoch += 1;
        group.forming = None;
        group.lost += lost.len() as u64;
        group.members = members;
        job.world_size = group.members.len() as u32;
        // Unfinished steps are redone by the new group; steps a member holds are complete.
        job.reported.clear();
        while job.steps_completed < resume {
            if let Some(r) = &job.rollouts {
                job.counters.groups_trained += r.steps.get(job.steps_completed as usize).map_or(0, |s| s.len()) as u64;
            }
            self.events.push(Event::StepCompleted {
                job_id: id,
                step: job.steps_completed,
                policy_version: job.policy_version,
            });
            job.steps_completed += 1;
        }
        self.events.push(Event::LearnerGroupFormed {
            job_id: id,
            epoch: job.group.epoch,
            learners: job.world_size,
            resume_step: resume,
            lost_slots: lost,
        });
        self.maybe_succeed(id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::*;

    fn grouped(policy: &str) -> (RunState, Instant, JobId, [WorkerId; 2]) {
        let mut st = RunState::new(StateOptions::default());
        let extra =
            format!("on_learner_loss = \"{policy}\"\ncollective_timeout_s = 2.0\nreplacement_timeout_s = 10.0\n");
        let job = st.enqueue(config("pt", &extra), samples(8)).unwrap();
        let now = Instant::now();
        let a = st.register(now, Role::Learner, "a".into(), 0, 2);
        let b = st.register(now, Role::Learner, "b".into(), 1, 2);
        assert_eq!(st.join_group(now, job, a, 0, 0, 0).unwrap(), GroupSeat::Pending);
        let seat = st.join_group(now, job, b, 1, 0, 0).unwrap();
        assert_eq!(seat, GroupSeat::Seat { epoch: 1, rank: 1, world_size: 2, resume_step: 0 });
        assert_eq!(
            st.join_group(now, job, a, 0, 0, 0).unwrap(),
            GroupSeat::Seat { epoch: 1, rank: 0, world_size: 2, resume_step: 0 }
        );
        (st, now, job, [a, b])
    }

    fn shard_len(st: &mut RunState, job: JobId, rank: u32, world: u32, step: u64) -> usize {
        match st.pull_batch(job, rank, world, step).unwrap() {
            BatchOutcome::Samples { samples, .. } => samples.len(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lost_rank_shrinks_the_group_after_the_window_and_the_batch_is_resharded() {
        let (mut st, now, job, [a, _b]) = grouped("shrink");
        st.report_step(job, 0, 0, BTreeMap::new(), 1).unwrap();
        st.report_step(job, 1, 0, BTreeMap::new(), 1).unwrap();
        // Rank 0 reported step 1; rank 1 died before it did. Rank 0's collective broke.
        st.report_step(job, 0, 1, BTreeMap::new(), 2).unwrap();
        assert_eq!(st.join_group(now, job, a, 0, 1, 1).unwrap(), GroupSeat::Pending);
        assert!(matches!(st.check_group(job, 1), Err(StateError::StaleGroup(_))));
        assert!(!st.advance_group(now + Duration::from_millis(1900), job));
        assert!(st.advance_group(now + Duration::from_secs(2), job));
        let seat = st.join_group(now, job, a, 0, 1, 1).unwrap();
        assert_eq!(seat, GroupSeat::Seat { epoch: 2, rank: 0, world_size: 1, resume_step: 1 });
        st.check_group(job, 2).unwrap();
        // The interrupted step 1 is redone by one rank on the whole batch.
        assert_eq!(shard_len(&mut st, job, 0, 1, 1), 4);
        let snap = &st.snapshot(Some(job)).unwrap()[0];
        assert_eq!(snap.steps_completed, 1, "step 1 was not reported by every rank: it is redone");
        st.report_step(job, 0, 1, BTreeMap::new(), 2).unwrap();
        assert_eq!(st.snapshot(Some(job)).unwrap()[0].steps_completed, 2);
        assert!(st
            .drain_events()
            .iter()
            .any(|e| matches!(e, Event::LearnerGroupFormed { epoch: 2, lost_slots, .. } if lost_slots == &[1])));
    }

    #[test]
    fn a_member_ahead_of_the_count_completes_its_step_and_leads_the_new_group() {
        let (mut st, now, job, [a, b]) = grouped("shrink");
        // Both applied step 0, only rank 1 reported it; rank 0 holds 1 step, rank 1 too.
        st.report_step(job, 1, 0, BTreeMap::new(), 1).unwrap();
        let c = st.register(now, Role::Learner, "c".into(), 0, 2);
        // A replacement for slot 0 (say rank 0 restarted from a checkpoint at step 0).
        assert_eq!(st.join_group(now, job, c, 0, 0, 0).unwrap(), GroupSeat::Pending);
        // Rank 1 comes: both slots are there, the old rank 0 (`a`) is left out.
        assert_eq!(
            st.join_group(now, job, b, 1, 1, 1).unwrap(),
            GroupSeat::Seat { epoch: 2, rank: 0, world_size: 2, resume_step: 1 }
        );
        assert_eq!(
            st.join_group(now, job, c, 0, 0, 0).unwrap(),
            GroupSeat::Seat { epoch: 2, rank: 1, world_size: 2, resume_step: 1 }
        );
        assert_eq!(st.snapshot(Some(job)).unwrap()[0].steps_completed, 1);
        // The left-out old rank 0, if it comes back, starts a group that grows back to it.
        assert_eq!(st.join_group(now, job, a, 0, 0, 1).unwrap(), GroupSeat::Pending);
        assert!(matches!(st.check_group(job, 2), Err(StateError::StaleGroup(_))));
    }

    #[test]
    fn a_member_that_makes_progress_is_waited_for_and_a_hung_one_is_not() {
        let (mut st, now, job, [a, b]) = grouped("shrink");
        st.join_group(now, job, a, 0, 0, 1).unwrap();
        // `b` is still computing: its heartbeat says it entered `train` 1 s after the break.
        st.record_progress(now + Duration::from_secs(1), b, 0, "train");
        assert!(!st.advance_group(now + Duration::from_millis(2500), job));
        assert!(st.advance_group(now + Duration::from_secs(3), job), "2 s after its last progress it is hung");
        assert!(matches!(st.join_group(now, job, a, 0, 0, 1).unwrap(), GroupSeat::Seat { world_size: 1, .. }));
    }

    #[test]
    fn wait_holds_a_lost_slot_for_a_replacement() {
        let (mut st, now, job, [a, b]) = grouped("wait");
        st.join_group(now, job, a, 0, 0, 1).unwrap();
        st.workers.get_mut(&b).unwrap().alive = false;
        assert!(!st.advance_group(now + Duration::from_secs(5), job), "held for a replacement");
        let c = st.register(now, Role::Learner, "c".into(), 1, 2);
        st.join_group(now + Duration::from_secs(6), job, c, 1, 0, 0).unwrap();
        let seat = st.join_group(now + Duration::from_secs(6), job, a, 0, 0, 1).unwrap();
        assert_eq!(seat, GroupSeat::Seat { epoch: 2, rank: 0, world_size: 2, resume_step: 0 });
        // Without a replacement the survivors carry on after the hold.
        st.workers.get_mut(&c).unwrap().alive = false;
        st.on_learners_dead(now, &[c]);
        st.join_group(now, job, a, 0, 0, 2).unwrap();
        assert!(!st.advance_group(now + Duration::from_secs(9), job));
        assert!(st.advance_group(now + Duration::from_secs(10), job));
    }

    #[test]
    fn wait_can_fail_the_job_when_no_replacement_comes() {
        let mut st = RunState::new(StateOptions::default());
        let extra = "on_learner_loss = \"wait\"\nreplacement_timeout_s = 5.0\non_replacement_timeout = \"fail\"\n";
        let job = st.enqueue(config("pt", extra), samples(8)).unwrap();
        let now = Instant::now();
        let a = st.register(now, Role::Learner, "a".into(), 0, 2);
        let b = st.register(now, Role::Learner, "b".into(), 1, 2);
        st.join_group(now, job, a, 0, 0, 0).unwrap();
        st.join_group(now, job, b, 1, 0, 0).unwrap();
        st.workers.get_mut(&b).unwrap().alive = false;
        st.on_learners_dead(now, &[b]);
        st.join_group(now, job, a, 0, 0, 1).unwrap();
        assert!(!st.advance_group(now + Duration::from_secs(4), job));
        assert!(st.advance_group(now + Duration::from_secs(5), job));
        assert_eq!(st.job_state(job).unwrap(), JobState::Failed);
        assert_eq!(st.join_group(now, job, a, 0, 0, 1).unwrap(), GroupSeat::Done(JobState::Failed));
    }

    #[test]
    fn a_late_joiner_grows_the_group_back() {
        let (mut st, now, job, [a, _b]) = grouped("shrink");
        st.join_group(now, job, a, 0, 0, 1).unwrap();
        st.advance_group(now + Duration::from_secs(3), job);
        assert!(matches!(st.join_group(now, job, a, 0, 0, 1).unwrap(), GroupSeat::Seat { world_size: 1, .. }));
        let c = st.register(now, Role::Learner, "c".into(), 1, 2);
        assert_eq!(st.join_group(now, job, c, 1, 0, 0).unwrap(), GroupSeat::Pending);
        assert!(matches!(st.check_group(job, 2), Err(StateError::StaleGroup(_))), "members come at their next call");
        let seat = st.join_group(now, job, a, 0, 0, 2).unwrap();
        assert_eq!(seat, GroupSeat::Seat { epoch: 3, rank: 0, world_size: 2, resume_step: 0 });
    }

    /// Three ranks lose one: the same 3-sample batch is split 1 + 2 over the two left, disjoint
    /// and complete (the trainer's global normalisation makes uneven shards exact).
    #[test]
    fn a_batch_is_resharded_unevenly_over_a_group_that_does_not_divide_it() {
        let mut st = RunState::new(StateOptions::default());
        let extra = "on_learner_loss = \"shrink\"\ncollective_timeout_s = 2.0\n";
        let mut cfg = config("pt", extra);
        (cfg.cluster.learners, cfg.train.batch_size) = (3, 3);
        let job = st.enqueue(cfg, samples(9)).unwrap();
        let now = Instant::now();
        let w: Vec<WorkerId> = (0..3).map(|r| st.register(now, Role::Learner, format!("l{r}"), r, 3)).collect();
        for (slot, worker) in w.iter().enumerate() {
            st.join_group(now, job, *worker, slot as u32, 0, 0).unwrap();
        }
        let whole: Vec<Bytes> = (0..3)
            .flat_map(|r| match st.pull_batch(job, r, 3, 0).unwrap() {
                BatchOutcome::Samples { samples, .. } => samples,
                other => panic!("{other:?}"),
            })
            .collect();
        st.join_group(now, job, w[0], 0, 0, 1).unwrap();
        st.join_group(now, job, w[2], 2, 0, 1).unwrap();
        st.workers.get_mut(&w[1]).unwrap().alive = false;
        assert!(st.advance_group(now, job));
        let shards: Vec<Vec<Bytes>> = (0..2)
            .map(|r| match st.pull_batch(job, r, 2, 0).unwrap() {
                BatchOutcome::Samples { samples, .. } => samples,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!((shards[0].len(), shards[1].len()), (1, 2));
        assert_eq!(shards.concat(), whole, "the same batch, in the same order");
    }

    #[test]
    fn under_fail_there_is_no_group() {
        let mut st = RunState::new(StateOptions::default());
        let job = st.enqueue(config("pt", ""), samples(8)).unwrap();
        let a = st.register(Instant::now(), Role::Learner, "a".into(), 0, 2);
        assert!(matches!(st.join_group(Instant::now(), job, a, 0, 0, 0), Err(StateError::BadRank(_))));
        st.check_group(job, 0).unwrap();
    }
}
