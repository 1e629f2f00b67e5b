"""Where a dataset's atomic files live, and ml-100k provisioned offline.

RecBole forces ``data_path`` to its bundled copy for the name ``ml-100k``. We copy
that copy (``.inter``, ``.item``, ``.user``) into ``<data_path>/ml-100k`` once, so
users see and may edit the files like any other dataset, and point the config there.
"""
from __future__ import annotations

import locale
import os
import shutil
import tempfile
from pathlib import Path

import recbole

from recbole_llm.errors import InputError, MissingInputError

BUNDLED = {"ml-100k": Path(recbole.__file__).parent / "dataset_example" / "ml-100k"}


def provision(name: str, root: str | os.PathLike) -> Path:
    """Copy a dataset that ships with RecBole into ``root/name`` if it is not there yet.

    Each file is copied through a temp file and a rename, the ``.inter`` file last (its presence
    means "provisioned"); anything else in the folder (e.g. a committed knowledge cache) stays.
    """
    target = Path(root) / name
    source = BUNDLED[name]
    if (target / f"{name}.inter").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for suffix in ("item", "user", "inter"):
        if (source / f"{name}.{suffix}").is_file():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.{suffix}.", dir=target)
            os.close(fd)
            shutil.copyfile(source / f"{name}.{suffix}", tmp)
            os.replace(tmp, target / f"{name}.{suffix}")
    return target


def resolve_data_path(config, user_data_path: str | None) -> None:
    """Point ``config['data_path']`` at the dataset folder and check that it is usable."""
    name = config["dataset"]
    if name in BUNDLED:
        config["data_path"] = str(provision(name, user_data_path or "dataset/"))
    folder = Path(config["data_path"])
    inter = folder / f"{name}.inter"
    if not inter.is_file() and config["benchmark_filename"] is None:
        raise MissingInputError(
            f"Dataset '{name}' not found: expected the atomic files {name}.inter "
            f"(and {name}.item for models that read item text) in the folder '{folder}'. "
            "Put them there, or set data_path to the folder that contains the "
            f"'{name}' folder (RecBole atomic file format)."
        )
    for suffix in ("inter", "item", "user"):
        path = folder / f"{name}.{suffix}"
        if path.is_file():
            check_atomic_file(path, config, _loaded_columns(config, suffix))


FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")


def _loaded_columns(config, suffix: str):
    """The columns RecBole will read from a ``.suffix`` file (``None`` = all), as its ``load_col``."""
    load_col = config["load_col"]
    if load_col is None or load_col.get(suffix) == "*":
        return None
    return set(load_col.get(suffix, ()))


def check_atomic_file(path: Path, config, columns=None) -> None:
    """Check one atomic file before RecBole parses it, so a bad file gets an error that
    names the file, the line and the fix instead of a pandas traceback (or, for a line
    with too few fields, silently missing values).

    Checks: the text decodes with the ``encoding`` setting; the header is
    ``name:type`` fields with RecBole's types; every line has the header's number of
    fields; the loaded ``float`` fields parse as numbers. ``columns`` limits the value
    checks to the fields RecBole loads (``None``: all).
    """
    separator = config["field_separator"] or "\t"
    encoding = config["encoding"] or locale.getpreferredencoding(False)  # what RecBole's open() uses when unset
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise InputError(
            f"{path}: line {line} is not valid {encoding} (byte {data[error.start:error.start + 1]!r} at offset "
            f"{error.start}). Re-save the file as {encoding}, or set the `encoding` setting to the file's "
            "encoding (e.g. encoding: latin-1)."
        ) from None
    lines = text.splitlines()
    if not lines:
        raise InputError(f"{path} is empty; an atomic file starts with a header line such as 'user_id:token'.")
    header = lines[0].split(separator)
    fields = []
    for position, field in enumerate(header, start=1):
        name, _, ftype = field.strip().rpartition(":")
        if not name or ftype not in FEATURE_TYPES:
            raise InputError(
                f"{path}: header field {position} is {field!r}; each header field must be 'name:type' with type "
                f"one of {', '.join(FEATURE_TYPES)}, separated by field_separator={separator!r}."
            )
        fields.append((name, ftype))
    floats = [i for i, (name, ftype) in enumerate(fields) if ftype == "float" and (columns is None or name in columns)]
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        values = line.split(separator)
        if len(values) != len(fields):
            raise InputError(
                f"{path}: line {number} has {len(values)} fields but the header has {len(fields)} "
                f"({', '.join(name for name, _ in fields)}), separated by field_separator={separator!r}. "
                f"Fix or delete that line: {line[:120]!r}."
            )
        for i in floats:
            if values[i].strip() and not _is_number(values[i]):
                raise InputError(
                    f"{path}: line {number}, field '{fields[i][0]}' is declared float but holds {values[i][:40]!r}. "
                    "Fix the value, or declare the field ':token' in the header."
                )


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
