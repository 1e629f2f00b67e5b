"""Laser vs its frozen SASRec (and E4SRec when it exists) on one dataset, same split; one run, or one per seed.

    python benchmarks/laser.py [--dataset ml-100k] [--threads 1] [--ablation_rows 500] [--seeds 2021,2022]
                               [--variants "paper scoring,no phase 1"] [--skip_e4srec] [--key=value ...]
    python benchmarks/laser.py --item_cache_cost [--dataset ml-100k] [--threads 1]   (section laser_item_cache)

1. Laser with the shipped defaults (properties/model/Laser.yaml); stage 1 trains (or reuses
   from checkpoint_dir/stage1) the frozen SASRec. Reports full-ranking test metrics, the
   trainable parameters as a share of the LLM, training time per epoch, and throughput.
2. The frozen SASRec itself, evaluated on the same test split (no retraining).
3. E4SRec with its shipped defaults, only if recbole_llm/model/e4srec.py exists (a failure is
   reported, not raised); run last, after the Laser section is written.
4. With ``--variants``: each named variant (``VARIANTS``) on the first seed, same stage-1 SASRec,
   full runs like the main one (validation after phase 1 and every epoch, test of the best).
5. With ``--seeds``: Laser and its own stage-1 SASRec again for each extra seed (same
   settings, new seed for stage 1, Laser and the data loaders), to tell the Laser / SASRec
   ratio from run-to-run noise: per-seed ratios, their mean and standard error.
6. Ablations (``--ablation_rows`` > 0), SHORT runs (1 epoch, --ablation_rows training rows, no
   validation, test after the epoch) so they fit a CPU budget: full Laser vs no prefix / no
   suffix / one expert.

Every run records the validation NDCG@10 after phase 1 (item side) and after each phase-2 epoch,
and the two parts of the training loss per epoch (cross-entropy, 0.01 x balance). Each full run
(main, variant, seed) is also one record, ``benchmarks/records/laser/<dataset>/<key of its overrides>.json``,
with its command, machine, commit and date (committed); a later call reuses it instead of training
again, so seeds and variants can run at different times (``--fresh`` trains every run anew). A run records the checkpoint it kept (phase 1 or a
phase-2 epoch) and, with ``scoring: residual``, the kept checkpoint's test metrics with the LLM
correction switched off.

Extra --key=value arguments are config overrides for every Laser run.
Writes the "laser" section of docs/RESULTS.md ("laser_paper" with --scoring=paper: one section per scoring).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from recbole.trainer import Trainer
from results_doc import (METRICS, ROOT, Stopwatch, bare_argv, command, commit, load_record, machine, markdown_table,
                         parse_overrides, run_record_path, standard_error, write_record, write_section)

from recbole_llm import run_recbole_llm
from recbole_llm.llm.pluggable import count_parameters
from recbole_llm.llm.precision import resolve_precision
from recbole_llm.quick_start import build

VARIANTS = {
    "paper scoring": {"scoring": "paper"},
    "no phase 1": {"item_phase_epochs": 0, "item_side_lr_scale": 1.0},
    "residual, item side slowed": {"item_side_lr_scale": 0.1},
}
ABLATIONS = {
    "Laser (4 experts, top-2)": {},
    "no prefix (no M-Former)": {"use_prefix": False},
    "no suffix (last prompt position)": {"suffix_tokens": 0},
    "one expert": {"n_experts": 1, "router_top_k": 1},
}


def llm_depth(config) -> int:
    """Decoder layers of the configured LLM before ``llm_layers`` cut them (from its config.json)."""
    from transformers import AutoConfig

    from recbole_llm.llm.backbone import resolve_llm_path

    return AutoConfig.from_pretrained(resolve_llm_path(config["llm_path"])).num_hidden_layers


def run_laser(dataset_name, overrides, fit_validation=True):
    """Train and test one Laser; returns (test result, stats, model, config, test data)."""
    setup = Stopwatch()
    with bare_argv():  # the overrides (a variant's included) are config_dict's, not RecBole's command line
        config, model, trainer, (train_data, valid_data, test_data) = build("Laser", dataset_name,
                                                                            config_dict=overrides, around_model=setup)
    build_seconds = setup.seconds

    rows = {"train": 0, "eval": 0}
    forward = model.forward

    def counting_forward(item_seq, item_seq_len):
        rows["train" if model.training else "eval"] += item_seq.size(0)
        return forward(item_seq, item_seq_len)

    model.forward = counting_forward
    epoch_seconds, epoch_cpu_seconds, epoch_losses, valid_scores = [], [], [], []
    valid_epoch = trainer._valid_epoch

    def recorded_valid_epoch(*args, **kwargs):
        score, result = valid_epoch(*args, **kwargs)
        valid_scores.append(score)
        return score, result

    trainer._valid_epoch = recorded_valid_epoch
    train_epoch = trainer._train_epoch

    def timed_train_epoch(*args, **kwargs):
        t, cpu = time.perf_counter(), time.process_time()
        out = train_epoch(*args, **kwargs)
        epoch_seconds.append(time.perf_counter() - t)
        epoch_cpu_seconds.append(time.process_time() - cpu)
        epoch_losses.append(tuple(part / len(args[0]) for part in out) if isinstance(out, tuple) else (out / len(args[0]),))
        print(f"  epoch {len(epoch_seconds)}: {epoch_seconds[-1]:.0f} s wall, {epoch_cpu_seconds[-1]:.0f} s CPU, loss {out}", flush=True)
        return out

    trainer._train_epoch = timed_train_epoch
    trainer.fit(train_data, valid_data if fit_validation else None, saved=fit_validation, show_progress=False)
    train_rows = rows["train"]
    rows["eval"] = 0
    t, cpu = time.perf_counter(), time.process_time()
    test = trainer.evaluate(test_data, load_best_model=fit_validation, show_progress=False)
    test_seconds, test_cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
    llm_off = None
    if config["scoring"] == "residual":  # the kept checkpoint with the LLM correction switched off
        gate = model.output_gate.data.clone()
        model.output_gate.data.zero_()
        llm_off = dict(trainer.evaluate(test_data, load_best_model=False, show_progress=False))
        model.output_gate.data.copy_(gate)

    llm_params = count_parameters(model.llm)[1]
    per_layer = count_parameters(model.llm.layers[0])[1]
    full_layers = llm_depth(config)
    full_llm_params = llm_params + (full_layers - len(model.llm.layers)) * per_layer
    trainable = count_parameters(model)[0]
    stats = {
        "build_s": build_seconds,
        "epoch_s": epoch_seconds,
        "epoch_cpu_s": epoch_cpu_seconds,
        "test_cpu_s": test_cpu_seconds,
        "train_rows_per_cpu_s": train_rows / max(sum(epoch_cpu_seconds), 1e-9),
        "test_users_per_cpu_s": rows["eval"] / max(test_cpu_seconds, 1e-9),
        "train_rows": train_rows,
        "train_rows_per_s": train_rows / max(sum(epoch_seconds), 1e-9),
        "test_users": rows["eval"],
        "test_s": test_seconds,
        "test_users_per_s": rows["eval"] / max(test_seconds, 1e-9),
        "trainable": trainable,
        "llm_params_kept": llm_params,
        "llm_params_full": full_llm_params,
        "llm_layers": f"{len(model.llm.layers)} of {full_layers}",
        # validation NDCG@10 after phase 1 (when it ran) and each phase-2 epoch; loss parts per batch, per epoch
        "valid": valid_scores,
        "phase_1": bool(config["item_phase_epochs"]) and bool(model.item_side_parameters()) and fit_validation,
        "losses": epoch_losses,
        "item_repr": model.item_repr,
        "llm_compute": resolve_precision(config["llm_dtype"], config["device"]).describe(),
        "llm_off": llm_off,  # residual: test metrics of the kept checkpoint with output_gate 0
    }
    phases = (["phase 1"] if stats["phase_1"] else []) + [f"epoch {k + 1}" for k in range(len(epoch_seconds))]
    stats["kept"] = phases[max(range(len(valid_scores)), key=valid_scores.__getitem__)] if valid_scores else None
    return test, stats, model, config, test_data


RECORDS = ROOT / "benchmarks" / "records" / "laser"
RECORDED_SETTINGS = ("seed", "scoring", "eval_step", "id_model_checkpoint", "llm_path", "train_rows_per_epoch", "epochs")


def laser_and_sasrec(dataset_name, overrides, fresh=False):
    """One Laser run and its frozen SASRec on the same test split: (laser test, sasrec test, stats, settings, minutes),
    from its record when one exists (and not ``fresh``)."""
    path = run_record_path(RECORDS, dataset_name, overrides)
    record = None if fresh else load_record(path)
    if record is None:
        start = time.perf_counter()
        laser_test, stats, model, config, test_data = run_laser(dataset_name, overrides)
        sasrec_test = Trainer(config, model.id_model).evaluate(test_data, load_best_model=False, show_progress=False)
        record = {"overrides": overrides, "laser": dict(laser_test), "sasrec": dict(sasrec_test), "stats": stats,
                  "settings": {key: config[key] for key in RECORDED_SETTINGS},
                  "minutes": (time.perf_counter() - start) / 60,
                  "command": command(), "machine": machine(), "commit": commit(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        write_record(path, record)
    else:
        print(f"  reused {path.relative_to(ROOT)} ({record['date']}, {record['command']})", flush=True)
    return record["laser"], record["sasrec"], record["stats"], record["settings"], record["minutes"]


def training_trace(stats):
    """Validation NDCG@10 after phase 1 and each epoch, and the loss parts per epoch, as one cell."""
    valid = stats["valid"]
    phases = (["phase 1"] if stats["phase_1"] else []) + [f"epoch {k + 1}" for k in range(len(valid))]
    cells = [f"{name} {score:.4f}" for name, score in zip(phases, valid)]
    losses = "; ".join(" + ".join(f"{part:.3f}" for part in parts) for parts in stats["losses"])
    return ", ".join(cells) + (f" (loss per batch, CE + 0.01 x balance: {losses})" if losses else "")


def seeds_table(runs, scoring="residual"):
    """Markdown table of (seed, SASRec test, Laser test, stats) runs and the mean Laser / SASRec NDCG@10 ratio:
    with the checkpoint kept (phase 1 or a phase-2 epoch) and, under residual scoring, its NDCG@10 with the LLM
    correction switched off (output_gate 0)."""
    ratios = [laser["ndcg@10"] / max(sasrec["ndcg@10"], 1e-12) for _, sasrec, laser, _ in runs]
    rows = [[str(seed), f"{sasrec['ndcg@10']:.4f}", f"{laser['ndcg@10']:.4f}", f"{ratio:.3f}", stats.get("kept") or "-",
             f"{stats['llm_off']['ndcg@10']:.4f}" if stats.get("llm_off") else "-", training_trace(stats)]
            for (seed, sasrec, laser, stats), ratio in zip(runs, ratios)]
    text = markdown_table(["seed", "SASRec NDCG@10", "Laser NDCG@10", "Laser / SASRec", "checkpoint kept",
                           "NDCG@10, LLM side off", "valid NDCG@10"], rows)
    text += (f"\n\nLaser ({scoring}) / SASRec NDCG@10, mean over {len(ratios)} seed{'s' if len(ratios) > 1 else ''}: "
             f"{statistics.mean(ratios):.3f}"
             + (f" (standard error {standard_error(ratios):.3f})" if len(ratios) > 1 else "") + "; goal >= 1.")
    return text


def row(name, test, extra=""):
    return [name] + [f"{test[m]:.4f}" for m in METRICS] + [extra]


def item_cache_cost(dataset_name, overrides, repeats=2) -> str:
    """Seconds of one phase-1 step of the paper's item side (every item through [title | item suffix],
    forward and backward) with the title key/value cache and without it, alternated on one model; the
    cache's one-time build; and phase 1's item-side cost per epoch. Returns the RESULTS text."""
    with bare_argv():
        config, model, _, (train_data, _, _) = build("Laser", dataset_name,
                                                     config_dict={**overrides, "scoring": "paper", "item_repr": "suffix"})
    model.train()
    model.item_side_held = False
    targets = torch.randint(1, model.n_items, (config["item_phase_batch_size"] or config["train_batch_size"],))
    users = torch.randn(len(targets), model.id_model.item_embedding.embedding_dim)

    def step():
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model.item_phase_loss(users, targets).backward()
        return time.perf_counter() - start

    start = time.perf_counter()
    model.item_titles._stored = None
    model.item_titles.with_suffix(model.item_suffix.detach())  # builds the cache (and one suffix pass)
    cache_seconds = time.perf_counter() - start
    seconds = {True: [], False: []}
    for _ in range(repeats):
        for cached in (True, False):
            model.item_titles.cache = cached
            seconds[cached].append(step())
    cached, uncached = min(seconds[True]), min(seconds[False])
    rows = config["item_phase_rows"] or len(train_data.dataset)
    steps = -(-rows // len(targets))
    return (f"{model.n_items} items, {config['llm_layers'] or 'all'} LLM layers, titles of at most "
            f"{config['title_max_tokens']} tokens, {model.n_suffix} suffix tokens, {config['item_batch_size']} items "
            f"per pass, LLM compute {resolve_precision(config['llm_dtype'], config['device']).describe()}; one phase-1 "
            f"step = every item's vector, forward and backward (best of {repeats}):\n\n"
            + markdown_table(["item side", "s per step", f"s per phase-1 epoch ({steps} steps of {len(targets)} rows)"],
                             [["title keys/values cached (item_kv_cache: True)", f"{cached:.2f}", f"{steps * cached:.0f}"],
                              ["title run with the suffix each step", f"{uncached:.2f}", f"{steps * uncached:.0f}"]])
            + f"\n\nThe cache is built once: {cache_seconds:.1f} s (with one suffix pass); uncached / cached per step: "
            f"{uncached / cached:.2f}x.")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ablation_rows", type=int, default=500)
    parser.add_argument("--skip_e4srec", action="store_true")
    parser.add_argument("--seeds", default="", help="extra seeds for Laser + its SASRec, e.g. 2021,2022")
    parser.add_argument("--variants", default="", help=f"comma-separated names of VARIANTS: {', '.join(VARIANTS)}")
    parser.add_argument("--fresh", action="store_true", help="train every run anew instead of reusing its record")
    parser.add_argument("--item_cache_cost", action="store_true",
                        help="only time the paper item side with and without the title cache (section laser_item_cache)")
    args, rest = parser.parse_known_args()
    overrides = {"show_progress": False, "num_threads": args.threads, **parse_overrides(rest)}
    torch.set_num_threads(args.threads)
    if args.item_cache_cost:
        write_section("laser_item_cache", f"Laser's item side with and without the title cache on {args.dataset}",
                      item_cache_cost(args.dataset, overrides))
        return
    wall = time.perf_counter()

    print("Laser (shipped defaults + command-line overrides) ...", flush=True)
    laser_test, sasrec_test, stats, config, laser_minutes = laser_and_sasrec(args.dataset, overrides, args.fresh)
    print("Laser", dict(laser_test), stats, flush=True)
    print("SASRec (frozen stage 1)", dict(sasrec_test), flush=True)
    seed_runs = [(config["seed"], sasrec_test, laser_test, stats)]
    variant_rows = []

    ablation_rows, ablation_budget = [], {"rows": args.ablation_rows, "epochs": 1}
    main_rows = [
        row("SASRec (Laser's frozen stage-1 ID model)", sasrec_test, "-"),
        row(f"Laser (scoring {config['scoring']})", laser_test, f"{laser_minutes:.1f}"),
    ]
    epochs = ", ".join(f"{s:.0f}" for s in stats["epoch_s"])
    epochs_cpu = ", ".join(f"{s:.0f}" for s in stats["epoch_cpu_s"])

    def body(extra_rows=(), e4srec_note=""):
        ratio = laser_test["ndcg@10"] / max(sasrec_test["ndcg@10"], 1e-12)
        return (
            markdown_table(["model"] + METRICS + ["wall time (min, build+train+eval)"], main_rows + list(extra_rows))
            + f"\n\nLaser / SASRec NDCG@10: {ratio:.3f} (goal >= 1). {e4srec_note}"
            + f"\nProtocol: {args.dataset}, leave-one-out in time order, full ranking over all items, test metrics of "
            + ("the Laser checkpoint best on validation NDCG@10" if config["eval_step"] > 0
               else "Laser after its last epoch (eval_step=0: no validation)")
            + "; SASRec is the exact frozen model Laser reads ("
            + (f"loaded from id_model_checkpoint={config['id_model_checkpoint']}" if config["id_model_checkpoint"]
               else "stage 1 with `id_model_config` from properties/model/Laser.yaml")
            + "), evaluated on the same test split."
            + "\n\nSeeds (each: its own stage-1 SASRec and Laser, same settings; the first is the run above):\n\n"
            + seeds_table(seed_runs, config["scoring"])
            + ("\n\nVariants on the first seed (same stage-1 SASRec, same settings but the ones named; full runs):\n\n"
               + markdown_table(["variant", "overrides", "ndcg@10", "Laser / SASRec", "valid NDCG@10",
                                 "wall time (min)"], variant_rows) if variant_rows else "")
            + "\n\nCost (the Laser run above: shipped defaults plus the command-line overrides, "
            f"LLM = {config['llm_path'] or 'embedded SmolLM2-135M-Instruct'}, {stats['llm_layers']} decoder layers kept, {args.threads} torch thread):\n\n"
            + markdown_table(
                ["quantity", "value"],
                [
                    ["trainable parameters", f"{stats['trainable']:,}"],
                    ["share of the full LLM", f"{100 * stats['trainable'] / stats['llm_params_full']:.3f}% "
                     f"of {stats['llm_params_full']:,}"],
                    ["share of the LLM layers kept", f"{100 * stats['trainable'] / stats['llm_params_kept']:.3f}% "
                     f"of {stats['llm_params_kept']:,}"],
                    ["training time per epoch (s wall / s CPU)", f"{epochs} / {epochs_cpu} "
                     f"({config['train_rows_per_epoch']} rows cap per epoch, {config['epochs']} epochs)"],
                    ["training throughput", f"{stats['train_rows_per_s']:.2f} rows/s wall, "
                     f"{stats['train_rows_per_cpu_s']:.2f} rows per CPU-second (forward + backward)"],
                    ["full-ranking inference throughput", f"{stats['test_users_per_s']:.2f} users/s wall, "
                     f"{stats['test_users_per_cpu_s']:.2f} users per CPU-second ({stats['test_users']} test users "
                     f"in {stats['test_s']:.0f} s wall / {stats['test_cpu_s']:.0f} s CPU, one LLM forward per batch)"],
                    ["model build (stage-1 load + LLM load + item-text vectors)", f"{stats['build_s']:.0f} s"],
                ],
            )
            + (f"\n\nAblations: SHORT runs ({ablation_budget['epochs']} epoch(s) of {ablation_budget['rows']} training "
            "rows, no validation, test after training) so all four fit the CPU budget; compare rows with each other, "
            "not with the full run above. Command-line --key=value overrides apply to these runs too.\n\n"
            + markdown_table(["variant"] + METRICS + ["trainable params / wall time"], ablation_rows) if ablation_rows else "")
        )

    # one section per scoring: "laser" for the default's, "laser_<scoring>" for another one given on the command line
    section = "laser" if "scoring" not in overrides else f"laser_{config['scoring']}"
    title = f"Laser vs SASRec on {args.dataset}" + ("" if section == "laser" else f" (scoring {config['scoring']})")
    write_section(section, title, body())  # the main comparison first; variants, seeds and ablations as they finish
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        print(f"variant {name} ...", flush=True)
        laser_variant, sasrec_variant, variant_stats, _, minutes = laser_and_sasrec(
            args.dataset, {**overrides, **VARIANTS[name]}, args.fresh)
        ratio = laser_variant["ndcg@10"] / max(sasrec_variant["ndcg@10"], 1e-12)
        variant_rows.append([name, f"`{VARIANTS[name]}`", f"{laser_variant['ndcg@10']:.4f}", f"{ratio:.3f}",
                             training_trace(variant_stats), f"{minutes:.1f}"])
        print(f"variant {name}: Laser", dict(laser_variant), variant_stats["valid"], flush=True)
        write_section(section, title, body())
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        print(f"seed {seed} ...", flush=True)
        laser_seed, sasrec_seed, seed_stats, _, _ = laser_and_sasrec(args.dataset, {**overrides, "seed": seed}, args.fresh)
        seed_runs.append((seed, sasrec_seed, laser_seed, seed_stats))
        print(f"seed {seed}: SASRec", dict(sasrec_seed), "Laser", dict(laser_seed), flush=True)
        write_section(section, title, body())
    short = {"epochs": 1, "train_rows_per_epoch": args.ablation_rows, "eval_step": 0}
    for name, switch in (ABLATIONS.items() if args.ablation_rows > 0 else ()):
        print(f"ablation {name} ...", flush=True)
        t = time.perf_counter()
        test, ab_stats, _, ab_config, _ = run_laser(args.dataset, {**overrides, **short, **switch}, fit_validation=False)
        ablation_budget.update(rows=ab_config["train_rows_per_epoch"], epochs=ab_config["epochs"])
        minutes = (time.perf_counter() - t) / 60
        ablation_rows.append(row(name, test, f"{ab_stats['trainable']:,} / {minutes:.1f} min"))
        print(name, dict(test), f"{minutes:.1f} min", flush=True)
        write_section(section, title, body())
    print(f"Laser section written after {(time.perf_counter() - wall) / 60:.1f} min", flush=True)

    e4srec_file = importlib.util.find_spec("recbole_llm.model.e4srec")
    if e4srec_file is None or args.skip_e4srec:
        write_section(section, title, body(e4srec_note="E4SRec: not run here (--skip_e4srec or no e4srec.py); the section "
                                                f"\"E4SRec vs its stage-1 SASRec on {args.dataset}\" has it."))
        return
    print("E4SRec (shipped defaults) ...", flush=True)
    t = time.perf_counter()
    try:
        with bare_argv():
            result = run_recbole_llm("E4SRec", args.dataset, config_dict=dict(overrides))
    except Exception as error:  # another engineer's model: report, do not fail the Laser benchmark
        note = f"E4SRec: failed to run ({type(error).__name__}: {str(error)[:200]})."
        print(note, flush=True)
        write_section(section, title, body(e4srec_note=note))
        return
    minutes = (time.perf_counter() - t) / 60
    print("E4SRec", dict(result["test_result"]), flush=True)
    write_section(section, title, body([row("E4SRec (shipped defaults)", result["test_result"], f"{minutes:.1f}")],
                                       "E4SRec: shipped defaults, same split."))


if __name__ == "__main__":
    main()
