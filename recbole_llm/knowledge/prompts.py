"""SeRALM's knowledge prompt (Fig. 3 of the paper) and the parsing of the LLM's answers.

For every item, the prompt is filled with the item's fields as a JSON string (for ml-100k:
``{"title": ..., "year": ..., "genres": ...}`` from ``movie_title``, ``release_year`` and
``class``), read from the dataset's own item table (``dataset.item_feat``), never from a
training batch (a batch carries the TARGET item's features: a label leak). The LLM answers
with ``{"description": ..., "summarization": ...}``; answers are parsed robustly: the first
JSON object holding either key wins; otherwise the two values are salvaged with a regular
expression (a truncated answer), otherwise the whole answer becomes the description. Every
answer that was not clean JSON is a *fallback*, counted and logged.
"""
from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Sequence

from recbole_llm.data.item_text import _field_values, natural_title, require_item_fields
from recbole_llm.errors import InputError

#: Fig. 3 of the paper, verbatim except for the paper's typesetting of braces as parentheses, with the
#: item's noun (the paper's "movie") as ``<item>`` and its fields' JSON skeleton as ``<fields>``
#: (:func:`default_knowledge_prompt`). Only ``{item_json}`` is substituted per item (the template
#: itself contains JSON braces).
KNOWLEDGE_PROMPT_FRAME = (
    "You will serve as an assistant to help me summarize which types of users would enjoy a specific <item>.\n"
    "I will provide you with information in the form of a JSON string that describes the <item>:\n"
    "<fields>\n"
    "Requirements:\n"
    "1. Please provide your answer in JSON format, following this structure:\n"
    '{"description": "a description of the <item>", '
    '"summarization": "A summarization of what types of users would enjoy this <item>"}\n'
    "Here is the <item> information:\n"
    "{item_json}"
)


def default_knowledge_prompt(item_noun: str = "item", keys: Sequence[str] = ("title", "year", "genres")) -> str:
    """The knowledge prompt for items called ``item_noun`` whose JSON has ``keys`` (the prompt keys of
    ``knowledge_fields``): the paper's, for ``"movie"`` and title, year, genres."""
    skeleton = json.dumps({key: f"the {key} of the {item_noun}" for key in keys}, ensure_ascii=False)
    return KNOWLEDGE_PROMPT_FRAME.replace("<fields>", skeleton).replace("<item>", item_noun)


#: The paper's Fig. 3 prompt (ml-100k's default).
KNOWLEDGE_PROMPT = default_knowledge_prompt("movie")
DEFAULT_TEXT_FORMAT = "{description} {summarization}"
#: Item field values longer than this are cut before they enter a prompt (a runaway title cannot fill the context).
MAX_FIELD_CHARS = 200
KEYS = ("description", "summarization")

_SALVAGE = {key: re.compile(rf'"{key}"\s*:\s*"((?:[^"\\]|\\.)*)', re.I | re.S) for key in KEYS}


def item_prompt_fields(dataset, field_map: dict[str, str]) -> list[dict[str, str]]:
    """One dict of prompt fields per internal item id (row 0, padding, is ``{}``).

    ``field_map`` maps prompt keys to item fields, every one loaded (:func:`require_item_fields`); empty values
    are left out, values are cut to ``MAX_FIELD_CHARS``. The first key is treated as the name (``'Usual Suspects, The'`` ->
    ``'The Usual Suspects'``); token sequences of later keys are joined with ``', '``
    (genres). Read from ``dataset.item_feat``, never from a batch.
    """
    from recbole.utils import FeatureType

    field_map = dict(field_map)
    if not field_map:
        raise InputError("knowledge_fields is empty; set it to {prompt key: item field} of the .item file "
                         "(name first) and list the fields under load_col: item: [...].")
    require_item_fields(dataset, list(field_map.values()), "knowledge_fields")
    first = next(iter(field_map))
    columns = {}
    for key, field in field_map.items():
        values = _field_values(dataset, field)
        if key == first:
            values = [natural_title(v) for v in values]
        elif dataset.field2type[field] == FeatureType.TOKEN_SEQ:
            values = [", ".join(v.split()) for v in values]
        columns[key] = values
    n_items = len(next(iter(columns.values())))
    rows = [{key: columns[key][i].strip()[:MAX_FIELD_CHARS] for key in field_map if columns[key][i].strip()}
            for i in range(n_items)]
    rows[0] = {}
    return rows


def build_prompt(fields: dict[str, str], template: str = KNOWLEDGE_PROMPT) -> str:
    """The knowledge prompt for one item (its fields as one JSON string)."""
    return template.replace("{item_json}", json.dumps(fields, ensure_ascii=False))


def parse_knowledge(text: str) -> tuple[dict[str, str], bool]:
    """``({"description", "summarization"}, clean)`` from an LLM answer.

    ``clean`` is True when a JSON object in the answer holds at least one of the two keys
    as a non-empty string. Otherwise (a fallback) the values are salvaged from a truncated
    or quoted-but-broken object, or the whole answer becomes the description.
    """
    text = (text or "").strip()
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text[match.start():])
        except ValueError:
            continue
        if isinstance(obj, dict):
            lowered = {str(k).strip().lower(): v for k, v in obj.items()}
            found = {k: lowered[k].strip() for k in KEYS if isinstance(lowered.get(k), str)}
            if any(found.values()):
                return {k: found.get(k, "") for k in KEYS}, True
    salvaged = {}
    for key, pattern in _SALVAGE.items():
        hit = pattern.search(text)
        if hit:
            try:
                salvaged[key] = json.loads(f'"{hit.group(1)}"').strip()
            except ValueError:
                salvaged[key] = hit.group(1).strip()
    if any(salvaged.values()):
        return {k: salvaged.get(k, "") for k in KEYS}, False
    cleaned = re.sub(r"\s+", " ", text.strip("`{}() \n")).strip()
    return {"description": cleaned, "summarization": ""}, False


@functools.lru_cache(maxsize=8)
def placeholders(template: str = KNOWLEDGE_PROMPT) -> tuple[str, ...]:
    """The example values the prompt's JSON skeletons hold ("a description of the movie", ...)."""
    return tuple(_normalized(value) for value in re.findall(r'"\w+"\s*:\s*"([^"{}]+)"', template))


def _normalized(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def is_placeholder(value: str, template_placeholders: Sequence[str]) -> bool:
    """True when ``value`` only repeats (or barely rephrases) one of the prompt's example values,
    as a small LLM often does: 'A summary of what types of users would enjoy this movie.'"""
    text = _normalized(value)
    return bool(text) and any(difflib.SequenceMatcher(None, text, p).ratio() >= 0.8 for p in template_placeholders)


def knowledge_text(record: dict | None, text_format: str = DEFAULT_TEXT_FORMAT, fields: dict | None = None,
                   template: str = KNOWLEDGE_PROMPT) -> str:
    """The text the encoder sees for one item: its knowledge, leaving out values that only copy the
    prompt's placeholders; when nothing is left, the item's own ``fields`` ('Heavyweights, 1994,
    Children's, Comedy'), so the item still gets a vector of its own. '' without either."""
    skeleton = placeholders(template)
    values = {k: "" if is_placeholder(v := (record or {}).get(k, ""), skeleton) else v for k in KEYS}
    text = " ".join(text_format.format(**values).split())
    return text or ", ".join(v for v in (fields or {}).values() if v)
