"""vLLM's `choice` structured output (`structured_outputs: {"choice": [...]}`, the older `guided_choice`): the
reply is exactly one of the given strings, then one of the request's end tokens.

`ChoiceGrammar` is a byte-level recogniser with `json_mode.JsonGrammar`'s interface (`start`, `step`, `feed`,
`complete`, `in_string_body`), so `JsonVocabulary` masks tokens with it and `JsonConstraint` runs it as it does
JSON mode: a token is allowed when all its bytes continue some choice, the end tokens only once a whole choice has
been written (then nothing else may follow unless a longer choice goes on from there: "yes" and "yes!"), and added
or special tokens never (they have no bytes in the vocabulary). The choices' UTF-8 bytes form a trie; a state is
("", node, 0), so the vocabulary's mask cache (keyed by state[0][-n:], state[1], state[2]) works unchanged and a
node's mask is computed once per grammar.
"""

from __future__ import annotations

from collections.abc import Sequence

from .json_mode import ByteGrammar


class ChoiceGrammar(ByteGrammar):
    """The bytes of exactly one of `choices` (non-empty strings; duplicates are harmless)."""

    def __init__(self, choices: Sequence[str]) -> None:
        if not choices or any(not isinstance(c, str) or not c for c in choices):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        self.children: list[dict[int, int]] = [{}]  # node -> {byte: child node}; node 0 is the root
        ends: set[int] = set()
        for choice in choices:
            node = 0
            for byte in choice.encode():
                child = self.children[node].get(byte)
                if child is None:
                    child = self.children[node][byte] = len(self.children)
                    self.children.append({})
                node = child
            ends.add(node)
        self.ends = frozenset(ends)

    def start(self) -> tuple:
        return ("", 0, 0)

    def step(self, state: tuple, byte: int) -> tuple | None:
        child = self.children[state[1]].get(byte)
        return None if child is None else ("", child, 0)

    def complete(self, state: tuple) -> bool:
        return state[1] in self.ends

    def in_string_body(self, state: tuple) -> bool:
        return False  # no free text: every token is walked through the trie
