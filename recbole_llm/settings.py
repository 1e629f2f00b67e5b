"""Where each setting of a run comes from: the property files' defaults and their comments.

A run's settings are layered as :func:`recbole_llm.config.load_config` builds them: RecBole's
own property files (overall, the model's, its quick-start files), then ours (overall.yaml,
dataset/<dataset>.yaml, model/<Model>.yaml), then the user's ``--config_files``, config dict
and ``--key=value`` flags. :func:`describe` prints a model's defaults with the comment of
each and its allowed values (:mod:`recbole_llm.setting_rules`; ``recbole-llm --settings MODEL``);
:func:`changed_settings` lists the settings a run changes, with their default and where the new
value was given (logged once at the start).
Colour codes are written only to a terminal (:func:`paint`).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from recbole_llm import checks, registry, setting_rules
from recbole_llm.config import properties_dir, property_files
from recbole_llm.yaml_io import read_yaml

RECBOLE_PROPERTIES = checks.RECBOLE_PROPERTIES
_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*)\s*:")
_SUB_KEY = re.compile(r"^\s+([A-Za-z_][\w-]*)\s*:")
_COLORS = {"green": 32, "yellow": 33, "blue": 34, "cyan": 36}


def paint(text: str, color: str, stream=None) -> str:
    """``text`` in ``color`` when ``stream`` (stdout by default) is a terminal, else unchanged."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return f"\033[{_COLORS[color]}m{text}\033[0m" if isatty is not None and isatty() else text


@dataclass
class Default:
    value: object
    comment: str
    file: Path


def _comment(line: str) -> str:
    """The ``# ...`` part of a YAML line (outside quotes), without the ``#``."""
    quote = None
    for position, char in enumerate(line):
        if char in "'\"" and quote in (None, char):
            quote = None if quote == char else char
        elif char == "#" and quote is None and (position == 0 or line[position - 1].isspace()):
            return line[position + 1:].strip()
    return ""


def yaml_comments(path: Path) -> dict[str, str]:
    """Top-level key -> its comment: the comment on its line, else those of its indented lines."""
    comments: dict[str, str] = {}
    key, own = None, False
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        top = _TOP_KEY.match(line)
        if top:
            key, comments[top.group(1)] = top.group(1), _comment(line)
            own = bool(comments[key])
        elif key and not own and line[:1].isspace() and _comment(line):
            sub = _SUB_KEY.match(line)
            part = f"{sub.group(1)}: {_comment(line)}" if sub else _comment(line)
            comments[key] = "; ".join(filter(None, [comments[key], part]))
        elif line.strip() and not line[:1].isspace() and not line.startswith("#"):
            key = None
    return comments


def _load(path: Path) -> dict:
    return read_yaml(path) or {}


def default_files(model_name: str, dataset: str) -> list[Path]:
    """The property files under a run's own, lowest first: RecBole's overall, model and
    (sequential models) quick-start file, then ours (overall, dataset, model)."""
    from recbole.utils import ModelType

    model_class = registry.get_model(model_name)
    files = [RECBOLE_PROPERTIES / "overall.yaml", RECBOLE_PROPERTIES / "model" / f"{model_class.__name__}.yaml"]
    if getattr(model_class, "type", None) == ModelType.SEQUENTIAL:
        files.append(RECBOLE_PROPERTIES / "quick_start_config" / "sequential.yaml")
    return [f for f in files if f.is_file()] + [Path(f) for f in property_files(model_class.__name__, dataset)]


def default_settings(model_name: str, dataset: str) -> dict[str, Default]:
    """Each setting's default for ``model_name`` on ``dataset``: the value of the highest file
    that sets it, with that file's comment (or a lower file's, when it has none)."""
    found: dict[str, Default] = {}
    for path in default_files(model_name, dataset):
        comments = yaml_comments(path)
        for key, value in _load(path).items():
            comment = comments.get(key) or (found[key].comment if key in found else "")
            found[key] = Default(value, comment, path)
    return found


def shown_path(path: Path) -> str:
    """``path`` relative to our properties folder's parent or to RecBole's package."""
    for base, label in ((properties_dir().parent, ""), (RECBOLE_PROPERTIES.parent, "recbole/")):
        try:
            return label + str(Path(path).relative_to(base))
        except ValueError:
            continue
    return str(path)


def _value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip() \
        if isinstance(value, (dict, list)) else ("~" if value is None else str(value))


def describe(model_name: str, dataset: str = "ml-100k", stream=None) -> str:
    """``model_name``'s settings on ``dataset``: per property file (the most specific first),
    each setting whose default it gives, with the value and the file's comment."""
    checks.check_model_name(model_name)
    settings = default_settings(model_name, dataset)
    files = list(reversed(default_files(model_name, dataset)))
    lines = [f"{paint(model_name, 'cyan', stream)} settings on {dataset}: defaults, most specific file first. "
             "Override any with --key=value or a --config_files YAML file."]
    for path in files:
        keys = [k for k in _load(path) if settings[k].file == path]  # in the file's order
        if not keys:
            continue
        lines += ["", paint(shown_path(path), "yellow", stream)]
        width = min(48, max(len(f"{k}: {_value(settings[k].value)}") for k in keys))
        for key in keys:
            text = f"{key}: {_value(settings[key].value)}"
            pad = " " * max(width - len(text), 0)
            rule = setting_rules.allowed(key)
            comment = " ".join(filter(None, [settings[key].comment, rule and f"[{rule}]"]))
            comment = f"  # {comment}" if comment else ""
            lines.append(f"  {paint(key, 'green', stream)}: {_value(settings[key].value)}{pad}{comment}")
    return "\n".join(lines)


def changed_settings(config, config_file_list=None, config_dict=None, stream=None) -> list[str]:
    """One line per setting the user gave (file, dict or flag) whose value differs from its
    default: ``key: value (default D in FILE; from WHERE)``."""
    ours: dict[str, tuple[object, Path]] = {}
    for path in property_files(config["model"], config["dataset"]):
        ours.update({key: (value, Path(path)) for key, value in _load(Path(path)).items()})
    lines = []
    for key, where in checks.user_settings(config, config_file_list, config_dict).items():
        if key in checks.INTERNAL_SETTINGS:
            continue
        if key in ours:
            default, origin = ours[key][0], shown_path(ours[key][1])
        elif key in config.internal_config_dict:
            default, origin = config.internal_config_dict[key], "RecBole's defaults"
        else:
            default, origin = None, "no default"
        value = config.final_config_dict.get(key)
        if value != default:
            lines.append(f"{paint(key, 'green', stream)}: {_value(value)} (default {_value(default)} in {origin}; "
                         f"set {where})")
    return lines
