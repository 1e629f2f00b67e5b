"""Hyper-parameter search (recbole_llm.hyper, run_hyper_llm.py): RecBole's HyperTuning for our runner."""
import itertools
import sys

import pytest
import yaml
from recbole.trainer.hyper_tuning import HyperTuning

from recbole_llm import hyper, load_config, quick_start
from recbole_llm.errors import InputError, MissingInputError


def space(tmp_path, text, name="space.hyper"):
    path = tmp_path / name
    path.write_text(text)
    return path


def fake_result(score, bigger=True):
    return {"model": "X", "best_valid_score": score, "valid_score_bigger": bigger,
            "best_valid_result": {"ndcg@10": score}, "test_result": {"ndcg@10": score}}


def test_compat_makes_recboles_exhaustive_search_enumerate_the_grid(tmp_path):
    seen = []

    def objective(config_dict, config_file_list):
        seen.append((config_dict["a"], config_dict["b"]))
        return fake_result(0.0)  # a best of 0.0 must stay the best (compat shim 11)

    tuner = HyperTuning(objective, params_file=str(space(tmp_path, "a choice [1,2]\nb choice ['x','y','z']\n")))
    tuner.run()
    assert sorted(seen) == list(itertools.product([1, 2], ["x", "y", "z"]))  # each point once
    assert tuner.best_score == 0.0 and (tuner.best_params["a"], tuner.best_params["b"]) == seen[0]


def test_exhaustive_search_runs_every_point_and_keeps_the_best(tiny_data, tmp_path, monkeypatch):
    name, overrides = tiny_data
    seen = []  # the learning rate in each trial's final config
    real_build = quick_start.build

    def build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        seen.append(built[0]["learning_rate"])
        return built

    monkeypatch.setattr(quick_start, "build", build)
    output = tmp_path / "out" / "lrurec.result"
    tuner = hyper.run_hyper("LRURec", name, str(space(tmp_path, "learning_rate choice [0.01,0.001]\n")),
                            config_dict={**overrides, "epochs": 1}, output_file=output)

    assert sorted(seen) == [0.001, 0.01]
    results = {float(key.split(":")[1]): result for key, result in tuner.params2result.items()}
    assert sorted(results) == [0.001, 0.01]
    scores = {lr: r["best_valid_score"] for lr, r in results.items()}
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores.values())
    assert all("ndcg@10" in r["test_result"] and "ndcg@10" in r["best_valid_result"] for r in results.values())
    first, second = seen  # in trial order; NDCG@10: bigger is better, the first of equals wins
    best = second if scores[second] > scores[first] else first
    assert tuner.best_params == {"learning_rate": best} and tuner.best_score == scores[best]
    assert all(r["model"] == "LRURec" and r["valid_score_bigger"] is True for r in results.values())

    text = output.read_text()  # RecBole's export_result format
    assert "learning_rate:0.01\nValid result:\n" in text and "learning_rate:0.001\nValid result:\n" in text
    assert text.count("Test result:") == 2
    assert [p.name for p in output.parent.iterdir()] == ["lrurec.result"]  # no temp file left


def test_command_line_overrides_reach_every_trial_and_search_flags_do_not(tiny_data, tmp_path, monkeypatch, capsys):
    name, overrides = tiny_data
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(overrides))
    configs = []

    def fake_run(model, dataset, config_file_list=None, config_dict=None, saved=True):
        configs.append(load_config(model, dataset, config_file_list, config_dict))
        return fake_result(0.1 + configs[-1]["dropout_prob"])

    monkeypatch.setattr(hyper, "run_recbole_llm", fake_run)
    monkeypatch.setattr("sys.argv", ["run_hyper_llm.py", "--unchanged"])
    output = tmp_path / "cli.result"
    argv = ["--model=LRURec", f"--dataset={name}", f"--config_files={config_file}",
            f"--params_file={space(tmp_path, 'dropout_prob choice [0.1,0.3,0.2]')}", "--algo=exhaustive",
            "--max_evals=5", f"--output_file={output}", "--epochs=1", "--weight_decay=0.05"]
    tuner = hyper.main(argv)

    assert sorted(c["dropout_prob"] for c in configs) == [0.1, 0.2, 0.3]
    for config in configs:
        assert config["epochs"] == 1 and config["weight_decay"] == 0.05  # --key=value: every trial
        assert not {"params_file", "algo", "max_evals", "output_file", "config_files"} & set(config.final_config_dict)
    assert tuner.best_params == {"dropout_prob": 0.3} and tuner.best_score == pytest.approx(0.4)
    assert "best params:  {'dropout_prob': 0.3}" in capsys.readouterr().out
    assert output.read_text().count("Valid result:") == 3
    assert sys.argv == ["run_hyper_llm.py", "--unchanged"]  # restored


def test_random_and_bayes_search_are_seeded_and_cast_whole_numbers(tiny_data, tmp_path):
    name, overrides = tiny_data
    params_file = space(tmp_path, "learning_rate loguniform -9,-4\nhidden_size quniform 16,64,16\n"
                                  "learner choice ['adam','adamw']\n")

    def objective(config_dict, config_file_list):
        return fake_result(config_dict["learning_rate"] * config_dict["hidden_size"], bigger=False)

    for algo in ("random", "bayes"):
        runs = [hyper.run_hyper("LRURec", name, str(params_file), config_dict=overrides, algo=algo, max_evals=4,
                                output_file=False, objective=objective) for _ in range(2)]
        assert runs[0].params_list == runs[1].params_list  # the config's seed seeds the search
        assert len(runs[0].params_list) == 4
        assert type(runs[0].best_params["hidden_size"]) is int
        assert runs[0].best_score == min(runs[0].score_list)  # smaller is better here


def test_missing_params_file_is_one_error_line(tiny_data, tmp_path):
    name, overrides = tiny_data
    with pytest.raises(MissingInputError, match="params_file 'nope.hyper' does not exist"):
        hyper.run_hyper("LRURec", name, "nope.hyper", config_dict=overrides)
    with pytest.raises(SystemExit) as stop:
        hyper.main(["--model=LRURec", f"--dataset={name}", f"--params_file={tmp_path / 'nope.hyper'}"])
    assert str(stop.value).startswith("error: params_file ") and "\n" not in str(stop.value)


@pytest.mark.parametrize("line, message", [
    ("learning_rat choice [0.1]", r"'learning_rat' is not a setting of LRURec.*Did you mean learning_rate"),
    ("hidden_size uniform 16,64", r"hidden_size=\S+ must be a whole number"),
    ("hidden_size choice ['big']", r"hidden_size='big' must be a whole number"),
    ("learning_rate", r"has no line RecBole reads"),
    ("learning_rate gauss 0,1", r"RecBole cannot read it \(ValueError: Illegal param type \[gauss\]\)"),
    ("learning_rate uniform 0.1", r"RecBole cannot read it \(ValueError"),
    ("learning_rate choice []", r"the choice of learning_rate is empty"),
    ("learning_rate loguniform -8,0", r"exhaustive search enumerates choice lines only"),
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
    assert path == hyper.find_params_file(f"properties/hyper/{model}.hyper", model)
    assert path == hyper.find_params_file(model, model)
    config = load_config(model, name, config_dict=overrides)
    space = hyper.validated_space(HyperTuning._build_space_from_file(path), config, "exhaustive", str(path))
    assert HyperTuning(lambda *args: None, space=space).max_evals == size


def test_key_space_value_on_the_command_line_is_refused(monkeypatch):
    """RecBole ignores ``--key value``: the search would run every trial without the setting."""
    argv = ["--model=LRURec", "--learning_rate", "0.01"]
    monkeypatch.setattr("sys.argv", ["run_hyper_llm.py", *argv])
    with pytest.raises(SystemExit) as stop:
        hyper.main(argv)
    assert str(stop.value) == ("error: --learning_rate 0.01: RecBole reads settings only as --key=value and would "
                               "ignore this one. Write --learning_rate=0.01.")
