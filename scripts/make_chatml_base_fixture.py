#!/usr/bin/env python3
"""Builds model/tests/fixtures/chatml_base/: a small "real HF base" for bring-your-own-base tests.

What a pretrained Llama-family instruct checkpoint looks like, in miniature, made with HF
transformers and tokenizers:

  config.json, model.safetensors, generation_config.json
      a random-weight LlamaForCausalLM (GQA, untied lm_head) whose vocab_size equals the
      tokenizer's size exactly, so adding <ecg>, <cxr>, <lab> forces an embedding resize;
      config.json's eos_token_id is <|endoftext|>, generation_config.json's is
      [<|im_end|>, <|endoftext|>] (two EOS ids), no pad token anywhere but the tokenizer's.
  tokenizer.json, tokenizer_config.json
      a byte-level BPE with the ChatML control tokens; tokenizer_config.json carries the ChatML
      `chat_template` (inside the file, as on most Hub checkpoints) and eos/pad = <|im_end|>.
  expected.json
      what transformers computes on it, for `model/tests/chatml_base.rs`:
      system, question   the conversation rendered (system prompt + one user turn)
      prompt             apply_chat_template(..., add_generation_prompt=True, tokenize=False)
      vocab_size         the model's (== the tokenizer's) size before the placeholders
      placeholder_ids    the ids transformers gives <ecg>, <cxr>, <lab> when added as special tokens
      prompt_ids         the prompt's ids after adding them (add_special_tokens=False)
      completion, completion_ids   a completion with <think>/<answer> tags, which stay plain text
      eos_ids            [<|im_end|>, <|endoftext|>], pad_id

`system` must equal `medtvt_model::medtvt::SYSTEM_PROMPT`; the test says so when it drifts.

Run with the project venv: `.venv/bin/python scripts/make_chatml_base_fixture.py` (or
`make fixtures`).
"""

import json
import os
import sys

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "model", "tests", "fixtures", "chatml_base")
SEED = 2468
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLACEHOLDERS = ["<ecg>", "<cxr>", "<lab>"]

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The Assistant first reasons about the ECG, chest X-ray and blood "
    "tests, then answers. The reasoning is inside <think></think> and the answer, the diseases separated by "
    "semicolons, inside <answer></answer>."
)
QUESTION = "<ecg> <cxr> <lab> Which diseases does this patient have? Créatinine is 2.1 mg/dL. "
COMPLETION = "<think>Irregular rhythm, high creatinine.</think><answer>atrial fibrillation; acute renal failure</answer>"

# ChatML as Hub checkpoints write it: block tags on their own lines (trim_blocks/lstrip_blocks
# matter), a default system prompt when none is given, and a Python string method (`strip`).
CHAT_TEMPLATE = """{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
    {% endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>\\n' -}}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' -}}
{% endif %}
"""

CORPUS = [
    SYSTEM_PROMPT,
    "Sinus rhythm, left ventricular hypertrophy, no acute ST changes.",
    "Atrial fibrillation with rapid ventricular response; creatinine is high.",
    "Chest X-ray shows cardiomegaly and bilateral infiltrates consistent with pneumonia.",
    "Lactate and white blood cells are elevated, suggesting sepsis.",
    "Which diseases does this patient have? Coronary artery disease, hypertension, diabetes mellitus.",
]


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        min_frequency=2,
        show_progress=False,
        special_tokens=CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
    )


def build_model(vocab, ids):
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=None,
        dtype="float32",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    return model


def main():
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CONTROL_TOKENS}
    assert ids == {t: i for i, t in enumerate(CONTROL_TOKENS)}, ids
    model = build_model(vocab, ids)
    model.save_pretrained(OUT)
    # The template goes into tokenizer_config.json, as on most Hub checkpoints.
    tokenizer.save_pretrained(OUT, save_jinja_files=False)

    # Everything below reads the files back, as a user of the checkpoint would.
    tokenizer = AutoTokenizer.from_pretrained(OUT)
    assert len(tokenizer) == LlamaForCausalLM.from_pretrained(OUT).config.vocab_size == vocab
    with open(os.path.join(OUT, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokenizer.add_tokens(PLACEHOLDERS, special_tokens=True)
    placeholder_ids = tokenizer.convert_tokens_to_ids(PLACEHOLDERS)
    assert placeholder_ids == [vocab, vocab + 1, vocab + 2], placeholder_ids
    expected = {
        "system": SYSTEM_PROMPT,
        "question": QUESTION,
        "prompt": prompt,
        "vocab_size": vocab,
        "placeholder_ids": placeholder_ids,
        "prompt_ids": tokenizer(prompt, add_special_tokens=False).input_ids,
        "completion": COMPLETION,
        "completion_ids": tokenizer(COMPLETION, add_special_tokens=False).input_ids,
        "eos_ids": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_id": ids["<|im_end|>"],
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"chatml_base: wrote {OUT} (vocabulary {vocab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
