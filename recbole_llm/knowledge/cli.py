"""``python -m recbole_llm.knowledge.generation``: generate (or complete) a dataset's knowledge cache."""
from __future__ import annotations

import argparse
import logging

from recbole_llm import checks
from recbole_llm.compat import recbole_argv
from recbole_llm.config import load_config
from recbole_llm.knowledge.generation import dataset_knowledge


def main(argv=None):
    """``python -m recbole_llm.knowledge.generation --dataset ml-100k [...]``."""
    parser = argparse.ArgumentParser(description="Generate (or complete) the SeRALM knowledge cache of a dataset.")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--llm_path", default=None, help="HF name or local dir; default: the embedded SmolLM2")
    parser.add_argument("--llm_adapter", default=None, help="a PEFT adapter dir (e.g. an aligned LoRA)")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None, help="knowledge_batch_size")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="knowledge_max_new_tokens")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--config_files", default=None, help="space-separated YAML files")
    args, rest = parser.parse_known_args(argv)
    checks.check_command_line(rest)  # --key=value settings, read by RecBole's Config as on our main command line
    overrides = {}
    for key, name in (("llm_path", "llm_path"), ("llm_adapter", "llm_adapter"), ("num_threads", "num_threads"),
                      ("batch_size", "knowledge_batch_size"), ("max_new_tokens", "knowledge_max_new_tokens")):
        if getattr(args, key) is not None:
            overrides[name] = getattr(args, key)
    if not 0 <= args.rank < args.world_size:
        parser.error("--rank must be in [0, world_size)")
    from recbole.data import create_dataset
    from recbole.utils import init_logger

    with recbole_argv(rest):
        config = load_config("SeRALM", args.dataset, args.config_files.split() if args.config_files else None,
                             {"use_gpu": False, **overrides})
    init_logger(config)
    logger = logging.getLogger()
    dataset = create_dataset(config)
    rows, cache = dataset_knowledge(config, dataset, rank=args.rank, world_size=args.world_size, logger=logger)
    done = sum(bool(r) for r in rows[1:])
    logger.info(f"{done} of {len(rows) - 1} items have knowledge in {cache.final if cache.final.is_file() else cache.directory}")
    print(cache.final if cache.final.is_file() else cache.part(args.rank, args.world_size))

