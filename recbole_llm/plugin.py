"""RecBole's own entry points run our models by name once ``recbole_llm`` is imported.

RecBole finds a model with ``recbole.utils.get_model`` (its own modules only) and a trainer
with ``get_trainer``; ``run_recbole``, ``run_recboles``, ``objective_function`` (what
RecBole's ``HyperTuning`` calls) and ``Config`` hold references to both. :func:`install`
points every such reference at a lookup that knows our models first and falls back to
RecBole's own functions, so RecBole's scripts (``run_recbole.py``,
``run_recbole_group.py --model_list=SASRec,LlamaRec``, ``run_hyper.py``) and a user's own
Python work unchanged. For our models RecBole's ``Config`` also reads our property files
(overall, dataset, model) above RecBole's defaults and below the user's files and dict, as
our command line layers them; ``get_flops`` (a deep copy of the model, ruinous for an LLM)
is skipped for them. RecBole's own models keep their lookups and files; their trainers report
metrics by slice when a config sets ``eval_slices: True`` (:mod:`recbole_llm.trainer.slices`).
"""
from __future__ import annotations

import sys
from logging import getLogger

from recbole_llm import registry

_ORIGINAL: dict[str, object] = {}


def _is_ours(name) -> bool:
    name = name if isinstance(name, str) else getattr(name, "__name__", "")
    return name in registry.MODELS


def get_model(model_name):
    """RecBole's ``get_model``, finding our models too."""
    if _is_ours(model_name):
        return registry.get_model(model_name)
    return _ORIGINAL["get_model"](model_name)


def get_trainer(model_type, model_name):
    """RecBole's ``get_trainer``, giving our models their own trainer; RecBole's trainers get
    metrics by slice (inert unless ``eval_slices`` is set: :mod:`recbole_llm.trainer.slices`)."""
    if _is_ours(model_name):
        return registry.get_trainer(registry.get_model(model_name))
    from recbole_llm.trainer.slices import sliced

    return sliced(_ORIGINAL["get_trainer"](model_type, model_name))


def get_flops(model, *args, **kwargs):
    """RecBole's ``get_flops``, skipped for our models (it deep-copies the whole model)."""
    if _is_ours(type(model).__name__):
        getLogger().info(f"FLOPs not counted for {type(model).__name__} (a deep copy of an LLM model)")
        return 0
    return _ORIGINAL["get_flops"](model, *args, **kwargs)


def _load_internal_config_dict(self, model, model_class, dataset):
    """RecBole's defaults, then ours for our models (below the user's files and dict)."""
    _ORIGINAL["_load_internal_config_dict"](self, model, model_class, dataset)
    if _is_ours(model):
        from recbole_llm.config import property_files

        for path in property_files(model, dataset):
            self._update_internal_config_dict(path)


def install() -> None:
    """Patch RecBole's lookups (idempotent); see the module docstring."""
    if _ORIGINAL:
        return
    import recbole.quick_start  # noqa: F401 - bind its references before they are replaced
    import recbole.utils
    from recbole.config import Config

    for name in ("get_model", "get_trainer", "get_flops"):
        original = getattr(recbole.utils, name)
        _ORIGINAL[name] = original
        for module in list(sys.modules.values()):
            if (getattr(module, "__name__", "").startswith("recbole.") or module is recbole.utils) \
                    and getattr(module, name, None) is original:
                setattr(module, name, globals()[name])
    _ORIGINAL["_load_internal_config_dict"] = Config._load_internal_config_dict
    Config._load_internal_config_dict = _load_internal_config_dict
