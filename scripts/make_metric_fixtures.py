#!/usr/bin/env python3
"""Writes eval/tests/fixtures/metrics.json: reference values for medtvt-eval's metrics and rewards.

The values come from the packages our metrics promise to agree with:
  - multilabel P/R/F1 (per label, macro, micro), sample-wise Jaccard and subset accuracy from
    scikit-learn with zero_division=0;
  - corpus BLEU-4 from nltk.translate.bleu_score.corpus_bleu (default weights, no smoothing) over
    lowercased whitespace tokens, one reference per hypothesis;
  - ROUGE-L F-measure from rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False),
    averaged over samples;
  - the reference reward semantics (exact-string mode): first <answer>(.*?)</answer> with DOTALL,
    split on ';', strip, drop empties, set Jaccard (0 on an empty union or a missing tag), and
    re.fullmatch of the format pattern on the completion with leading whitespace stripped
    (`lstrip`, as the reference does).

Deterministic (fixed seed). Run from the repository root:
    .venv/bin/python scripts/make_metric_fixtures.py
"""

import json
import random
import re
import warnings
from pathlib import Path

import numpy as np
from nltk.translate.bleu_score import corpus_bleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, jaccard_score, precision_recall_fscore_support

OUT = Path(__file__).resolve().parent.parent / "eval" / "tests" / "fixtures" / "metrics.json"
SEED = 20261125


def indicator(sets, n_labels):
    matrix = np.zeros((len(sets), n_labels), dtype=int)
    for row, labels in enumerate(sets):
        for label in labels:
            matrix[row, label] = 1
    return matrix


def multilabel_case(name, n_labels, pairs):
    y_pred = indicator([p for p, _ in pairs], n_labels)
    y_true = indicator([t for _, t in pairs], n_labels)
    labels = list(range(n_labels))
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    averages = {}
    for average in ("macro", "micro"):
        ap, ar, af, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average=average, zero_division=0
        )
        averages[average] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    return {
        "name": name,
        "n_labels": n_labels,
        "pairs": [{"predicted": sorted(p_), "truth": sorted(t_)} for p_, t_ in pairs],
        "per_label": [
            {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i in labels
        ],
        "macro": averages["macro"],
        "micro": averages["micro"],
        "sample_jaccard": float(
            jaccard_score(y_true, y_pred, labels=labels, average="samples", zero_division=0)
        ),
        "subset_accuracy": float(accuracy_score(y_true, y_pred)),
    }


def random_set(rng, n_labels, max_size):
    return set(rng.sample(range(n_labels), rng.randint(0, max_size)))


def noisy_copy(rng, truth, n_labels):
    predicted = set(truth)
    for label in range(n_labels):
        if rng.random() < 0.15:
            predicted ^= {label}
    return predicted


def multilabel_cases(rng):
    cases = []
    for index in range(6):
        n_labels = rng.choice([7, 7, 5, 12])
        pairs = []
        for _ in range(rng.randint(1, 40)):
            truth = random_set(rng, n_labels, 4)
            pairs.append((noisy_copy(rng, truth, n_labels), truth))
        cases.append(multilabel_case(f"random_{index}", n_labels, pairs))
    truths = [random_set(rng, 7, 3) | {0} for _ in range(12)]
    cases.append(multilabel_case("all_predictions_empty", 7, [(set(), t) for t in truths]))
    cases.append(multilabel_case("all_correct", 7, [(set(t), t) for t in truths]))
    no_support = [(noisy_copy(rng, t - {6}, 7) | {6}, t - {6}) for t in truths]
    cases.append(multilabel_case("label_6_predicted_without_support", 7, no_support))
    unused = [(t - {5}, t - {5}) for t in truths]
    cases.append(multilabel_case("label_5_never_seen", 7, unused))
    cases.append(multilabel_case("both_empty", 7, [(set(), set()), (set(), set()), ({1}, {1})]))
    return cases


WORDS = (
    "the ecg shows sinus rhythm with normal axis and no acute st changes qt interval is "
    "prolonged atrial fibrillation left ventricular hypertrophy chest x-ray bilateral "
    "opacities consistent with pneumonia creatinine elevated at 2.4 mg/dl reference 0.5-1.2 "
    "Glucose HIGH lactate normal; potassium, sodium."
).split()


def random_sentence(rng, length):
    return " ".join(rng.choice(WORDS) for _ in range(length))


def perturb(rng, words):
    out = []
    for word in words:
        roll = rng.random()
        if roll < 0.1:
            continue
        if roll < 0.2:
            out.append(rng.choice(WORDS))
        elif roll < 0.25:
            out.append(word.upper())
        else:
            out.append(word)
    if rng.random() < 0.3:
        out.extend(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    return out


def text_case(name, pairs):
    hyps = [h.lower().split() for h, _ in pairs]
    refs = [[r.lower().split()] for _, r in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bleu = float(corpus_bleu(refs, hyps))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in pairs]
    return {
        "name": name,
        "pairs": [{"hypothesis": h, "reference": r} for h, r in pairs],
        "bleu4": bleu,
        "rouge_l_f": float(np.mean(rouge)) if rouge else 0.0,
        "rouge_l_f_per_sample": [float(x) for x in rouge],
    }


def text_cases(rng):
    cases = []
    for index in range(5):
        pairs = []
        for _ in range(rng.randint(1, 12)):
            reference = random_sentence(rng, rng.randint(3, 30))
            hypothesis = " ".join(perturb(rng, reference.split()))
            pairs.append((hypothesis, reference))
        cases.append(text_case(f"random_{index}", pairs))
    cases.append(text_case("identical", [("Sinus rhythm, normal axis.", "sinus rhythm, normal axis.")]))
    cases.append(text_case("short_hypotheses", [("sinus", "sinus rhythm today"), ("qt", "qt")]))
    cases.append(text_case("no_four_gram_overlap", [("a b c d e", "a b c x d e"), ("f g", "f g h")]))
    cases.append(text_case("no_overlap", [("alpha beta", "gamma delta")]))
    cases.append(text_case("empty_hypothesis", [("", "the ecg is normal"), ("  ", "x")]))
    cases.append(text_case("punctuation_only_tokens", [("-- ; !", "st-elevation in v1-v3 ."), ("ok .", "ok .")]))
    cases.append(text_case("longer_than_reference", [("the the the the cat sat on the mat", "the cat sat on the mat")]))
    return cases


ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def reference_answer_set(text):
    found = ANSWER_RE.search(text)
    if found is None:
        return None
    return {item.strip() for item in found.group(1).split(";") if item.strip()}


def reference_jaccard(completion, reference):
    predicted, truth = reference_answer_set(completion), reference_answer_set(reference)
    if predicted is None or truth is None:
        return 0.0
    union = predicted | truth
    return len(predicted & truth) / len(union) if union else 0.0


def reference_format(completion):
    return 1.0 if FORMAT_RE.fullmatch(completion.lstrip()) else 0.0


FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", " ", "\n", ";", "; ", "  ", "\t",
    "pneumonia", "sepsis", "Sepsis", "hypertension", "atrial fibrillation", "none", "AKI",
    "reasoning", "x", "<", ">", "/", "answer", "é", "∩",
]


def random_completion(rng):
    if rng.random() < 0.5:
        diseases = "; ".join(rng.sample(FRAGMENTS[10:17], rng.randint(0, 3)))
        pad = rng.choice(["", " ", "\n", " \n "])
        tail = rng.choice(["", "", " trailing", "\n", "</answer>"])
        return f"{pad}<think>{random_sentence(rng, 3)}</think>{rng.choice(['', ' ', chr(10)])}<answer>{diseases}</answer>{tail}{pad}"
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 14)))


def reward_cases(rng):
    cases = []
    for _ in range(150):
        completion = random_completion(rng)
        reference = random_completion(rng) if rng.random() < 0.3 else (
            "<think>r</think><answer> " + "; ".join(rng.sample(FRAGMENTS[10:17], rng.randint(0, 3))) + " </answer>"
        )
        cases.append({
            "completion": completion,
            "reference": reference,
            "jaccard": reference_jaccard(completion, reference),
            "format": reference_format(completion),
        })
    return cases


def main():
    rng = random.Random(SEED)
    fixture = {
        "generator": "scripts/make_metric_fixtures.py",
        "multilabel": multilabel_cases(rng),
        "text": text_cases(rng),
        "exact_mode_rewards": reward_cases(rng),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
