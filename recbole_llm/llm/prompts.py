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
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from logging import getLogger

from recbole_llm.errors import InputError

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
RANKING_INSTRUCTION = (
    "Given user history in chronological order, recommend an item from the candidate pool with its index letter."
)
RESPONSE_MARKER = "### Response:\n"


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

    def build(self, history: Sequence[str], candidates: Sequence[str], letters: Sequence[str]) -> str:
        history = list(history)[-self.history_len :] if self.history_len > 0 else []
        history_text = " \n ".join(f"({i + 1}) {title}" for i, title in enumerate(history))
        candidate_text = " \n ".join(f"({letter}) {title}" for letter, title in zip(letters, candidates))
        body = f"User history: {history_text}; \n Candidate pool: {candidate_text}"
        return self.template.format(instruction=self.instruction, input=body)
