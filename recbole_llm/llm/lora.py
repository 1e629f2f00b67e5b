"""LoRA on an LLM of any layout, and the layout's decoder layers.

:func:`apply_lora` wraps a causal LM in a PEFT LoRA model with a readable error for wrong
target names (falling back to PEFT's own targets, :func:`peft_target_modules`, when none of the
names is the LLM's); :func:`decoder_layers` finds any layout's list of decoder layers
(``layers`` in Llama, ``h`` in GPT-2) and :func:`keep_first_layers` cuts it (``llm_layers``).
"""
import logging

from torch import nn

from recbole_llm.errors import InputError


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
