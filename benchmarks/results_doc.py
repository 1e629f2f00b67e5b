"""Write one benchmark's section of docs/RESULTS.md (between its own markers), atomically."""
from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "RESULTS.md"
HEADER = "# Measured results\n\nEvery number below was measured by the script named in its section, on the machine it names.\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load, threads = os.getloadavg()[1], torch.get_num_threads()
    return (
        f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {threads} thread{'s' * (threads > 1)}, "
        f"Python {platform.python_version()}; load average {load:.1f} at the end of the run (above 2 = shared cores)"
    )


def command() -> str:
    return "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])


def write_section(name: str, title: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/RESULTS.md."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (
        f"<!-- BEGIN {name} -->\n## {title}\n\n"
        f"- command: `{command()}`\n- machine: {machine()}\n- date: {stamp}\n\n{body.strip()}\n<!-- END {name} -->\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    tmp = RESULTS.with_suffix(".md.tmp")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(text)
    os.replace(tmp, RESULTS)


def parse_overrides(args: list[str]) -> dict:
    """``--key=value`` arguments as a RecBole config dict (values parsed as YAML; ``1e-3`` is a number)."""
    import yaml

    def value(text):
        parsed = yaml.safe_load(text)
        if isinstance(parsed, str):
            try:
                return float(parsed)
            except ValueError:
                pass
        return parsed

    return {k.lstrip("-"): value(v) for k, v in (a.split("=", 1) for a in args)}


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
