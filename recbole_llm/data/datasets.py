"""Where a dataset's atomic files live, and ml-100k provisioned offline.

RecBole forces ``data_path`` to its bundled copy for the name ``ml-100k``. We copy
that copy (``.inter``, ``.item``, ``.user``) into ``<data_path>/ml-100k`` once, so
users see and may edit the files like any other dataset, and point the config there.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import recbole

BUNDLED = {"ml-100k": Path(recbole.__file__).parent / "dataset_example" / "ml-100k"}


def provision(name: str, root: str | os.PathLike) -> Path:
    """Copy a dataset that ships with RecBole into ``root/name`` if it is not there yet."""
    target = Path(root) / name
    source = BUNDLED[name]
    if (target / f"{name}.inter").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    for suffix in ("inter", "item", "user"):
        if (source / f"{name}.{suffix}").is_file():
            shutil.copy2(source / f"{name}.{suffix}", staging / f"{name}.{suffix}")
    if target.exists():  # a folder without the .inter file: replace it as a whole
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def resolve_data_path(config, user_data_path: str | None) -> None:
    """Point ``config['data_path']`` at the dataset folder and check that it is usable."""
    name = config["dataset"]
    if name in BUNDLED:
        config["data_path"] = str(provision(name, user_data_path or "dataset/"))
    folder = Path(config["data_path"])
    inter = folder / f"{name}.inter"
    if not inter.is_file() and config["benchmark_filename"] is None:
        raise FileNotFoundError(
            f"Dataset '{name}' not found: expected the atomic files {name}.inter "
            f"(and {name}.item for models that read item text) in the folder '{folder}'. "
            "Put them there, or set data_path to the folder that contains the "
            f"'{name}' folder (RecBole atomic file format)."
        )
