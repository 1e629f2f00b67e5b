"""What every benchmark shares (benchmarks/results_doc.py): one ``--key=value`` parser, and the keys of
the records a later run reuses (a key that changed would make that run miss a committed record).

Breakage checked by hand: parse_overrides with ``yaml.safe_load`` alone (``1e-3`` a string) fails the
first test; a record key built from a reordered or reparsed dict fails the second and the third.
Also: the kernels' instruction-set limit of ``--isa`` (an emulated AVX2-only CPU) is seen, restarts the process with
every variable, reaches torch, and keys its own records while the keys of unheld runs stay as committed.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import results_doc  # noqa: E402
from results_doc import ISA_LIMITS, cpu_label, isa_limit, machine_key, parse_overrides, run_record_path  # noqa: E402
from results_doc import split_overrides  # noqa: E402


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


def test_the_records_of_unheld_kernels_keep_their_keys_and_held_ones_get_their_own():
    import quickstart

    speed = sorted((ROOT / "benchmarks" / "records" / "llm_speed").glob("*/*.json"))
    quick = sorted(quickstart.RECORDS.glob("*.json"))
    assert speed and quick
    for path in speed:
        record = json.loads(path.read_text())
        assert machine_key(record["machine"], record["settings"]["threads"]) == path.parent.name
        other = {**record["machine"], "isa_limit": None if record["machine"].get("isa_limit") else "avx2"}
        assert machine_key(other, record["settings"]["threads"]) != path.parent.name
    for path in quick:
        record = json.loads(path.read_text())
        assert quickstart.record_path(record["machine"], record["settings"]) == path
        other = {**record["machine"], "isa_limit": None if record["machine"].get("isa_limit") else "avx2"}
        assert quickstart.record_path(other, record["settings"]) != path


def test_kernels_held_to_avx2_are_seen_only_with_every_variable(monkeypatch):
    for name in ISA_LIMITS["avx2"]:
        monkeypatch.delenv(name, raising=False)
    assert isa_limit() is None
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert isa_limit() is None  # oneDNN, MKL and FBGEMM would still use AVX-512
    for name, value in ISA_LIMITS["avx2"].items():
        monkeypatch.setenv(name, value)
    assert isa_limit() == "avx2"
    assert cpu_label({"cpu": "Xeon", "isa_limit": isa_limit()}) == "Xeon, kernels held to AVX2 (emulating an AVX2-only CPU)"
    assert cpu_label({"cpu": "Xeon"}) == cpu_label({"cpu": "Xeon", "isa_limit": None}) == "Xeon"


def test_holding_the_kernels_restarts_the_process_with_every_variable(monkeypatch):
    restarts = []
    monkeypatch.setattr(results_doc.os, "execve", lambda exe, argv, env: restarts.append(env))
    for name in ISA_LIMITS["avx2"]:
        monkeypatch.delenv(name, raising=False)
    results_doc.hold_kernels_to(None)
    assert restarts == []
    results_doc.hold_kernels_to("avx2")
    assert len(restarts) == 1 and all(restarts[0][k] == v for k, v in ISA_LIMITS["avx2"].items())
    for name, value in ISA_LIMITS["avx2"].items():
        monkeypatch.setenv(name, value)
    results_doc.hold_kernels_to("avx2")  # held already: no second restart
    assert len(restarts) == 1


def test_the_held_variables_reach_torchs_kernels():
    probe = ("import torch; from recbole_llm.llm.precision import cpu_bf16_units; "
             "print(torch.backends.cpu.get_cpu_capability(), cpu_bf16_units())")
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **ISA_LIMITS["avx2"]}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["AVX2", "None"]
