"""Command line: the flags of RecBole's ``run_recbole.py``, for our models and RecBole's.

    python run_recbole_llm.py --model=LRURec --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]

``--model=LRURec,SASRec`` checks every name and every model's settings first, then runs
each model in turn, prints one comparison table and writes it to
``<checkpoint_dir>/comparison-<dataset>-<time>.{csv,json}``; when a later model fails, the
table of the models that finished is written before the error. Any other ``--key=value``
is a RecBole config override, exactly as with ``run_recbole.py`` (``--key value``, which
RecBole would ignore, is refused). ``--settings MODEL`` prints a model's settings with their
defaults and comments; ``--help`` lists the models and where the property files are.
``recommend --model_file=<checkpoint> ...`` writes the top-k items per user of a trained model
(:mod:`recbole_llm.recommend`).
"""
from __future__ import annotations

import argparse
import sys
import time

from recbole_llm import checks
from recbole_llm.errors import InputError
from recbole_llm.quick_start import comparison_table, load_config, preflight, run


def epilog() -> str:
    """What ``--help`` says after the flags: the models, how settings are given, where the defaults are."""
    import textwrap

    from recbole_llm import registry
    from recbole_llm.config import properties_dir
    from recbole_llm.settings import RECBOLE_PROPERTIES

    def wrapped(names):
        return textwrap.fill(", ".join(names), width=88, initial_indent="    ", subsequent_indent="    ")

    return "\n".join([
        "models (--model=NAME, or several: --model=LRURec,SASRec):",
        "  recbole-llm:", wrapped(registry.our_models()),
        "  RecBole sequential models (any other RecBole model name works too):",
        wrapped(registry.recbole_sequential_models()),
        "",
        "settings: any other --key=value is a RecBole or model setting, above the property files; e.g.",
        "    recbole-llm --model=SASRec --epochs=4 --train_batch_size=512     (RecBole settings)",
        "    recbole-llm --model=LlamaRec --candidate_k=10 --eval_slices=True   (a LlamaRec and a recbole-llm setting)",
        "  or put them in a YAML file: --config_files=my.yaml",
        f"  defaults: {properties_dir()}/overall.yaml, dataset/<dataset>.yaml, model/<Model>.yaml",
        f"  (over RecBole's own in {RECBOLE_PROPERTIES})",
        "  a model's settings with their defaults and comments: recbole-llm --settings LlamaRec",
        "",
        "recommendations: recbole-llm recommend --model_file=saved/<Model>-<time>.pth [--users=...] [--topk=10]",
        "  [--output=recommendations.csv|.json] [--include_history]   (recbole-llm recommend --help)",
    ])


def parse_args(argv=None):
    """Our flags, and the rest (RecBole's ``--key=value`` overrides)."""
    parser = argparse.ArgumentParser(description="Train and evaluate recbole-llm models and RecBole's models, with "
                                     "the flags of RecBole's run_recbole.py.", allow_abbrev=False, epilog=epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", metavar="MODEL", default=None,
                        help="print MODEL's settings on --dataset with their defaults and comments, and exit")
    parser.add_argument("--model", "-m", type=str, default="LlamaRec", help="name, or several separated by commas")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="name of the dataset")
    parser.add_argument("--config_files", type=str, default=None, help="config files, separated by spaces")
    parser.add_argument("--nproc", type=int, default=1, help="the number of processes on this machine")
    parser.add_argument("--ip", type=str, default="localhost", help="the ip of the master node")
    parser.add_argument("--port", type=str, default="5678", help="the port of the master node")
    parser.add_argument("--world_size", type=int, default=-1, help="total number of processes")
    parser.add_argument("--group_offset", type=int, default=0, help="the global rank offset of this node")
    return parser.parse_known_args(sys.argv[1:] if argv is None else argv)


def main(argv=None):
    """Run the command line; a setting, file or dataset the user can fix ends the run with
    one ``error: ...`` line (exit status 1) instead of a traceback."""
    try:
        return _main(argv)
    except InputError as error:
        raise SystemExit(f"error: {error}") from None


def _main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["recommend"]:
        from recbole_llm import recommend

        return recommend.main(argv[1:])
    args, overrides = parse_args(argv)
    if args.settings:
        from recbole_llm.settings import describe

        print(describe(args.settings, args.dataset))
        return None
    checks.check_command_line(overrides)
    config_files = args.config_files.strip().split() if args.config_files else None
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not models:
        raise InputError(f"--model={args.model!r} names no model; e.g. --model=LRURec or --model=LRURec,SASRec.")
    # every model's name and settings first (load_config checks both), before the first one trains
    configs = {model: load_config(model, args.dataset, config_files) for model in models}
    for config in configs.values():
        preflight(config)
    results = {}
    try:
        for model in models:
            results[model] = run(model, args.dataset, config_file_list=config_files, nproc=args.nproc,
                                 world_size=args.world_size, ip=args.ip, port=args.port,
                                 group_offset=args.group_offset)
    except BaseException:
        finished = {model: result for model, result in results.items() if result}
        if finished and len(models) > 1:
            write_table(finished, configs[models[0]]["checkpoint_dir"], args.dataset, note=" (the models that finished)")
        raise
    if len(models) > 1 and all(results.values()):
        write_table(results, configs[models[0]]["checkpoint_dir"], args.dataset)
    return results


def write_table(results, out_dir, dataset, note=""):
    """Print the comparison table and write it to ``out_dir/comparison-<dataset>-<time>.{csv,json}``."""
    stem = f"comparison-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(comparison_table(results, out_dir, stem))
    print(f"written{note}: {out_dir}/{stem}.csv and .json")


if __name__ == "__main__":
    main()
