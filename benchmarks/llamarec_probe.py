"""Can LlamaRec's ranker learn to point at a candidate at all? A probe with a certain answer.

    python benchmarks/llamarec_probe.py [--steps 120] [--check_every 40] [--check_rows 64] [--seed 2020] \\
        [--dataset ml-100k] [--records DIR] [--results FILE] [--key=value ...]

The learning curve (benchmarks/llamarec_curve.py) finds the ranker's letter loss at ln k, a uniform guess,
after thousands of examples: it learns the answer format and nothing about which candidate is the target.
Either the recommendation signal is too weak for the LLM, or the ranker cannot bind a letter to a candidate
(too small an LLM or adapter, or a defect of prompt, labels or verbalizer). This probe tells them apart with
the ranker's own training and scoring code (prompt, LoRA, loss on the answer tokens, verbalizer) on a task
whose answer every prompt shows, a copy: each training row's list holds the row's last history item (shown
last in the prompt's history) and ``candidate_k - 1`` random items outside the history, shuffled; the
answer is that item's letter. ``--key=value`` are LlamaRec settings (``learning_rate``,
``lora_target_modules``, ``llm_path``, ...); the learning rate is constant (no warm-up, no decay).

Printed and recorded (``benchmarks/records/llamarec_probe/<dataset>/<key>.json``, keyed by the settings;
a later call with the same settings reuses it): the letter loss of training per ``--check_every`` steps
(ln k = uniform), and on ``--check_rows`` held-out validation rows, before training and at each check,
the ranker's top-1 accuracy (chance 1/k) and the mean reciprocal rank of the answer. Every call writes
the section "llamarec_probe" of docs/RESULTS.md from all records of the dataset.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from pathlib import Path

import torch
from llamarec_curve import where_cell
from results_doc import (RESULTS, ROOT, bare_argv, command, commit, load_record, machine, markdown_table, parse_overrides,
                         run_record_path, standard_error, write_record, write_section)

from recbole_llm.quick_start import build

RECORDS = ROOT / "benchmarks" / "records" / "llamarec_probe"
#: Settings that change where a run writes or how fast it goes, not its numbers: out of the key and the table.
NEUTRAL = ("checkpoint_dir", "num_threads", "show_progress", "state")


def copy_list(model, history: list[int], rng: random.Random) -> tuple[list[int], int]:
    """The copy task's candidates for one row: its last history item and ``k - 1`` random items outside
    the history (the ranker's own draw of training negatives), shuffled by ``rng``; and the index of that item."""
    candidates = [history[-1], *sorted(model._random_items(set(history) | {0}, model.k - 1))]
    rng.shuffle(candidates)
    return candidates, candidates.index(history[-1])


def held_out_rows(model, valid_data, count: int, seed: int) -> tuple[list[list[int]], torch.Tensor, list[int]]:
    """The first ``count`` validation rows: histories, copy-task candidates [count, k], answers."""
    histories = []
    for batch in valid_data:
        histories += model._histories(batch[0])
        if len(histories) >= count:
            break
    rng = random.Random(seed)
    lists = [copy_list(model, history, rng) for history in histories[:count]]
    return histories[:count], torch.tensor([c for c, _ in lists]), [i for _, i in lists]


def check(model, held_out) -> dict:
    """Top-1 accuracy and mean reciprocal rank of the answer on the held-out rows, in eval mode."""
    histories, candidates, answers = held_out
    model.eval()
    scores = model.ranker_scores(histories, candidates).float()
    model.train()
    answer_scores = scores[torch.arange(len(answers)), answers].unsqueeze(1)
    ranks = (scores > answer_scores).sum(1) + 1
    hits = (ranks == 1).double().tolist()
    return {"top1": statistics.mean(hits), "top1_se": standard_error(hits),
            "mrr": (1.0 / ranks.double()).mean().item()}


def probe(dataset: str, overrides: dict, steps: int, check_every: int, check_rows: int) -> dict:
    with bare_argv():
        config, model, trainer, (train, valid, _) = build(
            "LlamaRec", dataset, config_dict={"ranker_max_train_examples": 0, **overrides})
    rng = random.Random(config["seed"])
    model.training_lists = lambda interaction: [copy_list(model, h, rng) for h in model._histories(interaction)]
    held_out = held_out_rows(model, valid, check_rows, config["seed"])
    checks = [{"step": 0, "letter_loss": None, **check(model, held_out)}]
    print(f"step 0: held-out top-1 {checks[0]['top1']:.3f} (chance {1 / model.k:.3f})", flush=True)
    start, step, letters = time.perf_counter(), 0, []
    model.train()
    while step < steps:
        for batch in train:
            trainer.optimizer.zero_grad()
            _, letter = trainer._backward_in_micro_batches(batch.to(model.device))
            if trainer.clip_grad_norm:  # as the ranker's own loop (clip_grad_norm)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               **trainer.clip_grad_norm)
            trainer.optimizer.step()
            step, letters = step + 1, letters + [float(letter)]
            if step % check_every == 0 or step == steps:
                checks.append({"step": step, "letter_loss": statistics.mean(letters), **check(model, held_out)})
                letters = []
                c = checks[-1]
                print(f"step {step}: letter loss {c['letter_loss']:.3f} (uniform {math.log(model.k):.3f}), "
                      f"held-out top-1 {c['top1']:.3f} ± {c['top1_se']:.3f}, MRR {c['mrr']:.3f}", flush=True)
            if step == steps:
                break
    return {"settings": {key: config[key] for key in ("learning_rate", "lora_r", "lora_alpha", "lora_target_modules",
                                                      "llm_path", "llm_dtype", "train_batch_size", "candidate_k",
                                                      "ranker_history_len", "title_max_tokens", "seed")},
            "checks": checks, "k": model.k, "minutes": (time.perf_counter() - start) / 60}


def section_body(records: list[dict]) -> str:
    rows = []
    for r in sorted(records, key=lambda r: r["date"]):
        settings = ", ".join(f"{k}={v}" for k, v in sorted(r["overrides"].items())) or "defaults"
        trace = "; ".join(f"{c['step']}: {c['letter_loss']:.2f} / {c['top1']:.2f}" if c["letter_loss"] is not None
                          else f"0: - / {c['top1']:.2f}" for c in r["numbers"]["checks"])
        last = r["numbers"]["checks"][-1]
        k = r["numbers"]["k"]
        rows.append([settings, f"{k} ({1 / k:.2f}; {math.log(k):.2f})", r["steps"], trace,
                     f"{last['top1']:.3f} ± {last['top1_se']:.3f}", f"{last['mrr']:.3f}", f"{r['numbers']['minutes']:.0f}",
                     where_cell({"machine": r["machine"], "settings": r["numbers"]["settings"]}), r["commit"], r["date"]])
    return (
        "The ranker's own training and scoring on a copy task: the answer is the candidate that is the row's last "
        "history item, among k - 1 random items outside the history (k = candidate_k: chance top-1 1/k, uniform "
        "letter loss ln k). Batches of train_batch_size rows, constant learning rate. One run per "
        "setting: `python benchmarks/llamarec_probe.py [--key=value ...]`.\n\n"
        + markdown_table(["settings", "k (chance top-1; ln k)", "steps", "step: training letter loss / held-out top-1",
                          "held-out top-1 ± s.e.", "MRR", "minutes", "CPU; LLM compute", "commit", "date"], rows)
    )


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--check_every", type=int, default=40)
    parser.add_argument("--check_rows", type=int, default=64)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args, rest = parser.parse_known_args(argv)
    overrides = {"seed": args.seed, **parse_overrides(rest)}
    keyed = {key: value for key, value in overrides.items() if key not in NEUTRAL}
    path = run_record_path(args.records, args.dataset, {**keyed, "steps": args.steps, "check_every": args.check_every,
                                                        "check_rows": args.check_rows})
    if load_record(path) is None:
        numbers = probe(args.dataset, {"show_progress": False, **overrides}, args.steps, args.check_every,
                        args.check_rows)
        write_record(path, {"overrides": {k: v for k, v in keyed.items() if k != "seed"}, "seed": args.seed,
                            "steps": args.steps, "numbers": numbers, "command": command(), "commit": commit(),
                            "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    else:
        print(f"reused {path}")
    records = [load_record(p) for p in sorted((args.records / args.dataset).glob("*.json"))]
    write_section("llamarec_probe", f"Can LlamaRec's ranker bind a letter to a candidate? A copy probe on {args.dataset}",
                  section_body(records), results=args.results)


if __name__ == "__main__":
    main()
