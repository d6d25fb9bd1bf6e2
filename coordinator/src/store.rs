//! The durable run state: what a coordinator started with `--run-dir DIR` needs to resume a run
//! after it was killed (SIGKILL, OOM, a lost node), kept in `DIR/coordinator.sqlite`, with the
//! latest policy weights in `DIR/weights/`.
//!
//! Design: the state machine stays pure. It pushes a [`Durable`] record for every transition a
//! resumed run needs (see `state/journal.rs`); the service drains them after each call, under the state
//! lock, and hands them to the writer thread (`journal_writer.rs`), whose [`RunStore::apply`]
//! writes every batch waiting in one SQLite transaction (group commit) outside the state lock;
//! the call answers once its records, and every earlier call's, are committed. Small per-job progress is stored as a snapshot row (replaced on each change);
//! sealed steps are appended once and never change. [`RunStore::open`] reads it all back for
//! [`RunState::resume`](crate::state::RunState::resume).
//!
//! Tables (`PRAGMA user_version` = [`SCHEMA_VERSION`]):
//! - `ids(name, value)`: next_job, next_worker, next_lease (ids are never reused).
//! - `jobs(id, config_toml, state, message, policy_version, steps_completed, next_fresh,
//!   pruned_below, finish_requested, progress_json)`: one row per job; `state` is QUEUED,
//!   RUNNING, SUCCEEDED, FAILED or CANCELLED; `progress_json` holds the ranks that reported each
//!   unfinished step, rank 0's latest metrics and the status counters.
//! - `samples(job_id, idx, line)`: the job's prompts or samples as leased (raw QA JSONL lines),
//!   so a resumed job does not depend on data.dir being unchanged.
//! - `step_groups(job_id, step, position, prompt_id, epoch, group_pb)`: each sealed GRPO step's
//!   groups in order (protobuf `RolloutGroup`); `group_pb` is NULL once the step was pruned.
//! - `weights(job_id, version, dir)`: the latest published version, whose tensors are in
//!   `DIR/weights/<dir>/` as `manifest.json` (name, dtype, shape, offset, length per tensor) and
//!   `tensors.bin`, written to a temporary directory, fsynced, then renamed into place.
//!
//! Journal mode WAL with `synchronous = NORMAL`: a commit is in the WAL file (the OS page cache)
//! before the call answers, so a killed coordinator process loses nothing it acknowledged; only
//! a power loss or kernel crash can drop the last commits, and that takes the learners (which
//! resume from their checkpoints) with it. FULL would add an fsync to every commit for a
//! failure mode that the run recovers from anyway. Weight files are
//! fsynced, since they are written once per step and are large.

use crate::ids::{JobId, JobState, PromptKey};
use crate::state::{Durable, IdCounters, JobProgress, JobRecord, ResumedJob, SealedStep};
use crate::weights::{TensorBytes, WeightVersion};
use medtvt_proto::v1::RolloutGroup;
use prost::bytes::Bytes;
use prost::Message;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const DB_FILE: &str = "coordinator.sqlite";
pub const WEIGHTS_DIR: &str = "weights";
pub const SCHEMA_VERSION: i64 = 1;
const MANIFEST: &str = "manifest.json";
const TENSORS: &str = "tensors.bin";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the run directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("{path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error("{path} has schema version {found}; this coordinator reads version {SCHEMA_VERSION}")]
    Schema { path: PathBuf, found: i64 },
    #[error("weights {path}: {source}")]
    WeightsIo { path: PathBuf, source: std::io::Error },
    #[error("weights manifest {path}: {problem}")]
    Manifest { path: PathBuf, problem: String },
}

/// What a run directory held when the coordinator started.
#[derive(Debug)]
pub struct Resumed {
    pub jobs: Vec<ResumedJob>,
    pub ids: IdCounters,
    /// The latest weights of the running job, if it published any.
    pub weights: Option<WeightVersion>,
}

/// The open database of a run directory.
pub struct RunStore {
    db: Mutex<Connection>,
    path: PathBuf,
    weights_dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestEntry {
    name: String,
    dtype: String,
    shape: Vec<i64>,
    offset: u64,
    length: u64,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ids (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    config_toml TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    policy_version INTEGER NOT NULL DEFAULT 0,
    steps_completed INTEGER NOT NULL DEFAULT 0,
    next_fresh INTEGER NOT NULL DEFAULT 0,
    pruned_below INTEGER NOT NULL DEFAULT 0,
    finish_requested TEXT,
    progress_json TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS samples (
    job_id INTEGER NOT NULL, idx INTEGER NOT NULL, line BLOB NOT NULL, PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS step_groups (
    job_id INTEGER NOT NULL, step INTEGER NOT NULL, position INTEGER NOT NULL,
    prompt_id INTEGER NOT NULL, epoch INTEGER NOT NULL, group_pb BLOB,
    PRIMARY KEY (job_id, step, position)
);
CREATE TABLE IF NOT EXISTS weights (job_id INTEGER PRIMARY KEY, version INTEGER NOT NULL, dir TEXT NOT NULL);
";

impl RunStore {
    /// Opens (or creates) `dir/coordinator.sqlite`; returns what it holds when a run was
    /// recorded there before.
    pub fn open(dir: &Path) -> Result<(RunStore, Option<Resumed>), StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir { path: dir.to_path_buf(), source })?;
        let path = dir.join(DB_FILE);
        let sql = |source| StoreError::Sqlite { path: path.clone(), source };
        let db = Connection::open(&path).map_err(sql)?;
        db.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        db.pragma_update(None, "synchronous", "NORMAL").map_err(sql)?;
        let found: i64 = db.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(sql)?;
        if found != 0 && found != SCHEMA_VERSION {
            return Err(StoreError::Schema { path, found });
        }
        db.execute_batch(SCHEMA).map_err(sql)?;
        db.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(sql)?;
        let store = RunStore { db: Mutex::new(db), path, weights_dir: dir.join(WEIGHTS_DIR) };
        let resumed = store.load()?;
        Ok((store, resumed))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sqlite { path: self.path.clone(), source }
    }

    fn corrupt(&self, problem: String) -> StoreError {
        StoreError::Corrupt { path: self.path.clone(), problem }
    }

    /// Writes one call's records in one transaction.
    pub fn apply(&self, records: &[Durable]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let sql = self.sql();
        let mut db = self.lock();
        let tx = db.transaction().map_err(&sql)?;
        for record in records {
            match record {
                Durable::JobQueued { job_id, config_toml, samples } => {
                    tx.execute(
                        "INSERT INTO jobs (id, config_toml, state) VALUES (?1, ?2, ?3)",
                        params![job_id.0 as i64, config_toml, JobState::Queued.as_str()],
                    )
                    .map_err(&sql)?;
                    let mut insert = tx
                        .prepare_cached("INSERT INTO samples (job_id, idx, line) VALUES (?1, ?2, ?3)")
                        .map_err(&sql)?;
                    for (idx, line) in samples.iter().enumerate() {
                        insert.execute(params![job_id.0 as i64, idx as i64, line.as_ref()]).map_err(&sql)?;
                    }
                }
                Durable::Job(r) => {
                    let progress = serde_json::to_string(&r.progress)
                        .map_err(|e| self.corrupt(format!("job {}: cannot encode its progress: {e}", r.job_id)))?;
                    tx.execute(
                        "UPDATE jobs SET state = ?2, message = ?3, policy_version = ?4, steps_completed = ?5, next_fresh = ?6,
                         pruned_below = ?7, finish_requested = ?8, progress_json = ?9 WHERE id = ?1",
                        params![
                            r.job_id.0 as i64,
                            r.state.as_str(),
                            r.message,
                            r.policy_version as i64,
                            r.steps_completed as i64,
                            r.next_fresh as i64,
                            r.pruned_below as i64,
                            r.finish_requested,
                            progress
                        ],
                    )
                    .map_err(&sql)?;
                }
                Durable::StepSealed { job_id, step, groups } => {
                    let mut insert = tx
                        .prepare_cached(
                            "INSERT INTO step_groups (job_id, step, position, prompt_id, epoch, group_pb) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        )
                        .map_err(&sql)?;
                    for (position, g) in groups.iter().enumerate() {
                        insert
                            .execute(params![
                                job_id.0 as i64,
                                *step as i64,
                                position as i64,
                                g.prompt_id as i64,
                                g.epoch as i64,
                                g.encode_to_vec()
                            ])
                            .map_err(&sql)?;
                    }
                }
                Durable::StepsPruned { job_id, below } => {
                    tx.execute(
                        "UPDATE step_groups SET group_pb = NULL WHERE job_id = ?1 AND step < ?2",
                        params![job_id.0 as i64, *below as i64],
                    )
                    .map_err(&sql)?;
                }
                Durable::Ids(ids) => {
                    let mut upsert =
                        tx.prepare_cached("INSERT OR REPLACE INTO ids (name, value) VALUES (?1, ?2)").map_err(&sql)?;
                    for (name, value) in
                        [("next_job", ids.next_job), ("next_worker", ids.next_worker), ("next_lease", ids.next_lease)]
                    {
                        upsert.execute(params![name, value as i64]).map_err(&sql)?;
                    }
                }
            }
        }
        tx.commit().map_err(&sql)
    }

    fn load(&self) -> Result<Option<Resumed>, StoreError> {
        let sql = self.sql();
        let db = self.lock();
        let id_value = |name: &str| -> Result<Option<u64>, StoreError> {
            db.query_row("SELECT value FROM ids WHERE name = ?1", [name], |row| row.get::<_, i64>(0))
                .optional()
                .map(|v| v.map(|v| v as u64))
                .map_err(&sql)
        };
        let Some(next_job) = id_value("next_job")? else { return Ok(None) };
        let ids = IdCounters {
            next_job,
            next_worker: id_value("next_worker")?.unwrap_or(1),
            next_lease: id_value("next_lease")?.unwrap_or(1),
        };
        let mut jobs = Vec::new();
        let mut rows = db
            .prepare(
                "SELECT id, config_toml, state, message, policy_version, steps_completed, next_fresh, pruned_below,
                 finish_requested, progress_json FROM jobs ORDER BY id",
            )
            .map_err(&sql)?;
        let mut query = rows.query([]).map_err(&sql)?;
        while let Some(row) = query.next().map_err(&sql)? {
            let get_u64 = |i: usize| row.get::<_, i64>(i).map(|v| v as u64).map_err(&sql);
            let job_id = JobId(get_u64(0)?);
            let config_toml: String = row.get(1).map_err(&sql)?;
            let state_name: String = row.get(2).map_err(&sql)?;
            let state = JobState::from_name(&state_name)
                .ok_or_else(|| self.corrupt(format!("job {job_id}: unknown state `{state_name}` in jobs.state")))?;
            let progress_json: String = row.get(9).map_err(&sql)?;
            let progress: JobProgress = serde_json::from_str(&progress_json)
                .map_err(|e| self.corrupt(format!("job {job_id}: jobs.progress_json: {e}")))?;
            let record = JobRecord {
                job_id,
                state,
                message: row.get(3).map_err(&sql)?,
                policy_version: get_u64(4)?,
                steps_completed: get_u64(5)?,
                next_fresh: get_u64(6)?,
                pruned_below: get_u64(7)?,
                finish_requested: row.get(8).map_err(&sql)?,
                progress,
            };
            jobs.push(ResumedJob {
                config_toml,
                samples: self.load_samples(&db, job_id)?,
                sealed: self.load_steps(&db, job_id)?,
                record,
            });
        }
        drop(query);
        drop(rows);
        let running = jobs.iter().find(|j| j.record.state == JobState::Running).map(|j| j.record.job_id);
        let weights = match running {
            Some(job) => {
                let latest: Option<(i64, String)> = db
                    .query_row("SELECT version, dir FROM weights WHERE job_id = ?1", [job.0 as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()
                    .map_err(&sql)?;
                match latest {
                    Some((version, dir)) => Some(read_weights(&self.weights_dir.join(dir), job, version as u64)?),
                    None => None,
                }
            }
            None => None,
        };
        Ok(Some(Resumed { jobs, ids, weights }))
    }

    fn load_samples(&self, db: &Connection, job: JobId) -> Result<Vec<Bytes>, StoreError> {
        let sql = self.sql();
        let mut stmt = db.prepare("SELECT line FROM samples WHERE job_id = ?1 ORDER BY idx").map_err(&sql)?;
        let lines = stmt
            .query_map([job.0 as i64], |row| row.get::<_, Vec<u8>>(0))
            .map_err(&sql)?
            .map(|line| line.map(Bytes::from).map_err(&sql))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(lines)
    }

    fn load_steps(&self, db: &Connection, job: JobId) -> Result<Vec<SealedStep>, StoreError> {
        let sql = self.sql();
        let mut stmt = db
            .prepare("SELECT step, position, prompt_id, epoch, group_pb FROM step_groups WHERE job_id = ?1 ORDER BY step, position")
            .map_err(&sql)?;
        let mut rows = stmt.query([job.0 as i64]).map_err(&sql)?;
        let mut steps: Vec<SealedStep> = Vec::new();
        while let Some(row) = rows.next().map_err(&sql)? {
            let step = row.get::<_, i64>(0).map_err(&sql)? as usize;
            if step > steps.len() {
                return Err(self.corrupt(format!("job {job}: step_groups has step {step} but no step {}", steps.len())));
            }
            if step == steps.len() {
                steps.push(SealedStep::default());
            }
            let key = PromptKey {
                prompt_id: row.get::<_, i64>(2).map_err(&sql)? as u64,
                epoch: row.get::<_, i64>(3).map_err(&sql)? as u64,
            };
            let sealed = &mut steps[step];
            sealed.keys.push(key);
            if let Some(pb) = row.get::<_, Option<Vec<u8>>>(4).map_err(&sql)? {
                let group = RolloutGroup::decode(pb.as_slice()).map_err(|e| {
                    self.corrupt(format!(
                        "job {job} step {step}: step_groups.group_pb of prompt {}: {e}",
                        key.prompt_id
                    ))
                })?;
                sealed.groups.push(Arc::new(group));
            }
        }
        Ok(steps)
    }

    /// Writes `version` to `weights/job<J>-v<N>/` atomically, records it as the job's latest and
    /// removes older versions. Blocking file I/O: call it off the executor.
    pub fn save_weights(&self, version: &WeightVersion) -> Result<(), StoreError> {
        let name = format!("job{}-v{}", version.job_id, version.version);
        let tmp = self.weights_dir.join(format!(".tmp-{name}"));
        let dest = self.weights_dir.join(&name);
        write_weights(&tmp, version)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::WeightsIo { path, source }
        };
        if dest.exists() {
            std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
        std::fs::File::open(&self.weights_dir).and_then(|d| d.sync_all()).map_err(io(&self.weights_dir))?;
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO weights (job_id, version, dir) VALUES (?1, ?2, ?3)",
                params![version.job_id as i64, version.version as i64, name],
            )
            .map_err(self.sql())?;
        // Only the newest version is ever read back; the others are dead weight.
        if let Ok(entries) = std::fs::read_dir(&self.weights_dir) {
            for entry in entries.flatten() {
                if entry.file_name() != name.as_str() {
                    if let Err(err) = std::fs::remove_dir_all(entry.path()) {
                        tracing::warn!(path = %entry.path().display(), error = %err, "cannot remove old weights");
                    }
                }
            }
        }
        Ok(())
    }
}

fn write_weights(dir: &Path, version: &WeightVersion) -> Result<(), StoreError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::WeightsIo { path, source }
    };
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let data_path = dir.join(TENSORS);
    let mut data = std::io::BufWriter::new(std::fs::File::create(&data_path).map_err(io(&data_path))?);
    let mut manifest = Vec::with_capacity(version.tensors.len());
    let mut offset = 0u64;
    for t in &version.tensors {
        data.write_all(&t.data).map_err(io(&data_path))?;
        let length = t.data.len() as u64;
        manifest.push(ManifestEntry {
            name: t.name.clone(),
            dtype: t.dtype.clone(),
            shape: t.shape.clone(),
            offset,
            length,
        });
        offset += length;
    }
    let file =
        data.into_inner().map_err(|e| StoreError::WeightsIo { path: data_path.clone(), source: e.into_error() })?;
    file.sync_all().map_err(io(&data_path))?;
    let manifest_path = dir.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| StoreError::Manifest { path: manifest_path.clone(), problem: e.to_string() })?;
    let mut file = std::fs::File::create(&manifest_path).map_err(io(&manifest_path))?;
    file.write_all(&json).and_then(|_| file.sync_all()).map_err(io(&manifest_path))?;
    Ok(())
}

fn read_weights(dir: &Path, job_id: JobId, version: u64) -> Result<WeightVersion, StoreError> {
    let manifest_path = dir.join(MANIFEST);
    let data_path = dir.join(TENSORS);
    let text = std::fs::read(&manifest_path)
        .map_err(|source| StoreError::WeightsIo { path: manifest_path.clone(), source })?;
    let manifest: Vec<ManifestEntry> = serde_json::from_slice(&text)
        .map_err(|e| StoreError::Manifest { path: manifest_path.clone(), problem: e.to_string() })?;
    let data = Bytes::from(
        std::fs::read(&data_path).map_err(|source| StoreError::WeightsIo { path: data_path.clone(), source })?,
    );
    let mut tensors = Vec::with_capacity(manifest.len());
    for entry in manifest {
        let end = entry.offset.checked_add(entry.length).filter(|end| *end <= data.len() as u64).ok_or_else(|| {
            StoreError::Manifest {
                path: manifest_path.clone(),
                problem: format!(
                    "tensor `{}` lies past the end of {} ({} bytes)",
                    entry.name,
                    data_path.display(),
                    data.len()
                ),
            }
        })?;
        let bytes = data.slice(entry.offset as usize..end as usize);
        tensors.push(TensorBytes { name: entry.name, dtype: entry.dtype, shape: entry.shape, data: bytes });
    }
    Ok(WeightVersion { job_id: job_id.0, version, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: u64) -> WeightVersion {
        WeightVersion {
            job_id: 2,
            version: v,
            tensors: vec![
                TensorBytes {
                    name: "a".into(),
                    dtype: "f32".into(),
                    shape: vec![2],
                    data: Bytes::from(vec![v as u8; 8]),
                },
                TensorBytes {
                    name: "b".into(),
                    dtype: "bf16".into(),
                    shape: vec![1, 3],
                    data: Bytes::from(vec![7u8; 6]),
                },
            ],
        }
    }

    #[test]
    fn weights_round_trip_and_only_the_latest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (store, resumed) = RunStore::open(dir.path()).unwrap();
        assert!(resumed.is_none(), "a fresh directory holds no run");
        store.save_weights(&version(1)).unwrap();
        store.save_weights(&version(2)).unwrap();
        let kept: Vec<_> =
            std::fs::read_dir(dir.path().join(WEIGHTS_DIR)).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(kept, vec![std::ffi::OsString::from("job2-v2")]);
        assert_eq!(read_weights(&dir.path().join(WEIGHTS_DIR).join("job2-v2"), JobId(2), 2).unwrap(), version(2));
    }

    #[test]
    fn a_truncated_weights_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = RunStore::open(dir.path()).unwrap();
        store.save_weights(&version(1)).unwrap();
        let v1 = dir.path().join(WEIGHTS_DIR).join("job2-v1");
        std::fs::write(v1.join(TENSORS), [0u8; 3]).unwrap();
        let err = read_weights(&v1, JobId(2), 1).unwrap_err().to_string();
        assert!(err.contains("manifest.json") && err.contains("tensor `a`"), "{err}");
    }

    #[test]
    fn a_newer_schema_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = RunStore::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("coordinator.sqlite") && err.contains("99"), "{err}");
    }
}
