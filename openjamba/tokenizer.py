"""Tokenizers of every released Jamba: `tokenizer.json` (the `tokenizers` library) or a SentencePiece `tokenizer.model`.

One `Tokenizer` class whatever the files, with the behaviour of transformers' `AutoTokenizer` loaded from the same
directory (the tests hold it to that):

- `tokenizer.json` is read with the `tokenizers` library. When `tokenizer_config.json` names the Llama tokenizer
  class (Jamba-v0.1 and 1.5 do) and the file is a byte-fallback BPE, transformers keeps only its vocabulary and
  merges and rebuilds the Llama pipeline around them; so does this module.
- A directory with only `tokenizer.model` (Jamba 1.6 and 1.7) is read with the `sentencepiece` library and turned into
  the same Llama pipeline: the BPE pieces with merges ranked by piece id, byte fallback, a Metaspace pre-tokenizer that
  puts the dummy-prefix space only before the text's first word (transformers' non-legacy mode; `"legacy": true` puts
  it before every segment between special tokens). The SentencePiece processor itself is not used to encode because
  it would add that prefix after every special token and before a leading space, where transformers does not.
- Special tokens come from `tokenizer_config.json` (`added_tokens_decoder`, `bos_token`... and
  `additional_special_tokens`), or `special_tokens_map.json`. BOS/EOS insertion: a `tokenizer.json`'s
  post-processor (its `add_bos_token` in the config is ignored, as transformers ignores it); for a SentencePiece
  model, `add_bos_token` / `add_eos_token` (default: neither). The stop ids from `generation_config.json`
  (Jamba 1.5: `[2, 518]`), then `config.json`, then the EOS token.
- The chat template from `chat_template.jinja` and `additional_chat_templates/NAME.jinja`, else
  `tokenizer_config.json` (`chat_template`: a string, or a list of `{"name", "template"}`); "default" is used, and
  "tool_use" when tools are given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

# Files read from a checkpoint directory, and written back by `Tokenizer.save_pretrained`.
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
TEMPLATE_DIR = "additional_chat_templates"  # named templates, one NAME.jinja each
LLAMA_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast"}
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
SP_CONTROL, SP_USER_DEFINED = 3, 4  # SentencePiece piece types (sentencepiece_model.proto)


class Tokenizer:
    """Text <-> token ids for one checkpoint; `encode`/`decode` equal transformers' tokenizer from the same files."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_templates: dict[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        files: dict[str, bytes] | None = None,
        name_or_path: str = "",
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.chat_templates = dict(chat_templates or {})
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.files = dict(files or {})  # source files, written back verbatim by save_pretrained
        self.name_or_path = name_or_path
        self.bos_token_id = self._special_id("bos_token")
        self.pad_token_id = self._special_id("pad_token")
        self.unk_token_id = self._special_id("unk_token")
        eos = [int(i) for i in eos_token_ids]
        if (own := self._special_id("eos_token")) is not None and own not in eos:
            eos.append(own)
        self.eos_token_ids: list[int] = eos

    @classmethod
    def from_backend(cls, backend: tokenizers.Tokenizer, **kwargs) -> Tokenizer:
        """Wrap a `tokenizers.Tokenizer` built in memory (a freshly trained one): encoding as the object does."""
        return cls(backend, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS (what the post-processor does)."""
        return self.bos_token_id is not None and self.backend.encode("", add_special_tokens=True).ids[:1] == [
            self.bos_token_id]

    @property
    def chat_template(self) -> str | None:
        """The default chat template (None when the checkpoint has none, as Jamba-v0.1)."""
        return self.chat_templates.get("default")

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special)

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the tokenizer adds them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` over many texts at once (the `tokenizers` library runs them in parallel)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = clean_up_tokenization(text)  # transformers skips it for BPE models, where it would damage text
        return text

    def token_text(self, index: int) -> str:
        """The text one token adds after other text (a logprob's token string): " Paris" for "▁Paris", where
        `decode([index])` drops the space as the start of a text; a lone byte of a longer character is "�"."""
        anchor = self.anchor_token()
        head = self.backend.decode([anchor], skip_special_tokens=False)
        return self.backend.decode([anchor, int(index)], skip_special_tokens=False)[len(head):]

    def anchor_token(self) -> int:
        """A token that decodes to a plain letter, to decode others after it."""
        if not hasattr(self, "_anchor_id"):
            ids = self.backend.encode("a", add_special_tokens=False).ids
            self._anchor_id = ids[-1] if ids else 0
        return self._anchor_id

    def token_bytes(self) -> list[bytes | None]:
        """Every id's raw bytes, as it adds them to a decoded text (cached): byte-level BPE pieces through the
        GPT-2 byte alphabet inverted; SentencePiece-style pieces (byte fallback or a Metaspace pre-tokenizer) with
        "▁" as a space and `<0xNN>` as that byte; None for special and added tokens. The decoder drops the space
        that starts a whole text, so `decode(ids)` is these bytes joined, less that leading space."""
        if not hasattr(self, "_token_bytes"):
            self._token_bytes = self._all_token_bytes()
        return self._token_bytes

    def _all_token_bytes(self) -> list[bytes | None]:
        state = json.loads(self.backend.to_str())
        kinds = json.dumps([state.get("decoder"), state.get("pre_tokenizer")])
        byte_level = '"ByteLevel"' in kinds
        metaspace = not byte_level and (bool(state.get("model", {}).get("byte_fallback")) or '"Metaspace"' in kinds)
        alphabet = {char: byte for byte, char in gpt2_byte_alphabet().items()}
        added = set(self.backend.get_added_tokens_decoder())
        out: list[bytes | None] = []
        for index in range(self.vocab_size):
            piece = self.backend.id_to_token(index)
            if piece is None or index in added:
                out.append(None)
            elif byte_level:
                out.append(bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else None)
            elif metaspace:
                fallback = len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
                out.append(bytes([int(piece[3:5], 16)]) if fallback else piece.replace("▁", " ").encode("utf-8"))
            else:  # another pipeline: the text it decodes to after a plain letter, when that is whole characters
                text = self.token_text(index)
                out.append(text.encode("utf-8") if "\ufffd" not in text else None)
        return out

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | Path) -> list[str]:
        """Write the tokenizer's files into `directory` (the source files verbatim); returns their names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = dict(self.files)
        if "tokenizer.json" not in files and "tokenizer.model" not in files:
            files["tokenizer.json"] = self.backend.to_str().encode()
        for name, data in files.items():
            (directory / name).parent.mkdir(exist_ok=True)
            (directory / name).write_bytes(data)
        return sorted(files)

    def __repr__(self) -> str:
        kind = "sentencepiece" if "tokenizer.model" in self.files and "tokenizer.json" not in self.files else "json"
        return (f"Tokenizer({self.name_or_path or 'in memory'}, {kind}, {self.vocab_size} ids, "
                f"bos={self.bos_token_id}, eos={self.eos_token_ids}, chat_template={self.chat_template is not None})")


# ---------------------------------------------------------------------- loading
def load_tokenizer(path: str | Path, revision: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory, of a `tokenizer.json`/`tokenizer.model` file (with the config
    files beside it), or of a Hugging Face Hub repo id (fetched into the Hugging Face cache at `revision`)."""
    if not Path(path).exists():
        from .hf import resolve_checkpoint

        path = resolve_checkpoint(path, revision)  # as given: a str may be a repo id, a Path never
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: the path does not exist")
    if path.is_dir():
        main = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), None)
        if main is None:
            raise FileNotFoundError(f"{path} has no tokenizer.json or tokenizer.model: give a checkpoint directory "
                                    "that ships its tokenizer (or copy the base model's tokenizer files into it)")
    else:
        main = path
    files = {main.name: main.read_bytes()}
    for name in CONFIG_FILES:
        if (directory / name).is_file():
            files[name] = (directory / name).read_bytes()
    for template in sorted((directory / TEMPLATE_DIR).glob("*.jinja")):
        files[f"{TEMPLATE_DIR}/{template.name}"] = template.read_bytes()
    config = _read_json(files, "tokenizer_config.json", directory)
    special_map = _read_json(files, "special_tokens_map.json", directory)

    if main.suffix == ".model":
        backend, sp_defaults, sp_added = _sentencepiece_backend(main, config)
    else:
        backend, sp_defaults, sp_added = _json_backend(main, config), {}, []
    special_tokens = _named_special_tokens(config, special_map, sp_defaults)
    _add_tokens(backend, config, special_map, special_tokens, sp_added)
    _set_post_processor(backend, config if main.suffix == ".model" else {}, special_tokens)
    return Tokenizer(
        backend,
        special_tokens=special_tokens,
        eos_token_ids=_eos_ids(files, directory),
        chat_templates=_chat_templates(files, config),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        files=files,
        name_or_path=str(path),
    )


def _read_json(files: dict[str, bytes], name: str, directory: Path) -> dict:
    if name not in files:
        return {}
    try:
        data = json.loads(files[name])
    except json.JSONDecodeError as e:
        raise ValueError(f"{directory / name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{directory / name} must hold a JSON object")
    return data


def _token_content(value) -> str | None:
    """A special token given as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _named_special_tokens(config: dict, special_map: dict, defaults: dict[str, str]) -> dict[str, str]:
    found = {}
    for name in NAMED_SPECIAL_TOKENS:
        token = _token_content(config.get(name, special_map.get(name, defaults.get(name))))
        if token is not None:
            found[name] = token
    return found


def _json_backend(file: Path, config: dict) -> tokenizers.Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception on a malformed file
        raise ValueError(f"{file} is not a tokenizers file: {e}") from None
    model = json.loads(file.read_text(encoding="utf-8")).get("model", {})
    if config.get("tokenizer_class") in LLAMA_CLASSES and model.get("type") == "BPE" and model.get("byte_fallback"):
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        rebuilt = _llama_pipeline(model["vocab"], merges, config)
        rebuilt.post_processor = backend.post_processor
        for _, token in sorted(backend.get_added_tokens_decoder().items()):
            (rebuilt.add_special_tokens if token.special else rebuilt.add_tokens)([token])
        return rebuilt
    return backend


def _sentencepiece_backend(file: Path, config: dict) -> tuple[tokenizers.Tokenizer, dict[str, str], list[AddedToken]]:
    """The Llama pipeline over a SentencePiece BPE model, plus its control pieces' names and its added tokens."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(str(file))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{file} is not a SentencePiece model: {e}") from None
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    backend = _llama_pipeline(vocab, merges_from_vocab(vocab), config)
    defaults = {name: sp.id_to_piece(i) for name, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()),
                                                        ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id()))
                if i >= 0}
    # Control and user-defined pieces are matched whole in text (only control ones count as special), as transformers
    # does when it converts the model.
    types = sentencepiece_piece_types(file.read_bytes())
    added = [AddedToken(pieces[i], normalized=False, special=t == SP_CONTROL)
             for i, t in enumerate(types) if t in (SP_CONTROL, SP_USER_DEFINED)]
    return backend, defaults, added


def merges_from_vocab(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces, ranked by the
    merged piece's id (SentencePiece merges the highest-scoring piece first, and its scores fall with the id), then
    by the left part's length."""
    merges = []
    for piece, index in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((index, cut, left, right))
    merges.sort(key=lambda m: (m[0], m[1]))
    return [(left, right) for _, _, left, right in merges]


def _llama_pipeline(vocab: dict[str, int], merges: list[tuple[str, str]], config: dict) -> tokenizers.Tokenizer:
    """Byte-fallback BPE with SentencePiece's whitespace handling, as transformers' LlamaTokenizer builds it."""
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    prepend = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_tokens(backend: tokenizers.Tokenizer, config: dict, special_map: dict, special_tokens: dict[str, str],
                sp_added: list[AddedToken]) -> None:
    """Added tokens from the SentencePiece model, `added_tokens_decoder`, and every named special token, in the
    order transformers adds them (a token already in the vocabulary keeps its id)."""
    for token in sp_added:
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
    declared = config.get("added_tokens_decoder") or {}
    for _, spec in sorted(declared.items(), key=lambda item: int(item[0])):
        token = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                           lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                           normalized=spec.get("normalized", not spec.get("special", False)),
                           special=spec.get("special", False))
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or \
        special_map.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    named = [*special_tokens.values(), *(_token_content(t) for t in extra)]
    existing = {t.content: t for t in backend.get_added_tokens_decoder().values()}
    for content in named:
        if content is None:
            continue
        if content not in existing or not existing[content].special:
            backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])


def _set_post_processor(backend: tokenizers.Tokenizer, config: dict, special_tokens: dict[str, str]) -> None:
    """BOS/EOS as `add_bos_token`/`add_eos_token` ask (default: neither) when the tokenizer has no post-processor
    of its own. A tokenizer.json's post-processor stands whatever the config says, and without one a
    tokenizer.json adds nothing (its caller passes no config), as in transformers."""
    if backend.post_processor is not None:
        return
    bos = special_tokens.get("bos_token") if config.get("add_bos_token", False) else None
    eos = special_tokens.get("eos_token") if config.get("add_eos_token", False) else None
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    ends = [(t, backend.token_to_id(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ends)


def _eos_ids(files: dict[str, bytes], directory: Path) -> list[int]:
    """Stop ids: generation_config.json's eos_token_id (an int or a list), else config.json's."""
    for name in ("generation_config.json", "config.json"):
        if name == "config.json" and (directory / name).is_file():
            data = json.loads((directory / name).read_text())
        else:
            data = _read_json(files, name, directory)
        value = data.get("eos_token_id")
        if value is not None:
            return [int(v) for v in (value if isinstance(value, list) else [value])]
    return []


def _chat_templates(files: dict[str, bytes], config: dict) -> dict[str, str]:
    """Template files (chat_template.jinja as "default", additional_chat_templates/NAME.jinja) when there are any,
    which then replace the config's `chat_template` entirely, as in transformers."""
    templates = {name.removeprefix(f"{TEMPLATE_DIR}/").removesuffix(".jinja"): data.decode("utf-8")
                 for name, data in files.items() if name.startswith(f"{TEMPLATE_DIR}/")}
    if "chat_template.jinja" in files:
        templates["default"] = files["chat_template.jinja"].decode("utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t}
    return {}


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces that WordPiece-era decoders leave before punctuation and English contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ---------------------------------------------------------------------- SentencePiece model file
def sentencepiece_piece_types(proto: bytes) -> list[int]:
    """Each piece's type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) from a SentencePiece
    ModelProto; the `sentencepiece` library has no accessor for user-defined pieces."""
    types = []
    for field, value in _proto_fields(proto):
        if field == 1 and isinstance(value, bytes):  # ModelProto.pieces
            kind = 1
            for sub, sub_value in _proto_fields(value):
                if sub == 3 and isinstance(sub_value, int):  # SentencePiece.type
                    kind = sub_value
            types.append(kind)
    return types


def _proto_fields(data: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
        yield field, value if wire != 1 and wire != 5 else None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def gpt2_byte_alphabet() -> dict[int, str]:
    """The printable character byte-level BPE writes for each byte (GPT-2's table): printable Latin-1 bytes as
    themselves, the others as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table
