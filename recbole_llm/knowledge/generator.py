"""Batched knowledge generation with a causal LM, resumable through the knowledge store.

:class:`KnowledgeGenerator` turns item fields into prompts (chat template where the tokenizer
has one), generates left-padded batches and decodes the answers; :func:`generate_knowledge`
fills a :class:`~recbole_llm.knowledge.store.KnowledgeCache` with a record for every missing
item, batch by batch, for this rank's share of the items (``internal id % world_size == rank``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from recbole_llm.cache_io import cache_lock
from recbole_llm.knowledge.identity import item_prompt_hash
from recbole_llm.knowledge.prompts import KNOWLEDGE_PROMPT, build_prompt, parse_knowledge
from recbole_llm.knowledge.store import KnowledgeCache


class KnowledgeGenerator:
    """Batched knowledge generation with a (possibly LoRA-wrapped) causal LM.

    Prompts are wrapped in the tokenizer's chat template when ``use_chat_template`` and the
    tokenizer has one (the paper uses Llama-2-chat; the embedded SmolLM2 is an instruct model),
    and left-padded (the shared tokenizer pads left). Greedy decoding by default.
    """

    def __init__(self, model, tokenizer, template: str = KNOWLEDGE_PROMPT, use_chat_template: bool = True,
                 max_new_tokens: int = 96, batch_size: int = 8, max_prompt_tokens: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.template = template
        self.use_chat_template = bool(use_chat_template) and getattr(tokenizer, "chat_template", None) is not None
        self.max_new_tokens, self.batch_size, self.max_prompt_tokens = int(max_new_tokens), int(batch_size), max_prompt_tokens

    def prompt(self, fields: dict[str, str]) -> str:
        text = build_prompt(fields, self.template)
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    def tokenize(self, prompts: Sequence[str]):
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                               max_length=self.max_prompt_tokens, add_special_tokens=not self.use_chat_template)
        return batch.to(device)

    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[str], do_sample: bool = False, temperature: float = 1.0,
                     top_p: float = 1.0, max_new_tokens: int | None = None):
        """``(prompt_ids, prompt_mask, new_ids, new_mask)`` for one batch of prompt texts.

        ``new_mask`` covers the generated tokens up to and including the first EOS."""
        batch = self.tokenize(prompts)
        kwargs = {"do_sample": bool(do_sample), "max_new_tokens": int(max_new_tokens or self.max_new_tokens),
                  "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        finally:
            self.model.train(was_training)
        prompt_len = batch["input_ids"].size(1)
        new_ids = out[:, prompt_len:]
        is_eos = new_ids == self.tokenizer.eos_token_id
        before_eos = (is_eos.cumsum(dim=1) - is_eos.long()) == 0  # up to and including the first EOS
        return batch["input_ids"], batch["attention_mask"], new_ids, before_eos.long()

    def decode(self, new_ids, new_mask) -> list[str]:
        return [self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True) for ids, mask in zip(new_ids, new_mask)]

    def generate(self, fields: Sequence[dict], **kwargs) -> list[str]:
        """Raw answers for the items' fields (one batch; see :meth:`generate_ids`)."""
        _, _, new_ids, new_mask = self.generate_ids([self.prompt(f) for f in fields], **kwargs)
        return self.decode(new_ids, new_mask)


def generate_knowledge(generator: KnowledgeGenerator, items: Sequence[tuple[int, str, dict]], cache: KnowledgeCache,
                       rank: int = 0, world_size: int = 1, show_progress: bool = True, logger=None) -> dict[str, dict]:
    """Make sure ``cache`` holds a record for every ``(internal id, token, fields)`` item.

    Resumes from the cache's progress files, generates this rank's missing items
    (``internal id % world_size == rank``) batch by batch, appending each batch's records,
    and writes the final file once all items are present. Items without fields get an
    empty record without asking the LLM. Returns token -> record (all ranks' so far).
    """
    logger = logger or logging.getLogger("recbole_llm")
    records = cache.load()
    prompt_hash = {token: item_prompt_hash(fields, generator.template) for _, token, fields in items}
    done = {t for t, r in records.items() if r.get("prompt_hash") == prompt_hash.get(t)}
    todo = [(i, t, f) for i, t, f in items if t not in done and i % world_size == rank]
    empty = [(i, t, f) for i, t, f in todo if not f]
    todo = [(i, t, f) for i, t, f in todo if f]
    if done:
        logger.info(f"knowledge cache {cache.final.name}: {len(done & set(prompt_hash))} of {len(items)} items done")
    fallbacks, start = 0, time.perf_counter()
    if empty or todo:
        with cache.open_part(rank, world_size) as handle:
            if empty:
                logger.warning(f"{len(empty)} item(s) have no text fields: they get empty knowledge "
                               f"(tokens {[t for _, t, _ in empty[:5]]})")
                new = [{"token": t, "description": "", "summarization": "", "raw": "", "fallback": False,
                        "empty": True, "prompt_hash": prompt_hash[t]} for _, t, _ in empty]
                cache.append(handle, new)
                records.update({r["token"]: r for r in new})
            batches = [todo[i:i + generator.batch_size] for i in range(0, len(todo), generator.batch_size)]
            for batch in _progress(batches, show_progress, f"knowledge ({len(todo)} items)"):
                answers = generator.generate([f for _, _, f in batch])
                new = []
                for (_, token, _), answer in zip(batch, answers):
                    parsed, clean = parse_knowledge(answer)
                    fallbacks += not clean
                    new.append({"token": token, **parsed, "raw": answer, "fallback": not clean, "empty": False,
                                "prompt_hash": prompt_hash[token]})
                cache.append(handle, new)
                records.update({r["token"]: r for r in new})
    if todo:
        seconds = time.perf_counter() - start
        logger.info(f"generated knowledge for {len(todo)} items in {seconds:.1f} s ({len(todo) / seconds:.2f} items/s, "
                    f"rank {rank} of {world_size}); {fallbacks} answer(s) were not clean JSON (fallback text used)")
    if world_size > 1:  # the other ranks' shards as they are now, under a lock: the last rank to finish merges
        with cache_lock(cache.final, logger):
            records = {**records, **cache.load()}
            _finalize_if_complete(cache, records, prompt_hash, logger)
    else:
        _finalize_if_complete(cache, records, prompt_hash, logger)
    return records


def _finalize_if_complete(cache: KnowledgeCache, records: dict, prompt_hash: dict, logger) -> None:
    """Merge into the final file (temp file + rename) once every item has a current record."""
    complete = all(records.get(t, {}).get("prompt_hash") == h for t, h in prompt_hash.items())
    if complete and (cache.parts() or cache.corrupt_lines or not cache.final.is_file()):
        stats = {"fallbacks": sum(bool(r.get("fallback")) for r in records.values()),
                 "empty": sum(bool(r.get("empty")) for r in records.values())}
        cache.finalize(records, stats)
        logger.info(f"knowledge cache written: {cache.final} ({len(records)} items, {stats['fallbacks']} fallbacks)")


def _progress(iterable, show, desc):
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="batch")
