//! The coordinator's copy of the policy weights: [`WeightStore`] keeps the latest complete
//! version of the running job (assembled from a PublishWeights stream by
//! [`medtvt_proto::weights::VersionAssembler`]) and hands it to FetchWeights.

use crate::ids::JobId;
pub use medtvt_proto::weights::{TensorBytes, VersionAssembler, WeightVersion, WeightsError};
use std::sync::Arc;

/// The latest complete version (of the job that published last).
#[derive(Default)]
pub struct WeightStore {
    latest: Option<Arc<WeightVersion>>,
}

impl WeightStore {
    /// Versions of a job only move forward.
    pub fn accepts(&self, job: JobId, version: u64) -> bool {
        self.latest.as_ref().is_none_or(|v| v.job_id != job.0 || version > v.version)
    }

    pub fn install(&mut self, version: WeightVersion) {
        self.latest = Some(Arc::new(version));
    }

    /// The latest version of `job` if it is newer than `have`.
    pub fn newer_than(&self, job: JobId, have: u64) -> Option<Arc<WeightVersion>> {
        self.latest.as_ref().filter(|v| v.job_id == job.0 && v.version > have).cloned()
    }

    /// Frees the weights unless they belong to `running`.
    pub fn retain_job(&mut self, running: Option<JobId>) {
        if self.latest.as_ref().is_some_and(|v| Some(JobId(v.job_id)) != running) {
            self.latest = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::bytes::Bytes;

    fn version(n: usize) -> WeightVersion {
        WeightVersion {
            job_id: 1,
            version: 3,
            tensors: vec![TensorBytes {
                name: "t0".into(),
                dtype: "u8".into(),
                shape: vec![n as i64],
                data: Bytes::from(vec![7u8; n]),
            }],
        }
    }

    #[test]
    fn store_keeps_the_latest_version_of_the_running_job() {
        let mut store = WeightStore::default();
        store.install(version(4));
        assert!(!store.accepts(JobId(1), 3));
        assert!(store.accepts(JobId(1), 4) && store.accepts(JobId(2), 1));
        assert!(store.newer_than(JobId(1), 2).is_some());
        assert!(store.newer_than(JobId(1), 3).is_none());
        store.retain_job(Some(JobId(2)));
        assert!(store.newer_than(JobId(1), 0).is_none());
    }
}
