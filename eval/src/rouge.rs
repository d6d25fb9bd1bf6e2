//! ROUGE-L F-measure, computed exactly as the `rouge-score` package's
//! `RougeScorer(["rougeL"], use_stemmer=False).score(reference, hypothesis).fmeasure`.
//!
//! Tokens: the text lowercased, then every maximal run of ASCII `[a-z0-9]` is a token (all other
//! characters separate tokens). With l = the longest common subsequence of the two token lists,
//! P = l / |hypothesis|, R = l / |reference|, F = 2PR / (P + R), and F = 0 when either list is
//! empty or P + R = 0.

/// rouge-score's default tokeniser without stemming.
pub fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|token| !token.is_empty())
        .map(str::to_string)
        .collect()
}

/// Length of the longest common subsequence (two-row dynamic programme, O(|a| |b|) time).
pub fn lcs_length<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut previous = vec![0usize; b.len() + 1];
    let mut current = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            current[j + 1] = if x == y { previous[j] + 1 } else { previous[j + 1].max(current[j]) };
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// ROUGE-L F-measure of one hypothesis against its reference.
pub fn rouge_l_f(hypothesis: &str, reference: &str) -> f64 {
    let (hyp, reference) = (rouge_tokens(hypothesis), rouge_tokens(reference));
    if hyp.is_empty() || reference.is_empty() {
        return 0.0;
    }
    let lcs = lcs_length(&reference, &hyp) as f64;
    let precision = lcs / hyp.len() as f64;
    let recall = lcs / reference.len() as f64;
    if precision + recall > 0.0 {
        2.0 * precision * recall / (precision + recall)
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_lowercase_alphanumeric_runs() {
        assert_eq!(
            rouge_tokens("ST-elevation in V1-V3, 2.4 mg/dL é!"),
            vec!["st", "elevation", "in", "v1", "v3", "2", "4", "mg", "dl"]
        );
        assert!(rouge_tokens(" -- ; ").is_empty());
    }

    #[test]
    fn lcs_of_known_sequences() {
        assert_eq!(lcs_length(&['a', 'b', 'c', 'b', 'd', 'a', 'b'], &['b', 'd', 'c', 'a', 'b', 'a']), 4);
        assert_eq!(lcs_length::<char>(&[], &['a']), 0);
    }

    #[test]
    fn f_measure_hand_computed() {
        // ref "the cat sat on the mat" (6), hyp "the cat on mat" (4): LCS 4 -> P 1, R 2/3, F 0.8.
        assert!((rouge_l_f("The cat on mat.", "the cat sat on the mat") - 0.8).abs() < 1e-15);
        assert_eq!(rouge_l_f("", "the cat"), 0.0);
        assert_eq!(rouge_l_f("dog", "the cat"), 0.0);
    }
}
