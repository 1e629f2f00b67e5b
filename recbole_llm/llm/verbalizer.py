"""The letter verbalizer (LlamaRec, Sec. 3.2): candidate scores from ONE forward pass.

The score of candidate ``j`` is the raw next-token logit of its index letter at the
last prompt position. The pitfall (known from the authors' code): a letter encoded alone
may get another id than the one the model is trained to emit after "### Response:\\n". Here each
letter's id is taken from that very context (tokenize marker + letter, keep the last
token), the context must tokenize as marker tokens + exactly one letter token, and the
training labels are built from the same ids (:meth:`LetterVerbalizer.answer_ids`).
"""
from __future__ import annotations

import string

import torch

from recbole_llm.llm.prompts import RESPONSE_MARKER
from recbole_llm.errors import InputError


class LetterVerbalizer:
    def __init__(self, tokenizer, k: int, marker: str = RESPONSE_MARKER):
        letters = string.ascii_uppercase
        if not 1 <= k <= len(letters):
            raise InputError(
                f"candidate_k={k} but the verbalizer has {len(letters)} index letters (A..Z): set candidate_k <= {len(letters)}"
            )
        self.letters = list(letters[:k])
        marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        ids = []
        for letter in self.letters:
            in_context = tokenizer(marker + letter, add_special_tokens=False)["input_ids"]
            if in_context[:-1] != marker_ids:
                raise InputError(
                    f"tokenizer merges letter {letter!r} with the response marker {marker!r}; "
                    "use a template whose response marker ends with a newline"
                )
            ids.append(in_context[-1])
        if len(set(ids)) != k:
            raise InputError("two index letters share a token id in this tokenizer")
        self.letter_ids = torch.tensor(ids)
        self.eos_id = tokenizer.eos_token_id

    def answer_ids(self, index: int) -> list[int]:
        """Training target for the candidate at ``index``: its letter token, then EOS."""
        return [int(self.letter_ids[index]), self.eos_id]

    def scores(self, last_logits: torch.Tensor) -> torch.Tensor:
        """[B, vocab] next-token logits at the last prompt position -> [B, k] candidate scores."""
        return last_logits.index_select(-1, self.letter_ids.to(last_logits.device))
