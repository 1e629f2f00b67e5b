"""Hyper-parameter search: RecBole's ``run_hyper.py`` for our models and RecBole's.

    python run_hyper_llm.py --model=LRURec --dataset=ml-100k --params_file=properties/hyper/LRURec.hyper
        [--config_files="a.yaml b.yaml"] [--algo=exhaustive|random|bayes] [--max_evals=N]
        [--early_stop=N] [--output_file=FILE] [--key=value ...]

The search space file has RecBole's ``.hyper`` format, one ``name type values`` line per
setting (``learning_rate choice [0.01,0.001]``, ``dropout_prob uniform 0.1,0.5``,
``hidden_size quniform 32,128,32``, ``learning_rate loguniform -8,0`` for e^-8..e^0).
Each trial is one :func:`recbole_llm.quick_start.run_recbole_llm` (our property files,
registry and trainers) with the trial's values in ``config_dict``; its objective returns
RecBole's dict (model, best_valid_score, valid_score_bigger, best_valid_result,
test_result), and the trial with the best ``valid_metric`` wins.

Differences from ``recbole.trainer.HyperTuning``: ``exhaustive`` walks the grid of the
``choice`` and ``quniform`` lines in file order, needs no hyperopt and does not stop
early unless ``--early_stop`` says so (``random`` and ``bayes`` use hyperopt's
``rand`` and ``tpe``, seeded with the config's ``seed``, and stop after 10 trials
without progress, as RecBole's); the results file is rewritten (atomically) after every
trial, beside a ``.json`` twin; a bad space file, an unknown setting or a value of the
wrong kind is an :class:`~recbole_llm.errors.InputError` before the first trial.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from logging import getLogger
from pathlib import Path
from typing import Callable

from recbole.utils.utils import dict2str

from recbole_llm import registry
from recbole_llm.errors import InputError, MissingInputError
from recbole_llm.quick_start import kind_problem, plain_json, load_config, properties_dir, run_recbole_llm, write_atomically

ALGOS = ("exhaustive", "random", "bayes")
TYPES = ("choice", "uniform", "quniform", "loguniform")
RESULT_KEYS = ("best_valid_score", "valid_score_bigger", "best_valid_result", "test_result")


@dataclass(frozen=True)
class Param:
    """One line of a search space file."""

    name: str
    kind: str  # one of TYPES
    values: tuple  # choice: the options; uniform/loguniform: (low, high); quniform: (low, high, q)
    where: str  # "file:line", for messages

    def grid(self) -> list:
        """The values an exhaustive search tries."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "quniform":  # hyperopt's quniform: round(uniform(low, high) / q) * q
            low, high, q = self.values
            return [self.clean(k * q) for k in range(round(low / q), round(high / q) + 1)]
        raise InputError(
            f"{self.where}: an exhaustive search enumerates choice and quniform lines, not {self.kind} "
            f"({self.name}); use --algo=random or --algo=bayes with --max_evals=N, or make it a choice."
        )

    def hyperopt(self):
        """The hyperopt expression (a choice picks an index: the values themselves stay ours)."""
        from hyperopt import hp

        if self.kind == "choice":
            return hp.choice(self.name, list(range(len(self.values))))
        return getattr(hp, self.kind)(self.name, *self.values)

    def from_hyperopt(self, sample):
        return self.values[int(sample)] if self.kind == "choice" else self.clean(sample)

    def clean(self, value):
        """A plain Python number; a whole-number quniform grid (low and q whole) gives ints."""
        value = value.item() if hasattr(value, "item") else value
        if self.kind == "quniform" and all(float(v).is_integer() for v in (self.values[0], self.values[2])):
            return int(round(value))
        return value

    def examples(self) -> list:
        """Values whose kind (number, whole number, bool, ...) stands for every value of the line."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "quniform":
            return [self.clean(self.values[2])]
        return [0.5]


def read_space(path) -> list[Param]:
    """The parameters of a ``.hyper`` file (RecBole's format; blank and ``#`` lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"params_file {str(path)!r} does not exist.")
    params: dict[str, Param] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        tokens = text.split()
        if len(tokens) < 3:
            raise InputError(f"{where}: {text!r} is not 'name type values' (e.g. learning_rate choice [0.01,0.001]).")
        name, kind, value = tokens[0], tokens[1], "".join(tokens[2:])  # joined as RecBole does
        if kind not in TYPES:
            raise InputError(f"{where}: unknown type {kind!r} for {name}; use one of {', '.join(TYPES)}.")
        if name in params:
            raise InputError(f"{where}: {name} is already searched at {params[name].where}.")
        params[name] = Param(name, kind, _parse_values(kind, value, where), where)
    if not params:
        raise InputError(f"params_file {str(path)!r} has no 'name type values' line.")
    return list(params.values())


def _parse_values(kind: str, value: str, where: str) -> tuple:
    if kind == "choice":
        try:
            options = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options = None
        if not isinstance(options, (list, tuple)) or not options:
            raise InputError(f"{where}: choice needs a non-empty list of Python literals, e.g. [0.1,0.2] or ['a','b']; "
                             f"got {value!r}.")
        return tuple(options)
    expected = 3 if kind == "quniform" else 2
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != expected:
        shape = "low,high,q" if kind == "quniform" else "low,high"
        raise InputError(f"{where}: {kind} needs {shape} (numbers); got {value!r}.")
    if not numbers[0] < numbers[1] or (kind == "quniform" and numbers[2] <= 0):
        raise InputError(f"{where}: {kind} needs low < high{' and q > 0' if kind == 'quniform' else ''}; got {value!r}.")
    return numbers


def find_params_file(params_file, model: str) -> Path:
    """``params_file`` as given, else relative to our install (``properties/hyper/X.hyper``
    works from a wheel too), else ``properties/hyper/<params_file>[.hyper]``; ``None`` is
    the model's own example space."""
    hyper_dir = properties_dir() / "hyper"
    if params_file is None:
        params_file = f"{model}.hyper"
        if not (hyper_dir / params_file).is_file():
            examples = sorted(p.name for p in hyper_dir.glob("*.hyper"))
            raise MissingInputError(f"no example search space for {model}: give --params_file=FILE "
                                    f"(examples in {hyper_dir}: {', '.join(examples) or 'none'}).")
    path = Path(params_file)
    candidates = [path]
    if not path.is_absolute():
        candidates += [properties_dir().parent / path, hyper_dir / path, hyper_dir / f"{path}.hyper"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingInputError(f"params_file {str(params_file)!r} does not exist (looked in {[str(c) for c in candidates]}).")


def check_space(params: list[Param], config) -> None:
    """Every searched setting must be known (set by a property file or the user's files) and
    not fixed on the command line (RecBole ranks ``--key=value`` above a trial's values), and
    its values must have the kind of its default."""
    known = config.final_config_dict
    for param in params:
        if param.name not in known:
            close = difflib.get_close_matches(param.name, list(known), n=3)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise InputError(
                f"{param.where}: {param.name!r} is not a setting of {config['model']}: no property file sets it.{hint} "
                f"(A setting the model reads without a default must first be set in a --config_files file.)"
            )
        if param.name in config.cmd_config_dict:
            raise InputError(f"--{param.name}=... on the command line would override {param.name} in every trial; "
                             f"drop it or the {param.name} line of the search space ({param.where}).")
        default = known[param.name]
        for value in [] if default is None else param.examples():
            problem = kind_problem(default, value)
            if problem:
                raise InputError(f"{param.where}: {param.name}={value!r} {problem} (its value is {default!r} "
                                 f"without the search).")


def objective_function(config_dict=None, config_file_list=None, saved=True, *, model, dataset) -> dict:
    """RecBole's ``objective_function`` for our runner: one ``run_recbole_llm``; returns
    ``{model, best_valid_score, valid_score_bigger, best_valid_result, test_result}``.

    ``saved=True`` (as RecBole's) makes the test result that of the best validation epoch."""
    result = run_recbole_llm(model, dataset, config_file_list, config_dict, saved=saved)
    return {"model": registry.get_model(model).__name__, **{key: result[key] for key in RESULT_KEYS}}


def params2str(params: dict) -> str:
    """RecBole's ``HyperTuning.params2str``: ``name:value, name:value``."""
    return ", ".join(f"{name}:{value}" for name, value in params.items())


def _finite(score) -> bool:
    return score is not None and math.isfinite(float(score))


class HyperSearch:
    """Runs the trials of one search and keeps their results (like RecBole's ``HyperTuning``).

    ``objective(config_dict, config_file_list) -> dict`` defaults to :func:`objective_function`.
    """

    def __init__(self, model, dataset, params: list[Param], config_file_list=None, config_dict=None,
                 algo="exhaustive", max_evals=None, early_stop=None, output_file=None, saved=True,
                 objective: Callable | None = None, seed=2020, valid_metric=None):
        if algo not in ALGOS:
            raise InputError(f"--algo={algo!r}: use one of {', '.join(ALGOS)}.")
        if max_evals is not None and max_evals < 1:
            raise InputError(f"--max_evals={max_evals}: need at least 1 trial.")
        self.model, self.dataset, self.params, self.algo = model, dataset, params, algo
        self.config_file_list, self.config_dict = config_file_list, dict(config_dict or {})
        self.grid = [dict(zip([p.name for p in params], values))
                     for values in itertools.product(*[p.grid() for p in params])] if algo == "exhaustive" else None
        default_evals = len(self.grid) if self.grid is not None else 100
        self.max_evals = default_evals if max_evals is None else min(max_evals, default_evals)
        self.early_stop = (0 if algo == "exhaustive" else 10) if early_stop is None else early_stop
        self.output_file = Path(output_file) if output_file else None
        self.saved, self.seed, self.valid_metric = saved, seed, valid_metric
        self.objective = objective or (lambda config_dict, config_file_list: objective_function(
            config_dict, config_file_list, saved=self.saved, model=self.model, dataset=self.dataset))
        self.trials: list[dict] = []
        self.best: int | None = None  # index into trials

    def run(self) -> dict:
        if self.grid is not None:
            for params in self.grid[: self.max_evals]:
                self.trial(params)
                if self.stalled():
                    break
        else:
            self._run_hyperopt()
        summary = self.summary()
        message = (f"best params: {params2str(summary['best_params'])} "
                   f"(valid {self.valid_metric or 'score'} {summary['best_valid_score']}, "
                   f"{len(self.trials)} trials)")
        print(message)
        getLogger().info(message)
        return summary

    def _run_hyperopt(self) -> None:
        try:
            import hyperopt
        except ImportError:
            raise InputError(f"--algo={self.algo} needs hyperopt: pip install hyperopt "
                             "(--algo=exhaustive does not).") from None
        import numpy as np

        def fn(sample):
            record = self.trial({p.name: p.from_hyperopt(sample[p.name]) for p in self.params})
            if not _finite(record["best_valid_score"]):
                return {"status": hyperopt.STATUS_FAIL}
            score = float(record["best_valid_score"])
            return {"loss": -score if record["valid_score_bigger"] else score, "status": hyperopt.STATUS_OK}

        hyperopt.fmin(
            fn, {p.name: p.hyperopt() for p in self.params},
            algo=hyperopt.rand.suggest if self.algo == "random" else hyperopt.tpe.suggest,
            max_evals=self.max_evals, rstate=np.random.default_rng(self.seed), show_progressbar=False,
            return_argmin=False, early_stop_fn=lambda trials, *args: (self.stalled(), args),
        )

    def trial(self, params: dict) -> dict:
        """Run one trial, record it, rewrite the results file; returns the trial's record."""
        number = len(self.trials) + 1
        print(f"trial {number}/{self.max_evals}: {params2str(params)}")
        result = self.objective({**self.config_dict, **params}, self.config_file_list)
        record = {"params": params, **{key: result[key] for key in RESULT_KEYS}}
        self.trials.append(record)
        if self.best is None or self._better(record, self.trials[self.best]):
            self.best = len(self.trials) - 1
        best = self.trials[self.best]
        print(f"trial {number}: valid {self.valid_metric or 'score'} {record['best_valid_score']}; "
              f"best so far: {best['best_valid_score']} ({params2str(best['params'])})")
        if self.output_file is not None:
            self.export(self.output_file)
        return record

    @staticmethod
    def _better(new: dict, old: dict) -> bool:
        if not _finite(new["best_valid_score"]):
            return False
        if not _finite(old["best_valid_score"]):
            return True
        new_score, old_score = float(new["best_valid_score"]), float(old["best_valid_score"])
        return new_score > old_score if new["valid_score_bigger"] else new_score < old_score

    def stalled(self) -> bool:
        """``early_stop`` trials in a row without a better valid score."""
        return bool(self.early_stop) and self.best is not None and len(self.trials) - 1 - self.best >= self.early_stop

    def summary(self) -> dict:
        best = self.trials[self.best] if self.best is not None else {}
        return {
            "model": registry.get_model(self.model).__name__,
            "dataset": self.dataset,
            "algo": self.algo,
            "valid_metric": self.valid_metric,
            "best_params": best.get("params", {}),
            **{key: best.get(key) for key in RESULT_KEYS},
            "trials": list(self.trials),
        }

    def export(self, output_file) -> None:
        """RecBole's ``export_result`` text (params, valid and test result per trial) and the
        best trial to ``output_file``; everything as JSON to ``output_file.json``. Atomic."""
        output_file = Path(output_file)
        blocks = [f"{params2str(t['params'])}\nValid result:\n{dict2str(t['best_valid_result'])}\n"
                  f"Test result:\n{dict2str(t['test_result'])}\n" for t in self.trials]
        summary = self.summary()
        blocks.append(f"Best params:\n{params2str(summary['best_params'])}\n"
                      f"Best valid score ({self.valid_metric or 'valid_metric'}): {summary['best_valid_score']}\n")
        write_atomically(output_file, "\n".join(blocks))
        summary = {**summary, "trials": [plain_json(t) for t in summary["trials"]]}
        for key in ("best_valid_result", "test_result"):
            summary[key] = plain_json(summary[key] or {})
        write_atomically(output_file.with_name(output_file.name + ".json"),
                         json.dumps(summary, indent=2, default=float))


def run_hyper(model, dataset, params_file=None, config_file_list=None, config_dict=None, algo="exhaustive",
              max_evals=None, early_stop=None, output_file=None, saved=True, objective=None) -> dict:
    """Search ``params_file`` (default: our example space for ``model``) and return the
    best trial and all trials: ``{model, dataset, algo, valid_metric, best_params,
    best_valid_score, valid_score_bigger, best_valid_result, test_result, trials}``.

    ``config_dict`` holds settings for every trial (a trial's own values win).
    ``output_file`` (default ``<checkpoint_dir>/hyper-<model>-<dataset>-<time>.result``,
    ``False`` for none) is rewritten after every trial, with a ``.json`` twin.
    """
    if not isinstance(model, str) or "," in model:
        raise InputError(f"model={model!r}: a search tunes one model; run one search per model.")
    path = find_params_file(params_file, model)
    params = read_space(path)
    config = load_config(model, dataset, config_file_list, config_dict)
    check_space(params, config)
    if output_file is None:
        output_file = Path(config["checkpoint_dir"]) / f"hyper-{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}.result"
    search = HyperSearch(model, dataset, params, config_file_list, config_dict, algo=algo, max_evals=max_evals,
                         early_stop=early_stop, output_file=output_file or None, saved=saved, objective=objective,
                         seed=config["seed"], valid_metric=config["valid_metric"])
    print(f"searching {len(params)} settings of {model} on {dataset} from {path} ({algo}, "
          f"up to {search.max_evals} trials); results: {output_file or 'not written'}")
    summary = search.run()
    if output_file:
        print(f"written: {output_file} and {output_file}.json")
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", "-m", type=str, default="LRURec", help="name of one model")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of the dataset")
    parser.add_argument("--config_files", type=str, default=None, help="fixed config files, separated by spaces")
    parser.add_argument("--params_file", type=str, default=None,
                        help="search space (.hyper); default: properties/hyper/<model>.hyper")
    parser.add_argument("--algo", type=str, default="exhaustive", choices=ALGOS, help="search algorithm")
    parser.add_argument("--max_evals", type=int, default=None,
                        help="most trials (default: the whole grid for exhaustive, 100 otherwise)")
    parser.add_argument("--early_stop", type=int, default=None,
                        help="stop after N trials without progress (default: 10 for random/bayes, off for exhaustive)")
    parser.add_argument("--output_file", type=str, default=None,
                        help="results file (default: <checkpoint_dir>/hyper-<model>-<dataset>-<time>.result)")
    return parser.parse_known_args(argv)  # the rest are RecBole --key=value overrides for every trial


@contextlib.contextmanager
def _command_line(overrides: list[str]):
    """``sys.argv`` as RecBole's ``Config`` should see it: the overrides, not our flags."""
    argv = sys.argv
    sys.argv = argv[:1] + overrides
    try:
        yield
    finally:
        sys.argv = argv


def main(argv=None):
    """Run the command line; a setting or file the user can fix ends the run with one
    ``error: ...`` line (exit status 1) instead of a traceback."""
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        config_files = args.config_files.strip().split(" ") if args.config_files else None
        with _command_line(overrides):
            return run_hyper(args.model, args.dataset, args.params_file, config_files, algo=args.algo,
                             max_evals=args.max_evals, early_stop=args.early_stop, output_file=args.output_file)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
