//! `medtvt eval`: runs a checkpoint over one split of a MedTVT-QA set with greedy decoding and
//! reports disease-level precision / recall / F1 (per disease, macro, micro), sample-wise
//! Jaccard, exact-set accuracy and the valid-format rate, plus BLEU-4 and ROUGE-L for the
//! physiological QA, and the mean CAO gate per modality, as Markdown tables and as JSON (which
//! also lists every answer with its sample id and CAO gates). `evaluate` is reused by
//! `medtvt demo`.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use medtvt_data::{load_inputs, read_jsonl, LabPercentiles, QaKind, QaSample, Split};
use medtvt_eval::{
    AnswerRecord, DiagnosisReward, DiseaseEvaluator, DiseaseVocabulary, EvalReport, ModalityGates, NameMatching,
    RewardWeights, TextEvaluator,
};
use medtvt_model::perception::SampleGates;
use medtvt_model::{MedTvt, SamplingParams};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// A checkpoint directory written by a PT/SFT/GRPO job (e.g. runs/demo/grpo/final).
    #[arg(long, env = "MEDTVT_CHECKPOINT")]
    pub checkpoint: PathBuf,
    /// The MedTVT-QA directory (with qa.jsonl).
    #[arg(long, env = "MEDTVT_DATA")]
    pub data: PathBuf,
    /// Which split to evaluate: train, val or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Evaluate at most this many samples of each kind.
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 160)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 512)]
    pub max_prompt_tokens: usize,
    /// Match disease names exactly (the reference implementation) instead of case-insensitively
    /// with synonyms.
    #[arg(long)]
    pub exact: bool,
    /// Write the report as JSON here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "MEDTVT_DEVICE", default_value = "cpu")]
    pub device: String,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let report = evaluate(args)?;
    println!("{}", report.to_markdown());
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json()?).with_context(|| format!("writing {}", path.display()))?;
        println!("JSON report: {}", path.display());
    }
    Ok(())
}

fn parse_split(s: &str) -> anyhow::Result<Split> {
    Split::ALL
        .into_iter()
        .find(|split| split.as_str() == s)
        .ok_or_else(|| anyhow::anyhow!("--split {s:?}: expected train, val or test"))
}

/// Generates an answer for every sample of the split and scores it; the report keeps each answer
/// with its CAO gates.
pub fn evaluate(args: &EvalArgs) -> anyhow::Result<EvalReport> {
    let split = parse_split(&args.split)?;
    let device = match args.device.as_str() {
        "auto" => tch::Device::cuda_if_available(),
        other => medtvt_role::device::parse_device(other)?,
    };
    let model = MedTvt::load(&args.checkpoint, device, tch::Kind::Float)
        .with_context(|| format!("loading checkpoint {}", args.checkpoint.display()))?;
    let qa = args.data.join("qa.jsonl");
    let samples = read_jsonl(&qa)?;
    let percentiles = LabPercentiles::load(&args.data.join("lab_percentiles.json"))?;
    let names: Vec<String> = samples
        .iter()
        .flat_map(|s| s.labels.iter().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let names =
        if names.is_empty() { medtvt_eval::PAPER_DISEASES.iter().map(|s| s.to_string()).collect() } else { names };
    let matching = if args.exact { NameMatching::Exact } else { NameMatching::Synonyms };
    let vocabulary = DiseaseVocabulary::from_names(&names, matching)?;
    let reward = DiagnosisReward::new(vocabulary, RewardWeights::default());
    let mut report = EvalReport::default();
    let mut records = Vec::new();
    for kind in [QaKind::Disease, QaKind::Physiological] {
        let chosen: Vec<&QaSample> = samples
            .iter()
            .filter(|s| s.split == split && s.kind == kind)
            .take(args.limit.unwrap_or(usize::MAX))
            .collect();
        if chosen.is_empty() {
            continue;
        }
        let generated = generate_answers(&model, &args.data, &percentiles, &chosen, args, kind)?;
        let answers: Vec<String> = generated.iter().map(|(text, _)| text.clone()).collect();
        records.extend(chosen.iter().zip(&generated).map(|(s, (text, gates))| AnswerRecord {
            id: s.id.clone(),
            kind: kind.to_string(),
            answer: text.clone(),
            cao_gates: ModalityGates::from_ordered(*gates),
        }));
        match kind {
            QaKind::Disease => {
                let mut e = DiseaseEvaluator::new(reward.clone());
                for (s, a) in chosen.iter().zip(&answers) {
                    e.add_with_reference(a, &s.answer);
                }
                report.disease = Some(e.finish());
            }
            QaKind::Physiological => {
                let mut e = TextEvaluator::default();
                for (s, a) in chosen.iter().zip(&answers) {
                    e.add(a, &s.answer);
                }
                report.text = Some(e.finish());
            }
        }
    }
    report.set_answers(records);
    Ok(report)
}

fn generate_answers(
    model: &MedTvt,
    data: &Path,
    percentiles: &LabPercentiles,
    samples: &[&QaSample],
    args: &EvalArgs,
    kind: QaKind,
) -> anyhow::Result<Vec<(String, SampleGates)>> {
    let bar = ProgressBar::new(samples.len() as u64).with_message(format!("eval {kind}"));
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if bar.is_hidden() {
        println!("evaluating {} {kind} samples", samples.len());
    }
    let params = SamplingParams { max_new_tokens: args.max_new_tokens, greedy: true, ..SamplingParams::default() };
    let mut answers = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(args.batch_size.max(1)) {
        let prompts = chunk
            .iter()
            .map(|s| Ok((s.question.clone(), load_inputs(data, s, percentiles, model.image_size() as u32)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let batch = model.encode_prompts(&prompts, args.max_prompt_tokens)?;
        let (generation, gates) = model.generate(&batch, &params)?;
        for (tokens, gates) in generation.tokens.iter().zip(gates) {
            answers.push((model.decode(tokens)?, gates));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(answers)
}

/// The report's headline numbers as metrics.jsonl values (`eval/...`), per-disease F1 and the
/// mean CAO gates included.
pub fn report_metrics(report: &EvalReport) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if let Some(d) = &report.disease {
        m.insert("eval/jaccard".into(), d.sample_jaccard);
        m.insert("eval/macro_f1".into(), d.macro_avg.f1);
        m.insert("eval/micro_f1".into(), d.micro_avg.f1);
        m.insert("eval/exact_match".into(), d.subset_accuracy);
        m.insert("eval/valid_format".into(), d.valid_format_rate);
        for row in &d.per_disease {
            m.insert(format!("eval/f1/{}", row.disease), row.f1);
        }
    }
    if let Some(t) = &report.text {
        m.insert("eval/bleu4".into(), t.bleu4);
        m.insert("eval/rouge_l".into(), t.rouge_l_f);
    }
    for row in report.cao_gates.iter().flat_map(|g| &g.per_modality) {
        if let Some(mean) = row.mean {
            m.insert(format!("eval/cao_gate/{}", row.modality), mean);
        }
    }
    m
}
