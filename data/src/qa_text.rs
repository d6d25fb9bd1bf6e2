//! The QA texts, generated from templates of structured findings (deterministic, no language
//! model). Short on purpose: a tiny model trained from scratch on a CPU must learn them.
//!
//! - Question: the placeholders of the present modalities first (`<ecg> <cxr> <lab>`), then the
//!   physiological or disease question.
//! - Physiological answer: `<think>ECG: ... CXR: ... Labs: ...</think><answer>f1; f2</answer>`:
//!   the think part describes each present modality; the answer lists the abnormal findings
//!   separated by `; ` (`no abnormal findings` when there are none).
//! - Disease answer: `<think>evidence per diagnosis</think><answer>d1; d2</answer>`: one sentence
//!   per labelled disease citing the sample's own findings and values, or saying the data show
//!   no clear sign of it; then the canonical disease names.

use crate::disease::Disease;
use crate::labs::{latest_values, LabEvent, LAB_ITEMS};
use serde::Serialize;

/// Which lung an opacity is in (the patient's side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Right,
    Left,
}

/// What the ECG shows; `None` = not assessed (then not mentioned).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EcgFindings {
    pub heart_rate: f64,
    /// Irregularly irregular rhythm without P waves.
    pub irregular: bool,
    pub st_depression: Option<bool>,
    pub t_inversion: Option<bool>,
    pub lvh_voltage: Option<bool>,
    pub peaked_t: Option<bool>,
}

/// What the X-ray shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CxrFindings {
    pub opacity: Option<Side>,
    pub cardiomegaly: bool,
}

/// One abnormal lab value with its reference range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabFinding {
    pub itemid: u32,
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub low: f64,
    pub high: f64,
}

impl LabFinding {
    pub fn is_high(&self) -> bool {
        self.value > self.high
    }

    fn describe(&self) -> String {
        let dir = if self.is_high() { "high" } else { "low" };
        format!("{} {} {} {dir} ({}-{})", self.name, num(self.value), self.unit, num(self.low), num(self.high))
    }

    fn short(&self) -> String {
        format!("{} {} {}", self.name, num(self.value), self.unit)
    }
}

/// Findings per modality: `present` says whether the modality is in the sample, the findings
/// whether it was assessed.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct Findings {
    pub ecg_present: bool,
    pub cxr_present: bool,
    pub lab_present: bool,
    pub ecg: Option<EcgFindings>,
    pub cxr: Option<CxrFindings>,
    /// Abnormal latest values of the 50 items, in table order.
    pub labs: Vec<LabFinding>,
}

/// Abnormal latest values (against the row's reference range, else the item table's).
pub fn abnormal_labs(events: &[LabEvent]) -> Vec<LabFinding> {
    latest_values(events)
        .iter()
        .zip(LAB_ITEMS.iter())
        .filter_map(|(e, item)| {
            let e = (*e)?;
            let value = e.valuenum?;
            let low = e.ref_range_lower.unwrap_or(item.ref_low);
            let high = e.ref_range_upper.unwrap_or(item.ref_high);
            (value < low || value > high).then(|| LabFinding {
                itemid: item.itemid,
                name: item.name.to_string(),
                value,
                unit: e.valueuom.clone().unwrap_or_else(|| item.unit.to_string()),
                low,
                high,
            })
        })
        .collect()
}

/// Compact number: up to 3 significant decimals, no trailing zeros.
pub fn num(x: f64) -> String {
    let s = if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn placeholders(f: &Findings) -> String {
    let mut p = Vec::new();
    if f.ecg_present {
        p.push(crate::sample::ECG_PLACEHOLDER);
    }
    if f.cxr_present {
        p.push(crate::sample::CXR_PLACEHOLDER);
    }
    if f.lab_present {
        p.push(crate::sample::LAB_PLACEHOLDER);
    }
    p.join(" ")
}

/// The physiological-level question.
pub fn physiological_question(f: &Findings) -> String {
    format!("{} Describe the findings of each modality.", placeholders(f))
}

/// The disease-level question over the configured diseases.
pub fn disease_question(f: &Findings, diseases: &[Disease]) -> String {
    let names: Vec<&str> = diseases.iter().map(|d| d.name()).collect();
    format!("{} Which of these diseases does the patient have: {}?", placeholders(f), names.join(", "))
}

/// ECG clauses and the names of its abnormal findings.
fn ecg_text(e: &EcgFindings) -> (String, Vec<String>) {
    let mut abnormal = Vec::new();
    let rhythm = if e.irregular {
        abnormal.push("irregular rhythm".to_string());
        "irregular rhythm without P waves"
    } else {
        "sinus rhythm"
    };
    let rate = e.heart_rate.round();
    if rate > 100.0 {
        abnormal.push("tachycardia".into());
    } else if rate < 60.0 {
        abnormal.push("bradycardia".into());
    }
    let mut parts = vec![format!("{rhythm}, {rate} bpm")];
    let signs = [
        (e.st_depression, "ST depression"),
        (e.t_inversion, "T inversion"),
        (e.lvh_voltage, "LVH voltage"),
        (e.peaked_t, "peaked T waves"),
    ];
    let mut assessed = false;
    for (flag, name) in signs {
        assessed |= flag.is_some();
        if flag == Some(true) {
            parts.push(name.to_string());
            abnormal.push(name.to_string());
        }
    }
    if assessed && parts.len() == 1 {
        parts.push("normal ST-T".into());
    }
    (parts.join(", "), abnormal)
}

fn cxr_text(c: &CxrFindings) -> (String, Vec<String>) {
    let mut abnormal = Vec::new();
    let mut parts = Vec::new();
    match c.opacity {
        Some(side) => {
            let s = format!("{} lung opacity", if side == Side::Right { "right" } else { "left" });
            parts.push(s.clone());
            abnormal.push(s);
        }
        None => parts.push("clear lungs".to_string()),
    }
    if c.cardiomegaly {
        parts.push("enlarged heart".into());
        abnormal.push("cardiomegaly".into());
    } else {
        parts.push("normal heart size".into());
    }
    (parts.join(", "), abnormal)
}

/// At most this many abnormal labs are described (the disease items come first in table order).
const MAX_LABS_DESCRIBED: usize = 4;

/// The physiological-level answer.
pub fn physiological_answer(f: &Findings) -> String {
    let mut think = Vec::new();
    let mut abnormal = Vec::new();
    if f.ecg_present {
        match &f.ecg {
            Some(e) => {
                let (t, a) = ecg_text(e);
                think.push(format!("ECG: {t}."));
                abnormal.extend(a);
            }
            None => think.push("ECG: recorded, not assessed.".into()),
        }
    }
    if f.cxr_present {
        match &f.cxr {
            Some(c) => {
                let (t, a) = cxr_text(c);
                think.push(format!("CXR: {t}."));
                abnormal.extend(a);
            }
            None => think.push("CXR: image provided, not assessed.".into()),
        }
    }
    if f.lab_present {
        if f.labs.is_empty() {
            think.push("Labs: within reference ranges.".into());
        } else {
            let shown: Vec<String> = f.labs.iter().take(MAX_LABS_DESCRIBED).map(LabFinding::describe).collect();
            think.push(format!("Labs: {}.", shown.join("; ")));
            abnormal.extend(
                f.labs
                    .iter()
                    .take(MAX_LABS_DESCRIBED)
                    .map(|l| format!("{} {}", if l.is_high() { "high" } else { "low" }, l.name)),
            );
        }
    }
    let answer = if abnormal.is_empty() { "no abnormal findings".to_string() } else { abnormal.join("; ") };
    format!("<think>{}</think><answer>{answer}</answer>", think.join(" "))
}

fn lab(f: &Findings, itemid: u32, high: bool) -> Option<&LabFinding> {
    f.labs.iter().find(|l| l.itemid == itemid && l.is_high() == high)
}

/// The findings that speak for `d` in this sample, as short phrases.
pub fn evidence(d: Disease, f: &Findings) -> Vec<String> {
    let mut ev = Vec::new();
    let e = f.ecg.as_ref();
    let c = f.cxr.as_ref();
    let add_lab = |ev: &mut Vec<String>, itemid: u32| {
        if let Some(l) = lab(f, itemid, true) {
            ev.push(l.short());
        }
    };
    match d {
        Disease::CoronaryArteryDisease => {
            add_lab(&mut ev, 51003);
            if e.is_some_and(|e| e.st_depression == Some(true)) {
                ev.push("ST depression".into());
            }
            if e.is_some_and(|e| e.t_inversion == Some(true)) {
                ev.push("T inversion".into());
            }
        }
        Disease::AcuteRenalFailure => {
            add_lab(&mut ev, 50912);
            add_lab(&mut ev, 51006);
            add_lab(&mut ev, 50971);
            if e.is_some_and(|e| e.peaked_t == Some(true)) {
                ev.push("peaked T waves".into());
            }
        }
        Disease::Hypertension => {
            if e.is_some_and(|e| e.lvh_voltage == Some(true)) {
                ev.push("LVH voltage".into());
            }
            if c.is_some_and(|c| c.cardiomegaly) {
                ev.push("an enlarged heart".into());
            }
        }
        Disease::AtrialFibrillation => {
            if e.is_some_and(|e| e.irregular) {
                ev.push("irregular rhythm without P waves".into());
            }
        }
        Disease::Pneumonia => {
            if let Some(side) = c.and_then(|c| c.opacity) {
                ev.push(format!("{} lung opacity", if side == Side::Right { "right" } else { "left" }));
            }
            add_lab(&mut ev, 51301);
        }
        Disease::DiabetesMellitus => {
            add_lab(&mut ev, 50931);
            add_lab(&mut ev, 50852);
        }
        Disease::Sepsis => {
            add_lab(&mut ev, 50813);
            add_lab(&mut ev, 51301);
            if let Some(e) = e.filter(|e| e.heart_rate.round() > 100.0) {
                ev.push(format!("heart rate {} bpm", e.heart_rate.round()));
            }
        }
    }
    ev
}

/// The disease-level answer for the given labels (canonical order).
pub fn disease_answer(f: &Findings, labels: &[Disease]) -> String {
    let mut think = Vec::new();
    for &d in labels {
        let ev = evidence(d, f);
        think.push(if ev.is_empty() {
            format!("No clear sign of {d} here, but it is recorded.")
        } else {
            format!("{} {} {d}.", capitalise(&join_and(&ev)), if ev.len() == 1 { "suggests" } else { "suggest" })
        });
    }
    if labels.is_empty() {
        think.push("No finding points to any listed disease.".into());
    }
    let names: Vec<&str> = labels.iter().map(|d| d.name()).collect();
    let answer = if names.is_empty() { "none".to_string() } else { names.join("; ") };
    format!("<think>{}</think><answer>{answer}</answer>", think.join(" "))
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [a] => a.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn findings() -> Findings {
        Findings {
            ecg_present: true,
            cxr_present: false,
            lab_present: true,
            ecg: Some(EcgFindings {
                heart_rate: 112.4,
                irregular: true,
                st_depression: Some(false),
                t_inversion: Some(false),
                lvh_voltage: Some(false),
                peaked_t: Some(false),
            }),
            cxr: None,
            labs: vec![LabFinding {
                itemid: 50813,
                name: "lactate".into(),
                value: 4.25,
                unit: "mmol/L".into(),
                low: 0.5,
                high: 2.0,
            }],
        }
    }

    #[test]
    fn texts_cite_the_values_and_use_the_tags() {
        let f = findings();
        assert_eq!(physiological_question(&f), "<ecg> <lab> Describe the findings of each modality.");
        let p = physiological_answer(&f);
        assert!(
            p.contains("irregular rhythm without P waves, 112 bpm") && p.contains("lactate 4.25 mmol/L high (0.5-2)"),
            "{p}"
        );
        assert!(p.ends_with("<answer>irregular rhythm; tachycardia; high lactate</answer>"), "{p}");
        let d = disease_answer(&f, &[Disease::AtrialFibrillation, Disease::Sepsis, Disease::Pneumonia]);
        assert!(d.contains("Lactate 4.25 mmol/L and heart rate 112 bpm suggest sepsis."), "{d}");
        assert!(d.contains("No clear sign of pneumonia"), "{d}");
        assert!(d.ends_with("<answer>atrial fibrillation; sepsis; pneumonia</answer>"), "{d}");
    }

    #[test]
    fn numbers_are_compact() {
        assert_eq!(num(0.005), "0.005");
        assert_eq!(num(2.50), "2.5");
        assert_eq!(num(135.4), "135");
        assert_eq!(num(14.25), "14.2");
    }
}
