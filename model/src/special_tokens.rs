//! A checkpoint's own conversation conventions, read from its files: the chat template and the
//! special tokens (bos, every eos id, pad), and writing them back so that transformers and our
//! own loader read the same thing from a saved checkpoint.
//!
//! Where each comes from, in order of precedence (first found wins, as in transformers):
//! - chat template: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a
//!   string, or a list of `{name, template}` of which `default` is taken);
//! - eos: `tokenizer_config.json`'s `eos_token` first (the token the template ends a turn with,
//!   appended to SFT answers), then every id of `config.json`'s and `generation_config.json`'s
//!   `eos_token_id` (an int or a list): generation stops on any of them;
//! - bos: `config.json`, `generation_config.json`, then `tokenizer_config.json`'s `bos_token`;
//! - pad: the same three files, else the first eos id.
//!
//! The token strings a template prints (`bos_token`, `eos_token`, ...) are those of
//! `tokenizer_config.json` only, since that is what `apply_chat_template` passes.

use crate::chat_template::{ChatTemplate, ChatTemplateError, TemplateTokens};
use crate::tokenizer::MedTokenizer;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

pub const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
pub const GENERATION_CONFIG_JSON: &str = "generation_config.json";
pub const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";

/// Why a checkpoint's tokens or template could not be read; names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum SpecialTokensError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: `{field}` = {value}: {why}")]
    Field { path: PathBuf, field: String, value: String, why: String },
    #[error(
        "{dir} has no chat template: neither {CHAT_TEMPLATE_JINJA} nor a `chat_template` in {TOKENIZER_CONFIG_JSON} \
(use an instruct checkpoint, or add the template the model was tuned with to {TOKENIZER_CONFIG_JSON})"
    )]
    NoChatTemplate { dir: PathBuf },
    #[error(
        "{dir}: no end-of-sequence token (set `eos_token_id` in config.json or `eos_token` in {TOKENIZER_CONFIG_JSON})"
    )]
    NoEos { dir: PathBuf },
    #[error(transparent)]
    Template(#[from] ChatTemplateError),
}

/// The ids the model uses to start, end and pad sequences.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<i64>,
    /// Every id that ends a completion; the first is appended to supervised answers.
    pub eos: Vec<i64>,
    pub pad: i64,
    /// The strings the chat template may print.
    pub strings: TemplateTokens,
}

/// A JSON object file of the checkpoint, kept whole so that saving changes only our fields.
#[derive(Debug, Clone, Default)]
pub struct JsonFile {
    pub path: PathBuf,
    pub fields: Map<String, Value>,
}

impl JsonFile {
    /// `dir/name`, or an empty object (with that path) when the file does not exist.
    pub fn read_or_empty(dir: &Path, name: &str) -> Result<JsonFile, SpecialTokensError> {
        let path = dir.join(name);
        if !path.is_file() {
            return Ok(JsonFile { path, fields: Map::new() });
        }
        let file_error = |message: String| SpecialTokensError::File { path: path.clone(), message };
        let text = std::fs::read_to_string(&path).map_err(|e| file_error(e.to_string()))?;
        match serde_json::from_str(&text).map_err(|e| file_error(format!("not valid JSON: {e}")))? {
            Value::Object(fields) => Ok(JsonFile { path, fields }),
            _ => Err(file_error("not a JSON object".into())),
        }
    }

    fn field_error(&self, field: &str, value: &Value, why: impl Into<String>) -> SpecialTokensError {
        SpecialTokensError::Field {
            path: self.path.clone(),
            field: field.to_string(),
            value: value.to_string(),
            why: why.into(),
        }
    }

    /// A token string field: a string, or an `AddedToken` object `{"content": ...}`; null or
    /// absent is `None`.
    pub fn token(&self, field: &str) -> Result<Option<String>, SpecialTokensError> {
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ Value::Object(o)) => match o.get("content") {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(self.field_error(field, v, "an added-token object needs a string `content`")),
            },
            Some(v) => Err(self.field_error(field, v, "expected a token string")),
        }
    }

    /// A token id field: an int or a list of ints; null or absent is empty.
    pub fn ids(&self, field: &str) -> Result<Vec<i64>, SpecialTokensError> {
        let bad = |v: &Value| self.field_error(field, v, "expected a token id or a list of token ids");
        match self.fields.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v @ Value::Number(n)) => n.as_i64().map(|id| vec![id]).ok_or_else(|| bad(v)),
            Some(v @ Value::Array(items)) => items.iter().map(|i| i.as_i64().ok_or_else(|| bad(v))).collect(),
            Some(v) => Err(bad(v)),
        }
    }

    /// `chat_template`: a string, or HF's list of named templates (the `default` one).
    fn chat_template(&self) -> Result<Option<String>, SpecialTokensError> {
        match self.fields.get("chat_template") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v @ Value::Array(named)) => {
                let default = named.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                match default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                    Some(s) => Ok(Some(s.to_string())),
                    None => Err(self.field_error("chat_template", v, "a list of templates needs one named `default`")),
                }
            }
            Some(v) => Err(self.field_error("chat_template", v, "expected a Jinja template string")),
        }
    }

    fn write(&self) -> Result<(), SpecialTokensError> {
        let text = serde_json::to_string_pretty(&self.fields).unwrap_or_default();
        std::fs::write(&self.path, text + "\n")
            .map_err(|e| SpecialTokensError::File { path: self.path.clone(), message: e.to_string() })
    }
}

/// Everything of a checkpoint's conversation conventions: its template, its special tokens and
/// the files they came from (rewritten on save with only our fields changed).
#[derive(Debug)]
pub struct ChatFormat {
    pub template: ChatTemplate,
    pub tokens: SpecialTokens,
    tokenizer_config: Map<String, Value>,
    generation_config: Map<String, Value>,
}

impl ChatFormat {
    /// A format made in code (the tiny model's), with no files behind it.
    pub fn new(template: ChatTemplate, tokens: SpecialTokens) -> ChatFormat {
        ChatFormat { template, tokens, tokenizer_config: Map::new(), generation_config: Map::new() }
    }

    /// Reads the template and special tokens of the checkpoint in `dir` (see the module doc);
    /// `config_json` holds config.json's bos/eos/pad ids. Every id must be below `vocab`.
    pub fn from_checkpoint(
        dir: &Path,
        tokenizer: &MedTokenizer,
        config_json: (&Option<i64>, &[i64], &Option<i64>),
        vocab: i64,
    ) -> Result<ChatFormat, SpecialTokensError> {
        let tokenizer_config = JsonFile::read_or_empty(dir, TOKENIZER_CONFIG_JSON)?;
        let generation_config = JsonFile::read_or_empty(dir, GENERATION_CONFIG_JSON)?;
        let template = read_template(dir, &tokenizer_config)?;
        let strings = TemplateTokens {
            bos_token: tokenizer_config.token("bos_token")?,
            eos_token: tokenizer_config.token("eos_token")?,
            pad_token: tokenizer_config.token("pad_token")?,
            unk_token: tokenizer_config.token("unk_token")?,
        };
        let id_of = |field: &str, token: &Option<String>| -> Result<Option<i64>, SpecialTokensError> {
            let Some(token) = token else { return Ok(None) };
            tokenizer.token_to_id(token).map(Some).ok_or_else(|| {
                tokenizer_config.field_error(field, &json!(token), "the tokenizer (tokenizer.json) has no such token")
            })
        };
        let (config_bos, config_eos, config_pad) = config_json;
        let mut eos: Vec<i64> = Vec::new();
        let candidates = id_of("eos_token", &strings.eos_token)?
            .into_iter()
            .chain(config_eos.iter().copied())
            .chain(generation_config.ids("eos_token_id")?);
        for id in candidates {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let first = |ids: [Option<i64>; 3]| ids.into_iter().flatten().next();
        let bos = first([
            *config_bos,
            generation_config.ids("bos_token_id")?.first().copied(),
            id_of("bos_token", &strings.bos_token)?,
        ]);
        let pad = first([
            *config_pad,
            generation_config.ids("pad_token_id")?.first().copied(),
            id_of("pad_token", &strings.pad_token)?,
        ])
        .or_else(|| eos.first().copied())
        .ok_or_else(|| SpecialTokensError::NoEos { dir: dir.to_path_buf() })?;
        if eos.is_empty() {
            return Err(SpecialTokensError::NoEos { dir: dir.to_path_buf() });
        }
        if let Some(&bad) = eos.iter().chain(&bos).chain([&pad]).find(|&&id| id < 0 || id >= vocab) {
            return Err(SpecialTokensError::File {
                path: dir.to_path_buf(),
                message: format!("special token id {bad} (bos/eos/pad) is outside the vocabulary of {vocab}"),
            });
        }
        Ok(ChatFormat {
            template,
            tokens: SpecialTokens { bos, eos, pad, strings },
            tokenizer_config: tokenizer_config.fields,
            generation_config: generation_config.fields,
        })
    }

    /// Writes `tokenizer_config.json` (the template and token strings) and
    /// `generation_config.json` (bos, every eos id, pad) into `dir`, keeping the base's other
    /// fields; config.json's ids are the caller's (it owns that file).
    pub fn save(&self, dir: &Path, tokenizer: &MedTokenizer) -> Result<(), SpecialTokensError> {
        let mut tokenizer_config =
            JsonFile { path: dir.join(TOKENIZER_CONFIG_JSON), fields: self.tokenizer_config.clone() };
        let fields = &mut tokenizer_config.fields;
        fields.entry("tokenizer_class").or_insert_with(|| json!("PreTrainedTokenizerFast"));
        fields.insert("chat_template".into(), json!(self.template.source()));
        let t = &self.tokens;
        for (field, token) in [
            ("bos_token", t.strings.bos_token.clone().or_else(|| t.bos.and_then(|id| tokenizer.id_to_token(id)))),
            (
                "eos_token",
                t.strings.eos_token.clone().or_else(|| t.eos.first().and_then(|&id| tokenizer.id_to_token(id))),
            ),
            ("pad_token", t.strings.pad_token.clone().or_else(|| tokenizer.id_to_token(t.pad))),
            ("unk_token", t.strings.unk_token.clone()),
        ] {
            if let Some(token) = token {
                fields.insert(field.into(), json!(token));
            }
        }
        // A chat_template.jinja beside it would win over this file's template: we write none.
        tokenizer_config.write()?;
        let mut generation_config =
            JsonFile { path: dir.join(GENERATION_CONFIG_JSON), fields: self.generation_config.clone() };
        generation_config.fields.insert("bos_token_id".into(), json!(t.bos));
        generation_config.fields.insert("eos_token_id".into(), json!(t.eos));
        generation_config.fields.insert("pad_token_id".into(), json!(t.pad));
        generation_config.write()
    }
}

/// `chat_template.jinja`, else tokenizer_config.json's `chat_template`, compiled.
fn read_template(dir: &Path, tokenizer_config: &JsonFile) -> Result<ChatTemplate, SpecialTokensError> {
    let jinja = dir.join(CHAT_TEMPLATE_JINJA);
    if jinja.is_file() {
        let source = std::fs::read_to_string(&jinja)
            .map_err(|e| SpecialTokensError::File { path: jinja.clone(), message: e.to_string() })?;
        return Ok(ChatTemplate::new(source, &jinja)?);
    }
    match tokenizer_config.chat_template()? {
        Some(source) => Ok(ChatTemplate::new(source, &tokenizer_config.path)?),
        None => Err(SpecialTokensError::NoChatTemplate { dir: dir.to_path_buf() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn tokenizer() -> MedTokenizer {
        let corpus = ["hello world, a small corpus"; 10];
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"];
        MedTokenizer::train_byte_level_bpe(corpus.iter().copied(), 300, &specials).unwrap()
    }

    fn write(dir: &Path, name: &str, value: Value) {
        std::fs::write(dir.join(name), value.to_string()).unwrap();
    }

    #[test]
    fn eos_ids_gather_every_file_with_the_turn_end_first() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            TOKENIZER_CONFIG_JSON,
            json!({"chat_template": CHATML, "eos_token": {"content": "<|im_end|>"}, "bos_token": "<s>"}),
        );
        write(dir.path(), GENERATION_CONFIG_JSON, json!({"eos_token_id": [2, 0], "temperature": 0.6}));
        let f = ChatFormat::from_checkpoint(dir.path(), &tokenizer(), (&None, &[0], &None), 300).unwrap();
        assert_eq!(f.tokens.eos, vec![2, 0]);
        assert_eq!(f.tokens.pad, 2, "pad falls back to the first eos");
        assert_eq!(f.tokens.bos, Some(3));
        assert_eq!(f.tokens.strings.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(f.template.origin(), dir.path().join(TOKENIZER_CONFIG_JSON));

        // Saved and read back: the same tokens (the pad token now named, for transformers'
        // padding), the base's other generation fields kept.
        let out = tempfile::tempdir().unwrap();
        f.save(out.path(), &tokenizer()).unwrap();
        let back = ChatFormat::from_checkpoint(out.path(), &tokenizer(), (&None, &[], &None), 300).unwrap();
        let mut expected = f.tokens.clone();
        expected.strings.pad_token = Some("<|im_end|>".into());
        assert_eq!(back.tokens, expected);
        assert_eq!(back.template.source(), CHATML);
        let generation = JsonFile::read_or_empty(out.path(), GENERATION_CONFIG_JSON).unwrap();
        assert_eq!(generation.fields["temperature"], json!(0.6));
    }

    #[test]
    fn a_jinja_file_wins_and_a_list_of_templates_gives_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let named = json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}]);
        write(dir.path(), TOKENIZER_CONFIG_JSON, json!({"chat_template": named, "eos_token": "<|im_end|>"}));
        let f = ChatFormat::from_checkpoint(dir.path(), &tokenizer(), (&None, &[], &Some(0)), 300).unwrap();
        assert_eq!(f.template.source(), CHATML);
        assert_eq!((f.tokens.eos.clone(), f.tokens.pad), (vec![2], 0));
        std::fs::write(dir.path().join(CHAT_TEMPLATE_JINJA), "J").unwrap();
        let f = ChatFormat::from_checkpoint(dir.path(), &tokenizer(), (&None, &[], &None), 300).unwrap();
        assert_eq!(f.template.source(), "J");
    }

    #[test]
    fn missing_or_wrong_entries_are_errors_naming_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            ChatFormat::from_checkpoint(dir.path(), &tokenizer(), (&None, &[0], &None), 300).unwrap_err().to_string();
        assert!(err.contains("has no chat template") && err.contains(TOKENIZER_CONFIG_JSON), "{err}");
        write(dir.path(), TOKENIZER_CONFIG_JSON, json!({"chat_template": CHATML, "eos_token": "<nope>"}));
        let err =
            ChatFormat::from_checkpoint(dir.path(), &tokenizer(), (&None, &[], &None), 300).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json: `eos_token` = \"<nope>\""), "{err}");
        write(dir.path(), TOKENIZER_CONFIG_JSON, json!({"chat_template": CHATML}));
        let err =
            ChatFormat::from_checkpoint(dir.path(), &tokenizer(), (&None, &[], &None), 300).unwrap_err().to_string();
        assert!(err.contains("no end-of-sequence token"), "{err}");
        write(dir.path(), GENERATION_CONFIG_JSON, json!({"eos_token_id": "two"}));
        let err =
            ChatFormat::from_checkpoint(dir.path(), &tokenizer(), (&None, &[], &None), 300).unwrap_err().to_string();
        assert!(err.contains("generation_config.json: `eos_token_id` = \"two\""), "{err}");
        write(dir.path(), GENERATION_CONFIG_JSON, json!({}));
        let err =
            ChatFormat::from_checkpoint(dir.path(), &tokenizer(), (&None, &[500], &None), 300).unwrap_err().to_string();
        assert!(err.contains("500") && err.contains("outside the vocabulary of 300"), "{err}");
    }
}
