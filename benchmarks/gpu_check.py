"""One command for a GPU: every LLM model with its LLM in bf16 and in 4-bit, a few hundred steps each.

    python benchmarks/gpu_check.py                      # on a CUDA machine: ml-100k, the embedded LLM
    python benchmarks/gpu_check.py --random_weights     # the LLM's (and text encoder's) config, random weights
    python benchmarks/gpu_check.py --cpu --llm_path DIR --dataset tiny --data_path D --steps 2   # the CPU path (a test)

For each model (LlamaRec, E4SRec, Laser, SeRALM) and precision (``llm_dtype: bfloat16``; the same
with ``load_in_4bit``) it builds the model (stage 1 included, timed apart), runs ``--steps``
optimiser steps of the model's own loss on RecBole's training batches (SeRALM: ``--align_steps``
alignment iterations, the steps that train its LLM; rows are its training instances), evaluates on the test split with the model's
own trainer (RecBole's full ranking), and reports rows/s, evaluation users/s, peak GPU memory and
test NDCG@10. Writes ``--out`` (JSON) and, with ``--section``, that section of docs/RESULTS.md.

``--random_weights``: the LLM and text encoder get random weights of their own config (what a
machine without the embedded packages can still time: ``--kit`` writes those configs and
tokenizers, without weights, to a folder that travels). Quality numbers are then meaningless;
speed and memory are those of the real architecture.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def device_shims() -> None:
    """What a bare GPU machine (torch, transformers, peft, numpy 2; RecBole carried as a wheel) lacks:
    RecBole's quick_start imports ``ray.tune`` at import time, for its hyper-parameter search only,
    so a machine without ray (a 60+ MB wheel) gets an empty stand-in; RecBole's Config aliases
    ``np.float_``, ``np.complex_`` and ``np.unicode_``, which NumPy 2 removed, so they are put back
    as the types they named. Neither changes anything where the real ones exist."""
    import importlib.util
    import types

    import numpy as np

    if importlib.util.find_spec("ray") is None:
        ray = types.ModuleType("ray")
        ray.tune = types.ModuleType("ray.tune")
        sys.modules.update({"ray": ray, "ray.tune": ray.tune})
    for name, value in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, name):
            setattr(np, name, value)


MODELS = ["LlamaRec", "E4SRec", "Laser", "SeRALM"]
PRECISIONS = {"bf16": {"llm_dtype": "bfloat16", "load_in_4bit": False},
              "4bit": {"llm_dtype": "bfloat16", "load_in_4bit": True}}
#: GPU-sized settings (the property files are sized for a CPU); a step is one optimiser step.
GPU_SETTINGS = {
    "LlamaRec": {"train_batch_size": 16, "ranker_eval_batch_size": 64, "retriever_config": {"epochs": 10}},
    "E4SRec": {"train_batch_size": 64, "train_rows_per_epoch": None, "eval_batch_size": 256,
               "MAX_ITEM_LIST_LENGTH": 50},
    "Laser": {"train_batch_size": 64, "train_rows_per_epoch": None, "eval_batch_size": 256, "llm_layers": None},
    "SeRALM": {"align_batch_size": 8, "knowledge_batch_size": 64, "knowledge_max_new_tokens": 64,
               "generator_mode": "sync", "alignment_cache": False},
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# ------------------------------------------------------------------ random weights of a real config
def without_weights(source: str | os.PathLike, target: Path) -> Path:
    """Copy a model folder without its weight files (configs, tokenizer, sentence-transformers modules)."""
    shutil.copytree(source, target, dirs_exist_ok=True,
                    ignore=lambda _, names: [n for n in names if n in WEIGHT_FILES or n.endswith((".gguf", ".bin"))])
    return target


def with_random_weights(source: str | os.PathLike, target: Path, causal: bool, seed: int = 0) -> str:
    """``target``: the folder ``source`` (configs and tokenizer; weights optional) with randomly
    initialised weights of its own config, saved where ``from_pretrained`` finds them."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    without_weights(source, target)
    config = AutoConfig.from_pretrained(target)
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if causal else AutoModel).from_config(config)
    model.save_pretrained(target)
    return str(target)


def write_kit(folder: Path) -> None:
    """The embedded LLM's and text encoder's configs and tokenizers, without weights (a few MB)."""
    from recbole_llm.knowledge.encoding import resolve_encoder_path
    from recbole_llm.llm.backbone import resolve_llm_path

    without_weights(resolve_llm_path(None), folder / "llm")
    without_weights(resolve_encoder_path(None), folder / "text_encoder")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"{folder}: llm/ and text_encoder/ ({size / 2**20:.1f} MiB); on the GPU machine: "
          f"--llm_path {folder}/llm --text_encoder {folder}/text_encoder --random_weights")


# ------------------------------------------------------------------ one model, one precision
def cuda_sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model, train, steps: int, learning_rate: float, device) -> int:
    """``steps`` AdamW steps of the model's own loss on successive training batches; rows used."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    rows, done = 0, 0
    while done < steps:
        for interaction in train:
            interaction = interaction.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = model.calculate_loss(interaction)
            (sum(loss) if isinstance(loss, tuple) else loss).backward()  # a tuple of losses: RecBole sums them
            optimizer.step()
            rows, done = rows + len(interaction), done + 1
            if done == steps:
                break
    return rows


def check(model_name: str, precision: str, args, overrides: dict) -> dict:
    import torch
    from results_doc import Stopwatch, bare_argv

    from recbole_llm.quick_start import build

    settings = {"show_progress": False, "state": "WARNING", **(GPU_SETTINGS[model_name] if not args.cpu else {}),
                **PRECISIONS[precision], **overrides}
    if model_name == "SeRALM":
        settings.update(alignment_iterations=args.align_steps, warmup_epochs=0)
    setup = Stopwatch()

    def measured_setup(config, _train):
        if config["device"].type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(config["device"])
        return setup

    # the model's construction trains stage 1 (cached after the first precision)
    with bare_argv():  # each check's precision is its own, whatever the command line says
        config, model, trainer, (train, _, test) = build(model_name, args.dataset, config_dict=settings,
                                                         around_model=measured_setup)
    device, setup_s = config["device"], setup.seconds

    start = time.perf_counter()
    if model_name == "SeRALM":
        trainer.align(train)
        rows = args.align_steps * int(config["align_batch_size"])
    else:
        rows = train_steps(model, train, args.steps, float(config["learning_rate"]), device)
    cuda_sync(device)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    cuda_sync(device)
    eval_s = time.perf_counter() - start
    users = test.sample_size  # full-sort rows: one per test user
    llm_quantised = any(type(m).__name__ == "Linear4bit" for m in model.modules()) if model_name != "SeRALM" else None
    return {
        "model": model_name, "precision": precision, "steps": args.align_steps if model_name == "SeRALM" else args.steps,
        "train_rows": rows,
        "rows_per_s": rows / train_s, "train_s": train_s, "setup_s": setup_s,
        "eval_users": users, "eval_users_per_s": users / eval_s, "eval_s": eval_s,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "ndcg@10": float(result["ndcg@10"]), "linear4bit_layers": llm_quantised,
    }


def table(rows: list[dict]) -> str:
    from results_doc import markdown_table

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    return markdown_table(
        ["model", "LLM", "steps", "rows/s", "eval users/s", "peak GPU GiB", "test NDCG@10", "setup s"],
        [[r["model"], r["precision"], r["steps"], fmt(r["rows_per_s"], ".1f"), fmt(r["eval_users_per_s"], ".1f"),
          fmt(r["peak_gpu_gib"], ".2f"), fmt(r["ndcg@10"], ".4f"), fmt(r["setup_s"], ".0f")] for r in rows])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of LlamaRec, E4SRec and Laser")
    parser.add_argument("--align_steps", type=int, default=20, help="SeRALM's alignment iterations (each generates)")
    parser.add_argument("--llm_path", default=None, help="~ = the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--text_encoder", default=None, help="SeRALM's; ~ = the embedded all-MiniLM-L6-v2")
    parser.add_argument("--random_weights", action="store_true", help="random weights of the LLM's and encoder's config")
    parser.add_argument("--cpu", action="store_true", help="no CUDA needed (the test of this script; 4-bit falls back)")
    parser.add_argument("--out", default="saved/gpu_check.json")
    parser.add_argument("--section", default=None, help="write this section of docs/RESULTS.md (e.g. gpu_check)")
    parser.add_argument("--kit", default=None, help="only write the configs and tokenizers that travel to this folder")
    args, rest = parser.parse_known_args(argv)
    device_shims()
    from results_doc import parse_overrides, write_section

    if args.kit:
        write_kit(Path(args.kit))
        return []
    import torch

    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: this is the GPU check (--cpu runs its CPU path)")
    overrides = {"use_gpu": not args.cpu, **parse_overrides(rest)}
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        if args.random_weights:
            from recbole_llm.knowledge.encoding import resolve_encoder_path
            from recbole_llm.llm.backbone import resolve_llm_path

            args.llm_path = with_random_weights(resolve_llm_path(args.llm_path), workdir / "llm", causal=True)
            args.text_encoder = with_random_weights(resolve_encoder_path(args.text_encoder), workdir / "encoder",
                                                    causal=False)
        for key in ("llm_path", "text_encoder"):
            if getattr(args, key):
                overrides[key] = getattr(args, key)
        overrides.setdefault("checkpoint_dir", str(workdir / "saved"))
        overrides.setdefault("knowledge_dir", str(workdir / "knowledge"))
        overrides.setdefault("knowledge_vector_dir", str(workdir / "vectors"))
        rows = []
        for model_name in args.models.split(","):
            for precision in args.precisions.split(","):
                row = check(model_name, precision, args, overrides)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(table(rows))
    if args.section:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "CPU"
        write_section(args.section, f"GPU check ({device})",
                      f"{args.steps} steps per model and precision; LLM "
                      f"{'random weights of its config' if args.random_weights else args.llm_path or 'embedded'}.\n\n"
                      + table(rows))
    return rows


if __name__ == "__main__":
    main()
