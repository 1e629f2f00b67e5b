"""Model name -> model class and trainer class.

Our models are listed explicitly (imported lazily, so a user of LRURec never imports
transformers); any other name falls back to RecBole's own models, so baselines run
from the same tool with the same defaults.

Like RecBole's ``get_model`` and ``get_trainer`` (in ``recbole.utils``, below its models), this
lookup sits below the models and trainers: it names them as ``"module:Class"`` strings and
imports them when asked, never at import time, so a model (stage 1) can use it directly.
"""
from __future__ import annotations

import importlib
import inspect

from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer
from recbole_llm.errors import InputError

#: name -> "module:Class" of the model and (optionally) of its own trainer.
MODELS = {
    "LRURec": ("recbole_llm.model.lrurec:LRURec", None),
    "LlamaRec": ("recbole_llm.model.llamarec:LlamaRec", "recbole_llm.trainer.two_stage:LlamaRecTrainer"),
    "E4SRec": ("recbole_llm.model.e4srec:E4SRec", "recbole_llm.trainer.llm_trainer:LLMTrainer"),
    "Laser": ("recbole_llm.model.laser:Laser", "recbole_llm.trainer.laser:LaserTrainer"),
    "SeRALM": ("recbole_llm.model.seralm:SeRALM", "recbole_llm.trainer.alignment:SeRALMTrainer"),
}

#: What wraps every trainer :func:`get_trainer` returns, innermost first ("module:function"):
#: resuming an interrupted run, then metrics by slice.
TRAINER_WRAPPERS = ("recbole_llm.trainer.resume:resumable", "recbole_llm.trainer.slices:sliced")

#: model name -> "module:Class" of the dataset RecBole's create_dataset must use for it.
DATASETS = {
    "LRURec": "recbole_llm.data.sequence_windows:SequenceWindowDataset",
    "E4SRec": "recbole_llm.data.sequence_windows:LastTargetsDataset",
}


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _shipped(name: str) -> bool:
    module = MODELS[name][0].split(":")[0]
    return importlib.util.find_spec(module) is not None


def our_models() -> list[str]:
    """Names of the recbole-llm models that this installation ships."""
    return [name for name in MODELS if _shipped(name)]


def recbole_sequential_models() -> list[str]:
    from recbole.model import sequential_recommender
    from recbole.model.abstract_recommender import SequentialRecommender

    return sorted(
        name
        for name, obj in vars(sequential_recommender).items()
        if inspect.isclass(obj) and issubclass(obj, SequentialRecommender) and obj is not SequentialRecommender
    )


def get_model(name):
    """The model class for ``name`` (ours first, then RecBole's); a class is returned as is."""
    if not isinstance(name, str):
        return name
    if name in MODELS and _shipped(name):
        return _load(MODELS[name][0])
    try:
        return recbole_get_model(name)
    except (ValueError, ModuleNotFoundError) as err:
        # RecBole's lookup imports its exlib package (lightgbm, xgboost) for ANY unknown name.
        if isinstance(err, ModuleNotFoundError) and name.lower() in ("lightgbm", "xgboost"):
            raise
        raise InputError(
            f"Unknown model '{name}'. recbole-llm models: {', '.join(our_models())}. "
            f"RecBole sequential models: {', '.join(recbole_sequential_models())} "
            "(any other RecBole model name works too; names are case-sensitive)."
        ) from None


def get_trainer(model_class):
    """Our trainer for our models that need one, else RecBole's choice for the model;
    either way able to resume an interrupted run (:mod:`recbole_llm.trainer.resume`) and to
    report metrics by slice (:mod:`recbole_llm.trainer.slices`)."""
    name = model_class.__name__
    if name in MODELS and MODELS[name][1] is not None:
        trainer = _load(MODELS[name][1])
    else:
        trainer = recbole_get_trainer(model_class.type, name)
    for wrapper in TRAINER_WRAPPERS:
        trainer = _load(wrapper)(trainer)
    return trainer


def register_datasets() -> None:
    """Expose our datasets as ``recbole.data.dataset.<Model>Dataset``, where RecBole's
    ``create_dataset`` looks for a model's own dataset class (also from RecBole's API)."""
    import recbole.data.dataset as recbole_datasets

    for model_name, target in DATASETS.items():
        setattr(recbole_datasets, f"{model_name}Dataset", _load(target))
