"""Count the bad-input cases of tests/test_bad_input.py and whether each holds, into docs/RESULTS.md.

    python benchmarks/bad_input_cases.py

Runs that test file with pytest and writes one row per case (the test's first docstring
line or name, and its outcome) to the "bad_input" section.
"""
from __future__ import annotations

import sys

import pytest
from results_doc import ROOT, markdown_table, write_section


class Outcomes:
    """A pytest plugin that records each test's outcome and description."""

    def __init__(self):
        self.rows = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.rows.append((report.nodeid.split("::", 1)[1], report.outcome))


def _case(test_name: str) -> str:
    """'test_config_value_of_the_wrong_type[epochs=ten]' -> 'config value of the wrong type (epochs=ten)'."""
    name, _, param = test_name.partition("[")
    name = name.removeprefix("test_").replace("_", " ")
    return f"{name} ({param.rstrip(']')})" if param else name


def main():
    outcomes = Outcomes()
    code = pytest.main(["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_bad_input.py")], plugins=[outcomes])
    passed = sum(outcome == "passed" for _, outcome in outcomes.rows)
    rows = [[_case(name), outcome] for name, outcome in outcomes.rows]
    body = (
        f"{passed} of {len(rows)} bad-input cases give a clear error naming the file or setting and the fix, "
        "or are handled and logged (tests/test_bad_input.py; errors are `recbole_llm.errors.InputError`, "
        "printed by the command line as one `error: ...` line).\n\n" + markdown_table(["case", "outcome"], rows)
    )
    write_section("bad_input", "Bad input, tried for real", body)
    print(f"{passed}/{len(rows)} cases pass")
    sys.exit(code)


if __name__ == "__main__":
    main()
