//! Projection of an encoder's vector into the LLM's width, followed by the small adapter the
//! spec describes: three residual feed-forward blocks, each RMSNorm then a SwiGLU (w1, w2, w3).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// RMSNorm over the last dimension with a learned scale.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm { weight: p.var("weight", &[dim], nn::Init::Const(1.0)), eps }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let x32 = x.to_kind(Kind::Float);
        let rms = (x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + self.eps).rsqrt();
        (x32 * rms).to_kind(x.kind()) * &self.weight
    }
}

/// x + w2(silu(w1(norm(x))) * w3(norm(x))).
#[derive(Debug)]
struct AdapterBlock {
    norm: RmsNorm,
    w1: nn::Linear,
    w2: nn::Linear,
    w3: nn::Linear,
}

impl AdapterBlock {
    fn new(p: &nn::Path, dim: i64, hidden: i64) -> Self {
        let no_bias = nn::LinearConfig { bias: false, ..Default::default() };
        AdapterBlock {
            norm: RmsNorm::new(&(p / "norm"), dim, 1e-5),
            w1: nn::linear(p / "w1", dim, hidden, no_bias),
            w2: nn::linear(p / "w2", hidden, dim, no_bias),
            w3: nn::linear(p / "w3", dim, hidden, no_bias),
        }
    }
}

impl Module for AdapterBlock {
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.norm.forward(x);
        x + self.w2.forward(&(self.w1.forward(&h).silu() * self.w3.forward(&h)))
    }
}

/// Linear projection encoder_dim -> llm_dim, then `blocks` adapter blocks.
#[derive(Debug)]
pub struct ModalityAdapter {
    projection: nn::Linear,
    blocks: Vec<AdapterBlock>,
}

impl ModalityAdapter {
    pub fn new(p: &nn::Path, encoder_dim: i64, llm_dim: i64, blocks: usize) -> Self {
        ModalityAdapter {
            projection: nn::linear(p / "projection", encoder_dim, llm_dim, Default::default()),
            blocks: (0..blocks).map(|i| AdapterBlock::new(&(p / "blocks" / i as i64), llm_dim, 2 * llm_dim)).collect(),
        }
    }
}

impl Module for ModalityAdapter {
    fn forward(&self, x: &Tensor) -> Tensor {
        self.blocks.iter().fold(self.projection.forward(x), |h, b| b.forward(&h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn rms_norm_gives_unit_root_mean_square() {
        let vs = nn::VarStore::new(Device::Cpu);
        let norm = RmsNorm::new(&vs.root(), 16, 1e-6);
        let x = Tensor::randn([3, 16], (Kind::Float, Device::Cpu)) * 7.0;
        let rms = norm.forward(&x).pow_tensor_scalar(2).mean_dim(-1, false, Kind::Float).sqrt();
        assert!((rms - 1.0).abs().max().double_value(&[]) < 1e-4);
    }

    #[test]
    fn adapter_projects_to_the_llm_width() {
        let vs = nn::VarStore::new(Device::Cpu);
        let a = ModalityAdapter::new(&vs.root(), 48, 64, 3);
        assert_eq!(a.forward(&Tensor::randn([5, 48], (Kind::Float, Device::Cpu))).size(), vec![5, 64]);
        // projection (w, b) + 3 blocks x (norm, w1, w2, w3)
        assert_eq!(vs.variables().len(), 2 + 3 * 4);
    }
}
