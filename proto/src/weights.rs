//! The weight-chunk codec: a policy version as a stream of [`WeightChunk`]s and back, with tensor
//! bytes kept opaque. Both ends of both weight RPCs use it: learner rank 0 and the coordinator cut
//! a [`WeightVersion`] into chunks ([`WeightVersion::chunks`], slices of the stored bytes, no
//! copies), and the coordinator (PublishWeights) and the rollout workers (FetchWeights) put a
//! stream back together with [`VersionAssembler`].
//!
//! The assembler checks the stream chunk by chunk: one job and version, tensors one after
//! another, each tensor's chunks in order with no gaps, and metadata that adds up (a tensor's
//! `total_bytes` is the product of its shape times the size of its dtype, and every chunk of a
//! tensor repeats the same dtype, shape and total).

use crate::v1::WeightChunk;
use prost::bytes::{Bytes, BytesMut};
use std::collections::HashSet;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightsError {
    #[error("chunk of job {got_job} version {got_version} inside a stream of job {job} version {version}")]
    MixedVersions { job: u64, version: u64, got_job: u64, got_version: u64 },
    #[error("policy version 0 is the starting checkpoint and cannot be published")]
    VersionZero,
    #[error("tensor `{name}`: chunk at offset {offset}, expected {expected}")]
    OutOfOrder { name: String, offset: u64, expected: u64 },
    #[error("tensor `{name}`: chunks add up to more than its total_bytes = {total}")]
    Overflow { name: String, total: u64 },
    #[error("tensor `{name}` ended at {got} bytes of its total_bytes = {total}")]
    Short { name: String, got: u64, total: u64 },
    #[error("chunk of tensor `{got}` while tensor `{current}` is incomplete")]
    Interleaved { current: String, got: String },
    #[error("tensor `{0}` sent twice in one version")]
    DuplicateTensor(String),
    #[error("a chunk without tensor_name must be an empty end-of-version marker")]
    Unnamed,
    #[error("chunk after last_of_version")]
    AfterEnd,
    #[error("the stream ended before a chunk with last_of_version")]
    Incomplete,
    #[error("a version needs at least one tensor")]
    Empty,
    #[error("tensor `{name}`: unknown dtype `{dtype}` (known: {})", KNOWN_DTYPES.join(", "))]
    UnknownDtype { name: String, dtype: String },
    #[error("tensor `{name}`: shape {shape:?} has a negative dimension")]
    NegativeDim { name: String, shape: Vec<i64> },
    #[error("tensor `{name}`: shape {shape:?} x {dtype} is {expected} bytes, but total_bytes = {total}")]
    SizeMismatch { name: String, shape: Vec<i64>, dtype: String, expected: u64, total: u64 },
    /// `got` and `first` describe the metadata as "dtype D, shape [..], total_bytes N".
    #[error("tensor `{name}`: a chunk says {got}; its first chunk said {first}")]
    InconsistentChunk { name: String, got: String, first: String },
}

/// The dtype names a chunk may carry (case-insensitive), with their element sizes.
const DTYPE_SIZES: &[(&str, u64)] = &[
    ("f64", 8),
    ("float64", 8),
    ("f32", 4),
    ("float32", 4),
    ("f16", 2),
    ("float16", 2),
    ("bf16", 2),
    ("bfloat16", 2),
    ("f8e4m3", 1),
    ("f8e5m2", 1),
    ("i64", 8),
    ("int64", 8),
    ("i32", 4),
    ("int32", 4),
    ("i16", 2),
    ("int16", 2),
    ("i8", 1),
    ("int8", 1),
    ("u8", 1),
    ("uint8", 1),
    ("bool", 1),
];
const KNOWN_DTYPES: &[&str] =
    &["f64", "f32", "f16", "bf16", "f8e4m3", "f8e5m2", "i64", "i32", "i16", "i8", "u8", "bool"];

/// Checks that a tensor's metadata adds up: shape product x dtype size = total_bytes.
fn check_tensor_size(name: &str, dtype: &str, shape: &[i64], total: u64) -> Result<(), WeightsError> {
    let lower = dtype.to_ascii_lowercase();
    let Some(&(_, size)) = DTYPE_SIZES.iter().find(|(n, _)| *n == lower) else {
        return Err(WeightsError::UnknownDtype { name: name.into(), dtype: dtype.into() });
    };
    let mut expected = size;
    for dim in shape {
        let dim =
            u64::try_from(*dim).map_err(|_| WeightsError::NegativeDim { name: name.into(), shape: shape.to_vec() })?;
        expected = expected.saturating_mul(dim);
    }
    if expected != total {
        return Err(WeightsError::SizeMismatch {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: dtype.into(),
            expected,
            total,
        });
    }
    Ok(())
}

/// One tensor of a version: metadata for the workers plus its raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorBytes {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    pub data: Bytes,
}

/// A complete policy version of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightVersion {
    pub job_id: u64,
    pub version: u64,
    pub tensors: Vec<TensorBytes>,
}

impl WeightVersion {
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.data.len() as u64).sum()
    }

    /// The version as chunks of at most `max_chunk` bytes (slices of the stored bytes). The
    /// last chunk carries `last_of_version`.
    pub fn chunks(&self, max_chunk: usize) -> Vec<WeightChunk> {
        let max_chunk = max_chunk.max(1);
        let mut out = Vec::new();
        for tensor in &self.tensors {
            let total = tensor.data.len();
            let mut offset = 0;
            loop {
                let end = (offset + max_chunk).min(total);
                out.push(WeightChunk {
                    job_id: self.job_id,
                    policy_version: self.version,
                    tensor_name: tensor.name.clone(),
                    dtype: tensor.dtype.clone(),
                    shape: tensor.shape.clone(),
                    data: tensor.data.slice(offset..end),
                    offset: offset as u64,
                    total_bytes: total as u64,
                    last_of_tensor: end == total,
                    last_of_version: false,
                });
                offset = end;
                if offset >= total {
                    break;
                }
            }
        }
        if let Some(last) = out.last_mut() {
            last.last_of_version = true;
        }
        out
    }
}

struct PartialTensor {
    name: String,
    dtype: String,
    shape: Vec<i64>,
    total: u64,
    data: BytesMut,
}

/// Builds one version from a `PublishWeights` stream.
#[derive(Default)]
pub struct VersionAssembler {
    target: Option<(u64, u64)>,
    tensors: Vec<TensorBytes>,
    names: HashSet<String>,
    current: Option<PartialTensor>,
    finished: bool,
}

/// Preallocation cap: a lying total_bytes must not reserve memory up front.
const MAX_PREALLOCATE: u64 = 64 << 20;

impl VersionAssembler {
    /// The (job, version) this stream publishes, once the first chunk arrived.
    pub fn target(&self) -> Option<(u64, u64)> {
        self.target
    }

    /// Takes the next chunk; returns the version when this chunk completed it.
    pub fn push(&mut self, chunk: WeightChunk) -> Result<Option<WeightVersion>, WeightsError> {
        if self.finished {
            return Err(WeightsError::AfterEnd);
        }
        let (job, version) = *self.target.get_or_insert((chunk.job_id, chunk.policy_version));
        if (job, version) != (chunk.job_id, chunk.policy_version) {
            return Err(WeightsError::MixedVersions {
                job,
                version,
                got_job: chunk.job_id,
                got_version: chunk.policy_version,
            });
        }
        if version == 0 {
            return Err(WeightsError::VersionZero);
        }
        if chunk.tensor_name.is_empty() {
            if !chunk.data.is_empty() || !chunk.last_of_version {
                return Err(WeightsError::Unnamed);
            }
        } else {
            self.push_tensor_chunk(
                chunk.tensor_name,
                chunk.dtype,
                chunk.shape,
                chunk.data,
                chunk.offset,
                chunk.total_bytes,
                chunk.last_of_tensor,
            )?;
        }
        if !chunk.last_of_version {
            return Ok(None);
        }
        if let Some(open) = &self.current {
            return Err(WeightsError::Short {
                name: open.name.clone(),
                got: open.data.len() as u64,
                total: open.total,
            });
        }
        if self.tensors.is_empty() {
            return Err(WeightsError::Empty);
        }
        self.finished = true;
        Ok(Some(WeightVersion { job_id: job, version, tensors: std::mem::take(&mut self.tensors) }))
    }

    #[allow(clippy::too_many_arguments)]
    fn push_tensor_chunk(
        &mut self,
        name: String,
        dtype: String,
        shape: Vec<i64>,
        data: Bytes,
        offset: u64,
        total: u64,
        last_of_tensor: bool,
    ) -> Result<(), WeightsError> {
        let open = match &mut self.current {
            Some(open) if open.name != name => {
                return Err(WeightsError::Interleaved { current: open.name.clone(), got: name });
            }
            Some(open) => {
                if (open.dtype.as_str(), open.shape.as_slice(), open.total) != (dtype.as_str(), shape.as_slice(), total)
                {
                    let describe = |dtype: &str, shape: &[i64], total: u64| {
                        format!("dtype {dtype}, shape {shape:?}, total_bytes {total}")
                    };
                    return Err(WeightsError::InconsistentChunk {
                        name,
                        got: describe(&dtype, &shape, total),
                        first: describe(&open.dtype, &open.shape, open.total),
                    });
                }
                open
            }
            None => {
                if !self.names.insert(name.clone()) {
                    return Err(WeightsError::DuplicateTensor(name));
                }
                check_tensor_size(&name, &dtype, &shape, total)?;
                let data = BytesMut::with_capacity(total.min(MAX_PREALLOCATE) as usize);
                self.current.insert(PartialTensor { name, dtype, shape, total, data })
            }
        };
        let expected = open.data.len() as u64;
        if offset != expected {
            return Err(WeightsError::OutOfOrder { name: open.name.clone(), offset, expected });
        }
        if expected + data.len() as u64 > open.total {
            return Err(WeightsError::Overflow { name: open.name.clone(), total: open.total });
        }
        open.data.extend_from_slice(&data);
        if last_of_tensor {
            let got = open.data.len() as u64;
            if got != open.total {
                return Err(WeightsError::Short { name: open.name.clone(), got, total: open.total });
            }
            if let Some(done) = self.current.take() {
                self.tensors.push(TensorBytes {
                    name: done.name,
                    dtype: done.dtype,
                    shape: done.shape,
                    data: done.data.freeze(),
                });
            }
        }
        Ok(())
    }

    pub fn finish(&self) -> Result<(), WeightsError> {
        if self.finished {
            Ok(())
        } else {
            Err(WeightsError::Incomplete)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(sizes: &[usize]) -> WeightVersion {
        WeightVersion {
            job_id: 1,
            version: 3,
            tensors: sizes
                .iter()
                .enumerate()
                .map(|(i, n)| TensorBytes {
                    name: format!("t{i}"),
                    dtype: "u8".into(),
                    shape: vec![*n as i64],
                    data: Bytes::from((0..*n).map(|b| (b * 7 + i) as u8).collect::<Vec<u8>>()),
                })
                .collect(),
        }
    }

    #[test]
    fn chunks_reassemble_byte_identical() {
        let v = version(&[10, 0, 25, 8]);
        let chunks = v.chunks(4);
        assert!(chunks.iter().all(|c| c.data.len() <= 4));
        assert_eq!(chunks.iter().filter(|c| c.last_of_version).count(), 1);
        let mut asm = VersionAssembler::default();
        let mut done = None;
        for c in chunks {
            done = asm.push(c).unwrap();
        }
        assert_eq!(done, Some(v));
        asm.finish().unwrap();
    }

    #[test]
    fn broken_streams_are_refused() {
        let v = version(&[8, 8]);
        let chunks = v.chunks(4);
        let feed = |chunks: Vec<WeightChunk>| {
            let mut asm = VersionAssembler::default();
            chunks.into_iter().try_for_each(|c| asm.push(c).map(drop))
        };
        let mut gap = version(&[12]).chunks(4);
        gap.remove(1);
        assert_eq!(feed(gap), Err(WeightsError::OutOfOrder { name: "t0".into(), offset: 8, expected: 4 }));
        let mut short = chunks.clone();
        short[1].data = short[1].data.slice(0..2);
        assert!(matches!(feed(short), Err(WeightsError::Short { .. })));
        let mut mixed = chunks.clone();
        mixed[2].policy_version = 4;
        assert!(matches!(feed(mixed), Err(WeightsError::MixedVersions { .. })));
        let mut zero = chunks.clone();
        zero.iter_mut().for_each(|c| c.policy_version = 0);
        assert_eq!(feed(zero), Err(WeightsError::VersionZero));
        let mut interleaved = chunks.clone();
        interleaved.swap(1, 2);
        assert!(matches!(feed(interleaved), Err(WeightsError::Interleaved { .. })));
        let mut asm = VersionAssembler::default();
        asm.push(chunks[0].clone()).unwrap();
        assert_eq!(asm.finish(), Err(WeightsError::Incomplete));
    }

    #[test]
    fn tensor_metadata_must_add_up_and_stay_the_same_across_chunks() {
        let feed = |chunks: Vec<WeightChunk>| {
            let mut asm = VersionAssembler::default();
            chunks.into_iter().try_for_each(|c| asm.push(c).map(drop)).map_err(|e| e.to_string())
        };
        let mut v = version(&[8]);
        v.tensors[0].dtype = "BF16".into();
        v.tensors[0].shape = vec![2, 2];
        feed(v.chunks(4)).unwrap();
        v.tensors[0].shape = vec![2, 3];
        let err = feed(v.chunks(4)).unwrap_err();
        assert!(err.contains("tensor `t0`") && err.contains("12 bytes") && err.contains("total_bytes = 8"), "{err}");
        v.tensors[0].shape = vec![-4, -1];
        assert!(feed(v.chunks(4)).unwrap_err().contains("negative"));
        v.tensors[0].dtype = "complex7".into();
        let err = feed(v.chunks(4)).unwrap_err();
        assert!(err.contains("tensor `t0`: unknown dtype `complex7`"), "{err}");
        let mut changed = version(&[8]).chunks(4);
        changed[1].shape = vec![4, 2];
        let err = feed(changed).unwrap_err();
        assert!(err.contains("tensor `t0`: a chunk says"), "{err}");
    }
}
