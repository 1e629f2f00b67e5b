"""Every model we ship and six RecBole baselines under one protocol: docs/RESULTS.md "report" section.

    python benchmarks/report.py --dataset ml-100k            # or: make report
    python benchmarks/report.py --models LRURec,SASRec --epochs=4 --SASRec.train_batch_size=512
    python benchmarks/report.py --tables_only                # re-assemble the tables, run nothing

Each model runs in its own process (``--one MODEL``, which can also be run by hand), so its
peak memory is its own; the process writes ``<report_dir>/<dataset>/<MODEL>.json`` (atomically;
default ``benchmarks/records/report``, committed, so the report grows run by run across sessions)
with its test and best validation metrics, setup/fit/evaluation wall times, evaluation users/s,
peak resident memory, trainable/total parameters, the date, machine, command and a hash of the
settings that shaped it, and its log goes to ``<MODEL>.log`` beside it.

Incremental and resumable: a model whose record holds a result for the same settings hash (the
model, dataset, overrides, its final config minus volatile keys and the dataset files:
:func:`recbole_llm.cache_io.config_key`) and measured on code that has the model's last change
(``status.CHANGES``) is reused, not re-run (``--rerun`` or ``--rerun=A,B`` forces it). A failed
model is recorded ("not run: ...") and tried again next time; the others go on. Stage-1 models
(retrievers, ID models, SeRALM's reference) are reused from ``checkpoint_dir/stage1`` by the models
themselves when their inputs have not changed, and an interrupted training continues (``resume: True``). The tables are assembled from every record
present in the folder, each row with the date it was measured.

Settings: each model's shipped defaults (properties/*.yaml over RecBole's) with
``show_progress: False``, the RecBole baselines capped at ``BASELINE_EPOCHS`` epochs (Caser with its paper's
``MAX_ITEM_LIST_LENGTH``, ``BASELINE_SETTINGS``);
``--key=value`` overrides every model, ``--MODEL.key=value`` one model.

SeRALM's knowledge cache takes hours to generate on a CPU: unless ``--allow_generation`` is given,
a run that would generate knowledge (the un-aligned cache missing, or alignment that regenerates
every item's knowledge) stops at once and is recorded as not run, with the command that fixes it.

Outputs: the "report" section of ``--results_file`` (docs/RESULTS.md): a quality table, a cost
table, a relative-gain table (ours vs the paper's) and ``report-<dataset>-ndcg10.png`` beside it;
every model runs with ``eval_slices``, so the section also has NDCG@10 per slice (target
popularity, history length) and ``report-<dataset>-slices.png``, a chart per slice.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import results_doc
from results_doc import (METRICS, ROOT, bare_argv, load_record, machine, markdown_table, parse_overrides,
                         split_overrides, write_atomically, write_record)
from status import CHANGES, is_current

#: The records (committed, so that the report grows across sessions; each model's log beside its record, ignored).
RECORDS = ROOT / "benchmarks" / "records" / "report"
BASELINES = ["SASRec", "GRU4Rec", "NARM", "BERT4Rec", "Caser", "LightSANs"]
#: Epoch cap of the RecBole baselines unless --epochs / --MODEL.epochs says otherwise: an epoch over
#: ml-100k's ~97k prefix rows takes ~75 s on 2 cores, so 8 epochs keep each run near 10 minutes
#: (as benchmarks/lrurec_vs_sasrec.py; early stopping may end a run sooner).
BASELINE_EPOCHS = 8
#: A baseline's own paper setting where RecBole's shared default would cost hours: Caser's horizontal filters
#: span every history length up to L ("Personalized Top-N Sequential Recommendation via Convolutional Sequence
#: Embedding", Tang & Wang, WSDM 2018: L = 5 on MovieLens); at RecBole's L = 50, one epoch took over 20 minutes on
#: one thread (fifty filter heights), so 8 epochs would take hours.
BASELINE_SETTINGS = {"Caser": {"MAX_ITEM_LIST_LENGTH": 5}}
#: Our LLM models: the setting naming the model each builds on (its "base"), and that setting's default.
BASE_SETTING = {"LlamaRec": ("retriever", "LRURec"), "E4SRec": ("id_model", "SASRec"),
                "Laser": ("id_model", "SASRec"), "SeRALM": ("base_model", "SASRec")}
#: Our models whose base is measured inside their own run (``base_result``): LlamaRec's candidates leave out the
#: user's history (the authors' protocol), so its base is the retriever under that rule, not the retriever's row.
OWN_BASE = {"LlamaRec": ("history excluded", "the retriever under LlamaRec's candidate rule, measured in its run")}
#: Models compared with a fixed base (not a setting).
FIXED_BASE = {"LRURec": "SASRec"}


@dataclass(frozen=True)
class PaperGain:
    ours: float  # the paper's NDCG@10 of the model
    base: float  # the paper's NDCG@10 of the base model
    source: str

    @property
    def gain(self) -> float:
        return self.ours / self.base - 1


#: The papers' relative NDCG@10 gains over the base, on the dataset closest to ml-100k.
PAPER_GAINS = {
    # LlamaRec paper (arXiv:2311.02089), Table 1, "ML-100k" column, N@10: LlamaRec 0.0759 vs
    # LRU 0.0705. Their "ML-100k" is MovieLens latest-small (610 users, 3,650 items; Table 2), not RecBole's.
    ("LlamaRec", "LRURec"): PaperGain(0.0759, 0.0705, "LlamaRec paper, Table 1, ML-100k (latest-small), NDCG@10"),
    # The same table, LRURec vs SASRec: N@10 0.0705 vs 0.0522 (closer to ml-100k than the LRURec paper's
    # ML-1M numbers, 0.1930 vs 0.1902, arXiv:2310.02367).
    ("LRURec", "SASRec"): PaperGain(0.0705, 0.0522, "LlamaRec paper, Table 1, ML-100k (latest-small), NDCG@10"),
    # SeRALM paper (SIGIR 2024), Table 1, MovieLens (ML-1M, Table 2), NDCG@10 (%),
    # Base vs Base+SeRALM: SASRec 10.08 -> 10.37, LightSANs 11.26 -> 11.54, Caser 8.08 -> 8.29.
    ("SeRALM", "SASRec"): PaperGain(10.37, 10.08, "SeRALM paper, Table 1, MovieLens-1M, NDCG@10"),
    ("SeRALM", "LightSANs"): PaperGain(11.54, 11.26, "SeRALM paper, Table 1, MovieLens-1M, NDCG@10"),
    ("SeRALM", "Caser"): PaperGain(8.29, 8.08, "SeRALM paper, Table 1, MovieLens-1M, NDCG@10"),
}
#: Why a model has no paper number.
NO_PAPER_GAIN = {
    "E4SRec": "no paper number on a comparable protocol: the E4SRec paper (arXiv:2312.02443) ranks 99 sampled negatives",
    "Laser": "no paper number: only the abstract of the Laser paper (arXiv:2409.01605) was at hand",
}
VOLATILE_RECORD_KEYS = ("run_id",)


# --------------------------------------------------------------------------- helpers
def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def record_path(report_dir, dataset: str, model: str) -> Path:
    return Path(report_dir) / dataset / f"{model}.json"


def config_dict(overrides: dict) -> dict:
    """The child's settings: the overrides over quiet progress and metrics by slice (neither changes
    what a model learns, so neither is in the settings hash: :data:`recbole_llm.cache_io._VOLATILE`)."""
    return {"show_progress": False, "eval_slices": True, **overrides}


def settings_hash(model: str, dataset: str, overrides: dict) -> str:
    """Hash of what shapes a model's result: name, dataset, overrides, final config and data files.

    Raises the config's own error (unknown model, wrong setting type) when there is no config."""
    from recbole_llm.cache_io import config_key
    from recbole_llm.quick_start import load_config

    with bare_argv():
        config = load_config(model, dataset, config_dict=config_dict(overrides))
    text = json.dumps([model, dataset, overrides, config_key(config)], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def fallback_hash(model: str, dataset: str, overrides: dict) -> str:
    text = json.dumps([model, dataset, overrides], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def peak_rss_mb() -> float:
    """Peak resident memory of this process. VmHWM, not ru_maxrss: after fork + exec, Linux's
    ru_maxrss carries the parent's peak (measured: a child of an 800 MB parent reports 811 MB)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# --------------------------------------------------------------------------- one model (child process)
def knowledge_missing(config) -> str | None:
    """Why building SeRALM would generate its knowledge (the cache its settings address is missing
    or unfinished: hours on a CPU), with the command that generates it; None otherwise. A cache
    whose items changed since it was written is not detected (SeRALM then completes it)."""
    from recbole_llm.knowledge.generation import adapter_dir_fingerprint, knowledge_cache_for, knowledge_dir

    if config["model"] != "SeRALM":
        return None
    adapter = config["llm_adapter"]
    cache = knowledge_cache_for(config, config["dataset"], adapter_dir_fingerprint(adapter) if adapter else None)
    if cache.final.is_file() and not cache.parts():
        return None
    return (f"the knowledge cache of {config['dataset']} (in {knowledge_dir(config)}) is missing or incomplete; "
            f"generate it first: python -m recbole_llm.knowledge.generation --dataset {config['dataset']} "
            "(hours on a CPU). Rerun with --allow_generation to let the report do it.")


def alignment_needs_generation(trainer) -> str | None:
    """Why SeRALM's fit would regenerate every item's knowledge (its trainer's dry run), with the way
    around it; None otherwise (or for another model's trainer)."""
    reason = trainer.generation_needed() if hasattr(trainer, "generation_needed") else None
    if reason is None:
        return None
    hint = ("" if trainer.adapter_cached(trainer.alignment_dir()) else
            ", or give --SeRALM.alignment_iterations=0 (Base+NA_LLM) or --SeRALM.llm_adapter=DIR")
    return f"{reason} (hours on a CPU). Rerun with --allow_generation (once){hint}."


def resume_pending(config) -> bool:
    """True when an interrupted training of these settings will be continued (fit time is then partial)."""
    from recbole_llm.cache_io import config_key

    folder = Path(config["checkpoint_dir"]) / "resume"
    return any(folder.glob(f"{config['model']}-{config['dataset']}-*-{config_key(config)}.pth"))


def base_model_of(model_name: str, config) -> str | None:
    if model_name in BASE_SETTING:
        key, default = BASE_SETTING[model_name]
        return config[key] if key in config and config[key] else default
    return FIXED_BASE.get(model_name)


def run_one(model_name: str, dataset: str, extra: list[str], report_dir, run_id: str | None = None,
            expected_hash: str | None = None, allow_generation: bool = False) -> int:
    """Train and test one model in this process and write its record; 0 if it ran."""
    overrides = parse_overrides(extra)
    path = record_path(report_dir, dataset, model_name)
    record = {"model": model_name, "dataset": dataset, "status": "error", "error": None, "overrides": overrides,
              "settings_hash": expected_hash, "run_id": run_id or uuid.uuid4().hex, "started": utc_now(),
              "command": re.sub(r" --(run_id|settings_hash)=\S+", "", results_doc.command()), "code": git_commit()}
    try:
        if record["settings_hash"] is None:
            record["settings_hash"] = settings_hash(model_name, dataset, overrides)
        from recbole_llm.errors import MissingInputError
        from recbole_llm.quick_start import build, load_config

        if not allow_generation:
            with bare_argv():
                reason = knowledge_missing(load_config(model_name, dataset, config_dict=config_dict(overrides)))
            if reason:
                raise MissingInputError(reason)
        start = time.perf_counter()
        with bare_argv():
            config, model, trainer, (train, valid, test) = build(model_name, dataset, config_dict=config_dict(overrides))
        record["setup_seconds"] = time.perf_counter() - start
        record["base_model"] = base_model_of(model_name, config)
        if not allow_generation and (reason := alignment_needs_generation(trainer)):
            raise MissingInputError(reason)
        record["resumed"] = resume_pending(config)
        start = time.perf_counter()
        best_valid_score, best_valid_result = trainer.fit(train, valid, saved=True, show_progress=config["show_progress"])
        record["fit_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        test_result = trainer.evaluate(test, load_best_model=True, show_progress=config["show_progress"])
        record["eval_seconds"] = time.perf_counter() - start
        record["test_users"] = int(getattr(test, "sample_size", 0) or len(test.dataset))
        record["eval_users_per_s"] = record["test_users"] / max(record["eval_seconds"], 1e-9)
        from recbole_llm.llm.pluggable import count_parameters

        record["trainable_params"], record["total_params"] = count_parameters(model)
        record["test_result"] = {k: float(v) for k, v in dict(test_result).items() if k != "slices"}
        record["slices"] = test_result.get("slices")
        record["best_valid_result"] = {k: float(v) for k, v in dict(best_valid_result or {}).items()}
        record["best_valid_score"] = float(best_valid_score) if best_valid_score is not None else None
        if model_name == "LlamaRec":  # its fair base: the retriever under its candidates' history rule
            from llamarec_quality import retriever_excluded

            record["base_result"] = {k: float(v) for k, v in retriever_excluded(trainer, test, config["topk"])[0].items()}
        record["settings"] = {k: config[k] for k in ("epochs", "train_batch_size", "MAX_ITEM_LIST_LENGTH", "seed")
                              if k in config}
        record["status"] = "ok"
    except Exception as error:  # recorded; the report goes on with the next model
        import traceback

        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc()[-4000:]
        print(record["traceback"], file=sys.stderr, flush=True)
    record["peak_rss_mb"] = peak_rss_mb()
    record["date"] = utc_now()
    record["machine"] = machine()
    record["load_average"] = os.getloadavg()[1]
    write_record(path, record)
    return 0 if record["status"] == "ok" else 1


# --------------------------------------------------------------------------- the report (parent process)
def child_command(model: str, dataset: str, extra: list[str], report_dir, run_id: str, expected_hash: str,
                  allow_generation: bool) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", model, "--dataset", dataset,
               f"--report_dir={report_dir}", f"--run_id={run_id}", f"--settings_hash={expected_hash}"]
    return command + (["--allow_generation"] if allow_generation else []) + extra


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_model(model: str, dataset: str, extra: list[str], report_dir, rerun: bool, allow_generation: bool,
              timeout_minutes: float | None) -> dict:
    """Reuse ``model``'s record if it holds a result for the same settings, else run it in a child process."""
    overrides = parse_overrides(extra)
    path = record_path(report_dir, dataset, model)
    old = load_record(path)
    try:
        expected = settings_hash(model, dataset, overrides)
    except Exception as error:  # no config at all (unknown model, wrong setting type): nothing to run
        record = {"model": model, "dataset": dataset, "status": "error", "error": f"{type(error).__name__}: {error}",
                  "overrides": overrides, "settings_hash": fallback_hash(model, dataset, overrides),
                  "date": utc_now(), "machine": machine(), "command": results_doc.command()}
        write_record(path, record)
        print(f"{model}: not run: {record['error']}", flush=True)
        return record
    current = old and is_current(model, {"commit": old.get("code"), "date": old.get("date")})
    if old and old.get("status") == "ok" and old.get("settings_hash") == expected and current and not rerun:
        print(f"{model}: reused {path} (measured {old.get('date')}, same settings {expected})", flush=True)
        return old
    if old and old.get("status") == "ok" and old.get("settings_hash") != expected and not rerun:
        print(f"{model}: settings changed since {old.get('date')}: running again", flush=True)
    elif old and old.get("status") == "ok" and not current and not rerun:
        print(f"{model}: measured {old.get('date')}, before {CHANGES[model][1]}: running again", flush=True)
    run_id = uuid.uuid4().hex
    log = path.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    command = child_command(model, dataset, extra, report_dir, run_id, expected, allow_generation)
    print(f"{model}: running (log: {log})", flush=True)
    start = time.perf_counter()
    error = None
    with open(log, "w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  timeout=timeout_minutes * 60 if timeout_minutes else None).returncode
        except subprocess.TimeoutExpired:
            code, error = None, f"timed out after {timeout_minutes:g} min (--timeout)"
    record = load_record(path)
    if not record or record.get("run_id") != run_id:  # the child died before writing its record
        error = error or f"the model's process ended with exit code {code} before writing its record"
        record = {"model": model, "dataset": dataset, "status": "error", "error": error, "overrides": overrides,
                  "settings_hash": expected, "run_id": run_id, "date": utc_now(), "machine": machine(),
                  "command": " ".join(command[1:]), "log_tail": log_tail(log)}
        write_record(path, record)
    minutes = (time.perf_counter() - start) / 60
    if record.get("status") == "ok":
        print(f"{model}: NDCG@10 {record['test_result'].get('ndcg@10', float('nan')):.4f}, {minutes:.1f} min", flush=True)
    else:
        print(f"{model}: not run: {record.get('error')} ({minutes:.1f} min; log: {log})", flush=True)
    return record


def baseline_defaults(model: str, overrides: list[str]) -> list[str]:
    """The report's settings of a RecBole baseline that ``overrides`` leave unset: :data:`BASELINE_EPOCHS`
    epochs and :data:`BASELINE_SETTINGS`."""
    given = {o.split("=", 1)[0].removeprefix("--") for o in overrides}
    settings = {"epochs": BASELINE_EPOCHS, **BASELINE_SETTINGS.get(model, {})}
    return [f"--{key}={value}" for key, value in settings.items() if key not in given]


def default_models() -> list[str]:
    from recbole_llm.registry import our_models

    return our_models() + [m for m in BASELINES if m not in our_models()]


def ordered(names) -> list[str]:
    from recbole_llm.registry import MODELS

    ours, rest = list(MODELS), BASELINES
    rank = {name: i for i, name in enumerate(ours + rest)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def all_records(report_dir, dataset: str) -> dict[str, dict]:
    folder = Path(report_dir) / dataset
    records = {}
    for path in sorted(folder.glob("*.json")):
        record = load_record(path)
        if record and record.get("model"):
            records[record["model"]] = record
    return {name: records[name] for name in ordered(records)}


def ok(record: dict | None) -> bool:
    return bool(record) and record.get("status") == "ok" and "ndcg@10" in record.get("test_result", {})


def cell_text(text: str, limit: int = 240) -> str:
    text = re.sub(r"\s+", " ", str(text)).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_date(record: dict) -> str:
    return (record.get("date") or "?")[:16]


def gain_rows(records: dict[str, dict]) -> list[dict]:
    """Ours vs paper relative NDCG@10 gain of each of our models that has a base, in report order."""
    rows = []
    for name, record in records.items():
        key, default = BASE_SETTING.get(name, (None, FIXED_BASE.get(name)))
        base = record.get("base_model") or (record.get("overrides") or {}).get(key) or default
        if not base:
            continue
        ours, fair_base = None, (record.get("base_result") or {}).get("ndcg@10")
        if not ok(record):
            note = "not run"
        elif name in OWN_BASE and fair_base is None:
            note = (f"not comparable with {base}'s row: {': '.join(OWN_BASE[name])}; rerun {name} (--rerun={name}) "
                    "to record it")
        elif fair_base is None and not ok(records.get(base)):
            note = f"{base} not in the report"
        else:
            reference = fair_base if fair_base is not None else records[base]["test_result"]["ndcg@10"]
            ours = record["test_result"]["ndcg@10"] / reference - 1 if reference > 0 else None
            note = "" if ours is not None else f"{base} NDCG@10 is 0"
        paper = PAPER_GAINS.get((name, base))
        paper_note = paper.source if paper else NO_PAPER_GAIN.get(name, f"no paper number for {name} vs {base}")
        base = f"{base}, {OWN_BASE[name][0]}" if ours is not None and name in OWN_BASE else base
        rows.append({"model": name, "base": base, "ours": ours, "note": note, "paper": paper.gain if paper else None,
                     "paper_note": paper_note})
    return rows


def percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:+.1f}%"


def quality_table(records: dict[str, dict]) -> str:
    sasrec = records.get("SASRec")
    ref = sasrec["test_result"]["ndcg@10"] if ok(sasrec) and sasrec["test_result"]["ndcg@10"] > 0 else None
    rows = []
    for name, record in records.items():
        if ok(record):
            test = record["test_result"]
            ratio = f"{test['ndcg@10'] / ref:.3f}" if ref else "-"
            rows.append([name] + [f"{test[m]:.4f}" if m in test else "-" for m in METRICS] + [ratio, short_date(record)])
        else:
            rows.append([name, "not run: " + cell_text(record.get("error") or "?")] + ["-"] * len(METRICS)
                        + [short_date(record)])
    return markdown_table(["model"] + METRICS + ["NDCG@10 / SASRec", "measured (UTC)"], rows)


def torch_threads(record: dict) -> str:
    """The torch thread count of the run, from its machine line (:func:`results_doc.machine`)."""
    found = re.search(r"(\d+) threads?,", record.get("machine", ""))
    return found.group(1) if found else "-"


def cost_table(records: dict[str, dict]) -> str:
    rows = []
    for name, record in records.items():
        if not ok(record):
            peak = f"{record['peak_rss_mb']:.0f}" if record.get("peak_rss_mb") else "-"
            rows.append([name, "not run", "-", "-", peak, "-", short_date(record), "-", "-"])
            continue
        fit = f"{record['fit_seconds'] / 60:.1f}" + (" (resumed)" if record.get("resumed") else "")
        rows.append([
            name, f"{record['setup_seconds'] / 60:.1f}", fit, f"{record['eval_users_per_s']:.1f}",
            f"{record['peak_rss_mb']:.0f}", f"{record['trainable_params']:,} / {record['total_params']:,}",
            short_date(record), torch_threads(record), f"{record.get('load_average', float('nan')):.1f}",
        ])
    header = ["model", "setup min (data, model, stage 1)", "train min (fit)", "eval users/s", "peak memory MB",
              "trainable / total params", "measured (UTC)", "torch threads", "load avg"]
    return markdown_table(header, rows)


def gain_table(gains: list[dict]) -> str:
    rows = [[g["model"], g["base"], percent(g["ours"]) if g["ours"] is not None else g["note"] or "-",
             percent(g["paper"]), cell_text(g["paper_note"])] for g in gains]
    return markdown_table(["model", "compared with", "ours: NDCG@10 gain", "paper: NDCG@10 gain", "paper source"], rows)


def plot(records: dict[str, dict], gains: list[dict], path: Path, dataset: str) -> None:
    """Bars of NDCG@10 per model, and ours vs the paper's relative gain; PNG written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from recbole_llm.registry import MODELS

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    names = list(records)
    values = [records[n]["test_result"]["ndcg@10"] if ok(records[n]) else 0.0 for n in names]
    colors = ["tab:blue" if n in MODELS else "tab:gray" for n in names]
    bars = left.bar(range(len(names)), values, color=colors)
    for bar, name, value in zip(bars, names, values):
        label = f"{value:.4f}" if ok(records[name]) else "not run"
        left.annotate(label, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8,
                      xytext=(0, 2), textcoords="offset points", rotation=0 if ok(records[name]) else 90)
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    left.set_ylabel("test NDCG@10")
    left.set_title(f"NDCG@10 on {dataset} (blue: recbole-llm, gray: RecBole baselines)", fontsize=10)
    left.margins(y=0.25)

    width = 0.38
    xs = range(len(gains))
    ours = [100 * g["ours"] if g["ours"] is not None else 0.0 for g in gains]
    paper = [100 * g["paper"] if g["paper"] is not None else 0.0 for g in gains]
    right.bar([x - width / 2 for x in xs], ours, width, label="ours", color="tab:blue")
    right.bar([x + width / 2 for x in xs], paper, width, label="paper", color="tab:orange")
    for x, g, o, p in zip(xs, gains, ours, paper):
        right.annotate(percent(g["ours"]) if g["ours"] is not None else (g["note"] or "n/a"), (x - width / 2, o),
                       ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
        right.annotate(percent(g["paper"]) if g["paper"] is not None else "no paper number", (x + width / 2, p),
                       ha="center", va="bottom", fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    right.axhline(0, color="black", linewidth=0.8)
    right.set_xticks(list(xs), [f"{g['model']}\nvs {g['base']}" for g in gains], fontsize=8)
    right.set_ylabel("relative NDCG@10 gain over the base (%)")
    right.set_title("Gain over the base model: ours vs the paper's", fontsize=10)
    right.margins(y=0.4)
    right.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


def slice_names() -> list[tuple[str, str]]:
    from recbole_llm.trainer.slices import SLICES

    return [(group, name) for group, names in SLICES.items() for name in names]


def sliced(records: dict[str, dict]) -> dict[str, dict]:
    """The records that hold metrics by slice (runs with ``eval_slices``)."""
    return {name: r for name, r in records.items() if ok(r) and r.get("slices")}


def slice_table(records: dict[str, dict]) -> str:
    """Test NDCG@10 +- its standard error per slice and model, then the users per slice."""
    rows = []
    for name, record in sliced(records).items():
        cells = []
        for group, part in slice_names():
            m = record["slices"][group][part]
            se = f" ± {m['ndcg@10_se']:.4f}" if m.get("ndcg@10_se") is not None else ""
            cells.append(f"{m['ndcg@10']:.4f}{se}" if "ndcg@10" in m else "-")
        rows.append([name] + cells + [short_date(record)])
    first = next(iter(sliced(records).values()))["slices"]
    users = [str(first[g][p]["users"]) for g, p in slice_names()]
    ranges = ["{}-{}".format(*first[g][p]["range"]) if "range" in first[g][p] else "-" for g, p in slice_names()]
    rows += [["users"] + users + [""], ["training interactions"] + ranges + [""]]
    header = ["model"] + [f"{g} {p}" for g, p in slice_names()] + ["measured (UTC)"]
    return markdown_table(header, rows)


def plot_slices(records: dict[str, dict], path: Path, dataset: str) -> None:
    """One chart per slice: test NDCG@10 per model with its standard error; PNG written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from recbole_llm.registry import MODELS

    chosen = sliced(records)
    names = list(chosen)
    fig, axes = plt.subplots(2, 4, figsize=(15, 7), sharey=True)
    for ax, (group, part) in zip([*axes[0], *axes[1]], slice_names()):
        values = [chosen[n]["slices"][group][part].get("ndcg@10", 0.0) for n in names]
        errors = [chosen[n]["slices"][group][part].get("ndcg@10_se") or 0.0 for n in names]
        ax.bar(range(len(names)), values, yerr=errors, capsize=3,
               color=["tab:blue" if n in MODELS else "tab:gray" for n in names])
        users = chosen[names[0]]["slices"][group][part]["users"]
        ax.set_title(f"{group}: {part} ({users} users)", fontsize=10)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axes[1][3].axis("off")
    axes[0][0].set_ylabel("test NDCG@10")
    axes[1][0].set_ylabel("test NDCG@10")
    fig.suptitle(f"NDCG@10 by slice on {dataset} (blue: recbole-llm, gray: RecBole; bars: standard error)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


def slice_section(records: dict[str, dict], results_file: Path, dataset: str) -> list[str]:
    """The "by slice" part of the report (empty when no record has slices)."""
    if not sliced(records):
        return []
    png = Path(results_file).parent / f"report-{dataset}-slices.png"
    plot_slices(records, png, dataset)
    return ["### Quality by slice (test NDCG@10 ± standard error)", "", slice_table(records), "",
            f"![NDCG@10 by slice]({os.path.relpath(png, Path(results_file).parent)})", "",
            "Slices of the test users (`eval_slices`): the target item's popularity in the training split "
            "(cold: under 5 interactions; tail / torso / head: a third of the other items' interactions each) "
            "and the user's history length (short / medium / long: thirds of the users); the last two rows "
            "give each slice's users and its range of training interactions. Records made before "
            "`eval_slices` have no slice row until their model runs again (`--rerun=MODEL`).", ""]


def overrides_note(records: dict[str, dict]) -> str:
    texts = {name: json.dumps(r.get("overrides") or {}, sort_keys=True) for name, r in records.items()}
    if set(texts.values()) == {"{}"}:
        return "Every model with its shipped defaults (no overrides)."
    if len(set(texts.values())) == 1:
        return f"Overrides on top of the shipped defaults, the same for every model: `{next(iter(texts.values()))}`"
    lines = [f"- {name}: `{text}`" for name, text in texts.items()]
    return "Overrides on top of the shipped defaults:\n\n" + "\n".join(lines)


def assemble(dataset: str, report_dir, results_file: Path, argv: list[str]) -> str:
    records = all_records(report_dir, dataset)
    if not records:
        raise SystemExit(f"report.py: no records in {Path(report_dir) / dataset}; run some models first")
    gains = gain_rows(records)
    png = Path(results_file).parent / f"report-{dataset}-ndcg10.png"
    plot(records, gains, png, dataset)
    rel_png = os.path.relpath(png, Path(results_file).parent)
    body = "\n".join([
        f"Records: `{Path(report_dir) / dataset}/<model>.json` (each row: the date it was measured).",
        "",
        "### Quality (test set)",
        "",
        quality_table(records),
        "",
        "### Cost",
        "",
        cost_table(records),
        "",
        "### Relative gain over the base model: ours vs the paper's",
        "",
        gain_table(gains),
        "",
        f"![NDCG@10 per model and relative gains]({rel_png})",
        "",
        *slice_section(records, results_file, dataset),
        overrides_note(records),
        "",
        f"Protocol: {dataset}, leave-one-out in time order, full ranking over all items, test metrics of the "
        "checkpoint best on validation NDCG@10 (properties/overall.yaml); each model with its shipped settings "
        "(properties/model/<Model>.yaml over RecBole's own), one run, seed 2020. Setup = data, model construction "
        "and stage 1 (trained, or reused from checkpoint_dir/stage1); train = `trainer.fit` wall time (training and "
        "per-epoch validation); eval users/s = test users / wall time of `trainer.evaluate` (loading the best "
        "checkpoint included); peak memory = the model's own process (VmHWM). LlamaRec's candidates leave out the "
        "user's history (the authors' protocol) while the other rows may recommend history items, so its row is not "
        "comparable with theirs: its gain is over its retriever under the same rule, measured in its own run. The "
        "base of each other gain is this report's own row of that model (the LLM models' stage 1 is a separate "
        "training with their stage-1 settings). The papers' gains come from other datasets, LLMs and protocols (LlamaRec: MovieLens "
        "latest-small, Llama-2-7B; SeRALM: ML-1M, Llama-2-7b-chat); compare directions, not sizes. "
        "Rows measured at different times on shared cores: compare times with the load average in mind.",
    ])
    command_line = "python " + " ".join([os.path.relpath(Path(__file__).resolve(), ROOT)] + list(argv))
    results_doc.write_section("report", f"All models on {dataset}: quality and cost", body,
                              results=Path(results_file), command_line=command_line)
    return body


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default=None, help="comma-separated; default: ours + " + ",".join(BASELINES))
    parser.add_argument("--rerun", nargs="?", const="all", default="",
                        help="run again even if a record with the same settings exists (all, or A,B)")
    parser.add_argument("--tables_only", "--dry_run", action="store_true", help="assemble the tables, run nothing")
    parser.add_argument("--allow_generation", action="store_true",
                        help="let SeRALM generate its knowledge cache (hours on a CPU)")
    parser.add_argument("--timeout", type=float, default=None, help="minutes per model (default: none)")
    parser.add_argument("--report_dir", default=str(RECORDS),
                        help="records: <report_dir>/<dataset>/<model>.json (default: committed; logs beside them, ignored)")
    parser.add_argument("--results_file", default=str(results_doc.RESULTS), help="the markdown file to write")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: run this model only
    parser.add_argument("--run_id", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--settings_hash", default=None, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args(argv)
    shared, per_model = split_overrides(extra)

    if args.one:
        return run_one(args.one, args.dataset, extra, args.report_dir, args.run_id, args.settings_hash,
                       args.allow_generation)

    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else default_models()
    rerun = set(models) if args.rerun == "all" else {m for m in args.rerun.split(",") if m}
    if not args.tables_only:
        for model in models:
            overrides = shared + per_model.get(model, [])
            if model in BASELINES:
                overrides = baseline_defaults(model, overrides) + overrides
            run_model(model, args.dataset, overrides, args.report_dir, model in rerun, args.allow_generation,
                      args.timeout)
    body = assemble(args.dataset, args.report_dir, Path(args.results_file), argv)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
