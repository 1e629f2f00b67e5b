"""Metrics by slice: RecBole's metrics per group of evaluated users, from the same ranking pass.

With ``eval_slices: True``, an evaluation outside ``fit`` (the test, or any later call) also
reports its metrics per slice of the evaluated rows, computed by RecBole's own evaluator on
the top-k hit rows its collector gathered for the overall metrics (no second pass):

- ``popularity`` of the target item, its interactions in the training split
  (:func:`recbole_llm.data.interactions.training_interactions`): ``cold`` below
  :data:`COLD_BELOW`, then ``tail`` / ``torso`` / ``head``, the other items in order of
  popularity cut into three parts holding a third of their training interactions each;
- ``history``: the user's training interactions, ``short`` / ``medium`` / ``long`` by thirds
  of the evaluated rows.

Equal counts always share a slice (a group of equal values goes where the middle of its share
falls). Each slice carries its user count, the range of its counts, RecBole's metrics and the
standard error of NDCG@10 over its users; ``all`` holds every row. The result dict gains
``result["slices"]``, the log one table. In a distributed run the rows of all ranks are
gathered first (the sampler's padding repeats dropped), so every rank reports the same slices.
:func:`sliced` mixes :class:`SlicedTrainer` into any RecBole ``Trainer`` (the registry and the
plugin do so for every model); without the setting it changes nothing.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.evaluator import Collector, DataStruct
from recbole.evaluator.metrics import NDCG
from recbole.trainer import Trainer

from recbole_llm.data.interactions import training_interactions
from recbole_llm.errors import InputError

#: Items with fewer training interactions are ``cold``.
COLD_BELOW = 5
SLICES = {"popularity": ("cold", "tail", "torso", "head"), "history": ("short", "medium", "long")}
#: The metric whose standard error each slice reports, and its cut-off.
SE_METRIC, SE_K = "ndcg@10", 10


def wanted(config) -> bool:
    """The ``eval_slices`` setting (absent from a RecBole config without our property files: off)."""
    return bool(config["eval_slices"])


def thirds(values, weights) -> np.ndarray:
    """0, 1 or 2 per value: the lower, middle or upper third of the total weight in value order;
    equal values share the third in which the middle of their weight falls."""
    unique, inverse = np.unique(np.asarray(values), return_inverse=True)
    mass = np.bincount(inverse, weights=np.asarray(weights, dtype=float), minlength=len(unique))
    if mass.sum() <= 0:
        return np.zeros(len(inverse), dtype=int)
    middle = np.cumsum(mass) - mass / 2
    return np.minimum((3 * middle / mass.sum()).astype(int), 2)[inverse]


def popularity_slices(item_counts: torch.Tensor) -> torch.Tensor:
    """Per item id: 0 cold, 1 tail, 2 torso, 3 head (thirds of the interactions of warm items)."""
    counts = item_counts.numpy()
    index = np.zeros(len(counts), dtype=np.int64)
    warm = counts >= COLD_BELOW
    index[warm] = 1 + thirds(counts[warm], counts[warm])
    return torch.from_numpy(index)


@dataclass
class EvaluatedRows:
    """What one evaluation collected: RecBole's data struct and each row's target item and user."""

    struct: DataStruct
    items: torch.Tensor
    users: torch.Tensor


def subset(struct: DataStruct, mask: torch.Tensor) -> DataStruct:
    """``struct`` with only the rows in ``mask`` of its per-row (``rec.*``) tensors."""
    part = DataStruct()
    for key, value in struct._data_dict.items():
        part[key] = value[mask] if key.startswith("rec.") and isinstance(value, torch.Tensor) else value
    return part


def slice_metrics(evaluator, config, rows: EvaluatedRows, item_counts, user_counts) -> dict:
    """``{"all": m, "popularity": {slice: m}, "history": {slice: m}}``, each ``m`` holding
    ``users``, ``range`` (of the slice's counts), RecBole's metrics and ``ndcg@10_se``."""
    n = len(rows.items)
    topk = rows.struct["rec.topk"] if "rec.topk" in rows.struct else None
    if topk is not None and len(topk) != n:
        raise InputError(f"eval_slices needs one evaluated row per target item (a sequential model); this "
                         f"evaluation has {len(topk)} rows for {n} targets. Set eval_slices: False.")
    per_user_ndcg = None
    if topk is not None and max(config["topk"]) >= SE_K:
        pos_index, pos_len = NDCG(config).used_info(rows.struct)
        per_user_ndcg = NDCG(config).metric_info(pos_index, pos_len)[:, SE_K - 1] if n else np.zeros(0)
    places = config["metric_decimal_place"]

    def measure(mask: torch.Tensor, values: torch.Tensor | None) -> dict:
        users = int(mask.sum())
        out = {"users": users}
        if not users:
            return out
        if values is not None:
            out["range"] = [int(values[mask].min()), int(values[mask].max())]
        out.update({k: float(v) for k, v in evaluator.evaluate(subset(rows.struct, mask)).items()})
        if per_user_ndcg is not None:
            chosen = per_user_ndcg[mask.numpy()]
            out[f"{SE_METRIC}_se"] = round(float(chosen.std(ddof=1) / math.sqrt(users)), places) if users > 1 else None
        return out

    popularity = item_counts[rows.items]
    history = user_counts[rows.users]
    index = {"popularity": popularity_slices(item_counts)[rows.items],
             "history": torch.from_numpy(thirds(history.numpy(), np.ones(n)))}
    values = {"popularity": popularity, "history": history}
    result = {"all": measure(torch.ones(n, dtype=torch.bool), None)}
    for group, names in SLICES.items():
        result[group] = {name: measure(index[group] == i, values[group]) for i, name in enumerate(names)}
    return result


def slice_table(slices: dict, title: str = "metrics by slice") -> str:
    """``slices`` as a plain-text table (one row per slice, RecBole's metric names as columns)."""
    metrics = [k for k in slices["all"] if k not in ("users", "range")]
    header = ["slice", "users", "range"] + metrics
    rows = [["all", slices["all"]["users"], ""] + [_cell(slices["all"].get(m)) for m in metrics]]
    for group, names in SLICES.items():
        for name in names:
            m = slices[group][name]
            span = f"{m['range'][0]}-{m['range'][1]}" if "range" in m else ""
            rows.append([f"{group}={name}", m["users"], span] + [_cell(m.get(k)) for k in metrics])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
    note = (f"(range: the training interactions of the target item (popularity) or of the user (history); "
            f"cold: below {COLD_BELOW})")
    return "\n".join([f"{title} {note}"] + lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.4f}"


class SliceCollector(Collector):
    """RecBole's collector that also keeps each evaluated row's target item and user, in the order
    of the rows it collects, and the training split's counts (:meth:`data_collect`)."""

    def __init__(self, config):
        super().__init__(config)
        self.counts: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last: EvaluatedRows | None = None
        self._items: list[torch.Tensor] = []
        self._users: list[torch.Tensor] = []

    def data_collect(self, train_data):
        super().data_collect(train_data)
        if wanted(self.config):
            self.counts = training_interactions(train_data._dataset)

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        if wanted(self.config):
            for field, store in ((self.config["ITEM_ID_FIELD"], self._items), (self.config["USER_ID_FIELD"], self._users)):
                if field in interaction:
                    store.append(interaction[field].cpu())

    def get_data_struct(self):
        struct = super().get_data_struct()
        if wanted(self.config):
            empty = torch.zeros(0, dtype=torch.long)
            self.last = EvaluatedRows(struct, torch.cat(self._items) if self._items else empty,
                                      torch.cat(self._users) if self._users else empty)
        self._items, self._users = [], []
        return struct


def gather_rows(rows: EvaluatedRows, eval_data) -> EvaluatedRows:
    """Every rank's rows, in dataset order, each once: a distributed sampler gives rank r the
    rows r, r + W, ... of the dataset, repeating the first ones to make the shares equal."""
    import torch.distributed as dist

    indices = torch.tensor(list(eval_data.sampler), dtype=torch.long)
    if len(indices) != len(rows.items):
        raise RuntimeError(f"this rank evaluated {len(rows.items)} rows, its sampler holds {len(indices)}")
    per_row = {k: v for k, v in rows.struct._data_dict.items() if k.startswith("rec.") and isinstance(v, torch.Tensor)}
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (indices, per_row, rows.items, rows.users))
    indices = torch.cat([share[0] for share in shares])
    order = torch.argsort(indices, stable=True)
    first = torch.ones(len(order), dtype=torch.bool)
    first[1:] = indices[order][1:] != indices[order][:-1]
    keep = order[first]
    struct = DataStruct()
    for key, value in rows.struct._data_dict.items():
        struct[key] = torch.cat([share[1][key] for share in shares])[keep] if key in per_row else value
    return EvaluatedRows(struct, torch.cat([s[2] for s in shares])[keep], torch.cat([s[3] for s in shares])[keep])


class SlicedTrainer:
    """Mixin for a RecBole ``Trainer``: metrics by slice after each evaluation outside ``fit``
    when ``eval_slices`` is set (see the module docstring). ``fit`` takes the training counts;
    to evaluate without ``fit``, call ``trainer.eval_collector.data_collect(train_data)`` first."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.eval_collector = SliceCollector(config)
        self._fitting = False
        self.slice_result: dict | None = None

    def fit(self, train_data, *args, **kwargs):
        self.eval_collector.data_collect(train_data)
        fitting, self._fitting = self._fitting, True
        try:
            return super().fit(train_data, *args, **kwargs)
        finally:
            self._fitting = fitting

    def evaluate(self, eval_data, *args, **kwargs):
        slicing = bool(eval_data) and wanted(self.config) and not self._fitting
        if slicing:
            self._check_slices(eval_data)
        result = super().evaluate(eval_data, *args, **kwargs)
        if not slicing or result is None:
            return result
        rows = self.eval_collector.last
        if not self.config["single_spec"]:
            rows = gather_rows(rows, eval_data)
        item_counts, user_counts = self.eval_collector.counts
        self.slice_result = slice_metrics(self.evaluator, self.config, rows, item_counts, user_counts)
        result["slices"] = self.slice_result
        self.logger.info(slice_table(self.slice_result, f"{self.config['model']}: metrics by slice"))
        return result

    def _check_slices(self, eval_data) -> None:
        if not isinstance(eval_data, FullSortEvalDataLoader):
            raise InputError("eval_slices needs full-ranking evaluation (eval_args: {mode: full}); "
                             "set eval_slices: False or evaluate on all items.")
        if self.eval_collector.counts is None:
            raise InputError("eval_slices: the trainer has not seen the training data; call "
                             "trainer.eval_collector.data_collect(train_data) before evaluate (fit does it).")


@functools.cache
def sliced(trainer_class: type) -> type:
    """``trainer_class`` with :class:`SlicedTrainer` mixed in (a RecBole ``Trainer`` only)."""
    if not issubclass(trainer_class, Trainer) or issubclass(trainer_class, SlicedTrainer):
        return trainer_class
    name = f"Sliced{trainer_class.__name__}"  # its own name: a traceback or log tells it from the original
    return type(name, (SlicedTrainer, trainer_class), {"__module__": trainer_class.__module__})
