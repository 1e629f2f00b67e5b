"""LlamaRec's candidates with and without the history rule, on a dataset's validation and test
users: how many users have their target among the retriever's top-k, and how many candidate
slots history items would take. Needs only stage 1 (the retriever; trained once, then cached).

    python benchmarks/llamarec_candidates.py [--dataset ml-100k] [--key=value ...]

Writes the "llamarec_candidates" section of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse

import torch
from results_doc import markdown_table, parse_overrides, write_section

from recbole_llm.quick_start import build
from recbole_llm.trainer.two_stage import ranking_metrics


def candidate_counts(model, trainer, loader) -> list:
    """One table row per rule: users, target among the candidates, users and slots with history items."""
    phase = trainer._phase(loader)
    targets, histories = phase.flat("targets"), [h for batch in phase.histories for h in batch]
    rows = []
    model.exclude_history = False
    allowed = [torch.cat(part) for part in trainer._retrieve(list(loader), show_progress=False)]
    model.exclude_history = True
    excluded = [phase.flat("candidates"), phase.flat("retrieval")]  # the trainer's own (cached) candidates
    for exclude, (candidates, retrieval) in ((False, allowed), (True, excluded)):
        hits = ranking_metrics(retrieval, candidates, targets, [10])
        held = [len(set(h) & set(c)) for h, c in zip(histories, candidates.tolist())]
        rows.append([f"history {'excluded' if exclude else 'allowed'}", phase.rows, f"{hits['users']} ({hits['share']:.1%})",
                     sum(n > 0 for n in held), f"{sum(held)} of {candidates.numel()}"])
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    args, rest = parser.parse_known_args()
    config, model, trainer, (_, valid, test) = build("LlamaRec", args.dataset, config_dict=parse_overrides(rest))
    rows = []
    for split, loader in (("valid", valid), ("test", test)):
        rows += [[split] + row for row in candidate_counts(model, trainer, loader)]
    body = (
        f"The retriever ({config['retriever']}) proposes the top-{model.k} candidates that the LLM ranks. Before the "
        "history rule applied at evaluation (RecBole gives sequential models no history index), history items took "
        "candidate slots at validation and test, while training candidates never held any.\n\n"
        + markdown_table(["split", "candidates", "users", "target among the candidates", "users with history "
                          "candidates", "history slots"], rows)
    )
    write_section("llamarec_candidates", f"LlamaRec candidates with and without the user's history on {args.dataset}", body)
    print(body)


if __name__ == "__main__":
    main()
