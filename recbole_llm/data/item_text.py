"""Item text rebuilt from a RecBole dataset's own item table.

RecBole joins the TARGET item's features onto every interaction batch, so a model
that read ``movie_title`` from the batch would see the label. Models look up the text
of history and candidate items here instead, by internal item id.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from logging import getLogger
from pathlib import Path

from recbole.utils import FeatureType
from recbole_llm.errors import InputError

_TRAILING_ARTICLE = re.compile(r"^(?P<head>.+), (?P<article>The|A|An|Les|La|Le|Il|Das|Der|Die|El|L')$")


def natural_title(title: str) -> str:
    """'Usual Suspects, The' -> 'The Usual Suspects' (MovieLens style titles)."""
    match = _TRAILING_ARTICLE.match(title.strip())
    if not match:
        return title.strip()
    return f"{match['article']} {match['head']}".replace("L' ", "L'")


def _field_values(dataset, field: str) -> list[str]:
    feat = dataset.item_feat[field]
    rows = feat.tolist()
    ftype = dataset.field2type[field]
    if ftype == FeatureType.TOKEN_SEQ:
        tokens = dataset.field2id_token[field]
        return [" ".join(tokens[t] for t in row if t != 0) for row in rows]
    if ftype == FeatureType.TOKEN:
        tokens = dataset.field2id_token[field]
        return ["" if int(t) == 0 else str(tokens[int(t)]) for t in rows]
    if ftype == FeatureType.FLOAT:
        return ["" if v != v else f"{v:g}" for v in rows]
    return [" ".join(f"{v:g}" for v in row) for row in rows]


def item_file_fields(dataset) -> list[str]:
    """The field names in the header of the dataset's ``.item`` file ([] without one)."""
    path = Path(dataset.dataset_path) / f"{dataset.dataset_name}.item"
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as item_file:
        return [column.split(":")[0] for column in item_file.readline().rstrip("\r\n").split("\t")]


def require_item_fields(dataset, fields: Sequence[str], setting: str) -> None:
    """Every field of ``setting`` (``item_text_fields``, ``knowledge_fields``) is an item field RecBole
    loaded; otherwise one :class:`InputError` naming the field, the ``.item`` file's fields and the fix."""
    item_feat = getattr(dataset, "item_feat", None)
    loaded = [] if item_feat is None else list(item_feat.columns)
    missing = [field for field in fields if field not in loaded]
    if not missing:
        return
    in_file = item_file_fields(dataset)
    item_file = f"{dataset.dataset_name}.item"
    if not in_file:
        raise InputError(f"{setting} names {missing} but dataset '{dataset.dataset_name}' has no {item_file} "
                         f"in {dataset.dataset_path}: this model reads item text; add that file with these fields.")
    absent = [field for field in missing if field not in in_file]
    if absent:
        raise InputError(f"{setting} names {absent}, which {item_file} does not have; its fields are {in_file}. "
                         f"Set {setting} to fields of it.")
    raise InputError(f"{setting} names {missing}, which {item_file} has but load_col does not load "
                     f"(load_col item: {[f for f in loaded if f in in_file]}); add them to load_col: item: [...].")


def field_names(fields) -> list[str]:
    """The ``item_text_fields`` setting as a list; a string is a command line's ``title,brand`` or ``[title,brand]``."""
    if isinstance(fields, str):
        fields = [field.strip(" '\"") for field in fields.strip("[]").split(",")]
    return [field for field in fields or [] if field]


def item_texts(dataset, fields: Sequence[str]) -> list[str]:
    """One string per internal item id (row 0, the padding item, is '').

    The first field is the name ('Toy Story'); the others follow in parentheses
    ('Toy Story (1995)'). Every field must be loaded (:func:`require_item_fields`). An item whose
    name is empty is called by its id token ('item 1234'), and the count is logged.
    """
    present = field_names(fields)
    if not present:
        raise InputError("item_text_fields is empty; this model needs item text: set it to fields of the .item file "
                         "(name first) and list them under load_col: item: [...].")
    require_item_fields(dataset, present, "item_text_fields")
    columns = [_field_values(dataset, f) for f in present]
    tokens = dataset.field2id_token[dataset.iid_field]
    texts, unnamed = [""], 0
    for item, parts in enumerate(zip(*columns)):
        if item == 0:
            continue
        name, extra = natural_title(parts[0]), [p for p in parts[1:] if p]
        if not name:
            name, unnamed = f"item {tokens[item]}", unnamed + 1
        texts.append(f"{name} ({', '.join(extra)})" if extra else name)
    if unnamed:
        getLogger().warning(
            f"{unnamed} of {len(texts) - 1} items have an empty '{present[0]}'; they are called 'item <id>' in prompts."
        )
    return texts
