"""Where a dataset's atomic files live, ml-100k provisioned offline, and the checks of
the atomic files before RecBole reads them.

RecBole forces ``data_path`` to its bundled copy for the name ``ml-100k``. We copy
that copy (``.inter``, ``.item``, ``.user``) into ``<data_path>/ml-100k`` once, so
users see and may edit the files like any other dataset, and point the config there.

The checks accept what RecBole's reader accepts and stop only where it would fail with a
traceback or misread the data silently (one :class:`InputError` naming the file, line or
field and the fix). What RecBole reads but probably not as meant gets one warning with a
count (:func:`recbole_llm.errors.warn_once`). RecBole 1.2.1's reader (``Dataset._load_feat``):
the header is ``name:type`` fields split on ``field_separator``; pandas reads the lines with
the header's number of fields, so extra fields on a line are dropped and missing ones become
empty; empty ``float`` values are filled with the column's mean. The checks run once per process
for the same files (size, modification time) and settings, however many configs a run builds
(:func:`check_dataset_files`). A dataset without a folder whose name RecBole can download (its
``url.yaml``) is left to RecBole's own download.
"""
from __future__ import annotations

import copy
import functools
import locale
import os
import re
import shutil
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path

import recbole

from recbole_llm.cache_io import atomic_target
from recbole_llm.errors import InputError, MissingInputError, warn_once
from recbole_llm.yaml_io import read_yaml

BUNDLED = {"ml-100k": Path(recbole.__file__).parent / "dataset_example" / "ml-100k"}
FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")
#: Separators a file may use instead of the configured one (the header tells).
OTHER_SEPARATORS = ("\t", ",", ";", "|", "::", " ")
_HEADER_FIELD = re.compile(rf"^[^:\s]+:({'|'.join(FEATURE_TYPES)})$")
_LINE_END = re.compile(r"\r\n|\n|\r")  # Python's universal newlines, as RecBole's open() reads the header


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
            with atomic_target(target / f"{name}.{suffix}") as tmp:
                shutil.copyfile(source / f"{name}.{suffix}", tmp)
    return target


@functools.cache
def recbole_downloads() -> frozenset:
    """The dataset names RecBole downloads itself when their folder is missing (its ``url.yaml``)."""
    urls = Path(recbole.__file__).parent / "properties" / "dataset" / "url.yaml"
    return frozenset(read_yaml(urls) or ()) if urls.is_file() else frozenset()


def resolve_data_path(config, user_data_path: str | None) -> None:
    """Point ``config['data_path']`` at the dataset folder and check that it is usable; a missing folder
    of a dataset RecBole downloads (:func:`recbole_downloads`) is left to RecBole's download."""
    name = config["dataset"]
    if name in BUNDLED:
        root = user_data_path or "dataset/"
        try:
            config["data_path"] = str(provision(name, root))
        except OSError as error:
            raise InputError(
                f"data_path={str(root)!r}: cannot copy RecBole's {name} files there ({error.strerror}). "
                "Set data_path to a folder you can write."
            ) from None
    folder = Path(config["data_path"])
    if not folder.exists() and name in recbole_downloads():
        return  # RecBole's create_dataset downloads it (and says why it cannot, without a network)
    inter = folder / f"{name}.inter"
    if not inter.is_file() and config["benchmark_filename"] is None:
        raise MissingInputError(
            f"Dataset '{name}' not found: expected the atomic files {name}.inter "
            f"(and {name}.item for models that read item text) in the folder '{folder}'. "
            "Put them there, or set data_path to the folder that contains the "
            f"'{name}' folder (RecBole atomic file format)."
        )
    check_dataset_files(config, folder)


class _RecordedReads:
    """A config whose reads (``config[key]``) are recorded with their values."""

    def __init__(self, config):
        self.config, self.read = config, {}

    def __getitem__(self, key):
        value = self.config[key]
        self.read[key] = copy.deepcopy(value)
        return value


#: The files' (path, size, modification time) of each finished check -> the settings it read, with their values.
_CHECKED: dict[tuple, dict] = {}


def check_dataset_files(config, folder: Path) -> None:
    """Read the dataset's atomic files as RecBole will and run the checks on them; once per process for
    the same files and the same values of the settings the checks read (their warnings are once per
    process anyway), so the several configs of one run parse the files once."""
    files = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(folder).glob("*")) if f.is_file())
    read = _CHECKED.get(files)
    if read is not None and all(config[key] == value for key, value in read.items()):
        return
    recorded = _RecordedReads(config)
    _check_dataset_files(recorded, Path(folder))
    _CHECKED[files] = recorded.read


def _check_dataset_files(config, folder: Path) -> None:
    name = config["dataset"]
    parts = [f".{part}" for part in config["benchmark_filename"] or []] or [""]
    inters = [read_atomic_file(folder / f"{name}{part}.inter", config, loaded_columns(config, "inter"))
              for part in parts if (folder / f"{name}{part}.inter").is_file()]
    features = {suffix: read_atomic_file(folder / f"{name}.{suffix}", config, loaded_columns(config, suffix))
                for suffix in ("item", "user") if (folder / f"{name}.{suffix}").is_file()}
    for file in inters + list(features.values()):
        warn_missing_load_col(file)
    for inter in inters:
        check_has_rows(inter)
        check_id_fields(config, inter)
        check_time_field(config, inter)
        warn_duplicates(config, inter)
        for suffix, setting in (("item", "ITEM_ID_FIELD"), ("user", "USER_ID_FIELD")):
            if suffix in features:
                warn_uncovered_ids(config, inter, features[suffix], setting)


def loaded_columns(config, suffix: str):
    """The columns RecBole will read from a ``.suffix`` file as its ``load_col`` says:
    ``None`` = all of them, an empty set = the file is not read."""
    load_col = config["load_col"]
    if load_col is None or load_col.get(suffix) == "*":
        return None
    return set(load_col.get(suffix, ()))


@dataclass
class AtomicFile:
    """An atomic file as RecBole reads it: header fields and the lines' values (the
    header's number of them, as RecBole keeps), with their line numbers."""

    path: Path
    fields: list  # [(name, type)]
    columns: set | None  # loaded by load_col (None: all)
    rows: list = field(default_factory=list)
    line_numbers: list = field(default_factory=list)

    def __post_init__(self):
        self.names = [name for name, _ in self.fields]

    def loaded(self, name: str) -> bool:
        return name in self.names and (self.columns is None or name in self.columns)


def read_atomic_file(path: Path, config, columns=None) -> AtomicFile:
    """Check one atomic file where RecBole's reader would fail or misread it, and return it.

    Errors: text that does not decode with ``encoding``, a byte-order mark, a header that is
    not ``name:type`` fields or is split by another separator than ``field_separator``, a line
    with fewer fields than the header, a field opening a quote it does not close, text in a
    loaded ``float`` field. Warning (once per file): lines with more fields than the header.
    """
    separator = config["field_separator"] or "\t"
    encoding = config["encoding"] or locale.getpreferredencoding(False)  # what RecBole's open() uses when unset
    text = _decode(path, encoding)
    if text.startswith("\ufeff"):
        raise InputError(f"{path} starts with a byte-order mark (BOM), which RecBole reads as part of the first "
                         f"field name. Save the file without it, or set encoding: utf-8-sig.")
    if not _LINE_END.search(text):
        raise InputError(f"{path} has a single line without a line end: RecBole cuts the header's last character "
                         "and finds no data. An atomic file is a header line, then one line per record.")
    lines = _LINE_END.split(text)
    fields = _header(path, lines[0], separator)
    file = AtomicFile(path, fields, columns)
    floats = [i for i, (name, ftype) in enumerate(fields) if ftype == "float" and file.loaded(name)]
    extra, width = [], len(fields)
    for number, line in enumerate(lines[1:], start=2):
        values = line.split(separator)
        if len(values) != width:
            if len(values) == 1 and not values[0].strip():
                continue  # a blank line: pandas skips it
            if len(values) < width:
                raise InputError(
                    f"{path}: line {number} has {len(values)} fields but the header has {width} "
                    f"({', '.join(file.names)}), separated by field_separator={separator!r}; RecBole would read "
                    f"the missing ones as empty. Fix or delete that line: {line[:120]!r}."
                )
            extra.append(number)
            values = values[:width]
        if '"' in line:
            _check_quotes(path, number, values, file.names)
        for i in floats:
            if values[i].strip() and not _is_number(values[i]):
                raise InputError(
                    f"{path}: line {number}, field '{fields[i][0]}' is declared float but holds {values[i][:40]!r}. "
                    "Fix the value, or declare the field ':token' in the header."
                )
        file.rows.append(values)
        file.line_numbers.append(number)
    if extra:
        shown = ", ".join(map(str, extra[:5])) + (", ..." if len(extra) > 5 else "")
        warn_once(f"{path}: {len(extra)} line(s) have more fields than the header's {len(fields)} (line {shown}); "
                  f"RecBole reads the first {len(fields)} and ignores the rest. Delete the extra fields, or name "
                  "them in the header to load them.")
    return file


def _decode(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise InputError(
            f"{path}: line {line} is not valid {encoding} (byte {data[error.start:error.start + 1]!r} at offset "
            f"{error.start}). Re-save the file as {encoding}, or set the `encoding` setting to the file's "
            "encoding (e.g. encoding: latin-1)."
        ) from None
    except LookupError:
        raise InputError(f"encoding={encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1).") from None


def _header(path: Path, line: str, separator: str) -> list:
    """The header's ``(name, type)`` fields; an error for another separator or a bad field."""
    header = line.split(separator)
    if len(header) == 1:
        for other in OTHER_SEPARATORS:
            parts = line.split(other)
            if other != separator and len(parts) > 1 and all(_HEADER_FIELD.match(p) for p in parts):
                raise InputError(
                    f"{path}: the header is separated by {other!r} but field_separator is {separator!r} "
                    f"(RecBole's default is a tab). Set field_separator: {other!r} (--field_separator='{other}'), "
                    "or convert the file to tabs."
                )
    fields = []
    for position, field_type in enumerate(header, start=1):
        name, _, ftype = field_type.partition(":")
        if not name or ftype not in FEATURE_TYPES:
            raise InputError(
                f"{path}: header field {position} is {field_type!r}; each header field must be 'name:type' with "
                f"type one of {', '.join(FEATURE_TYPES)} (no spaces), separated by field_separator={separator!r}."
            )
        fields.append((name, ftype))
    return fields


def _check_quotes(path: Path, number: int, values: list, names: list) -> None:
    """pandas (RecBole's reader) takes a field opening with ``"`` as quoted up to the next single
    ``"``, across separators and lines; a whole quoted field (inner quotes doubled) is fine."""
    for name, value in zip(names, values):
        whole = len(value) > 1 and value.endswith('"') and '"' not in value[1:-1].replace('""', "")
        if value.startswith('"') and not whole:
            raise InputError(
                f"{path}: line {number}, field '{name}' starts with a double quote it does not close "
                f"({value[:40]!r}); RecBole's reader would read on past the field. Remove the quote or "
                "quote the whole field."
            )


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def warn_missing_load_col(file: AtomicFile) -> None:
    """load_col names a field the file lacks: RecBole loads the others without a word."""
    missing = sorted((file.columns or set()) - set(file.names))
    if missing:
        suffix = file.path.suffix.lstrip(".")
        warn_once(f"load_col {suffix}: {missing} not in {file.path} (its fields: {', '.join(file.names)}); RecBole "
                  f"loads the others and ignores these. Fix the names in load_col or the header.")


def check_has_rows(inter: AtomicFile) -> None:
    if not inter.rows:
        raise InputError(f"{inter.path} has a header but no interactions: add one line per interaction "
                         "(user, item, time, separated by field_separator) below the header.")


def check_id_fields(config, inter: AtomicFile) -> None:
    """The user and item id fields are in the file and loaded."""
    for setting in ("USER_ID_FIELD", "ITEM_ID_FIELD"):
        name = config[setting]
        if name is None or inter.loaded(name):
            continue
        if name in inter.names:
            raise InputError(f"load_col inter leaves out {name!r} ({setting}) of {inter.path}: add it to load_col.")
        raise InputError(f"{inter.path} has no field {name!r} ({setting}); its fields are {', '.join(inter.names)}. "
                         f"Rename the header field, or set {setting} to the file's name for it.")


def check_time_field(config, inter: AtomicFile) -> None:
    """Ordering by time (``eval_args`` order TO) needs a loaded float time field without gaps:
    RecBole keeps the file's order when there is none and fills empty times with the mean."""
    eval_args = config["eval_args"] or {}
    time = config["TIME_FIELD"]
    if eval_args.get("order") != "TO":
        return
    if time is None or not inter.loaded(time):
        where = (f"load_col inter leaves out {time!r}" if time in inter.names
                 else f"{inter.path} has no field {time!r} (its fields: {', '.join(inter.names)})")
        raise InputError(
            f"eval_args order: TO sorts each history by TIME_FIELD={time!r}, but {where}; RecBole would not "
            "sort by time. Add a time column (float), load it, or set TIME_FIELD to the file's time field."
        )
    index = inter.names.index(time)
    if inter.fields[index][1] != "float":
        raise InputError(
            f"{inter.path}: TIME_FIELD {time!r} is declared ':{inter.fields[index][1]}'; RecBole numbers tokens in "
            f"order of appearance and would sort histories by those numbers. Declare it '{time}:float' with "
            "numeric times (e.g. Unix seconds)."
        )
    empty = [number for number, row in zip(inter.line_numbers, inter.rows) if not row[index].strip()]
    if empty:
        raise InputError(
            f"{inter.path}: {len(empty)} line(s) have no {time!r} value (first: line {empty[0]}); RecBole fills "
            "them with the mean time, which puts those interactions mid-history. Fill in the times or delete "
            "those lines."
        )


def warn_duplicates(config, inter: AtomicFile) -> None:
    """Exact duplicate interactions (every loaded field equal): with leave-one-out a duplicate
    of the test target sits in the user's own history."""
    key_of = itemgetter(*[i for i, name in enumerate(inter.names) if inter.loaded(name)])
    first_seen, duplicates, example = {}, 0, None
    for number, row in zip(inter.line_numbers, inter.rows):
        key = key_of(row)
        if key in first_seen:
            duplicates += 1
            example = example or (number, first_seen[key])
        else:
            first_seen[key] = number
    if not duplicates:
        return
    what = f"{inter.path}: {duplicates} interaction(s) are exact duplicates of an earlier line (line {example[0]} " \
           f"repeats line {example[1]})"
    if config["drop_exact_duplicates"]:
        warn_once(f"{what}; dropped (drop_exact_duplicates: True).")
    else:
        warn_once(f"{what}: a duplicate can put a user's test target in their own history. Set "
                  "drop_exact_duplicates: True to drop them.")


def warn_uncovered_ids(config, inter: AtomicFile, feature: AtomicFile, setting: str) -> None:
    """Ids of the ``.inter`` file missing from the ``.item`` (``.user``) file: RecBole drops
    those interactions (``filter_inter_by_user_or_item``)."""
    name = config[setting]
    if feature.columns == set() or not config["filter_inter_by_user_or_item"] or not feature.loaded(name) \
            or not inter.loaded(name):
        return
    known = {row[feature.names.index(name)] for row in feature.rows}
    index = inter.names.index(name)
    missing = [row[index] for row in inter.rows if row[index] not in known]
    if missing:
        ids = sorted(set(missing))
        warn_once(
            f"{inter.path}: {len(missing)} interaction(s) of {len(ids)} {name}(s) missing from {feature.path} "
            f"(e.g. {ids[0]!r}); RecBole drops them (filter_inter_by_user_or_item: True). Add those ids to "
            f"{feature.path.name}, or set filter_inter_by_user_or_item: False to keep them."
        )


def drop_exact_duplicates(config, dataset) -> int:
    """With ``drop_exact_duplicates: True``, drop the exact duplicate rows of a dataset that
    RecBole's ``create_dataset`` returned (after its filtering, before the split); returns
    how many were dropped."""
    if not config["drop_exact_duplicates"]:
        return 0
    from recbole.utils import FeatureType

    frame = dataset.inter_feat
    plain = [c for c in frame.columns if dataset.field2type.get(c) not in (FeatureType.TOKEN_SEQ, FeatureType.FLOAT_SEQ)]
    before = len(frame)
    frame.drop_duplicates(subset=plain, inplace=True)
    frame.reset_index(drop=True, inplace=True)
    return before - len(frame)
