"""JSON mode: constrained decoding so that a reply is one JSON value (OpenAI's `response_format: json_object`).

Three parts:

- `JsonGrammar`: a byte-level recogniser of JSON (RFC 8259: objects, arrays, strings with every escape including
  \\uXXXX, numbers, true/false/null, whitespace; strings must be valid UTF-8). Its state is an immutable tuple
  (open containers as a string of "{" and "[", a mode, the mode's data), so copying it is free and `step` returns a
  new one, or None for a byte that no valid document can have there. `object_only` makes the top-level value an
  object. Runs of whitespace outside strings are capped at `max_whitespace` bytes, so a model cannot pad forever.
- `JsonVocabulary`: every token's bytes (`Tokenizer.token_bytes`) in a byte trie; `allowed(state, grammar)` is
  the mask of tokens whose bytes can all be fed to `state` (the trie is walked with the grammar, a rejected prefix
  prunes its subtree; the grammar is this one or a schema's, serve/json_schema.py). Inside a string, at a
  character boundary, every token made only of string bytes (no quote, backslash or control byte, valid UTF-8) is
  allowed whatever follows, so those come from one precomputed mask and only the other tokens are walked. Masks
  are cached per grammar by the part of the state a token can reach (the innermost `longest token` containers),
  so a state seen before costs a lookup.
- `JsonConstraint`: one request's state (the sampler's per-row constraint): `allows(token)`, `mask(width)` and
  `advance(token)`. Its end tokens (the ids that end the request: EOS, its stop token ids) are allowed only once
  the value is complete, and then only they or whitespace (up to the cap) are, so the request ends with "stop".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

MAX_WHITESPACE = 16  # bytes of whitespace in a row outside strings (room for a newline and 2-space indentation)

# Modes. Those before STR take whitespace; their data is the length of the whitespace run so far.
TOP_OBJECT, TOP_ANY, VALUE, ARRAY_FIRST, OBJ_FIRST, OBJ_KEY, COLON, AFTER, DONE = range(9)
STR, STR_ESC, STR_HEX, STR_UTF, NUM, LIT = range(9, 15)
# Number sub-states (NUM's data); a number may end after ZERO, INT, FRAC or EXP.
MINUS, ZERO, INT, DOT, FRAC, E, E_SIGN, EXP = range(8)
NUMBER_ENDS = frozenset((ZERO, INT, FRAC, EXP))

WHITESPACE = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
CLOSERS = {ord("}"): "{", ord("]"): "["}

State = tuple  # (containers: str, mode: int, data)


def _utf8_lead(byte: int) -> tuple[int, int, int] | None:
    """(continuation bytes, lowest and highest allowed next byte) after a UTF-8 lead byte; None for a byte that
    cannot start a character (a continuation byte, an overlong C0/C1, F5..FF). The ranges exclude overlong forms,
    surrogates (ED A0..BF) and code points above U+10FFFF, as a strict UTF-8 decoder does."""
    if 0xC2 <= byte <= 0xDF:
        return 1, 0x80, 0xBF
    if byte == 0xE0:
        return 2, 0xA0, 0xBF
    if byte == 0xED:
        return 2, 0x80, 0x9F
    if 0xE1 <= byte <= 0xEF:
        return 2, 0x80, 0xBF
    if byte == 0xF0:
        return 3, 0x90, 0xBF
    if 0xF1 <= byte <= 0xF3:
        return 3, 0x80, 0xBF
    if byte == 0xF4:
        return 3, 0x80, 0x8F
    return None


class ByteGrammar:
    """What `JsonVocabulary` masks tokens with: `start()`, `step(state, byte)` (None: no valid document has that
    byte there), `complete(state)`, `in_string_body(state)`; `feed` follows from `step`."""

    def feed(self, state: State | None, data: bytes) -> State | None:
        """The state after `data`, None if it cannot continue a valid document."""
        step = self.step
        for byte in data:
            if state is None:
                return None
            state = step(state, byte)
        return state


class JsonGrammar(ByteGrammar):
    """The JSON recogniser (see the module's docstring). `start()` is the state before the first byte."""

    def __init__(self, object_only: bool = True, max_whitespace: int | None = MAX_WHITESPACE) -> None:
        self.object_only = object_only
        self.max_whitespace = max_whitespace if max_whitespace is not None else 1 << 62

    def start(self) -> State:
        return ("", TOP_OBJECT if self.object_only else TOP_ANY, 0)

    def in_string_body(self, state: State) -> bool:
        """Whether `state` is inside a string at a character boundary: every plain string-body token may follow."""
        return state[1] == STR

    def complete(self, state: State) -> bool:
        """Whether the bytes so far are a whole document (a top-level number is complete once it may end)."""
        stack, mode, data = state
        return mode == DONE or (mode == NUM and not stack and data in NUMBER_ENDS)

    def step(self, state: State, byte: int) -> State | None:
        stack, mode, data = state
        if mode == STR:
            if byte == 0x22:  # the closing quote
                return (stack, COLON, 0) if data else _value_done(stack)
            if byte == 0x5C:
                return (stack, STR_ESC, data)
            if byte < 0x20:
                return None
            if byte < 0x80:
                return state
            lead = _utf8_lead(byte)
            return None if lead is None else (stack, STR_UTF, (data, *lead))
        if mode < STR:  # between tokens: whitespace, then what the mode expects
            if byte in WHITESPACE:
                return (stack, mode, data + 1) if data < self.max_whitespace else None
            return self._structural(stack, mode, byte)
        if mode == STR_UTF:
            key, left, low, high = data
            if not low <= byte <= high:
                return None
            return (stack, STR, key) if left == 1 else (stack, STR_UTF, (key, left - 1, 0x80, 0xBF))
        if mode == NUM:
            return self._number(stack, data, byte)
        if mode == LIT:
            if byte != data[0]:
                return None
            return _value_done(stack) if len(data) == 1 else (stack, LIT, data[1:])
        if mode == STR_ESC:
            if byte in ESCAPES:
                return (stack, STR, data)
            return (stack, STR_HEX, (data, 4)) if byte == 0x75 else None
        if mode == STR_HEX:
            if byte not in HEX:
                return None
            key, left = data
            return (stack, STR, key) if left == 1 else (stack, STR_HEX, (key, left - 1))
        raise AssertionError(f"unknown mode {mode}")

    def _structural(self, stack: str, mode: int, byte: int) -> State | None:
        """A non-whitespace byte outside strings, numbers and literals."""
        if mode == AFTER:
            if byte == 0x2C:  # ,
                return (stack, OBJ_KEY, 0) if stack[-1] == "{" else (stack, VALUE, 0)
            if CLOSERS.get(byte) == stack[-1]:
                return _value_done(stack[:-1])
            return None
        if mode == COLON:
            return (stack, VALUE, 0) if byte == 0x3A else None
        if mode == OBJ_FIRST or mode == OBJ_KEY:
            if byte == 0x22:
                return (stack, STR, True)
            return _value_done(stack[:-1]) if byte == 0x7D and mode == OBJ_FIRST else None
        if mode == DONE:
            return None
        if mode == ARRAY_FIRST and byte == 0x5D:
            return _value_done(stack[:-1])
        if mode == TOP_OBJECT and byte != 0x7B:
            return None
        return _open_value(stack, byte)

    def _number(self, stack: str, sub: int, byte: int) -> State | None:
        if byte in DIGITS:
            if sub == MINUS:
                return (stack, NUM, ZERO if byte == 0x30 else INT)
            if sub == ZERO:
                return None  # no leading zeros
            if sub == DOT:
                return (stack, NUM, FRAC)
            if sub == E or sub == E_SIGN:
                return (stack, NUM, EXP)
            return (stack, NUM, sub)  # INT, FRAC, EXP go on
        if byte == 0x2E:  # .
            return (stack, NUM, DOT) if sub == ZERO or sub == INT else None
        if byte == 0x65 or byte == 0x45:  # e E
            return (stack, NUM, E) if sub in (ZERO, INT, FRAC) else None
        if byte == 0x2B or byte == 0x2D:  # + -
            return (stack, NUM, E_SIGN) if sub == E else None
        if sub not in NUMBER_ENDS:
            return None
        after = _value_done(stack)  # the number ended: this byte belongs to what follows it
        return self.step(after, byte)


def _value_done(stack: str) -> State:
    return (stack, AFTER, 0) if stack else (stack, DONE, 0)


def _open_value(stack: str, byte: int) -> State | None:
    """The state after the first byte of a value."""
    if byte == 0x7B:
        return (stack + "{", OBJ_FIRST, 0)
    if byte == 0x5B:
        return (stack + "[", ARRAY_FIRST, 0)
    if byte == 0x22:
        return (stack, STR, False)
    if byte == 0x2D:
        return (stack, NUM, MINUS)
    if byte in DIGITS:
        return (stack, NUM, ZERO if byte == 0x30 else INT)
    rest = LITERALS.get(byte)
    return None if rest is None else (stack, LIT, rest)


def is_string_body(data: bytes) -> bool:
    """Whether `data` may follow any string position at a character boundary, whatever comes before or after:
    no quote, backslash or control byte, and UTF-8 that starts at a character (it may end inside one)."""
    state = ("", STR, False)
    step = _PLAIN.step
    for byte in data:
        if byte == 0x22 or byte == 0x5C:
            return False
        state = step(state, byte)
        if state is None:
            return False
    return True


_PLAIN = JsonGrammar()


class JsonVocabulary:
    """A tokenizer's tokens as byte strings in a trie, for masks of the tokens a JSON state allows (see the module's
    docstring). Built once per server; shared by every JSON-mode request. `token_bytes[i]` is None for tokens that
    may not appear in JSON (special and added tokens)."""

    CACHED_MASKS = 256

    def __init__(self, token_bytes: Sequence[bytes | None], grammar: JsonGrammar | None = None) -> None:
        self.grammar = grammar or JsonGrammar()  # the default; a constraint may bring its own (json_schema.py)
        self.token_bytes = list(token_bytes)
        self.size = len(self.token_bytes)
        self.trie: list = [{}, []]  # node: [children by byte, ids of the tokens ending here]
        self.other_trie: list = [{}, []]  # the tokens that are not plain string bodies
        plain = torch.zeros(self.size, dtype=torch.bool)
        for index, data in enumerate(self.token_bytes):
            if not data:
                continue
            _insert(self.trie, data, index)
            if is_string_body(data):
                plain[index] = True
            else:
                _insert(self.other_trie, data, index)
        self.string_body = plain
        self.longest = max((len(d) for d in self.token_bytes if d), default=1)
        self._masks: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._containing: dict[bytes, list[int]] = {}

    @classmethod
    def of(cls, tokenizer, **kwargs) -> JsonVocabulary:
        return cls(tokenizer.token_bytes(), **kwargs)

    def constraint(self, end_ids: Sequence[int] = (), grammar=None) -> JsonConstraint:
        """A fresh per-request constraint ending with one of `end_ids` (the factory `SamplingParams.constraint`
        holds; the engine passes a request's stop ids), with `grammar` (default: any JSON object)."""
        return JsonConstraint(self, end_ids, grammar)

    def string_tokens_containing(self, data: bytes) -> list[int]:
        """Ids of the plain string-body tokens whose bytes contain `data` (a scan of the vocabulary, kept per
        `data`): what a grammar that forbids `data` inside its strings takes out of the string-body mask."""
        ids = self._containing.get(data)
        if ids is None:
            plain = self.string_body.tolist()
            ids = self._containing[data] = [i for i, b in enumerate(self.token_bytes) if b and data in b and plain[i]]
        return ids

    def allowed(self, state: State, grammar=None) -> torch.Tensor:
        """Bool mask (size,) of the tokens whose bytes may come next in `state` of `grammar` (default the
        vocabulary's; shared: do not modify). A token of n bytes can close at most n containers, so only the
        innermost `longest` containers decide the mask. Where the grammar says the state is inside a string at a
        character boundary (`in_string_body`), every plain string-body token is allowed and only the others are
        walked."""
        grammar = grammar or self.grammar
        stack = state[0]
        key = (grammar, stack[-self.longest:], len(stack) > self.longest, state[1], state[2])
        mask = self._masks.get(key)
        if mask is not None:
            self._masks.move_to_end(key)
            return mask
        ids: list[int] = []
        if grammar.in_string_body(state):
            mask = self.string_body.clone()
            _walk(self.other_trie, state, ids, grammar.step)
        else:
            mask = torch.zeros(self.size, dtype=torch.bool)
            _walk(self.trie, state, ids, grammar.step)
        if ids:
            mask[torch.tensor(ids, dtype=torch.long)] = True
        self._masks[key] = mask
        if len(self._masks) > self.CACHED_MASKS:
            self._masks.popitem(last=False)
        return mask


def _walk(node: list, state: State, out: list[int], step) -> None:
    """Add to `out` every token below `node` whose remaining bytes `state` accepts (depth first, pruning)."""
    for byte, child in node[0].items():
        after = step(state, byte)
        if after is not None:
            out.extend(child[1])
            if child[0]:
                _walk(child, after, out, step)


def _insert(trie: list, data: bytes, index: int) -> None:
    node = trie
    for byte in data:
        node = node[0].setdefault(byte, [{}, []])
    node[1].append(index)


class JsonConstraint:
    """One request's JSON state, for the sampler: a token is allowed when its bytes continue the document (EOS when
    the document is complete)."""

    def __init__(self, vocabulary: JsonVocabulary, end_ids: Sequence[int] = (), grammar=None) -> None:
        self.vocabulary = vocabulary
        self.grammar = grammar or vocabulary.grammar
        self.state = self.grammar.start()
        self.end_ids = sorted({int(i) for i in end_ids})
        self._eos = frozenset(self.end_ids)

    def _after(self, token: int) -> State | None:
        data = self.vocabulary.token_bytes[token] if 0 <= token < self.vocabulary.size else None
        return self.grammar.feed(self.state, data) if data else None

    def allows(self, token: int) -> bool:
        if token in self._eos:
            return self.grammar.complete(self.state)
        return self._after(token) is not None

    def mask(self, width: int) -> torch.Tensor:
        """Bool mask (width,) of the allowed tokens (ids past the tokenizer's vocabulary are never allowed). When
        nothing is (a vocabulary without single-byte tokens could get there) the end tokens are, to end the
        request, or without any every token."""
        size = self.vocabulary.size
        mask = torch.zeros(max(width, size), dtype=torch.bool)
        mask[:size] = self._allowed()
        ends = [i for i in self.end_ids if i < mask.shape[0]]
        mask[ends] = self.grammar.complete(self.state)
        if not mask.any():
            mask[ends or slice(None)] = True
        return mask[:width]

    def _allowed(self) -> torch.Tensor:
        """Bool mask (vocabulary size,) of the tokens other than the end tokens that may come next."""
        return self.vocabulary.allowed(self.state, self.grammar)

    def advance(self, token: int) -> None:
        """Take the sampled token (one the constraint allowed; EOS leaves the state as it is)."""
        if token not in self._eos:
            after = self._after(token)
            if after is not None:
                self.state = after

    def complete(self) -> bool:
        return self.grammar.complete(self.state)
