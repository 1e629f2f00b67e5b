"""Write one benchmark's section of docs/RESULTS.md (between its own markers), atomically."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from recbole_llm.cache_io import atomic_target, cache_lock

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "RESULTS.md"
#: The full-ranking metrics the benchmarks' tables show (RecBole's names).
METRICS = ["recall@5", "recall@10", "mrr@5", "mrr@10", "ndcg@5", "ndcg@10"]
HEADER = "# Measured results\n\nEvery number below was measured by the script named in its section, on the machine it names.\n"


#: The environment that holds torch's kernels to one instruction set on an x86 CPU that has more: ATen's vectorised
#: kernels, oneDNN (so bf16 matmuls take torch's generic kernel, as on a CPU without AVX-512), MKL (float32 matmuls)
#: and FBGEMM (dynamic int8). It emulates that CPU's kernels, not its cores, clocks or caches.
ISA_LIMITS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                       "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}}


def isa_limit() -> str | None:
    """The instruction set this process's kernels are held to (:data:`ISA_LIMITS`); None when not held."""
    return next((isa for isa, env in ISA_LIMITS.items() if all(os.environ.get(k) == v for k, v in env.items())), None)


def hold_kernels_to(isa: str | None) -> None:
    """Restart this process with its kernels held to ``isa`` (the variables act only before torch loads); nothing
    for None or when they are held already."""
    if isa is not None and isa_limit() != isa:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ISA_LIMITS[isa]})


def cpu_label(report: dict) -> str:
    """The CPU of a :func:`cpu_report`, with the instruction set its kernels were held to, if any."""
    isa = report.get("isa_limit")
    return report["cpu"] + (f", kernels held to {isa.upper()} (emulating an {isa.upper()}-only CPU)" if isa else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_report() -> dict:
    """CPU model, its bf16/AMX/AVX flags, and what torch makes of them."""
    import torch

    from recbole_llm.llm.precision import cpu_bf16_units, cpu_flags

    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "bf16")
    return {"cpu": cpu_model(), "flags": sorted(f for f in cpu_flags() if f in wanted), "bf16_units": cpu_bf16_units(),
            "torch": torch.__version__, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_limit": isa_limit()}


def machine_key(report: dict, threads: int) -> str:
    """The folder name of one machine's timing records: its CPU, flags, torch, thread count and kernel limit."""
    held = [report["isa_limit"]] if report.get("isa_limit") else []
    text = json.dumps([report["cpu"], report["flags"], report["torch"], threads, *held])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def machine() -> str:
    cpu = cpu_model()
    import torch

    from recbole_llm.llm.precision import cpu_flags, resolve_precision

    load, threads = os.getloadavg()[1], torch.get_num_threads()
    flags = ", ".join(sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "bf16")))
    isa = isa_limit()
    held = f", kernels held to {isa.upper()} ({', '.join(ISA_LIMITS[isa])})" if isa else ""
    return (
        f"{os.cpu_count()} cores ({cpu}; {flags or 'no avx2/avx512/bf16 flags'}{held}), torch {torch.__version__}, "
        f"{threads} thread{'s' * (threads > 1)}, Python {platform.python_version()}; LLM compute unless a setting "
        f"says otherwise: {resolve_precision('auto').describe()}; load average {load:.1f} at the end of the run "
        f"(above 2 = shared cores)"
    )


def command() -> str:
    return "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])


@functools.cache
def commit() -> str:
    """The short hash of the commit this process started from, the code it runs ("unknown" outside
    git): read once, at import, so a record written hours later does not name a later checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


commit()  # at import: the commit the process runs


def write_section(name: str, title: str, body: str, results: Path | None = None, command_line: str | None = None) -> None:
    """Replace (or append) the section ``name`` of ``results`` (docs/RESULTS.md); its command line
    is ``command_line`` (default: this process's)."""
    results = Path(results) if results is not None else RESULTS
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"- command: `{command_line or command()}`\n- machine: {machine()}\n- date: {stamp}\n\n{body.strip()}\n"
        f"<!-- END {name} -->\n"
    )
    write_between_markers(results, name, section)


def marker_pattern(name: str) -> re.Pattern:
    """The block ``<!-- BEGIN name -->`` ... ``<!-- END name -->`` of a markdown file (markers included)."""
    return re.compile(rf"<!-- BEGIN {re.escape(name)} -->\n(.*?)<!-- END {re.escape(name)} -->\n", re.S)


def read_between_markers(path: Path, name: str) -> str | None:
    """What lies between the markers ``name`` in ``path`` (None where they are absent)."""
    found = marker_pattern(name).search(Path(path).read_text()) if Path(path).exists() else None
    return found.group(1) if found else None


def write_between_markers(path: Path, name: str, block: str, header: str = HEADER) -> None:
    """Replace the block ``name`` of ``path`` by ``block`` (the markers included), atomically; a new block
    goes after the block of its family (``laser_paper`` after ``laser``), or at the end."""
    path = Path(path)
    if not block.startswith(f"<!-- BEGIN {name} -->"):
        block = f"<!-- BEGIN {name} -->\n{block.rstrip()}\n<!-- END {name} -->\n"
    with cache_lock(path):  # benchmarks running side by side each rewrite their own section
        text = path.read_text() if path.exists() else header
        pattern = marker_pattern(name)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
        else:
            family = [m for m in re.finditer(r"<!-- END (\S+) -->\n", text) if name.startswith(m.group(1) + "_")]
            if family:
                end = max(family, key=lambda m: (len(m.group(1)), m.end())).end()
                text = text[:end] + "\n" + block + text[end:]
            else:
                text = text.rstrip() + "\n\n" + block
        with atomic_target(path) as tmp:
            tmp.write_text(text)


def parse_overrides(args: list[str]) -> dict:
    """``--key=value`` arguments as a RecBole config dict, each value read as RecBole reads a property
    file (YAML with its float resolver: ``1e-3`` is a number, ``[a, b]`` a list, ``~`` None)."""
    import yaml
    from recbole.config import Config

    loader = Config._build_yaml_loader(None)
    return {key: yaml.load(value, Loader=loader) for key, value in map(key_value, args)}


def key_value(arg: str) -> tuple[str, str]:
    """``--key=value`` as ``(key, value)``; anything else stops the benchmark with one line."""
    if not (arg.startswith("--") and "=" in arg):
        raise SystemExit(f"unrecognised argument {arg!r} (settings are given as --key=value)")
    key, value = arg.split("=", 1)
    return key.lstrip("-"), value


class Stopwatch:
    """The wall seconds of a ``with`` block (``.seconds``); given to ``quick_start.build`` as
    ``around_model``, those of the model's construction (stage 1 included)."""

    seconds = 0.0

    def __call__(self, *_):
        return self

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._start


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (at least two)."""
    return statistics.stdev(values) / len(values) ** 0.5


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_atomically(path: Path, data: bytes | str) -> None:
    from recbole_llm.cache_io import atomic_target

    with atomic_target(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def load_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_record_path(folder: Path, dataset: str, overrides: dict) -> Path:
    """Where a benchmark keeps the record of one run: ``folder/<dataset>/<key of its overrides>.json``."""
    from recbole_llm.cache_io import content_key

    return Path(folder) / dataset / f"{content_key(overrides, length=16)}.json"


def write_record(path: Path, record: dict) -> None:
    write_atomically(path, json.dumps(record, indent=2, default=float) + "\n")


def bare_argv():
    """RecBole's Config reads ``--key=value`` from sys.argv above config_dict: hide ours from it."""
    from recbole_llm.compat import recbole_argv

    return recbole_argv()


def split_overrides(extra: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``--key=value`` for every model, ``--MODEL.key=value`` for one: (global args, per-model args)."""
    shared, per_model = [], {}
    for arg in extra:
        key, value = key_value(arg)
        if "." in key:
            model, key = key.split(".", 1)
            per_model.setdefault(model, []).append(f"--{key}={value}")
        else:
            shared.append(arg)
    return shared, per_model
