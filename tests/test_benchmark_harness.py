"""What every benchmark shares (benchmarks/results_doc.py): one ``--key=value`` parser, and the keys of
the records a later run reuses (a key that changed would make that run miss a committed record).

Breakage checked by hand: parse_overrides with ``yaml.safe_load`` alone (``1e-3`` a string) fails the
first test; a record key built from a reordered or reparsed dict fails the second and the third.
"""
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_doc import parse_overrides, run_record_path, split_overrides  # noqa: E402


def test_overrides_are_read_as_recbole_reads_a_property_file():
    assert parse_overrides(["--learning_rate=1e-3", "--epochs=5", "--eval_slices=True", "--llm_layers=~",
                            "--lora_target_modules=[q_proj, v_proj]", "--retriever_config={epochs: 1}",
                            "--retriever=SASRec", "--user_inter_num_interval='[0,inf)'", "--reg_weight=-2E4"]) == {
        "learning_rate": 0.001, "epochs": 5, "eval_slices": True, "llm_layers": None,
        "lora_target_modules": ["q_proj", "v_proj"], "retriever_config": {"epochs": 1},
        "retriever": "SASRec", "user_inter_num_interval": "[0,inf)", "reg_weight": -20000.0}
    assert isinstance(parse_overrides(["--learning_rate=1e-3"])["learning_rate"], float)
    for bad in (["--epochs", "5"], ["epochs=5"]):
        with pytest.raises(SystemExit, match="settings are given as --key=value"):
            parse_overrides(bad)
    assert split_overrides(["--epochs=5", "--SASRec.epochs=2"]) == (["--epochs=5"], {"SASRec": ["--epochs=2"]})


def settings_of(command: str, flags: set[str]) -> list[str]:
    """The ``--key=value`` settings of a recorded command line (the benchmark's own flags left out)."""
    return [arg for arg in shlex.split(command) if arg.startswith("--") and "=" in arg
            and arg[2:].split("=", 1)[0] not in flags]


def test_the_committed_records_are_found_again_by_the_commands_that_made_them():
    import e4srec_vs_sasrec
    import llamarec_curve

    e4srec = sorted(e4srec_vs_sasrec.RECORDS.glob("*/*.json"))
    curve = sorted(llamarec_curve.RECORDS.glob("*.json"))
    assert e4srec and curve
    for path in e4srec:  # main(): {**overrides, "seed": seed} per seed
        record = json.loads(path.read_text())
        overrides = {**parse_overrides(settings_of(record["command"], {"dataset", "section", "seeds"})),
                     "seed": record["seed"]}
        assert overrides == record["overrides"]
        assert run_record_path(e4srec_vs_sasrec.RECORDS, path.parent.name, overrides) == path
    for path in curve:  # main(): {**DEFAULTS, **overrides}; the key holds their resolved values
        record = json.loads(path.read_text())
        overrides = {**llamarec_curve.DEFAULTS,
                     **parse_overrides(settings_of(record["command"], {"dataset", "records", "results"}))}
        assert overrides == record["overrides"]
        assert llamarec_curve.record_path(llamarec_curve.RECORDS, "ml-100k", record["settings"]) == path


def test_the_key_of_a_known_laser_run_is_unchanged():
    """laser.py's record of ``python benchmarks/laser.py --learning_rate=1e-3 --lora_target_modules=[q_proj, v_proj]
    --llm_layers=~`` (its overrides over ``show_progress`` and ``--threads``): the key committed code made."""
    overrides = {"show_progress": False, "num_threads": 1,
                 **parse_overrides(["--learning_rate=1e-3", "--lora_target_modules=[q_proj, v_proj]", "--llm_layers=~"])}
    assert run_record_path(Path("r"), "ml-100k", overrides) == Path("r/ml-100k/56c3252487cf1433.json")
