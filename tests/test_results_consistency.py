"""README and docs/RESULTS.md agree with the records and with the settings (no training: reads files only).

- The status table of the README ("Status") and the summary at the top of docs/RESULTS.md are exactly what
  ``benchmarks/status.py`` computes from the committed records, so a number edited in one of them alone fails.
- Every section a row cites is a heading of docs/RESULTS.md, and LRURec's row (read from its section, its
  benchmark keeps no records) carries the ratio that section states.
- Every ``--key=`` in README.md and docs/RESULTS.md names a setting of a property file (ours or RecBole's) or a
  flag of one of our command lines or benchmarks (the section "Bad input, tried for real" misspells settings on
  purpose and is left out).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import status  # noqa: E402
from results_doc import read_between_markers  # noqa: E402

README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "RESULTS.md"
#: Placeholders in the text, not settings; and the flag of RecBole's own script run_recbole_group.py (not installed
#: with the recbole package) that README runs through ``python -m recbole_llm.run``.
PLACEHOLDERS = {"key", "MODEL.key"}
RECBOLE_SCRIPT_FLAGS = {"model_list"}


@pytest.fixture(scope="module")
def table() -> str:
    return status.status_table()


@pytest.mark.parametrize("path", [README, RESULTS], ids=["README", "RESULTS"])
def test_status_block_is_what_the_records_give(path, table):
    block = read_between_markers(path, status.SECTION)
    assert block is not None, f"{path.name} has no status block"
    assert block == table, (f"{path.name}'s status table differs from the records: run `python benchmarks/status.py` "
                            "(numbers are never typed by hand)")


def status_rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model |")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_every_row_cites_a_heading_of_results(table):
    headings = set(re.findall(r"^#+ (.*)$", RESULTS.read_text(), re.M))
    rows = status_rows(table)
    assert [row[0] for row in rows] == list(status.MODELS)
    for row in rows:
        for cited in re.findall(r'"([^"]+)"', row[-1]):
            assert cited in headings, f"{row[0]} cites {cited!r}, which is no heading of docs/RESULTS.md"


def test_lrurec_row_carries_its_sections_ratio(table):
    row = next(r for r in status_rows(table) if r[0] == "LRURec")
    ratio = row[4].split(" ")[0]
    section = read_between_markers(RESULTS, "lrurec_vs_sasrec")
    assert f"LRURec / SASRec NDCG@10 (mean over 3 seed(s)): {ratio}" in section
    assert row[1].split(" / ")[0] in section and row[3].split(" / ")[0] in section  # the means over seeds


def declared_settings() -> set[str]:
    import recbole

    files = [ROOT / "properties" / "overall.yaml", *(ROOT / "properties").glob("model/*.yaml"),
             *(ROOT / "properties").glob("dataset/*.yaml")]
    recbole_properties = Path(recbole.__file__).parent / "properties"
    files += [recbole_properties / "overall.yaml", *recbole_properties.glob("model/*.yaml"),
              *recbole_properties.glob("dataset/*.yaml"), *recbole_properties.glob("quick_start_config/*.yaml")]
    keys = set()
    for path in files:
        loaded = yaml.safe_load(path.read_text()) or {}
        keys |= set(loaded) if isinstance(loaded, dict) else set()
    return keys


def command_line_flags() -> set[str]:
    sources = [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("recbole_llm/**/*.py"), *ROOT.glob("run_*.py")]
    flags = set()
    for path in sources:
        flags |= set(re.findall(r"add_argument\(\s*\"--([A-Za-z_]+)\"", path.read_text()))
    return flags


def documented_keys(text: str) -> set[str]:
    return set(re.findall(r"--([A-Za-z_][A-Za-z0-9_.]*)=", text))


def test_every_documented_key_is_a_setting_or_a_flag():
    results = RESULTS.read_text()
    bad_input = read_between_markers(RESULTS, "bad_input") or ""
    keys = documented_keys(README.read_text()) | documented_keys(results.replace(bad_input, ""))
    known = declared_settings() | command_line_flags()
    models = set(status.MODELS)
    unknown = sorted(key for key in keys - PLACEHOLDERS - RECBOLE_SCRIPT_FLAGS
                     if (key.split(".", 1)[1] if key.split(".", 1)[0] in models else key) not in known)
    assert not unknown, f"--key= in README/RESULTS that no property file declares and no command line takes: {unknown}"


def test_the_key_check_finds_a_removed_setting():
    """The check above is a check: a setting that no longer exists is not known."""
    assert "head_init" not in declared_settings() | command_line_flags()
    assert "head_init" in documented_keys("`python benchmarks/e4srec_vs_sasrec.py --head_init=item_table`")
