"""README and docs/RESULTS.md agree with the records and with the settings (no training: reads files only).

- The status table of the README ("Status") and the summary at the top of docs/RESULTS.md are exactly what
  ``benchmarks/status.py`` computes from the committed records, so a number edited in one of them alone fails.
- Every section a row cites is a heading of docs/RESULTS.md, and LRURec's row (read from its section, its
  benchmark keeps no records) carries the ratio that section states.
- Every ``--key=`` in README.md, docs/RESULTS.md and the notes under docs/notes/ names a setting of a property file
  (ours or RecBole's) or a flag of one of our command lines or benchmarks (the section "Bad input, tried for real"
  misspells settings on purpose and is left out); docs/history.md too, but for the settings it documents as removed
  since (``REMOVED_SETTINGS``, each of which must be unknown today).
- Every relative link and every ``docs/notes/...`` path in README, RESULTS, history and the notes names a file that
  exists; every note is dated in its file name and linked from RESULTS; no section of RESULTS is written by hand.
- README, RESULTS (outside the benchmarks' blocks) and the notes point at sections by their headings, never by the
  HTML marker names the benchmarks write between.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import status  # noqa: E402
from report import BASELINES  # noqa: E402
from results_doc import read_between_markers  # noqa: E402

from recbole_llm.yaml_io import read_yaml  # noqa: E402

README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "RESULTS.md"
HISTORY = ROOT / "docs" / "history.md"
NOTES = ROOT / "docs" / "notes"
#: Settings removed from the code that docs/history.md still documents, with the commands of their day.
REMOVED_SETTINGS = {"head_init"}
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


def test_every_generated_block_is_what_the_records_give():
    for (path, name), text in status.blocks().items():
        assert read_between_markers(path, name) == text, (f"{path.name}'s block {name!r} differs from the records: "
                                                          "run `python benchmarks/status.py`")


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
        loaded = read_yaml(path) or {}
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


def notes() -> list[Path]:
    return sorted(NOTES.glob("*.md"))


def unknown_keys(text: str) -> list[str]:
    known = declared_settings() | command_line_flags()
    models = {*status.MODELS, *BASELINES}  # --MODEL.key=value: one model's setting (ours or a RecBole baseline)
    return sorted(key for key in documented_keys(text) - PLACEHOLDERS - RECBOLE_SCRIPT_FLAGS
                  if (key.split(".", 1)[1] if key.split(".", 1)[0] in models else key) not in known)


def test_every_documented_key_is_a_setting_or_a_flag():
    results = RESULTS.read_text()
    bad_input = read_between_markers(RESULTS, "bad_input") or ""
    for path, text in [(README, README.read_text()), (RESULTS, results.replace(bad_input, "")),
                       *((note, note.read_text()) for note in notes())]:
        unknown = unknown_keys(text)
        assert not unknown, (f"--key= in {path.relative_to(ROOT)} that no property file declares and no command line "
                             f"takes: {unknown}")


def test_history_documents_only_settings_that_exist_or_are_listed_as_removed():
    unknown = set(unknown_keys(HISTORY.read_text()))
    assert unknown <= REMOVED_SETTINGS, f"--key= in docs/history.md that is neither a setting nor listed as removed: " \
                                        f"{sorted(unknown - REMOVED_SETTINGS)}"
    assert not REMOVED_SETTINGS & (declared_settings() | command_line_flags()), "a setting listed as removed exists"


def linked_paths(path: Path) -> list[tuple[str, Path]]:
    """Each relative markdown link of ``path`` (resolved from its folder) and each ``docs/notes/...`` path it names."""
    text = path.read_text()
    found = [(target, path.parent / target.split("#")[0]) for target in re.findall(r"\]\(([^)\s]+)\)", text)
             if not re.match(r"[a-z]+:|#", target)]
    return found + [(name, ROOT / name) for name in re.findall(r"docs/notes/[\w.-]+\.md", text)]


@pytest.mark.parametrize("path", [README, RESULTS, HISTORY, *notes()], ids=lambda p: p.name)
def test_every_link_names_a_file_that_exists(path):
    missing = [target for target, resolved in linked_paths(path) if not resolved.exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_every_note_is_dated_and_linked_from_results():
    assert notes(), "docs/notes/ holds no note"
    linked = {resolved.resolve() for _, resolved in linked_paths(RESULTS)}
    for note in notes():
        assert re.fullmatch(r"\d{4}-\d\d-\d\d-[a-z0-9-]+\.md", note.name), f"{note.name}: not named <date>-<topic>.md"
        assert note.resolve() in linked, f"docs/notes/{note.name} is not linked from docs/RESULTS.md"
    code = [*ROOT.glob("recbole_llm/**/*.py"), *ROOT.glob("benchmarks/*.py")]
    named = {name for path in code for name in re.findall(r"docs/notes/[\w.-]+\.md", path.read_text())}
    assert all((ROOT / name).exists() for name in named), f"code names a note that does not exist: {sorted(named)}"


def test_no_section_of_results_is_written_by_hand():
    hand = [h for h in re.findall(r"^#+ (.*)$", RESULTS.read_text(), re.M) if "by hand" in h]
    assert not hand, f"hand-written sections belong in docs/notes/ (dated), linked from RESULTS: {hand}"


def marker_names() -> set[str]:
    """The names of the blocks the benchmarks write (those in RESULTS and those their code names literally)."""
    names = set(re.findall(r"<!-- BEGIN (\S+) -->", RESULTS.read_text()))
    for path in ROOT.glob("benchmarks/*.py"):
        names |= set(re.findall(r"write_section\(\s*\"(\w+)\"", path.read_text()))
        names |= set(re.findall(r"\"--section\", default=\"(\w+)\"", path.read_text()))
    return names


def test_prose_points_at_headings_not_markers():
    results = RESULTS.read_text()
    outside = re.sub(r"<!-- BEGIN (\S+) -->\n.*?<!-- END \1 -->\n", "", results, flags=re.S)
    names = marker_names()
    assert {"report", "seralm", "llamarec", "status"} <= names
    for path, text in [(README, README.read_text()), (RESULTS, outside), *((note, note.read_text()) for note in notes())]:
        quoted = sorted(name for name in names if f'"{name}"' in text)
        assert not quoted, (f"{path.relative_to(ROOT)} names sections by their HTML markers {quoted}: name their "
                            "headings instead")


def test_the_key_check_finds_a_removed_setting():
    """The check above is a check: a setting that no longer exists is not known."""
    assert "head_init" not in declared_settings() | command_line_flags()
    assert "head_init" in documented_keys("`python benchmarks/e4srec_vs_sasrec.py --head_init=item_table`")


def test_status_rows_take_only_current_records(tmp_path, monkeypatch):
    """A record from before the model's last change is not quoted: the row says "not measured since" instead;
    records on the current code give the mean, the standard error of the ratio and the number of seeds."""
    from results_doc import write_record

    head = status.git("rev-parse", "--short", "HEAD").stdout.strip()
    machine = "2 cores (Some CPU; avx2), torch 2.13.0+cpu, 1 thread, Python 3.11.7; LLM compute unless a setting " \
              "says otherwise: float32 (no bf16 units); load average 1.0 at the end of the run"

    def e4srec(seed, commit, e4s, sas):
        return {"overrides": {"seed": seed}, "seed": seed, "commit": commit, "date": "2026-12-07 10:00 UTC",
                "machine": machine, "settings": "LLM embedded SmolLM2-135M-Instruct (float32), history 20",
                "e4srec": {"ndcg@10": e4s, "recall@10": 0.1}, "sasrec": {"ndcg@10": sas, "recall@10": 0.2}}

    folder = tmp_path / "e4srec" / status.DATASET
    write_record(folder / "old.json", e4srec(2020, "149aca9", 0.09, 0.05))  # before CHANGES["E4SRec"]
    monkeypatch.setattr(status, "RECORDS", tmp_path)
    row = status.paired_row("E4SRec", tmp_path / "e4srec", "e4srec", lambda r: "SmolLM2")
    assert "not measured since" in row[-1] and "0.09" not in " ".join(row)
    write_record(folder / "a.json", e4srec(2020, head, 0.05, 0.05))
    write_record(folder / "b.json", e4srec(2021, head, 0.06, 0.05))
    write_record(folder / "c.json", {**e4srec(2022, head, 0.01, 0.05), "overrides": {"seed": 2022, "epochs": 1}})
    row = status.paired_row("E4SRec", tmp_path / "e4srec", "e4srec", lambda r: "SmolLM2")
    assert row[1] == "0.0550 / 0.1000" and row[3] == "0.0500 / 0.2000"
    assert row[4] == "1.100 ± 0.100 (2)"  # ratios 1.0 and 1.2; the old record and the non-default run left out
    assert row[5] == "SmolLM2, float32" and row[6] == "2 cores (Some CPU; avx2), 2026-12-07"


def test_a_record_that_ran_a_later_default_counts_as_measured_on_it():
    """LlamaRec's last change only made ranker_history_len 10 the default: a record from before it that ran with
    10 measured what the default now is; one with 20 did not."""
    before = status.git("rev-parse", "--short", f"{status.CHANGES['LlamaRec'][0]}~1").stdout.strip()
    record = {"commit": before, "settings": {"ranker_history_len": 10, "seed": 2020}}
    assert status.is_current("LlamaRec", record)
    assert not status.is_current("LlamaRec", {**record, "settings": {"ranker_history_len": 20, "seed": 2020}})
    assert not status.is_current("LlamaRec", {"commit": before, "settings": "a text, not settings"})
