"""E4SRec vs the SASRec it takes its item embeddings from, on one dataset, one run, same split.

    python benchmarks/e4srec_vs_sasrec.py [--dataset ml-100k] [--section e4srec] [--num_threads=1] [--key=value ...]

Extra --key=value arguments are E4SRec config overrides (properties/model/E4SRec.yaml);
stage 1 (SASRec) is trained by E4SRec itself (or reused from its cache) and then
evaluated on its own data settings (id_model_config). Measures full-ranking test
metrics, trainable vs total parameters, training time per epoch and scoring throughput
(users/s over the test set). Writes the "e4srec" section of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time

from recbole.data import create_dataset, data_preparation
from recbole.utils import init_logger, init_seed
from results_doc import markdown_table, parse_overrides, write_section

from recbole_llm import load_config, registry
from recbole_llm.llm.backbone import set_num_threads
from recbole_llm.model.pretrained import id_model_config, pretrained_id_model

METRICS = ["recall@5", "recall@10", "mrr@5", "mrr@10", "ndcg@5", "ndcg@10"]


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--section", default="e4srec", help="docs/RESULTS.md section to write (keeps other runs)")
    args, rest = parser.parse_known_args()
    overrides = parse_overrides(rest)
    set_num_threads(overrides.get("num_threads"))

    config = load_config("E4SRec", args.dataset, config_dict={"show_progress": False, **overrides})
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])

    start = time.perf_counter()
    model_class = registry.get_model("E4SRec")
    model = model_class(config, train._dataset).to(config["device"])  # trains stage 1 (SASRec) unless cached
    setup_minutes = (time.perf_counter() - start) / 60
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    trainer = registry.get_trainer(model_class)(config, model)
    epoch_times = timed_epochs(trainer)
    valid_scores = recorded_validation(trainer)
    start = time.perf_counter()
    trainer.fit(train, valid, saved=True, show_progress=False)
    fit_minutes = (time.perf_counter() - start) / 60
    e4srec_test, e4srec_eval_s = timed_evaluate(trainer, test, load_best_model=True)
    print("E4SRec", dict(e4srec_test), flush=True)

    # The SASRec E4SRec took its embeddings from (the cached stage-1 model), on its own data settings.
    sasrec = pretrained_id_model(config, dataset, "SASRec", checkpoint=config["id_model_checkpoint"],
                                 overrides=config["id_model_config"])
    sas_config = id_model_config(config, "SASRec", config["id_model_config"])
    _, _, sas_test = data_preparation(sas_config, create_dataset(sas_config))
    sas_trainer = registry.get_trainer(type(sasrec))(sas_config, sasrec)
    sasrec_test, sasrec_eval_s = timed_evaluate(sas_trainer, sas_test, load_best_model=False)
    print("SASRec", dict(sasrec_test), flush=True)
    sas_params = sum(p.numel() for p in sasrec.parameters())

    n_users = test.sample_size  # one row per test user in sequential full ranking
    per_epoch = sum(epoch_times) / len(epoch_times)
    rows = [
        ["E4SRec"] + [f"{e4srec_test[m]:.4f}" for m in METRICS]
        + [f"{trainable:,} / {total:,}", f"{per_epoch:.0f}", f"{n_users / e4srec_eval_s:.1f}"],
        ["SASRec (stage 1)"] + [f"{sasrec_test[m]:.4f}" for m in METRICS]
        + [f"{sas_params:,} / {sas_params:,}", "-", f"{n_users / sasrec_eval_s:.0f}"],
    ]
    ratio = e4srec_test["ndcg@10"] / sasrec_test["ndcg@10"]
    rows_per_epoch = config["train_rows_per_epoch"] or len(train.dataset)
    body = (
        markdown_table(["model"] + METRICS + ["trainable / total params", "train s/epoch", "scoring users/s"], rows)
        + f"\n\nE4SRec / SASRec NDCG@10: {ratio:.3f} (goal: >= 1)."
        + f"\n\nE4SRec: LLM {config['llm_path'] or 'embedded SmolLM2-135M-Instruct'}, history {config['MAX_ITEM_LIST_LENGTH']}, "
        f"LoRA r={config['lora_r']} alpha={config['lora_alpha']} on {', '.join(config['lora_target_modules'])}, "
        f"{len(epoch_times)} epochs of {rows_per_epoch} random training rows (of {len(train.dataset)}), "
        f"batch {config['train_batch_size']}, {config['learner']} lr {config['learning_rate']} ({config['lr_schedule'] or 'constant'}), score_head {config['score_head']}, llm_layers {config['llm_layers'] or 'all'}; "
        f"fit {fit_minutes:.1f} min (train + validation), model setup incl. stage 1 {setup_minutes:.1f} min; "
        f"epoch times (s): {', '.join(f'{t:.0f}' for t in epoch_times)}; "
        f"valid {config['valid_metric']} after each epoch: {', '.join(f'{v:.4f}' for v in valid_scores)}. "
        f"Scoring throughput = test users / wall time of RecBole's full-ranking test evaluation "
        f"({n_users} users, eval_batch_size {config['eval_batch_size']}, one forward pass per batch). "
        f"SASRec: stage-1 settings {config['id_model_config']}."
        + f"\n\nProtocol: {args.dataset}, leave-one-out in time order, full ranking over all items, test metrics "
        "of the checkpoint best on validation NDCG@10. The E4SRec paper evaluates against 99 sampled "
        "negatives with LLaMA2-13B, so its absolute numbers are not comparable with these."
    )
    head = "" if config["score_head"] == "linear" else f" (score_head: {config['score_head']})"
    write_section(args.section, f"E4SRec{head} vs its stage-1 SASRec on {args.dataset}", body)
    print(f"ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
