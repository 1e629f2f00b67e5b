"""How fast each LLM path runs in float32, in bf16 and (scoring only) in int8, side by side on this CPU.

    python benchmarks/llm_speed.py [--models LlamaRec,E4SRec,Laser,SeRALM] [--precisions float32,bf16,int8]
                                   [--num_threads 2] [--train_steps 3] [--eval_batches 2] [--fresh]
                                   [--isa avx2]

On ml-100k with the embedded SmolLM2-135M-Instruct and each model's default settings (stage 1 is a
randomly initialised ID model: its weights do not change the LLM's cost), for each model and precision:

* training rows/s: ``calculate_loss`` + backward + optimiser step on RecBole's training batches
  (``--train_steps`` timed steps after a warm-up step; ``benchmarks/scaling.py``'s ``measure``);
* scoring users/s: ``full_sort_predict`` on test batches of ``--eval_batch_size`` users;
* SeRALM: knowledge generation items/s (``--generate_items`` items, greedy, the default length).

Precisions: ``float32`` (``llm_dtype: float32``); ``bf16`` (``llm_dtype: auto`` as on a CPU with bf16
units: bfloat16 autocast over float32 master weights with the frozen layers stored in bf16; for
generation, ``llm_dtype: bfloat16`` (``auto`` generates in float32 on every CPU); forced on a CPU
without bf16 units, where it is emulated); ``bf16-cast`` (on
request: the same autocast with every frozen weight kept float32 and cast at each call, as before
``Precision.store_frozen``);
``int8`` (scoring paths only: LlamaRec's ranking, its ``ranker_int8`` setting, and SeRALM's generation;
``precision.int8_copy``: LoRA merged, the decoder's Linear layers in dynamic int8 per output channel, the LM
head float32). Next to them, the machine's own
matrix-multiply peak (2048 x 2048 matmul) in each dtype and the LLM's forward and forward+backward
(LoRA on q/v) over 4 prompts x 700 tokens, as FLOP/s = 2 x (Linear weights) x tokens (forward; x2 for
forward+backward: the frozen weights need no weight gradient; attention's own products left out).

Each cell is a record (``benchmarks/records/llm_speed/<machine>/<cell>.json``, committed: settings,
CPU, commit, date, numbers), reused by a later run with the same settings on the same CPU (``--fresh``
measures again); the RESULTS section ``llm_speed`` is written from the records of this CPU.

``--isa avx2`` holds torch's kernels to AVX2 on a CPU that has more (``results_doc.ISA_LIMITS``: ATen, oneDNN, MKL,
FBGEMM): an AVX2-only CPU's kernels on this CPU's cores (an emulation, not that CPU's clocks or caches), its records in
their own folder and its own section, ``llm_speed_avx2``. bf16 there runs torch's generic kernel (the matmul peak
shows how slow): leave it out of ``--precisions``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_doc import (ROOT, bare_argv, commit, cpu_label, cpu_report, hold_kernels_to, load_record,  # noqa: E402
                         machine_key, markdown_table, write_record, write_section)
from scaling import PeakRSS, measure  # noqa: E402

MODELS = ["LlamaRec", "E4SRec", "Laser", "SeRALM"]
PRECISIONS = ["float32", "bf16", "int8"]
#: What int8 quantises (``precision.int8_copy``); part of an int8 cell's key.
INT8_SCHEME = "decoder Linear layers, per output channel; LM head float32"
#: The paths that only score or generate: where int8 applies.
INT8_MODELS = {"LlamaRec", "SeRALM"}
#: Per model, what the benchmark changes from the defaults: LlamaRec's batches are its training
#: micro-batches (what one backward pass holds); E4SRec and Laser send every row of a 16-row batch
#: through the LLM (their defaults draw large batches and keep a random share of them).
SETTINGS = {"LlamaRec": {"train_batch_size": 2}, "SeRALM": {},
            "E4SRec": {"train_batch_size": 16, "train_rows_per_epoch": None},
            "Laser": {"train_batch_size": 16, "train_rows_per_epoch": None}}


# ------------------------------------------------------------------ the machine
@contextlib.contextmanager
def precision_setting(precision: str):
    """The ``llm_dtype`` of ``precision``; for ``bf16`` the CPU is taken to report bf16 units."""
    from recbole_llm.llm import precision as llm_precision

    report, store_frozen = llm_precision.cpu_bf16_units, llm_precision.Precision.store_frozen
    if precision.startswith("bf16"):
        llm_precision.cpu_bf16_units = lambda: report() or "none (forced: emulated)"
    if precision == "bf16-cast":
        llm_precision.Precision.store_frozen = lambda self, decoder: None
    try:
        yield {"llm_dtype": "auto" if precision.startswith("bf16") else "float32"}
    finally:
        llm_precision.cpu_bf16_units, llm_precision.Precision.store_frozen = report, store_frozen


# ------------------------------------------------------------------ peaks and the bare LLM
def matmul_peak(dtype_name: str, size: int = 2048, repeats: int = 10, budget_s: float = 5.0) -> float:
    """FLOP/s of a ``size`` x ``size`` matmul in ``dtype_name`` (the best of ``repeats``, fewer once they have
    taken ``budget_s``: a dtype without fast kernels takes seconds per product)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return 2 * size**3 / best


def bare_llm(precision: str, prompts: int = 4, tokens: int = 700, repeats: int = 2) -> dict:
    """The embedded LLM with LoRA on q/v: forward (last position's logits) and forward + backward
    seconds over ``prompts`` x ``tokens`` random tokens, and the FLOP/s they reach."""
    import torch

    from recbole_llm.llm.backbone import load_llm
    from recbole_llm.llm.precision import int8_copy

    with precision_setting(precision) as setting:
        config = {"llm_path": None, "load_in_4bit": False, "gradient_checkpointing": False, "num_threads": None,
                  "device": "cpu", **setting}
        model, _ = load_llm(config, lora={"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n and "lora_" not in n)
    ids = torch.randint(100, 20000, (prompts, tokens), generator=torch.Generator().manual_seed(0))
    if precision == "int8":
        model = int8_copy(model)
    forward = backward = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            forward = min(forward, time.perf_counter() - start)
        if precision != "int8":
            start = time.perf_counter()
            model(input_ids=ids, logits_to_keep=3).logits.float().sum().backward()
            backward = min(backward, time.perf_counter() - start)
    flop = 2 * linear * prompts * tokens
    return {"forward_s": forward, "forward_tokens_per_s": prompts * tokens / forward, "forward_flops": flop / forward,
            "train_s": backward if precision != "int8" else None,
            "train_flops": 2 * flop / backward if precision != "int8" else None}


# ------------------------------------------------------------------ the models
def model_cell(model_name: str, precision: str, args, workdir: Path) -> dict:
    """Training rows/s and scoring users/s of ``model_name`` (SeRALM: generation items/s); int8 is
    LlamaRec's ``ranker_int8`` (float32 training, int8 ranking), so only its scoring counts."""
    base = {"checkpoint_dir": str(workdir / "saved"), "show_progress": False, "state": "WARNING", "use_gpu": False,
            "num_threads": args.num_threads, "eval_batch_size": args.eval_batch_size, **SETTINGS[model_name]}
    with precision_setting("float32" if precision == "int8" else precision) as setting:
        if model_name == "SeRALM":  # auto generates in float32 on every CPU: bf16 is asked for by name
            setting = {"llm_dtype": "bfloat16"} if precision.startswith("bf16") else setting
            return generation_cell({**base, **setting}, precision, args)
        if model_name == "LlamaRec":  # the one user of int8: set per cell, whatever the property file says
            setting = {**setting, "ranker_int8": precision == "int8"}
        # the int8 copy is made once per evaluation (seconds): before the timed batches
        make_copy = (lambda model: model.scoring_llm()) if precision == "int8" else None
        row = measure(model_name, "ml-100k", {**base, **setting}, args, workdir, before_scoring=make_copy)
    return {"train_rows_per_s": 1000 / row["train_s_per_1000_rows"],
            "score_users_per_s": row["eval_users_per_s"], "train_peak_mib": row["train_peak_bytes"] / 2**20,
            "eval_peak_mib": row["eval_peak_bytes"] / 2**20, "train_rows_timed": row["train_rows_timed"],
            "eval_users_timed": row["eval_users_timed"]}


def generation_cell(settings: dict, precision: str, args) -> dict:
    """SeRALM's knowledge generation: items/s over the first ``--generate_items`` items of ml-100k."""
    from recbole.data import create_dataset

    from recbole_llm import load_config
    from recbole_llm.knowledge.generation import dataset_items, load_generator
    from recbole_llm.llm.precision import int8_copy

    with bare_argv():
        config = load_config("SeRALM", "ml-100k", config_dict=settings)
    items = dataset_items(create_dataset(config), dict(config["knowledge_fields"]))[:args.generate_items]
    generator = load_generator(config)
    if precision == "int8":
        generator.model = int8_copy(generator.model)
    generator.generate([fields for _, _, fields in items[:2]], max_new_tokens=4)  # warm-up
    batch = generator.batch_size
    with PeakRSS() as memory:
        start = time.perf_counter()
        for first in range(0, len(items), batch):
            generator.generate([fields for _, _, fields in items[first:first + batch]])
        seconds = time.perf_counter() - start
    return {"generate_items_per_s": len(items) / seconds, "generate_items_timed": len(items),
            "generate_peak_mib": memory.increase / 2**20}


# ------------------------------------------------------------------ records and the report
def cell(kind: str, name: str, precision: str, args, report: dict, records: Path, workdir: Path) -> dict | None:
    scheme = {"int8": INT8_SCHEME} if precision == "int8" else {}  # records of an earlier scheme do not match
    settings = {"kind": kind, "name": name, "precision": precision, **scheme, "threads": args.num_threads,
                "train_steps": args.train_steps, "eval_batches": args.eval_batches,
                "eval_batch_size": args.eval_batch_size, "generate_items": args.generate_items}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = records / f"{kind}-{name}-{precision}-{key}.json"
    record = None if args.fresh else load_record(path)
    if record is not None:
        print(f"reusing {path.relative_to(ROOT)}", flush=True)
        return record
    print(f"measuring {kind} {name} {precision} ...", flush=True)
    start = time.perf_counter()
    if kind == "peak":
        numbers = {"flops": matmul_peak(precision)}
    elif kind == "llm":
        numbers = bare_llm(precision)
    else:
        numbers = model_cell(name, precision, args, workdir)
    record = {"settings": settings, "machine": report, "commit": commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.perf_counter() - start,
              "numbers": numbers}
    write_record(path, record)
    print(json.dumps(numbers), flush=True)
    return record


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def flop_rate(flops: float | None) -> str:
    """FLOP/s in TFLOP/s, or GFLOP/s below 0.01 TFLOP/s (bf16 without its units)."""
    if not flops:
        return "-"
    return f"{flops / 1e12:.2f} TFLOP/s" if flops >= 1e10 else f"{flops / 1e9:.2f} GFLOP/s"


def report_text(cells: dict, report: dict, args) -> str:
    def number(kind, name, precision, field):
        record = cells.get((kind, name, precision))
        return record["numbers"].get(field) if record else None

    peaks = {p: number("peak", "matmul", p, "flops") for p in ("float32", "bfloat16")}
    rows = []
    for name in args.models:
        paths = [("training rows/s", "train_rows_per_s"), ("scoring users/s", "score_users_per_s")]
        if name == "SeRALM":
            paths = [("generation items/s", "generate_items_per_s")]
        for label, field in paths:
            values = {p: number("model", name, p, field) for p in args.precisions
                      if not (p == "int8" and field == "train_rows_per_s")}  # int8 trains in float32
            f32 = values.get("float32")
            rows.append([name, label] + [f"{values[p]:.3g}" if values.get(p) else "-" for p in args.precisions]
                        + [_ratio(values.get(p), f32) for p in args.precisions if p != "float32"])
    header = ["model", "path"] + args.precisions + [f"{p} / float32" for p in args.precisions if p != "float32"]
    llm_rows = []
    for precision in args.precisions:
        peak = peaks["float32" if precision in ("float32", "int8") else "bfloat16"]
        forward = number("llm", "smollm2", precision, "forward_flops")
        train = number("llm", "smollm2", precision, "train_flops")
        tokens = number("llm", "smollm2", precision, "forward_tokens_per_s")
        llm_rows.append([precision, f"{tokens:,.0f}" if tokens else "-",
                         f"{forward / 1e12:.3f} ({100 * forward / peak:.0f}%)" if forward and peak else "-",
                         f"{train / 1e12:.3f} ({100 * train / peak:.0f}%)" if train and peak else "-"])
    flags = ", ".join(report["flags"]) or "none of avx2/avx512/bf16/amx"
    threads = f"{args.num_threads} thread{'s' * (args.num_threads > 1)}"
    return (
        f"CPU: {cpu_label(report)}; flags: {flags}; bf16 units as torch reports them: {report['bf16_units'] or 'none'} "
        f"(torch {report['torch']}, capability {report['torch_capability']}); {threads}.\n\n"
        f"ml-100k, the embedded SmolLM2-135M-Instruct, each model's default settings, {args.eval_batch_size} users per "
        f"scoring batch; stage 1 randomly initialised. Precision columns: `float32` (`llm_dtype: float32`), `bf16` "
        f"(`llm_dtype: auto` with bf16 units: bfloat16 autocast over float32 master weights, frozen layers stored in "
        f"bf16, and `llm_dtype: bfloat16` for SeRALM's generation (auto generates in float32 on every CPU, so the "
        f"cached knowledge does not depend on the CPU); forced where the CPU has none), "
        f"`bf16-cast` (where measured: the same autocast with the frozen weights float32, cast at every call), "
        f"`int8` (scoring and generation only: LoRA merged, dynamic int8 {INT8_SCHEME}).\n\n"
        f"{markdown_table(header, rows)}\n\n"
        f"Matrix-multiply peak (2048 x 2048, {threads}): float32 {flop_rate(peaks['float32'])}, bfloat16 "
        f"{flop_rate(peaks['bfloat16'])}.\n"
        f"The bare LLM (LoRA on q/v, 4 prompts x 700 tokens): tokens/s forward, and TFLOP/s (share of the "
        f"peak in that dtype; int8 against float32's):\n\n"
        f"{markdown_table(['precision', 'forward tokens/s', 'forward TFLOP/s', 'forward + backward TFLOP/s'], llm_rows)}\n\n"
        f"Memory is not compared here (freed memory is reused unseen within one process): the quick start's peak is "
        f"in \"quickstart\", the cost curves' in \"scaling\".\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--num_threads", type=int, default=2)
    parser.add_argument("--train_steps", type=int, default=3)
    parser.add_argument("--eval_batches", type=int, default=2)
    parser.add_argument("--eval_batch_size", type=int, default=8)
    parser.add_argument("--generate_items", type=int, default=16)
    parser.add_argument("--fresh", action="store_true", help="measure again instead of reusing records")
    parser.add_argument("--isa", choices=["avx2"], default=None,
                        help="hold torch's kernels to this instruction set (emulates a CPU that has only it)")
    parser.add_argument("--section", default=None,
                        help="the RESULTS section to write ('' for none; default: llm_speed, or llm_speed_<isa>)")
    args = parser.parse_args(argv)
    hold_kernels_to(args.isa)
    if args.section is None:
        args.section = "llm_speed" + (f"_{args.isa}" if args.isa else "")
    args.models, args.precisions = args.models.split(","), args.precisions.split(",")
    import torch

    torch.set_num_threads(args.num_threads)
    report = cpu_report()
    records = ROOT / "benchmarks" / "records" / "llm_speed" / machine_key(report, args.num_threads)
    records.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="llm_speed-"))
    cells = {}
    try:
        for dtype in ("float32", "bfloat16"):
            cells[("peak", "matmul", dtype)] = cell("peak", "matmul", dtype, args, report, records, workdir)
        for precision in args.precisions:
            cells[("llm", "smollm2", precision)] = cell("llm", "smollm2", precision, args, report, records, workdir)
        for name in args.models:
            for precision in args.precisions:
                if precision == "int8" and name not in INT8_MODELS:
                    continue
                cells[("model", name, precision)] = cell("model", name, precision, args, report, records, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = report_text(cells, report, args)
    if args.section:
        held = f", kernels held to {args.isa.upper()}" if args.isa else ""
        write_section(args.section, f"LLM speed by precision (float32, bf16, int8){held}", text)
    print(text)


if __name__ == "__main__":
    main()
