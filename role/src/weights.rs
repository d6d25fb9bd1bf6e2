//! Policy weights as tensors on the wire: learner rank 0 turns the trainable tensors of a policy
//! version into [`WeightChunk`]s (f32, little-endian, at most [`MAX_WEIGHT_CHUNK_BYTES`] each) for
//! PublishWeights, and a rollout worker turns the chunks FetchWeights streams back into tensors.
//! The chunking and the stream checks are `medtvt_proto::weights`, the codec the coordinator uses
//! too; this module only converts between tensors and their bytes.

use medtvt_proto::v1::WeightChunk;
use medtvt_proto::weights::{TensorBytes, VersionAssembler, WeightVersion};
use medtvt_proto::MAX_WEIGHT_CHUNK_BYTES;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weights: {0}")]
    Stream(#[from] medtvt_proto::weights::WeightsError),
    #[error("weights: tensor `{name}` has dtype `{dtype}`; only f32 is published")]
    Dtype { name: String, dtype: String },
}

/// A tensor's values as f32 little-endian bytes (on the host).
pub fn f32_le_bytes(tensor: &Tensor) -> Vec<u8> {
    let flat = tensor.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous().view([-1]);
    let values = Vec::<f32>::try_from(&flat).unwrap_or_default();
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// All chunks of one policy version, tensors in the given order.
pub fn weight_chunks(job_id: u64, policy_version: u64, tensors: &[(String, Tensor)]) -> Vec<WeightChunk> {
    let version = WeightVersion {
        job_id,
        version: policy_version,
        tensors: tensors
            .iter()
            .map(|(name, tensor)| TensorBytes {
                name: name.clone(),
                dtype: "f32".into(),
                shape: tensor.size(),
                data: f32_le_bytes(tensor).into(),
            })
            .collect(),
    };
    version.chunks(MAX_WEIGHT_CHUNK_BYTES)
}

/// One complete policy version.
#[derive(Debug)]
pub struct PolicyWeights {
    pub policy_version: u64,
    pub tensors: Vec<(String, Tensor)>,
}

/// Reassembles the chunks of one version (`None` when the stream was empty: nothing newer).
pub fn assemble_weights(chunks: impl IntoIterator<Item = WeightChunk>) -> Result<Option<PolicyWeights>, WeightsError> {
    let mut assembler = VersionAssembler::default();
    let mut complete = None;
    let mut any = false;
    for chunk in chunks {
        any = true;
        if let Some(version) = assembler.push(chunk)? {
            complete = Some(version);
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    let version = complete.ok_or(medtvt_proto::weights::WeightsError::Incomplete)?;
    let tensors = version.tensors.into_iter().map(tensor_from_bytes).collect::<Result<_, _>>()?;
    Ok(Some(PolicyWeights { policy_version: version.version, tensors }))
}

/// An f32 tensor from its bytes (the assembler has checked that they fill its shape).
fn tensor_from_bytes(t: TensorBytes) -> Result<(String, Tensor), WeightsError> {
    if !t.dtype.eq_ignore_ascii_case("f32") && !t.dtype.eq_ignore_ascii_case("float32") {
        return Err(WeightsError::Dtype { name: t.name, dtype: t.dtype });
    }
    let values: Vec<f32> = t.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let tensor = Tensor::from_slice(&values).view(t.shape.as_slice());
    Ok((t.name, tensor))
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
        let err = assemble_weights(chunks).unwrap_err().to_string();
        assert!(err.contains("tensor `big`: chunk at offset"), "{err}");
        let mut chunks = weight_chunks(1, 2, &named(10));
        chunks.pop();
        let err = assemble_weights(chunks).unwrap_err().to_string();
        assert!(err.contains("ended before a chunk with last_of_version"), "{err}");
        let mut chunks = weight_chunks(1, 2, &named(10));
        chunks[1].policy_version = 3;
        let err = assemble_weights(chunks).unwrap_err().to_string();
        assert!(err.contains("job 1 version 3 inside a stream of job 1 version 2"), "{err}");
        let mut chunks = weight_chunks(1, 2, &named(10));
        chunks.iter_mut().for_each(|c| c.dtype = "i32".into());
        assert!(matches!(assemble_weights(chunks), Err(WeightsError::Dtype { .. })));
    }
}
