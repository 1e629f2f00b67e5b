"""What identifies a knowledge cache: hashes of the LLM, its adapter and each item's prompt.

The cache key (:func:`cache_key`) hashes the dataset name, the LLM's identity (the embedded
model's package version, or a local model's config and weight sizes, or a hub name; never an
absolute path, so a committed cache works on another machine), the adapter's fingerprint
(``None`` for no adapter or an identity LoRA, all ``lora_B == 0``), the prompt template, the
field mapping, the decoding settings and the precision the LLM generates in (its weights' and
autocast dtypes and 4-bit, as ``llm_dtype`` and ``load_in_4bit`` resolve on the machine: greedy
text in bfloat16 differs from float32's). Each record also holds a hash of its own prompt
(:func:`item_prompt_hash`), so an item whose fields changed is regenerated.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from recbole_llm.cache_io import content_key
from recbole_llm.errors import MissingInputError
from recbole_llm.knowledge.prompts import KNOWLEDGE_PROMPT, build_prompt

FORMAT_VERSION = 1
#: The precision every knowledge cache was generated in before the key named it (float32 on a CPU): left
#: out of the key while a run generates in it, so those caches (the committed ones) stay valid.
FLOAT32 = {"weights": "float32", "autocast": None, "load_in_4bit": False}


def llm_identity(llm_path) -> dict:
    """What identifies the LLM behind ``llm_path`` without loading it (no absolute paths)."""
    from recbole_llm.llm.embedded import EMBEDDED_LLM, EMBEDDED_LLM_ALIASES, embedded_gguf_source

    if llm_path in EMBEDDED_LLM_ALIASES:
        _, source = embedded_gguf_source()
        return {"llm": EMBEDDED_LLM, **source}
    path = Path(os.path.expanduser(os.fspath(llm_path)))
    if path.is_dir():
        config = path / "config.json"
        weights = sorted((f.name, f.stat().st_size) for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
        return {"llm": path.name, "config": content_key(config.read_bytes()) if config.is_file() else None, "weights": weights}
    return {"llm": str(llm_path)}


def adapter_fingerprint(model) -> str | None:
    """Hash of the LoRA weights in ``model``; None without LoRA or when every ``lora_B`` is zero
    (then the adapter is the identity and the knowledge is the un-aligned LLM's)."""
    if model is None:
        return None
    return _state_fingerprint({name: p.detach() for name, p in model.named_parameters() if "lora_" in name})


def adapter_dir_fingerprint(path) -> str | None:
    """:func:`adapter_fingerprint` of a saved PEFT adapter directory (None for an identity adapter)."""
    folder = Path(path)
    files = sorted(folder.glob("adapter_model.*")) if folder.is_dir() else []
    if not files:
        raise MissingInputError(f"llm_adapter={path!r} holds no PEFT adapter (adapter_model.safetensors/.bin)")
    from safetensors.torch import load_file

    state = load_file(str(files[0])) if files[0].suffix == ".safetensors" else torch.load(files[0], map_location="cpu")
    return _state_fingerprint(state)


def _state_fingerprint(state: dict) -> str | None:
    """Hash of LoRA tensors by their names as saved (PEFT's ``.default`` adapter name dropped)."""
    state = {name.replace(".default", ""): tensor for name, tensor in state.items()}
    if not state or all(not t.any() for name, t in state.items() if "lora_B" in name):
        return None
    return content_key(*(part for name in sorted(state) for part in (name, state[name].float())), length=16)


def cache_key(dataset_name: str, llm: dict, adapter: str | None, template: str, field_map: dict,
              use_chat_template: bool, decoding: dict, precision: dict) -> str:
    """The knowledge cache key (see the module docstring); ``precision``: see :data:`FLOAT32`."""
    parts = {
        "format": FORMAT_VERSION, "dataset": dataset_name, "llm": llm, "adapter": adapter, "template": template,
        "fields": field_map, "chat": bool(use_chat_template), "decoding": decoding,
    }
    if precision != FLOAT32:
        parts["precision"] = precision
    return content_key(parts, length=16)


def item_prompt_hash(fields: dict, template: str = KNOWLEDGE_PROMPT) -> str:
    """Hash of one item's prompt (before the chat frame, which the cache key covers)."""
    return content_key(build_prompt(fields, template), length=12) if fields else "empty"
