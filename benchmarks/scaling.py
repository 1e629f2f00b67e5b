"""How the cost of each model grows with the catalogue and the user base (synthetic data).

    python benchmarks/scaling.py [--items 1000,10000,100000] [--users 1000,10000] [--history 50]
                                 [--models SASRec,LRURec,LlamaRec,E4SRec,Laser,SeRALM] [--section scaling]
                                 [--records DIR] [--fresh]

Each cell (model x catalogue x users) is a record, ``benchmarks/records/scaling/<machine>/`` (committed;
one folder per CPU, flags, torch and thread count, since timings compare only within one machine),
reused by a later run with the same settings, so the grid can be filled run by run.

For every catalogue size x user count it writes a synthetic dataset (each user ``--history`` + 2
interactions drawn from a Zipf-like popularity over all items; item titles "Item N"), and for every
model measures, on RecBole's own loaders and the model's own ``calculate_loss`` / ``full_sort_predict``:

* training seconds per 1,000 rows (``--train_steps`` optimiser steps after one warm-up step);
* evaluation users/s (full-sort scoring of ``--eval_batches`` test batches plus the top-10);
* peak memory above the resident set at the start of each phase (RSS sampled every millisecond),
  the model's own bytes, and the full-sort scoring's bytes per user x item (the evaluation
  peak over batch x items), from which the largest catalogue whose full-sort scoring fits in
  ``--budget_gb`` at the evaluation batch size is computed:
  ``(budget - model bytes without its per-item part) / (per-item model bytes + batch x bytes per user x item)``.

What is left out, on purpose: stage 1 (the ID models of E4SRec/Laser and LlamaRec's retriever start
from random weights, saved as their checkpoint), and the LLM's size: the LLM models run on a tiny
random Llama (hidden 32, 2 layers, the embedded tokenizer) so that the catalogue's share of the cost
shows; SeRALM generates its knowledge with that LLM (2 new tokens) and encodes it with a tiny random
BERT (the per-item knowledge cost at real sizes is the knowledge section's). Times are from one
thread (``--num_threads``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_doc import (ROOT, bare_argv, commit, cpu_report, load_record, machine, machine_key,  # noqa: E402
                         markdown_table, write_record, write_section)

from recbole_llm.cache_io import content_key  # noqa: E402

#: One record per cell (model x catalogue x users), under a folder per machine (timings compare within one).
RECORDS = ROOT / "benchmarks" / "records" / "scaling"

MODELS = ["SASRec", "LRURec", "E4SRec", "Laser", "LlamaRec", "SeRALM"]
#: Per-model settings: batch sizes and the stage-1 checkpoint setting.
SETTINGS = {
    "SASRec": {"train_batch_size": 256},
    "LRURec": {"train_batch_size": 256},
    "LlamaRec": {"train_batch_size": 8, "ranker_eval_batch_size": 64, "candidate_k": 20},
    "E4SRec": {"train_batch_size": 32, "train_rows_per_epoch": None, "lora_r": 4},
    "Laser": {"train_batch_size": 32, "train_rows_per_epoch": None, "llm_layers": None},
    "SeRALM": {"train_batch_size": 256, "knowledge_max_new_tokens": 2, "knowledge_batch_size": 256,
               "encoder_batch_size": 512, "alignment_iterations": 0},
}
STAGE1 = {"LlamaRec": ("retriever", "retriever_checkpoint", "retriever_config"),
          "E4SRec": ("id_model", "id_model_checkpoint", "id_model_config"),
          "Laser": ("id_model", "id_model_checkpoint", "id_model_config")}
GIB = 2**30


# ------------------------------------------------------------------ data and tiny models
def write_dataset(root: Path, n_items: int, n_users: int, history: int, seed: int = 0) -> str:
    """Atomic files of ``n_users`` users with ``history`` + 2 interactions each over ``n_items`` items."""
    name = f"syn_i{n_items}_u{n_users}"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    popularity = 1.0 / (np.arange(n_items) + 10.0) ** 0.8
    items = rng.permutation(n_items)[rng.choice(n_items, size=(n_users, history + 2), p=popularity / popularity.sum())]
    users = np.repeat(np.arange(n_users), history + 2)
    times = np.tile(np.arange(history + 2), n_users)
    lines = [f"u{u}\ti{i + 1}\t{t}" for u, i, t in zip(users.tolist(), items.ravel().tolist(), times.tolist())]
    (folder / f"{name}.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(lines) + "\n")
    titles = [f"i{i}\tItem {i}" for i in range(1, n_items + 1)]
    (folder / f"{name}.item").write_text("item_id:token\tmovie_title:token_seq\n" + "\n".join(titles) + "\n")
    return name


def tiny_llm(folder: Path) -> str:
    """A tiny random Llama with the embedded tokenizer (what the tests use: tests/tiny_models.py)."""
    from recbole_llm.llm.backbone import load_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny_models import tiny_llama

    tokenizer = load_tokenizer(None)
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_text_encoder(folder: Path) -> str:
    """The embedded all-MiniLM-L6-v2's tokenizer and modules around a tiny random BERT (hidden 32)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from recbole_llm.knowledge.encoding import resolve_encoder_path

    source = resolve_encoder_path(None)
    shutil.copytree(source, folder, dirs_exist_ok=True, ignore=lambda _, names: [n for n in names if n.endswith(
        (".safetensors", ".bin", ".onnx"))])
    config = AutoConfig.from_pretrained(folder)
    config.update({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64})
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    pooling = folder / "1_Pooling" / "config.json"
    settings = json.loads(pooling.read_text())
    settings["word_embedding_dimension"] = 32
    pooling.write_text(json.dumps(settings))
    return str(folder)


# ------------------------------------------------------------------ measuring
def _glibc():
    """glibc, set so that freed memory leaves the process: every block of 128 KiB or more is its own
    mapping (a fixed threshold: glibc's sliding one keeps freed tensors on the heap, where the next phase
    reuses them unseen), and :meth:`PeakRSS.__enter__` trims the heap. None elsewhere (peaks may then
    hide behind memory an earlier phase freed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


class PeakRSS:
    """The peak resident set size above the one at entry, sampled every millisecond in a thread (after
    :meth:`exact_peaks`, the heap trimmed at entry, so memory an earlier phase freed does not hide this
    phase's peak)."""

    libc = None

    @classmethod
    def exact_peaks(cls):
        """Set glibc so that each phase's peak is its own (:func:`_glibc`). Process-wide, and it slows
        allocation-heavy code (every large tensor its own mapping): for memory curves, not timings."""
        cls.libc = _glibc()

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def __enter__(self):
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)
        self.start = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.increase = self.peak - self.start


def random_stage1(config, dataset, model_name: str, key: str, overrides: dict, folder: Path) -> str:
    """A randomly initialised stage-1 model of ``model_name`` saved as a checkpoint (no stage-1 training)."""
    import torch

    from recbole_llm import registry
    from recbole_llm.model.pretrained import id_model_config

    id_config = id_model_config(config, model_name, overrides)
    path = folder / f"{config['model']}-{key}-{model_name}-{config['dataset']}.pth"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save({"state_dict": registry.get_model(model_name)(id_config, dataset).state_dict()}, path)
    return str(path)


def load_dataset(dataset_name: str, base: dict):
    """RecBole's dataset of the cell (read with SASRec's config; every model splits it the same way)."""
    from recbole.data import create_dataset

    from recbole_llm import load_config

    with bare_argv():
        return create_dataset(load_config("SASRec", dataset_name, config_dict={**base, **SETTINGS["SASRec"]}))


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def measure(model_name: str, dataset_name: str, settings: dict, args, workdir: Path, before_scoring=None) -> dict:
    """Build ``model_name`` on ``dataset_name`` with ``settings`` (stage 1 randomly initialised), time
    ``args.train_steps`` training steps and ``args.eval_batches`` full-sort test batches, with the peak
    memory of each phase; ``before_scoring(model)`` runs between the two (e.g. quantising)."""
    import contextlib

    import torch
    from results_doc import Stopwatch

    from recbole_llm.quick_start import build

    setup, build_memory = Stopwatch(), PeakRSS()

    @contextlib.contextmanager
    def measured_setup(config, train):
        """Stage 1 randomly initialised and saved as its checkpoint, then the model's construction measured."""
        if model_name in STAGE1:
            name_key, checkpoint_key, overrides_key = STAGE1[model_name]
            overrides = dict(config[overrides_key] or {})
            if model_name == "Laser":  # Laser's stage 1 always sees Laser's history length
                overrides["MAX_ITEM_LIST_LENGTH"] = config["MAX_ITEM_LIST_LENGTH"]
            config[checkpoint_key] = random_stage1(config, train._dataset, config[name_key], checkpoint_key, overrides,
                                                   workdir)
        with setup, build_memory:
            yield

    with bare_argv():
        _, model, _, (train, _, test) = build(model_name, dataset_name, config_dict=settings, around_model=measured_setup)
    setup_s = setup.seconds

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = (batch for _ in range(args.train_steps + 1) for batch in train)  # again from the start if short
    model.train()
    rows, seconds = 0, 0.0
    with PeakRSS() as train_memory:
        for step in range(args.train_steps + 1):  # the first step warms up and is not timed
            interaction = next(batches)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model.calculate_loss(interaction)
            (sum(loss) if isinstance(loss, tuple) else loss).backward()  # a tuple of losses: RecBole sums them
            optimizer.step()
            if step:
                seconds += time.perf_counter() - start
                rows += len(interaction)

    model.eval()
    if before_scoring is not None:
        before_scoring(model)
    users, eval_seconds, batch_users = 0, 0.0, 0
    with torch.no_grad(), PeakRSS() as eval_memory:
        for index, (interaction, *_rest) in enumerate(test):
            if index == args.eval_batches:
                break
            start = time.perf_counter()
            scores = model.full_sort_predict(interaction).view(len(interaction), -1)
            scores.topk(10, dim=1)
            eval_seconds += time.perf_counter() - start
            users += len(interaction)
            batch_users = max(batch_users, len(interaction))
    n_items = train._dataset.item_num
    result = {
        "model": model_name, "items": n_items - 1, "users": train._dataset.user_num - 1,
        "setup_s": setup_s, "train_s_per_1000_rows": 1000 * seconds / rows, "train_rows_timed": rows,
        "eval_users_per_s": users / eval_seconds, "eval_users_timed": users, "eval_batch": batch_users,
        "model_bytes": tensor_bytes(model), "build_peak_bytes": build_memory.increase,
        "train_peak_bytes": train_memory.increase, "eval_peak_bytes": eval_memory.increase,
        "eval_bytes_per_user_item": eval_memory.increase / (batch_users * n_items),
    }
    del model, optimizer, train, test
    gc.collect()
    return result


def largest_catalogue(rows: list[dict], budget_bytes: float, batch: int) -> dict[str, float]:
    """Per model: the largest item count whose full-sort scoring of ``batch`` users fits ``budget_bytes``,
    from the model's bytes per item (slope over the measured catalogues) and the largest measured
    bytes per user x item."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["items"])
        if len({r["items"] for r in mine}) < 2:
            continue
        small, large = mine[0], mine[-1]
        per_item = max(0.0, (large["model_bytes"] - small["model_bytes"]) / (large["items"] - small["items"]))
        fixed = max(0.0, small["model_bytes"] - per_item * small["items"])
        per_user_item = max(r["eval_bytes_per_user_item"] for r in mine)
        if per_user_item <= 0 or large["items"] < max(r["items"] for r in rows):  # not measured at the largest size
            continue
        out[model] = (budget_bytes - fixed) / (per_item + batch * per_user_item)
    return out


def chart(rows: list[dict], path: Path) -> str | None:
    """Training s per 1,000 rows and evaluation users/s against the catalogue size (PNG), if matplotlib is there."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        for users, style in zip(sorted({r["users"] for r in rows}), ("-o", "--s")):
            mine = sorted((r for r in rows if r["model"] == model and r["users"] == users), key=lambda r: r["items"])
            if not mine:
                continue
            label = f"{model}, {users:,} users"
            left.plot([r["items"] for r in mine], [r["train_s_per_1000_rows"] for r in mine], style, label=label)
            right.plot([r["items"] for r in mine], [r["eval_users_per_s"] for r in mine], style, label=label)
    for axis, title in ((left, "training s per 1,000 rows"), (right, "evaluation users/s")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("items")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path.name


def report(rows: list[dict], args, chart_name: str | None) -> str:
    header = ["model", "items", "users", "train s / 1k rows", "eval users/s", "model MiB", "train peak MiB",
              "eval peak MiB", "eval bytes / (user x item)", "setup s"]
    table = markdown_table(header, [[
        r["model"], f"{r['items']:,}", f"{r['users']:,}", f"{r['train_s_per_1000_rows']:.2f}",
        f"{r['eval_users_per_s']:.1f}", f"{r['model_bytes'] / 2**20:.1f}", f"{r['train_peak_bytes'] / 2**20:.0f}",
        f"{r['eval_peak_bytes'] / 2**20:.0f}", f"{r['eval_bytes_per_user_item']:.1f}", f"{r['setup_s']:.1f}",
    ] for r in rows])
    fits = largest_catalogue(rows, args.budget_gb * GIB, args.budget_batch)
    fit_table = markdown_table(["model", f"largest catalogue in {args.budget_gb:g} GB ({args.budget_batch} users/batch)"],
                               [[m, f"{n:,.0f} items"] for m, n in fits.items()])
    picture = f"![cost against catalogue size]({chart_name})\n\n" if chart_name else ""
    return (f"Synthetic data: {args.history} + 2 interactions per user, Zipf-like item popularity; "
            f"{args.train_steps} timed training steps and {args.eval_batches} evaluation batches per cell; "
            f"LLM models on a tiny random Llama (see benchmarks/scaling.py for what is left out).\n\n"
            f"{picture}{table}\n\nFull-sort scoring within the budget (model bytes per item from the "
            f"catalogue slope, the largest measured evaluation bytes per user x item; the LLM's own weights, "
            f"which do not grow with the catalogue, are those of the tiny Llama):\n\n{fit_table}\n")


def cell_settings(model_name: str, n_items: int, n_users: int, args) -> dict:
    """What a cell's record is keyed by: the model, the data's shape and how it is timed."""
    return {"model": model_name, "items": n_items, "users": n_users, "history": args.history,
            "train_steps": args.train_steps, "eval_batches": args.eval_batches,
            "eval_batch_size": args.eval_batch_size, "settings": SETTINGS[model_name]}


def record_path(records: Path, settings: dict) -> Path:
    key = content_key(settings, length=10)
    return records / f"{settings['model']}-{settings['items']}-{settings['users']}-{key}.json"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="1000,10000,100000")
    parser.add_argument("--users", default="1000,10000")
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--eval_batches", type=int, default=2)
    parser.add_argument("--eval_batch_size", type=int, default=256)
    parser.add_argument("--budget_gb", type=float, default=24.0)
    parser.add_argument("--budget_batch", type=int, default=256, help="users per full-sort batch in the budget")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--records", default=str(RECORDS), help="one record per cell, under a folder per machine")
    parser.add_argument("--fresh", action="store_true", help="measure every cell anew instead of reusing its record")
    parser.add_argument("--section", default=None, help="write this section of docs/RESULTS.md (e.g. scaling)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.num_threads)
    PeakRSS.exact_peaks()
    cpu = cpu_report()
    records = Path(args.records) / machine_key(cpu, args.num_threads)
    workdir = Path(tempfile.mkdtemp(prefix="scaling-"))
    rows, failures = [], []
    try:
        base = {
            "data_path": str(workdir / "data"), "checkpoint_dir": str(workdir / "saved"),
            "knowledge_dir": str(workdir / "knowledge"), "knowledge_vector_dir": str(workdir / "vectors"),
            "llm_path": tiny_llm(workdir / "llm"), "text_encoder": tiny_text_encoder(workdir / "encoder"),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title"]},
            "item_text_fields": ["movie_title"], "knowledge_fields": {"title": "movie_title"},
            "user_inter_num_interval": None, "item_inter_num_interval": None,
            "MAX_ITEM_LIST_LENGTH": args.history, "eval_batch_size": args.eval_batch_size,
            "show_progress": False, "state": "WARNING", "use_gpu": False, "num_threads": args.num_threads,
        }
        for n_users in [int(u) for u in args.users.split(",")]:
            for n_items in [int(i) for i in args.items.split(",")]:
                dataset = None  # written when a cell has no record
                for model_name in args.models.split(","):
                    settings = cell_settings(model_name, n_items, n_users, args)
                    path = record_path(records, settings)
                    record = None if args.fresh else load_record(path)
                    if record is not None:
                        print(f"reusing {path}", flush=True)
                        rows.append(record["row"])
                        continue
                    start = time.perf_counter()
                    try:
                        if dataset is None:
                            dataset = load_dataset(write_dataset(workdir / "data", n_items, n_users, args.history), base)
                        row = measure(model_name, dataset.dataset_name, {**base, **SETTINGS[model_name]}, args,
                                      workdir)
                    except Exception as error:  # noqa: BLE001 - one cell's failure is reported, the rest still run
                        failures.append(f"{model_name}, {n_items:,} items, {n_users:,} users: "
                                        f"{type(error).__name__}: {str(error)[:200]}")
                        print(failures[-1], flush=True)
                        continue
                    row["wall_s"] = time.perf_counter() - start
                    write_record(path, {"settings": settings, "machine": cpu, "machine_line": machine(),
                                        "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        "row": row})
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if dataset is not None:
                    name = dataset.dataset_name
                    del dataset
                    shutil.rmtree(workdir / "data" / name, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failed = "".join(f"\n- failed: {line}" for line in failures)
    if args.section:
        from results_doc import RESULTS

        chart_name = chart(rows, RESULTS.parent / "scaling.png")
        write_section(args.section, "How cost grows with the catalogue (synthetic data)",
                      report(rows, args, chart_name) + failed)
    else:
        print(report(rows, args, None) + failed)
    return rows


if __name__ == "__main__":
    main()
