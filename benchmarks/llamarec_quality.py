"""LlamaRec on a dataset, one run, one split: the retriever alone vs the two-stage model
(the paper's ranker, and with fusion), overall and valid-retrieval-subset metrics, and
where the wall time goes. This run IS the quick start (same defaults, every test user).

    python benchmarks/llamarec_quality.py [--dataset ml-100k] [--key=value ...]

Writes the "llamarec" section of docs/RESULTS.md. :func:`measure` (one run's numbers, JSON-ready)
serves benchmarks/llamarec_curve.py too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from results_doc import METRICS, bare_argv, markdown_table, parse_overrides, write_section

from recbole_llm.quick_start import build
from recbole_llm.trainer.two_stage import ndcg_gains, ranking_metrics, target_ranks

#: The settings a run's numbers depend on most, kept beside them.
RECORDED_SETTINGS = ("seed", "retriever", "candidate_k", "exclude_history", "llm_path", "llm_dtype",
                     "ranker_max_train_examples", "ranker_train_candidates", "ranker_train_target_position",
                     "ranker_valid_users", "ranker_eval_step", "ranker_stopping_step", "ranker_warmup_steps",
                     "train_batch_size", "learning_rate", "lora_r", "lora_target_modules", "fusion")


def retriever_excluded(trainer, test, topk) -> tuple[dict, dict]:
    """LlamaRec's retriever on ``test`` with the candidates' history rule (its test metrics over all users: for
    k <= the candidate count, its metrics on the users whose target is a candidate times their share, every
    other user scoring 0), and those subset metrics; from the trainer's cached test phase (no LLM pass)."""
    phase = trainer._phase(test)
    subset = ranking_metrics(phase.flat("retrieval"), phase.flat("candidates"), phase.flat("targets"), topk)
    excluded = {m: subset[m] * subset["share"] for m in METRICS if m in subset}
    excluded.update({m.replace("hit", "recall"): subset[m] * subset["share"] for m in subset if m.startswith("hit@")})
    return excluded, subset


def user_ndcg(trainer, test, k: int = 10) -> torch.Tensor:
    """Each test user's NDCG@k under the model's fusion weight, from the trainer's scored test phase: RecBole's
    per-user NDCG@k exactly for k <= the candidate count (a target outside the candidates ranks below them: 0)."""
    phase = trainer._phase(test)
    if k > trainer.model.k:
        raise ValueError(f"NDCG@{k} of a user whose target is not a candidate depends on the items below the "
                         f"{trainer.model.k} candidates: needs candidate_k >= {k}")
    fused = trainer.model.fuse(phase.flat("ranker"), phase.flat("retrieval"), trainer.model.fusion_weight)
    inside, rank = target_ranks(fused, phase.flat("candidates"), phase.flat("targets"))
    gains = torch.zeros(len(inside))
    gains[inside] = ndcg_gains(rank, k)
    return gains


def paired(int8: torch.Tensor, float32: torch.Tensor) -> dict:
    """Mean NDCG@10 both ways, the mean per-user difference int8 - float32 with its standard error (paired over the
    users), and float32's own standard error over the users (int8's yardstick: within one of it)."""
    n = len(float32)
    return {"float32": float(float32.mean()), "int8": float(int8.mean()),
            "difference": float((int8 - float32).mean()), "difference_se": float((int8 - float32).std() / n ** 0.5),
            "float32_se": float(float32.std() / n ** 0.5)}


def int8_rescore(trainer, test, fusion_weight: float, float32_users: dict[str, torch.Tensor], float32_ranking: tuple,
                 progress: bool) -> dict:
    """The same trained ranker ranking the test users again through its dynamic-int8 copy (``ranker_int8``,
    ``precision.int8_copy``) at the fusion weight validation chose, beside float32: NDCG@10 with fusion and ranker
    only (:func:`paired`), Recall@10 both ways, and the test ranking's users/s both ways (``float32_ranking``:
    the float32 test ranking's (rows, seconds))."""
    model = trainer.model
    before = model.int8, model.ranker_enabled, model.fusion_weight
    model.int8, model.ranker_enabled = True, True
    trainer._forget_ranker_scores()
    rows, seconds = trainer.ranked_rows, trainer.timings["ranking"]
    parts = {}
    for part, weight in (("fusion", fusion_weight), ("ranker", 0.0)):
        model.fusion_weight = weight
        result = trainer.evaluate(test, load_best_model=False, show_progress=progress)
        parts[part] = {**paired(user_ndcg(trainer, test), float32_users[part]), "recall@10_int8": result["recall@10"]}
        if part == "fusion":  # the ranker scored once; the second weight reuses its scores
            rows, seconds = trainer.ranked_rows - rows, trainer.timings["ranking"] - seconds
    model.int8, model.ranker_enabled, model.fusion_weight = before
    trainer._forget_ranker_scores()
    return {**parts, "users_per_s": {"float32": float32_ranking[0] / float32_ranking[1], "int8": rows / seconds}}


def measure(dataset: str, overrides: dict, show_progress: bool | None = None, int8: bool = False) -> dict:
    """One quick-start run of LlamaRec (build, fit, test), as JSON-ready numbers.

    ``test`` and ``subset`` (the users whose target is among the candidates) hold the metrics of
    ``fusion`` (the chosen fusion weight), ``ranker`` (the paper: weight 0), ``retriever`` (as RecBole
    evaluates it: history items may be recommended) and, in ``test``, ``retriever_excluded``: the
    retriever with the candidates' history rule, whose metrics over all users are, for k <= the
    candidate count, its subset metrics times the subset's share (every other user scores 0), exactly.
    ``ratio`` is the fair LlamaRec / retriever NDCG@10, history excluded for both. ``int8``: the test users ranked
    again with the int8 copy of the same trained ranker, beside float32 (:func:`int8_rescore`; an LLM in float32
    on a CPU, as ``ranker_int8`` needs).
    """
    start = time.perf_counter()
    with bare_argv():  # the caller's own flags are no RecBole settings
        config, model, trainer, (train, valid, test) = build("LlamaRec", dataset, config_dict=overrides)
    built = time.perf_counter()
    progress = config["show_progress"] if show_progress is None else show_progress
    trainer.fit(train, valid, saved=True, show_progress=progress)
    rows, seconds = trainer.ranked_rows, trainer.timings["ranking"]
    fused = trainer.evaluate(test, load_best_model=True, show_progress=progress)
    test_ranking = (trainer.ranked_rows - rows, trainer.timings["ranking"] - seconds)
    fused_subset, chosen = trainer.subset_result, model.fusion_weight
    end = time.perf_counter()
    users = {"fusion": user_ndcg(trainer, test)} if int8 else {}  # the float32 side of the int8 rescore

    model.fusion_weight = 0.0  # the paper's ranker (scores are cached: no second LLM pass)
    plain = trainer.evaluate(test, load_best_model=False)
    plain_subset = trainer.subset_result
    if int8:
        users["ranker"] = user_ndcg(trainer, test)
    model.ranker_enabled = False
    retriever = trainer.evaluate(test, load_best_model=False)
    phase = trainer._phase(test)
    excluded, retriever_subset = retriever_excluded(trainer, test, config["topk"])
    prompt_tokens = sorted(len(model._prompt_ids(history, candidates))  # the test prompts as the ranker read them
                           for batch_histories, batch_candidates in zip(phase.histories, phase.candidates)
                           for history, candidates in zip(batch_histories, batch_candidates.tolist()))
    return {
        "settings": {key: config[key] for key in RECORDED_SETTINGS},
        "test": {"fusion": dict(fused), "ranker": dict(plain), "retriever": dict(retriever),
                 "retriever_excluded": excluded},
        "subset": {"fusion": fused_subset, "ranker": plain_subset, "retriever": retriever_subset},
        "ratio": {"ranker": plain["ndcg@10"] / excluded["ndcg@10"], "fusion": fused["ndcg@10"] / excluded["ndcg@10"]},
        "fusion_weight": chosen,
        "fusion_curve": {f"{w:g}": r["ndcg@10"] for w, r in trainer.fusion_results.items()},
        "best_step": trainer.cur_step,
        "validation": trainer.validation_trace,
        "test_users": phase.rows,
        "prompt_tokens": {"mean": statistics.mean(prompt_tokens),
                          "p95": prompt_tokens[int(0.95 * (len(prompt_tokens) - 1))], "max": prompt_tokens[-1]},
        "ranked_rows": trainer.ranked_rows,
        "resumed_at_step": trainer.ranker_resumed_at,  # the seconds then cover the resumed part of the training only
        "seconds": {"build (data, stage-1 retriever, LLM load)": built - start, **trainer.timings,
                    "total quick start (build + fit + test evaluation)": end - start},
        **({"int8": int8_rescore(trainer, test, chosen, users, test_ranking, progress)} if int8 else {}),
    }


def section_body(run: dict) -> str:
    """The "llamarec" section's text for one :func:`measure` run."""
    settings, test, subset = run["settings"], run["test"], run["subset"]
    k = settings["candidate_k"]
    retriever = settings["retriever"]
    rows = []
    for name, overall, part in [
        (f"{retriever} (retriever alone, history excluded as in the candidates)", test["retriever_excluded"],
         subset["retriever"]),
        (f"{retriever} (retriever alone)", test["retriever"], subset["retriever"]),
        ("LlamaRec (paper: ranker only)", test["ranker"], subset["ranker"]),
        (f"LlamaRec + fusion (w={run['fusion_weight']} picked on validation)", test["fusion"], subset["fusion"]),
    ]:
        rows.append([name] + [f"{overall[m]:.4f}" for m in METRICS]
                    + [f"{part['ndcg@10']:.4f}", f"{part['recall@5']:.4f}" if "recall@5" in part else f"{part['hit@5']:.4f}"])
    seconds = run["seconds"]
    timing = [[stage, f"{value:.0f}"] for stage, value in seconds.items()]
    users_per_s = run["ranked_rows"] / seconds["ranking"] if seconds.get("ranking") else float("nan")
    share = subset["retriever"]["share"]
    return (
        f"Test users: {run['test_users']}; {subset['retriever']['users']} of them ({share:.1%}) have the target "
        f"among the retriever's top-{k} (the valid retrieval subset); exclude_history: {settings['exclude_history']} "
        "(the candidates with and without it: benchmarks/llamarec_candidates.py).\n\n"
        + markdown_table(["model"] + METRICS + ["subset NDCG@10", "subset Hit@5"], rows)
        + f"\n\nLlamaRec / retriever (history excluded) NDCG@10: {run['ratio']['ranker']:.3f} (ranker only), "
        f"{run['ratio']['fusion']:.3f} (with fusion); against the retriever as RecBole evaluates it (history items "
        f"may be recommended): {test['ranker']['ndcg@10'] / test['retriever']['ndcg@10']:.3f} and "
        f"{test['fusion']['ndcg@10'] / test['retriever']['ndcg@10']:.3f}. "
        "Paper (ML-100k latest-small, Llama-2-7B): 1.07.\n\n"
        f"LLM: {settings['llm_path'] or 'embedded SmolLM2-135M-Instruct'}, {settings['ranker_max_train_examples']} "
        f"training examples ({settings['ranker_train_candidates']} training lists), LoRA r={settings['lora_r']} on "
        f"{settings['lora_target_modules']}"
        + (f"; test prompts: {run['prompt_tokens']['mean']:.0f} tokens on average, p95 {run['prompt_tokens']['p95']}, "
           f"longest {run['prompt_tokens']['max']}" if "prompt_tokens" in run else "") + ".\n\n"
        f"Best ranker adapter at step {run['best_step']}; fusion weight -> valid NDCG@10: "
        + ", ".join(f"{w}: {ndcg:.4f}" for w, ndcg in run["fusion_curve"].items())
        + ".\n\nWhere the wall time goes (seconds):\n\n"
        + markdown_table(["stage", "seconds"], timing)
        + f"\n\nRanker scoring throughput: {users_per_s:.2f} users/s (one forward pass per user)."
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    args, rest = parser.parse_known_args()
    overrides = parse_overrides(rest)
    run = measure(args.dataset, overrides)
    body = section_body(run)
    write_section("llamarec", f"LlamaRec on {args.dataset}", body)
    print(body)


if __name__ == "__main__":
    main()
