//! Persistence off the state lock: one writer thread with group commit.
//!
//! Each state transition's durable records ([`Durable`]) are handed to the writer in the order the
//! state lock made them, numbered 1, 2, 3, ... (the handing over happens under the lock, so the
//! numbers follow the transitions). The writer takes every batch waiting when it wakes and writes
//! them in one SQLite transaction (group commit), then advances the committed watermark.
//!
//! A call answers only after the watermark reached the last number handed over when it released
//! the lock: its own records and every earlier batch, since a call may have read state that an
//! earlier, not yet committed, call made. So a killed coordinator still loses nothing it
//! acknowledged, while no call holds the state lock during a commit, and many calls' records
//! share one commit when the writer is busy.
//!
//! [`CommitMode::UnderLock`] is the previous design (each call's records written in its own
//! transaction while it holds the state lock), kept to measure the writer against.
//!
//! A failed write cannot undo its transitions: the run goes on, the error is logged (a resume
//! would lose those changes), and the watermark still advances so that no call waits forever.

use crate::state::Durable;
use crate::store::RunStore;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::watch;

type Batch = (u64, Vec<Durable>);

/// How the durable records reach SQLite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitMode {
    /// On the writer thread, with group commit, outside the state lock (the default).
    #[default]
    Writer,
    /// In the calling thread, under the state lock, one transaction per call (the previous
    /// design; for benchmarks).
    UnderLock,
}

/// How much the writer has done: commits and the call batches they held.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub batches: AtomicU64,
}

/// Writes `records` (the records of `batches` calls) in one transaction and counts it. A failed
/// write is logged: the transitions stand, and a resume would lose them.
fn commit(store: &RunStore, records: &[Durable], batches: u64, stats: &WriterStats) {
    if let Err(err) = store.apply(records) {
        tracing::error!(error = %err, "cannot record the run state; a resume would lose this change");
    }
    stats.commits.fetch_add(1, Ordering::Relaxed);
    stats.batches.fetch_add(batches, Ordering::Relaxed);
}

/// The writer thread and the numbers of what was handed to it and what it committed.
pub struct JournalWriter {
    /// With [`CommitMode::UnderLock`]: the store written in the calling thread.
    inline: Option<Arc<RunStore>>,
    sender: Mutex<Option<mpsc::Sender<Batch>>>,
    /// The last batch number handed over (only ever changed under the state lock).
    submitted: AtomicU64,
    committed: watch::Receiver<u64>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<WriterStats>,
}

impl JournalWriter {
    /// Starts the writer thread over `store` (none with [`CommitMode::UnderLock`]).
    pub fn start(store: Arc<RunStore>, mode: CommitMode) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel::<Batch>();
        let (committed_tx, committed) = watch::channel(0u64);
        let stats = Arc::new(WriterStats::default());
        if mode == CommitMode::UnderLock {
            return Ok(JournalWriter {
                inline: Some(store),
                sender: Mutex::new(None),
                submitted: AtomicU64::new(0),
                committed,
                thread: Mutex::new(None),
                stats,
            });
        }
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || write_loop(&store, &receiver, &committed_tx, &thread_stats))?;
        Ok(JournalWriter {
            inline: None,
            sender: Mutex::new(Some(sender)),
            submitted: AtomicU64::new(0),
            committed,
            thread: Mutex::new(Some(thread)),
            stats,
        })
    }

    /// Hands one call's records to the writer; returns the number a call must wait for before
    /// it answers (the last number handed over, even when `records` is empty). Call it under the
    /// state lock, so that numbers follow the transitions.
    pub fn submit(&self, records: Vec<Durable>) -> u64 {
        if records.is_empty() {
            return self.submitted.load(Ordering::Acquire);
        }
        if let Some(store) = &self.inline {
            commit(store, &records, 1, &self.stats);
            return 0;
        }
        let number = self.submitted.load(Ordering::Acquire) + 1;
        let sender = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        match sender.as_ref().map(|s| s.send((number, records))) {
            Some(Ok(())) => {
                self.submitted.store(number, Ordering::Release);
                number
            }
            _ => {
                tracing::error!("the journal writer has stopped; a resume would lose this change");
                self.submitted.load(Ordering::Acquire)
            }
        }
    }

    /// Waits until every batch up to `number` is committed (or the writer stopped).
    pub async fn committed(&self, number: u64) {
        if *self.committed.borrow() >= number {
            return;
        }
        let mut rx = self.committed.clone();
        if rx.wait_for(|c| *c >= number).await.is_err() {
            tracing::error!(number, "the journal writer stopped before committing a change this call made");
        }
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// Writes what is queued and stops the thread (also done on drop).
    pub fn close(&self) {
        drop(self.sender.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            if thread.join().is_err() {
                tracing::error!("the journal writer panicked");
            }
        }
    }
}

impl Drop for JournalWriter {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop(store: &RunStore, receiver: &mpsc::Receiver<Batch>, committed: &watch::Sender<u64>, stats: &WriterStats) {
    while let Ok(first) = receiver.recv() {
        let mut last = first.0;
        let mut records = first.1;
        let mut batches = 1u64;
        // Group commit: everything that queued up while the previous transaction was written.
        while let Ok((number, more)) = receiver.try_recv() {
            last = number;
            records.extend(more);
            batches += 1;
        }
        commit(store, &records, batches, stats);
        committed.send_replace(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::JobId;
    use crate::state::Durable;

    fn queued(id: u64) -> Vec<Durable> {
        vec![Durable::JobQueued {
            job_id: JobId(id),
            config_toml: format!("# job {id}"),
            samples: Arc::new(Vec::new()),
        }]
    }

    /// The job ids in the run directory's database, read with a connection of its own.
    fn job_rows(dir: &std::path::Path) -> Vec<u64> {
        let db = rusqlite::Connection::open(dir.join(crate::store::DB_FILE)).unwrap();
        let mut stmt = db.prepare("SELECT id FROM jobs ORDER BY id").unwrap();
        let ids = stmt.query_map([], |row| row.get::<_, i64>(0)).unwrap();
        ids.map(|id| id.unwrap() as u64).collect()
    }

    #[tokio::test]
    async fn batches_commit_in_order_and_waiters_see_them_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = RunStore::open(dir.path()).unwrap();
        let writer = JournalWriter::start(Arc::new(store), CommitMode::Writer).unwrap();
        let mut last = 0;
        for id in 1..=50 {
            last = writer.submit(queued(id));
        }
        assert_eq!(last, 50);
        // An empty call waits for everything handed over before it.
        assert_eq!(writer.submit(Vec::new()), 50);
        writer.committed(last).await;
        let stats = writer.stats();
        assert_eq!(stats.batches.load(Ordering::Relaxed), 50);
        assert!(stats.commits.load(Ordering::Relaxed) <= 50);
        writer.close();
        assert_eq!(job_rows(dir.path()), (1..=50).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn close_writes_what_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = RunStore::open(dir.path()).unwrap();
        let writer = JournalWriter::start(Arc::new(store), CommitMode::Writer).unwrap();
        writer.submit(queued(7));
        drop(writer);
        assert_eq!(job_rows(dir.path()), vec![7]);
    }
}
