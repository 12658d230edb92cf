"""Tiny tokenizers in the layout of released Jamba checkpoints, built in the test (nothing is downloaded).

- `jamba16_dir`: Jamba 1.6/1.7 style: a SentencePiece BPE `tokenizer.model` with byte fallback (no tokenizer.json),
  `tokenizer_class` LlamaTokenizer, `<|bom|>`, `<|eom|>`, role tokens and `<tool_calls>` as special tokens, EOS [2, 5].
- `jamba2_dir`: Jamba2 / Reasoning 3B style: a byte-fallback BPE `tokenizer.json` only, ChatML specials, `<think>`,
  `<tool_call>`, EOS from generation_config.json.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = """The quick brown fox jumps over the lazy dog. Jamba is a hybrid of Transformer and Mamba layers.
def add(a, b):
    return a + b
Les élèves étudient à l'école; naïve café résumé. Numbers 12345 and 2026-12-06, spaces  and\ttabs.
What is the weather in Paris today? I will call the tool to find out, then answer in one sentence.
""" * 6

JAMBA16_SPECIALS = ["<|bom|>", "<|eom|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<tool_calls>",
                    "</tool_calls>", "<documents>", "</documents>", "<tool_definitions>", "</tool_definitions>"]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                   "<tool_response>", "</tool_response>"]


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_jamba16(directory: Path, chat_template: str | None = None, **config) -> Path:
    """A SentencePiece-only checkpoint tokenizer (Jamba 1.6/1.7 layout)."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, vocab_size=420, model_type="bpe",
        byte_fallback=True, pad_id=0, pad_piece="<|pad|>", bos_id=1, bos_piece="<|startoftext|>", eos_id=2,
        eos_piece="<|endoftext|>", unk_id=3, unk_piece="<|unk|>", user_defined_symbols=JAMBA16_SPECIALS,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2, num_threads=1)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    names = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>", *JAMBA16_SPECIALS]
    cfg = {"add_bos_token": True, "add_eos_token": False,
           "added_tokens_decoder": {str(i): _added(t) for i, t in enumerate(names)},
           "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
           "unk_token": "<|unk|>", "clean_up_tokenization_spaces": False, "legacy": False,
           "tokenizer_class": "LlamaTokenizer", "model_max_length": 262144, **config}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    return directory


def write_jamba2(directory: Path, chat_template: str | None = None, **config) -> Path:
    """A tokenizer.json-only checkpoint tokenizer (Jamba2 layout): BPE over Metaspace with byte fallback."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    base = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    trained.train_from_iterator(CORPUS.splitlines(), trainers.BpeTrainer(
        vocab_size=380, special_tokens=base, show_progress=False))
    state = json.loads(trained.to_str())
    vocab = state["model"]["vocab"]
    for byte in range(256):  # byte fallback pieces, as released byte-fallback BPEs carry them
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in base + CHATML_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", pair="<|startoftext|> $A <|startoftext|> $B",
        special_tokens=[("<|startoftext|>", tok.token_to_id("<|startoftext|>"))])
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>",
           "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast",
           "model_max_length": 262144, **config}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (directory / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": [2, tok.token_to_id("<|im_end|>")]}))
    return directory


# Chat templates in the released formats, written for the tests.
CHATML_TEMPLATE = """{%- if tools %}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}
# Tools

You may call functions. Their signatures are inside <tools></tools>:
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>

For each call, write <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{% set ns = namespace(last_user=0) %}
{% for message in messages %}{% if message.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{% for message in messages %}
{% if message.role == 'system' and loop.first %}{% continue %}{% endif %}
{% if message.role == 'user' or message.role == 'system' %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}
<|im_start|>assistant
{% if message.reasoning_content and loop.index0 > ns.last_user %}
<think>
{{ message.reasoning_content | trim }}
</think>

{% endif %}
{{ message.content or '' }}
{% for call in message.tool_calls or [] %}
{% set args = call.function.arguments %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ args if args is string else args | tojson }}}
</tool_call>
{% endfor %}
<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}
{{ raise_exception('unknown role ' ~ message.role) }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
<think>
{% endif %}"""

JAMBA15_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system='You are a helpful assistant.') %}
{% for message in messages %}
{% if message.role == 'system' %}{% set ns.system = message.content %}{% endif %}
{% endfor %}
<|bom|><|system|> {{ ns.system }}
{% if tools %}
<tool_definitions>{{ tools | map(attribute='function') | list | tojson(indent=2) }}</tool_definitions>
{% endif %}
{% if documents %}
<documents>
{% for doc in documents %}
# {{ doc.title }}
{{ doc.text }}
{% endfor %}
</documents>
{% endif %}
<|eom|>
{% for message in messages %}
{% if message.role == 'user' %}
<|bom|><|user|> {{ message.content }}<|eom|>
{% elif message.role == 'assistant' %}
<|bom|><|assistant|>{% if message.content %} {{ message.content }}{% endif %}
{% if message.tool_calls %}<tool_calls>[
{% for call in message.tool_calls %}
{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments }}}{{ ", " if not loop.last }}
{% endfor %}
]</tool_calls>{% endif %}
<|eom|>
{% elif message.role == 'tool' %}
<|bom|><|tool|> {{ message.content }}<|eom|>
{% elif message.role != 'system' %}
{{ raise_exception('Jamba has no role ' ~ message.role) }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|bom|><|assistant|>{% endif %}"""


def tokenizer_styles(root: Path) -> dict:
    """Byte-level BPE, Jamba-1.6-style SentencePiece and Jamba2-style byte-fallback tokenizer.json, loaded: the
    tokenizers a constraint's token masks are checked on."""
    from openjamba.tokenizer import load_tokenizer

    from .conftest import byte_level_tokenizer

    return {"byte-level": byte_level_tokenizer(), "jamba16": load_tokenizer(write_jamba16(root / "j16")),
            "jamba2": load_tokenizer(write_jamba2(root / "j2"))}
