//! The lab encoder: an MLP over the 100-number lab vector (50 items as within-population
//! percentiles plus 50 missingness flags): 100 -> 256 -> 1024 -> 1024 with GELU and a final
//! LayerNorm in the paper; the widths are configurable for the tiny default.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabEncoderConfig {
    /// Input width followed by each layer's output width.
    pub widths: Vec<i64>,
}

impl LabEncoderConfig {
    pub fn paper() -> Self {
        LabEncoderConfig { widths: vec![100, 256, 1024, 1024] }
    }

    pub fn tiny(width: i64) -> Self {
        LabEncoderConfig { widths: vec![100, width, width] }
    }
}

#[derive(Debug)]
pub struct LabEncoder {
    layers: Vec<nn::Linear>,
    norm: nn::LayerNorm,
    pub config: LabEncoderConfig,
}

impl LabEncoder {
    pub fn new(p: &nn::Path, c: &LabEncoderConfig) -> Self {
        let layers = c
            .widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| nn::linear(p / "layers" / i, w[0], w[1], Default::default()))
            .collect();
        let out = *c.widths.last().unwrap_or(&100);
        LabEncoder { layers, norm: nn::layer_norm(p / "norm", vec![out], Default::default()), config: c.clone() }
    }

    /// `labs`: [batch, 100] -> [batch, out].
    pub fn forward(&self, labs: &Tensor) -> Tensor {
        let mut x = labs.shallow_clone();
        for layer in &self.layers {
            x = layer.forward(&x).gelu("none");
        }
        self.norm.forward(&x)
    }

    pub fn output_dim(&self) -> i64 {
        *self.config.widths.last().unwrap_or(&100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn paper_mlp_maps_100_to_1024_and_normalises() {
        let vs = nn::VarStore::new(Device::Cpu);
        let enc = LabEncoder::new(&vs.root(), &LabEncoderConfig::paper());
        let y = enc.forward(&Tensor::rand([4, 100], (Kind::Float, Device::Cpu)));
        assert_eq!(y.size(), vec![4, 1024]);
        // LayerNorm with its initial affine (1, 0): each row has mean ~0 and std ~1.
        let mean = y.mean_dim(-1, false, Kind::Float).abs().max().double_value(&[]);
        assert!(mean < 1e-4, "row mean {mean}");
    }
}
