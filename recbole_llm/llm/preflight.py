"""Pre-flight checks of the LLM settings, before anything is loaded or trained.

:func:`check_llm_settings` runs them all (every entry point calls it before stage 1).
:func:`check_causal_lm` reads the ``config.json`` of the model an ``llm_path`` names (no
weights) and says in one line what is wrong: a missing folder, a PEFT adapter instead of a
model, a hub name that cannot be fetched, or a model that is not a causal language model;
:func:`check_adapter` checks an adapter folder, :func:`note_4bit_fallback` says once that
``load_in_4bit`` falls back to LoRA in full precision where 4-bit cannot run, and
:func:`check_int8_scoring` that ``ranker_int8`` has a float32 LLM on a CPU to quantise.
"""
import json
import os
from pathlib import Path

import torch

from recbole_llm.errors import InputError, MissingInputError, warn_once
from recbole_llm.llm import backbone
from recbole_llm.llm.backbone import resolve_llm_path
from recbole_llm.llm.embedded import EMBEDDED_LLM, EMBEDDED_LLM_ALIASES, embedded_gguf_source
from recbole_llm.llm.precision import resolve_precision


def check_causal_lm(llm_path, setting="llm_path"):
    """Pre-flight check of the ``llm_path`` setting, reading the model's ``config.json`` only
    (no weights): it exists and its architecture is a causal language model. The embedded
    default only needs its package. Raises :class:`InputError` naming ``setting`` and the fix."""
    if llm_path in EMBEDDED_LLM_ALIASES:
        try:
            embedded_gguf_source()
        except ImportError as error:
            raise MissingInputError(f"{setting} is unset, so the embedded {EMBEDDED_LLM} is used, but: {error}") from None
        return
    model_path = resolve_llm_path(llm_path)  # a missing local path: MissingInputError
    local = os.path.isdir(model_path)
    if local and not os.path.isfile(os.path.join(model_path, "config.json")):
        what = ("a PEFT adapter (adapter_config.json), not a model: set llm_path to its base model and the "
                "adapter setting (ranker_adapter / llm_adapter) to this folder"
                if os.path.isfile(os.path.join(model_path, "adapter_config.json"))
                else "no config.json: set it to a Hugging Face model directory (config.json + weights)")
        raise MissingInputError(f"{setting}={llm_path!r}: the folder {os.path.abspath(model_path)!r} holds {what}.")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as error:
        if local:
            raise InputError(f"{setting}={llm_path!r}: its config.json cannot be read by transformers ({error}).") from None
        raise MissingInputError(
            f"{setting}={llm_path!r} is not a local directory and its config could not be fetched as a Hugging Face "
            f"hub name ({type(error).__name__}); check the name, or whether this machine is offline (HF_HUB_OFFLINE "
            f"is {os.environ.get('HF_HUB_OFFLINE', 'unset')}). Set llm_path to a local model directory, or leave "
            f"it unset to use the embedded {EMBEDDED_LLM}."
        ) from None
    if not is_causal_lm_config(config):
        kind = ", ".join(config.architectures or []) or config.model_type
        raise InputError(
            f"{setting}={llm_path!r} is a {kind} model, not a causal language model (an architecture "
            f"*ForCausalLM, e.g. LlamaForCausalLM). Set {setting} to a decoder LLM such as a Llama, Qwen or "
            f"SmolLM checkpoint, or leave it unset to use the embedded {EMBEDDED_LLM}."
        )
    return config


def is_causal_lm_config(config) -> bool:
    """A transformers config whose architecture AutoModelForCausalLM loads as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.architectures:
        return any(name.endswith("ForCausalLM") or name in causal for name in config.architectures)
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def check_llm_settings(config) -> None:
    """The LLM settings of an LLM model, before anything is built: ``llm_path`` holds a causal
    LM, ``ranker_adapter`` / ``llm_adapter`` are PEFT folders, ``load_in_4bit`` without CUDA
    says once that it uses LoRA in full precision, ``ranker_int8`` has a float32 LLM on a CPU (the
    settings' allowed values are checked by :func:`recbole_llm.setting_rules.check_settings` in ``load_config``)."""
    settings = config.final_config_dict
    if "llm_path" in settings:
        check_causal_lm(settings["llm_path"], "llm_path")
    for key in ("ranker_adapter", "llm_adapter"):
        if settings.get(key):
            check_adapter(settings[key], key)
    if settings.get("load_in_4bit"):
        note_4bit_fallback(config)
    if settings.get("ranker_int8"):
        check_int8_scoring(config)


def check_int8_scoring(config) -> None:
    """``ranker_int8`` quantises a float32 LLM for a CPU (:func:`~recbole_llm.llm.precision.int8_copy`): with
    another compute dtype or on a GPU, one line before stage 1."""
    precision = resolve_precision(config["llm_dtype"] or "auto", str(config["device"]))
    if precision.device_type != "cpu" or precision.autocast is not None or precision.weights != torch.float32:
        raise InputError(f"ranker_int8: True ranks with an int8 copy of a float32 LLM on a CPU, but this run's LLM "
                         f"computes in {precision.describe()} on {precision.device_type}: set llm_dtype: float32 "
                         "with it on a CPU (int8 is for CPUs without bf16 units), or ranker_int8: False.")


def check_adapter(path, key: str) -> None:
    """A PEFT adapter folder: ``adapter_config.json`` (written by ``save_pretrained``)."""
    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        raise MissingInputError(f"{key}={str(path)!r} is not a folder ({'a file' if folder.exists() else 'nothing'} "
                                "there); set it to a PEFT adapter folder (adapter_config.json + weights, as "
                                "save_pretrained writes it), or unset it to train one.")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        hint = " (it holds a model's config.json: that is an llm_path, not an adapter)" \
            if (folder / "config.json").is_file() else ""
        raise MissingInputError(f"{key}={str(path)!r} has no adapter_config.json, so it is not a PEFT adapter "
                                f"folder{hint}. Point {key} at the folder save_pretrained wrote, or unset it.")
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{config_file} is not valid JSON ({error}); save the adapter again.") from None


def note_4bit_fallback(config) -> None:
    """``load_in_4bit`` where 4-bit cannot run: one line now (before stage 1), and the setting
    is turned off so the backbone loader does not say it again."""
    device = str(config["device"])
    if not backbone.four_bit_available(device):
        warn_once(backbone.FALLBACK_4BIT_MESSAGE.format(device=config["device"].type))
        config["load_in_4bit"] = False
