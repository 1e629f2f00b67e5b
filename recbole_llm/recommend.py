"""Top-k recommendations per user from a saved checkpoint: what a trained recommender is for.

    recbole-llm recommend --model_file=saved/LlamaRec-....pth [--users=196,186] [--topk=10]
                          [--output=recommendations.csv] [--include_history]

:func:`recommend` loads the checkpoint with RecBole's own ``load_data_and_model`` (our models
and RecBole's sequential ones) and scores every item for each user given (all users by default) with
the model's ``full_sort_predict``. The history a user is recommended for is everything the
dataset knows of them: the test row's sequence followed by its target, the last
``MAX_ITEM_LIST_LENGTH`` items (RecBole's ``full_sort_topk`` on the test split leaves the last
item out: it evaluates). Items the user already has are left out unless ``include_history``.
Each row holds the user's and the item's ids as in the atomic files, the rank, the score and,
where the dataset loads them, the item's ``item_text_fields``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

import torch

from recbole_llm.compat import load_recbole_checkpoint
from recbole_llm.data.item_text import field_names, item_texts
from recbole_llm.errors import InputError, MissingInputError

#: Output formats by file suffix.
FORMATS = (".csv", ".json")


def recommend(model_file, users=None, topk: int = 10, include_history: bool = False) -> list[dict]:
    """The ``topk`` items for each of ``users`` (tokens as in the atomic files; None: every user
    with a test row), best first: one dict per (user, item) with ``user``, ``rank``, ``item``,
    ``score`` and, where the dataset has item text, ``text``."""
    from recbole.data import create_dataset
    from recbole.quick_start import load_data_and_model
    from recbole.utils import ModelType

    if not Path(model_file).is_file():
        raise MissingInputError(f"model_file {str(model_file)!r} does not exist: give a checkpoint that training "
                                "wrote (saved/<Model>-<time>.pth)")
    if not isinstance(topk, int) or topk < 1:
        raise InputError(f"topk must be a whole number >= 1; got {topk!r}")
    saved_config = load_recbole_checkpoint(model_file)["config"]  # checked before the model (an LLM) is built
    if saved_config["MODEL_TYPE"] != ModelType.SEQUENTIAL:
        raise InputError(f"{model_file} holds {saved_config['model']}, not a sequential model; recommend serves "
                         "sequential models (RecBole's recbole.utils.case_study.full_sort_topk serves the others).")
    if users is not None:
        users = [str(user) for user in users]
        _check_users(create_dataset(saved_config), users)
    config, model, dataset, _, _, test_data = load_data_and_model(str(model_file))
    uid, iid = dataset.uid_field, dataset.iid_field
    rows = _with_last_item(_test_rows(test_data.dataset, users), model)
    scores = _all_scores(model, rows, config)
    if not include_history:
        for row, user in enumerate(rows[uid].tolist()):
            scores[row, _history(dataset, user, model.ITEM_SEQ)] = -torch.inf
    scores[:, 0] = -torch.inf  # the padding item (also what a sequence's padding masked above)
    best = torch.topk(scores, min(topk, dataset.item_num - 1))
    texts = _texts(dataset, config)
    user_tokens = dataset.id2token(uid, rows[uid].numpy())
    recommendations = []
    for user, items, values in zip(user_tokens, best.indices.tolist(), best.values.tolist()):
        for rank, (item, score) in enumerate(zip(items, values), start=1):
            if score == -torch.inf:  # fewer items than topk are left once the history is out
                break
            row = {"user": str(user), "rank": rank, "item": str(dataset.id2token(iid, item)), "score": score}
            if texts:
                row["text"] = texts[item]
            recommendations.append(row)
    return recommendations


def _test_rows(test, users):
    """The test-split rows of ``users`` (known tokens), in their order; every user's when None."""
    uid = test.uid_field
    ids = test.inter_feat[uid]
    if users is None:
        return test[torch.arange(len(ids))]
    wanted = torch.as_tensor(test.token2id(uid, users)).view(-1)
    match = ids.unsqueeze(0) == wanted.unsqueeze(1)
    absent = [token for token, found in zip(users, match.any(1).tolist()) if not found]
    if absent:
        raise InputError(f"users {absent[:5]} have no test row (too few interactions after the dataset's "
                         "filters), so the model has no history to recommend from.")
    return test[match.float().argmax(1)]


def _all_scores(model, rows, config) -> torch.Tensor:
    """``model``'s float32 scores of every item for each of ``rows`` [n_rows, n_items], on the CPU,
    ``eval_batch_size`` rows at a time."""
    model.eval()
    batch = config["eval_batch_size"]
    with torch.no_grad():
        return torch.cat([model.full_sort_predict(rows[start:start + batch].to(config["device"])).float().cpu()
                          for start in range(0, len(rows), batch)])


def _check_users(dataset, users: list[str]) -> None:
    """Every one of ``users`` is a user token of ``dataset``."""
    known = dataset.field2token_id[dataset.uid_field]
    unknown = [user for user in users if user not in known]
    if unknown:
        raise InputError(f"users {unknown[:5]} are not users of dataset {dataset.dataset_name!r} "
                         f"(e.g. {list(known)[1:4]}); give user ids as in its .inter file.")


def _with_last_item(rows, model):
    """``rows`` with each test target appended to its history (the last ``max_seq_length`` items)."""
    sequences, lengths, targets = rows[model.ITEM_SEQ], rows[model.ITEM_SEQ_LEN], rows[model.ITEM_ID]
    width = sequences.shape[1]
    histories = [(seq[:n] + [target])[-width:] for seq, n, target in zip(sequences.tolist(), lengths.tolist(),
                                                                          targets.tolist())]
    rows[model.ITEM_SEQ] = torch.tensor([h + [0] * (width - len(h)) for h in histories], dtype=sequences.dtype)
    rows[model.ITEM_SEQ_LEN] = torch.tensor([len(h) for h in histories], dtype=lengths.dtype)
    return rows


def _history(dataset, user: int, sequence_field: str) -> torch.Tensor:
    """Every item ``user`` interacted with in the (filtered) dataset: its rows' targets and, as RecBole's
    sequential datasets hold one row per target, their sequences (the first item is no row's target)."""
    rows = dataset.inter_feat[dataset.inter_feat[dataset.uid_field] == user]
    return torch.cat([rows[dataset.iid_field], rows[sequence_field].flatten()])


def _texts(dataset, config) -> list[str] | None:
    """Each item's text from ``item_text_fields`` where the dataset loads all of them, else None."""
    fields = field_names(config["item_text_fields"])
    loaded = getattr(dataset, "item_feat", None)
    if not fields or loaded is None or any(field not in loaded.columns for field in fields):
        return None
    return item_texts(dataset, fields)


def write(recommendations: list[dict], path) -> None:
    """Write the rows of :func:`recommend` as CSV or JSON (by ``path``'s suffix)."""
    from recbole_llm.quick_start import write_atomically

    path = Path(path)
    if path.suffix == ".json":
        text = json.dumps(recommendations, indent=1, ensure_ascii=False)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(recommendations[0]) if recommendations else ["user"])
        writer.writeheader()
        writer.writerows(recommendations)
        text = buffer.getvalue()
    write_atomically(path, text)


def main(argv=None) -> list[dict]:
    """``recbole-llm recommend``: the flags of :func:`recommend`, written to ``--output``."""
    parser = argparse.ArgumentParser(prog="recbole-llm recommend", allow_abbrev=False,
                                     description="Write the top-k items per user of a saved checkpoint.")
    parser.add_argument("--model_file", required=True, help="a checkpoint training wrote (saved/<Model>-<time>.pth)")
    parser.add_argument("--users", default=None, help="user ids as in the .inter file, separated by commas (default: all)")
    parser.add_argument("--topk", type=int, default=10, help="items per user (default: 10)")
    parser.add_argument("--output", default="recommendations.csv", help="a .csv or .json file (default: recommendations.csv)")
    parser.add_argument("--include_history", action="store_true", help="also recommend items the user already has")
    args = parser.parse_args(argv)
    if Path(args.output).suffix not in FORMATS:
        raise InputError(f"--output={args.output!r}: name a .csv or .json file")
    users = [user.strip() for user in args.users.split(",") if user.strip()] if args.users else None
    recommendations = recommend(args.model_file, users, args.topk, args.include_history)
    write(recommendations, args.output)
    print(f"{len(recommendations)} recommendations for {len({row['user'] for row in recommendations})} users "
          f"written to {args.output}")
    return recommendations
