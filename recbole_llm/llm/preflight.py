"""Pre-flight checks of an LLM setting, before anything is loaded or trained.

:func:`check_causal_lm` reads the ``config.json`` of the model an ``llm_path`` names (no
weights) and says in one line what is wrong: a missing folder, a PEFT adapter instead of a
model, a hub name that cannot be fetched, or a model that is not a causal language model.
"""
import os

from recbole_llm.errors import InputError, MissingInputError
from recbole_llm.llm.backbone import resolve_llm_path
from recbole_llm.llm.embedded import EMBEDDED_LLM, EMBEDDED_LLM_ALIASES, embedded_gguf_source


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
