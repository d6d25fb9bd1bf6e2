//! The Contribution-Aware Operator's gates in an evaluation: the weight the model gave each
//! modality (ECG, CXR, lab) for one answer, one record per evaluated answer, and the mean gate
//! per modality over the answers where that modality was present. An absent modality has no gate
//! (`null` in JSON): the model masks it, so its zero gate says nothing about the model's
//! judgement and is left out of the means.

use serde::Serialize;
use std::fmt::Write;

/// Names of the modalities in the order the model reports their gates.
pub const GATE_MODALITIES: [&str; 3] = ["ecg", "cxr", "lab"];

/// One answer's gates; `None` where the sample had no such modality.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct ModalityGates {
    pub ecg: Option<f64>,
    pub cxr: Option<f64>,
    pub lab: Option<f64>,
}

impl ModalityGates {
    /// From gates in [`GATE_MODALITIES`] order.
    pub fn from_ordered(gates: [Option<f32>; 3]) -> Self {
        let [ecg, cxr, lab] = gates.map(|g| g.map(f64::from));
        ModalityGates { ecg, cxr, lab }
    }

    /// The gates in [`GATE_MODALITIES`] order.
    pub fn ordered(&self) -> [Option<f64>; 3] {
        [self.ecg, self.cxr, self.lab]
    }
}

/// One evaluated answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnswerRecord {
    /// The QA sample's id.
    pub id: String,
    /// `disease` or `physiological`.
    pub kind: String,
    /// The generated text.
    pub answer: String,
    pub cao_gates: ModalityGates,
}

/// The mean gate of one modality.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateMean {
    pub modality: String,
    /// Mean over the answers with the modality present; `None` when it was absent from all.
    pub mean: Option<f64>,
    /// Answers with the modality present.
    pub present: u64,
    /// Answers without it (left out of the mean).
    pub absent: u64,
}

/// Mean gates per modality, in [`GATE_MODALITIES`] order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GateSummary {
    pub answers: u64,
    pub per_modality: Vec<GateMean>,
}

impl GateSummary {
    pub fn from_gates<'a>(gates: impl IntoIterator<Item = &'a ModalityGates>) -> Self {
        let mut sums = [0f64; 3];
        let mut present = [0u64; 3];
        let mut answers = 0u64;
        for g in gates {
            answers += 1;
            for (i, gate) in g.ordered().into_iter().enumerate() {
                if let Some(v) = gate {
                    sums[i] += v;
                    present[i] += 1;
                }
            }
        }
        let per_modality = GATE_MODALITIES
            .iter()
            .enumerate()
            .map(|(i, name)| GateMean {
                modality: name.to_string(),
                mean: (present[i] > 0).then(|| sums[i] / present[i] as f64),
                present: present[i],
                absent: answers - present[i],
            })
            .collect();
        GateSummary { answers, per_modality }
    }

    /// A Markdown table of the means.
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "## CAO gates ({} answers)\n", self.answers);
        let _ = writeln!(out, "| Modality | Mean gate | Present | Absent |\n|---|---:|---:|---:|");
        for row in &self.per_modality {
            let mean = row.mean.map_or_else(|| "–".to_string(), |m| format!("{m:.4}"));
            let _ = writeln!(out, "| {} | {mean} | {} | {} |", row.modality, row.present, row.absent);
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_skip_absent_modalities() {
        let gates = [
            ModalityGates::from_ordered([Some(0.5), None, Some(0.25)]),
            ModalityGates::from_ordered([Some(0.75), None, None]),
        ];
        let s = GateSummary::from_gates(&gates);
        assert_eq!(s.answers, 2);
        assert_eq!(s.per_modality[0], GateMean { modality: "ecg".into(), mean: Some(0.625), present: 2, absent: 0 });
        assert_eq!(s.per_modality[1], GateMean { modality: "cxr".into(), mean: None, present: 0, absent: 2 });
        assert_eq!(s.per_modality[2].mean, Some(0.25));
        let md = s.to_markdown();
        assert!(md.contains("| ecg | 0.6250 | 2 | 0 |"), "{md}");
        assert!(md.contains("| cxr | – | 0 | 2 |"), "{md}");
    }

    #[test]
    fn absent_gate_is_null_in_json() {
        let record = AnswerRecord {
            id: "s1".into(),
            kind: "disease".into(),
            answer: "<answer>sepsis</answer>".into(),
            cao_gates: ModalityGates::from_ordered([Some(0.5), None, Some(0.25)]),
        };
        let v: serde_json::Value = serde_json::to_value(&record).unwrap();
        assert_eq!(v["cao_gates"], serde_json::json!({"ecg": 0.5, "cxr": null, "lab": 0.25}));
    }
}
