"""Stage 1 of the LLM models: a pretrained, frozen ID-based sequential model.

LlamaRec's retriever, E4SRec's and Laser's ID model and SeRALM's knowledge-free
reference recommender are all "a RecBole sequential model trained on the same split".
:func:`pretrained_id_model` gives one: loaded from a user's checkpoint (a RecBole
``.pth`` file), from our on-disk cache, or trained with the model's own RecBole
trainer and then cached. The cache key holds every input that shapes the result
(model, dataset files, the model's config), so a changed input retrains.

Building a model by name uses the config building and the lookup by name
(:mod:`recbole_llm.config`, :mod:`recbole_llm.registry`), which sit below the models as
RecBole's ``Config`` and ``get_model`` do.
"""
from __future__ import annotations

import os
from logging import getLogger
from pathlib import Path

import torch
from recbole.data import create_dataset, data_preparation

from recbole_llm import distributed
from recbole_llm.cache_io import atomic_save, cache_lock, config_key, guarded_load
from recbole_llm.compat import recbole_argv
from recbole_llm.config import load_config, properties_dir
from recbole_llm.data.datasets import drop_exact_duplicates
from recbole_llm.errors import InputError, MissingInputError
from recbole_llm.registry import get_model, get_trainer
from recbole_llm.yaml_io import read_yaml


#: Settings copied from the LLM model's config so stage 1 sees the same data and split.
SHARED_KEYS = (
    "seed", "reproducibility", "use_gpu", "gpu_id", "checkpoint_dir", "show_progress", "state",
    "USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "RATING_FIELD", "load_col", "unload_col", "unused_col",
    "rm_dup_inter", "val_interval", "filter_inter_by_user_or_item", "user_inter_num_interval",
    "item_inter_num_interval", "benchmark_filename", "eval_args", "repeatable", "metrics", "topk",
    "valid_metric", "valid_metric_bigger", "eval_batch_size", "metric_decimal_place",
    "field_separator", "seq_separator", "encoding", "drop_exact_duplicates",
)
#: Training settings logged for stage 1 beside the model's own (see :func:`settings_report`).
REPORTED_KEYS = ("epochs", "train_batch_size", "learner", "learning_rate", "stopping_step", "MAX_ITEM_LIST_LENGTH",
                 "loss_type")


def id_model_config(config, model_name: str, overrides: dict | None = None):
    """The config of ``model_name`` on the same dataset and split as ``config``.

    RecBole's ``Config`` also reads ``--key=value`` from the command line, above any
    ``config_dict``; the main model's command line (``--epochs=1`` for the LLM) must not
    reach stage 1, which takes its settings from ``overrides`` alone.
    """
    shared = {key: config[key] for key in SHARED_KEYS if key in config}
    shared["data_path"] = str(Path(config["data_path"]).parent)
    with recbole_argv():
        return load_config(model_name, config["dataset"], config_dict={**shared, **(overrides or {})})


def load_state(model, checkpoint: str | os.PathLike, setting: str, saved: dict | None = None) -> None:
    """Load a RecBole checkpoint (or a bare state dict; ``saved`` when already read) into
    ``model`` with a clear error when it is unreadable or was made for another dataset or model."""
    path = Path(checkpoint)
    if saved is None:
        if not path.is_file():
            raise MissingInputError(f"{setting}={checkpoint!r} does not exist (expected a RecBole .pth checkpoint).")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)  # RecBole pickles its Config in it
        except Exception as error:  # noqa: BLE001 - truncated, corrupt or not a torch file
            raise InputError(f"{setting}={checkpoint!r} cannot be read ({type(error).__name__}: {str(error)[:80]}); "
                             "point it at a complete RecBole .pth checkpoint, or drop it to train one.") from None
    state = saved.get("state_dict", saved)
    own = model.state_dict()
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}
    if mismatched:
        key, (theirs, ours) = next(iter(mismatched.items()))
        raise InputError(
            f"{setting}={checkpoint!r} does not fit this dataset: '{key}' has shape {theirs} in the checkpoint "
            f"but {ours} here (item count {model.n_items}). It was trained on another dataset or filtering; "
            f"retrain it on this dataset or drop {setting} to train one."
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{setting}={checkpoint!r} is not a {type(model).__name__} checkpoint "
            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})."
        )


def pretrained_id_model(config, dataset, model_name: str, checkpoint=None, overrides=None, setting="id_model_checkpoint"):
    """A frozen, pretrained ``model_name`` for ``dataset`` (see the module docstring).

    In a distributed run rank 0 alone loads or trains (and caches) it and broadcasts its
    weights: the ranks never race on the cache file, and a rank on another node needs no
    copy of the cache or of ``checkpoint``. The other ranks wait for it within the process
    group's timeout (30 minutes by default)."""
    if not distributed.is_distributed(config):
        return _load_or_train(config, dataset, model_name, checkpoint, overrides, setting)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        try:
            model = _load_or_train(config, dataset, model_name, checkpoint, overrides, setting)
        except Exception as error:
            dist.broadcast_object_list([f"{type(error).__name__}: {error}"], src=0)
            raise
        dist.broadcast_object_list([{k: v.cpu() for k, v in model.state_dict().items()}], src=0)
        return model
    payload = [None]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise RuntimeError(f"stage 1 ({model_name}) failed on rank 0: {payload[0]}")
    model = get_model(model_name)(id_model_config(config, model_name, overrides), dataset)
    model = model.to(config["device"])
    model.load_state_dict(payload[0])
    return _frozen(model)


def _load_or_train(config, dataset, model_name, checkpoint, overrides, setting):
    logger = getLogger()
    id_config = id_model_config(config, model_name, overrides)
    model_class = get_model(model_name)
    model = model_class(id_config, dataset).to(config["device"])
    logger.info(settings_report(config, id_config, model_name, overrides, setting))
    if checkpoint:
        load_state(model, checkpoint, setting)
        logger.info(f"stage 1: {model_name} loaded from {checkpoint}")
    else:
        cache = Path(config["checkpoint_dir"]) / "stage1" / f"{model_name}-{config['dataset']}-{config_key(id_config)}.pth"
        with cache_lock(cache, logger):  # a second run with the same stage 1 waits for this one, then reuses it
            saved = guarded_load(cache, what="stage-1 cache", logger=logger)
            if saved is not None:
                load_state(model, cache, "stage-1 cache", saved=saved)
                logger.info(f"stage 1: {model_name} reused from {cache}")
            else:
                logger.info(f"stage 1: training {model_name} on {config['dataset']} (cached as {cache})")
                train_id_model(id_config, model, dataset.item_num)
                atomic_save({"state_dict": model.state_dict(), "model": model_name}, cache)
    return _frozen(model)


def _frozen(model):
    """``model`` in evaluation mode with no parameter that trains, and no gradient left from its own
    training in this process (the clipping of a later stage would count it)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
        param.grad = None
    return model


def train_id_model(id_config, model, expected_items: int) -> None:
    """Train ``model`` with its own RecBole pipeline and keep its best-on-validation weights."""
    id_dataset = create_dataset(id_config)
    drop_exact_duplicates(id_config, id_dataset)  # as the main model's dataset
    if id_dataset.item_num != expected_items:
        raise InputError(
            f"stage 1 sees {id_dataset.item_num} items but the main model {expected_items}: "
            "their data settings differ (load_col / filtering)."
        )
    train, valid, _ = data_preparation(id_config, id_dataset)
    trainer = get_trainer(type(model))(id_config, model)
    trainer.fit(train, valid, saved=True, show_progress=id_config["show_progress"])
    best = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=False)
    model.load_state_dict(best["state_dict"])


def settings_report(config, id_config, model_name: str, overrides: dict | None, setting: str) -> str:
    """What stage 1 runs with: the stage-1 model's own settings and the training settings,
    each with where its value came from (the parent model's ``*_config`` overrides, as its
    property file or the user set them; the parent's data and split settings; the stage-1
    model's property file, ours or RecBole's; the overall defaults)."""
    import recbole

    recbole_properties = Path(recbole.__file__).parent / "properties"

    def read(path):
        return (read_yaml(path) or {}) if path.is_file() else {}

    parent = config["model"]
    override_setting = setting.replace("_checkpoint", "_config")
    parent_defaults = read(properties_dir() / "model" / f"{parent}.yaml")
    own = [(f"recbole-llm's {model_name}.yaml", read(properties_dir() / "model" / f"{model_name}.yaml")),
           (f"RecBole's {model_name}.yaml", read(recbole_properties / "model" / f"{model_name}.yaml")),
           ("recbole-llm's overall.yaml", read(properties_dir() / "overall.yaml"))]
    overrides = dict(overrides or {})

    def source(key):
        if key in overrides:
            for name in (override_setting, "base_model_config"):
                given = config[name] if name in config and isinstance(config[name], dict) else {}
                if key in given and given[key] == overrides[key]:
                    by_file = (parent_defaults.get(name) or {}).get(key) == given[key]
                    return f"{parent}.yaml's {name}" if by_file else f"your {name}"
            return f"set by {parent} (follows its own setting)"
        if key in SHARED_KEYS:
            return f"shared with {parent}"
        return next((name for name, values in own if key in values), "RecBole's defaults")

    keys = list(dict.fromkeys([*own[0][1], *own[1][1], *REPORTED_KEYS, *overrides]))
    lines = [f"{key}={id_config[key]!r} ({source(key)})" for key in keys if key in id_config]
    return f"stage 1: {model_name} for {parent} ({setting}) with\n  " + "\n  ".join(lines)
