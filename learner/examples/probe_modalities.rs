//! Where does the disease evidence go? Linear probes from what a MedTVT checkpoint's decoder
//! receives to each disease label, on the train and validation splits of a MedTVT-QA folder.
//!
//! For each disease a logistic regression (standardised features, L2, full-batch Adam) is fitted
//! on the train split and its balanced accuracy read on train and validation, for these inputs:
//! the raw modality inputs (the lab vector, the ECG averaged over 50-sample windows, the X-ray
//! pooled to 8 x 8), the adapter outputs before the Modality Perception Layer, the vectors after
//! it (what the decoder's placeholder tokens carry), each per modality and all three together,
//! and the post-MPL vectors with one modality removed from the input. A raw input that probes
//! well but an adapter output that does not means the encoder loses the evidence; an adapter
//! output that probes well while the model's answers miss the disease means the decoder does not
//! read it.
//!
//! ```sh
//! cargo run --release -p medtvt-learner --example probe_modalities -- runs/demo/sft/final runs/demo/data
//! ```

use anyhow::{bail, Context, Result};
use medtvt_config::{Stage, DEFAULT_DISEASES};
use medtvt_data::{LabPercentiles, QaKind, QaSample, Split};
use medtvt_model::medtvt::{MedTvt, PromptBatch};
use medtvt_role::inputs::{InputLoader, LAB_PERCENTILES_FILE};
use std::path::PathBuf;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

const MODALITIES: [&str; 3] = ["ecg", "cxr", "lab"];

/// Every feature set of one split, `[n, f]` each, in a fixed order, and the labels `[n, 7]`.
struct Features {
    sets: Vec<(String, Tensor)>,
    labels: Tensor,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [checkpoint, data] = &args[..] else {
        bail!("usage: probe_modalities CHECKPOINT_DIR DATA_DIR");
    };
    let (checkpoint, data) = (PathBuf::from(checkpoint), PathBuf::from(data));
    let mut model = MedTvt::load(&checkpoint, Device::Cpu, Kind::Float)
        .with_context(|| format!("loading {}", checkpoint.display()))?;
    // SFT wiring: the MPL is used (a PT checkpoint's MPL is untrained, but shows what it passes).
    model.set_trainable(Stage::Sft, true);
    let samples = medtvt_data::read_jsonl(&data.join("qa.jsonl"))?;
    let percentiles = LabPercentiles::load(&data.join(LAB_PERCENTILES_FILE))?;
    let loader = InputLoader::new(data.clone(), percentiles, model.image_size() as u32);
    let split = |which: Split| -> Vec<QaSample> {
        samples.iter().filter(|s| s.kind == QaKind::Disease && s.split == which).cloned().collect()
    };
    let train = features(&model, &loader, &split(Split::Train))?;
    let val = features(&model, &loader, &split(Split::Val))?;
    println!(
        "{} train and {} validation disease-level samples; balanced accuracy of a linear probe per disease\n",
        train.labels.size()[0],
        val.labels.size()[0]
    );
    println!("| input | mean train | mean val | {} |", DEFAULT_DISEASES.join(" | "));
    println!("|---|---:|---:|{}", "---:|".repeat(DEFAULT_DISEASES.len()));
    for ((name, x_train), (_, x_val)) in train.sets.iter().zip(&val.sets) {
        let mut row_train = Vec::new();
        let mut row_val = Vec::new();
        for d in 0..DEFAULT_DISEASES.len() as i64 {
            let (a, b) = probe(x_train, &train.labels.select(1, d), x_val, &val.labels.select(1, d));
            row_train.push(a);
            row_val.push(b);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let cells: Vec<String> = row_val.iter().map(|v| format!("{v:.2}")).collect();
        println!("| {name} | {:.2} | {:.2} | {} |", mean(&row_train), mean(&row_val), cells.join(" | "));
    }
    Ok(())
}

/// The feature sets of some samples, in batches.
fn features(model: &MedTvt, loader: &InputLoader, samples: &[QaSample]) -> Result<Features> {
    let mut parts: Vec<Vec<(String, Tensor)>> = Vec::new();
    let mut labels = Vec::new();
    for chunk in samples.chunks(32) {
        let prompts = loader.prompts(chunk)?;
        let batch = model.encode_prompts(&prompts, 256)?;
        parts.push(batch_features(model, &batch));
        for s in chunk {
            labels.extend(DEFAULT_DISEASES.iter().map(|d| f32::from(u8::from(s.labels.iter().any(|l| l == d)))));
        }
    }
    let names: Vec<String> = parts[0].iter().map(|(n, _)| n.clone()).collect();
    let sets = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (name.clone(), Tensor::cat(&parts.iter().map(|p| p[i].1.shallow_clone()).collect::<Vec<_>>(), 0))
        })
        .collect();
    let labels = Tensor::from_slice(&labels).view([samples.len() as i64, DEFAULT_DISEASES.len() as i64]);
    Ok(Features { sets, labels })
}

/// One batch's feature sets (see the module doc).
fn batch_features(model: &MedTvt, batch: &PromptBatch) -> Vec<(String, Tensor)> {
    let b = batch.ids.size()[0];
    let present = batch.present.to_kind(Kind::Float); // [b, 3]
    let raw_ecg = batch.ecg.view([b, 12, 20, 50]).mean_dim(3, false, Kind::Float).view([b, -1]);
    let raw_cxr = batch.cxr.adaptive_avg_pool2d([8, 8]).view([b, -1]);
    let raw_lab = batch.lab.shallow_clone();
    let raw = [raw_ecg, raw_cxr, raw_lab];
    let mut sets = Vec::new();
    for (m, name) in MODALITIES.iter().enumerate() {
        sets.push((format!("raw {name}"), Tensor::cat(&[&raw[m], &present.narrow(1, m as i64, 1)], 1)));
    }
    sets.push(("raw, all three".to_string(), Tensor::cat(&[&raw[0], &raw[1], &raw[2], &present], 1)));
    let (before, after) = model.modality_vectors(batch);
    for (stage, vectors) in [("before MPL", &before), ("after MPL", &after)] {
        for (m, name) in MODALITIES.iter().enumerate() {
            sets.push((format!("{stage}: {name}"), vectors.select(1, m as i64)));
        }
        sets.push((format!("{stage}: all three"), vectors.view([b, -1])));
    }
    for (m, name) in MODALITIES.iter().enumerate() {
        let without = without_modality(batch, m as i64);
        let (_, after) = model.modality_vectors(&without);
        sets.push((format!("after MPL, {name} removed"), after.view([b, -1])));
    }
    sets
}

/// The batch with modality `m` absent from every row.
fn without_modality(batch: &PromptBatch, m: i64) -> PromptBatch {
    let present = batch.present.copy();
    let _ = present.narrow(1, m, 1).fill_(0);
    PromptBatch {
        ids: batch.ids.shallow_clone(),
        mask: batch.mask.shallow_clone(),
        ecg: if m == 0 { batch.ecg.zeros_like() } else { batch.ecg.shallow_clone() },
        cxr: if m == 1 { batch.cxr.zeros_like() } else { batch.cxr.shallow_clone() },
        lab: if m == 2 { batch.lab.zeros_like() } else { batch.lab.shallow_clone() },
        present,
        present_rows: batch
            .present_rows
            .iter()
            .map(|row| {
                let mut row = *row;
                row[m as usize] = false;
                row
            })
            .collect(),
        repeats: 1,
    }
}

/// Fits an L2 logistic regression of `y` on standardised `x` (train statistics) and returns its
/// balanced accuracy (mean of sensitivity and specificity) on train and on validation.
fn probe(x_train: &Tensor, y_train: &Tensor, x_val: &Tensor, y_val: &Tensor) -> (f64, f64) {
    let mean = x_train.mean_dim(0, true, Kind::Float);
    let std = x_train.std_dim(0, true, true).clamp_min(1e-6);
    let (xt, xv) = ((x_train - &mean) / &std, (x_val - &mean) / &std);
    let vs = nn::VarStore::new(Device::Cpu);
    let w = vs.root().zeros("w", &[xt.size()[1], 1]);
    let bias = vs.root().zeros("b", &[1]);
    let mut opt = nn::Adam::default().build(&vs, 0.05).expect("Adam over two tensors");
    // Class weights so that a rare disease counts as much as a common one.
    let positive = y_train.mean(Kind::Float).double_value(&[]).clamp(1e-3, 1.0 - 1e-3);
    let weights = y_train * (0.5 / positive) + (1.0 - y_train) * (0.5 / (1.0 - positive));
    for _ in 0..300 {
        let logits = xt.matmul(&w).squeeze_dim(1) + &bias;
        let loss =
            logits.binary_cross_entropy_with_logits::<&Tensor>(y_train, Some(&weights), None, tch::Reduction::Mean)
                + w.square().sum(Kind::Float) * 1e-3;
        opt.backward_step(&loss);
    }
    let balanced = |x: &Tensor, y: &Tensor| {
        let predicted = tch::no_grad(|| (x.matmul(&w).squeeze_dim(1) + &bias).gt(0.0)).to_kind(Kind::Float);
        let recall = |target: f64| {
            let of = y.eq(target);
            let n = of.sum(Kind::Float).double_value(&[]);
            if n == 0.0 {
                return 0.5;
            }
            let hit = predicted.eq(target).logical_and(&of).sum(Kind::Float).double_value(&[]);
            hit / n
        };
        (recall(1.0) + recall(0.0)) / 2.0
    };
    (balanced(&xt, y_train), balanced(&xv, y_val))
}
