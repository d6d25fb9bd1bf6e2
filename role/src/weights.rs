//! Policy weights on the wire: learner rank 0 cuts the trainable tensors of a policy version into
//! [`WeightChunk`]s (f32, little-endian, at most [`MAX_WEIGHT_CHUNK_BYTES`] each) for
//! PublishWeights, and a rollout worker puts the chunks FetchWeights streams back together.

use medtvt_proto::v1::WeightChunk;
use medtvt_proto::MAX_WEIGHT_CHUNK_BYTES;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weights: tensor `{name}` has dtype `{dtype}`; only f32 is published")]
    Dtype { name: String, dtype: String },
    #[error("weights: tensor `{name}`: chunk at byte {offset} does not follow byte {expected}")]
    Gap { name: String, offset: u64, expected: u64 },
    #[error("weights: tensor `{name}` has {got} bytes, its header says {expected} (shape {shape:?})")]
    Size { name: String, got: u64, expected: u64, shape: Vec<i64> },
    #[error("weights: the stream mixes policy versions {first} and {other}")]
    MixedVersions { first: u64, other: u64 },
    #[error("weights: the stream ended inside tensor `{name}` or before last_of_version")]
    Truncated { name: String },
}

/// A tensor's values as f32 little-endian bytes (on the host).
pub fn f32_le_bytes(tensor: &Tensor) -> Vec<u8> {
    let flat = tensor.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
    let values = Vec::<f32>::try_from(&flat).unwrap_or_default();
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// All chunks of one policy version, tensors in the given order.
pub fn weight_chunks(job_id: u64, policy_version: u64, tensors: &[(String, Tensor)]) -> Vec<WeightChunk> {
    let mut chunks = Vec::new();
    for (name, tensor) in tensors {
        let bytes = f32_le_bytes(tensor);
        let total = bytes.len() as u64;
        let pieces: Vec<&[u8]> =
            if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(MAX_WEIGHT_CHUNK_BYTES).collect() };
        let n = pieces.len();
        let mut offset = 0u64;
        for (i, piece) in pieces.into_iter().enumerate() {
            chunks.push(WeightChunk {
                job_id,
                policy_version,
                tensor_name: name.clone(),
                dtype: "f32".into(),
                shape: tensor.size(),
                data: piece.to_vec().into(),
                offset,
                total_bytes: total,
                last_of_tensor: i + 1 == n,
                last_of_version: false,
            });
            offset += piece.len() as u64;
        }
    }
    if let Some(last) = chunks.last_mut() {
        last.last_of_version = true;
    }
    chunks
}

/// One complete policy version.
#[derive(Debug)]
pub struct PolicyWeights {
    pub policy_version: u64,
    pub tensors: Vec<(String, Tensor)>,
}

/// Reassembles the chunks of one version (`None` when the stream was empty: nothing newer).
pub fn assemble_weights(chunks: impl IntoIterator<Item = WeightChunk>) -> Result<Option<PolicyWeights>, WeightsError> {
    let mut version: Option<u64> = None;
    let mut tensors = Vec::new();
    let mut current: Option<(String, Vec<i64>, u64, Vec<u8>)> = None;
    let mut complete = false;
    for chunk in chunks {
        match version {
            None => version = Some(chunk.policy_version),
            Some(v) if v != chunk.policy_version => {
                return Err(WeightsError::MixedVersions { first: v, other: chunk.policy_version })
            }
            Some(_) => {}
        }
        if chunk.dtype != "f32" {
            return Err(WeightsError::Dtype { name: chunk.tensor_name, dtype: chunk.dtype });
        }
        let (name, shape, total, mut data) = match current.take() {
            Some(open) if open.0 == chunk.tensor_name => open,
            Some(open) => return Err(WeightsError::Truncated { name: open.0 }),
            None => (chunk.tensor_name.clone(), chunk.shape.clone(), chunk.total_bytes, Vec::new()),
        };
        if chunk.offset != data.len() as u64 {
            return Err(WeightsError::Gap { name, offset: chunk.offset, expected: data.len() as u64 });
        }
        data.extend_from_slice(&chunk.data);
        if chunk.last_of_tensor {
            tensors.push(tensor_from_bytes(name, shape, total, &data)?);
        } else {
            current = Some((name, shape, total, data));
        }
        if chunk.last_of_version {
            complete = true;
            break;
        }
    }
    match (version, current, complete) {
        (None, _, _) => Ok(None),
        (Some(policy_version), None, true) => Ok(Some(PolicyWeights { policy_version, tensors })),
        (Some(_), open, _) => Err(WeightsError::Truncated { name: open.map(|o| o.0).unwrap_or_default() }),
    }
}

fn tensor_from_bytes(name: String, shape: Vec<i64>, total: u64, data: &[u8]) -> Result<(String, Tensor), WeightsError> {
    let numel: i64 = shape.iter().product();
    let expected = numel.max(0) as u64 * 4;
    if data.len() as u64 != expected || total != expected {
        return Err(WeightsError::Size { name, got: data.len() as u64, expected, shape });
    }
    let values: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let tensor = Tensor::from_slice(&values).view(shape.as_slice());
    Ok((name, tensor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(n: usize) -> Vec<(String, Tensor)> {
        vec![
            ("small".to_string(), Tensor::from_slice(&[1.5f32, -2.0, 3.25]).view([3, 1])),
            ("big".to_string(), Tensor::arange(n as i64, (Kind::Float, Device::Cpu)).view([-1, 2])),
        ]
    }

    #[test]
    fn chunks_round_trip_bit_exactly_across_chunk_boundaries() {
        // 300_000 f32 = 1.2 MB: the big tensor needs two chunks.
        let tensors = named(300_000);
        let chunks = weight_chunks(4, 9, &tensors);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.data.len() <= MAX_WEIGHT_CHUNK_BYTES));
        assert!(chunks[2].last_of_version && !chunks[1].last_of_version && !chunks[1].last_of_tensor);
        let back = assemble_weights(chunks).unwrap().unwrap();
        assert_eq!(back.policy_version, 9);
        for ((n1, t1), (n2, t2)) in tensors.iter().zip(&back.tensors) {
            assert_eq!(n1, n2);
            assert_eq!(t1.size(), t2.size());
            assert!(t1.equal(t2), "{n1} differs");
        }
    }

    #[test]
    fn empty_stream_means_nothing_newer() {
        assert!(assemble_weights(Vec::new()).unwrap().is_none());
    }

    #[test]
    fn gaps_and_truncation_are_reported() {
        let mut chunks = weight_chunks(1, 2, &named(300_000));
        chunks.remove(1);
        assert!(matches!(assemble_weights(chunks), Err(WeightsError::Truncated { .. } | WeightsError::Gap { .. })));
        let mut chunks = weight_chunks(1, 2, &named(10));
        chunks.pop();
        assert!(matches!(assemble_weights(chunks), Err(WeightsError::Truncated { .. })));
        let mut chunks = weight_chunks(1, 2, &named(10));
        chunks[1].policy_version = 3;
        assert!(matches!(assemble_weights(chunks), Err(WeightsError::MixedVersions { first: 2, other: 3 })));
    }
}
