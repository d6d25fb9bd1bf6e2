//! The Modality Perception Layer (MPL), MedTVT-R1's fusion of its three modality vectors:
//!
//! * CMHA, cyclic multi-head cross-attention: one shared multi-head attention applied three times,
//!   (query, key, value) = (ECG, CXR, Lab), (CXR, Lab, ECG), (Lab, ECG, CXR); the three outputs are
//!   averaged into one fusion vector and each modality becomes LayerNorm(x_i + alpha * dropout(fusion)).
//! * CAO, the contribution-aware operator: a gate Linear(3 * dim -> 3) over the concatenated
//!   modality vectors, a sigmoid per modality, each vector scaled by its gate. The gates are the
//!   model's modality contributions and are returned with every forward pass.
//!
//! With one token per modality (as in the reference), each attention has a single key, so its
//! softmax weight is 1 and the output is out_proj(v_proj(value)); we keep the general attention so
//! multi-token modalities work unchanged. Our improvement over the reference: absent modalities are
//! masked. A cyclic output counts only when its key and value modalities are present, the fusion is
//! the mean of the outputs that count, and an absent modality's vector and gate are exactly zero,
//! so nothing about it leaks into the answer.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Index order of the modalities everywhere in the model.
pub const MODALITIES: [&str; 3] = ["ecg", "cxr", "lab"];

/// (query, key, value) modality indices of the three cyclic attentions.
const CYCLE: [(usize, usize, usize); 3] = [(0, 1, 2), (1, 2, 0), (2, 0, 1)];

/// One sample's CAO gates in [`MODALITIES`] order; `None` where the modality is absent.
pub type SampleGates = [Option<f32>; 3];

/// Splits `[batch, 3]` gates into one [`SampleGates`] per sample, using `present` (one row per
/// sample, on the host) to mark absent modalities (whose gate is exactly 0) as `None`.
pub fn gates_per_sample(gates: &Tensor, present: &[[bool; 3]]) -> Result<Vec<SampleGates>, tch::TchError> {
    let values =
        Vec::<f32>::try_from(gates.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous().view([-1]))?;
    Ok(values.chunks_exact(3).zip(present).map(|(g, p)| [0, 1, 2].map(|i| p[i].then_some(g[i]))).collect())
}

#[derive(Debug, Clone)]
pub struct MplConfig {
    pub dim: i64,
    pub heads: i64,
    pub dropout: f64,
    /// Weight of the fusion vector in the residual (0.01 in the reference).
    pub alpha: f64,
}

impl MplConfig {
    pub fn new(dim: i64) -> Self {
        MplConfig { dim, heads: 4, dropout: 0.1, alpha: 0.01 }
    }
}

/// The fused modality vectors and the CAO gates.
#[derive(Debug)]
pub struct MplOutput {
    /// [batch, 3, dim]: ECG, CXR, Lab after CMHA and CAO; zero for absent modalities.
    pub modalities: Tensor,
    /// [batch, 3] in (0, 1) for present modalities, 0 for absent ones.
    pub gates: Tensor,
}

#[derive(Debug)]
pub struct ModalityPerceptionLayer {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    norms: Vec<nn::LayerNorm>,
    gate: nn::Linear,
    config: MplConfig,
}

impl ModalityPerceptionLayer {
    pub fn new(p: &nn::Path, config: &MplConfig) -> Self {
        let d = config.dim;
        let attn = p / "cmha";
        ModalityPerceptionLayer {
            q_proj: nn::linear(&attn / "q_proj", d, d, Default::default()),
            k_proj: nn::linear(&attn / "k_proj", d, d, Default::default()),
            v_proj: nn::linear(&attn / "v_proj", d, d, Default::default()),
            out_proj: nn::linear(&attn / "out_proj", d, d, Default::default()),
            norms: MODALITIES.iter().map(|m| nn::layer_norm(p / "norm" / *m, vec![d], Default::default())).collect(),
            gate: nn::linear(p / "cao" / "gate", 3 * d, 3, Default::default()),
            config: config.clone(),
        }
    }

    /// Multi-head attention of `query` over `key`/`value` token sequences: [b, t, d] each.
    fn attention(&self, query: &Tensor, key: &Tensor, value: &Tensor, train: bool) -> Tensor {
        let (b, tq, d) = query.size3().expect("query is [batch, tokens, dim]");
        let h = self.config.heads;
        let split = |x: Tensor| {
            let t = x.size()[1];
            x.view([b, t, h, d / h]).transpose(1, 2)
        };
        let q = split(self.q_proj.forward(query));
        let k = split(self.k_proj.forward(key));
        let v = split(self.v_proj.forward(value));
        let dropout = if train { self.config.dropout } else { 0.0 };
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, dropout, false, None, false);
        self.out_proj.forward(&out.transpose(1, 2).reshape([b, tq, d]))
    }

    /// `modalities`: [batch, 3, dim] in `MODALITIES` order; `present`: [batch, 3] bool.
    pub fn forward_t(&self, modalities: &Tensor, present: &Tensor, train: bool) -> MplOutput {
        let kind = modalities.kind();
        let present_f = present.to_kind(kind); // [b, 3]
        let x = modalities * present_f.unsqueeze(-1);
        let token = |i: usize| x.narrow(1, i as i64, 1); // [b, 1, d]
        let mut fusion_sum = x.narrow(1, 0, 1).zeros_like();
        let mut counted = present_f.narrow(1, 0, 1).zeros_like(); // [b, 1]
        for (q, k, v) in CYCLE {
            let out = self.attention(&token(q), &token(k), &token(v), train); // [b, 1, d]
            let valid = present_f.narrow(1, k as i64, 1) * present_f.narrow(1, v as i64, 1); // [b, 1]
            fusion_sum += out * valid.unsqueeze(-1);
            counted += valid;
        }
        let fusion = fusion_sum / counted.clamp_min(1.0).unsqueeze(-1); // [b, 1, d]
        let fusion = fusion.dropout(self.config.dropout, train) * self.config.alpha;
        let fused: Vec<Tensor> = (0..3)
            .map(|i| self.norms[i].forward(&(token(i) + &fusion)) * present_f.narrow(1, i as i64, 1).unsqueeze(-1))
            .collect();
        let fused = Tensor::cat(&fused, 1); // [b, 3, d]
        let (b, _, d) = fused.size3().expect("fused is [batch, 3, dim]");
        let gates = self.gate.forward(&fused.reshape([b, 3 * d])).sigmoid() * &present_f; // [b, 3]
        MplOutput { modalities: &fused * gates.unsqueeze(-1).to_kind(kind), gates: gates.to_kind(Kind::Float) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn layer(dim: i64) -> (nn::VarStore, ModalityPerceptionLayer) {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let mpl = ModalityPerceptionLayer::new(&vs.root(), &MplConfig::new(dim));
        (vs, mpl)
    }

    #[test]
    fn shapes_and_gate_ranges() {
        let (_vs, mpl) = layer(32);
        let x = Tensor::randn([4, 3, 32], (Kind::Float, Device::Cpu));
        let present = Tensor::ones([4, 3], (Kind::Bool, Device::Cpu));
        let out = mpl.forward_t(&x, &present, false);
        assert_eq!(out.modalities.size(), vec![4, 3, 32]);
        assert_eq!(out.gates.size(), vec![4, 3]);
        assert!(out.gates.gt(0.0).all().int64_value(&[]) == 1);
        assert!(out.gates.lt(1.0).all().int64_value(&[]) == 1);
    }

    #[test]
    fn absent_modality_is_zero_and_cannot_leak() {
        let (_vs, mpl) = layer(16);
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let present = Tensor::from_slice(&[true, false, true, true, true, true]).view([2, 3]);
        let out = mpl.forward_t(&x, &present, false);
        assert_eq!(out.gates.double_value(&[0, 1]), 0.0);
        assert_eq!(out.modalities.get(0).get(1).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Changing the absent CXR vector of sample 0 changes nothing in sample 0's output.
        let x2 = x.copy();
        let _ = x2.get(0).get(1).fill_(100.0);
        let out2 = mpl.forward_t(&x2, &present, false);
        assert!(out.modalities.equal(&out2.modalities));
        assert!(out.gates.equal(&out2.gates));
    }

    #[test]
    fn per_sample_gates_mark_absent_modalities() {
        let (_vs, mpl) = layer(16);
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let present = Tensor::from_slice(&[true, false, true, true, true, false]).view([2, 3]);
        let out = mpl.forward_t(&x, &present, false);
        let per_sample = gates_per_sample(&out.gates, &[[true, false, true], [true, true, false]]).unwrap();
        assert_eq!(per_sample.len(), 2);
        assert_eq!(per_sample[0][1], None);
        assert_eq!(per_sample[1][2], None);
        for (row, gates) in per_sample.iter().enumerate() {
            for (m, gate) in gates.iter().enumerate() {
                if let Some(g) = gate {
                    assert!(*g > 0.0 && *g < 1.0, "sample {row} modality {m}: {g}");
                    assert_eq!(*g as f64, out.gates.double_value(&[row as i64, m as i64]) as f32 as f64);
                }
            }
        }
    }

    #[test]
    fn gradients_reach_the_layer_and_inputs() {
        let (vs, mpl) = layer(16);
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let present = Tensor::ones([2, 3], (Kind::Bool, Device::Cpu));
        let out = mpl.forward_t(&x, &present, true);
        (out.modalities.sum(Kind::Float) + out.gates.sum(Kind::Float)).backward();
        assert!(x.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
        let gate_grad = vs.variables()["cao.gate.weight"].grad();
        assert!(gate_grad.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }
}
