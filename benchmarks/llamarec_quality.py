"""LlamaRec on a dataset, one run, one split: the retriever alone vs the two-stage model
(the paper's ranker, and with fusion), overall and valid-retrieval-subset metrics, and
where the wall time goes. This run IS the quick start (same defaults, every test user).

    python benchmarks/llamarec_quality.py [--dataset ml-100k] [--key=value ...]

Writes the "llamarec" section of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import time

from results_doc import markdown_table, parse_overrides, write_section

from recbole_llm.quick_start import build
from recbole_llm.trainer.two_stage import ranking_metrics

METRICS = ["recall@5", "recall@10", "mrr@5", "mrr@10", "ndcg@5", "ndcg@10"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    args, rest = parser.parse_known_args()
    overrides = parse_overrides(rest)
    start = time.perf_counter()
    config, model, trainer, (train, valid, test) = build("LlamaRec", args.dataset, config_dict=overrides)
    built = time.perf_counter()
    trainer.fit(train, valid, saved=True, show_progress=config["show_progress"])
    fused = trainer.evaluate(test, load_best_model=True, show_progress=config["show_progress"])
    fused_subset, chosen = trainer.subset_result, model.fusion_weight
    end = time.perf_counter()

    model.fusion_weight = 0.0  # the paper's ranker (scores are cached: no second LLM pass)
    plain = trainer.evaluate(test, load_best_model=False)
    plain_subset = trainer.subset_result
    model.ranker_enabled = False
    retriever = trainer.evaluate(test, load_best_model=False)
    phase = trainer._phase(test)
    retriever_subset = ranking_metrics(phase.flat("retrieval"), phase.flat("candidates"), phase.flat("targets"), config["topk"])

    # The retriever with the candidates' history rule: for k <= the candidate count its metrics over all
    # users are its subset metrics times the subset's share (every other user scores 0), exactly.
    excluded = {m: retriever_subset[m] * retriever_subset["share"] for m in METRICS if m in retriever_subset}
    excluded.update({m.replace("hit", "recall"): retriever_subset[m] * retriever_subset["share"]
                     for m in retriever_subset if m.startswith("hit@")})
    rows = []
    for name, overall, subset in [
        (f"{config['retriever']} (retriever alone, history excluded as in the candidates)", excluded, retriever_subset),
        (f"{config['retriever']} (retriever alone)", retriever, retriever_subset),
        ("LlamaRec (paper: ranker only)", plain, plain_subset),
        (f"LlamaRec + fusion (w={chosen} picked on validation)", fused, fused_subset),
    ]:
        rows.append([name] + [f"{overall[m]:.4f}" for m in METRICS] + [f"{subset['ndcg@10']:.4f}", f"{subset['recall@5']:.4f}" if "recall@5" in subset else f"{subset['hit@5']:.4f}"])
    gain_plain = plain["ndcg@10"] / excluded["ndcg@10"]
    gain_fused = fused["ndcg@10"] / excluded["ndcg@10"]
    total = end - start
    timing = [["build (data, stage-1 retriever, LLM load)", f"{built - start:.0f}"]]
    timing += [[stage, f"{seconds:.0f}"] for stage, seconds in trainer.timings.items()]
    timing += [["total quick start (build + fit + test evaluation)", f"{total:.0f}"]]
    users_per_s = trainer.ranked_rows / trainer.timings["ranking"] if trainer.timings["ranking"] else float("nan")
    body = (
        f"Test users: {phase.rows}; {phase.rows and retriever_subset['users']} of them "
        f"({retriever_subset['share']:.1%}) have the target among the retriever's top-{model.k} "
        f"(the valid retrieval subset); exclude_history: {config['exclude_history']} (the candidates with and "
        "without it: benchmarks/llamarec_candidates.py).\n\n"
        + markdown_table(["model"] + METRICS + ["subset NDCG@10", "subset Hit@5"], rows)
        + f"\n\nLlamaRec / retriever (history excluded) NDCG@10: {gain_plain:.3f} (ranker only), {gain_fused:.3f} "
        f"(with fusion); against the retriever as RecBole evaluates it (history items may be recommended): "
        f"{plain['ndcg@10'] / retriever['ndcg@10']:.3f} and {fused['ndcg@10'] / retriever['ndcg@10']:.3f}. "
        "Paper (ML-100k latest-small, Llama-2-7B): 1.07.\n\n"
        f"LLM: {config['llm_path'] or 'embedded SmolLM2-135M-Instruct'}, {config['ranker_max_train_examples']} "
        f"training examples, LoRA r={config['lora_r']} on {config['lora_target_modules']}.\n\n"
        f"Best ranker adapter at step {trainer.cur_step}; fusion weight -> valid NDCG@10: "
        + ", ".join(f"{w:g}: {r['ndcg@10']:.4f}" for w, r in trainer.fusion_results.items())
        + ".\n\nWhere the wall time goes (seconds):\n\n"
        + markdown_table(["stage", "seconds"], timing)
        + f"\n\nRanker scoring throughput: {users_per_s:.2f} users/s (one forward pass per user, "
        f"batches of {config['ranker_eval_batch_size']})."
    )
    write_section("llamarec", f"LlamaRec on {args.dataset}", body)
    print(body)


if __name__ == "__main__":
    main()
