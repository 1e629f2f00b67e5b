"""Item knowledge for a dataset, from a RecBole config (SeRALM, section 4.2 and Fig. 3).

:func:`dataset_knowledge` reads the cache that the config's LLM, adapter, prompt and decoding
settings address (:mod:`~recbole_llm.knowledge.identity`,
:mod:`~recbole_llm.knowledge.store`), and loads the LLM and generates
(:mod:`~recbole_llm.knowledge.generator`) only the items that are missing. The cache lies in
``knowledge_dir`` (default ``<data_path>/knowledge``, e.g. ``dataset/ml-100k/knowledge``);
commit it to skip generation.

Command line (writes the cache a user can commit; the default LLM is the embedded SmolLM2)::

    python -m recbole_llm.knowledge.generation --dataset ml-100k [--llm_path PATH] \\
        [--num_threads N] [--batch_size 8] [--max_new_tokens 96] [--rank 0 --world_size 1] \\
        [--config_files my.yaml] [--key=value ...]

``--rank/--world_size`` shard the items over processes or machines sharing the folder.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from recbole_llm.knowledge.generator import KnowledgeGenerator, generate_knowledge
from recbole_llm.knowledge.identity import adapter_dir_fingerprint, cache_key, item_prompt_hash, llm_identity
from recbole_llm.knowledge.prompts import default_knowledge_prompt, item_prompt_fields
from recbole_llm.knowledge.store import KnowledgeCache
from recbole_llm.llm.backbone import precision_identity


def knowledge_prompt(config) -> str:
    """The ``knowledge_prompt`` setting; its default ``~`` is the paper's Fig. 3 prompt about an ``item_noun``
    with the keys of ``knowledge_fields`` (on ml-100k: the paper's prompt about a movie)."""
    return config["knowledge_prompt"] or default_knowledge_prompt(config["item_noun"], list(config["knowledge_fields"]))


def knowledge_dir(config) -> Path:
    """``knowledge_dir`` setting, else ``<data_path>/knowledge`` (``dataset/ml-100k/knowledge``)."""
    return Path(config["knowledge_dir"] or Path(config["data_path"]) / "knowledge")


def decoding_settings(config) -> dict:
    return {"max_new_tokens": int(config["knowledge_max_new_tokens"]), "do_sample": False}


def knowledge_cache_for(config, dataset_name: str, adapter: str | None, logger=None) -> KnowledgeCache:
    """The cache that the config's LLM, ``adapter``, prompt, decoding and precision settings address."""
    template = knowledge_prompt(config)
    field_map = dict(config["knowledge_fields"])
    chat = bool(config["use_chat_template"])
    llm = llm_identity(config["llm_path"])
    decoding = decoding_settings(config)
    precision = precision_identity(config, inference_only=True)  # as load_generator loads it
    key = cache_key(dataset_name, llm, adapter, template, field_map, chat, decoding, precision)
    meta = {"dataset": dataset_name, "llm": llm, "adapter": adapter, "template": template, "fields": field_map,
            "chat_template": chat, "decoding": decoding, "precision": precision, "command": _command()}
    return KnowledgeCache(knowledge_dir(config), key, meta, logger)


def _command() -> str:
    """The command line that is running, as a user would type it."""
    if sys.argv and sys.argv[0].endswith(os.path.join("knowledge", "generation.py")):
        return " ".join(["python -m recbole_llm.knowledge.generation", *sys.argv[1:]])
    return " ".join(["python", *sys.argv])


def dataset_items(dataset, field_map: dict[str, str]) -> list[tuple[int, str, dict]]:
    """``(internal id, original token, prompt fields)`` for every real item of ``dataset``."""
    fields = item_prompt_fields(dataset, field_map)
    tokens = dataset.field2id_token[dataset.iid_field]
    return [(i, str(tokens[i]), fields[i]) for i in range(1, len(fields))]


def load_generator(config, adapter_path=None, logger=None) -> KnowledgeGenerator:
    """A generator around the config's LLM (+ the PEFT adapter folder ``adapter_path`` if given),
    loaded as :func:`knowledge_cache_for` keys it."""
    from recbole_llm.llm.backbone import load_llm

    model, tokenizer = load_llm(config, logger, adapter=adapter_path, inference_only=True)
    model.eval()
    return KnowledgeGenerator(
        model, tokenizer, template=knowledge_prompt(config),
        use_chat_template=config["use_chat_template"],
        max_new_tokens=decoding_settings(config)["max_new_tokens"],
        batch_size=int(config["knowledge_batch_size"]),
    )


def dataset_knowledge(config, dataset, adapter_path=None, rank=0, world_size=1,
                      logger=None, show_progress=None) -> tuple[list[dict], KnowledgeCache]:
    """Knowledge records per internal item id (row 0: ``{}``) for ``dataset``.

    Reads the cache; loads the config's LLM and generates only when items are missing.
    ``adapter_path`` (else the ``llm_adapter`` setting) names a saved PEFT adapter (e.g. the
    aligned LoRA): its fingerprint is part of the key and it is loaded with the LLM. The LLM is
    always loaded from the config and the adapter folder, so the key describes what generates
    (an LLM in memory, trained in another precision, would not match it). With
    ``world_size > 1`` only this rank's share is generated; rows of items no rank has done yet
    are ``{}``.
    """
    logger = logger or logging.getLogger("recbole_llm")
    field_map = dict(config["knowledge_fields"])
    items = dataset_items(dataset, field_map)
    adapter_path = adapter_path or config["llm_adapter"]
    adapter = adapter_dir_fingerprint(adapter_path) if adapter_path else None
    cache = knowledge_cache_for(config, dataset.dataset_name, adapter, logger)
    records = cache.load()
    template = knowledge_prompt(config)
    fresh = all(records.get(t, {}).get("prompt_hash") == item_prompt_hash(f, template) for _, t, f in items)
    if not (fresh and cache.final.is_file() and not cache.parts() and not cache.corrupt_lines):
        if show_progress is None:
            show_progress = bool(config["show_progress"])
        generator = load_generator(config, adapter_path, logger)
        records = generate_knowledge(generator, items, cache, rank, world_size, show_progress, logger)
    else:
        logger.info(f"knowledge: reusing {cache.final}")
    rows = [{}] + [records.get(token, {}) for _, token, _ in items]
    return rows, cache


if __name__ == "__main__":
    from recbole_llm.knowledge.cli import main

    main()
