//! The Llama decoder: RMSNorm, rotary embeddings (with the llama3 rescaling), grouped-query
//! attention through `scaled_dot_product_attention`, the SwiGLU MLP, and a preallocated KV cache.
//!
//! Variable names under the `nn::Path` given to `Llama::new` are exactly HF's
//! (`model.layers.0.self_attn.q_proj.weight`, ...), so HF checkpoints load by name and a
//! multimodal wrapper can own the VarStore and put the decoder under its root.
//!
//! Positions are derived per row from the attention mask (`cumsum(mask) - 1`), which is what HF
//! `generate` does: left-padded rows then see the same positions as unpadded ones.

use super::config::LlamaConfig;
use crate::adapter::RmsNorm;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

const INIT_STD: f64 = 0.02;

/// Per-layer key/value buffers, allocated once for `capacity` positions and written in place.
///
/// Layout per layer: `[batch, kv_heads, capacity, head_dim]`. A forward pass with a cache
/// writes its keys/values at `len..len + t` and attends over `0..len + t`, then advances `len`.
/// If a pass would exceed `capacity` the buffers grow (doubling), so the cache is correct for any
/// length and allocation-free when sized up front.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: i64,
    capacity: i64,
    batch: i64,
}

impl KvCache {
    /// Buffers for `batch` rows and `capacity` positions of every layer of `cfg`.
    pub fn new(cfg: &LlamaConfig, batch: i64, capacity: i64, kind: Kind, device: Device) -> Self {
        let shape = [batch, cfg.num_key_value_heads, capacity.max(1), cfg.head_dim];
        let layers = cfg.num_hidden_layers as usize;
        KvCache {
            keys: (0..layers).map(|_| Tensor::zeros(shape, (kind, device))).collect(),
            values: (0..layers).map(|_| Tensor::zeros(shape, (kind, device))).collect(),
            len: 0,
            capacity: capacity.max(1),
            batch,
        }
    }

    /// Positions already cached.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before they must grow.
    pub fn capacity(&self) -> i64 {
        self.capacity
    }

    pub fn batch(&self) -> i64 {
        self.batch
    }

    /// A cache of `batch * g` rows in which rows `i * g .. i * g + g` are copies of this cache's
    /// row `i`, with room for `capacity` positions: the G completions of a GRPO group continue
    /// from one prefill of their prompt instead of G identical ones.
    pub fn repeat_rows(&self, g: i64, capacity: i64) -> KvCache {
        let capacity = capacity.max(self.len).max(1);
        let copy = |buffer: &Tensor| {
            let mut shape = buffer.size();
            shape[0] *= g;
            shape[2] = capacity;
            let out = Tensor::zeros(&shape, (buffer.kind(), buffer.device()));
            out.narrow(2, 0, self.len).copy_(&buffer.narrow(2, 0, self.len).repeat_interleave_self_int(
                g,
                0,
                None::<i64>,
            ));
            out
        };
        KvCache {
            keys: self.keys.iter().map(copy).collect(),
            values: self.values.iter().map(copy).collect(),
            len: self.len,
            capacity,
            batch: self.batch * g,
        }
    }

    /// Appends `src`'s cached positions as new columns of this cache: for each `(src_row,
    /// dst_row)` pair, row `dst_row` gets `src_row`'s keys and values. Every row's length grows by
    /// `src.len()`; what the other rows hold in the new columns is left over from before, so their
    /// attention mask must exclude them (continuous batching, `engine.rs`).
    pub fn append_rows(&mut self, src: &KvCache, placement: &[(i64, i64)]) {
        let (t, at) = (src.len, self.len);
        self.reserve(at + t);
        if t > 0 && !placement.is_empty() {
            let device = self.keys.first().map_or(Device::Cpu, Tensor::device);
            let from = Tensor::from_slice(&placement.iter().map(|p| p.0).collect::<Vec<_>>()).to_device(device);
            let to = Tensor::from_slice(&placement.iter().map(|p| p.1).collect::<Vec<_>>()).to_device(device);
            let pairs = self.keys.iter_mut().zip(&src.keys).chain(self.values.iter_mut().zip(&src.values));
            for (dst, src) in pairs {
                let _ = dst.narrow(2, at, t).index_copy_(0, &to, &src.narrow(2, 0, t).index_select(0, &from));
            }
        }
        self.len = at + t;
    }

    /// Keeps, for each row r, the cached columns `columns[r]` (`[batch, width]` i64 indices into
    /// `0..len`), in that order, as the new columns `0..width`, in buffers of `capacity` positions.
    pub fn gather_columns(&mut self, columns: &Tensor, capacity: i64) {
        let width = columns.size()[1];
        let capacity = capacity.max(width).max(1);
        for buffer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let shape = buffer.size(); // [b, kv, cap, hd]
            let index = columns.view([shape[0], 1, width, 1]).expand([shape[0], shape[1], width, shape[3]], false);
            let kept = buffer.narrow(2, 0, self.len).gather(2, &index, false);
            let grown = Tensor::zeros([shape[0], shape[1], capacity, shape[3]], (buffer.kind(), buffer.device()));
            grown.narrow(2, 0, width).copy_(&kept);
            *buffer = grown;
        }
        self.len = width;
        self.capacity = capacity;
    }

    /// Forgets the cached positions; the buffers are kept for reuse.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Makes room for `needed` positions, copying what is cached into larger buffers.
    fn reserve(&mut self, needed: i64) {
        if needed <= self.capacity {
            return;
        }
        let capacity = needed.max(2 * self.capacity);
        for buffer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut shape = buffer.size();
            shape[2] = capacity;
            let grown = Tensor::zeros(&shape, (buffer.kind(), buffer.device()));
            grown.narrow(2, 0, self.len).copy_(&buffer.narrow(2, 0, self.len));
            *buffer = grown;
        }
        self.capacity = capacity;
    }

    /// Writes `k`, `v` (`[b, kv_heads, t, head_dim]`) of `layer` at `len` and returns the views
    /// over every cached position including them. `len` advances in `advance`.
    fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[2];
        self.keys[layer].narrow(2, self.len, t).copy_(k);
        self.values[layer].narrow(2, self.len, t).copy_(v);
        (self.keys[layer].narrow(2, 0, self.len + t), self.values[layer].narrow(2, 0, self.len + t))
    }

    fn advance(&mut self, t: i64) {
        self.len += t;
    }
}

/// The inverse frequencies of the rotary embedding, `[head_dim / 2]` f32, computed with the same
/// tensor operations as transformers so the tables match to the last bit.
fn rope_inv_freq(cfg: &LlamaConfig, device: Device) -> Tensor {
    let dim = cfg.head_dim;
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / dim as f64;
    let inv_freq = Tensor::pow_scalar(cfg.rope_theta, &exponent).reciprocal();
    let Some(s) = &cfg.rope_scaling else { return inv_freq };
    // Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    // interpolated smoothly.
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / s.low_freq_factor;
    let high_freq_wavelen = old_context / s.high_freq_factor;
    let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
    let scaled = (&inv_freq / s.factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
    let smooth = (wavelen.reciprocal() * old_context - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
    let smoothed = (smooth.neg() + 1.0) * &scaled / s.factor + &smooth * &scaled;
    let medium = wavelen.lt(high_freq_wavelen).logical_not().logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
    smoothed.where_self(&medium, &scaled)
}

/// `[x1, x2] -> [-x2, x1]` over the last dimension.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    Tensor::cat(&[x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)], -1)
}

fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    x * cos + rotate_half(x) * sin
}

fn linear(p: nn::Path, inputs: i64, outputs: i64, bias: bool) -> nn::Linear {
    let config = nn::LinearConfig {
        ws_init: nn::Init::Randn { mean: 0.0, stdev: INIT_STD },
        bs_init: Some(nn::Init::Const(0.0)),
        bias,
    };
    nn::linear(p, inputs, outputs, config)
}

/// Multi-head attention with `num_key_value_heads` shared key/value heads.
#[derive(Debug)]
struct Attention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    o_proj: nn::Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        let (d, h, kv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        Attention {
            q_proj: linear(p / "q_proj", d, h * hd, cfg.qkv_bias()),
            k_proj: linear(p / "k_proj", d, kv * hd, cfg.qkv_bias()),
            v_proj: linear(p / "v_proj", d, kv * hd, cfg.qkv_bias()),
            o_proj: linear(p / "o_proj", h * hd, d, cfg.o_proj_bias()),
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        }
    }

    /// x `[b, t, d]`, cos/sin `[b, 1, t, head_dim]`, mask `[b, 1, t, past + t]` (true = attend;
    /// `None` = causal attention over an unpadded, uncached sequence).
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let split = |y: Tensor, heads: i64| y.view([b, t, heads, self.head_dim]).transpose(1, 2);
        let q = apply_rotary(&split(self.q_proj.forward(x), self.heads), &rope.0, &rope.1); // [b, h, t, hd]
        let k = apply_rotary(&split(self.k_proj.forward(x), self.kv_heads), &rope.0, &rope.1); // [b, kv, t, hd]
        let v = split(self.v_proj.forward(x), self.kv_heads);
        let (k, v) = match cache {
            Some((cache, layer)) => cache.write(layer, &k, &v), // [b, kv, past + t, hd]
            None => (k, v),
        };
        let gqa = self.kv_heads != self.heads;
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, mask.is_none(), None, gqa);
        self.o_proj.forward(&y.transpose(1, 2).reshape([b, t, self.heads * self.head_dim]))
    }
}

/// down(silu(gate(x)) * up(x)).
#[derive(Debug)]
struct SwiGlu {
    gate_proj: nn::Linear,
    up_proj: nn::Linear,
    down_proj: nn::Linear,
}

impl SwiGlu {
    fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        SwiGlu {
            gate_proj: linear(p / "gate_proj", d, i, false),
            up_proj: linear(p / "up_proj", d, i, false),
            down_proj: linear(p / "down_proj", i, d, false),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// x + attn(norm(x)), then x + mlp(norm(x)).
#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: SwiGlu,
}

impl DecoderLayer {
    fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        DecoderLayer {
            input_layernorm: RmsNorm::new(&(p / "input_layernorm"), cfg.hidden_size, cfg.rms_norm_eps),
            self_attn: Attention::new(&(p / "self_attn"), cfg),
            post_attention_layernorm: RmsNorm::new(
                &(p / "post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            ),
            mlp: SwiGlu::new(&(p / "mlp"), cfg),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Tensor {
        let x = x + self.self_attn.forward(&self.input_layernorm.forward(x), rope, mask, cache);
        &x + self.mlp.forward(&self.post_attention_layernorm.forward(&x))
    }
}

/// A Llama-family causal language model (`LlamaForCausalLM` / `Qwen2ForCausalLM` layout).
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: nn::Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `None` when the output projection is tied to `embed_tokens`.
    lm_head: Option<nn::Linear>,
    inv_freq: Tensor,
}

impl Llama {
    /// Creates the variables under `p` (`p/model/...`, `p/lm_head` unless tied) in the path's
    /// device and kind, randomly initialised (normal, std 0.02; norms at one) as HF does.
    pub fn new(p: &nn::Path, cfg: &LlamaConfig) -> Self {
        let m = p / "model";
        let embedding_config =
            nn::EmbeddingConfig { ws_init: nn::Init::Randn { mean: 0.0, stdev: INIT_STD }, ..Default::default() };
        let layers_path = &m / "layers";
        Llama {
            embed_tokens: nn::embedding(&m / "embed_tokens", cfg.vocab_size, cfg.hidden_size, embedding_config),
            layers: (0..cfg.num_hidden_layers).map(|i| DecoderLayer::new(&(&layers_path / i), cfg)).collect(),
            norm: RmsNorm::new(&(&m / "norm"), cfg.hidden_size, cfg.rms_norm_eps),
            lm_head: (!cfg.tie_word_embeddings).then(|| linear(p / "lm_head", cfg.hidden_size, cfg.vocab_size, false)),
            inv_freq: rope_inv_freq(cfg, p.device()),
            config: cfg.clone(),
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn device(&self) -> Device {
        self.embed_tokens.ws.device()
    }

    /// The kind of the weights (and of hidden states and the KV cache).
    pub fn kind(&self) -> Kind {
        self.embed_tokens.ws.kind()
    }

    /// A cache for `batch` rows sized for `capacity` positions, on this model's device and kind.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> KvCache {
        KvCache::new(&self.config, batch, capacity, self.kind(), self.device())
    }

    /// `[b, t]` i64 ids -> `[b, t, d]` embeddings.
    pub fn embed_tokens(&self, ids: &Tensor) -> Tensor {
        self.embed_tokens.forward(ids)
    }

    /// Logits `[b, t, vocab]` (f32) for embeddings `[b, t, d]`. `attention_mask` `[b, past + t]`
    /// (1/true real, 0/false padding; i64 or bool) covers the cached positions and the new ones.
    pub fn forward_embeds(&self, embeds: &Tensor, attention_mask: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        self.logits(&self.forward_hidden(embeds, attention_mask, cache))
    }

    /// `forward_embeds` on the embeddings of `ids` `[b, t]`.
    pub fn forward(&self, ids: &Tensor, attention_mask: &Tensor, cache: Option<&mut KvCache>) -> Tensor {
        self.forward_embeds(&self.embed_tokens(ids), attention_mask, cache)
    }

    /// Final-normed hidden states `[b, t, d]`: `forward_embeds` without the vocabulary
    /// projection, so callers needing logits at a few positions only project those.
    ///
    /// Panics if the mask's length is not `cache.len() + t` or the cache's batch differs: both
    /// are caller bugs, not data errors.
    pub fn forward_hidden(&self, embeds: &Tensor, attention_mask: &Tensor, mut cache: Option<&mut KvCache>) -> Tensor {
        let (b, t) = (embeds.size()[0], embeds.size()[1]);
        let past = cache.as_ref().map_or(0, |c| c.len());
        let mask_shape = attention_mask.size();
        assert!(
            mask_shape == [b, past + t],
            "attention_mask has shape {mask_shape:?}, expected [{b}, {}] (batch, cached + new positions)",
            past + t
        );
        if let Some(cache) = cache.as_deref_mut() {
            assert!(cache.batch() == b, "KvCache holds {} rows, the input has {b}", cache.batch());
            cache.reserve(past + t);
        }
        let mask = attention_mask.to_kind(Kind::Int64);
        let positions = (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0).narrow(1, past, t); // [b, t]
        let rope = self.rotary(&positions);
        // An unpadded first pass is plain causal attention: no mask lets SDPA pick its fused
        // causal kernel. (Checking costs one device sync, paid only for multi-token passes.)
        let unpadded_prefill = past == 0 && t > 1 && mask.min().int64_value(&[]) != 0;
        let attend = if unpadded_prefill { None } else { Some(attention_mask_4d(&mask, past, t)) };
        let mut x = embeds.shallow_clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rope, attend.as_ref(), cache.as_deref_mut().map(|c| (c, i)));
        }
        if let Some(cache) = cache {
            cache.advance(t);
        }
        self.norm.forward(&x)
    }

    /// Vocabulary logits (f32) of hidden states `[..., d]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.linear(&self.embed_tokens.ws, None::<Tensor>),
        };
        logits.to_kind(Kind::Float)
    }

    /// cos and sin `[b, 1, t, head_dim]` in the model's kind for positions `[b, t]`.
    fn rotary(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq; // [b, t, hd/2]
        let angles = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        (angles.cos().to_kind(self.kind()), angles.sin().to_kind(self.kind()))
    }
}

/// Boolean `[b, 1, t, past + t]`: query i (absolute position past + i) may attend key j when key j
/// is real and j <= past + i. Each query may always attend itself, so padding queries (whose
/// outputs are never used) get a finite softmax instead of NaNs that would leak into later
/// layers through 0 * NaN.
fn attention_mask_4d(mask: &Tensor, past: i64, t: i64) -> Tensor {
    let device = mask.device();
    let total = past + t;
    let query = Tensor::arange_start(past, total, (Kind::Int64, device)).unsqueeze(1); // [t, 1]
    let key = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0); // [1, total]
    let causal = key.le_tensor(&query); // [t, total]
    let key_real = mask.ne(0).unsqueeze(1).unsqueeze(1); // [b, 1, 1, total]
    key_real.logical_and(&causal).logical_or(&key.eq_tensor(&query))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (nn::VarStore, Llama) {
        tch::manual_seed(7);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = LlamaConfig::tiny(50, 32, 64, 2, 4, 2);
        let model = Llama::new(&vs.root(), &cfg);
        (vs, model)
    }

    #[test]
    fn variable_names_are_hf_names() {
        let (vs, _) = tiny();
        let vars = vs.variables();
        for name in [
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert!(!vars.contains_key("lm_head.weight"), "tied model must not own lm_head");
        assert_eq!(vars["model.layers.0.self_attn.k_proj.weight"].size(), [16, 32]);
    }

    #[test]
    fn cached_decoding_equals_full_forward_and_survives_growth() {
        let (_vs, model) = tiny();
        let ids = Tensor::from_slice(&[3i64, 9, 4, 7, 1, 8, 2, 5]).view([1, 8]);
        let mask = Tensor::ones([1, 8], (Kind::Int64, Device::Cpu));
        let full = model.forward(&ids, &mask, None);
        let mut cache = model.new_cache(1, 2); // forces the buffers to grow
        let mut steps = vec![model.forward(&ids.narrow(1, 0, 3), &mask.narrow(1, 0, 3), Some(&mut cache))];
        for i in 3..8 {
            steps.push(model.forward(&ids.narrow(1, i, 1), &mask.narrow(1, 0, i + 1), Some(&mut cache)));
        }
        assert_eq!(cache.len(), 8);
        let diff = (Tensor::cat(&steps, 1) - full).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "cached logits differ by {diff}");
    }

    #[test]
    fn left_padding_does_not_change_real_logits() {
        let (_vs, model) = tiny();
        let ids = Tensor::from_slice(&[3i64, 9, 4]).view([1, 3]);
        let plain = model.forward(&ids, &Tensor::ones([1, 3], (Kind::Int64, Device::Cpu)), None);
        let padded_ids = Tensor::from_slice(&[0i64, 0, 3, 9, 4]).view([1, 5]);
        let mask = Tensor::from_slice(&[false, false, true, true, true]).view([1, 5]);
        let padded = model.forward(&padded_ids, &mask, None);
        assert!(!bool::try_from(padded.isnan().any()).unwrap_or(true), "NaN in padded logits");
        let diff = (padded.narrow(1, 2, 3) - plain).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "padding changed logits by {diff}");
    }

    #[test]
    fn llama3_scaling_divides_long_wavelengths_only() {
        let mut cfg = LlamaConfig::tiny(10, 64, 64, 1, 2, 2); // head_dim 32
        let plain = rope_inv_freq(&cfg, Device::Cpu);
        cfg.rope_scaling = Some(super::super::config::Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        });
        let scaled = rope_inv_freq(&cfg, Device::Cpu);
        let ratio = Vec::<f64>::try_from(&(plain / scaled).to_kind(Kind::Double)).unwrap_or_default();
        assert_eq!(ratio.len(), 16);
        assert!((ratio[0] - 1.0).abs() < 1e-6, "highest frequency must be kept: {ratio:?}");
        assert!((ratio[15] - 8.0).abs() < 1e-5, "lowest frequency must be divided by 8: {ratio:?}");
        assert!(ratio.windows(2).all(|w| w[1] >= w[0] - 1e-6), "ratio must not decrease: {ratio:?}");
    }
}
