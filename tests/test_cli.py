"""A command line that explains itself: --help, --settings MODEL, and the settings a run changes."""
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recbole_llm import cli
from recbole_llm.settings import changed_settings, describe, paint, yaml_comments

ROOT = Path(__file__).resolve().parent.parent
ANSI = "\033["


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_help_lists_the_models_the_settings_and_the_property_files(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for name in ("LRURec", "LlamaRec", "E4SRec", "Laser", "SeRALM", "SASRec", "GRU4Rec", "BERT4Rec", "LightSANs"):
        assert name in out
    assert "--key=value is a RecBole or model setting" in out
    assert "--epochs=4" in out and "--candidate_k=10" in out  # the two examples
    assert str(ROOT / "properties") + "/overall.yaml" in out and "--settings" in out
    assert ANSI not in out


def test_settings_prints_each_default_with_its_comment_from_the_most_specific_file(capsys):
    cli.main(["--settings", "LlamaRec"])
    out = capsys.readouterr().out
    model_part = out.split("properties/model/LlamaRec.yaml", 1)[1].split("properties/overall.yaml", 1)[0]
    assert "candidate_k: 20" in model_part and "# (int) Candidates per user" in model_part
    assert "[a whole number from 1 to 26]" in model_part  # the allowed values, from setting_rules
    assert "[one of random, retriever, mix]" in model_part
    assert "train_batch_size: 4 " in model_part  # LlamaRec's own default, not overall.yaml's 256
    overall = out.split("properties/overall.yaml", 1)[1].split("recbole/properties", 1)[0]
    assert "eval_slices: False" in overall and "train_batch_size" not in overall
    assert "split: the last item of each user is the test target" in overall  # a block's comments
    assert ANSI not in out


def test_settings_of_a_recbole_model_show_recboles_file(capsys):
    cli.main(["--settings", "SASRec"])
    out = capsys.readouterr().out
    assert "recbole/properties/model/SASRec.yaml" in out
    assert "n_layers: 2" in out and "# (int) The number of transformer layers" in out


def test_settings_of_an_unknown_model_is_one_error_line():
    with pytest.raises(SystemExit, match="error: Unknown model 'LlamaRek': did you mean LlamaRec"):
        cli.main(["--settings", "LlamaRek"])


def test_run_recbole_llm_script_prints_settings():
    out = subprocess.run([sys.executable, str(ROOT / "run_recbole_llm.py"), "--settings", "LRURec"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "properties/model/LRURec.yaml" in out.stdout and ANSI not in out.stdout


def test_colour_only_on_a_terminal():
    assert paint("x", "green", io.StringIO()) == "x"
    assert paint("x", "green", Terminal()).startswith(ANSI)
    assert ANSI in describe("LRURec", stream=Terminal()) and ANSI not in describe("LRURec", stream=io.StringIO())


def test_yaml_comments_outside_quotes(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: 'x # not a comment'   # the comment\nb: 1\nc:\n  d: 2   # inner\n# e: 3\n")
    assert yaml_comments(path) == {"a": "the comment", "b": "", "c": "d: inner"}


def _changed(tiny_data, tmp_path, monkeypatch, stream=None):
    from recbole_llm.quick_start import load_config

    name, overrides = tiny_data
    overrides = {k: v for k, v in overrides.items() if k != "epochs"}
    config_file = tmp_path / "mine.yaml"
    config_file.write_text(yaml.safe_dump({"epochs": 3, "stopping_step": 10}))  # stopping_step: the default
    monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py", "--learning_rate=0.005"])
    config = load_config("LRURec", name, [str(config_file)], overrides)
    return changed_settings(config, [str(config_file)], overrides, stream=stream), config_file, overrides


def test_changed_settings_name_the_default_and_where_each_was_set(tiny_data, tmp_path, monkeypatch):
    lines, config_file, _ = _changed(tiny_data, tmp_path, monkeypatch)
    by_key = {line.split(":", 1)[0]: line for line in lines}
    assert by_key["epochs"] == f"epochs: 3 (default 200 in properties/overall.yaml; set in {config_file})"
    assert by_key["learning_rate"].startswith("learning_rate: 0.005 (default 0.001 in properties/model/LRURec.yaml")
    assert by_key["learning_rate"].endswith("set --learning_rate=...)")
    assert "MAX_ITEM_LIST_LENGTH: 8 (default 200 in properties/model/LRURec.yaml; set in config_dict)" in lines
    assert "stopping_step" not in by_key  # given, but equal to its default
    assert all(ANSI not in line for line in lines)
    coloured, *_ = _changed(tiny_data, tmp_path, monkeypatch, stream=Terminal())
    assert all(line.startswith(ANSI) for line in coloured)


def test_a_run_logs_its_changed_settings_once(tiny_data, monkeypatch, caplog):
    from recbole_llm.quick_start import build

    name, overrides = tiny_data
    monkeypatch.setattr(sys, "argv", ["run_recbole_llm.py"])
    with caplog.at_level(logging.INFO):
        build("LRURec", name, config_dict={**overrides, "state": "INFO", "epochs": 1})
    logged = [r.getMessage() for r in caplog.records if "settings changed from their defaults" in r.getMessage()]
    assert len(logged) == 1 and "epochs: 1 (default 200 in properties/overall.yaml; set in config_dict)" in logged[0]
