"""The quick start as a new user runs it, measured: wall time, CPU time, peak memory, test NDCG@10.

    python benchmarks/quickstart.py [--llm_dtype auto|float32] [--fresh] [--isa avx2]

Runs ``run_recbole_llm(model="LlamaRec", dataset="ml-100k")`` (what ``make quickstart`` runs) in a
child process with every default, from nothing: a new checkpoint folder, so stage 1 trains too. The
one added setting is ``eval_slices: True``, which reads the standard error of the test NDCG@10 off
the same ranking (it changes no score). The child's wall time, CPU-seconds and peak resident set
(``getrusage`` of the child) and its test result make a record
(``benchmarks/records/quickstart/<machine>-<llm_dtype>.json``, committed: CPU model and flags, the
compute dtype ``llm_dtype`` resolved to, date, commit), reused by a later run on the same CPU with the
same settings; the RESULTS section ``quickstart`` has one row per record, from every machine measured.
``--isa avx2`` runs it with torch's kernels held to AVX2 (``results_doc.ISA_LIMITS``; ``llm_dtype: auto`` then
finds no bf16 units): an AVX2-only CPU's kernels on this CPU, its own record and row.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_speed import commit, cpu_report  # noqa: E402
from results_doc import (ROOT, cpu_label, hold_kernels_to, load_record, markdown_table, write_record,  # noqa: E402
                         write_section)

RECORDS = ROOT / "benchmarks" / "records" / "quickstart"
CHILD = """
import json, sys
from recbole_llm import run_recbole_llm
from recbole_llm.llm.precision import resolve_precision
settings = json.loads(sys.argv[1])
result = run_recbole_llm(model="LlamaRec", dataset="ml-100k", config_dict=settings)
test = result["test_result"]
json.dump({"test": {k: v for k, v in test.items() if k != "slices"}, "test_all": test["slices"]["all"],
           "best_valid": result["best_valid_result"],
           "compute": resolve_precision(settings.get("llm_dtype", "auto")).describe()}, open(sys.argv[2], "w"))
"""


def run_quickstart(llm_dtype: str | None, threads: int | None) -> dict:
    """One quick start in a child process: its numbers."""
    with tempfile.TemporaryDirectory(prefix="quickstart-") as workdir:
        settings = {"checkpoint_dir": str(Path(workdir) / "saved"), "eval_slices": True}
        if llm_dtype:
            settings["llm_dtype"] = llm_dtype
        if threads:
            settings["num_threads"] = threads
        out = Path(workdir) / "result.json"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), str(out)], cwd=ROOT, check=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads(out.read_text())
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": after.ru_maxrss * 1024 / 1e9, **result}


def report_text(records: list[dict]) -> str:
    rows = []
    for record in sorted(records, key=lambda r: r["date"]):
        machine, numbers = record["machine"], record["numbers"]
        flags = ", ".join(machine["flags"]) or "-"
        se = numbers["test_all"].get("ndcg@10_se")
        rows.append([cpu_label(machine), flags, numbers["compute"], record["date"], record["commit"],
                     f"{numbers['wall_s'] / 60:.1f}", f"{numbers['cpu_s'] / 60:.1f}", f"{numbers['peak_rss_gb']:.1f}",
                     f"{numbers['test']['ndcg@10']:.4f}" + (f" ± {se:.4f}" if se is not None else "")])
    header = ["CPU", "flags", "LLM compute", "date", "commit", "wall min", "CPU min", "peak RSS GB",
              "test NDCG@10 ± s.e."]
    return ("`make quickstart` (LlamaRec on ml-100k, every default, stage 1 trained from nothing), one row per "
            "measured machine and compute dtype; 2 cores each. Peak RSS is the child process's maximum "
            "resident set; the standard error is over the 943 test users.\n\n" + markdown_table(header, rows) + "\n")


def record_path(report: dict, settings: dict) -> Path:
    """The record of one quick start: keyed by the CPU, its flags, the settings and the kernels' limit, if any."""
    held = [report["isa_limit"]] if report.get("isa_limit") else []
    key = hashlib.sha256(json.dumps([report["cpu"], report["flags"], settings, *held],
                                    sort_keys=True).encode()).hexdigest()[:12]
    return RECORDS / f"{key}-{settings['llm_dtype']}.json"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm_dtype", default=None, help="override llm_dtype (default: the property file's, auto)")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--fresh", action="store_true", help="measure again instead of reusing the record")
    parser.add_argument("--isa", choices=["avx2"], default=None,
                        help="hold torch's kernels to this instruction set (emulates a CPU that has only it)")
    args = parser.parse_args(argv)
    hold_kernels_to(args.isa)
    report = cpu_report()
    settings = {"llm_dtype": args.llm_dtype or "auto", "num_threads": args.num_threads}
    path = record_path(report, settings)
    if args.fresh or load_record(path) is None:
        numbers = run_quickstart(args.llm_dtype, args.num_threads)
        write_record(path, {"settings": settings, "machine": report, "commit": commit(),
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "numbers": numbers})
    else:
        print(f"reusing {path.relative_to(ROOT)}")
    records = [load_record(p) for p in sorted(RECORDS.glob("*.json"))]
    text = report_text([r for r in records if r])
    write_section("quickstart", "The quick start: time, memory and quality per machine", text)
    print(text)


if __name__ == "__main__":
    main()
