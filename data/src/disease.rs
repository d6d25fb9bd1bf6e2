//! The diseases MedTVT-QA labels (the paper's seven), their canonical names (the spelling the
//! answers use, the same as medtvt-eval's vocabulary) and the ICD codes that assign them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One of the paper's seven diseases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disease {
    CoronaryArteryDisease,
    AcuteRenalFailure,
    Hypertension,
    AtrialFibrillation,
    Pneumonia,
    DiabetesMellitus,
    Sepsis,
}

impl Disease {
    /// The seven in the paper's order (also the order labels are listed in).
    pub const ALL: [Disease; 7] = [
        Disease::CoronaryArteryDisease,
        Disease::AcuteRenalFailure,
        Disease::Hypertension,
        Disease::AtrialFibrillation,
        Disease::Pneumonia,
        Disease::DiabetesMellitus,
        Disease::Sepsis,
    ];

    /// Canonical name, as written in answers and labels.
    pub fn name(self) -> &'static str {
        match self {
            Disease::CoronaryArteryDisease => "coronary artery disease",
            Disease::AcuteRenalFailure => "acute renal failure",
            Disease::Hypertension => "hypertension",
            Disease::AtrialFibrillation => "atrial fibrillation",
            Disease::Pneumonia => "pneumonia",
            Disease::DiabetesMellitus => "diabetes mellitus",
            Disease::Sepsis => "sepsis",
        }
    }

    /// Parses a canonical name (case-insensitive, surrounding blanks ignored).
    pub fn from_name(name: &str) -> Option<Disease> {
        let n = name.trim();
        Disease::ALL.into_iter().find(|d| d.name().eq_ignore_ascii_case(n))
    }

    /// The disease an ICD code assigns, if any (ICD-10 prefixes I25, N17, I10, I48, J12-J18,
    /// E10/E11, A40/A41; ICD-9 414, 584, 401, 42731, 480-486, 250, 038/99591). Dots are ignored.
    pub fn from_icd(code: &str, version: u8) -> Option<Disease> {
        let c: String = code.chars().filter(|c| *c != '.').collect::<String>().to_ascii_uppercase();
        let has = |prefixes: &[&str]| prefixes.iter().any(|p| c.starts_with(p));
        if version == 10 {
            if has(&["I25"]) {
                Some(Disease::CoronaryArteryDisease)
            } else if has(&["N17"]) {
                Some(Disease::AcuteRenalFailure)
            } else if has(&["I10"]) {
                Some(Disease::Hypertension)
            } else if has(&["I48"]) {
                Some(Disease::AtrialFibrillation)
            } else if has(&["J12", "J13", "J14", "J15", "J16", "J17", "J18"]) {
                Some(Disease::Pneumonia)
            } else if has(&["E10", "E11"]) {
                Some(Disease::DiabetesMellitus)
            } else if has(&["A40", "A41"]) {
                Some(Disease::Sepsis)
            } else {
                None
            }
        } else if version == 9 {
            if has(&["414"]) {
                Some(Disease::CoronaryArteryDisease)
            } else if has(&["584"]) {
                Some(Disease::AcuteRenalFailure)
            } else if has(&["401"]) {
                Some(Disease::Hypertension)
            } else if has(&["42731"]) {
                Some(Disease::AtrialFibrillation)
            } else if has(&["480", "481", "482", "483", "484", "485", "486"]) {
                Some(Disease::Pneumonia)
            } else if has(&["250"]) {
                Some(Disease::DiabetesMellitus)
            } else if has(&["038", "99591"]) {
                Some(Disease::Sepsis)
            } else {
                None
            }
        } else {
            None
        }
    }
}

impl fmt::Display for Disease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a list of canonical names; the error names the first unknown one.
pub fn parse_diseases(names: &[String]) -> Result<Vec<Disease>, String> {
    let mut out = Vec::new();
    for n in names {
        let d = Disease::from_name(n)
            .ok_or_else(|| format!("unknown disease {n:?}; known: {}", Disease::ALL.map(Disease::name).join(", ")))?;
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enum and the one disease list (the run config's default, which medtvt-eval's
    /// vocabulary imports) name the same seven diseases in the same order.
    #[test]
    fn the_seven_are_the_one_disease_list() {
        let names: Vec<&str> = Disease::ALL.iter().map(|d| d.name()).collect();
        assert_eq!(names, medtvt_config::DEFAULT_DISEASES);
    }

    #[test]
    fn icd_prefixes_map_to_diseases() {
        assert_eq!(Disease::from_icd("I2510", 10), Some(Disease::CoronaryArteryDisease));
        assert_eq!(Disease::from_icd("J18.9", 10), Some(Disease::Pneumonia));
        assert_eq!(Disease::from_icd("J11", 10), None);
        assert_eq!(Disease::from_icd("A419", 10), Some(Disease::Sepsis));
        assert_eq!(Disease::from_icd("E119", 10), Some(Disease::DiabetesMellitus));
        assert_eq!(Disease::from_icd("42731", 9), Some(Disease::AtrialFibrillation));
        assert_eq!(Disease::from_icd("4280", 9), None);
        assert_eq!(Disease::from_icd("I10", 9), None);
    }

    #[test]
    fn names_parse_and_unknown_is_named() {
        assert_eq!(
            parse_diseases(&["Sepsis".into(), " pneumonia".into()]),
            Ok(vec![Disease::Pneumonia, Disease::Sepsis])
        );
        assert!(parse_diseases(&["gout".into()]).unwrap_err().contains("\"gout\""));
    }
}
