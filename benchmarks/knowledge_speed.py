"""SeRALM's knowledge generation: items/s in one process and sharded over ``--world_size`` processes.

    python benchmarks/knowledge_speed.py [--items 48] [--world_size 2] [--batch_size 8] [--max_new_tokens 96]
                                         [--llm_path DIR] [--section knowledge_speed]

Takes the first ``--items`` items of ml-100k (and their interactions) as a dataset, then runs the
generation CLI (``python -m recbole_llm.knowledge.generation``) on it, each process with one
thread: once as a single process, then as ``--world_size`` processes started together
(``--rank r --world_size n``; each writes its own resumable shard, the last to finish merges the
final file). Reports each run's wall time and items/s, and each rank's own items/s from its log.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_doc import ROOT, markdown_table, write_section  # noqa: E402

RATE = re.compile(r"generated knowledge for (\d+) items in ([\d.]+) s \(([\d.]+) items/s, rank (\d+)")


def subset(source: Path, target: Path, n_items: int) -> str:
    """``ml-100k`` cut to its first ``n_items`` items (by id) and their interactions."""
    name = f"ml-100k-first{n_items}"
    folder = target / name
    folder.mkdir(parents=True)
    item_lines = (source / "ml-100k.item").read_text(encoding="latin-1").splitlines()
    keep = {line.split("\t", 1)[0] for line in item_lines[1:n_items + 1]}
    (folder / f"{name}.item").write_text("\n".join(item_lines[:n_items + 1]) + "\n", encoding="utf-8")
    inter_lines = (source / "ml-100k.inter").read_text().splitlines()
    kept = [line for line in inter_lines[1:] if line.split("\t")[1] in keep]
    (folder / f"{name}.inter").write_text("\n".join([inter_lines[0], *kept]) + "\n")
    return name


def run(ranks: list[int], world_size: int, dataset: str, workdir: Path, knowledge: Path, args) -> tuple[float, list]:
    """The CLI for ``ranks`` side by side; (wall seconds, [(rank, items, seconds, items/s)])."""
    settings = {"data_path": str(workdir), "knowledge_dir": str(knowledge), "checkpoint_dir": str(workdir / "saved"),
                "user_inter_num_interval": None, "item_inter_num_interval": None, "show_progress": False,
                "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                             "item": ["item_id", "movie_title", "release_year", "class"]}}
    processes = []
    start = time.perf_counter()
    for rank in ranks:
        argv = [sys.executable, "-m", "recbole_llm.knowledge.generation", "--dataset", dataset, "--num_threads", "1",
                "--batch_size", str(args.batch_size), "--max_new_tokens", str(args.max_new_tokens),
                "--rank", str(rank), "--world_size", str(world_size)]
        argv += ["--llm_path", args.llm_path] if args.llm_path else []
        argv += [f"--{key}={value!r}" for key, value in settings.items()]
        log = workdir / f"world{world_size}-rank{rank}.log"
        processes.append((subprocess.Popen(argv, cwd=workdir, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}), log))
    for process, log in processes:
        if process.wait() != 0:
            raise SystemExit(f"generation failed; see {log}:\n{log.read_text()[-2000:]}")
    wall = time.perf_counter() - start
    rates = []
    for _, log in processes:
        for match in RATE.finditer(log.read_text()):
            items, seconds, per_s, rank = match.groups()
            rates.append((int(rank), int(items), float(seconds), float(per_s)))
    return wall, rates


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--world_size", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--llm_path", default=None, help="~ = the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--source", default=str(ROOT / "dataset" / "ml-100k"))
    parser.add_argument("--section", default=None)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="knowledge_speed-"))
    dataset = subset(Path(args.source), workdir, args.items)
    rows = []
    for world_size in (1, args.world_size):
        wall, rates = run(list(range(world_size)), world_size, dataset, workdir, workdir / f"knowledge{world_size}", args)
        finals = [p for p in (workdir / f"knowledge{world_size}").glob("knowledge-*.jsonl") if ".part-" not in p.name]
        assert len(finals) == 1 and len(finals[0].read_text().splitlines()) == args.items, "no complete final file"
        rows.append([f"{world_size} process{'es' * (world_size > 1)}", f"{wall:.1f}", f"{args.items / wall:.2f}",
                     "; ".join(f"rank {r}: {n} items, {per_s:.2f} items/s" for r, n, _, per_s in sorted(rates))])
        print(rows[-1], flush=True)
    table = markdown_table(["run", "wall s (processes started to final file)", "items/s", "per rank"], rows)
    print(table)
    if args.section:
        write_section(args.section, "SeRALM knowledge generation: items/s, one process vs sharded",
                      f"The first {args.items} ml-100k items; LLM {args.llm_path or 'embedded SmolLM2-135M-Instruct'}, "
                      f"batch {args.batch_size}, at most {args.max_new_tokens} new tokens, greedy; one thread per "
                      f"process. Wall time includes each process's start (imports, model load).\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
