"""Checks of a run's settings, model names and dataset, run before anything trains.

Each check is one function. A problem the user can fix raises an
:class:`~recbole_llm.errors.InputError` whose message names the setting, file or model and
the fix (the command line prints it as one ``error: ...`` line); input that RecBole accepts
but that is probably a mistake gets one warning (:func:`~recbole_llm.errors.warn_once`).
:func:`recbole_llm.quick_start.load_config` runs the setting checks on every config it builds
(the allowed values of each setting: :mod:`recbole_llm.setting_rules`),
:func:`recbole_llm.quick_start.build` the dataset checks between RecBole's filtering and its
split. The checks of the atomic files themselves are in :mod:`recbole_llm.data.datasets`, those
of the LLM settings (before stage 1 of a two-stage model) in :mod:`recbole_llm.llm.preflight`.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import os
from pathlib import Path

import recbole
import yaml

from recbole_llm import registry
from recbole_llm.errors import InputError, MissingInputError, warn_once
from recbole_llm.yaml_io import read_yaml

RECBOLE_PROPERTIES = Path(recbole.__file__).parent / "properties"
_DDP = "a DDP launch setting: run_recbole's (and our CLI's) arguments, passed in the config dict"
_CONFIG_SETS = "set by RecBole's Config itself"
_TRANSFORM = "a data-augmentation field name RecBole's data transforms and BERT4Rec read, without a default"
_HYPER = "a flag of run_hyper (RecBole's and ours), read from the command line"
#: Settings that RecBole or our code reads but no property file sets, each with the reason; with
#: the property files' keys, every setting a run knows (:func:`known_settings`). A test
#: (tests/test_settings.py) fails when our code reads a setting that is neither.
INTERNAL_SETTINGS = {
    "model": "the --model argument", "dataset": "the --dataset argument",
    "config_files": "the --config_files argument (our CLI)",
    "device": f"{_CONFIG_SETS}, from use_gpu and gpu_id", "single_spec": f"{_CONFIG_SETS}: one process or DDP",
    "local_rank": f"{_CONFIG_SETS}: this DDP process's rank",
    "nproc": _DDP, "world_size": _DDP, "ip": _DDP, "port": _DDP, "offset": _DDP, "group_offset": _DDP,
    "encoding": "the atomic files' encoding, read by RecBole's Dataset with a fallback",
    "MODEL_TYPE": f"{_CONFIG_SETS}, from the model class", "MODEL_INPUT_TYPE": f"{_CONFIG_SETS}, from the model class",
    "eval_type": f"{_CONFIG_SETS}, from the model type",
    "valid_neg_sample_args": f"{_CONFIG_SETS}, from eval_args", "test_neg_sample_args": f"{_CONFIG_SETS}, from eval_args",
    "verbose": f"{_CONFIG_SETS}: False on DDP ranks other than 0",
    "params_file": _HYPER, "algo": _HYPER, "max_evals": _HYPER, "early_stop": _HYPER, "output_file": _HYPER,
    "CROP_ITEM_SEQ": _TRANSFORM, "CROP_ITEM_SEQ_LEN": _TRANSFORM, "INVERSE_ITEM_SEQ": _TRANSFORM,
    "MASK_INDEX": _TRANSFORM, "MASK_ITEM_SEQ": _TRANSFORM, "REORDER_ITEM_SEQ": _TRANSFORM,
    "NEG_ITEMS": _TRANSFORM, "POS_ITEMS": _TRANSFORM,
    "feature_num": "read by RecBole's KD_DAGFM without a default",
    "token_num_threshold": "read by RecBole's decision-tree datasets without a default",
}

#: Settings that were removed, with what took their place: one a user still gives stops the run.
RETIRED_SETTINGS = {
    "ratio_baseline": "SeRALM's alignment subtracts, per instance, the same recommender's p(y|x,s)/p(y|x) with the "
                      "item's current knowledge (no setting)",
}


# ------------------------------------------------------------------ model names
@functools.cache
def model_names() -> tuple:
    """Our models, then every RecBole model name (general, sequential, context-aware, knowledge)."""
    import importlib

    from recbole.model.abstract_recommender import AbstractRecommender

    names = list(registry.our_models())
    for package in ("sequential_recommender", "general_recommender", "context_aware_recommender",
                    "knowledge_aware_recommender"):
        module = importlib.import_module(f"recbole.model.{package}")
        names += sorted(name for name, obj in vars(module).items()
                        if inspect.isclass(obj) and issubclass(obj, AbstractRecommender) and name not in names)
    return tuple(names)


def check_model_name(name) -> None:
    """An unknown model name: the same name in other case, or close names, as "did you mean"."""
    if not isinstance(name, str) or name in registry.our_models():
        return
    try:
        registry.get_model(name)  # RecBole finds a model by its module name, in lower case
        return
    except (InputError, AttributeError):  # AttributeError: a known module, the name in other case
        pass
    same = [known for known in model_names() if known.lower() == name.lower()]
    lowered = {known.lower(): known for known in model_names()}
    close = same or [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.75)]
    hint = f": did you mean {' or '.join(close)}?" if close else "."
    raise InputError(
        f"Unknown model {name!r}{hint} Model names are case-sensitive. recbole-llm models: "
        f"{', '.join(registry.our_models())}; RecBole sequential models: "
        f"{', '.join(registry.recbole_sequential_models())} (or any other RecBole model)."
    )


# ------------------------------------------------------------------ config files and the command line
def check_config_files(files) -> None:
    """Each ``--config_files`` file exists and is a YAML mapping (RecBole would raise a
    bare FileNotFoundError or a YAML parser traceback)."""
    for file in files or []:
        path = Path(file)
        if not path.is_file():
            raise MissingInputError(f"config file {str(file)!r} does not exist"
                                    f"{' (it is a folder)' if path.is_dir() else ''}; check the path given "
                                    "with --config_files (several files are separated by spaces).")
        try:
            data = read_yaml(path)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise InputError(f"config file {str(file)!r} is not valid YAML{where}: {problem}. "
                             "Each line is 'key: value'.") from None
        except UnicodeDecodeError:
            raise InputError(f"config file {str(file)!r} is not UTF-8 text; RecBole reads it as UTF-8.") from None
        if data is not None and not isinstance(data, dict):
            raise InputError(f"config file {str(file)!r} holds a {type(data).__name__}, not 'key: value' lines.")


def check_command_line(tokens) -> None:
    """The arguments left after our flags must be RecBole's ``--key=value``: RecBole ignores
    ``--key value`` (with a space) and a value holding '=', and stops on a key given twice."""
    seen = {}
    for position, token in enumerate(tokens):
        if not token.startswith("--"):
            raise InputError(f"{token!r} on the command line is not a --key=value setting; RecBole would ignore it.")
        key, equals, value = token[2:].partition("=")
        if not equals:
            following = tokens[position + 1] if position + 1 < len(tokens) else ""
            given = following and not following.startswith("--")
            raise InputError(f"{token}{' ' + following if given else ''}: RecBole reads settings only as --key=value "
                             f"and would ignore this one. Write --{key}={following if given else 'VALUE'}.")
        if "=" in value:
            raise InputError(f"{token}: RecBole cannot read a command-line value that contains '='; put {key} "
                             "in a --config_files YAML file instead.")
        if key in seen and seen[key] != value:
            raise InputError(f"--{key} is given twice ({seen[key]!r} and {value!r}); keep one.")
        seen[key] = value


# ------------------------------------------------------------------ settings
def user_settings(config, config_file_list=None, config_dict=None) -> dict:
    """``{key: where the user set it}`` for the user's config files, dict and command line."""
    found = {}
    for file in config_file_list or []:
        found.update({key: f"in {file}" for key in (read_yaml(file) or {})})
    found.update({key: "in config_dict" for key in config_dict or {}})
    found.update({key: f"--{key}=..." for key in config.cmd_config_dict})
    return found


@functools.cache
def known_settings(our_properties: Path) -> frozenset:
    """Every setting a property file (RecBole's or ours) sets, or that RecBole or our code reads
    without a default (:data:`INTERNAL_SETTINGS`)."""
    keys = set(INTERNAL_SETTINGS)
    for folder in (RECBOLE_PROPERTIES, Path(our_properties)):
        for path in folder.rglob("*.yaml"):
            data = read_yaml(path)
            keys |= set(data) if isinstance(data, dict) else set()
    return frozenset(keys)


def check_retired_settings(user: dict) -> None:
    """A retired setting (:data:`RETIRED_SETTINGS`) would be read by nothing: stop, saying what replaced it."""
    for key, where in user.items():
        if key in RETIRED_SETTINGS:
            raise InputError(f"{key} ({where}) is retired: {RETIRED_SETTINGS[key]}. Remove it from your settings.")


def warn_unknown_settings(user: dict, known: frozenset) -> None:
    """A setting no property file knows is ignored by RecBole: warn, with the closest known name."""
    for key, where in user.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]}?" if close else "."
            warn_once(f"Setting {key!r} ({where}) is not a setting of RecBole or recbole-llm, so nothing reads it{hint}")


def check_valid_metric(config) -> None:
    """``valid_metric`` must be one RecBole computes (metric@k for ranking metrics), or
    RecBole fails with a KeyError after the first training epoch."""
    from recbole.evaluator.base_metric import TopkMetric
    from recbole.evaluator.register import metrics_dict

    metrics = config["metrics"] if isinstance(config["metrics"], list) else [config["metrics"]]
    topk = config["topk"] if isinstance(config["topk"], list) else [config["topk"]]
    computed = []
    for metric in metrics:
        metric_class = metrics_dict.get(str(metric).lower())
        if metric_class is not None and issubclass(metric_class, TopkMetric):
            computed += [f"{metric}@{k}" for k in topk]
        elif metric_class is not None:
            computed.append(str(metric))
    valid = config["valid_metric"]
    if not isinstance(valid, str) or valid.lower() not in {name.lower() for name in computed}:
        raise InputError(f"valid_metric={valid!r} is not among the metrics computed ({', '.join(computed)}: "
                         "metrics at each topk cut-off). Set valid_metric to one of them, or add its metric to "
                         "metrics and its cut-off to topk.")


def check_knowledge_source(config) -> None:
    """SeRALM's ``knowledge_source: fields`` uses no LLM, so it has no LLM to align or adapter to read."""
    settings = config.final_config_dict
    if settings.get("knowledge_source") != "fields":
        return
    if int(settings.get("alignment_iterations") or 0) > 0 or settings.get("llm_adapter"):
        raise InputError("knowledge_source=fields gives every item its own fields as knowledge, with no LLM to align "
                         "or adapter to read: set alignment_iterations: 0 and llm_adapter: ~ (or knowledge_source: "
                         "llm for the LLM's knowledge).")


def check_output_folders(config) -> None:
    """``checkpoint_dir`` and RecBole's ``./log`` and ``./log_tensorboard`` can be written."""
    folders = [(f"checkpoint_dir={config['checkpoint_dir']!r}", str(config["checkpoint_dir"] or "."),
                "Set checkpoint_dir to a folder you can write.")]
    for name in ("log", "log_tensorboard"):
        folders.append((f"RecBole's log folder ./{name} (in the working directory {os.getcwd()})", name,
                        "Run from a folder you can write."))
    for what, folder, fix in folders:
        problem = _why_unwritable(Path(folder))
        if problem:
            raise InputError(f"{what} cannot be written: {problem}. {fix}")


def _why_unwritable(path: Path) -> str | None:
    """Why ``path`` (a folder, made if absent) cannot be written, or None; creates nothing."""
    probe = path.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


# ------------------------------------------------------------------ the dataset after RecBole's filtering
def filtered_dataset(config, create):
    """``create(config)`` (RecBole's ``create_dataset``), with its "Some feat is empty" error
    (filtering left nothing) turned into one line naming the filter settings."""
    try:
        return create(config)
    except ValueError as error:
        if "Some feat is empty" not in str(error):
            raise
        filters = {key: config[key] for key in ("user_inter_num_interval", "item_inter_num_interval", "val_interval",
                                                 "rm_dup_inter") if config[key] is not None}
        raise InputError(f"RecBole's filtering of {config['dataset']} left no interactions (filters: {filters}). "
                         "Relax those settings (e.g. user_inter_num_interval: '[0,inf)').") from None


def check_split_sizes(config, dataset) -> None:
    """Leave-one-out on the filtered data: stop where a split would be empty (RecBole fails,
    the validation one only after the first epoch); warn with the count of users who get no
    validation or test target. A sequential model learns from each prefix, so a user with n
    interactions gives n - 1 rows: the last is the test target, the one before it the
    validation target (``valid_and_test``), the rest are training rows."""
    from recbole.data.dataset import SequentialDataset

    split = (config["eval_args"] or {}).get("split") or {}
    mode = split.get("LS")
    if mode is None:
        return
    held_out = 2 if mode == "valid_and_test" else 1
    offset = 1 if isinstance(dataset, SequentialDataset) else 0  # a user's first item is never a target
    need = {"training": 1 + offset}
    if mode in ("valid_and_test", "valid_only"):
        need["validation"] = held_out + 1 + offset
    if mode in ("valid_and_test", "test_only"):
        need["test"] = 2 + offset
    counts = [count for count in dataset.user_counter.values()]
    users, longest = len(counts), max(counts, default=0)
    for part, least in need.items():
        if not any(count >= least for count in counts):
            raise InputError(
                f"After RecBole's filtering {users} users remain with at most {longest} interaction(s) each; "
                f"leave-one-out ({mode}) gives a user a {part} target only from {least} interactions, so the {part} "
                "set would be empty. Give users more interactions (check user_inter_num_interval and "
                "item_inter_num_interval), or change eval_args split."
            )
    least = max(need.values())
    short = [count for count in counts if count < least]
    if short:
        details = ", ".join(f"{sum(c < n for c in short)} without a {part} target" for part, n in need.items()
                            if any(c < n for c in short))
        warn_once(f"{config['dataset']}: {len(short)} of {users} users have fewer than {least} interactions, too few "
                  f"for leave-one-out ({mode}) to give each a training, validation and test target ({details}). "
                  f"Set user_inter_num_interval: '[{least},inf)' to drop them.")


def check_candidates_fit(config, dataset) -> None:
    """LlamaRec's ``candidate_k`` must leave room among the dataset's items."""
    k = config.final_config_dict.get("candidate_k")
    if k is not None and k > dataset.item_num - 1:
        raise InputError(f"candidate_k={k} but {config['dataset']} has only {dataset.item_num - 1} items after "
                         f"filtering; set candidate_k below that.")
