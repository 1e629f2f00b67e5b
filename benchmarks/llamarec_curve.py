"""A learning curve of LlamaRec's ranker: the fair ratio LlamaRec / retriever NDCG@10 (history
excluded for both; ranker only and with fusion) against the number of training examples, for each
kind of training list (``ranker_train_candidates``) and seed.

    python benchmarks/llamarec_curve.py --ranker_max_train_examples=2560 --ranker_train_candidates=retriever \\
        [--ranker_train_target_position=random] [--seed=2020] [--dataset ml-100k] [--key=value ...] \\
        [--records DIR] [--results FILE] [--fresh] [--int8_rescore]

One call is one point of the curve: a quick-start run of LlamaRec with those settings
(:func:`llamarec_quality.measure`: stage 1 trained or reused from ``checkpoint_dir``, ranker training,
validation, fusion, test), its validation checks on ``ranker_valid_users`` users (300 unless given:
fewer make the step selection noise; each check logs its standard error), and the test NDCG@10 and
Recall@10 of the ranker only, with fusion, and of the retriever alone. The run is a record,
``<records>/<dataset>-<key>.json`` (default ``benchmarks/records/llamarec_curve``, committed: settings,
seed, commit, machine, date, command, numbers, the validation trace), keyed by the resolved values of
the settings given (and of the curve's axes: examples, training lists, target position, seed); a
later call with the same settings reuses it instead of training again (``--fresh`` runs anew), so
the curve is built up run by run. Every call then writes the section "llamarec_curve" of
``--results`` (docs/RESULTS.md) from all the records of the dataset: one row per setting (seeds
pooled: mean and standard error over seeds), each run's validation trace, the summary line, and the
plot ``llamarec_curve.png`` beside it.

``--int8_rescore`` (with ``--llm_dtype=float32``) also ranks the test users with the int8 copy of the
trained ranker (``ranker_int8``) at the fusion weight validation chose, beside float32: the paired
per-user NDCG@10 difference and the users/s both ways (part of the record's key).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import textwrap
import time
from pathlib import Path

from llamarec_quality import measure
from results_doc import (RESULTS, ROOT, bare_argv, command, commit, load_record, machine, markdown_table, parse_overrides,
                         standard_error, write_atomically, write_record, write_section)

from recbole_llm.cache_io import content_key
from recbole_llm.errors import InputError
from recbole_llm.llm.preflight import check_int8_scoring
from recbole_llm.quick_start import load_config, preflight

RECORDS = ROOT / "benchmarks" / "records" / "llamarec_curve"
#: The curve's axes: always part of a record's key, at their resolved values.
AXES = ("ranker_max_train_examples", "ranker_train_candidates", "ranker_train_target_position", "seed")
#: What this benchmark sets unless the command line does: validation large enough to pick a step.
DEFAULTS = {"ranker_valid_users": 300}
#: Settings that change where a run writes or how fast it goes, not its numbers: left out of the table.
NEUTRAL = ("checkpoint_dir", "num_threads", "show_progress", "state")
#: The goal: the paper's LlamaRec / LRURec NDCG@10 (ML-100k latest-small, Llama-2-7B).
PAPER_RATIO = 1.07


def run_settings(dataset: str, overrides: dict, int8: bool = False) -> dict:
    """The resolved values of ``overrides`` and of the curve's axes (the record's key; ``int8_rescore`` with
    ``int8``); the checks of every setting run here, before anything trains (a bad value stops with one line)."""
    with bare_argv():
        config = load_config("LlamaRec", dataset, config_dict=overrides)
        preflight(config)
        if int8:
            try:
                check_int8_scoring(config)  # the rescore ranks as ranker_int8 does
            except InputError as error:
                raise InputError(f"--int8_rescore: {error}") from None
            if config["ranker_int8"]:
                raise InputError("--int8_rescore sets float32 ranking beside int8, but this run already ranks in int8 "
                                 f"(ranker_int8={config['ranker_int8']}): add --ranker_int8=False.")
            if config["candidate_k"] < 10:
                raise InputError(f"--int8_rescore reads each user's NDCG@10 off the candidates, but candidate_k="
                                 f"{config['candidate_k']}: set candidate_k: 10 or more, or leave --int8_rescore out.")
    settings = {key: config[key] for key in sorted({*overrides, *AXES})}
    if settings["ranker_train_candidates"] == "random":  # random lists have no target position
        settings.pop("ranker_train_target_position")
    return {**settings, **({"int8_rescore": True} if int8 else {})}


def record_path(records: Path, dataset: str, settings: dict) -> Path:
    """The record of the run with these resolved ``settings`` (:func:`run_settings`)."""
    return records / f"{dataset}-{content_key(dataset, settings, length=16)}.json"


def curve_point(dataset: str, overrides: dict, records: Path, fresh: bool = False, int8: bool = False) -> dict:
    """The record of one run with ``overrides`` (and the int8 rescore with ``int8``): reused from ``records`` when
    there is one."""
    settings = run_settings(dataset, overrides, int8)
    path = record_path(records, dataset, settings)
    record = None if fresh else load_record(path)
    if record is not None:
        print(f"reused {path} ({record['date']}, {record['command']})", flush=True)
        return record
    start = time.perf_counter()
    numbers = measure(dataset, overrides, show_progress=False, int8=int8)
    record = {"dataset": dataset, "settings": settings, "overrides": overrides, "numbers": numbers,
              "minutes": (time.perf_counter() - start) / 60, "commit": commit(), "machine": machine(),
              "command": command(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write_record(path, record)
    print(f"wrote {path}", flush=True)
    return record


# ------------------------------------------------------------------ the section from the records
def lists_label(settings: dict) -> str:
    lists = settings["ranker_train_candidates"]
    return lists if lists == "random" else f"{lists}, target {settings['ranker_train_target_position']}"


#: A slope's budget for the paper's ratio further than this many times the largest one measured is not quoted.
FAR = 100
#: Settings that say when a run validates and whether it stops early, which a longer budget needs set otherwise
#: (no early stop, fewer checks), not what the ranker learns: a curve's line joins budgets whatever their values.
SCHEDULE = ("ranker_eval_step", "ranker_stopping_step")


def other_settings(settings: dict, ignore: tuple = ()) -> str:
    rest = {k: v for k, v in settings.items() if k not in AXES and k not in NEUTRAL and k not in ignore}
    return ", ".join(f"{k}={v}" for k, v in sorted(rest.items())) or "-"


def group(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records by setting (everything but the seed), in curve order (examples, lists, other settings)."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        s = record["settings"]
        key = (s["ranker_max_train_examples"], lists_label(s), other_settings(s))
        groups.setdefault(key, []).append(record)
    return dict(sorted(groups.items(), key=lambda item: (item[0][0], item[0][1], item[0][2])))


def pooled(records: list[dict], part: str) -> tuple[float, float | None]:
    """Mean over seeds of the fair ratio ``part`` (ranker or fusion), and its standard error (None: one seed)."""
    values = [r["numbers"]["ratio"][part] for r in records]
    return statistics.mean(values), standard_error(values) if len(values) > 1 else None


def ratio_cell(mean: float, se: float | None) -> str:
    return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def best_check(record: dict) -> str:
    """The validation check of the adapter kept: step, NDCG@10 ± its standard error, users."""
    numbers = record["numbers"]
    check = next((c for c in numbers["validation"] if c["step"] == numbers["best_step"]), None)
    if check is None:
        return "no ranker training"
    return f"step {check['step']}: {check['ndcg@10']:.4f} ± {check['se']:.4f} ({check['users']} users)"


def prompt_cell(runs: list[dict]) -> str:
    """The test prompts' length in tokens (mean / p95, mean over the runs that recorded it) and the test ranking's
    users/s (ranked users over ranking seconds; read it with each run's load average: cores may be shared)."""
    tokens = [r["numbers"]["prompt_tokens"] for r in runs if "prompt_tokens" in r["numbers"]]
    speed = [r["numbers"]["ranked_rows"] / r["numbers"]["seconds"]["ranking"] for r in runs
             if r["numbers"]["seconds"].get("ranking")]
    length = (f"{statistics.mean(t['mean'] for t in tokens):.0f} / {statistics.mean(t['p95'] for t in tokens):.0f}"
              if tokens else "-")
    return length + (f"; {statistics.mean(speed):.2f} users/s" if speed else "")


def minutes_cell(record: dict) -> str:
    """The run's minutes: of its last process only when it resumed an interrupted ranker training."""
    resumed = record["numbers"].get("resumed_at_step")
    return f"{record['minutes']:.0f}" + (f" (resumed at step {resumed})" if resumed else "")


def trace(record: dict) -> str:
    """Each check: step, valid-subset NDCG@10 ± s.e., and the training loss's letter part since the last check
    (recorded since 2026-12-07; ln k, e.g. 3.00 for 20 candidates, is a uniform guess)."""
    return "; ".join(f"{c['step']}: {c['ndcg@10']:.4f} ± {c['se']:.4f}"
                     + (f" (letter loss {c['letter_loss']:.2f})" if "letter_loss" in c else "")
                     for c in record["numbers"]["validation"]) or "-"


def summary_line(groups: dict[tuple, list[dict]]) -> str:
    """The issue's summary line, for the setting with the most seeds (then the best ratio with fusion)."""
    (examples, lists, other), chosen = max(groups.items(), key=lambda item: (len(item[1]), pooled(item[1], "fusion")[0]))
    retriever = chosen[0]["numbers"]["settings"]["retriever"]
    ranker, _ = pooled(chosen, "ranker")
    fusion, se = pooled(chosen, "fusion")
    n = len(chosen)
    return (f"LlamaRec / {retriever} NDCG@10, history excluded for both, mean over {n} seed{'s' * (n > 1)}: "
            f"{ranker:.3f} ranker only, {fusion:.3f} with fusion "
            f"(standard error {f'{se:.3f}' if se is not None else 'not available: one seed'}); "
            f"{examples} training examples, {lists} training lists"
            + (f", {other}" if other != "-" else "") + f". Paper: {PAPER_RATIO}.")


def curves(groups: dict[tuple, list[dict]]) -> dict[tuple, list[tuple[int, list[dict]]]]:
    """The curves: per kind of training list and other settings (the validation schedule, :data:`SCHEDULE`,
    left out), each budget's runs, in the order of :func:`group`."""
    lines: dict[tuple, list] = {}
    for (examples, lists, _), runs in groups.items():
        lines.setdefault((lists, other_settings(runs[0]["settings"], ignore=SCHEDULE)), []).append((examples, runs))
    return lines


def slope_lines(groups: dict[tuple, list[dict]]) -> list[str]:
    """What each curve's slope predicts: per kind of training list (and other settings) with two budgets or more,
    the least-squares line of the fair ratio (mean over seeds) against log10(training examples), and the budget at
    which that line reaches the paper's ratio. A point without training (0 examples) is shown, not fitted; the
    validation schedule (:data:`SCHEDULE`) does not split a curve."""
    lines = {key: [(examples, pooled(runs, "ranker")[0], pooled(runs, "fusion")[0]) for examples, runs in points]
             for key, points in curves(groups).items()}
    text = []
    for (lists, other), points in lines.items():
        trained = [p for p in points if p[0] > 0]
        if len(trained) < 2:
            continue
        xs = [math.log10(p[0]) for p in trained]
        parts = []
        for index, name in ((2, "with fusion"), (1, "ranker only")):
            ys = [p[index] for p in points]
            slope, intercept = least_squares(xs, ys[len(points) - len(trained):])
            budget = 10 ** ((PAPER_RATIO - intercept) / slope) if slope > 0 else math.inf
            reach = (f"never {PAPER_RATIO}: not rising" if slope <= 0
                     else f"{PAPER_RATIO} at ~{budget:,.0f} examples" if budget <= FAR * trained[-1][0]
                     else f"{PAPER_RATIO} only beyond {FAR}x the largest budget measured")
            parts.append(f"{name} {' -> '.join(f'{y:.3f}' for y in ys)}, {slope:+.3f} per 10x examples ({reach})")
        budgets = " -> ".join(f"{p[0]:,}" for p in points)
        text.append(f"- {lists}" + (f" ({other})" if other != "-" else "") + f", {budgets} examples: " + "; ".join(parts))
    return (["What the slope predicts (least squares of each curve's ratio against log10 of the examples, "
             "extrapolated; each point's standard error is in the table):", "", *text, ""] if text else [])


def least_squares(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def int8_table(records: list[dict]) -> str:
    """The runs with ``--int8_rescore``: the same trained ranker ranking the test users in float32 and through its
    int8 copy, at the fusion weight validation chose (int8's yardstick: within one standard error of float32)."""
    rows = []
    for record in records:
        numbers, int8 = record["numbers"], record["numbers"]["int8"]
        cells = []
        for part in ("fusion", "ranker"):
            both = int8[part]
            verdict = "within" if abs(both["difference"]) <= both["float32_se"] else "beyond"
            cells += [f"{both['float32']:.4f} ± {both['float32_se']:.4f} / {both['int8']:.4f} ({both['difference']:+.4f}"
                      f" ± {both['difference_se']:.4f}; {verdict} one s.e.)",
                      f"{numbers['test'][part]['recall@10']:.4f} / {both['recall@10_int8']:.4f}"]
        speed = int8["users_per_s"]
        rows.append([record["settings"]["seed"], record["settings"]["ranker_max_train_examples"],
                     lists_label(record["settings"]), *cells,
                     f"{speed['float32']:.2f} / {speed['int8']:.2f} ({speed['int8'] / speed['float32']:.2f}x)"])
    return ("int8 scoring of a trained ranker (`--int8_rescore --llm_dtype=float32`): the same adapter ranks the test "
            "users in float32 and through its dynamic-int8 copy (`ranker_int8`), at the fusion weight validation "
            "chose; NDCG@10 float32 ± its standard error over the users / int8 (paired per-user difference ± its "
            "standard error), Recall@10 float32 / int8, test ranking users/s float32 / int8 (on the run's "
            "machine and threads):\n\n"
            + markdown_table(["seed", "examples", "training lists", "NDCG@10 with fusion", "Recall@10 with fusion",
                              "NDCG@10 ranker only", "Recall@10 ranker only", "users/s"], rows))


def where_cell(record: dict) -> str:
    """The run's CPU and the precision its LLM computed in: the run's own ``llm_dtype`` where it set one, else what
    ``auto`` resolved to on that CPU (bf16 autocast with bf16 units, float32 without: the runs of one setting may
    come from both kinds of CPU)."""
    text = record["machine"]
    cpu = text.split(" cores (", 1)[-1].split(";", 1)[0]
    dtype = record["settings"].get("llm_dtype")
    if dtype and dtype != "auto":
        return f"{cpu}; {dtype}"
    resolved = text.split("says otherwise: ", 1)[-1]
    return f"{cpu}; {'bf16 autocast' if resolved.startswith('bfloat16 autocast') else 'float32'}"


def section_body(records: list[dict], plot_name: str | None) -> str:
    groups = group(records)
    int8 = [r for runs in groups.values() for r in runs if "int8" in r["numbers"]]
    rows = []
    for (examples, lists, other), runs in groups.items():
        excluded = [r["numbers"]["test"]["retriever_excluded"]["ndcg@10"] for r in runs]
        rows.append([examples, lists, other, ", ".join(str(r["settings"]["seed"]) for r in runs),
                     ratio_cell(*pooled(runs, "ranker")), ratio_cell(*pooled(runs, "fusion")),
                     "; ".join(best_check(r) for r in runs), f"{statistics.mean(excluded):.4f}",
                     prompt_cell(runs), ", ".join(minutes_cell(r) for r in runs)])
    curve = markdown_table(["training examples", "training lists", "other settings", "seeds", "ranker only",
                            "with fusion", "kept adapter: valid-subset NDCG@10 ± s.e.",
                            "retriever NDCG@10 (history excluded)", "test prompt tokens: mean / p95; ranking speed",
                            "minutes"], rows)
    runs = [[r["settings"]["seed"], r["settings"]["ranker_max_train_examples"], lists_label(r["settings"]),
             other_settings(r["settings"]),
             f"{r['numbers']['test']['ranker']['ndcg@10']:.4f} / {r['numbers']['test']['ranker']['recall@10']:.4f}",
             f"{r['numbers']['test']['fusion']['ndcg@10']:.4f} / {r['numbers']['test']['fusion']['recall@10']:.4f}",
             f"{r['numbers']['test']['retriever_excluded']['ndcg@10']:.4f} / "
             f"{r['numbers']['test']['retriever_excluded']['recall@10']:.4f}",
             trace(r), where_cell(r), r["commit"], r["date"]] for g in groups.values() for r in g]
    return (
        summary_line(groups) + "\n\n"
        "The fair ratio LlamaRec / retriever test NDCG@10 (the retriever with the candidates' history rule, its "
        "top-k order), ranker only (the paper) and with fusion; mean ± standard error over seeds where several. "
        "One run per seed and setting: `python benchmarks/llamarec_curve.py --ranker_max_train_examples=N "
        "--ranker_train_candidates=LISTS [--ranker_train_target_position=P] --seed=S`.\n\n"
        + curve + "\n\n" + "\n".join(slope_lines(groups))
        + (f"\n![learning curve]({plot_name})" if plot_name else "")
        + "\n\nEach run: test NDCG@10 / Recall@10 of the ranker only, with fusion and of the retriever (history "
        "excluded), and its validation checks (step: valid-subset NDCG@10 ± standard error over the users; where "
        "recorded, the training loss on the answer letter since the previous check: ln 20 = 3.00 is a uniform guess "
        "among 20 candidates):\n\n"
        + markdown_table(["seed", "examples", "training lists", "other settings", "ranker only", "with fusion",
                          "retriever", "validation checks", "CPU; LLM compute", "commit", "date"], runs)
        + ("\n\n" + int8_table(int8) if int8 else "")
    )


def plot(records: list[dict], path: Path) -> None:
    """The fair ratios against training examples, one colour per kind of training list (solid: with
    fusion, dashed: ranker only; bars: standard error over seeds); PNG written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8))
    lines = {key: [(examples, pooled(runs, "ranker"), pooled(runs, "fusion")) for examples, runs in points]
             for key, points in curves(group(records)).items()}
    several = len({other for _, other in lines}) > 1  # name the other settings only where they differ
    for index, ((lists, other), points) in enumerate(lines.items()):
        color = f"C{index}"
        label = lists + (f" ({textwrap.shorten(other, 60)})" if several else "")
        xs = [p[0] for p in points]
        for part, style, name in ((2, "-o", "with fusion"), (1, "--s", "ranker only")):
            ys = [p[part][0] for p in points]
            errors = [p[part][1] or 0.0 for p in points]
            ax.errorbar(xs, ys, yerr=errors, fmt=style, color=color, capsize=3, label=f"{label}: {name}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.axhline(PAPER_RATIO, color="black", linestyle=":", linewidth=0.8, label=f"paper ({PAPER_RATIO})")
    examples = [x for points in lines.values() for x, *_ in points]
    if len(set(examples)) > 1:
        ax.set_xscale("log" if min(examples) > 0 else "symlog", **({} if min(examples) > 0 else {"linthresh": 100}))
        ax.set_xlim(left=min(examples) - 30 if min(examples) <= 0 else None,  # no negative budgets on the axis
                    right=2 * max(examples))  # the largest budget off the frame's edge
    ax.set_xlabel("ranker training examples")
    ax.set_ylabel("LlamaRec / retriever NDCG@10 (history excluded)")
    ax.set_title("LlamaRec's ranker: learning curve (test)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomically(path, buffer.getvalue())


def write_curve_section(dataset: str, records_dir: Path, results: Path) -> str:
    """The section "llamarec_curve" of ``results`` (and its plot) from every record of ``dataset``."""
    records = [r for r in (load_record(p) for p in sorted(records_dir.glob(f"{dataset}-*.json"))) if r]
    plot_path = results.parent / "llamarec_curve.png"
    try:
        plot(records, plot_path)
        plot_name = plot_path.name
    except ImportError:  # no matplotlib: the tables alone
        plot_name = None
    body = section_body(records, plot_name)
    write_section("llamarec_curve", f"LlamaRec's learning curve on {dataset}", body, results=results,
                  command_line="python benchmarks/llamarec_curve.py (one call per row and seed; see below)")
    return body


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--records", type=Path, default=RECORDS, help="folder of the run records")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS file to write the section to")
    parser.add_argument("--fresh", action="store_true", help="run again instead of reusing the record")
    parser.add_argument("--int8_rescore", action="store_true",
                        help="also rank the test users with the trained ranker's int8 copy (needs --llm_dtype=float32)")
    args, rest = parser.parse_known_args(argv)
    overrides = {**DEFAULTS, **parse_overrides(rest)}
    try:
        curve_point(args.dataset, overrides, args.records, args.fresh, args.int8_rescore)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None
    print(write_curve_section(args.dataset, args.records, args.results))


if __name__ == "__main__":
    sys.exit(main())
