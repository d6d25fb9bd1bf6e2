//! The disease vocabulary: canonical disease names, their synonyms, and how a free-text answer
//! item is resolved to a disease.
//!
//! Two matching modes:
//! - [`NameMatching::Synonyms`] (default, our improvement): an item is normalised (lowercased,
//!   runs of whitespace collapsed to one space, trimmed, trailing full stops dropped) and looked up
//!   among the normalised canonical names and synonyms. The item "none" means "no disease".
//! - [`NameMatching::Exact`] (parity with the reference code): an item (already trimmed) matches a
//!   disease only when it equals the canonical name byte for byte; there are no synonyms, and
//!   "none" is an ordinary (unknown) item, as in the reference's string comparison.
//!
//! Items that match no disease are kept as [`AnswerItem::Unknown`]: the reward's Jaccard counts
//! them (they lower precision, as the reference's string sets do); the per-disease metrics ignore
//! them.

use crate::error::EvalError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// Index of a disease in its [`DiseaseVocabulary`] (the column in the multilabel metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DiseaseId(pub usize);

/// A set of diseases (one sample's prediction or truth).
pub type DiseaseSet = BTreeSet<DiseaseId>;

/// How answer items are matched to disease names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameMatching {
    /// Case-insensitive, whitespace-normalised, with synonyms; "none" is the empty answer.
    #[default]
    Synonyms,
    /// Case-sensitive equality with the canonical names only (the reference's behaviour).
    Exact,
}

/// One disease: its canonical name and the other names that mean it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiseaseEntry {
    pub name: String,
    #[serde(default)]
    pub synonyms: Vec<String>,
}

/// One item of a parsed answer: a known disease or a name the vocabulary does not know.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum AnswerItem {
    Disease(DiseaseId),
    /// The unmatched name: normalised in synonym mode, as written (trimmed) in exact mode.
    Unknown(String),
}

/// The paper's seven diseases, canonical spelling, in the paper's order: the one list, owned by
/// the run config (`medtvt_config::DEFAULT_DISEASES`) and imported here.
pub use medtvt_config::DEFAULT_DISEASES as PAPER_DISEASES;

/// Built-in synonyms, keyed by canonical name: the paper's seven, then the reference label map's
/// wider ICD-10 list. Kept free of cross-entry clashes (a unit test checks this).
const BUILTIN_SYNONYMS: &[(&str, &[&str])] = &[
    (
        "coronary artery disease",
        &[
            "CAD",
            "coronary heart disease",
            "ischemic heart disease",
            "ischaemic heart disease",
            "IHD",
            "coronary atherosclerosis",
            "atherosclerotic heart disease",
        ],
    ),
    (
        "acute renal failure",
        &[
            "ARF",
            "acute kidney injury",
            "AKI",
            "acute kidney failure",
            "acute renal injury",
            "acute kidney failure, unspecified",
        ],
    ),
    (
        "hypertension",
        &[
            "HTN",
            "high blood pressure",
            "essential hypertension",
            "essential (primary) hypertension",
            "arterial hypertension",
            "hypertensive disease",
        ],
    ),
    (
        "atrial fibrillation",
        &["AF", "AFib", "A-fib", "A fib", "unspecified atrial fibrillation", "auricular fibrillation"],
    ),
    ("pneumonia", &["pneumonia, unspecified organism", "PNA", "lung infection"]),
    (
        "diabetes mellitus",
        &[
            "diabetes",
            "DM",
            "type 2 diabetes",
            "type 2 diabetes mellitus",
            "type II diabetes",
            "T2DM",
            "T2D",
            "diabetes mellitus type 2",
            "type 1 diabetes",
            "type 1 diabetes mellitus",
            "T1DM",
            "type 2 diabetes mellitus without complications",
        ],
    ),
    ("sepsis", &["septicemia", "septicaemia", "sepsis, unspecified organism", "severe sepsis", "septic shock"]),
    (
        "hyperlipidemia",
        &["hyperlipidaemia", "hyperlipidemia, unspecified", "dyslipidemia", "dyslipidaemia", "high cholesterol"],
    ),
    ("hypothyroidism", &["hypothyroidism, unspecified", "underactive thyroid"]),
    (
        "chronic systolic heart failure",
        &[
            "chronic systolic (congestive) heart failure",
            "HFrEF",
            "heart failure with reduced ejection fraction",
            "systolic heart failure",
        ],
    ),
    ("chronic obstructive pulmonary disease", &["COPD", "chronic obstructive pulmonary disease, unspecified"]),
    (
        "non-ST elevation myocardial infarction",
        &["NSTEMI", "non-ST-elevation myocardial infarction", "non-ST elevation (NSTEMI) myocardial infarction"],
    ),
];

/// The configured diseases and the lookup from names to [`DiseaseId`].
#[derive(Debug, Clone)]
pub struct DiseaseVocabulary {
    entries: Vec<DiseaseEntry>,
    matching: NameMatching,
    lookup: HashMap<String, DiseaseId>,
}

/// Lowercase, collapse whitespace runs to one space, trim, and drop trailing full stops.
pub fn normalise_name(name: &str) -> String {
    let collapsed = name.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    collapsed.trim_end_matches('.').trim_end().to_string()
}

impl DiseaseVocabulary {
    /// The paper's seven diseases with the built-in synonyms.
    pub fn paper_default(matching: NameMatching) -> Self {
        // The built-in table is a constant the unit tests check, so this cannot fail.
        Self::from_names(&PAPER_DISEASES, matching).expect("built-in disease vocabulary is valid")
    }

    /// Diseases given by name (e.g. the run config's `data.diseases`), each with the synonyms of
    /// the built-in entry it names. A name that is only a built-in synonym (an ICD-10 spelling such
    /// as "acute kidney failure") takes over that entry's names, unless another configured disease
    /// is that entry's canonical name. A built-in synonym that is another configured disease's
    /// name, or that two configured diseases would share, is left out rather than guessed.
    pub fn from_names<S: AsRef<str>>(names: &[S], matching: NameMatching) -> Result<Self, EvalError> {
        let canonical: Vec<String> = names.iter().map(|n| n.as_ref().to_string()).collect();
        let mut synonyms = builtin_synonyms_for(&canonical);
        drop_contested_synonyms(&canonical, &mut synonyms);
        let entries =
            canonical.into_iter().zip(synonyms).map(|(name, synonyms)| DiseaseEntry { name, synonyms }).collect();
        Self::new(entries, matching)
    }

    /// Diseases with explicit synonym lists. Fails on empty or duplicate names and on a name
    /// that would resolve to two diseases.
    pub fn new(entries: Vec<DiseaseEntry>, matching: NameMatching) -> Result<Self, EvalError> {
        if entries.is_empty() {
            return Err(EvalError::EmptyVocabulary);
        }
        let mut lookup: HashMap<String, DiseaseId> = HashMap::new();
        for (index, entry) in entries.iter().enumerate() {
            if entry.name.trim().is_empty() {
                return Err(EvalError::EmptyDiseaseName { index });
            }
            let key = lookup_key(&entry.name, matching);
            if let Some(&DiseaseId(first)) = lookup.get(&key) {
                return Err(EvalError::DuplicateDisease { name: entry.name.clone(), first, second: index });
            }
            lookup.insert(key, DiseaseId(index));
        }
        if matching == NameMatching::Synonyms {
            insert_synonyms(&entries, &mut lookup)?;
        }
        Ok(DiseaseVocabulary { entries, matching, lookup })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn matching(&self) -> NameMatching {
        self.matching
    }

    pub fn entries(&self) -> &[DiseaseEntry] {
        &self.entries
    }

    /// The canonical name of a disease; `None` for an id from another vocabulary.
    pub fn name(&self, id: DiseaseId) -> Option<&str> {
        self.entries.get(id.0).map(|e| e.name.as_str())
    }

    /// The disease a name means, if any.
    pub fn lookup(&self, name: &str) -> Option<DiseaseId> {
        self.lookup.get(&lookup_key(name, self.matching)).copied()
    }

    /// Resolve one answer item; `None` when the item means "no disease" (synonym mode's "none").
    pub fn resolve(&self, item: &str) -> Option<AnswerItem> {
        let key = lookup_key(item, self.matching);
        if self.matching == NameMatching::Synonyms && key == "none" {
            return None;
        }
        Some(match self.lookup.get(&key) {
            Some(&id) => AnswerItem::Disease(id),
            None => AnswerItem::Unknown(key),
        })
    }
}

fn lookup_key(name: &str, matching: NameMatching) -> String {
    match matching {
        NameMatching::Synonyms => normalise_name(name),
        NameMatching::Exact => name.trim().to_string(),
    }
}

fn insert_synonyms(entries: &[DiseaseEntry], lookup: &mut HashMap<String, DiseaseId>) -> Result<(), EvalError> {
    for (index, entry) in entries.iter().enumerate() {
        for synonym in &entry.synonyms {
            let key = normalise_name(synonym);
            if key.is_empty() {
                continue;
            }
            match lookup.get(&key) {
                Some(&DiseaseId(other)) if other != index => {
                    return Err(EvalError::AmbiguousName {
                        name: synonym.clone(),
                        first: entries[other].name.clone(),
                        second: entry.name.clone(),
                    });
                }
                _ => {
                    lookup.insert(key, DiseaseId(index));
                }
            }
        }
    }
    Ok(())
}

/// Which built-in entry a configured name names, and whether by its canonical name.
fn builtin_entry(name: &str) -> Option<(usize, bool)> {
    let key = normalise_name(name);
    BUILTIN_SYNONYMS.iter().enumerate().find_map(|(index, (canonical, synonyms))| {
        if normalise_name(canonical) == key {
            Some((index, true))
        } else if synonyms.iter().any(|s| normalise_name(s) == key) {
            Some((index, false))
        } else {
            None
        }
    })
}

/// For each configured name, the built-in names that mean the same disease (itself excluded).
fn builtin_synonyms_for(names: &[String]) -> Vec<Vec<String>> {
    let matches: Vec<Option<(usize, bool)>> = names.iter().map(|n| builtin_entry(n)).collect();
    let named_canonically = |entry: usize| matches.contains(&Some((entry, true)));
    names
        .iter()
        .zip(&matches)
        .map(|(name, found)| match *found {
            Some((entry, by_canonical)) if by_canonical || !named_canonically(entry) => {
                let (canonical, synonyms) = BUILTIN_SYNONYMS[entry];
                let own = normalise_name(name);
                std::iter::once(canonical)
                    .chain(synonyms.iter().copied())
                    .filter(|s| normalise_name(s) != own)
                    .map(str::to_string)
                    .collect()
            }
            _ => Vec::new(),
        })
        .collect()
}

/// Remove each synonym that is some configured disease's own name or that two diseases share.
fn drop_contested_synonyms(canonical: &[String], synonyms: &mut [Vec<String>]) {
    let mut claims: HashMap<String, usize> = HashMap::new();
    for name in canonical {
        *claims.entry(normalise_name(name)).or_default() += 2;
    }
    for list in synonyms.iter() {
        let distinct: BTreeSet<String> = list.iter().map(|s| normalise_name(s)).collect();
        for key in distinct {
            *claims.entry(key).or_default() += 1;
        }
    }
    for list in synonyms.iter_mut() {
        list.retain(|s| claims.get(&normalise_name(s)) == Some(&1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_default_has_the_seven_canonical_names_in_order() {
        let vocab = DiseaseVocabulary::paper_default(NameMatching::Synonyms);
        let names: Vec<&str> = vocab.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, PAPER_DISEASES);
    }

    #[test]
    fn builtin_table_has_no_name_meaning_two_diseases() {
        let all: Vec<&str> = BUILTIN_SYNONYMS.iter().map(|(c, _)| *c).collect();
        let vocab = DiseaseVocabulary::from_names(&all, NameMatching::Synonyms).unwrap();
        for (index, (canonical, synonyms)) in BUILTIN_SYNONYMS.iter().enumerate() {
            assert_eq!(vocab.lookup(canonical), Some(DiseaseId(index)), "{canonical}");
            for synonym in *synonyms {
                // Every built-in synonym survives when the whole table is configured.
                assert_eq!(vocab.lookup(synonym), Some(DiseaseId(index)), "{synonym}");
            }
        }
    }

    #[test]
    fn synonyms_match_case_and_whitespace_insensitively() {
        let vocab = DiseaseVocabulary::paper_default(NameMatching::Synonyms);
        let cad = Some(DiseaseId(0));
        assert_eq!(vocab.lookup("CAD"), cad);
        assert_eq!(vocab.lookup("  Coronary   HEART\tdisease. "), cad);
        assert_eq!(vocab.lookup("aki"), Some(DiseaseId(1)));
        assert_eq!(vocab.lookup("High Blood Pressure"), Some(DiseaseId(2)));
        assert_eq!(vocab.lookup("afib"), Some(DiseaseId(3)));
        assert_eq!(vocab.lookup("T2DM"), Some(DiseaseId(5)));
        assert_eq!(vocab.lookup("Septic shock"), Some(DiseaseId(6)));
        assert_eq!(vocab.lookup("gout"), None);
    }

    #[test]
    fn exact_mode_matches_canonical_names_byte_for_byte_only() {
        let vocab = DiseaseVocabulary::paper_default(NameMatching::Exact);
        assert_eq!(vocab.lookup("pneumonia"), Some(DiseaseId(4)));
        assert_eq!(vocab.lookup(" pneumonia "), Some(DiseaseId(4)));
        assert_eq!(vocab.lookup("Pneumonia"), None);
        assert_eq!(vocab.lookup("CAD"), None);
        assert_eq!(vocab.resolve("none"), Some(AnswerItem::Unknown("none".into())));
    }

    #[test]
    fn none_means_no_disease_in_synonym_mode() {
        let vocab = DiseaseVocabulary::paper_default(NameMatching::Synonyms);
        assert_eq!(vocab.resolve(" NONE "), None);
        assert_eq!(vocab.resolve("Gout"), Some(AnswerItem::Unknown("gout".into())));
    }

    #[test]
    fn configured_icd_name_inherits_builtin_synonyms_without_clashing() {
        // "acute kidney failure" is a built-in synonym of acute renal failure; configured alone it
        // takes over that entry's names.
        let vocab = DiseaseVocabulary::from_names(&["acute kidney failure", "sepsis"], NameMatching::Synonyms).unwrap();
        assert_eq!(vocab.lookup("acute renal failure"), Some(DiseaseId(0)));
        assert_eq!(vocab.lookup("AKI"), Some(DiseaseId(0)));
        // Configured next to acute renal failure, the canonical entry keeps the synonyms.
        let both =
            DiseaseVocabulary::from_names(&["acute renal failure", "acute kidney failure"], NameMatching::Synonyms)
                .unwrap();
        assert_eq!(both.lookup("acute renal failure"), Some(DiseaseId(0)));
        assert_eq!(both.lookup("acute kidney failure"), Some(DiseaseId(1)));
        assert_eq!(both.lookup("AKI"), Some(DiseaseId(0)));
        assert!(both.entries()[1].synonyms.is_empty());
        // A canonical name listed by a wider config wins over another entry's synonym.
        let wide = DiseaseVocabulary::from_names(
            &["coronary artery disease", "atherosclerotic heart disease"],
            NameMatching::Synonyms,
        )
        .unwrap();
        assert_eq!(wide.lookup("atherosclerotic heart disease"), Some(DiseaseId(1)));
        assert_eq!(wide.lookup("CAD"), Some(DiseaseId(0)));
    }

    #[test]
    fn unknown_configured_name_has_no_synonyms_but_matches_itself() {
        let vocab = DiseaseVocabulary::from_names(&["Gout"], NameMatching::Synonyms).unwrap();
        assert_eq!(vocab.entries()[0].synonyms, Vec::<String>::new());
        assert_eq!(vocab.lookup("gout"), Some(DiseaseId(0)));
    }

    #[test]
    fn invalid_vocabularies_are_rejected_with_the_offending_name() {
        let err = DiseaseVocabulary::from_names(&["sepsis", "Sepsis"], NameMatching::Synonyms).unwrap_err();
        assert!(matches!(err, EvalError::DuplicateDisease { first: 0, second: 1, .. }), "{err}");
        let err = DiseaseVocabulary::from_names(&["sepsis", " "], NameMatching::Synonyms).unwrap_err();
        assert!(matches!(err, EvalError::EmptyDiseaseName { index: 1 }), "{err}");
        let entries = vec![
            DiseaseEntry { name: "a".into(), synonyms: vec!["x".into()] },
            DiseaseEntry { name: "b".into(), synonyms: vec!["X".into()] },
        ];
        let err = DiseaseVocabulary::new(entries, NameMatching::Synonyms).unwrap_err();
        assert!(err.to_string().contains("\"X\" would mean both \"a\" and \"b\""), "{err}");
        let none: [&str; 0] = [];
        assert!(matches!(DiseaseVocabulary::from_names(&none, NameMatching::Exact), Err(EvalError::EmptyVocabulary)));
    }

    #[test]
    fn matching_mode_deserialises_from_snake_case() {
        let mode: NameMatching = serde_json::from_str("\"exact\"").unwrap();
        assert_eq!(mode, NameMatching::Exact);
        let entry: DiseaseEntry = serde_json::from_str(r#"{"name": "gout"}"#).unwrap();
        assert!(entry.synonyms.is_empty());
    }
}
