"""Hyper-parameter search: RecBole's ``run_hyper.py`` for our models and RecBole's.

    python run_hyper_llm.py --model=LRURec --dataset=ml-100k --params_file=properties/hyper/LRURec.hyper
        [--config_files="a.yaml b.yaml"] [--algo=exhaustive|random|bayes] [--max_evals=N]
        [--early_stop=N] [--output_file=FILE] [--key=value ...]

The search is RecBole's ``HyperTuning`` (its ``.hyper`` parser, its ``exhaustive`` / ``random`` /
``bayes`` algorithms, ``best_params``, ``params2result``, ``export_result`` format), fixed for
today's hyperopt by :mod:`recbole_llm.compat` shims 10-11. Added here, because RecBole lacks it:

* the objective: one :func:`~recbole_llm.quick_start.run_recbole_llm` per trial (our property
  files, registry and trainers), returning RecBole's objective dict;
* checks before the first trial (:class:`~recbole_llm.errors.InputError`): a missing or unreadable
  space file, a setting no property file sets ("did you mean"), a value of the wrong kind for the
  setting's default, a searched setting also fixed by ``--key=value`` (it would win in every
  trial), and for ``exhaustive`` a line that is not a ``choice`` (RecBole sizes the grid by those);
* ``quniform`` values of a whole-number setting are ints (hyperopt's ``scope.int``);
* ``exhaustive`` runs the whole grid (no early stop unless ``--early_stop``; ``random`` and
  ``bayes`` stop after 10 trials without progress, as RecBole's run_hyper.py); the search is
  seeded by the config's ``seed`` (``HYPEROPT_FMIN_SEED``, unless set);
* the results file is rewritten after every trial, through a temp file and a rename;
* our flags are taken off ``sys.argv`` while the trials run (RecBole's ``Config`` reads it); the
  remaining ``--key=value`` are overrides for every trial.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from pathlib import Path
from unittest import mock

from recbole.trainer.hyper_tuning import HyperTuning

from recbole_llm import checks, registry
from recbole_llm.cache_io import atomic_target
from recbole_llm.compat import recbole_argv
from recbole_llm.errors import InputError, MissingInputError
from recbole_llm.config import kind_problem, load_config, properties_dir
from recbole_llm.quick_start import run_recbole_llm

ALGOS = ("exhaustive", "random", "bayes")
RESULT_KEYS = ("best_valid_score", "valid_score_bigger", "best_valid_result", "test_result")
SPACE_FORMAT = "one 'name type values' line per setting, e.g. learning_rate choice [0.01,0.001]"


def objective_function(config_dict=None, config_file_list=None, saved=True, *, model, dataset) -> dict:
    """RecBole's ``objective_function`` for our runner: ``{model, best_valid_score,
    valid_score_bigger, best_valid_result, test_result}`` of one ``run_recbole_llm``."""
    result = run_recbole_llm(model, dataset, config_file_list, config_dict, saved=saved)
    return {"model": registry.get_model(model).__name__, **{key: result[key] for key in RESULT_KEYS}}


class HyperTuningWithResultsFile(HyperTuning):
    """RecBole's ``HyperTuning`` whose ``export_result`` replaces the file atomically and runs
    after every trial when ``output_file`` is given."""

    def __init__(self, *args, output_file=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_file = output_file

    def trial(self, params):
        status = super().trial(params)
        if self.output_file:
            self.export_result(self.output_file)
        return status

    def export_result(self, output_file=None):
        with atomic_target(output_file) as tmp:
            super().export_result(tmp)


def find_params_file(params_file, model: str) -> Path:
    """``params_file`` as given, else relative to our install (``properties/hyper/X.hyper`` works
    from a wheel too), else ``properties/hyper/<params_file>[.hyper]``; ``None``: the model's example."""
    hyper_dir = properties_dir() / "hyper"
    path = Path(params_file or f"{model}.hyper")
    candidates = [path] if path.is_absolute() else [path, properties_dir().parent / path, hyper_dir / path,
                                                    hyper_dir / f"{path}.hyper"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    examples = ", ".join(sorted(p.name for p in hyper_dir.glob("*.hyper"))) or "none"
    raise MissingInputError(f"params_file {str(params_file or path)!r} does not exist (looked in "
                            f"{[str(c) for c in candidates]}; examples in {hyper_dir}: {examples}).")


def validated_space(space: dict, config, algo: str, where: str) -> dict:
    """The space, checked against ``config`` (see the module docstring), with ``quniform`` lines
    of whole-number settings cast to int."""
    import numpy as np
    from hyperopt.pyll import rec_eval, scope, stochastic

    if not space:
        raise InputError(f"{where} has no line RecBole reads ({SPACE_FORMAT}).")
    known, space = config.final_config_dict, dict(space)
    for name, expression in space.items():
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise InputError(f"{where}: {name!r} is not a setting of {config['model']}: no property file sets it."
                             f"{hint} (A setting the model reads without a default must first be set in a "
                             f"--config_files file.)")
        if name in config.cmd_config_dict:
            raise InputError(f"--{name}=... on the command line would override {name} in every trial; "
                             f"drop it or the {name} line of {where}.")
        is_choice = expression.name == "switch"  # hp.choice; other lines: 20 seeded samples
        values = ([rec_eval(option) for option in expression.pos_args[1:]] if is_choice else
                  [stochastic.sample(expression, rng=np.random.default_rng(n)) for n in range(20)])
        if not values:
            raise InputError(f"{where}: the choice of {name} is empty.")
        default = known[name]
        for value in [] if default is None else values:
            problem = kind_problem(default, value)
            if problem:
                raise InputError(f"{where}: {name}={value!r} {problem} (its value is {default!r} without the search).")
        if algo == "exhaustive" and not is_choice:
            raise InputError(f"{where}: RecBole's exhaustive search enumerates choice lines only ({name} is not "
                             f"one); use --algo=random or --algo=bayes with --max_evals=N, or make it a choice.")
        if not is_choice and isinstance(default, int) and not isinstance(default, bool):
            space[name] = scope.int(expression)
    return space


def run_hyper(model, dataset, params_file=None, config_file_list=None, config_dict=None, algo="exhaustive",
              max_evals=None, early_stop=None, output_file=None, saved=True, objective=None) -> HyperTuning:
    """Search ``params_file`` (default: our example for ``model``) with RecBole's ``HyperTuning``;
    return it (``best_params``, ``best_score``, ``params2result``, ...). ``config_dict``: settings of
    every trial. ``output_file``: default ``<checkpoint_dir>/hyper-<model>-<dataset>-<time>.result``,
    ``False`` for none. ``objective(config_dict, config_file_list) -> dict`` replaces ours."""
    if algo not in ALGOS:
        raise InputError(f"algo={algo!r}: use one of {', '.join(ALGOS)}.")
    path = find_params_file(params_file, model)
    config = load_config(model, dataset, config_file_list, config_dict)
    try:
        space = HyperTuning._build_space_from_file(path)
    except Exception as error:  # RecBole's parser: eval() of a choice, int/float of bounds
        raise InputError(f"{path}: RecBole cannot read it ({type(error).__name__}: {error}); {SPACE_FORMAT}.") from None
    space = validated_space(space, config, algo, str(path))
    if output_file is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output_file = Path(config["checkpoint_dir"]) / f"hyper-{model}-{dataset}-{stamp}.result"
    fixed = dict(config_dict or {})
    objective = objective or (lambda params, files: objective_function(params, files, saved, model=model,
                                                                         dataset=dataset))
    tuner = HyperTuningWithResultsFile(
        lambda params, files: objective({**fixed, **params}, files), space=space,
        fixed_config_file_list=config_file_list, algo=algo, max_evals=max_evals or 100,
        early_stop=early_stop or (sys.maxsize if algo == "exhaustive" else 10), output_file=output_file or None)
    if algo == "exhaustive" and max_evals:
        tuner.max_evals = min(int(tuner.max_evals), max_evals)
    print(f"searching {len(space)} settings of {model} on {dataset} from {path} ({algo}, up to "
          f"{tuner.max_evals} trials); results: {output_file or 'not written'}")
    seed = os.environ.get("HYPEROPT_FMIN_SEED") or str(config["seed"])
    with mock.patch.dict(os.environ, {"HYPEROPT_FMIN_SEED": seed}):
        tuner.run()
    print("best params: ", tuner.best_params)
    print("best result: ")
    print(tuner.params2result[tuner.params2str(tuner.best_params)])
    return tuner


def parse_args(argv=None):
    """Our flags (RecBole run_hyper.py's among them) and the other ``--key=value``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", "-m", type=str, default="LRURec", help="name of one model")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of the dataset")
    parser.add_argument("--config_files", type=str, default=None, help="fixed config files, separated by spaces")
    parser.add_argument("--params_file", type=str, default=None, help="search space; default: <model>.hyper")
    parser.add_argument("--algo", type=str, default="exhaustive", choices=ALGOS, help="search algorithm")
    parser.add_argument("--max_evals", type=int, default=None, help="most trials (default: grid size or 100)")
    parser.add_argument("--early_stop", type=int, default=None, help="stop after N trials without progress (10)")
    parser.add_argument("--output_file", type=str, default=None, help="results file (default: under checkpoint_dir)")
    return parser.parse_known_args(argv)


def main(argv=None):
    """Run the command line; a setting or file the user can fix ends the run with one
    ``error: ...`` line (exit status 1) instead of a traceback."""
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        checks.check_command_line(overrides)  # RecBole ignores --key value (with a space)
        config_files = args.config_files.strip().split(" ") if args.config_files else None
        with recbole_argv(overrides):
            return run_hyper(args.model, args.dataset, args.params_file, config_files, algo=args.algo,
                             max_evals=args.max_evals, early_stop=args.early_stop, output_file=args.output_file)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
