"""Prompt templates built from item text (LlamaRec's ranking prompt; reusable by others).

The default template is the LlamaRec authors' Alpaca-short frame:

    ### Instruction:
    {instruction}

    ### Input:
    User history: (1) title \\n (2) title; \\n Candidate pool: (A) title \\n (B) title

    ### Response:
    {letter}

Titles are cut to ``title_max_tokens`` tokens once per item; the history keeps the
last ``history_len`` items. Prompts are cut by shortening the history first, never by
truncating the instruction (the authors' left truncation could cut it).
:class:`RankingPromptIds` gives a prompt's token ids from pieces tokenized once per item.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, islice
from logging import getLogger

import numpy as np

from recbole_llm.errors import InputError

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
RANKING_INSTRUCTION = (
    "Given user history in chronological order, recommend an item from the candidate pool with its index letter."
)
RESPONSE_MARKER = "### Response:\n"
HISTORY_OPENING = "User history:"
POOL_OPENING = "; \n Candidate pool:"
ITEM_SEPARATOR = " \n"


def truncate_texts(texts: Sequence[str], tokenizer, max_tokens: int) -> list[str]:
    """Each text cut to at most ``max_tokens`` tokens of ``tokenizer`` (the share cut: :func:`note_cut_texts`)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    note_cut_texts(sum(len(i) > max_tokens for i in ids), sum(1 for t in texts if t), f"title_max_tokens={max_tokens}")
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]).strip() for t, i in zip(texts, ids)]


def note_cut_texts(cut: int, total: int, setting: str) -> None:
    """Log (once per model: RecBole's logger, at INFO: a default's cut is a documented choice, nothing a
    user must act on) when ``setting`` cuts the text of more than a tenth of the items."""
    if total and cut > total / 10:
        getLogger().info(f"{setting} cuts the text of {cut} of {total} items ({cut / total:.0%}); raise it to "
                            "keep more of each item's text in the prompts (they get longer).")


@dataclass
class RankingPrompt:
    """Builds the ranking prompt for a history and lettered candidates."""

    template: str = ALPACA_TEMPLATE
    instruction: str = RANKING_INSTRUCTION
    history_len: int = 20

    def __post_init__(self):
        if not self.template.endswith(RESPONSE_MARKER):
            raise InputError(f"prompt_template must end with {RESPONSE_MARKER!r} (the verbalizer reads the next token)")

    def recent(self, history: Sequence) -> list:
        """The last ``history_len`` entries of ``history`` (those the prompt shows)."""
        return list(history)[-self.history_len :] if self.history_len > 0 else []

    def build(self, history: Sequence[str], candidates: Sequence[str], letters: Sequence[str]) -> str:
        history = self.recent(history)
        history_text = f"{ITEM_SEPARATOR} ".join(f"({i + 1}) {title}" for i, title in enumerate(history))
        candidate_text = f"{ITEM_SEPARATOR} ".join(f"({letter}) {title}" for letter, title in zip(letters, candidates))
        body = f"{HISTORY_OPENING} {history_text}{POOL_OPENING} {candidate_text}"
        return self.template.format(instruction=self.instruction, input=body)


PIECE_ANCHOR = ":"  # tokenized before each piece, so that a piece starts as inside a prompt (after a non-space)
_INPUT_SLOT = "\x00input\x00"
_VERIFIED_PROMPTS = 8


class IdTable:
    """Token ids of many texts in one flat array (a table of a hundred thousand items stays a few MB)."""

    def __init__(self, rows: Sequence[Sequence[int]]):
        self.lengths = np.array([len(row) for row in rows], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.ids = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(self.offsets[-1]))

    def __getitem__(self, row: int) -> np.ndarray:
        return self.ids[self.offsets[row]:self.offsets[row + 1]]


def piece_ids(tokenizer, pieces: Sequence[str]) -> list[list[int]] | None:
    """Token ids of each piece as it reads inside a text (after :data:`PIECE_ANCHOR`, whose ids are
    dropped: a SentencePiece tokenizer gives a leading space alone another id than inside a text);
    None where the anchor's ids change with the piece that follows (tokenization merges across it)."""
    anchor = tokenizer(PIECE_ANCHOR, add_special_tokens=False)["input_ids"]
    rows = tokenizer([PIECE_ANCHOR + piece for piece in pieces], add_special_tokens=False)["input_ids"]
    if any(row[:len(anchor)] != anchor for row in rows):
        return None
    return [row[len(anchor):] for row in rows]


class RankingPromptIds:
    """Token ids of :class:`RankingPrompt`'s prompts for item ids, the oldest history items dropped
    until a prompt has at most ``max_tokens`` tokens (never the instruction).

    Tokenizing each prompt at each step would make a GPU wait on the CPU, so the ids are assembled
    from pieces tokenized once: the frame (the template up to ``User history:``, the markers
    `` (1)``.. and `` (A)``.., the empty history) and each item's text in the three places it can
    stand (`` title \\n`` before another entry, `` title; \\n Candidate pool:`` last in the history,
    `` title`` + the template's end last among the candidates). Every piece starts with a space after a
    non-space character, where byte-level BPE and SentencePiece tokenizers split before merging, so
    no merge crosses a piece boundary; the cut follows from the pieces' lengths. Whether assembled ids
    equal the tokenized text is checked once, on prompts of ``sample_histories``; where they differ
    (a tokenizer that merges across those boundaries) every prompt is tokenized as text, as said once
    in the log.
    """

    def __init__(self, prompt: RankingPrompt, tokenizer, item_text: Sequence[str], letters: Sequence[str],
                 max_tokens: int, sample_histories: Sequence[Sequence[int]] = ()):
        self.prompt, self.tokenizer, self.item_text = prompt, tokenizer, item_text
        self.letters, self.max_tokens = list(letters), max_tokens
        self.assembles = self._cache_pieces()
        if self.assembles:
            samples = self._sample_prompts(sample_histories)
            self.assembles = all(self._assembled(h, c) == self._tokenized(h, c) for h, c in samples)
        if not self.assembles:
            getLogger().info(f"{type(tokenizer).__name__} tokenizes LlamaRec's prompts otherwise than from "
                             "pieces cached per item: each prompt is tokenized as text (slower, same prompts).")

    def __call__(self, history: Sequence[int], candidates: Sequence[int]) -> list[int]:
        """Token ids of the prompt of ``history`` (item ids, oldest first) and ``candidates``."""
        return self._assembled(history, candidates) if self.assembles else self._tokenized(history, candidates)

    def _tokenized(self, history: Sequence[int], candidates: Sequence[int]) -> list[int]:
        """The prompt's text tokenized, re-tokenized without the oldest history item while too long."""
        candidate_text = [self.item_text[c] for c in candidates]
        history = self.prompt.recent(history)
        while True:
            text = self.prompt.build([self.item_text[i] for i in history], candidate_text, self.letters)
            ids = self.tokenizer(text)["input_ids"]
            if len(ids) <= self.max_tokens or not history:
                return ids
            history = history[1:]

    def _cache_pieces(self) -> bool:
        """Tokenize the frame and item pieces; False where the template or the tokenizer does not allow it."""
        framed = self.prompt.template.format(instruction=self.prompt.instruction, input=_INPUT_SLOT)
        if framed.count(_INPUT_SLOT) != 1:
            return False
        before, after = framed.split(_INPUT_SLOT)
        head = before + HISTORY_OPENING
        plain = self.tokenizer(head, add_special_tokens=False)["input_ids"]
        special = self.tokenizer(head)["input_ids"]
        start = next((i for i in range(len(special) - len(plain) + 1) if special[i:i + len(plain)] == plain), None)
        if start is None:
            return False
        self._opening = np.array(special[:start + len(plain)], dtype=np.int64)
        self._closing = np.array(special[start + len(plain):], dtype=np.int64)
        frame = ([" " + POOL_OPENING] + [f" ({i + 1})" for i in range(max(self.prompt.history_len, 0))]
                 + [f" ({letter})" for letter in self.letters])
        items = ([f" {t}{ITEM_SEPARATOR}" for t in self.item_text] + [f" {t}{POOL_OPENING}" for t in self.item_text]
                 + [f" {t}{after}" for t in self.item_text])
        ids = piece_ids(self.tokenizer, frame + items)
        if ids is None:
            return False
        n_frame, n_items = len(frame), len(self.item_text)
        self._empty_history = np.array(ids[0], dtype=np.int64)
        self._history_marks = IdTable(ids[1:n_frame - len(self.letters)])
        self._letter_marks = IdTable(ids[n_frame - len(self.letters):n_frame])
        self._inner, self._last_in_history, self._last_candidate = (
            IdTable(ids[n_frame + n_items * part:n_frame + n_items * (part + 1)]) for part in range(3))
        return True

    def _assembled(self, history: Sequence[int], candidates: Sequence[int]) -> list[int]:
        """The prompt's ids from the cached pieces, the history cut by the pieces' lengths."""
        count = min(len(candidates), len(self.letters))
        pool = []
        for slot, item in enumerate(candidates[:count]):
            pool += [self._letter_marks[slot], (self._last_candidate if slot == count - 1 else self._inner)[item]]
        history = self._history_fit(self.prompt.recent(history), sum(len(piece) for piece in pool))
        entries = [self._empty_history] if not history else []
        for slot, item in enumerate(history):
            entries += [self._history_marks[slot],
                        (self._last_in_history if slot == len(history) - 1 else self._inner)[item]]
        return np.concatenate([self._opening, *entries, *pool, self._closing]).tolist()

    def _history_fit(self, history: list[int], pool_length: int) -> list[int]:
        """The longest recent part of ``history`` whose prompt has at most ``max_tokens`` tokens (none if no part fits)."""
        frame = len(self._opening) + len(self._closing) + pool_length
        marks, inner = self._history_marks.lengths, self._inner.lengths
        for kept in range(len(history), 0, -1):
            recent = history[len(history) - kept:]
            length = (frame + marks[:kept].sum() + inner[recent[:-1]].sum()
                      + self._last_in_history.lengths[recent[-1]])
            if length <= self.max_tokens:
                return recent
        return []

    def _sample_prompts(self, histories: Sequence[Sequence[int]]) -> list[tuple[list[int], list[int]]]:
        """A few prompts to check assembly on: ``histories`` (and an empty one), each with its own
        candidates, spread over all items (no random draw: the run's random state stays as it was)."""
        k, n_items = len(self.letters), len(self.item_text)
        histories = [*islice((list(h) for h in histories if h), _VERIFIED_PROMPTS), []]
        return [(h, [(p * k + j) % (n_items - 1) + 1 for j in range(k)]) for p, h in enumerate(histories)]
