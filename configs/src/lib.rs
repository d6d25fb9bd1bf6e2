//! Typed run configs for MedTVT-R1, loaded from TOML and validated at load.
//!
//! One file describes one stage of one run (`tiny-pt.toml`, `llama-3.2-1b-grpo.toml`, ...). Every
//! table rejects unknown keys, and `validate` checks ranges and paths, so a typo or a bad value is
//! an error naming the file, the key and the problem before any process starts. Dotted overrides
//! (`grpo.group_size=4`) are applied to the TOML before it is typed, so they are checked the same
//! way.

mod error;
mod overrides;
mod schema;

pub use error::ConfigError;
pub use schema::*;

use std::path::Path;

/// Reads, overrides, types and validates a run config.
pub fn load_run_config(path: &Path, overrides: &[String]) -> Result<RunConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_path_buf(), source })?;
    parse_run_config(&text, path, overrides)
}

/// Like [`load_run_config`] for text already in memory; `origin` names it in errors.
pub fn parse_run_config(text: &str, origin: &Path, overrides: &[String]) -> Result<RunConfig, ConfigError> {
    let config = parse_run_config_unvalidated(text, origin, overrides)?;
    config.validate(origin)?;
    Ok(config)
}

/// Reads, overrides and types a config without [`RunConfig::validate`] (which looks at the
/// paths it names): for checks that must come before any file is touched.
pub fn parse_run_config_unvalidated(text: &str, origin: &Path, overrides: &[String]) -> Result<RunConfig, ConfigError> {
    if overrides.is_empty() {
        return toml::from_str(text).map_err(|e| ConfigError::parse(origin, text, &e));
    }
    let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::parse(origin, text, &e))?;
    for spec in overrides {
        overrides::apply(&mut value, spec).map_err(|problem| ConfigError::Override {
            file: origin.to_path_buf(),
            spec: spec.clone(),
            problem,
        })?;
    }
    // Re-serialise so that serde's errors (unknown or missing keys) come with line numbers; they
    // are lines of the merged text, which the message says.
    let merged = toml::to_string(&value).map_err(|e| ConfigError::Override {
        file: origin.to_path_buf(),
        spec: overrides.join(" "),
        problem: e.to_string(),
    })?;
    toml::from_str(&merged).map_err(|e| {
        let mut err = ConfigError::parse(origin, &merged, &e);
        if let ConfigError::Parse { message, .. } = &mut err {
            message.push_str(" (line of the config with overrides applied)");
        }
        err
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn shipped(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
    }

    /// Overrides pointing every path of a shipped config at directories that exist.
    fn existing_paths(dir: &Path) -> Vec<String> {
        vec![format!("data.dir={}", dir.display()), format!("model.checkpoint={}", dir.display())]
    }

    #[test]
    fn every_shipped_config_loads_and_validates() {
        let tmp = std::env::temp_dir();
        let mut seen = 0;
        for entry in std::fs::read_dir(env!("CARGO_MANIFEST_DIR")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") && path.file_name() != Some("Cargo.toml".as_ref()) {
                let cfg = load_run_config(&path, &existing_paths(&tmp))
                    .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
                assert_eq!(cfg.data.diseases.len(), 7);
                seen += 1;
            }
        }
        assert_eq!(seen, 9, "three tiny, three showcase and three llama-3.2-1b configs");
    }

    #[test]
    fn grpo_config_carries_its_typed_options() {
        let tmp = std::env::temp_dir();
        let cfg = load_run_config(&shipped("tiny-grpo.toml"), &existing_paths(&tmp)).unwrap();
        let grpo = cfg.grpo.unwrap();
        assert_eq!(cfg.run.stage, Stage::Grpo);
        assert_eq!(grpo.group_size, 8);
        assert_eq!(grpo.kl_estimator, KlEstimator::K3);
        assert_eq!(grpo.loss_aggregation, LossAggregation::TokenMean);
        assert!((grpo.eps_high - 0.28).abs() < 1e-12);
    }

    fn load_text(text: &str) -> Result<RunConfig, ConfigError> {
        let tmp = std::env::temp_dir();
        let text = text.replace("DIR", &tmp.display().to_string());
        parse_run_config(&text, Path::new("my.toml"), &[])
    }

    const MINIMAL: &str = "[run]\nname = \"x\"\nstage = \"sft\"\nout_dir = \"o\"\n\n[data]\ndir = \"DIR\"\n\n[model]\n\n[train]\nsteps = 1\nlearning_rate = 0.1\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = load_text(MINIMAL).unwrap();
        assert_eq!(cfg.train.batch_size, 8);
        assert_eq!(cfg.cluster.learners, 2);
        assert_eq!(cfg.model.dtype, DType::F32);
        assert_eq!(cfg.model.encoders, EncoderSizes::Paper);
        let tiny = load_text(&MINIMAL.replace("[model]\n", "[model]\nencoders = \"tiny\"\n")).unwrap();
        assert_eq!(tiny.model.encoders, EncoderSizes::Tiny);
        let err = load_text(&MINIMAL.replace("[model]\n", "[model]\nencoders = \"huge\"\n")).unwrap_err().to_string();
        assert!(err.contains("huge") && err.contains("paper"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let text = MINIMAL.replace("steps = 1", "steps = 1\nlearnig_rate = 0.2");
        let err = load_text(&text).unwrap_err().to_string();
        assert!(err.starts_with("my.toml:13:1:"), "{err}");
        assert!(err.contains("learnig_rate"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let err = load_text(&MINIMAL.replace("steps = 1\n", "")).unwrap_err().to_string();
        assert!(err.contains("missing field `steps`"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_the_key() {
        let err = load_text(&MINIMAL.replace("learning_rate = 0.1", "learning_rate = -1.0")).unwrap_err();
        assert_eq!(err.to_string(), "my.toml: `train.learning_rate` must be a finite number > 0");
    }

    #[test]
    fn learner_loss_options_parse_and_their_timeouts_are_checked() {
        let cluster = |extra: &str| load_text(&format!("{MINIMAL}\n[cluster]\n{extra}"));
        let cfg = cluster("on_learner_loss = \"shrink\"\ncollective_timeout_s = 2.5\n").unwrap();
        assert_eq!(cfg.cluster.on_learner_loss, LearnerLossPolicy::Shrink);
        assert_eq!(cfg.cluster.collective_timeout_s, 2.5);
        assert_eq!(load_text(MINIMAL).unwrap().cluster.on_learner_loss, LearnerLossPolicy::Fail);
        let err = cluster("collective_timeout_s = 0.0\n").unwrap_err().to_string();
        assert_eq!(err, "my.toml: `cluster.collective_timeout_s` must be > 0");
        let err = cluster("replacement_timeout_s = -1.0\n").unwrap_err().to_string();
        assert_eq!(err, "my.toml: `cluster.replacement_timeout_s` must be > 0");
        let err = cluster("on_learner_loss = \"retry\"\n").unwrap_err().to_string();
        assert!(err.contains("retry") && err.contains("shrink"), "{err}");
    }

    #[test]
    fn missing_directory_is_named() {
        let err = load_text(&MINIMAL.replace("DIR", "/definitely/not/here")).unwrap_err().to_string();
        assert!(err.contains("`data.dir`") && err.contains("/definitely/not/here"), "{err}");
    }

    #[test]
    fn encoder_weight_files_must_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let weights = tmp.path().join("ecg.safetensors");
        std::fs::write(&weights, b"not checked here").unwrap();
        let with = |key: &str, path: &Path| {
            MINIMAL.replace("[model]\n", &format!("[model]\n{key} = \"{}\"\n", path.display()))
        };
        let cfg = load_text(&with("ecg_encoder_weights", &weights)).unwrap();
        assert_eq!(cfg.model.encoder_weights(), vec![("model.ecg_encoder_weights", weights.as_path())]);
        let missing = tmp.path().join("cxr.safetensors");
        let err = load_text(&with("cxr_encoder_weights", &missing)).unwrap_err().to_string();
        assert_eq!(err, format!("my.toml: `model.cxr_encoder_weights` = \"{}\": no such file", missing.display()));
        let wrong_kind = tmp.path().join("lab.bin");
        std::fs::write(&wrong_kind, b"x").unwrap();
        let err = load_text(&with("lab_encoder_weights", &wrong_kind)).unwrap_err().to_string();
        assert!(err.contains("`model.lab_encoder_weights`") && err.contains("expected a .safetensors file"), "{err}");
    }

    #[test]
    fn grpo_table_must_match_the_stage() {
        let err = load_text(&MINIMAL.replace("\"sft\"", "\"grpo\"")).unwrap_err().to_string();
        assert!(err.contains("`grpo` is required"), "{err}");
        let with_grpo = format!("{MINIMAL}\n[grpo]\ngroup_size = 1\nprompts_per_step = 1\nmax_new_tokens = 4\n")
            .replace("\"sft\"", "\"grpo\"");
        let err = load_text(&with_grpo).unwrap_err().to_string();
        assert!(err.contains("`grpo.group_size` must be at least 2"), "{err}");
    }

    /// Issue #12: the mismatch remedies, the dual clip and the answer limit are typed and checked.
    #[test]
    fn grpo_mismatch_options_and_answer_limit_are_validated() {
        let grpo = |extra: &str| {
            format!("{MINIMAL}\n[grpo]\ngroup_size = 2\nprompts_per_step = 1\nmax_new_tokens = 4\n{extra}\n")
                .replace("\"sft\"", "\"grpo\"")
        };
        let cfg = load_text(&grpo("")).unwrap();
        let g = cfg.grpo.unwrap();
        assert_eq!(
            (g.old_logprobs, g.importance_sampling, g.dual_clip),
            (OldLogprobs::Sampler, ImportanceSampling::None, None)
        );
        assert_eq!((g.importance_sampling_cap, cfg.data.max_answer_tokens), (3.0, 600));
        let cfg = load_text(&grpo("old_logprobs = \"learner\"\nimportance_sampling = \"mask\"\nimportance_sampling_cap = 3.0\ndual_clip = 3.0")).unwrap();
        let g = cfg.grpo.unwrap();
        assert_eq!(
            (g.old_logprobs, g.importance_sampling, g.dual_clip),
            (OldLogprobs::Learner, ImportanceSampling::Mask, Some(3.0))
        );
        let err = load_text(&grpo("importance_sampling = \"truncate\"")).unwrap_err().to_string();
        assert!(err.contains("`grpo.importance_sampling` needs grpo.old_logprobs = \"learner\""), "{err}");
        let err = load_text(&grpo("dual_clip = 1.0")).unwrap_err().to_string();
        assert!(err.contains("`grpo.dual_clip` must be a finite number > 1"), "{err}");
        let err = load_text(&grpo(
            "old_logprobs = \"learner\"\nimportance_sampling = \"truncate\"\nimportance_sampling_cap = 0.5",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("`grpo.importance_sampling_cap`"), "{err}");
        let err = load_text(&MINIMAL.replace("dir = \"DIR\"", "dir = \"DIR\"\nmax_answer_tokens = 0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`data.max_answer_tokens` must be at least 1"), "{err}");
    }

    #[test]
    fn overrides_are_validated_like_the_file() {
        let tmp = std::env::temp_dir();
        let mut ov = existing_paths(&tmp);
        ov.push("grpo.top_p=1.5".into());
        let err = load_run_config(&shipped("tiny-grpo.toml"), &ov).unwrap_err().to_string();
        assert!(err.contains("`grpo.top_p` must be in (0, 1]"), "{err}");
        ov.pop();
        ov.push("grpo.no_such_key=1".into());
        let err = load_run_config(&shipped("tiny-grpo.toml"), &ov).unwrap_err().to_string();
        assert!(err.contains("no_such_key"), "{err}");
    }

    #[test]
    fn unreadable_file_is_named() {
        let err = load_run_config(Path::new("/no/such/run.toml"), &[]).unwrap_err().to_string();
        assert!(err.starts_with("cannot read config /no/such/run.toml"), "{err}");
    }
}
