"""Building a RecBole ``Config`` for any model: our property files under the user's, checked.

:func:`load_config` is RecBole's ``Config`` with our overall, dataset and model property files
first, then the user's files and dict, and every check of the settings, output folders and
dataset files (:mod:`recbole_llm.checks`) before anything is built (an LLM model's LLM settings
are checked by :func:`recbole_llm.quick_start.preflight`). Entry points and stage 1 (a model
building its ID model) use it alike: like RecBole's ``Config``, it sits below the models.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from recbole.config import Config

from recbole_llm import checks, compat, registry, setting_rules
from recbole_llm.data.datasets import resolve_data_path
from recbole_llm.errors import InputError, MissingInputError
from recbole_llm.yaml_io import read_yaml


def properties_dir() -> Path:
    """Our ``properties/`` folder: beside the package in a clone, under ``share/`` in a wheel."""
    candidates = [
        Path(__file__).resolve().parent.parent / "properties",
        Path(sys.prefix) / "share" / "recbole-llm" / "properties",
    ]
    for folder in candidates:
        if (folder / "overall.yaml").is_file():
            return folder
    raise MissingInputError(f"recbole-llm property files not found; looked in {[str(c) for c in candidates]}")


def property_files(model_name: str, dataset: str) -> list[str]:
    """overall.yaml, then dataset/<dataset>.yaml and model/<model>.yaml where they exist."""
    folder = properties_dir()
    files = [folder / "overall.yaml", folder / "dataset" / f"{dataset}.yaml", folder / "model" / f"{model_name}.yaml"]
    return [str(f) for f in files if f.is_file()]


def load_config(model, dataset, config_file_list=None, config_dict=None) -> Config:
    """A RecBole ``Config`` with our property files first, then the user's files and dict.

    ``model`` is a name (ours or RecBole's) or a model class. The checks of the settings (their
    kinds, and their allowed values: :mod:`recbole_llm.setting_rules`), the output folders and the
    dataset's files run here (:mod:`recbole_llm.checks`); those of an LLM model's LLM files
    (``llm_path``, adapters) run in :func:`recbole_llm.quick_start.preflight`.
    """
    compat.apply()
    checks.check_model_name(model)
    checks.check_config_files(config_file_list)
    model_class = registry.get_model(model)
    ours = property_files(model_class.__name__, dataset)
    try:
        config = Config(model=model_class, dataset=dataset, config_file_list=ours + list(config_file_list or []),
                        config_dict=config_dict)
    except (ValueError, NotImplementedError, SyntaxError) as error:  # RecBole's own setting checks
        raise InputError(f"RecBole refused the settings: {error}{_metric_hint(error)}") from None
    recbole_defaults = [RECBOLE_PROPERTIES / "overall.yaml", RECBOLE_PROPERTIES / "model" / f"{model_class.__name__}.yaml"]
    check_setting_types(config, [f for f in recbole_defaults if f.is_file()] + ours)
    setting_rules.check_settings(config.final_config_dict)
    checks.check_valid_metric(config)
    checks.check_knowledge_source(config)
    user = checks.user_settings(config, config_file_list, config_dict)
    checks.check_retired_settings(user)
    checks.warn_unknown_settings(user, checks.known_settings(properties_dir()))
    checks.check_output_folders(config)
    resolve_data_path(config, config.external_config_dict.get("data_path"))
    return config


def _metric_hint(error) -> str:
    """For RecBole's "There is no metric named 'X'": the closest metric names."""
    import difflib

    from recbole.evaluator.register import metrics_dict

    match = re.search(r"no metric named '([^']*)'", str(error))
    close = difflib.get_close_matches(match.group(1).lower(), list(metrics_dict), n=2) if match else []
    return f" (did you mean {' or '.join(close)}? Fix it in metrics)" if close else ""


RECBOLE_PROPERTIES = checks.RECBOLE_PROPERTIES


def check_setting_types(config, default_files) -> None:
    """Reject a setting whose final value has the wrong kind for the default given in
    ``default_files`` (RecBole's and our property files): a number, a bool or a mapping.
    A value from the command line that is not a Python literal stays a string, so
    ``--epochs=ten`` would otherwise fail deep inside the trainer. Unset (~) defaults and
    string/list settings are not checked (RecBole accepts several shapes for those)."""
    for path in default_files:
        defaults = read_yaml(path) or {}
        for key, default in defaults.items():
            value = config.final_config_dict.get(key)
            problem = None if value is None else kind_problem(default, value)
            if problem:
                raise InputError(
                    f"Setting {key}={value!r} ({type(value).__name__}) {problem}; its default in {path} is "
                    f"{default!r}. Fix it where you set it (config file, config_dict or --{key}=...)."
                )


def kind_problem(default, value) -> str | None:
    """Why ``value`` cannot stand where ``default`` does (a number, bool or mapping), or None."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be True or False"
    if isinstance(default, int):
        return None if is_number and float(value).is_integer() else "must be a whole number"
    if isinstance(default, float):
        return None if is_number else "must be a number"
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "must be a mapping (key: value)"
    return None
