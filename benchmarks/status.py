"""The status table: one row per model, generated from the benchmarks' records, into README.md and docs/RESULTS.md.

    python benchmarks/status.py            # rewrites the "status" blocks of README.md and docs/RESULTS.md and the
                                           # README's quick-start figures
    python benchmarks/status.py --check    # exit 1 when either block differs from what the records give

Each row: the model's test NDCG@10 and Recall@10 and those of its ID baseline on the same split (the
benchmark's own pairing), the ratio of the NDCG@10s (mean over seeds, its standard error) and the number of
seeds, the LLM and how it computed, the machine and date of the measurement. A row is built only from records
measured on the current code: a record counts when its commit contains ``CHANGES[model]``, the last change that
moved the model's numbers (records without a commit: when measured after it), or, where that change only made
a setting's value the default (``CHANGED_DEFAULTS``), when the record ran with that value. A model without such a
record says "not measured since <that change>" and names the command that measures it; older numbers stay, dated,
in docs/history.md. LRURec's benchmark keeps no records: its section ("lrurec_vs_sasrec") is read instead, and no
change has moved LRURec's numbers on its default path (``loss_type: CE``) since it was measured (the chunked
cross-entropy of 2026-12-07 engages above 2**26 scores per batch: ml-100k's 64 windows x 200 positions x 1,683
items hold 21.5M).
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

from results_doc import (RESULTS, ROOT, cpu_label, load_record, markdown_table, read_between_markers, standard_error,
                         write_between_markers)

from recbole_llm.yaml_io import read_yaml

README = ROOT / "README.md"
RECORDS = ROOT / "benchmarks" / "records"
SECTION = "status"
DATASET = "ml-100k"
#: The last change that moved each model's numbers: a record from before it is not current.
CHANGES = {
    "LlamaRec": ("1684a57", "the prompt's history became 10 items (ranker_history_len, 2026-12-07)"),
    "E4SRec": ("3f63911", "the authors' training rows became the default (2026-11-30)"),
    "Laser": ("eb29e97", "items went through the frozen LLM (2026-12-06)"),
    "SeRALM": ("5c389a1", "the alignment's per-instance baseline (2026-12-06)"),
}
#: Changes that only made a setting's value the default: a record that ran with that value had measured them.
CHANGED_DEFAULTS = {"LlamaRec": {"ranker_history_len": 10}}
#: The command that measures each model's row (three seeds where the benchmark takes them).
COMMANDS = {
    "LRURec": "python benchmarks/lrurec_vs_sasrec.py --dataset ml-100k --seeds 2020,2021,2022",
    "LlamaRec": "python benchmarks/llamarec_curve.py --seed=2020",  # one seed per call
    "E4SRec": "python benchmarks/e4srec_vs_sasrec.py --seeds 2020,2021,2022",
    "Laser": "python benchmarks/laser.py --skip_e4srec --ablation_rows 0 --seeds 2021,2022",
    "SeRALM": "python benchmarks/seralm.py --models SASRec --seeds=main,2021,2022",
}
#: Where each row's numbers are written in full (a RESULTS.md heading).
QUICKSTART = "The quick start: time, memory and quality per machine"
SECTIONS = {"LRURec": "LRURec vs SASRec on ml-100k", "LlamaRec": "LlamaRec's learning curve on ml-100k",
            "E4SRec": "E4SRec vs its stage-1 SASRec on ml-100k", "Laser": "Laser vs SASRec on ml-100k",
            "SeRALM": "SeRALM on ml-100k"}
#: At most one line of words per model (no numbers: those come from records).
WORDS = {
    "LRURec": "ready",
    "LlamaRec": "code and tests; the paper's two stages with the letter verbalizer",
    "E4SRec": "code and tests",
    "Laser": "code and tests; default `scoring: residual`, the paper's item side with `scoring: paper`",
    "SeRALM": "code and tests; the aligned SASRec adapter and every item's knowledge, un-aligned and aligned, committed",
}
MODELS = ("LRURec", "LlamaRec", "E4SRec", "Laser", "SeRALM")
#: Settings that change how fast a run goes or where it writes, not its numbers.
NEUTRAL = {"seed", "num_threads", "show_progress", "checkpoint_dir", "state", "ranker_valid_users"}
EMBEDDED = "SmolLM2-135M-Instruct (embedded)"


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def is_current(model: str, record: dict) -> bool:
    """Whether ``record`` was measured on code that has the last change to ``model``'s numbers."""
    if model not in CHANGES:
        return True
    settings = record.get("settings")
    if model in CHANGED_DEFAULTS and isinstance(settings, dict) and CHANGED_DEFAULTS[model].items() <= settings.items():
        return True
    change = CHANGES[model][0]
    if record.get("commit") and record["commit"] != "unknown":
        return git("merge-base", "--is-ancestor", change, record["commit"]).returncode == 0
    changed = git("log", "-1", "--format=%cI", change).stdout.strip()
    measured = record.get("date") or record.get("measured") or ""
    return bool(changed) and measured[:16] >= changed[:16].replace("T", " ")


def records(folder: Path, pattern: str = "*.json") -> list[dict]:
    return [r for r in (load_record(path) for path in sorted(folder.glob(pattern))) if r]


def defaults_only(overrides: dict) -> bool:
    return not set(overrides or {}) - NEUTRAL


def short_machine(text: str) -> str:
    """``results_doc.machine()``'s line up to torch's version: the cores and the CPU."""
    return text.split(", torch")[0]


def compute_of(machine_line: str) -> str:
    found = re.search(r"LLM compute unless a setting says otherwise: (.*?); load average", machine_line)
    return found.group(1).split(" (")[0] if found else "float32 (before 2026-12-06 every CPU computed in float32)"


def row(model, pairs, baseline, llm, machine, date, words=""):
    """One table row from (model metrics, baseline metrics) pairs, one pair per seed."""
    ratios = [m["ndcg@10"] / b["ndcg@10"] for m, b in pairs]
    mean = {side: {k: statistics.mean(p[side][k] for p in pairs) for k in ("ndcg@10", "recall@10")} for side in (0, 1)}
    ratio = f"{statistics.mean(ratios):.3f}" + (f" ± {standard_error(ratios):.3f}" if len(ratios) > 1 else "")
    return [model, f"{mean[0]['ndcg@10']:.4f} / {mean[0]['recall@10']:.4f}", baseline,
            f"{mean[1]['ndcg@10']:.4f} / {mean[1]['recall@10']:.4f}", f"{ratio} ({len(pairs)})", llm,
            f"{machine}, {date}", (words + "; " if words else "") + f"\"{SECTIONS[model]}\""]


def not_measured(model, own=None, baseline="-", llm="-", machine="-", date="-", cite=""):
    """A row without a current ratio: the model's own numbers where a current record has them."""
    change = (f"{'the ratio' if own else ''} not measured since {CHANGES[model][1]}: `{COMMANDS[model]}`").lstrip()
    numbers = f"{own['ndcg@10']:.4f} / {own['recall@10']:.4f}" if own else "-"
    return [model, numbers, baseline, "-", "-", llm, f"{machine}, {date}" if own else "-",
            f"{WORDS[model]}; " + (f"\"{cite}\"; " if cite else "") + change]


def lrurec_row() -> list:
    """From the section "lrurec_vs_sasrec" (its benchmark writes no records): the per-seed table."""
    text = read_between_markers(RESULTS, "lrurec_vs_sasrec")
    runs: dict[str, dict] = {}
    for model, seed, *cells in re.findall(r"^\| (LRURec|SASRec) \| (\d+) \| (.*) \|$", text, re.M):
        values = [float(c) for c in cells[0].split(" | ")[:6]]
        runs.setdefault(seed, {})[model] = {"recall@10": values[1], "ndcg@10": values[5]}
    pairs = [(r["LRURec"], r["SASRec"]) for r in runs.values()]
    machine = re.search(r"^- machine: (.*)$", text, re.M).group(1)
    date = re.search(r"^- date: (.*)$", text, re.M).group(1)[:10]
    return row("LRURec", pairs, "SASRec", "-", short_machine(machine), date, WORDS["LRURec"])


def llamarec_row() -> list:
    """LlamaRec with fusion against its retriever, history excluded for both (llamarec_curve's records at the
    default training lists); without them, LlamaRec's own numbers from the quick start's records."""
    default = read_yaml(ROOT / "properties" / "model" / "LlamaRec.yaml")
    axes = ("ranker_max_train_examples", "ranker_train_candidates", "ranker_train_target_position")
    curve = [r for r in records(RECORDS / "llamarec_curve", f"{DATASET}-*.json")
             if is_current("LlamaRec", r) and all(default.get(k) == v for k, v in r["settings"].items()
                                                  if k not in NEUTRAL and k not in axes[2:])]
    if curve:
        pairs = [(r["numbers"]["test"]["fusion"], r["numbers"]["test"]["retriever_excluded"]) for r in curve]
        retriever = curve[0]["numbers"]["settings"]["retriever"]
        return row("LlamaRec", pairs, f"{retriever}, history excluded", f"{EMBEDDED}, {compute_of(curve[0]['machine'])}",
                   short_machine(curve[0]["machine"]), curve[-1]["date"][:10], WORDS["LlamaRec"])
    quick = [r for r in records(RECORDS / "quickstart", "*-auto.json") if is_current("LlamaRec", r)]
    if not quick:
        return not_measured("LlamaRec", baseline="LRURec, history excluded")
    latest = max(quick, key=lambda r: r["date"])
    machine = f"{latest['machine']['cpu']} ({latest['machine']['bf16_units'] or 'no bf16 units'})"
    return not_measured("LlamaRec", latest["numbers"]["test"], "LRURec, history excluded",
                        f"{EMBEDDED}, {latest['numbers']['compute'].split(' (')[0]}", machine, latest["date"][:10],
                        QUICKSTART)


def paired_row(model: str, folder: Path, own: str, llm) -> list:
    """E4SRec and Laser: each record is one seed of the model and its frozen stage-1 SASRec."""
    runs = [r for r in records(folder / DATASET) if is_current(model, r) and defaults_only(r["overrides"])]
    if not runs:
        return not_measured(model, baseline="SASRec (its stage 1)")
    return row(model, [(r[own], r["sasrec"]) for r in runs], "SASRec (its stage 1)",
               f"{llm(runs[0])}, {compute_of(runs[0]['machine'])}", short_machine(runs[0]["machine"]),
               max(r["date"] for r in runs)[:10], WORDS[model])


def seralm_row() -> list:
    """Base+SeRALM against Base (SASRec) from benchmarks/seralm.py's records (HIT@10 = Recall@10 with one target)."""
    from seralm import RECORDS as SERALM_RECORDS

    folder = SERALM_RECORDS / DATASET
    runs = [r for r in [load_record(folder / "SASRec.json"), *records(folder, "SASRec-seed*.json")]
            if r and not r.get("unfinished") and defaults_only(r.get("overrides")) and is_current("SeRALM", r)]
    if not runs:
        return not_measured("SeRALM", baseline="SASRec (Base)")

    def metrics(run, variant):
        return {"ndcg@10": run["variants"][variant]["ndcg@10"], "recall@10": run["variants"][variant]["hit@10"]}

    return row("SeRALM", [(metrics(r, "Base+SeRALM"), metrics(r, "Base")) for r in runs], "SASRec (Base)",
               f"{EMBEDDED}, {compute_of(runs[0]['machine'])}", short_machine(runs[0]["machine"]),
               max(r["measured"] for r in runs)[:10], WORDS["SeRALM"])


def status_rows() -> list[list]:
    return [lrurec_row(), llamarec_row(),
            paired_row("E4SRec", RECORDS / "e4srec", "e4srec", lambda r: r["settings"].split(" (")[0][4:]
                       .replace("embedded SmolLM2-135M-Instruct", EMBEDDED)),
            paired_row("Laser", RECORDS / "laser", "laser", lambda r: r["settings"]["llm_path"] or EMBEDDED),
            seralm_row()]


def status_table() -> str:
    header = ["model", "NDCG@10 / Recall@10", "ID baseline (same split)", "its NDCG@10 / Recall@10",
              "NDCG@10 ratio ± s.e. (seeds)", "LLM, compute", "machine, date", "status (details: RESULTS section)"]
    return (markdown_table(header, status_rows()) + "\n\n"
            f"{DATASET}, leave-one-out in time order, full ranking over all items, test metrics of the checkpoint best "
            "on validation NDCG@10; means over the seeds. Generated by `python benchmarks/status.py` from the "
            "benchmarks' records; numbers measured before a change to a model are in docs/history.md.\n")


def quickstart_lines() -> str:
    """The README's quick-start figures, one line per measured machine and compute dtype (the quick start's
    records, newest first per machine)."""
    latest: dict[tuple, dict] = {}
    for record in sorted(records(RECORDS / "quickstart"), key=lambda r: r["date"]):
        machine = record["machine"]
        latest[(cpu_label(machine), tuple(machine["flags"]), record["numbers"]["compute"])] = record
    lines = []
    for record in sorted(latest.values(), key=lambda r: r["numbers"]["wall_s"]):
        machine, numbers = record["machine"], record["numbers"]
        units = f"{machine['bf16_units']} bf16 units" if machine.get("bf16_units") else "no bf16 units"
        lines.append(f"- {numbers['wall_s'] / 60:.1f} min wall, peak RSS {numbers['peak_rss_gb']:.1f} GB, test NDCG@10 "
                     f"{numbers['test']['ndcg@10']:.4f}: 2-core {cpu_label(machine)} ({units}), "
                     f"{numbers['compute'].split(' (')[0]}, {record['date'][:10]}")
    return ("Measured by `python benchmarks/quickstart.py` (generated from its records by `python benchmarks/status.py`):"
            "\n\n" + "\n".join(lines) + "\n")


def blocks() -> dict[tuple[Path, str], str]:
    """Every block this script writes: (file, marker) -> its text."""
    table = status_table()
    return {(README, SECTION): table, (RESULTS, SECTION): table, (README, "quickstart_figures"): quickstart_lines()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a block is out of date")
    args = parser.parse_args()
    stale = {key: text for key, text in blocks().items() if read_between_markers(*key) != text}
    if args.check:
        print("\n".join(f"out of date: {path.relative_to(ROOT)} ({name})" for path, name in stale) or "up to date")
        sys.exit(1 if stale else 0)
    for (path, name), text in stale.items():
        write_between_markers(path, name, text)
    print(status_table())


if __name__ == "__main__":
    main()
