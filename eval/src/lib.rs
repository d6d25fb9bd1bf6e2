//! Scoring answers: parsing `<think>…</think><answer>…</answer>` completions, the rewards GRPO
//! optimises (Jaccard over disease sets, format), and the evaluation metrics reported per disease
//! and overall. Pure functions over strings and label sets; no tensors.
