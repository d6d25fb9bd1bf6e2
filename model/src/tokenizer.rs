//! `MedTokenizer`: text <-> token ids over HF `tokenizers` (pure Rust), loading any
//! `tokenizer.json` with the same ids as Python, and training the byte-level BPE of the tiny
//! from-scratch model with MedTVT's special tokens as atomic, never-split tokens.

use std::path::{Path, PathBuf};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Padding (id 0 in a tokenizer trained with `MEDTVT_SPECIAL_TOKENS`).
pub const PAD_TOKEN: &str = "<pad>";
/// End of sequence (id 1 in a tokenizer trained with `MEDTVT_SPECIAL_TOKENS`).
pub const EOS_TOKEN: &str = "<eos>";
/// Placeholders where the ECG, chest X-ray and lab-test features enter the prompt.
pub const ECG_TOKEN: &str = "<ecg>";
pub const CXR_TOKEN: &str = "<cxr>";
pub const LAB_TOKEN: &str = "<lab>";

/// The special tokens of the tiny MedTVT model, in id order when passed to training.
pub const MEDTVT_SPECIAL_TOKENS: &[&str] =
    &[PAD_TOKEN, EOS_TOKEN, ECG_TOKEN, CXR_TOKEN, LAB_TOKEN, "<think>", "</think>", "<answer>", "</answer>"];

/// Why tokenisation failed; names the file or token involved.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("cannot save tokenizer to {path}: {message}")]
    Save { path: PathBuf, message: String },
    #[error("tokenizer has no token {token:?}")]
    MissingToken { token: String },
    #[error("token id {id} is not a valid id")]
    BadId { id: i64 },
    #[error("byte-level BPE training failed: {message}")]
    Train { message: String },
    #[error("tokenizer failed on {what}: {message}")]
    Run { what: &'static str, message: String },
}

/// A loaded or trained tokenizer.
#[derive(Clone)]
pub struct MedTokenizer {
    inner: Tokenizer,
}

impl std::fmt::Debug for MedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MedTokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

impl MedTokenizer {
    /// Loads an HF `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let inner = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(MedTokenizer { inner })
    }

    /// Writes `tokenizer.json` (pretty-printed) to `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TokenizerError> {
        let path = path.as_ref();
        self.inner
            .save(path, true)
            .map_err(|e| TokenizerError::Save { path: path.to_path_buf(), message: e.to_string() })
    }

    /// Trains a byte-level BPE (GPT-2 style: every byte is a base token, so any text encodes)
    /// of `vocab_size` tokens on `texts`. `special_tokens` get the first ids in order and are
    /// matched whole in text. Training is deterministic for the same texts and arguments.
    pub fn train_byte_level_bpe<'a>(
        texts: impl Iterator<Item = &'a str>,
        vocab_size: usize,
        special_tokens: &[&str],
    ) -> Result<Self, TokenizerError> {
        let texts: Vec<String> = texts.map(str::to_string).collect();
        let specials: Vec<AddedToken> = special_tokens.iter().map(|t| AddedToken::from(t.to_string(), true)).collect();
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials.clone())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner = Tokenizer::new(BPE::default());
        inner
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
            .with_decoder(Some(ByteLevelDecoder::default()));
        inner.train(&mut trainer, texts.into_iter()).map_err(|e| TokenizerError::Train { message: e.to_string() })?;
        inner.add_special_tokens(specials).map_err(|e| TokenizerError::Train { message: e.to_string() })?;
        Ok(MedTokenizer { inner })
    }

    /// Registers `tokens` as special (atomic) tokens of a loaded tokenizer, e.g. `<ecg>` on a
    /// pretrained Llama tokenizer; returns how many were new. New ids follow the vocabulary.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Result<usize, TokenizerError> {
        let added = tokens.iter().map(|t| AddedToken::from(t.to_string(), true));
        self.inner
            .add_special_tokens(added)
            .map_err(|e| TokenizerError::Run { what: "adding special tokens", message: e.to_string() })
    }

    /// Ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Run { what: "encode", message: e.to_string() })?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Text of `ids`, optionally dropping special tokens.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        let ids = ids
            .iter()
            .map(|&id| u32::try_from(id).map_err(|_| TokenizerError::BadId { id }))
            .collect::<Result<Vec<u32>, _>>()?;
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Run { what: "decode", message: e.to_string() })
    }

    /// The id of `token` (vocabulary or added token), if present.
    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The id of `token`, or an error naming it.
    pub fn require_id(&self, token: &str) -> Result<i64, TokenizerError> {
        self.token_to_id(token).ok_or_else(|| TokenizerError::MissingToken { token: token.to_string() })
    }

    /// The token of `id`, if the tokenizer has one.
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id).ok().and_then(|id| self.inner.id_to_token(id))
    }

    /// Number of ids, added tokens included (the LM's vocab_size must be at least this).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// One past the largest id the tokenizer can produce: the decoder's embedding matrix needs
    /// at least this many rows. Usually [`MedTokenizer::vocab_size`], larger when ids have gaps.
    pub fn id_bound(&self) -> i64 {
        let largest = self.inner.get_vocab(true).into_values().max().map_or(0, |id| i64::from(id) + 1);
        largest.max(self.vocab_size() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORPUS: &[&str] = &[
        "Atrial fibrillation with rapid ventricular response.",
        "Sinus rhythm, left ventricular hypertrophy, no acute ST changes.",
        "Chest X-ray shows cardiomegaly and mild pulmonary edema.",
        "Elevated troponin and BNP suggest heart failure; creatinine is high.",
        "<think>The ECG shows atrial fibrillation.</think><answer>atrial fibrillation</answer>",
    ];

    fn trained() -> MedTokenizer {
        let texts = CORPUS.iter().cycle().take(50).copied();
        MedTokenizer::train_byte_level_bpe(texts, 400, MEDTVT_SPECIAL_TOKENS).unwrap()
    }

    #[test]
    fn special_tokens_have_fixed_ids_and_stay_whole() {
        let tok = trained();
        for (i, token) in MEDTVT_SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(token), Some(i as i64), "{token}");
        }
        let ids = tok.encode("<ecg> rhythm <think>ok</think>", false).unwrap();
        assert_eq!(ids[0], 2);
        assert!(ids.contains(&5) && ids.contains(&6), "{ids:?}");
        assert!(tok.require_id("<nope>").unwrap_err().to_string().contains("<nope>"));
    }

    #[test]
    fn roundtrips_any_text_and_merges_frequent_words() {
        let tok = trained();
        for text in ["Sinus rhythm, ventricular edema.", "unseen wörds ✓ 123\n\ttabs"] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text);
        }
        let ids = tok.encode("ventricular", false).unwrap();
        assert!(ids.len() < "ventricular".len(), "no merges learned: {ids:?}");
        assert!(tok.vocab_size() <= 400 && tok.vocab_size() > 256 + MEDTVT_SPECIAL_TOKENS.len());
        let with_specials = tok.encode("<answer>x</answer>", false).unwrap();
        assert_eq!(tok.decode(&with_specials, true).unwrap(), "x");
    }

    #[test]
    fn training_is_deterministic_and_save_load_keeps_ids() {
        let (a, b) = (trained(), trained());
        let text = CORPUS.join(" ");
        assert_eq!(a.encode(&text, false).unwrap(), b.encode(&text, false).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        a.save(&path).unwrap();
        let loaded = MedTokenizer::from_file(&path).unwrap();
        assert_eq!(loaded.encode(&text, false).unwrap(), a.encode(&text, false).unwrap());
        assert_eq!(loaded.token_to_id("</answer>"), Some(8));
        let err = MedTokenizer::from_file(dir.path().join("missing.json")).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");
    }

    #[test]
    fn added_tokens_extend_a_loaded_tokenizer() {
        let mut tok = MedTokenizer::train_byte_level_bpe(CORPUS.iter().copied(), 300, &[EOS_TOKEN]).unwrap();
        let before = tok.vocab_size() as i64;
        assert_eq!(tok.add_special_tokens(&[ECG_TOKEN, CXR_TOKEN]).unwrap(), 2);
        assert_eq!(tok.token_to_id(ECG_TOKEN), Some(before));
        assert_eq!(tok.encode("a<cxr>", false).unwrap().last().copied(), Some(before + 1));
        assert_eq!(tok.id_bound(), before + 2);
        assert_eq!(tok.id_to_token(before + 1).as_deref(), Some(CXR_TOKEN));
        assert_eq!(tok.id_to_token(-1), None);
        // Adding a token the tokenizer already has keeps its id.
        assert_eq!(tok.add_special_tokens(&[ECG_TOKEN]).unwrap(), 0);
        assert_eq!(tok.token_to_id(ECG_TOKEN), Some(before));
    }
}
