//! MedTVT-R1 assembled: three modality encoders, a projection + adapter per modality, the
//! Modality Perception Layer, and the Llama decoder whose input embeddings receive each
//! modality's vector at its placeholder token (`<ecg>`, `<cxr>`, `<lab>`).
//!
//! Variable names in the one `VarStore`: the decoder under `llm.` with HF names below it
//! (`llm.model.layers.0.self_attn.q_proj.weight`), the rest under `ecg_encoder.`, `cxr_encoder.`,
//! `lab_encoder.`, `{ecg,cxr,lab}_adapter.` and `mpl.`. A checkpoint directory holds
//! `config.json` + `model.safetensors` (the decoder alone, HF layout: transformers reads it),
//! `modality.safetensors` (everything else), `medtvt.json` (the modality side's shapes),
//! `tokenizer.json`, and `tokenizer_config.json` + `generation_config.json` (the chat template
//! and special tokens, see [`crate::special_tokens`]). A bare HF Llama directory (no
//! `medtvt.json`) loads too: the decoder from it, the modality side freshly initialised (the
//! paper's sizes unless the run config says `model.encoders = "tiny"`); a fresh modality side
//! takes pretrained encoder weights from the safetensors files the run config names
//! (docs/model.md, which also covers bringing your own base).
//!
//! The modality placeholders are added to any tokenizer that lacks them (a base that has them
//! keeps their ids); when the new ids do not fit the decoder's vocabulary, its embeddings (and
//! an untied `lm_head`) grow as transformers' `resize_token_embeddings` grows them
//! ([`crate::llama::resize`]). Prompts are the checkpoint's own `chat_template` rendered with the
//! system prompt and the generation prompt; `<think>`/`<answer>` are plain text to a pretrained
//! tokenizer (special tokens only in the tiny one) and the rewards parse the decoded text either way.
//!
//! Stages (spec): PT trains adapters, token embeddings and the decoder's norms, without the MPL;
//! SFT adds the MPL; RFT (GRPO) trains MPL, embeddings and norms. A model trained from scratch
//! (the tiny CPU default) trains everything in every stage.

use crate::adapter::ModalityAdapter;
use crate::chat_template::{ChatTemplate, ChatTemplateError, TemplateTokens};
use crate::encoders::pretrained::{encoder_tensors, load_encoder_weights};
use crate::encoders::{
    CxrEncoder, EcgEncoder, Encoder, EncoderWeightsError, LabEncoder, LabEncoderConfig, VitConfig, XResNet1dConfig,
};
use crate::llama::{self, GenerateError, Generation, Llama, LlamaConfig, SamplingParams, WeightsError};
use crate::perception::{gates_per_sample, ModalityPerceptionLayer, MplConfig, SampleGates};
use crate::special_tokens::{ChatFormat, SpecialTokens, SpecialTokensError};
use crate::tokenizer::{MedTokenizer, TokenizerError};
use medtvt_config::{DType, EncoderSizes, RunConfig, Stage};
use medtvt_data::ModalityInputs;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// ECG input: 12 leads x 1000 samples (10 s at 100 Hz).
pub const ECG_LEADS: i64 = 12;
pub const ECG_SAMPLES: i64 = 1000;
/// Lab input: 50 percentiles + 50 missingness flags.
pub const LAB_FEATURES: i64 = 100;

/// Special tokens of the from-scratch tokenizer; the modality placeholders are added to a
/// pretrained tokenizer that lacks them.
pub const TINY_SPECIAL_TOKENS: [&str; 11] = [
    "<pad>",
    "<eos>",
    "<ecg>",
    "<cxr>",
    "<lab>",
    "<|user|>",
    "<|assistant|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
];
const PLACEHOLDERS: [&str; 3] = ["<ecg>", "<cxr>", "<lab>"];
/// The file that tells our checkpoint directory from a bare HF Llama one.
const MEDTVT_JSON: &str = "medtvt.json";

/// The tiny model's chat template, `<|user|>question<|assistant|>`: written to its checkpoints'
/// tokenizer_config.json like any base's template. The tiny model is trained from scratch
/// without a system prompt, so the template leaves the system message out.
pub const TINY_CHAT_TEMPLATE: &str =
    "{% for message in messages %}{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}\
{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// What the model asks the assistant to do (the spec's system prompt, in our words).
pub const SYSTEM_PROMPT: &str = "A conversation between User and Assistant. The Assistant first reasons about the \
ECG, chest X-ray and blood tests, then answers. The reasoning is inside <think></think> and the answer, the \
diseases separated by semicolons, inside <answer></answer>.";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    EncoderWeights(#[from] EncoderWeightsError),
    #[error(transparent)]
    SpecialTokens(#[from] SpecialTokensError),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("reading tensors back: {0}")]
    Torch(#[from] tch::TchError),
}

/// Shapes of the modality side, saved as `medtvt.json` beside the decoder.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModalityConfig {
    pub ecg: XResNet1dConfig,
    pub cxr: VitConfig,
    pub lab: LabEncoderConfig,
    pub adapter_blocks: usize,
    pub mpl_heads: i64,
    pub mpl_dropout: f64,
    pub mpl_alpha: f64,
}

impl ModalityConfig {
    /// The paper's encoders: xresnet1d-101 + GRU, ViT-B/16 at 224 px, the 100-256-1024-1024 MLP.
    pub fn paper() -> Self {
        ModalityConfig {
            ecg: XResNet1dConfig::xresnet1d101(),
            cxr: VitConfig::vit_b16(),
            lab: LabEncoderConfig::paper(),
            adapter_blocks: 3,
            mpl_heads: 4,
            mpl_dropout: 0.1,
            mpl_alpha: 0.01,
        }
    }

    /// The small CPU default, sized from `[model.tiny]`.
    pub fn tiny(t: &medtvt_config::TinyModel) -> Self {
        let w = t.hidden_size as i64;
        ModalityConfig {
            ecg: XResNet1dConfig::tiny(t.ecg_resnet_blocks as i64, w),
            cxr: VitConfig::tiny(t.image_size as i64, t.vit_patch_size as i64, t.vit_depth as i64, w),
            lab: LabEncoderConfig::tiny(w),
            adapter_blocks: 3,
            mpl_heads: 4,
            mpl_dropout: 0.1,
            mpl_alpha: 0.01,
        }
    }
}

/// Trainable and frozen parameter counts after `set_trainable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainableSummary {
    pub trainable: usize,
    pub frozen: usize,
    /// Which groups train, e.g. `["adapters", "embeddings", "norms"]`.
    pub groups: Vec<String>,
}

impl std::fmt::Display for TrainableSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} trainable / {} frozen parameters ({})", self.trainable, self.frozen, self.groups.join(", "))
    }
}

/// Prompts ready for the model: ids left-padded, modality tensors and which modalities exist.
#[derive(Debug)]
pub struct PromptBatch {
    /// [b, t] i64, left-padded.
    pub ids: Tensor,
    /// [b, t] i64, 1 real / 0 pad.
    pub mask: Tensor,
    /// [b, 12, 1000], zeros where absent.
    pub ecg: Tensor,
    /// [b, 3, S, S], zeros where absent.
    pub cxr: Tensor,
    /// [b, 100], zeros where absent.
    pub lab: Tensor,
    /// [b, 3] bool in (ecg, cxr, lab) order, on the model's device.
    pub present: Tensor,
    /// The same on the host, so that which encoders run is decided without reading the device.
    pub present_rows: Vec<[bool; 3]>,
    /// Rows come in runs of this many copies of the same prompt (1 unless
    /// [`PromptBatch::repeat_interleave`] made the batch): the encoders then run once per run.
    pub repeats: i64,
}

impl PromptBatch {
    pub fn len(&self) -> usize {
        self.ids.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every row repeated `g` times in place (row i becomes rows i*g .. i*g+g-1): the layout of
    /// a GRPO group.
    pub fn repeat_interleave(&self, g: i64) -> PromptBatch {
        let r = |t: &Tensor| t.repeat_interleave_self_int(g, 0, None::<i64>);
        PromptBatch {
            ids: r(&self.ids),
            mask: r(&self.mask),
            ecg: r(&self.ecg),
            cxr: r(&self.cxr),
            lab: r(&self.lab),
            present: r(&self.present),
            present_rows: self.present_rows.iter().flat_map(|row| std::iter::repeat_n(*row, g as usize)).collect(),
            repeats: self.repeats * g,
        }
    }

    /// One row per run of [`PromptBatch::repeats`] copies: the distinct prompts, `repeats` = 1.
    pub fn distinct_prompts(&self) -> PromptBatch {
        let repeats = self.repeats.max(1);
        if repeats == 1 {
            return self.repeat_interleave(1);
        }
        let n = self.ids.size()[0];
        let rows = Tensor::arange_start_step(0, n, repeats, (Kind::Int64, self.ids.device()));
        let pick = |t: &Tensor| t.index_select(0, &rows.to_device(t.device()));
        PromptBatch {
            ids: pick(&self.ids),
            mask: pick(&self.mask),
            ecg: pick(&self.ecg),
            cxr: pick(&self.cxr),
            lab: pick(&self.lab),
            present: pick(&self.present),
            present_rows: self.present_rows.iter().step_by(repeats as usize).copied().collect(),
            repeats: 1,
        }
    }
}

/// The parameter groups of the spec's stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamGroup {
    Encoders,
    Adapters,
    Mpl,
    Embeddings,
    Norms,
    DecoderRest,
}

impl ParamGroup {
    fn of(name: &str) -> ParamGroup {
        if name.starts_with("ecg_encoder.") || name.starts_with("cxr_encoder.") || name.starts_with("lab_encoder.") {
            ParamGroup::Encoders
        } else if name.contains("_adapter.") {
            ParamGroup::Adapters
        } else if name.starts_with("mpl.") {
            ParamGroup::Mpl
        } else if name.starts_with("llm.") && (name.contains("embed_tokens") || name.starts_with("llm.lm_head")) {
            ParamGroup::Embeddings
        } else if name.starts_with("llm.") && name.contains("norm") {
            ParamGroup::Norms
        } else {
            ParamGroup::DecoderRest
        }
    }

    fn name(self) -> &'static str {
        match self {
            ParamGroup::Encoders => "encoders",
            ParamGroup::Adapters => "adapters",
            ParamGroup::Mpl => "mpl",
            ParamGroup::Embeddings => "embeddings",
            ParamGroup::Norms => "norms",
            ParamGroup::DecoderRest => "decoder",
        }
    }

    /// The spec's trainable groups per stage.
    fn for_stage(stage: Stage) -> &'static [ParamGroup] {
        match stage {
            Stage::Pt => &[ParamGroup::Adapters, ParamGroup::Embeddings, ParamGroup::Norms],
            Stage::Sft => &[ParamGroup::Mpl, ParamGroup::Adapters, ParamGroup::Embeddings, ParamGroup::Norms],
            Stage::Grpo => &[ParamGroup::Mpl, ParamGroup::Embeddings, ParamGroup::Norms],
        }
    }
}

/// MedTVT-R1: the multimodal model.
pub struct MedTvt {
    vs: nn::VarStore,
    llm: Llama,
    ecg_encoder: EcgEncoder,
    cxr_encoder: CxrEncoder,
    lab_encoder: LabEncoder,
    adapters: [ModalityAdapter; 3],
    mpl: ModalityPerceptionLayer,
    /// The MPL joins in SFT; PT feeds the adapters' outputs straight to the decoder.
    use_mpl: bool,
    tokenizer: MedTokenizer,
    modality: ModalityConfig,
    placeholder_ids: [i64; 3],
    pad_id: i64,
    eos_ids: Vec<i64>,
    /// The checkpoint's chat template and special tokens (`pad_id` and `eos_ids` are its ids).
    chat: ChatFormat,
    /// Prompt tokens after the question (the assistant header), kept when a prompt is truncated.
    prompt_tail_tokens: usize,
    /// (stored, grown) vocabulary sizes when loading added rows for new tokens.
    vocab_resize: Option<(i64, i64)>,
}

impl std::fmt::Debug for MedTvt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MedTvt").field("llm", self.llm.config()).field("modality", &self.modality).finish()
    }
}

fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::Bf16 => Kind::BFloat16,
        DType::F16 => Kind::Half,
    }
}

impl MedTvt {
    /// Builds the model a run config describes: `model.checkpoint` when set (our checkpoint or a
    /// bare HF Llama directory), else the tiny model of `[model.tiny]` with `tokenizer` (needed
    /// then). Initialisation draws from libtorch's generator seeded with `run.seed`, so every
    /// process building the same config gets bit-identical weights.
    pub fn from_run_config(
        cfg: &RunConfig,
        device: Device,
        tokenizer: Option<MedTokenizer>,
    ) -> Result<MedTvt, ModelError> {
        MedTvt::check_encoder_weights_apply(cfg)?;
        tch::manual_seed(cfg.run.seed as i64);
        let kind = kind_of(cfg.model.dtype);
        let model = match &cfg.model.checkpoint {
            Some(dir) => {
                let fresh = match cfg.model.encoders {
                    EncoderSizes::Paper => ModalityConfig::paper(),
                    EncoderSizes::Tiny => ModalityConfig::tiny(&cfg.model.tiny),
                };
                MedTvt::load_with_fresh_modality(dir, device, kind, fresh)?
            }
            None => {
                let tokenizer = tokenizer.ok_or_else(|| {
                    ModelError::Invalid("model.checkpoint is not set, so the tiny model needs a tokenizer".into())
                })?;
                let t = &cfg.model.tiny;
                let vocab = tokenizer.vocab_size() as i64;
                let llm = LlamaConfig::tiny(
                    vocab,
                    t.hidden_size as i64,
                    t.intermediate_size as i64,
                    t.num_layers as i64,
                    t.num_heads as i64,
                    t.num_kv_heads as i64,
                );
                let chat = MedTvt::tiny_chat_format(&tokenizer)?;
                MedTvt::build(llm, ModalityConfig::tiny(t), tokenizer, chat, device, kind)?
            }
        };
        model.load_pretrained_encoders(cfg)?;
        Ok(model)
    }

    /// Loads the encoder weight files the config names (`model.{ecg,cxr,lab}_encoder_weights`)
    /// into the freshly initialised encoders. A MedTVT checkpoint already holds trained encoders,
    /// so naming weight files beside one is refused rather than silently overwriting them.
    fn load_pretrained_encoders(&self, cfg: &RunConfig) -> Result<(), ModelError> {
        for (encoder, path) in wanted_encoder_weights(cfg) {
            load_encoder_weights(&self.vs, encoder.prefix(), encoder.config_key(), path)?;
        }
        Ok(())
    }

    /// Refuses encoder weight files beside a MedTVT checkpoint (checked before loading it).
    fn check_encoder_weights_apply(cfg: &RunConfig) -> Result<(), ModelError> {
        if let (Some((first, _)), Some(dir)) = (wanted_encoder_weights(cfg).first(), &cfg.model.checkpoint) {
            if dir.join(MEDTVT_JSON).is_file() {
                return Err(ModelError::Invalid(format!(
                    "{} cannot be combined with model.checkpoint = \"{}\": that MedTVT checkpoint already holds its trained encoders \
(pretrained encoder weights apply to a fresh modality side: the tiny model or a bare HF Llama directory)",
                    first.config_key(),
                    dir.display()
                )));
            }
        }
        Ok(())
    }

    /// One encoder's parameters under the names its weights file uses (see
    /// [`crate::encoders::pretrained`]): `Tensor::write_safetensors` of this is a file that
    /// `model.*_encoder_weights` accepts.
    pub fn encoder_tensors(&self, encoder: Encoder) -> Vec<(String, Tensor)> {
        encoder_tensors(&self.vs, encoder.prefix())
    }

    /// A byte-level BPE for the tiny model, trained on `texts` with [`TINY_SPECIAL_TOKENS`].
    pub fn train_tiny_tokenizer(texts: &[String], vocab_size: usize) -> Result<MedTokenizer, ModelError> {
        Ok(MedTokenizer::train_byte_level_bpe(texts.iter().map(String::as_str), vocab_size, &TINY_SPECIAL_TOKENS)?)
    }

    /// The tiny model's template ([`TINY_CHAT_TEMPLATE`]) and tokens (`<eos>`, `<pad>`).
    fn tiny_chat_format(tokenizer: &MedTokenizer) -> Result<ChatFormat, ModelError> {
        let template =
            ChatTemplate::new(TINY_CHAT_TEMPLATE.to_string(), Path::new("the tiny model's built-in chat template"))?;
        let strings = TemplateTokens {
            eos_token: Some("<eos>".into()),
            pad_token: Some("<pad>".into()),
            ..TemplateTokens::default()
        };
        let tokens = SpecialTokens {
            bos: None,
            eos: vec![tokenizer.require_id("<eos>")?],
            pad: tokenizer.require_id("<pad>")?,
            strings,
        };
        Ok(ChatFormat::new(template, tokens))
    }

    fn build(
        llm_config: LlamaConfig,
        modality: ModalityConfig,
        tokenizer: MedTokenizer,
        chat: ChatFormat,
        device: Device,
        kind: Kind,
    ) -> Result<MedTvt, ModelError> {
        llama::check_device_kind(device, kind)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let d = llm_config.hidden_size;
        let llm = Llama::new(&(&root / "llm"), &llm_config);
        let ecg_encoder = EcgEncoder::new(&(&root / "ecg_encoder"), &modality.ecg);
        let cxr_encoder = CxrEncoder::new(&(&root / "cxr_encoder"), &modality.cxr);
        let lab_encoder = LabEncoder::new(&(&root / "lab_encoder"), &modality.lab);
        let blocks = modality.adapter_blocks;
        let adapters = [
            ModalityAdapter::new(&(&root / "ecg_adapter"), ecg_encoder.output_dim(), d, blocks),
            ModalityAdapter::new(&(&root / "cxr_adapter"), cxr_encoder.output_dim(), d, blocks),
            ModalityAdapter::new(&(&root / "lab_adapter"), lab_encoder.output_dim(), d, blocks),
        ];
        let mpl_config =
            MplConfig { dim: d, heads: modality.mpl_heads, dropout: modality.mpl_dropout, alpha: modality.mpl_alpha };
        if d % mpl_config.heads != 0 {
            return Err(ModelError::Invalid(format!(
                "hidden size {d} is not divisible by the MPL's {} heads",
                mpl_config.heads
            )));
        }
        let mpl = ModalityPerceptionLayer::new(&(&root / "mpl"), &mpl_config);
        let mut placeholder_ids = [0i64; 3];
        for (slot, token) in placeholder_ids.iter_mut().zip(PLACEHOLDERS) {
            *slot = tokenizer.require_id(token)?;
        }
        if let Some(bad) = placeholder_ids.iter().find(|&&id| id >= llm_config.vocab_size) {
            return Err(ModelError::Invalid(format!(
                "placeholder token id {bad} is outside the decoder's vocabulary of {} (resize the embeddings)",
                llm_config.vocab_size
            )));
        }
        let (eos_ids, pad_id) = (chat.tokens.eos.clone(), chat.tokens.pad);
        let mut model = MedTvt {
            vs,
            llm,
            ecg_encoder,
            cxr_encoder,
            lab_encoder,
            adapters,
            mpl,
            use_mpl: true,
            tokenizer,
            modality,
            placeholder_ids,
            pad_id,
            eos_ids,
            chat,
            prompt_tail_tokens: 0,
            vocab_resize: None,
        };
        model.prompt_tail_tokens = model.prompt_tail_len()?;
        if kind != Kind::Float {
            model.vs.set_kind(kind);
        }
        Ok(model)
    }

    /// Loads our checkpoint directory, or a bare HF Llama directory (a fresh modality side at the
    /// paper's sizes).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<MedTvt, ModelError> {
        MedTvt::load_with_fresh_modality(dir, device, kind, ModalityConfig::paper())
    }

    /// [`MedTvt::load`] with `fresh` sizing the modality side of a bare HF directory (unused for
    /// our checkpoints, whose `medtvt.json` says). Adds the placeholders to the tokenizer and
    /// grows the decoder's vocabulary when they do not fit (see the module doc).
    pub fn load_with_fresh_modality(
        dir: &Path,
        device: Device,
        kind: Kind,
        fresh: ModalityConfig,
    ) -> Result<MedTvt, ModelError> {
        let mut llm_config = LlamaConfig::from_file(dir.join("config.json")).map_err(WeightsError::from)?;
        let mut tokenizer = MedTokenizer::from_file(dir.join("tokenizer.json"))?;
        let medtvt_json = dir.join(MEDTVT_JSON);
        let ours = medtvt_json.is_file();
        let modality: ModalityConfig = if ours {
            let text = std::fs::read_to_string(&medtvt_json)
                .map_err(|e| ModelError::File { path: medtvt_json.clone(), message: e.to_string() })?;
            serde_json::from_str(&text)
                .map_err(|e| ModelError::File { path: medtvt_json.clone(), message: e.to_string() })?
        } else {
            fresh
        };
        tokenizer.add_special_tokens(&PLACEHOLDERS)?;
        let stored_vocab = llm_config.vocab_size;
        llm_config.vocab_size = stored_vocab.max(tokenizer.id_bound());
        let ids = (&llm_config.bos_token_id, llm_config.eos_token_ids.as_slice(), &llm_config.pad_token_id);
        let chat = ChatFormat::from_checkpoint(dir, &tokenizer, ids, llm_config.vocab_size)?;
        let grown = llm_config.vocab_size;
        let mut model = MedTvt::build(llm_config, modality, tokenizer, chat, device, kind)?;
        if grown > stored_vocab {
            llama::load_weights_growing_vocab(&model.vs, dir, "llm.", Some(stored_vocab))?;
            model.vocab_resize = Some((stored_vocab, grown));
        } else {
            llama::load_weights(&model.vs, dir, "llm.")?;
        }
        if ours {
            let path = dir.join("modality.safetensors");
            let stored = Tensor::read_safetensors(&path)
                .map_err(|e| ModelError::File { path: path.clone(), message: e.to_string() })?;
            model.copy_named(&stored, |name| !name.starts_with("llm."), &path)?;
        }
        Ok(model)
    }

    /// Writes the checkpoint directory described in the module doc.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        // config.json and generation_config.json name the start, end and padding tokens the model
        // uses, so that transformers (and TRL) stop and pad where we do.
        let mut config = self.llm.config().clone();
        config.eos_token_ids = self.eos_ids.clone();
        config.bos_token_id = self.chat.tokens.bos;
        config.pad_token_id = Some(self.pad_id);
        llama::save_hf_with_prefix(&self.vs, "llm.", &config, dir)?;
        let modality: Vec<(String, Tensor)> =
            self.named_variables().into_iter().filter(|(n, _)| !n.starts_with("llm.")).collect();
        let path = dir.join("modality.safetensors");
        let cpu: Vec<(String, Tensor)> =
            modality.into_iter().map(|(n, t)| (n, t.detach().to_device(Device::Cpu))).collect();
        Tensor::write_safetensors(&cpu, &path)
            .map_err(|e| ModelError::File { path: path.clone(), message: e.to_string() })?;
        let json = dir.join(MEDTVT_JSON);
        let text = serde_json::to_string_pretty(&self.modality).map_err(|e| ModelError::Invalid(e.to_string()))?;
        std::fs::write(&json, text).map_err(|e| ModelError::File { path: json.clone(), message: e.to_string() })?;
        self.tokenizer.save(dir.join("tokenizer.json"))?;
        self.chat.save(dir, &self.tokenizer)?;
        Ok(())
    }

    pub fn tokenizer(&self) -> &MedTokenizer {
        &self.tokenizer
    }

    pub fn llm(&self) -> &Llama {
        &self.llm
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// The image side the CXR encoder expects.
    pub fn image_size(&self) -> usize {
        self.modality.cxr.image_size as usize
    }

    pub fn eos_token_ids(&self) -> &[i64] {
        &self.eos_ids
    }

    /// The padding id (the checkpoint's, else its first eos id).
    pub fn pad_token_id(&self) -> i64 {
        self.pad_id
    }

    /// The checkpoint's special tokens and where its chat template came from.
    pub fn chat_format(&self) -> &ChatFormat {
        &self.chat
    }

    /// The ids of `<ecg>`, `<cxr>`, `<lab>`.
    pub fn placeholder_ids(&self) -> [i64; 3] {
        self.placeholder_ids
    }

    /// (stored, grown) vocabulary sizes when loading grew the embeddings for new tokens.
    pub fn vocab_resize(&self) -> Option<(i64, i64)> {
        self.vocab_resize
    }

    /// Every variable by name, sorted (a stable order for collectives and publication).
    pub fn named_variables(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Marks the stage's groups trainable (all variables when `all`) and freezes the rest; the
    /// MPL is bypassed in PT.
    pub fn set_trainable(&mut self, stage: Stage, all: bool) -> TrainableSummary {
        self.use_mpl = stage != Stage::Pt;
        let groups = ParamGroup::for_stage(stage);
        let (mut trainable, mut frozen) = (0usize, 0usize);
        for (name, var) in self.vs.variables() {
            let train = all || groups.contains(&ParamGroup::of(&name));
            let _ = var.set_requires_grad(train);
            if train {
                trainable += var.numel();
            } else {
                frozen += var.numel();
            }
        }
        let groups = if all { vec!["all".to_string()] } else { groups.iter().map(|g| g.name().to_string()).collect() };
        TrainableSummary { trainable, frozen, groups }
    }

    /// The variables that currently require grad, sorted by name (shallow clones).
    pub fn trainable_tensors(&self) -> Vec<(String, Tensor)> {
        self.named_variables().into_iter().filter(|(_, t)| t.requires_grad()).collect()
    }

    /// Copies tensors into the variables of the same name (no grad); an unknown name or a shape
    /// mismatch is an error naming it.
    pub fn copy_named_tensors(&mut self, named: &[(String, Tensor)]) -> Result<(), ModelError> {
        self.copy_named(named, |_| true, Path::new("published weights"))
    }

    fn copy_named(
        &self,
        named: &[(String, Tensor)],
        wanted: impl Fn(&str) -> bool,
        origin: &Path,
    ) -> Result<(), ModelError> {
        let vars = self.vs.variables();
        for (name, value) in named.iter().filter(|(n, _)| wanted(n)) {
            let var = vars.get(name).ok_or_else(|| ModelError::File {
                path: origin.to_path_buf(),
                message: format!("unknown tensor `{name}`"),
            })?;
            if var.size() != value.size() {
                return Err(ModelError::File {
                    path: origin.to_path_buf(),
                    message: format!("tensor `{name}` has shape {:?}, the model's is {:?}", value.size(), var.size()),
                });
            }
            tch::no_grad(|| var.shallow_clone().copy_(value));
        }
        Ok(())
    }

    /// The prompt for a question: the checkpoint's chat template rendered with [`SYSTEM_PROMPT`]
    /// and the question as the user's message, with the generation prompt (transformers'
    /// `apply_chat_template(..., add_generation_prompt=True, tokenize=False)`).
    pub fn prompt_text(&self, question: &str) -> Result<String, ModelError> {
        Ok(self.chat.template.render_prompt(SYSTEM_PROMPT, question, &self.chat.tokens.strings)?)
    }

    /// How many tokens follow the question in a prompt (found by rendering a marker question);
    /// when the template rewrites the question beyond recognition, the whole prompt of an empty
    /// question counts.
    fn prompt_tail_len(&self) -> Result<usize, ModelError> {
        const MARKER: &str = "MEDTVT_QUESTION_MARKER";
        let rendered = self.prompt_text(MARKER)?;
        let tail = match rendered.rfind(MARKER) {
            Some(at) => rendered[at + MARKER.len()..].to_string(),
            None => self.prompt_text("")?,
        };
        Ok(self.tokenizer.encode(&tail, false)?.len())
    }

    /// Tokenises questions (through the chat template) and stacks their modalities. A prompt
    /// longer than `max_prompt_tokens` keeps its start and its assistant header.
    pub fn encode_prompts(
        &self,
        prompts: &[(String, ModalityInputs)],
        max_prompt_tokens: usize,
    ) -> Result<PromptBatch, ModelError> {
        if prompts.is_empty() {
            return Err(ModelError::Invalid("encode_prompts needs at least one prompt".into()));
        }
        let device = self.device();
        let s = self.modality.cxr.image_size;
        let mut rows = Vec::with_capacity(prompts.len());
        let (mut ecg, mut cxr, mut lab, mut present_rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (question, inputs) in prompts {
            let mut ids = self.tokenizer.encode(&self.prompt_text(question)?, false)?;
            if ids.len() > max_prompt_tokens {
                let tail = self.prompt_tail_tokens.min(max_prompt_tokens);
                let keep = ids.split_off(ids.len() - tail);
                ids.truncate(max_prompt_tokens - tail);
                ids.extend(keep);
            }
            rows.push(ids);
            ecg.push(modality_tensor(&inputs.ecg, &[ECG_LEADS, ECG_SAMPLES], "ecg")?);
            cxr.push(modality_tensor(&inputs.cxr, &[3, s, s], "cxr")?);
            lab.push(modality_tensor(&inputs.lab, &[LAB_FEATURES], "lab")?);
            present_rows.push([inputs.ecg.is_some(), inputs.cxr.is_some(), inputs.lab.is_some()]);
        }
        let (ids, mask) = llama::left_pad(&rows, self.pad_id, device)?;
        let b = prompts.len() as i64;
        let present: Vec<bool> = present_rows.iter().flatten().copied().collect();
        // The encoders compute in the model's dtype (bf16 weights take bf16 inputs).
        let kind = self.vs.kind();
        Ok(PromptBatch {
            ids,
            mask,
            ecg: Tensor::stack(&ecg, 0).to_device(device).to_kind(kind),
            cxr: Tensor::stack(&cxr, 0).to_device(device).to_kind(kind),
            lab: Tensor::stack(&lab, 0).to_device(device).to_kind(kind),
            present: Tensor::from_slice(&present).view([b, 3]).to_device(device),
            present_rows,
            repeats: 1,
        })
    }

    /// Completion texts as right-padded ids `[b, tc]` and their mask: a text of at most
    /// `max_tokens` tokens gets EOS appended; a longer one is cut to `max_tokens` tokens and gets
    /// no EOS, so a model trained on it is never taught to stop where the cut fell.
    pub fn encode_completions(&self, texts: &[String], max_tokens: usize) -> Result<(Tensor, Tensor), ModelError> {
        let eos = self.eos_ids.first().copied().unwrap_or(self.pad_id);
        let mut rows = Vec::with_capacity(texts.len());
        for text in texts {
            let mut ids = self.tokenizer.encode(text, false)?;
            if ids.len() <= max_tokens {
                ids.push(eos);
            } else {
                ids.truncate(max_tokens);
            }
            rows.push(ids);
        }
        Ok(right_pad(&rows, self.pad_id, self.device()))
    }

    /// Token ids of completions exactly as sampled (no EOS added), right-padded, with the mask.
    pub fn pad_completions(&self, rows: &[Vec<i64>]) -> (Tensor, Tensor) {
        right_pad(rows, self.pad_id, self.device())
    }

    /// The modality vectors `[b, 3, d]` entering the decoder and the CAO gates `[b, 3]` (all ones
    /// for present modalities when the MPL is bypassed in PT).
    ///
    /// Two shortcuts, both exact because the MPL (and the PT bypass) multiply every absent
    /// modality's vector by 0 before using it: a GRPO batch (`repeats` = G copies of each prompt)
    /// runs the encoders, adapters and MPL once per prompt and repeats the result, and a modality
    /// absent from every row of the batch skips its encoder (zeros stand in).
    pub fn modality_embeddings(&self, batch: &PromptBatch, train: bool) -> (Tensor, Tensor) {
        let repeats = batch.repeats.max(1);
        let (stacked, present) = self.adapted_modalities(batch, train);
        let (modalities, gates) = self.perceive(&stacked, &present, train);
        if repeats == 1 {
            (modalities, gates)
        } else {
            let r = |t: &Tensor| t.repeat_interleave_self_int(repeats, 0, None::<i64>);
            (r(&modalities), r(&gates))
        }
    }

    /// Each distinct prompt's adapter outputs `[n, 3, d]` (before the MPL; zeros for a modality
    /// absent from the whole batch) and which modalities it has `[n, 3]`; `n` is the batch size
    /// divided by `repeats`.
    fn adapted_modalities(&self, batch: &PromptBatch, train: bool) -> (Tensor, Tensor) {
        let repeats = batch.repeats.max(1);
        let unique = |t: &Tensor| {
            if repeats == 1 {
                t.shallow_clone()
            } else {
                let n = t.size()[0];
                t.index_select(0, &Tensor::arange_start_step(0, n, repeats, (Kind::Int64, t.device())))
            }
        };
        let present = unique(&batch.present); // [n, 3]
                                              // Decided on the host: no device read per forward.
        let any = [0, 1, 2].map(|m| batch.present_rows.iter().any(|row| row[m]));
        let n = present.size()[0];
        let d = self.llm.config().hidden_size;
        let absent = || Tensor::zeros([n, d], (self.vs.kind(), present.device()));
        let ecg = if any[0] {
            self.adapters[0].forward(&self.ecg_encoder.forward_t(&unique(&batch.ecg), train))
        } else {
            absent()
        };
        let cxr =
            if any[1] { self.adapters[1].forward(&self.cxr_encoder.forward(&unique(&batch.cxr))) } else { absent() };
        let lab =
            if any[2] { self.adapters[2].forward(&self.lab_encoder.forward(&unique(&batch.lab))) } else { absent() };
        (Tensor::stack(&[ecg, cxr, lab], 1), present) // [n, 3, d], [n, 3]
    }

    /// The MPL over adapter outputs (or, in PT, the bypass that zeroes absent modalities): the
    /// vectors entering the decoder and the gates.
    fn perceive(&self, stacked: &Tensor, present: &Tensor, train: bool) -> (Tensor, Tensor) {
        if self.use_mpl {
            let out = self.mpl.forward_t(stacked, present, train);
            (out.modalities, out.gates)
        } else {
            let present = present.to_kind(stacked.kind());
            (stacked * present.unsqueeze(-1), present)
        }
    }

    /// For probing where the evidence goes (eval mode, no grad), for a batch without repeats:
    /// the adapter outputs before the MPL with absent modalities zeroed, and the vectors the
    /// decoder receives after it, both `[b, 3, d]`.
    pub fn modality_vectors(&self, batch: &PromptBatch) -> (Tensor, Tensor) {
        let _guard = tch::no_grad_guard();
        let (stacked, present) = self.adapted_modalities(batch, false);
        let (fused, _) = self.perceive(&stacked, &present, false);
        (stacked * present.to_kind(fused.kind()).unsqueeze(-1), fused)
    }

    /// Decoder input embeddings `[b, t, d]` with each placeholder token's embedding replaced by
    /// its modality vector, and the gates.
    pub fn prompt_embeddings(&self, batch: &PromptBatch, train: bool) -> (Tensor, Tensor) {
        let mut embeds = self.llm.embed_tokens(&batch.ids); // [b, t, d]
        let (modalities, gates) = self.modality_embeddings(batch, train);
        let modalities = modalities.to_kind(embeds.kind());
        for (m, &id) in self.placeholder_ids.iter().enumerate() {
            let at = batch.ids.eq(id).unsqueeze(-1); // [b, t, 1]
            let vector = modalities.narrow(1, m as i64, 1); // [b, 1, d]
            embeds = embeds.where_self(&at.logical_not(), &vector);
        }
        (embeds, gates)
    }

    /// The decoder.
    pub fn decoder(&self) -> &Llama {
        &self.llm
    }

    /// The token ids that end a completion.
    pub fn eos_ids(&self) -> &[i64] {
        &self.eos_ids
    }

    /// Each prompt row's decoder input embeddings `[t_i, d]` without its padding (eval mode, no
    /// grad): what a continuous batch prefills ([`crate::llama::ContinuousBatch`]).
    pub fn prompt_rows(&self, batch: &PromptBatch) -> Result<Vec<Tensor>, ModelError> {
        let _guard = tch::no_grad_guard();
        let (embeds, _) = self.prompt_embeddings(batch, false);
        let t = embeds.size()[1];
        let lengths = Vec::<i64>::try_from(batch.mask.sum_dim_intlist(1, false, Kind::Int64).to_device(Device::Cpu))?;
        Ok(lengths.iter().enumerate().map(|(i, &len)| embeds.get(i as i64).narrow(0, t - len, len)).collect())
    }

    /// Samples completions (no grad, eval mode); EOS ids default to the tokenizer's. Returns the
    /// generation and each sample's CAO gates (`None` for an absent modality; in PT, where the
    /// MPL is bypassed, 1 for every present one).
    pub fn generate(
        &self,
        batch: &PromptBatch,
        params: &SamplingParams,
    ) -> Result<(Generation, Vec<SampleGates>), ModelError> {
        let _guard = tch::no_grad_guard();
        let mut params = params.clone();
        if params.eos_token_ids.is_empty() {
            params.eos_token_ids = self.eos_ids.clone();
        }
        // A GRPO batch (runs of `repeats` copies of each prompt) is prefilled once per prompt.
        let distinct = batch.distinct_prompts();
        let (embeds, gates) = self.prompt_embeddings(&distinct, false);
        let repeats = batch.repeats.max(1);
        let generation = llama::generate_groups_from_embeds(&self.llm, &embeds, &distinct.mask, repeats, &params)?;
        let gates = gates_per_sample(&gates, &distinct.present_rows)?;
        Ok((generation, gates.iter().flat_map(|g| std::iter::repeat_n(*g, repeats as usize)).collect()))
    }

    /// Teacher-forced log-probs `[b, tc]` of completion ids under the model at `temperature`
    /// (0 on padding); differentiable when `train` or grads are enabled.
    pub fn score(
        &self,
        batch: &PromptBatch,
        completion_ids: &Tensor,
        completion_mask: &Tensor,
        temperature: f64,
        train: bool,
    ) -> Tensor {
        let (embeds, _) = self.prompt_embeddings(batch, train);
        llama::score_completions(&self.llm, &embeds, &batch.mask, completion_ids, completion_mask, temperature)
    }

    /// Text of generated ids, special tokens kept except padding and EOS (the answer tags are
    /// special tokens of the tiny tokenizer and the rewards need them).
    pub fn decode(&self, ids: &[i64]) -> Result<String, ModelError> {
        let kept: Vec<i64> =
            ids.iter().copied().filter(|id| *id != self.pad_id && !self.eos_ids.contains(id)).collect();
        Ok(self.tokenizer.decode(&kept, false)?)
    }
}

/// The encoders whose weight files the run config names, with the files.
fn wanted_encoder_weights(cfg: &RunConfig) -> Vec<(Encoder, &Path)> {
    Encoder::ALL.iter().filter_map(|&e| e.weights_in(&cfg.model).map(|p| (e, p))).collect()
}

fn modality_tensor(values: &Option<Vec<f32>>, shape: &[i64], what: &str) -> Result<Tensor, ModelError> {
    let numel: i64 = shape.iter().product();
    match values {
        None => Ok(Tensor::zeros(shape, (Kind::Float, Device::Cpu))),
        Some(v) if v.len() as i64 == numel => Ok(Tensor::from_slice(v).view(shape)),
        Some(v) => Err(ModelError::Invalid(format!(
            "{what} input has {} values, the model expects {shape:?} = {numel}",
            v.len()
        ))),
    }
}

fn right_pad(rows: &[Vec<i64>], pad_id: i64, device: Device) -> (Tensor, Tensor) {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(rows.len() * t);
    let mut mask = Vec::with_capacity(rows.len() * t);
    for row in rows {
        ids.extend(row.iter().copied().chain(std::iter::repeat(pad_id)).take(t));
        mask.extend((0..t).map(|i| i64::from(i < row.len())));
    }
    let shape = [rows.len() as i64, t as i64];
    (Tensor::from_slice(&ids).view(shape).to_device(device), Tensor::from_slice(&mask).view(shape).to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> RunConfig {
        tiny_config_with("")
    }

    /// The tiny test config with `model_keys` (TOML lines) added to its `[model]` table.
    fn tiny_config_with(model_keys: &str) -> RunConfig {
        let text = r#"
            [run]
            name = "t"
            stage = "sft"
            out_dir = "/tmp/unused"
            [data]
            dir = "/tmp"
            [model]
            device = "cpu"
            [model.tiny]
            hidden_size = 32
            intermediate_size = 64
            num_layers = 1
            num_heads = 4
            num_kv_heads = 2
            image_size = 32
            vit_patch_size = 16
            vit_depth = 1
            ecg_resnet_blocks = 1
            [train]
            steps = 1
            learning_rate = 1e-3
        "#
        .replace("device = \"cpu\"\n", &format!("device = \"cpu\"\n{model_keys}\n"));
        medtvt_config::parse_run_config(&text, Path::new("test.toml"), &[]).expect("test config parses")
    }

    fn corpus() -> Vec<String> {
        (0..50)
            .map(|i| {
                format!("<ecg> <cxr> <lab> question {i}? <think>rate {i} bpm</think><answer>sepsis; pneumonia</answer>")
            })
            .collect()
    }

    fn model() -> MedTvt {
        model_from(&tiny_config())
    }

    fn model_from(cfg: &RunConfig) -> MedTvt {
        let tok = MedTvt::train_tiny_tokenizer(&corpus(), 300).expect("tokenizer trains");
        MedTvt::from_run_config(cfg, Device::Cpu, Some(tok)).expect("tiny model builds")
    }

    /// `key = "path"` for a `[model]` table.
    fn key_line(encoder: Encoder, path: &Path) -> String {
        format!("{} = \"{}\"", encoder.config_key().trim_start_matches("model."), path.display())
    }

    #[test]
    fn pretrained_encoder_weights_replace_the_fresh_initialisation() {
        let dir = tempfile::tempdir().unwrap();
        // The "pretrained" encoders: those of a model initialised from another seed.
        let mut donor_config = tiny_config();
        donor_config.run.seed = 7;
        let donor = model_from(&donor_config);
        let mut lines = Vec::new();
        for encoder in [Encoder::Ecg, Encoder::Cxr] {
            let path = dir.path().join(format!("{encoder:?}.safetensors"));
            Tensor::write_safetensors(&donor.encoder_tensors(encoder), &path).unwrap();
            lines.push(key_line(encoder, &path));
        }
        let fresh = model();
        let loaded = model_from(&tiny_config_with(&lines.join("\n")));
        for encoder in [Encoder::Ecg, Encoder::Cxr] {
            let path = dir.path().join(format!("{encoder:?}.safetensors"));
            let file: std::collections::BTreeMap<String, Tensor> =
                Tensor::read_safetensors(&path).unwrap().into_iter().collect();
            let params = loaded.encoder_tensors(encoder);
            assert_eq!(params.len(), file.len());
            for (name, value) in &params {
                assert!(value.equal(&file[name]), "{encoder:?} {name} differs from the file");
            }
            let differs = fresh.encoder_tensors(encoder).iter().zip(&params).any(|((_, a), (_, b))| !a.equal(b));
            assert!(
                differs,
                "{encoder:?}: the file must differ from the fresh initialisation for this test to mean anything"
            );
        }
        // The lab encoder was not named: it keeps the seed's initialisation.
        for ((name, a), (_, b)) in fresh.encoder_tensors(Encoder::Lab).iter().zip(loaded.encoder_tensors(Encoder::Lab))
        {
            assert!(a.equal(&b), "lab {name}");
        }
    }

    #[test]
    fn encoder_weights_of_the_wrong_shape_are_an_error_naming_file_tensor_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.safetensors");
        let mut named = model().encoder_tensors(Encoder::Lab);
        let at = named.iter().position(|(n, _)| n == "layers.0.weight").unwrap();
        let (name, value) = named.remove(at);
        let wrong = value.narrow(1, 0, 50).contiguous(); // [32, 50] instead of [32, 100]
        named.push((name, wrong));
        Tensor::write_safetensors(&named, &path).unwrap();
        let tok = MedTvt::train_tiny_tokenizer(&corpus(), 300).unwrap();
        let err = MedTvt::from_run_config(&tiny_config_with(&key_line(Encoder::Lab, &path)), Device::Cpu, Some(tok))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("model.lab_encoder_weights = \"{}\":", path.display())), "{err}");
        assert!(err.contains("tensor `layers.0.weight` has shape [32, 50], the encoder expects [32, 100]"), "{err}");
    }

    #[test]
    fn encoder_weights_beside_a_medtvt_checkpoint_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("ckpt");
        let m = model();
        m.save(&ckpt).unwrap();
        let path = dir.path().join("ecg.safetensors");
        Tensor::write_safetensors(&m.encoder_tensors(Encoder::Ecg), &path).unwrap();
        let keys = format!("checkpoint = \"{}\"\n{}", ckpt.display(), key_line(Encoder::Ecg, &path));
        let err = MedTvt::from_run_config(&tiny_config_with(&keys), Device::Cpu, None).unwrap_err().to_string();
        assert!(err.contains("model.ecg_encoder_weights cannot be combined with model.checkpoint"), "{err}");
    }

    fn inputs(with_cxr: bool) -> ModalityInputs {
        ModalityInputs {
            ecg: Some((0..12_000).map(|i| ((i % 97) as f32 / 97.0) - 0.5).collect()),
            cxr: with_cxr.then(|| vec![0.25; 3 * 32 * 32]),
            lab: Some(vec![0.5; 100]),
        }
    }

    /// A bf16 model takes the f32 modality inputs of `encode_prompts` (they are cast to its
    /// dtype), scores with gradients and samples.
    #[test]
    fn a_bf16_model_encodes_scores_and_generates_with_every_modality() {
        let tok = MedTvt::train_tiny_tokenizer(&corpus(), 300).unwrap();
        let mut cfg = tiny_config();
        cfg.model.dtype = DType::Bf16;
        let mut m = MedTvt::from_run_config(&cfg, Device::Cpu, Some(tok)).unwrap();
        m.set_trainable(Stage::Sft, true);
        let batch = m.encode_prompts(&[("<ecg> <cxr> <lab> which?".into(), inputs(true))], 64).unwrap();
        assert_eq!(batch.ecg.kind(), Kind::BFloat16);
        let (ids, mask) = m.encode_completions(&["<answer>sepsis</answer>".into()], 16).unwrap();
        let logp = m.score(&batch, &ids, &mask, 1.0, true);
        assert!(logp.sum(Kind::Float).double_value(&[]).is_finite());
        logp.sum(Kind::Float).backward();
        let params = SamplingParams { max_new_tokens: 3, ..SamplingParams::default() };
        let (generation, gates) = m.generate(&batch, &params).unwrap();
        assert_eq!((generation.tokens.len(), gates.len()), (1, 1));
    }

    #[test]
    fn placeholders_receive_the_modality_vectors() {
        let m = model();
        let batch = m.encode_prompts(&[("<ecg> <lab> which?".into(), inputs(false))], 64).unwrap();
        let (embeds, gates) = m.prompt_embeddings(&batch, false);
        let (mods, _) = m.modality_embeddings(&batch, false);
        let ecg_id = m.tokenizer().token_to_id("<ecg>").unwrap();
        let ids: Vec<i64> = Vec::try_from(batch.ids.view([-1])).unwrap();
        let pos = ids.iter().position(|&i| i == ecg_id).unwrap() as i64;
        let diff = (embeds.get(0).get(pos) - mods.get(0).get(0)).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "ecg placeholder embedding differs by {diff}");
        // CXR absent: its gate is exactly 0; present ones are in (0, 1).
        let g: Vec<f32> = Vec::try_from(gates.view([-1])).unwrap();
        assert_eq!(g[1], 0.0);
        assert!(g[0] > 0.0 && g[0] < 1.0 && g[2] > 0.0 && g[2] < 1.0, "gates {g:?}");
    }

    /// The GRPO shortcut (encoders once per prompt, then repeated) gives what running them on
    /// every repeated row gives, gradients included; a modality absent everywhere contributes
    /// zeros and a zero gate.
    #[test]
    fn repeated_prompts_encode_once_with_the_same_result() {
        let mut m = model();
        m.set_trainable(Stage::Sft, true);
        let batch = m
            .encode_prompts(
                &[("<ecg> <lab> which?".into(), inputs(false)), ("<ecg> <cxr> <lab> and?".into(), inputs(true))],
                64,
            )
            .unwrap();
        let shortcut = batch.repeat_interleave(3);
        assert_eq!(shortcut.repeats, 3);
        let every_row = PromptBatch { repeats: 1, ..shortcut.repeat_interleave(1) };
        let (a, ga) = m.modality_embeddings(&shortcut, false);
        let (b, gb) = m.modality_embeddings(&every_row, false);
        assert_eq!(a.size(), vec![6, 3, 32]);
        let (da, dg) = ((&a - &b).abs().max().double_value(&[]), (&ga - &gb).abs().max().double_value(&[]));
        assert!(da < 1e-5 && dg < 1e-5, "modalities differ by {da}, gates by {dg}");
        let grad_of = |batch: &PromptBatch| {
            for (_, mut v) in m.named_variables() {
                v.zero_grad();
            }
            m.modality_embeddings(batch, false).0.square().sum(Kind::Float).backward();
            let w = m.named_variables().into_iter().find(|(n, _)| n.starts_with("lab_encoder")).unwrap().1;
            w.grad().copy()
        };
        let (da, db) = (grad_of(&shortcut), grad_of(&every_row));
        assert!((&da - &db).abs().max().double_value(&[]) < 1e-4 * (1.0 + db.abs().max().double_value(&[])));

        let text_only =
            m.encode_prompts(&[("which?".into(), ModalityInputs::default())], 64).unwrap().repeat_interleave(2);
        let (mods, gates) = m.modality_embeddings(&text_only, false);
        assert_eq!(mods.abs().max().double_value(&[]), 0.0);
        assert_eq!(gates.abs().max().double_value(&[]), 0.0);
    }

    /// Issue #12: an answer within the limit ends in EOS; a longer one is cut and gets none.
    #[test]
    fn a_cut_answer_gets_no_eos_and_a_whole_one_does() {
        let m = model();
        let text = "<think>rate 12 bpm</think><answer>sepsis; pneumonia</answer>".to_string();
        let tokens = m.tokenizer().encode(&text, false).unwrap();
        let n = tokens.len();
        let eos = m.eos_token_ids()[0];
        let row = |max: usize| {
            let (ids, mask) = m.encode_completions(std::slice::from_ref(&text), max).unwrap();
            let len = mask.sum(Kind::Int64).int64_value(&[]);
            Vec::<i64>::try_from(ids.view([-1]).narrow(0, 0, len)).unwrap()
        };
        assert_eq!(row(n), [tokens.clone(), vec![eos]].concat());
        assert_eq!(row(n + 5), [tokens.clone(), vec![eos]].concat());
        assert_eq!(row(n - 2), tokens[..n - 2].to_vec(), "a cut answer keeps max_tokens tokens and no EOS");
    }

    #[test]
    fn stage_groups_decide_which_parameters_get_gradients() {
        let mut m = model();
        let summary = m.set_trainable(Stage::Grpo, false);
        assert_eq!(summary.groups, vec!["mpl", "embeddings", "norms"]);
        assert!(summary.trainable > 0 && summary.frozen > 0);
        let batch = m.encode_prompts(&[("<ecg> <cxr> <lab> which?".into(), inputs(true))], 64).unwrap();
        let (ids, mask) = m.encode_completions(&["<answer>sepsis</answer>".into()], 16).unwrap();
        let loss = -m.score(&batch, &ids, &mask, 1.0, true).sum(Kind::Float);
        loss.backward();
        for (name, var) in m.named_variables() {
            let group = ParamGroup::of(&name);
            let trains = ParamGroup::for_stage(Stage::Grpo).contains(&group);
            assert_eq!(var.requires_grad(), trains, "{name}");
            if trains && (name.contains("embed_tokens") || name.starts_with("mpl.cao")) {
                assert!(
                    var.grad().defined() && var.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{name} got no gradient"
                );
            }
        }
        let all = m.set_trainable(Stage::Pt, true);
        assert_eq!(all.frozen, 0);
    }

    #[test]
    fn save_and_load_give_identical_scores() {
        let m = model();
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let back = MedTvt::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
        let batch = m.encode_prompts(&[("<ecg> <cxr> <lab> which?".into(), inputs(true))], 64).unwrap();
        let (ids, mask) = m.encode_completions(&["<think>x</think><answer>sepsis</answer>".into()], 16).unwrap();
        let a = m.score(&batch, &ids, &mask, 1.0, false);
        let b = back.score(&batch, &ids, &mask, 1.0, false);
        assert_eq!((a - b).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn the_tiny_template_ships_in_tokenizer_config_and_truncation_keeps_the_assistant_header() {
        let m = model();
        assert_eq!(m.prompt_text("<ecg> which?").unwrap(), "<|user|><ecg> which?<|assistant|>");
        let dir = tempfile::tempdir().unwrap();
        m.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap();
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(config["chat_template"], TINY_CHAT_TEMPLATE);
        assert_eq!((config["eos_token"].as_str(), config["pad_token"].as_str()), (Some("<eos>"), Some("<pad>")));
        let back = MedTvt::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
        assert_eq!(back.prompt_text("<ecg> which?").unwrap(), m.prompt_text("<ecg> which?").unwrap());
        assert_eq!((back.eos_token_ids(), back.pad_token_id()), (m.eos_token_ids(), m.pad_token_id()));
        assert_eq!(back.vocab_resize(), None);

        let long = format!("<ecg> {}", "question words ".repeat(20));
        let batch = m.encode_prompts(&[(long, inputs(false))], 8).unwrap();
        let ids: Vec<i64> = Vec::try_from(batch.ids.view([-1])).unwrap();
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[..2], [m.tokenizer().token_to_id("<|user|>").unwrap(), m.placeholder_ids()[0]]);
        assert_eq!(ids.last().copied(), m.tokenizer().token_to_id("<|assistant|>"));
    }

    #[test]
    fn generation_log_probs_match_scoring_of_the_same_tokens() {
        let m = model();
        let batch = m
            .encode_prompts(
                &[
                    ("<ecg> <cxr> <lab> a?".into(), inputs(true)),
                    ("<ecg> <lab> b longer question?".into(), inputs(false)),
                ],
                64,
            )
            .unwrap();
        let params = SamplingParams { max_new_tokens: 6, temperature: 0.9, seed: 3, ..SamplingParams::default() };
        let (generation, gates) = m.generate(&batch, &params).unwrap();
        // One gate triple per prompt; the second prompt has no X-ray.
        assert_eq!(gates.len(), 2);
        assert!(gates[0].iter().all(|g| g.is_some_and(|g| g > 0.0 && g < 1.0)), "{gates:?}");
        assert_eq!(gates[1][1], None, "{gates:?}");
        assert!(gates[1][0].is_some() && gates[1][2].is_some());
        let (ids, mask) = m.pad_completions(&generation.tokens);
        let scored = m.score(&batch, &ids, &mask, 0.9, false);
        for (row, lps) in generation.logprobs.iter().enumerate() {
            for (j, lp) in lps.iter().enumerate() {
                let s = scored.double_value(&[row as i64, j as i64]);
                assert!((s - f64::from(*lp)).abs() < 1e-4, "row {row} token {j}: {s} vs {lp}");
            }
        }
    }

    #[test]
    fn wrong_modality_size_is_an_error_naming_it() {
        let m = model();
        let bad = ModalityInputs { ecg: Some(vec![0.0; 10]), cxr: None, lab: None };
        let err = m.encode_prompts(&[("<ecg> q".into(), bad)], 64).unwrap_err().to_string();
        assert!(err.contains("ecg") && err.contains("10"), "{err}");
    }
}
