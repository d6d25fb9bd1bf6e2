//! The ECG encoder: a 1-D ResNet of the xresnet1d family over 12 leads at 100 Hz, then a GRU over
//! its feature sequence and attention pooling over time, as in the MedTVT-R1 reference.
//!
//! Deviation, on purpose: GroupNorm replaces BatchNorm. BatchNorm's running statistics are
//! per-process state outside the parameters, so data-parallel learner ranks would drift apart
//! (and batch size 1 breaks it); GroupNorm keeps ranks bit-identical with nothing extra to sync.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, ModuleT};
use tch::Tensor;

/// Shape of an xresnet1d. `XResNet1dConfig::xresnet1d101()` is the paper's encoder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct XResNet1dConfig {
    pub in_channels: i64,
    /// Channels of the three stem convolutions.
    pub stem_channels: [i64; 3],
    /// Blocks per stage, e.g. [3, 4, 23, 3] for depth 101.
    pub blocks: Vec<i64>,
    /// Bottleneck width of each stage.
    pub stage_widths: Vec<i64>,
    /// 4 for bottleneck blocks (depth >= 50), 1 for basic blocks.
    pub expansion: i64,
    pub kernel_size: i64,
    /// Hidden size of the GRU after the ResNet; also the encoder's output size.
    pub rnn_hidden: i64,
}

impl XResNet1dConfig {
    /// The paper's xresnet1d-101 (feature width 768 -> GRU 1024 in the reference; here the last
    /// stage gives 2048 channels, reduced to `rnn_hidden` by the GRU).
    pub fn xresnet1d101() -> Self {
        XResNet1dConfig {
            in_channels: 12,
            stem_channels: [32, 32, 64],
            blocks: vec![3, 4, 23, 3],
            stage_widths: vec![64, 128, 256, 512],
            expansion: 4,
            kernel_size: 5,
            rnn_hidden: 1024,
        }
    }

    /// A small encoder for the CPU default: `blocks` basic blocks per stage over two stages.
    pub fn tiny(blocks: i64, rnn_hidden: i64) -> Self {
        XResNet1dConfig {
            in_channels: 12,
            stem_channels: [16, 16, 32],
            blocks: vec![blocks.max(1), blocks.max(1)],
            stage_widths: vec![32, 64],
            expansion: 1,
            kernel_size: 5,
            rnn_hidden,
        }
    }

    pub fn feature_channels(&self) -> i64 {
        self.stage_widths.last().copied().unwrap_or(self.stem_channels[2]) * self.expansion
    }
}

fn conv_norm(p: &nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, act: bool) -> nn::SequentialT {
    let conv = nn::conv1d(
        p / "conv",
        c_in,
        c_out,
        k,
        nn::ConvConfig { stride, padding: k / 2, bias: false, ..Default::default() },
    );
    let groups = if c_out % 8 == 0 { 8 } else { 1 };
    let norm = nn::group_norm(p / "norm", groups, c_out, Default::default());
    let seq = nn::seq_t().add(conv).add(norm);
    if act {
        seq.add_fn(|x| x.relu())
    } else {
        seq
    }
}

/// One residual block (basic when expansion = 1, bottleneck otherwise) with an xresnet-style
/// shortcut: average-pool then 1x1 conv when the shape changes.
#[derive(Debug)]
struct ResBlock1d {
    body: nn::SequentialT,
    shortcut: Option<nn::SequentialT>,
    stride: i64,
}

impl ResBlock1d {
    fn new(p: &nn::Path, c_in: i64, width: i64, expansion: i64, k: i64, stride: i64) -> Self {
        let c_out = width * expansion;
        let body = if expansion == 1 {
            nn::seq_t().add(conv_norm(&(p / "conv1"), c_in, width, k, stride, true)).add(conv_norm(
                &(p / "conv2"),
                width,
                c_out,
                k,
                1,
                false,
            ))
        } else {
            nn::seq_t()
                .add(conv_norm(&(p / "conv1"), c_in, width, 1, 1, true))
                .add(conv_norm(&(p / "conv2"), width, width, k, stride, true))
                .add(conv_norm(&(p / "conv3"), width, c_out, 1, 1, false))
        };
        let shortcut = (c_in != c_out).then(|| conv_norm(&(p / "shortcut"), c_in, c_out, 1, 1, false));
        ResBlock1d { body, shortcut, stride }
    }
}

impl nn::ModuleT for ResBlock1d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let mut identity = if self.stride > 1 {
            x.avg_pool1d([self.stride], [self.stride], [0], true, true)
        } else {
            x.shallow_clone()
        };
        if let Some(s) = &self.shortcut {
            identity = s.forward_t(&identity, train);
        }
        (self.body.forward_t(x, train) + identity).relu()
    }
}

/// xresnet1d + GRU + attention pooling: [batch, 12, time] -> [batch, rnn_hidden].
#[derive(Debug)]
pub struct EcgEncoder {
    resnet: nn::SequentialT,
    gru: nn::GRU,
    attention_score: nn::Linear,
    pub config: XResNet1dConfig,
}

impl EcgEncoder {
    pub fn new(p: &nn::Path, config: &XResNet1dConfig) -> Self {
        let [s0, s1, s2] = config.stem_channels;
        let k = config.kernel_size;
        let mut resnet = nn::seq_t()
            .add(conv_norm(&(p / "stem0"), config.in_channels, s0, k, 2, true))
            .add(conv_norm(&(p / "stem1"), s0, s1, k, 1, true))
            .add(conv_norm(&(p / "stem2"), s1, s2, k, 1, true))
            .add_fn(|x| x.max_pool1d([3], [2], [1], [1], false));
        let mut c_in = s2;
        for (stage, (&n_blocks, &width)) in config.blocks.iter().zip(&config.stage_widths).enumerate() {
            for b in 0..n_blocks {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                let path = p / format!("stage{stage}") / format!("block{b}");
                resnet = resnet.add(ResBlock1d::new(&path, c_in, width, config.expansion, k, stride));
                c_in = width * config.expansion;
            }
        }
        let gru = nn::gru(
            p / "gru",
            config.feature_channels(),
            config.rnn_hidden,
            nn::RNNConfig { batch_first: true, ..Default::default() },
        );
        let attention_score = nn::linear(p / "attention_score", config.rnn_hidden, 1, Default::default());
        EcgEncoder { resnet, gru, attention_score, config: config.clone() }
    }

    /// `ecg`: [batch, leads, time] in physical units (mV) at 100 Hz.
    pub fn forward_t(&self, ecg: &Tensor, train: bool) -> Tensor {
        let features = self.resnet.forward_t(ecg, train); // [b, c, t']
        let sequence = features.transpose(1, 2); // [b, t', c]
        let (hidden, _) = nn::RNN::seq(&self.gru, &sequence); // [b, t', h]
        let weights = self.attention_score.forward(&hidden).softmax(1, hidden.kind()); // [b, t', 1]
        (hidden * weights).sum_dim_intlist(1, false, None) // [b, h]
    }

    pub fn output_dim(&self) -> i64 {
        self.config.rnn_hidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn tiny_encoder_maps_a_ten_second_ecg_to_one_vector() {
        let vs = nn::VarStore::new(Device::Cpu);
        let enc = EcgEncoder::new(&vs.root(), &XResNet1dConfig::tiny(1, 48));
        let x = Tensor::randn([3, 12, 1000], (Kind::Float, Device::Cpu));
        let y = enc.forward_t(&x, false);
        assert_eq!(y.size(), vec![3, 48]);
        assert!(y.isfinite().all().int64_value(&[]) == 1);
    }

    #[test]
    fn depth_101_has_the_expected_block_count() {
        let cfg = XResNet1dConfig::xresnet1d101();
        // ResNet depth counting: one stem conv + 3 convs per bottleneck block + the head = 101.
        assert_eq!(1 + 3 * cfg.blocks.iter().sum::<i64>() + 1, 101);
        assert_eq!(cfg.feature_channels(), 2048);
    }
}
