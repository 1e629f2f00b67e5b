"""SeRALM on one dataset: Base / Base+NA_LLM / Base+SeRALM per base model, latency, alignment speed.

    # once (long on a CPU; resumable): the un-aligned LLM's knowledge cache for the dataset
    python -m recbole_llm.knowledge.generation --dataset ml-100k --num_threads 2
    # then
    python benchmarks/seralm.py [--dataset ml-100k] [--models SASRec,Caser,LightSANs] \\
        [--timing_iterations 10] [--latency_items 16] [--key=value ...]

For each base model, one run each (same split, full ranking, test metrics of the checkpoint best
on validation NDCG@10):

* Base: the RecBole model alone, with SeRALM's training settings (epochs, batch, history length);
* Base+NA_LLM: SeRALM with the un-aligned LLM's knowledge (``alignment_iterations=0``);
* Base+SeRALM: SeRALM with alignment (properties/model/SeRALM.yaml; the aligned adapter and its
  knowledge are cached in ``dataset/<name>/knowledge/`` and reused by later runs).

Also measured: inference latency per batch of ``eval_batch_size`` users (SeRALM with cached
knowledge vectors vs its base, full ranking, median of the test batches), generation + encoding
time per item (embedded LLM, greedy, as for the cache), and alignment seconds per iteration with
the asynchronous generator vs the synchronous one (``--timing_iterations`` each, SASRec).
Extra ``--key=value`` arguments are config overrides for every run.
Writes the "seralm" section of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import ast
import statistics
import time

import torch
from results_doc import markdown_table, write_section

from recbole_llm.quick_start import build

METRICS = ["hit@10", "ndcg@10"]
PAPER_SASREC = (21.02, 21.43, 21.66)  # MovieLens-1M HIT@10 (%): Base, Base+NA_LLM, Base+SeRALM (Table 1)


def _literal(value):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def train_and_test(model, dataset, config_dict):
    """Build, fit and test one model; returns (test result, trainer, model, test data, minutes)."""
    start = time.perf_counter()
    config, net, trainer, (train, valid, test) = build(model, dataset, config_dict=config_dict)
    trainer.fit(train, valid, saved=True, show_progress=False)
    result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    return dict(result), trainer, net, test, (time.perf_counter() - start) / 60


@torch.no_grad()
def latency(model, test_data, repeats=3):
    """Median seconds of one full-ranking batch (``full_sort_predict``) over the test batches."""
    model.eval()
    times = []
    for _ in range(repeats):
        for batch in test_data:
            interaction = (batch[0] if isinstance(batch, tuple) else batch).to(model.device)
            start = time.perf_counter()
            model.full_sort_predict(interaction)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def generation_time_per_item(config, dataset, n_items):
    """Seconds per item to generate (greedy, as for the cache) and encode one item's knowledge."""
    from recbole_llm.knowledge.encoding import TextEncoder
    from recbole_llm.knowledge.generation import dataset_items, knowledge_text, load_generator, parse_knowledge

    generator = load_generator(config)
    encoder = TextEncoder.load(config["text_encoder"] if "text_encoder" in config else None)
    items = [fields for _, _, fields in dataset_items(dataset)[:n_items]]
    start = time.perf_counter()
    answers = []
    for i in range(0, len(items), generator.batch_size):
        answers += generator.generate(items[i:i + generator.batch_size])
    generated = time.perf_counter()
    encoder.encode([knowledge_text(parse_knowledge(a)[0]) for a in answers])
    done = time.perf_counter()
    return (generated - start) / len(items), (done - generated) / len(items)


def alignment_speed(dataset, overrides, iterations):
    """Seconds per alignment iteration, async generator vs sync (SASRec, fresh LoRA each)."""
    per_iteration = {}
    for mode in ("async", "sync"):
        cfg = {**overrides, "base_model": "SASRec", "alignment_iterations": iterations, "generator_mode": mode,
               "align_log_interval": max(iterations, 1)}
        config, model, trainer, (train, _, _) = build("SeRALM", dataset, config_dict=cfg)
        trainer.align(train)
        per_iteration[mode] = trainer.alignment_stats["seconds_per_iteration"]
        print(mode, trainer.alignment_stats, flush=True)
    return per_iteration


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default="SASRec,Caser,LightSANs")
    parser.add_argument("--timing_iterations", type=int, default=10)
    parser.add_argument("--latency_items", type=int, default=16)
    args, rest = parser.parse_known_args()
    overrides = {"show_progress": False, **{k.lstrip("-"): _literal(v) for k, v in (a.split("=", 1) for a in rest)}}
    # The base models train with SeRALM's own settings, for a like-for-like comparison.
    shared = {"MAX_ITEM_LIST_LENGTH": 50, "epochs": 8, "train_batch_size": 256, "stopping_step": 2,
              "learning_rate": 0.001, **overrides}

    rows, checks, latency_rows, hits = [], [], [], {}
    last_config = last_dataset = None
    for base in args.models.split(","):
        runs = {}
        for label, model, extra in [
            ("Base", base, {}),
            ("Base+NA_LLM", "SeRALM", {"base_model": base, "alignment_iterations": 0}),
            ("Base+SeRALM", "SeRALM", {"base_model": base}),
        ]:
            result, trainer, net, test, minutes = train_and_test(model, args.dataset, {**shared, **extra})
            runs[label] = (result, trainer, net, test)
            rows.append([base, label] + [f"{100 * result[m]:.2f}" for m in METRICS] + [f"{minutes:.1f}"])
            print(base, label, result, f"{minutes:.1f} min", getattr(trainer, "alignment_stats", ""), flush=True)
        hits[base] = [runs[k][0]["hit@10"] for k in ("Base", "Base+NA_LLM", "Base+SeRALM")]
        base_latency = latency(runs["Base"][2], runs["Base"][3])
        seralm_latency = latency(runs["Base+SeRALM"][2], runs["Base+SeRALM"][3])
        latency_rows.append([base, f"{1000 * base_latency:.2f}", f"{1000 * seralm_latency:.2f}",
                             f"{seralm_latency / base_latency:.2f}"])
        last_config, last_dataset = runs["Base+SeRALM"][1].config, runs["Base+SeRALM"][3]._dataset

    gen_seconds, enc_seconds = generation_time_per_item(last_config, last_dataset, args.latency_items)
    speed = alignment_speed(args.dataset, shared, args.timing_iterations)

    for base, (plain, na, aligned) in hits.items():
        checks.append(f"- {base}: Base+SeRALM / Base HIT@10 = {aligned / plain:.3f}"
                      + (" (goal >= 1.03)" if base == "SASRec" else "")
                      + f"; Base+SeRALM >= Base+NA_LLM: {'yes' if aligned >= na else 'no'} "
                      f"({100 * aligned:.2f} vs {100 * na:.2f})")
    body = "\n".join([
        markdown_table(["base model", "variant", "HIT@10 (%)", "NDCG@10 (%)", "wall time (min)"], rows),
        "",
        "Paper (MovieLens-1M, SASRec, HIT@10 %): Base {} / NA_LLM {} / SeRALM {} (x1.030).".format(*PAPER_SASREC),
        "",
        *checks,
        "",
        "Inference latency per batch (full ranking, cached knowledge vectors; paper LightSANs vs SeRALM_rec: 1.20x):",
        "",
        markdown_table(["base model", "base (ms)", "SeRALM (ms)", "ratio"], latency_rows),
        "",
        f"Knowledge generation + encoding per item ({args.latency_items} items, greedy, embedded LLM): "
        f"{gen_seconds:.2f} s + {enc_seconds:.3f} s = {gen_seconds + enc_seconds:.2f} s (paper, A100: 2.57 s).",
        "",
        f"Alignment ({args.timing_iterations} iterations, SASRec): async {speed['async']:.2f} s/it, "
        f"sync {speed['sync']:.2f} s/it, async/sync = {speed['async'] / speed['sync']:.2f}.",
        "",
        f"Protocol: {args.dataset}, leave-one-out in time order, full ranking over all items; one run per cell; "
        "the LLM is the embedded SmolLM2-135M-Instruct (the paper: Llama-2-7b-chat), the encoder all-MiniLM-L6-v2.",
    ])
    write_section("seralm", f"SeRALM on {args.dataset}", body)
    print(body)


if __name__ == "__main__":
    main()
