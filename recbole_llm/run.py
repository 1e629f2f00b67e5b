"""Run an unchanged RecBole script with our models available by name.

    python -m recbole_llm.run path/to/run_recbole_group.py --model_list=SASRec,LlamaRec --dataset=ml-100k

Imports :mod:`recbole_llm` (which installs :mod:`recbole_llm.plugin`), then runs the script
as ``__main__`` with its own arguments, as ``python path/to/script.py ...`` would.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import recbole_llm  # noqa: F401 - installs the plugin


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__.strip())
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f"error: no script at {script}; give the path of a RecBole script, e.g. run_recbole.py")
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # as Python does for a script
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
