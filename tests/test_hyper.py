"""Hyper-parameter search (recbole_llm.hyper, run_hyper_llm.py): RecBole's run_hyper for our runner."""
import json
import math
import sys

import pytest
import yaml

from recbole_llm import hyper, load_config, quick_start
from recbole_llm.errors import InputError, MissingInputError


def space(tmp_path, text, name="space.hyper"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_exhaustive_search_runs_every_point_and_keeps_the_best(tiny_data, tmp_path, monkeypatch):
    name, overrides = tiny_data
    seen = []  # the learning rate in each trial's final config
    real_build = quick_start.build

    def build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        seen.append(built[0]["learning_rate"])
        return built

    monkeypatch.setattr(quick_start, "build", build)
    params_file = space(tmp_path, "learning_rate choice [0.01,0.001]\n")
    output = tmp_path / "out" / "lrurec.result"
    summary = hyper.run_hyper("LRURec", name, str(params_file), config_dict={**overrides, "epochs": 1},
                              output_file=output)

    assert seen == [0.01, 0.001]
    trials = summary["trials"]
    assert [t["params"] for t in trials] == [{"learning_rate": 0.01}, {"learning_rate": 0.001}]
    scores = [t["best_valid_score"] for t in trials]
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert all("ndcg@10" in t["test_result"] and "ndcg@10" in t["best_valid_result"] for t in trials)
    best = scores.index(max(scores))  # NDCG@10: bigger is better; the first of equals wins
    assert summary["best_valid_score"] == scores[best] and summary["valid_score_bigger"] is True
    assert summary["best_params"] == trials[best]["params"]
    assert summary["test_result"] == trials[best]["test_result"]
    assert summary["valid_metric"] == "NDCG@10" and summary["model"] == "LRURec"

    text = output.read_text()  # RecBole's export_result format, then the best trial
    assert "learning_rate:0.01\nValid result:\n" in text and "learning_rate:0.001\nValid result:\n" in text
    assert text.count("Test result:") == 2
    assert f"Best params:\nlearning_rate:{trials[best]['params']['learning_rate']}\n" in text
    written = json.loads((tmp_path / "out" / "lrurec.result.json").read_text())
    assert [t["params"] for t in written["trials"]] == [t["params"] for t in trials]
    assert written["best_params"] == summary["best_params"]
    assert math.isclose(written["best_valid_score"], summary["best_valid_score"])
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_command_line_overrides_reach_every_trial_and_search_flags_do_not(tiny_data, tmp_path, monkeypatch, capsys):
    name, overrides = tiny_data
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(overrides))
    configs = []

    def fake_run(model, dataset, config_file_list=None, config_dict=None, saved=True):
        config = load_config(model, dataset, config_file_list, config_dict)
        configs.append(config)
        return {"best_valid_score": 0.1 + config["dropout_prob"], "valid_score_bigger": True,
                "best_valid_result": {"ndcg@10": 0.0}, "test_result": {"ndcg@10": config["dropout_prob"]}}

    monkeypatch.setattr(hyper, "run_recbole_llm", fake_run)
    monkeypatch.setattr("sys.argv", ["run_hyper_llm.py", "--unchanged"])
    params_file = space(tmp_path, "dropout_prob choice [0.1,0.3,0.2]\n")
    output = tmp_path / "cli.result"
    argv = ["--model=LRURec", f"--dataset={name}", f"--config_files={config_file}", f"--params_file={params_file}",
            "--algo=exhaustive", "--max_evals=5", f"--output_file={output}", "--epochs=1", "--weight_decay=0.05"]
    summary = hyper.main(argv)

    assert [c["dropout_prob"] for c in configs] == [0.1, 0.3, 0.2]
    for config in configs:
        assert config["epochs"] == 1 and config["weight_decay"] == 0.05  # --key=value: every trial
        assert not {"params_file", "algo", "max_evals", "output_file", "config_files"} & set(config.final_config_dict)
    assert summary["best_params"] == {"dropout_prob": 0.3}
    assert math.isclose(summary["best_valid_score"], 0.4)
    assert "best params: dropout_prob:0.3" in capsys.readouterr().out
    assert output.is_file() and (tmp_path / "cli.result.json").is_file()
    assert sys.argv == ["run_hyper_llm.py", "--unchanged"]  # restored


def test_random_and_bayes_search_with_hyperopt_are_seeded(tiny_data, tmp_path):
    name, overrides = tiny_data
    params_file = space(tmp_path, "learning_rate loguniform -9,-4\nhidden_size quniform 16,64,16\n"
                                  "learner choice ['adam','adamw']\n")

    def objective(config_dict, config_file_list):
        return {"model": "LRURec", "best_valid_score": config_dict["learning_rate"] * config_dict["hidden_size"],
                "valid_score_bigger": False, "best_valid_result": {}, "test_result": {}}

    for algo in ("random", "bayes"):
        runs = [hyper.run_hyper("LRURec", name, str(params_file), config_dict=overrides, algo=algo, max_evals=4,
                                output_file=False, objective=objective) for _ in range(2)]
        assert runs[0]["trials"] == runs[1]["trials"]  # the config's seed seeds the search
        trials = runs[0]["trials"]
        assert len(trials) == 4
        for t in trials:
            assert math.exp(-9) <= t["params"]["learning_rate"] <= math.exp(-4)
            assert type(t["params"]["hidden_size"]) is int and t["params"]["hidden_size"] in (16, 32, 48, 64)
            assert t["params"]["learner"] in ("adam", "adamw")
        assert runs[0]["best_valid_score"] == min(t["best_valid_score"] for t in trials)  # smaller is better here


def test_exhaustive_grid_of_choice_and_quniform(tmp_path):
    params = hyper.read_space(space(tmp_path, "# a comment\n\nn_layers quniform 1,3,1\ndropout_prob choice [0.1, 0.2]\n"))
    search = hyper.HyperSearch("LRURec", "tiny", params)
    assert search.grid == [{"n_layers": n, "dropout_prob": d} for n in (1, 2, 3) for d in (0.1, 0.2)]
    assert search.max_evals == 6 and search.early_stop == 0


def test_missing_params_file_is_one_error_line(tiny_data, tmp_path):
    name, overrides = tiny_data
    with pytest.raises(MissingInputError, match="params_file 'nope.hyper' does not exist"):
        hyper.run_hyper("LRURec", name, "nope.hyper", config_dict=overrides)
    with pytest.raises(SystemExit) as stop:
        hyper.main(["--model=LRURec", f"--dataset={name}", f"--params_file={tmp_path / 'nope.hyper'}"])
    assert str(stop.value).startswith("error: params_file ") and "\n" not in str(stop.value)


@pytest.mark.parametrize("line, message", [
    ("learning_rat choice [0.1]", r"'learning_rat' is not a setting of LRURec.*Did you mean learning_rate"),
    ("hidden_size uniform 16,64", r"hidden_size=0.5 must be a whole number"),
    ("hidden_size choice ['big']", r"hidden_size='big' must be a whole number"),
    ("learning_rate", r":1: 'learning_rate' is not 'name type values'"),
    ("learning_rate gauss 0,1", r"unknown type 'gauss'"),
    ("learning_rate choice 0.1", r"choice needs a non-empty list"),
    ("learning_rate uniform 0.1", r"uniform needs low,high"),
    ("learning_rate uniform 0.1,0.01", r"needs low < high"),
    ("learning_rate loguniform -8,0", r"exhaustive search enumerates choice and quniform lines, not loguniform"),
])
def test_bad_space_is_reported_before_any_trial(tiny_data, tmp_path, line, message):
    name, overrides = tiny_data

    def objective(config_dict, config_file_list):
        raise AssertionError("no trial should run")

    with pytest.raises(InputError, match=message):
        hyper.run_hyper("LRURec", name, str(space(tmp_path, line + "\n")), config_dict=overrides, objective=objective)


def test_searched_setting_fixed_on_the_command_line(tiny_data, tmp_path, monkeypatch):
    name, overrides = tiny_data
    monkeypatch.setattr("sys.argv", ["x", "--learning_rate=0.1"])
    with pytest.raises(InputError, match="--learning_rate=... on the command line would override"):
        hyper.run_hyper("LRURec", name, str(space(tmp_path, "learning_rate choice [0.1,0.2]\n")),
                        config_dict=overrides)


@pytest.mark.parametrize("model, size", [("LRURec", 12), ("LlamaRec", 4)])
def test_shipped_example_spaces_are_valid(tiny_data, model, size):
    name, overrides = tiny_data
    path = hyper.find_params_file(None, model)  # properties/hyper/<model>.hyper
    assert path == hyper.find_params_file(f"properties/hyper/{model}.hyper", model) == hyper.find_params_file(model, model)
    params = hyper.read_space(path)
    hyper.check_space(params, load_config(model, name, config_dict=overrides))
    assert len(hyper.HyperSearch(model, name, params).grid) == size
