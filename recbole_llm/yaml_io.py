"""Reading a YAML settings file the way RecBole's ``Config`` reads it.

Every property file (ours and RecBole's) and every ``--config_files`` file is read with
:func:`read_yaml`: RecBole's loader, whose float resolver reads ``1e-4`` as a number, where
``yaml.safe_load`` (YAML 1.1) would read it as the string ``"1e-4"``; so a default, a user's
value and the run's config agree.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import yaml


@functools.cache
def yaml_loader() -> type:
    """RecBole's YAML loader class (``yaml.FullLoader`` with its float resolver), built once."""
    from recbole.config import Config

    return Config._build_yaml_loader(None)


def read_yaml(path: str | os.PathLike):
    """The content of the YAML file at ``path`` as RecBole reads it (None for an empty file).
    Raises OSError, ``yaml.YAMLError`` or UnicodeDecodeError as reading and parsing do."""
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=yaml_loader())
