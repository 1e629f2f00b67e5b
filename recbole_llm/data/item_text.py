"""Item text rebuilt from a RecBole dataset's own item table.

RecBole joins the TARGET item's features onto every interaction batch, so a model
that read ``movie_title`` from the batch would see the label. Models look up the text
of history and candidate items here instead, by internal item id.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from logging import getLogger

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


def item_texts(dataset, fields: Sequence[str]) -> list[str]:
    """One string per internal item id (row 0, the padding item, is '').

    The first field is the name ('Toy Story'); the others follow in parentheses
    ('Toy Story (1995)'). Fields missing from the dataset are skipped; if none of the
    fields is present, the error lists the item fields the dataset has. An item whose
    name is empty is called by its id token ('item 1234'), and the count is logged.
    """
    fields = list(fields or [])
    item_feat = getattr(dataset, "item_feat", None)
    available = [] if item_feat is None else [f for f in item_feat.columns if f != dataset.iid_field]
    present = [f for f in fields if f in available]
    if not present:
        where = (f"no item file ({dataset.dataset_path}/{dataset.dataset_name}.item, or load_col has no 'item' entry)"
                 if item_feat is None else f"item fields loaded: {available}")
        raise InputError(
            f"Dataset '{dataset.dataset_name}' has no item text field among item_text_fields={fields}: {where}. "
            "This model needs item text: provide the .item file, set item_text_fields to fields of it and list "
            "them under load_col: item: [...]."
        )
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
