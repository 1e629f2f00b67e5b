"""benchmarks/scaling.py: one record per cell under a folder per machine, reused by a later run with the same
settings, and a half-written record measured again."""
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def scaling(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import scaling

    return scaling


def test_each_cell_is_a_record_reused_by_the_next_run(scaling, tmp_path, monkeypatch):
    argv = ["--items", "40", "--users", "30", "--history", "5", "--models", "SASRec", "--train_steps", "1",
            "--eval_batches", "1", "--eval_batch_size", "8", "--records", str(tmp_path)]
    [row] = scaling.main(argv)
    [path] = tmp_path.glob("*/SASRec-40-30-*.json")
    record = json.loads(path.read_text())
    assert record["row"] == row and record["settings"]["items"] == 40 and record["machine"]["cpu"]
    assert row["model"] == "SASRec" and row["items"] == 40 and row["train_s_per_1000_rows"] > 0

    measured = []
    real = scaling.measure
    monkeypatch.setattr(scaling, "measure", lambda *a, **k: measured.append(a[0]) or real(*a, **k))
    assert scaling.main(argv) == [row] and measured == []  # reused: nothing measured
    path.write_text(record_text := path.read_text()[:40])  # a record cut short is no record
    assert scaling.main(argv)[0]["model"] == "SASRec" and measured == ["SASRec"]
    assert json.loads(path.read_text())["row"]["model"] == "SASRec" and path.read_text() != record_text
    scaling.main([*argv, "--eval_batches", "2"])  # other timing settings: a cell of its own
    assert measured == ["SASRec", "SASRec"] and len(list(tmp_path.glob("*/SASRec-40-30-*.json"))) == 2
