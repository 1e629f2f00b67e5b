"""E4SRec vs the SASRec it takes its item embeddings from, on one dataset, same split; one run, or one per seed.

    python benchmarks/e4srec_vs_sasrec.py [--dataset ml-100k] [--section e4srec] [--seeds 2020,2021,2022]
                                          [--fresh] [--key=value ...]

Extra --key=value arguments are E4SRec config overrides (properties/model/E4SRec.yaml);
stage 1 (SASRec) is trained by E4SRec itself (or reused from its cache) and then
evaluated on its own data settings (id_model_config). Measures full-ranking test
metrics, trainable vs total parameters, training time per epoch, the validation NDCG@10
after each epoch and scoring throughput (users/s over the test set).

With ``--seeds``, one run per seed (a new seed for stage 1, E4SRec and the data loaders):
per-seed ratios, their mean and standard error. Each run is a record,
``benchmarks/records/e4srec/<dataset>/<key of its overrides>.json`` (settings, seed, LLM compute,
commit, machine, date, numbers), that a later call with the same overrides reuses (``--fresh``
trains anew), so the seeds of a campaign can run in different sessions.
Writes the "e4srec" section of docs/RESULTS.md (``--section``).
"""
from __future__ import annotations

import argparse
import statistics
import time

from recbole.data import create_dataset, data_preparation
from results_doc import (METRICS, ROOT, Stopwatch, bare_argv, command, commit, load_record, machine, markdown_table,
                         parse_overrides, run_record_path, standard_error, write_record, write_section)

from recbole_llm import registry
from recbole_llm.llm.backbone import set_num_threads
from recbole_llm.llm.pluggable import count_parameters
from recbole_llm.llm.precision import resolve_precision
from recbole_llm.model.pretrained import id_model_config, pretrained_id_model
from recbole_llm.quick_start import build

RECORDS = ROOT / "benchmarks" / "records" / "e4srec"


def timed_epochs(trainer):
    """Wrap ``trainer._train_epoch`` to record each epoch's wall time."""
    times, train_epoch = [], trainer._train_epoch

    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        result = train_epoch(*args, **kwargs)
        times.append(time.perf_counter() - start)
        return result

    trainer._train_epoch = wrapped
    return times


def recorded_validation(trainer):
    """Wrap ``trainer._valid_epoch`` to record each validation's score (NDCG@10 by default)."""
    scores, valid_epoch = [], trainer._valid_epoch

    def wrapped(*args, **kwargs):
        score, result = valid_epoch(*args, **kwargs)
        scores.append(score)
        return score, result

    trainer._valid_epoch = wrapped
    return scores


def timed_evaluate(trainer, data, **kwargs):
    start = time.perf_counter()
    result = trainer.evaluate(data, show_progress=False, **kwargs)
    return result, time.perf_counter() - start


def run_e4srec(dataset_name: str, overrides: dict) -> dict:
    """Train and test one E4SRec, then test the SASRec it took its embeddings from: the numbers of a record."""
    setup = Stopwatch()
    with bare_argv():  # building the model trains stage 1 (SASRec) unless cached
        config, model, trainer, (train, valid, test) = build(
            "E4SRec", dataset_name, config_dict={"show_progress": False, **overrides}, around_model=setup)
    setup_minutes = setup.seconds / 60
    trainable, total = count_parameters(model)

    epoch_times = timed_epochs(trainer)
    valid_scores = recorded_validation(trainer)
    start = time.perf_counter()
    trainer.fit(train, valid, saved=True, show_progress=False)
    fit_minutes = (time.perf_counter() - start) / 60
    e4srec_test, e4srec_eval_s = timed_evaluate(trainer, test, load_best_model=True)
    print("E4SRec", dict(e4srec_test), flush=True)

    # The SASRec E4SRec took its embeddings from (the cached stage-1 model), on its own data settings.
    sasrec = pretrained_id_model(config, train._dataset, "SASRec", checkpoint=config["id_model_checkpoint"],
                                 overrides=config["id_model_config"])
    sas_config = id_model_config(config, "SASRec", config["id_model_config"])
    _, _, sas_test = data_preparation(sas_config, create_dataset(sas_config))
    sas_trainer = registry.get_trainer(type(sasrec))(sas_config, sasrec)
    sasrec_test, sasrec_eval_s = timed_evaluate(sas_trainer, sas_test, load_best_model=False)
    print("SASRec", dict(sasrec_test), flush=True)

    n_users = test.sample_size  # one row per test user in sequential full ranking
    rows_per_epoch = config["train_rows_per_epoch"] or len(train.dataset)
    settings = (
        f"LLM {config['llm_path'] or 'embedded SmolLM2-135M-Instruct'} "
        f"({resolve_precision(config['llm_dtype'], config['device']).describe()}), history "
        f"{config['MAX_ITEM_LIST_LENGTH']}, LoRA r={config['lora_r']} alpha={config['lora_alpha']} on "
        f"{', '.join(config['lora_target_modules'])}, {len(epoch_times)} epochs of {rows_per_epoch} random training "
        f"rows (of {len(train.dataset)}), batch {config['train_batch_size']}, {config['learner']} lr "
        f"{config['learning_rate']} ({config['lr_schedule'] or 'constant'}), score_head {config['score_head']}, "
        f"llm_layers {config['llm_layers'] or 'all'}; SASRec: stage-1 settings {config['id_model_config']}"
    )
    return {"overrides": overrides, "seed": config["seed"], "e4srec": dict(e4srec_test), "sasrec": dict(sasrec_test),
            "valid": valid_scores, "valid_metric": config["valid_metric"], "epoch_s": epoch_times,
            "fit_minutes": fit_minutes, "setup_minutes": setup_minutes, "params": [trainable, total],
            "sasrec_params": count_parameters(sasrec)[1], "test_users": n_users,
            "e4srec_users_per_s": n_users / e4srec_eval_s, "sasrec_users_per_s": n_users / sasrec_eval_s,
            "eval_batch_size": config["eval_batch_size"], "score_head": config["score_head"], "settings": settings}


def recorded_run(dataset_name: str, overrides: dict, fresh: bool = False) -> dict:
    """:func:`run_e4srec`'s record for ``overrides``, reused when one exists (and not ``fresh``)."""
    path = run_record_path(RECORDS, dataset_name, overrides)
    record = None if fresh else load_record(path)
    if record is not None:
        print(f"reusing {path.relative_to(ROOT)} ({record['date']}, {record['command']})", flush=True)
        return record
    record = run_e4srec(dataset_name, overrides)
    record.update(command=command(), machine=machine(), commit=commit(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    write_record(path, record)
    return record


def report(records: list[dict], dataset_name: str) -> str:
    """Per-seed table, the mean ratio with its standard error, and the first run's details."""
    ratios = [r["e4srec"]["ndcg@10"] / max(r["sasrec"]["ndcg@10"], 1e-12) for r in records]
    seeds = markdown_table(
        ["seed", "SASRec Recall@10", "SASRec NDCG@10", "E4SRec Recall@10", "E4SRec NDCG@10", "E4SRec / SASRec",
         "valid NDCG@10 after each epoch", "train s/epoch", "date"],
        [[r["seed"], f"{r['sasrec']['recall@10']:.4f}", f"{r['sasrec']['ndcg@10']:.4f}",
          f"{r['e4srec']['recall@10']:.4f}", f"{r['e4srec']['ndcg@10']:.4f}", f"{ratio:.3f}",
          ", ".join(f"{v:.4f}" for v in r["valid"]), f"{statistics.mean(r['epoch_s']):.0f}", r["date"]]
         for r, ratio in zip(records, ratios)])
    n = len(ratios)
    summary = (f"E4SRec / SASRec NDCG@10, mean over {n} seed{'s' * (n > 1)}: {statistics.mean(ratios):.3f}"
               + (f" (standard error {standard_error(ratios):.3f})" if n > 1 else "") + " (goal: >= 1).")
    first = records[0]
    trainable, total = first["params"]
    details = markdown_table(
        ["model"] + METRICS + ["trainable / total params", "train s/epoch", "scoring users/s"],
        [["E4SRec"] + [f"{first['e4srec'][m]:.4f}" for m in METRICS]
         + [f"{trainable:,} / {total:,}", f"{statistics.mean(first['epoch_s']):.0f}", f"{first['e4srec_users_per_s']:.1f}"],
         ["SASRec (stage 1)"] + [f"{first['sasrec'][m]:.4f}" for m in METRICS]
         + [f"{first['sasrec_params']:,} / {first['sasrec_params']:,}", "-", f"{first['sasrec_users_per_s']:.0f}"]])
    return (
        f"{seeds}\n\n{summary}\n\nSeed {first['seed']} in full:\n\n{details}\n\n"
        f"E4SRec: {first['settings']}; fit {first['fit_minutes']:.1f} min (train + validation), model setup incl. "
        f"stage 1 {first['setup_minutes']:.1f} min. Each run's record (command, machine, commit): "
        f"benchmarks/records/e4srec/{dataset_name}/. Scoring throughput = test users / wall time of RecBole's "
        f"full-ranking test evaluation ({first['test_users']} users, eval_batch_size {first['eval_batch_size']}, one "
        f"forward pass per batch).\n\nProtocol: {dataset_name}, leave-one-out in time order, full ranking over all "
        "items, test metrics of the checkpoint best on validation NDCG@10. The E4SRec paper (arXiv:2312.02443) "
        "evaluates against 99 sampled negatives with LLaMA2-13B, so its absolute numbers are not comparable with these."
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--section", default="e4srec", help="docs/RESULTS.md section to write (keeps other runs)")
    parser.add_argument("--seeds", default="", help="one run per seed, e.g. 2020,2021,2022 (default: the config's)")
    parser.add_argument("--fresh", action="store_true", help="train every run anew instead of reusing its record")
    args, rest = parser.parse_known_args()
    overrides = parse_overrides(rest)
    set_num_threads(overrides.get("num_threads"))
    seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    runs = [{**overrides, "seed": seed} for seed in seeds] or [overrides]
    records = []
    for run in runs:
        records.append(recorded_run(args.dataset, run, args.fresh))
        head = "" if records[0]["score_head"] == "linear" else f" (score_head: {records[0]['score_head']})"
        write_section(args.section, f"E4SRec{head} vs its stage-1 SASRec on {args.dataset}",
                      report(records, args.dataset))  # after every seed: a stopped campaign keeps what it has
    print(report(records, args.dataset).split("\n\n")[1])


if __name__ == "__main__":
    main()
