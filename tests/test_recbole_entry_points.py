"""RecBole's own entry points (run_recbole, objective_function, Config, an unchanged script)
run our models by name once recbole_llm is imported; RecBole's own models are untouched."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import recbole_llm  # noqa: F401 - installs the plugin
from recbole.config import Config
from recbole.quick_start import objective_function, run_recbole
from recbole.utils import get_model, get_trainer

from recbole_llm.model.lrurec import LRURec
from recbole_llm.trainer.two_stage import LlamaRecTrainer

ROOT = Path(__file__).resolve().parent.parent


def test_recbole_lookups_find_our_models_and_trainers():
    assert get_model("LRURec") is LRURec
    assert issubclass(get_trainer(None, "LlamaRec"), LlamaRecTrainer)
    assert get_model("SASRec").__module__.startswith("recbole.model")


def test_recbole_config_layers_our_property_files_under_the_users(tiny_data):
    name, overrides = tiny_data
    config = Config(model="LRURec", dataset=name, config_dict={**overrides, "learning_rate": 0.005})
    assert config["r_min"] == 0.8 and config["learner"] == "adamw"  # properties/model/LRURec.yaml
    assert config["valid_metric"] == "NDCG@10"  # properties/overall.yaml
    assert config["learning_rate"] == 0.005  # the user's dict wins


def test_run_recbole_and_objective_function_run_our_model_by_name(tiny_data):
    name, overrides = tiny_data
    settings = {**overrides, "epochs": 1}
    result = run_recbole(model="LRURec", dataset=name, config_dict=settings, saved=False)
    assert set(result["test_result"]) >= {"ndcg@10", "hit@10"}
    tuned = objective_function(config_dict={**settings, "model": "LRURec", "dataset": name}, saved=False)
    assert tuned["model"] == "LRURec" and tuned["test_result"] == result["test_result"]


SCRIPT = """
    import argparse, json
    from recbole.quick_start import run_recbole
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_list", type=str)
    parser.add_argument("--dataset", type=str)
    parser.add_argument("--settings", type=str)
    args, _ = parser.parse_known_args()
    results = {}
    for model in args.model_list.split(","):
        result = run_recbole(model=model, dataset=args.dataset, config_dict=json.loads(args.settings), saved=False)
        results[model] = result["test_result"]["ndcg@10"]
    print("RESULTS " + json.dumps(results))
"""


def _run_script(tmp_path, argv_prefix, models, name, settings):
    script = tmp_path / "run_recbole_group.py"
    script.write_text(textwrap.dedent(SCRIPT))
    out = subprocess.run([*argv_prefix, str(script), f"--model_list={models}", f"--dataset={name}",
                          f"--settings={json.dumps(settings)}"], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.split("RESULTS ", 1)[1])


def test_an_unchanged_recbole_script_runs_our_models_and_recboles_alike(tiny_data, tmp_path):
    """``python -m recbole_llm.run script.py ...`` runs RecBole's group-script pattern with our model
    and RecBole's; SASRec's metrics equal those of the same script without the plugin."""
    name, overrides = tiny_data
    settings = {**overrides, "epochs": 1, "train_neg_sample_args": None, "loss_type": "CE"}
    with_plugin = _run_script(tmp_path, [sys.executable, "-m", "recbole_llm.run"], "SASRec,LRURec", name, settings)
    without = _run_script(tmp_path, [sys.executable], "SASRec", name, settings)
    assert set(with_plugin) == {"SASRec", "LRURec"}
    assert with_plugin["SASRec"] == without["SASRec"]
