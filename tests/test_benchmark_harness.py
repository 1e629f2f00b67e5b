"""What every benchmark shares (benchmarks/results_doc.py): one ``--key=value`` parser.

Breakage checked by hand: parse_overrides with ``yaml.safe_load`` alone (``1e-3`` a string) fails.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_doc import parse_overrides, split_overrides  # noqa: E402


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
