//! Membership: registered processes, heartbeats, and the expiry of silent workers and of leases
//! past their deadline.

use super::*;

#[derive(Debug, Clone)]
pub struct Worker {
    pub name: String,
    pub role: Role,
    pub rank: u32,
    pub world_size: u32,
    pub last_seen: Instant,
    pub alive: bool,
    /// Learners: optimizer steps done and the phase of the training loop, as their last
    /// heartbeat said, and when that phase began.
    pub step: u64,
    pub phase: String,
    pub phase_since: Instant,
}

impl RunState {
    pub(super) fn heartbeat_timeout(&self) -> Duration {
        self.running
            .and_then(|id| self.jobs.get(&id))
            .map_or(self.options.heartbeat_timeout, |j| Duration::from_secs_f64(j.config.cluster.heartbeat_timeout_s))
    }

    /// How often processes should heartbeat: a third of the timeout, at most the default.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.heartbeat_timeout() / 3).min(self.options.heartbeat_interval)
    }

    pub fn register(&mut self, now: Instant, role: Role, name: String, rank: u32, world_size: u32) -> WorkerId {
        let id = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.events.push(Event::WorkerRegistered { worker_id: id, role, name: name.clone() });
        let worker = Worker {
            name,
            role,
            rank,
            world_size,
            last_seen: now,
            alive: true,
            step: 0,
            phase: String::new(),
            phase_since: now,
        };
        self.workers.insert(id, worker);
        id
    }

    /// Records a sign of life; a worker marked dead comes back (its leases are already gone).
    pub fn touch(&mut self, now: Instant, id: WorkerId) -> Result<&Worker, StateError> {
        let worker = self.workers.get_mut(&id).ok_or(StateError::UnknownWorker(id))?;
        worker.last_seen = now;
        worker.alive = true;
        Ok(worker)
    }

    /// Records a learner's training progress (from its heartbeat).
    pub fn record_progress(&mut self, now: Instant, id: WorkerId, step: u64, phase: &str) {
        if let Some(worker) = self.workers.get_mut(&id) {
            if worker.step != step || worker.phase != phase {
                worker.phase_since = now;
            }
            worker.step = step;
            worker.phase = phase.to_string();
        }
    }

    pub fn deregister(&mut self, id: WorkerId) -> Result<usize, StateError> {
        self.workers.remove(&id).ok_or(StateError::UnknownWorker(id))?;
        self.events.push(Event::WorkerLeft { worker_id: id });
        Ok(self.expire_leases_where(|l| l.worker == id))
    }

    pub fn workers(&self) -> impl Iterator<Item = (WorkerId, &Worker)> {
        self.workers.iter().map(|(id, w)| (*id, w))
    }

    /// Marks silent workers dead and expires their leases and every lease past its deadline.
    /// Returns whether anything changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let timeout = self.heartbeat_timeout();
        let mut newly_dead = Vec::new();
        for (id, worker) in self.workers.iter_mut() {
            if worker.alive && now.saturating_duration_since(worker.last_seen) > timeout {
                worker.alive = false;
                newly_dead.push(*id);
            }
        }
        for id in &newly_dead {
            self.events.push(Event::WorkerDead { worker_id: *id });
        }
        self.on_learners_dead(now, &newly_dead);
        let group_formed = self.running.is_some_and(|id| self.advance_group(now, id));
        let returned = self.expire_leases_where(|l| l.deadline <= now || newly_dead.contains(&l.worker));
        !newly_dead.is_empty() || returned > 0 || group_formed
    }

    /// Expires the running job's leases matching `pred`; returns the prompts sent back.
    pub(super) fn expire_leases_where(&mut self, pred: impl Fn(&LeaseRecord) -> bool) -> usize {
        let Some(job) = self.running.and_then(|id| self.jobs.get_mut(&id)) else { return 0 };
        let job_id = job.id;
        let Some(r) = &mut job.rollouts else { return 0 };
        let mut expired: Vec<LeaseId> = r.leases.iter().filter(|(_, l)| pred(l)).map(|(id, _)| *id).collect();
        // Oldest lease last, so that it ends up first in the queue.
        expired.sort_by(|a, b| b.cmp(a));
        let mut returned = 0;
        for lease_id in expired {
            let Some(lease) = r.leases.remove(&lease_id) else { continue };
            let back: Vec<PromptKey> =
                lease.prompts.iter().copied().filter(|k| lease.outstanding.contains(k)).collect();
            returned += back.len();
            r.requeue_front(back.iter().copied());
            r.expired_leases.insert(lease_id);
            job.counters.leases_expired += 1;
            self.events.push(Event::LeaseExpired { job_id, lease_id, prompts_returned: back.len() });
        }
        returned
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_support::*;

    #[test]
    fn silent_worker_dies_and_its_leases_return() {
        let (mut st, now, w, job) = grpo_state(10);
        let grant = st.lease(now, w, job, 3).unwrap();
        assert!(!st.expire(now + Duration::from_secs(4)));
        assert!(st.expire(now + Duration::from_secs(6)));
        assert!(!st.workers().next().unwrap().1.alive);
        assert_eq!(st.snapshot(None).unwrap()[0].leased_prompts_outstanding, 0);
        let w2 = st.register(now, Role::RolloutWorker, "w2".into(), 0, 0);
        assert_eq!(keys(&st.lease(now, w2, job, 3).unwrap()), keys(&grant));
    }
}
