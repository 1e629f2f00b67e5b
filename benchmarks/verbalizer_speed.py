"""Verbalizer vs generation (LlamaRec, Fig. 3): rank the same 20 candidates for the same
users with the same LLM two ways, and time both.

* verbalizer: ONE forward pass over the ranking prompt, the 20 letter logits at the
  last position (what LlamaRec does);
* generation: the same history and candidates, asking for the candidates' titles in
  ranked order, generated greedily (KV cache on) for as many tokens as the full ranked
  list of titles takes.

    python benchmarks/verbalizer_speed.py [--dataset ml-100k] [--users 10] [--num_threads N]

Last line: ``speedup: <generation time / verbalizer time>``. Writes the
"verbalizer_speed" section of docs/RESULTS.md.
"""
from __future__ import annotations

import argparse
import random
import time

import torch
from recbole.data import create_dataset, data_preparation
from results_doc import markdown_table, write_section

from recbole_llm import load_config
from recbole_llm.data.item_text import item_texts
from recbole_llm.llm.backbone import load_causal_lm, set_num_threads
from recbole_llm.llm.prompts import RankingPrompt, truncate_texts
from recbole_llm.llm.verbalizer import LetterVerbalizer

GENERATION_INSTRUCTION = (
    "Given user history in chronological order, rank all items of the candidate pool from most to least "
    "likely to be watched next. Answer with their titles, one per line."
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--num_threads", type=int, default=None)
    args = parser.parse_args()
    set_num_threads(args.num_threads)
    config = load_config("LlamaRec", args.dataset, config_dict={"show_progress": False})
    _, _, test = data_preparation(config, create_dataset(config))
    model, tokenizer = load_causal_lm(config["llm_path"])
    model.eval()
    k = config["candidate_k"]
    verbalizer = LetterVerbalizer(tokenizer, k)
    titles = truncate_texts(item_texts(test._dataset, config["item_text_fields"]), tokenizer, config["title_max_tokens"])
    ranking = RankingPrompt(history_len=config["ranker_history_len"])
    generating = RankingPrompt(instruction=GENERATION_INSTRUCTION, history_len=config["ranker_history_len"])

    interaction = next(iter(test))[0]
    rng = random.Random(0)
    cases = []
    for row in range(args.users):
        history = interaction["item_id_list"][row, : interaction["item_length"][row]].tolist()
        pool = [i for i in range(1, len(titles)) if i not in set(history)]
        candidates = rng.sample(pool, k)
        cases.append(([titles[i] for i in history], [titles[i] for i in candidates]))

    def verbalize(history, candidates):
        ids = tokenizer(ranking.build(history, candidates, verbalizer.letters), return_tensors="pt")
        return verbalizer.scores(model(**ids, logits_to_keep=1).logits[:, -1])

    def generate(history, candidates):
        ids = tokenizer(generating.build(history, candidates, verbalizer.letters), return_tensors="pt")
        answer = "\n".join(candidates) + tokenizer.eos_token  # what a full ranked list of titles takes
        n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out.shape[1] - ids["input_ids"].shape[1]

    with torch.no_grad():
        verbalize(*cases[0]), generate(*cases[0])  # warm-up
        verbalizer_time = generation_time = 0.0
        tokens = 0
        for case in cases:  # alternate the two methods, so a change in machine load hits both alike
            start = time.perf_counter()
            verbalize(*case)
            middle = time.perf_counter()
            tokens += generate(*case)
            verbalizer_time += middle - start
            generation_time += time.perf_counter() - middle
        verbalizer_time /= len(cases)
        generation_time /= len(cases)
    speedup = generation_time / verbalizer_time
    body = markdown_table(
        ["method", "seconds per user", "note"],
        [
            ["verbalizer (one forward pass, 20 letter logits)", f"{verbalizer_time:.3f}", "LlamaRec"],
            ["generation of the ranked titles (greedy, KV cache)", f"{generation_time:.3f}", f"{tokens / len(cases):.0f} new tokens per user"],
        ],
    ) + (
        f"\n\nSpeedup: **{speedup:.1f}x** ({args.users} test users of {args.dataset}, {k} candidates each, "
        f"batch size 1, LLM {config['llm_path'] or 'embedded SmolLM2-135M-Instruct'}, {torch.get_num_threads()} threads). "
        "The paper reports the verbalizer's gain growing with the list length (Fig. 3)."
    )
    write_section("verbalizer_speed", f"Verbalizer vs generation speed on {args.dataset}", body)
    print(body)
    print(f"speedup: {speedup:.1f}")


if __name__ == "__main__":
    main()
