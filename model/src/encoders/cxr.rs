//! The chest X-ray encoder: a Vision Transformer (ViT-B/16 at 224 px in the real config, a small
//! one for the CPU default) whose output tokens are pooled into one vector by a learned 1x1
//! Conv1d over the token axis, as in the MedTVT-R1 reference.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::Tensor;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VitConfig {
    pub image_size: i64,
    pub patch_size: i64,
    pub in_channels: i64,
    pub width: i64,
    pub depth: i64,
    pub heads: i64,
    pub mlp_ratio: i64,
}

impl VitConfig {
    /// ViT-B/16 at 224 x 224: 196 patches + the class token = 197 tokens of width 768.
    pub fn vit_b16() -> Self {
        VitConfig { image_size: 224, patch_size: 16, in_channels: 3, width: 768, depth: 12, heads: 12, mlp_ratio: 4 }
    }

    pub fn tiny(image_size: i64, patch_size: i64, depth: i64, width: i64) -> Self {
        VitConfig { image_size, patch_size, in_channels: 3, width, depth, heads: 4, mlp_ratio: 2 }
    }

    pub fn num_tokens(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2) + 1
    }
}

/// Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).
#[derive(Debug)]
struct VitBlock {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl VitBlock {
    fn new(p: &nn::Path, c: &VitConfig) -> Self {
        let w = c.width;
        VitBlock {
            norm1: nn::layer_norm(p / "norm1", vec![w], Default::default()),
            qkv: nn::linear(p / "attn" / "qkv", w, 3 * w, Default::default()),
            proj: nn::linear(p / "attn" / "proj", w, w, Default::default()),
            norm2: nn::layer_norm(p / "norm2", vec![w], Default::default()),
            fc1: nn::linear(p / "mlp" / "fc1", w, w * c.mlp_ratio, Default::default()),
            fc2: nn::linear(p / "mlp" / "fc2", w * c.mlp_ratio, w, Default::default()),
            heads: c.heads,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, w) = x.size3().expect("ViT block input is [batch, tokens, width]");
        let head_dim = w / self.heads;
        let qkv =
            self.qkv.forward(&self.norm1.forward(x)).view([b, t, 3, self.heads, head_dim]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2)); // each [b, heads, t, head_dim]
        let attn = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false);
        let x = x + self.proj.forward(&attn.transpose(1, 2).reshape([b, t, w]));
        let h = self.fc2.forward(&self.fc1.forward(&self.norm2.forward(&x)).gelu("none"));
        x + h
    }
}

/// ViT + token pooling: [batch, channels, H, W] -> [batch, width].
#[derive(Debug)]
pub struct CxrEncoder {
    patch_embed: nn::Conv2D,
    class_token: Tensor,
    position_embedding: Tensor,
    blocks: Vec<VitBlock>,
    norm: nn::LayerNorm,
    token_pool: nn::Conv1D,
    pub config: VitConfig,
}

impl CxrEncoder {
    pub fn new(p: &nn::Path, c: &VitConfig) -> Self {
        let patch_embed = nn::conv2d(
            p / "patch_embed",
            c.in_channels,
            c.width,
            c.patch_size,
            nn::ConvConfig { stride: c.patch_size, ..Default::default() },
        );
        let init = nn::Init::Randn { mean: 0.0, stdev: 0.02 };
        CxrEncoder {
            patch_embed,
            class_token: p.var("class_token", &[1, 1, c.width], init),
            position_embedding: p.var("position_embedding", &[1, c.num_tokens(), c.width], init),
            blocks: (0..c.depth).map(|i| VitBlock::new(&(p / "blocks" / i), c)).collect(),
            norm: nn::layer_norm(p / "norm", vec![c.width], Default::default()),
            token_pool: nn::conv1d(p / "token_pool", c.num_tokens(), 1, 1, Default::default()),
            config: c.clone(),
        }
    }

    /// All output tokens: [batch, num_tokens, width].
    pub fn tokens(&self, image: &Tensor) -> Tensor {
        let b = image.size()[0];
        let patches = self.patch_embed.forward(image).flatten(2, 3).transpose(1, 2); // [b, n, w]
        let cls = self.class_token.expand([b, 1, self.config.width], true);
        let mut x = Tensor::cat(&[cls, patches], 1) + &self.position_embedding;
        for block in &self.blocks {
            x = block.forward(&x);
        }
        self.norm.forward(&x)
    }

    /// One vector per image: the 1x1 Conv1d over the token axis mixes the tokens.
    pub fn forward(&self, image: &Tensor) -> Tensor {
        self.token_pool.forward(&self.tokens(image)).squeeze_dim(1)
    }

    pub fn output_dim(&self) -> i64 {
        self.config.width
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn vit_b16_has_197_tokens() {
        assert_eq!(VitConfig::vit_b16().num_tokens(), 197);
    }

    #[test]
    fn tiny_vit_pools_tokens_into_one_vector() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = VitConfig::tiny(32, 8, 1, 32);
        let enc = CxrEncoder::new(&vs.root(), &cfg);
        let img = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
        assert_eq!(enc.tokens(&img).size(), vec![2, 17, 32]);
        assert_eq!(enc.forward(&img).size(), vec![2, 32]);
    }
}
