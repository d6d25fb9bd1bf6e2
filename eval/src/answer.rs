//! Reading a completion: the first `<answer>…</answer>` span, its `;`-separated items resolved
//! against the disease vocabulary, and whether the completion has the required
//! `<think>…</think><answer>…</answer>` shape.
//!
//! Format rule, the reference's `re.fullmatch(pattern, completion.lstrip(), re.DOTALL)`: the
//! completion with its *leading* whitespace stripped must match
//! `<think>.*?</think>\s*<answer>.*?</answer>` as a whole. Text before `<think>` or after the
//! final `</answer>` fails the format, trailing whitespace included; further tags inside the
//! spans are allowed (the lazy `.*?` can still stretch to a later `</answer>` in a full match,
//! as in Python).

use crate::vocabulary::{AnswerItem, DiseaseId, DiseaseSet, DiseaseVocabulary};
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::LazyLock;

static ANSWER_SPAN: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(r"(?s)<answer>(.*?)</answer>").expect("constant regex"));

static WELL_FORMATTED: LazyLock<regex::Regex> =
    LazyLock::new(|| regex::Regex::new(r"(?s)\A<think>.*?</think>\s*<answer>.*?</answer>\z").expect("constant regex"));

/// One answer: the items as written and what they mean.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ParsedAnswer {
    /// The `;`-separated items, trimmed, empties dropped, in order, as written.
    pub raw_items: Vec<String>,
    /// The distinct items after resolving names ("none" dropped in synonym mode).
    pub items: BTreeSet<AnswerItem>,
}

impl ParsedAnswer {
    /// Parse the first answer span of `completion`; `None` when it has no `<answer>…</answer>`.
    pub fn from_completion(completion: &str, vocabulary: &DiseaseVocabulary) -> Option<Self> {
        answer_text(completion).map(|text| Self::from_answer_text(text, vocabulary))
    }

    /// Parse the text inside the answer tags.
    pub fn from_answer_text(text: &str, vocabulary: &DiseaseVocabulary) -> Self {
        let raw_items = split_answer_items(text);
        let items = raw_items.iter().filter_map(|item| vocabulary.resolve(item)).collect();
        ParsedAnswer { raw_items, items }
    }

    /// An answer that names exactly these diseases (e.g. a ground-truth label set).
    pub fn from_diseases(diseases: &DiseaseSet) -> Self {
        ParsedAnswer { raw_items: Vec::new(), items: diseases.iter().map(|&id| AnswerItem::Disease(id)).collect() }
    }

    /// The known diseases of the answer.
    pub fn diseases(&self) -> DiseaseSet {
        self.items
            .iter()
            .filter_map(|item| match item {
                AnswerItem::Disease(id) => Some(*id),
                AnswerItem::Unknown(_) => None,
            })
            .collect()
    }

    /// Distinct items the vocabulary does not know.
    pub fn unknown_count(&self) -> usize {
        self.items.iter().filter(|item| matches!(item, AnswerItem::Unknown(_))).count()
    }

    pub fn contains(&self, id: DiseaseId) -> bool {
        self.items.contains(&AnswerItem::Disease(id))
    }
}

/// The text between the first `<answer>` and the next `</answer>` (across newlines).
pub fn answer_text(completion: &str) -> Option<&str> {
    ANSWER_SPAN.captures(completion).and_then(|c| c.get(1)).map(|m| m.as_str())
}

/// Split on ';', trim each item, drop the empty ones.
pub fn split_answer_items(text: &str) -> Vec<String> {
    text.split(';').map(str::trim).filter(|item| !item.is_empty()).map(str::to_string).collect()
}

/// Whether the completion, leading whitespace stripped, is exactly `<think>…</think>` then
/// `<answer>…</answer>`.
pub fn is_well_formatted(completion: &str) -> bool {
    WELL_FORMATTED.is_match(completion.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocabulary::NameMatching;

    fn vocab() -> DiseaseVocabulary {
        DiseaseVocabulary::paper_default(NameMatching::Synonyms)
    }

    #[test]
    fn first_answer_span_is_taken_across_newlines() {
        let text = "<think>x</think><answer>\npneumonia;\nsepsis\n</answer> <answer>hypertension</answer>";
        assert_eq!(answer_text(text), Some("\npneumonia;\nsepsis\n"));
        assert_eq!(answer_text("<answer>unclosed"), None);
        assert_eq!(answer_text("no tags at all"), None);
    }

    #[test]
    fn items_are_split_trimmed_and_empties_dropped() {
        assert_eq!(split_answer_items(" a ;; b;\n ; c "), vec!["a", "b", "c"]);
        assert!(split_answer_items(" ; ").is_empty());
    }

    #[test]
    fn parsed_answer_resolves_synonyms_and_keeps_unknowns() {
        let answer =
            ParsedAnswer::from_completion("<answer> AFib; Pneumonia; gout; atrial fibrillation </answer>", &vocab())
                .unwrap();
        assert_eq!(answer.raw_items, vec!["AFib", "Pneumonia", "gout", "atrial fibrillation"]);
        assert_eq!(answer.diseases(), DiseaseSet::from([DiseaseId(3), DiseaseId(4)]));
        // AFib and atrial fibrillation are one disease: three distinct items.
        assert_eq!(answer.items.len(), 3);
        assert_eq!(answer.unknown_count(), 1);
        assert!(answer.contains(DiseaseId(4)));
    }

    #[test]
    fn none_and_empty_answers_are_the_empty_set() {
        for text in ["<answer> none </answer>", "<answer></answer>", "<answer> ; </answer>", "<answer>None.</answer>"] {
            let answer = ParsedAnswer::from_completion(text, &vocab()).unwrap();
            assert!(answer.items.is_empty(), "{text}");
        }
    }

    #[test]
    fn format_requires_think_then_answer_and_nothing_around() {
        assert!(is_well_formatted("<think>a\nb</think><answer>x</answer>"));
        assert!(is_well_formatted("  \n<think></think> \n <answer></answer>"));
        // The reference strips leading whitespace only (`lstrip`): trailing whitespace fails.
        assert!(!is_well_formatted("<think>a</think><answer>x</answer>\n"));
        assert!(!is_well_formatted("<think>a</think><answer>x</answer> "));
        assert!(is_well_formatted("<think>a</think><answer>x</answer> y </answer>"));
        assert!(!is_well_formatted("<think>a</think><answer>x</answer> trailing"));
        assert!(!is_well_formatted("lead <think>a</think><answer>x</answer>"));
        assert!(!is_well_formatted("<think>a</think> text <answer>x</answer>"));
        assert!(!is_well_formatted("<answer>x</answer><think>a</think>"));
        assert!(!is_well_formatted("<think>a</think>"));
        assert!(!is_well_formatted(""));
    }
}
