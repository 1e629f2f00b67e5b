"""SeRALM on one dataset: Base / Base+NA_LLM / Base+SeRALM per base model, latency, alignment speed.

    # once (long on a CPU; resumable): the un-aligned LLM's knowledge cache for the dataset
    python -m recbole_llm.knowledge.generation --dataset ml-100k --num_threads 2
    # then
    python benchmarks/seralm.py [--dataset ml-100k] [--models SASRec,Caser,LightSANs] \\
        [--timing auto|yes|no] [--timing_iterations 10] [--latency_items 16] \\
        [--key=value ...] [--Caser.key=value ...]

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
Extra ``--key=value`` arguments are config overrides for every run, ``--BASE.key=value`` for the
three runs of one base model (e.g. ``--Caser.MAX_ITEM_LIST_LENGTH=5``, the Caser paper's window).
Each base model's runs are one record (``benchmarks/records/seralm/<dataset>/<base>.json``, committed, with its
command, machine, commit and date; ``<base>-<key>.json`` when the command line sets anything that shapes the runs,
so other settings never mix), so the bases can run at different times. A finished record with the same
settings is reused, an interrupted one continued from its last finished variant. The timings are one
more record, measured when it is missing (``--timing auto``). Writes the "seralm" section of docs/RESULTS.md
from all the records: per base its summary line (SeRALM(Base) / Base HIT@10 over seeds, aligned /
un-aligned) and the alignment's curve per iteration (advantage, KL, importance ratios, JSON answers;
saved with the aligned adapter, so a reused adapter brings it).

One run per cell leaves about a point of HIT@10 to chance. ``--seeds=main,2021,2022`` adds runs
with other seeds (``main`` = the configured seed, the full procedure above; each other seed is
one more record, ``<base>-seed<N>.json``), and the section shows each cell's mean and standard
deviation over its runs. The extra seeds vary the recommenders' training, not the alignment:
their Base+SeRALM trains on the knowledge of the main run's aligned adapter (``llm_adapter``),
because one alignment with regeneration costs ~35 minutes per base model on a CPU.

``--fields_control`` adds, beyond the paper, a control without the LLM to every run: Base+Fields, SeRALM
with each item's own fields as its knowledge text (``knowledge_source: fields``; what an unusable LLM
answer falls back to), so the gain of the LLM's text over the items' own text is measured. A finished
record gains only that variant (with its own date, machine and command).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from results_doc import (ROOT, bare_argv, command, commit, load_record, machine, markdown_table, parse_overrides,
                         split_overrides, standard_error, write_record, write_section)

from recbole_llm.cache_io import content_key
from recbole_llm.knowledge.identity import adapter_dir_fingerprint
from recbole_llm.knowledge.store import KnowledgeCache
from recbole_llm.quick_start import build, slice_columns
from recbole_llm.trainer.slices import SLICES

METRICS = ["hit@10", "ndcg@10"]
PAPER_SASREC = (21.02, 21.43, 21.66)  # MovieLens-1M HIT@10 (%): Base, Base+NA_LLM, Base+SeRALM (Table 1)


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
    from recbole_llm.knowledge.generation import dataset_items, load_generator
    from recbole_llm.knowledge.prompts import knowledge_text, parse_knowledge

    generator = load_generator(config)
    encoder = TextEncoder.load(config["text_encoder"])
    items = [fields for _, _, fields in dataset_items(dataset, config["knowledge_fields"])[:n_items]]
    start = time.perf_counter()
    answers = []
    for i in range(0, len(items), generator.batch_size):
        answers += generator.generate(items[i:i + generator.batch_size])
    generated = time.perf_counter()
    encoder.encode([knowledge_text(parse_knowledge(a)[0]) for a in answers])
    done = time.perf_counter()
    return (generated - start) / len(items), (done - generated) / len(items)


def alignment_speed(dataset, overrides, iterations):
    """Seconds per alignment iteration, async generator (refreshed at its default interval) vs sync
    (SASRec, fresh LoRA each); also the async run's refresh interval and applied refreshes."""
    per_iteration = {}
    for mode in ("async", "sync"):
        cfg = {**overrides, "base_model": "SASRec", "alignment_iterations": iterations, "generator_mode": mode,
               "align_log_interval": max(iterations, 1)}
        config, model, trainer, (train, _, _) = build("SeRALM", dataset, config_dict=cfg)
        trainer.align(train)
        per_iteration[mode] = trainer.alignment_stats["seconds_per_iteration"]
        if mode == "async":
            per_iteration["refresh_interval"] = trainer.alignment_stats["refresh_interval"]
            per_iteration["refreshes"] = trainer.alignment_stats["refreshes"]
        print(mode, trainer.alignment_stats, flush=True)
    return per_iteration


RECORDS = ROOT / "benchmarks" / "records" / "seralm"
VARIANTS = ("Base", "Base+NA_LLM", "Base+SeRALM")
#: The control without the LLM (``--fields_control``): SeRALM with every item's own fields as its knowledge text.
FIELDS = "Base+Fields"
#: Where and how a run (and each of its variants) was measured.
PROVENANCE = ("measured", "machine", "commit", "command")
#: Settings that change where a run writes or how fast it goes, not its numbers: no family, no key of their own.
NEUTRAL = frozenset({"num_threads", "show_progress", "state", "checkpoint_dir"})
BASE_ORDER = ("SASRec", "Caser", "LightSANs", "GRU4Rec", "NARM")


def record_file(dataset: str, name: str, seed: int | None = None) -> Path:
    """One record per base model and extra seed (and one for the timings): a section grows one run at a time."""
    return RECORDS / dataset / (f"{name}.json" if seed is None else f"{name}-seed{seed}.json")


def family(base: str, overrides: dict) -> str:
    """The name of the records of ``base`` run with the command line's ``overrides`` (its own and those
    for every base): the base alone with none, else with a key of them, so other settings never mix."""
    shaping = {key: overrides[key] for key in sorted(overrides) if key not in NEUTRAL}
    return base if not shaping else f"{base}-{content_key(shaping, length=8)}"


def family_label(name: str, main: dict) -> str:
    """How a family of records is named in the section: its base model and the settings it overrides."""
    overrides = main.get("overrides") or {}
    return main.get("base", name) + (f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")


def seed_records(dataset: str, name: str) -> list[dict]:
    """The extra-seed records of one family (:func:`family`), by seed."""
    found = (load_record(path) for path in (RECORDS / dataset).glob(f"{name}-seed*.json"))
    return sorted(filter(None, found), key=lambda record: record["seed"])


def families(dataset: str) -> dict[str, list[dict]]:
    """Every family's runs (its main run, then its extra seeds), in the order of BASE_ORDER."""
    mains = {path.stem: load_record(path) for path in sorted((RECORDS / dataset).glob("*.json"))
             if "-seed" not in path.stem and path.stem != "timing"}
    order = {base: k for k, base in enumerate(BASE_ORDER)}
    names = sorted((n for n, r in mains.items() if r), key=lambda n: (order.get(mains[n].get("base"), 99), n))
    return {family_label(name, mains[name]): [mains[name], *seed_records(dataset, name)] for name in names}


def mean_sd(values: list[float]) -> str:
    """``mean`` of one value, ``mean ± sample standard deviation`` of several (in %)."""
    text = f"{100 * statistics.mean(values):.2f}"
    return text + (f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else "")


def adapter_of_knowledge(knowledge_file: Path, base: str) -> Path | None:
    """The saved aligned adapter of ``base`` (beside ``knowledge_file``) that generated ``knowledge_file``: the one
    whose LoRA fingerprint its meta names; None when there is none."""
    cache = KnowledgeCache(knowledge_file.parent, knowledge_file.stem.removeprefix("knowledge-"))
    fingerprint = (load_record(cache.meta_path) or {}).get("adapter")
    folders = sorted(knowledge_file.parent.glob(f"aligned-{base}-*"))
    return next((folder for folder in folders if fingerprint and (folder / "adapter_config.json").is_file()
                 and adapter_dir_fingerprint(folder) == fingerprint), None)


def aligned_adapter(base: str, dataset: str, settings: dict, main: dict | None = None) -> Path:
    """The aligned adapter of ``base``'s main run: the one that generated the knowledge its record trained on
    (``main``), wherever it was aligned (the alignment's key names the LLM's precision, which differs between
    CPUs with and without bf16 units); else the one SeRALM's trainer names from the settings on this machine."""
    knowledge = ((main or {}).get("variants", {}).get("Base+SeRALM", {}).get("alignment", {}).get("knowledge_file"))
    found = adapter_of_knowledge(ROOT / knowledge, base) if knowledge else None
    if found is not None:
        return found.relative_to(ROOT) if found.is_relative_to(ROOT) else found
    _, _, trainer, _ = build("SeRALM", dataset, config_dict={**settings, "base_model": base})
    path = trainer.alignment_dir()
    if not (path / "adapter_config.json").is_file():
        raise SystemExit(f"{base}: no aligned adapter at {path}; run the main seed first "
                         f"(python benchmarks/seralm.py --models {base} --seeds=main)")
    return path


def run_settings(shared: dict, own: dict, seed: int | None) -> dict:
    """What a record keeps of a run's settings (and compares before reusing it): all but the neutral ones."""
    settings = {**shared, **own, **({} if seed is None else {"seed": seed})}
    return {key: value for key, value in settings.items() if key not in NEUTRAL}


def wanted(fields_control: bool) -> tuple[str, ...]:
    """The variants a run trains: the three of the paper, and the fields-only control when asked for."""
    return VARIANTS + ((FIELDS,) if fields_control else ())


def run_base(base: str, dataset: str, shared: dict, own: dict, seed: int | None = None, save=None,
             earlier: dict | None = None, variants_wanted: tuple[str, ...] = VARIANTS, how: dict | None = None) -> dict:
    """Base, Base+NA_LLM and Base+SeRALM of one base model (and :data:`FIELDS` when in ``variants_wanted``),
    each with its full-ranking latency and the date, machine, commit and command (``how``) it was measured with.

    ``seed``: an extra run with that seed, whose Base+SeRALM uses the main run's aligned adapter.
    ``save(record)`` is also called after each variant with the record so far (``unfinished``
    names the variants still to run), so an interrupted run keeps what it measured; ``earlier``,
    such a record of the same settings, is continued (its finished variants are not run again;
    a finished record gains the variants it lacks, the control say, and keeps its own date, machine and
    command, those of the paper's variants).
    """
    settings = {**shared, **own, **({} if seed is None else {"seed": seed})}
    recorded = run_settings(shared, own, seed)
    done = {}
    if earlier and earlier.get("settings") == recorded:  # each kept variant keeps where and how it was measured
        stamp = {key: earlier[key] for key in PROVENANCE if key in earlier}
        done = {label: {**stamp, **variant} for label, variant in earlier["variants"].items()}
    aligned = {"llm_adapter": earlier["llm_adapter"]} if done and earlier.get("llm_adapter") else {}
    if seed is not None and "Base+SeRALM" not in done:
        main = load_record(record_file(dataset, family(base, own)))
        aligned = {"llm_adapter": str(aligned_adapter(base, dataset, {**shared, **own}, main))}
    variants = dict(done)
    call = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit(), **(how or {})}
    now = {**call, "machine": machine()}  # stamped again as each variant ends: its load is that of the run's end
    kept = {key: earlier[key] for key in PROVENANCE if key in earlier} if done and not stopped_before(earlier) else {}

    def record(**extra):
        return {"base": base, "overrides": own, "settings": recorded, "seed": seed, **aligned, **now, **kept,
                "variants": dict(variants), "test_users": next(iter(variants.values()))["test_users"], **extra}

    for label, model, extra in [  # the aligned run first: the longest, and the one alignment changes
        ("Base+SeRALM", "SeRALM", {"base_model": base, **aligned}),
        ("Base", base, {}),
        ("Base+NA_LLM", "SeRALM", {"base_model": base, "alignment_iterations": 0}),
        (FIELDS, "SeRALM", {"base_model": base, "alignment_iterations": 0, "knowledge_source": "fields"}),
    ]:
        if label not in variants_wanted:
            continue
        if label in done:
            print(f"{base} {label}: kept from the record of {earlier['measured']}", flush=True)
            continue
        result, trainer, net, test, minutes = train_and_test(model, dataset, {**settings, **extra})
        stats = {k: v for k, v in getattr(trainer, "alignment_stats", {}).items() if isinstance(v, (int, float, str))}
        latency_ms = 1000 * latency(net, test)
        now = {**call, "machine": machine()}
        variants[label] = {**{m: float(result[m]) for m in METRICS}, "minutes": minutes, "alignment": stats,
                           "slices": slice_columns(result), "latency_ms": latency_ms,
                           "alignment_trace": getattr(trainer, "alignment_trace", []),
                           "test_users": len(test._dataset), **now}
        print(base, label, result, f"{minutes:.1f} min", stats, flush=True)
        missing = [v for v in variants_wanted if v not in variants]
        if missing and save is not None:
            save(record(unfinished=missing))
    return record(latency_ms={"base": variants["Base"]["latency_ms"], "seralm": variants["Base+SeRALM"]["latency_ms"]})


def run_timing(dataset: str, shared: dict, iterations: int, n_items: int) -> dict:
    """Generation + encoding seconds per item and alignment seconds per iteration (async vs sync)."""
    config, _, _, (train, _, _) = build("SeRALM", dataset, config_dict={**shared, "alignment_iterations": 0})
    gen_seconds, enc_seconds = generation_time_per_item(config, train._dataset, n_items)
    speed = alignment_speed(dataset, shared, iterations)
    return {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
            "latency_items": n_items, "generation_s": gen_seconds, "encoding_s": enc_seconds,
            "iterations": iterations, "async_s": speed["async"], "sync_s": speed["sync"],
            "refresh_interval": speed["refresh_interval"], "refreshes": speed["refreshes"]}


def same_call(variant: dict, run: dict) -> bool:
    """Whether a variant was measured by the call its record is dated by (the call's start and command): the
    machine may differ, each variant stamps the load at its own end."""
    return (variant["measured"], variant.get("command")) == (run["measured"], run.get("command"))


#: NDCG@10 per slice (popularity of the target, then the user's history length): RecBole's metric per group.
SLICE_COLUMNS = tuple(f"ndcg@10 {name}" for names in SLICES.values() for name in names)
#: The alignment curve's columns: (heading, statistic of alignment_step, format).
CURVE = (("advantage mean", "advantage", "{:+.4f}"), ("advantage spread (s.d.)", "advantage_std", "{:.4f}"),
         ("KL", "kl", "{:.4f}"), ("importance ratio", "importance", "{:.3f}"), ("clipped tokens", "clipped", "{:.3f}"),
         ("JSON answers", "json_share", "{:.2f}"), ("reward ratio w", "ratio", "{:.3f}"))


def alignment_curve(base: str, trace: list[dict], rows: int = 10) -> list[str]:
    """The alignment's statistics per iteration (means over at most ``rows`` equal spans of iterations)."""
    if not trace:
        return []
    span = -(-len(trace) // rows)
    table = []
    for start in range(0, len(trace), span):
        part = trace[start:start + span]
        first, last = part[0]["iteration"], part[-1]["iteration"]
        table.append([f"{first}" if first == last else f"{first}-{last}"]
                     + [fmt.format(statistics.mean(t[key] for t in part)) if all(key in t for t in part) else "-"
                        for _, key, fmt in CURVE])
    return [f"Alignment of SeRALM({base}), main run ({len(trace)} iterations; each row the mean over its iterations):",
            "", markdown_table(["iterations"] + [heading for heading, _, _ in CURVE], table), ""]


def stopped_before(run: dict) -> list[str]:
    """The paper's variants an interrupted run has still to measure (a missing control does not count)."""
    return [label for label in run.get("unfinished", []) if label in VARIANTS]


def with_control(runs: list[dict]) -> list[dict]:
    """The runs that measured the fields-only control (:data:`FIELDS`)."""
    return [run for run in runs if FIELDS in run["variants"]]


def control_line(model: str, runs: list[dict]) -> list[str]:
    """The fields-only control against Base and Base+SeRALM, over the runs that have all three."""
    runs = [run for run in with_control(runs) if "Base+SeRALM" in run["variants"]]
    if not runs:
        return []
    hit = {label: [run["variants"][label]["hit@10"] for run in runs] for label in ("Base", FIELDS, "Base+SeRALM")}

    def ratio(top, bottom):
        values = [a / b for a, b in zip(hit[top], hit[bottom])]
        return f"{statistics.mean(values):.3f}" + (f" (standard error {standard_error(values):.3f})"
                                                     if len(values) > 1 else "")

    return [f"  - Control without the LLM (`knowledge_source: fields`: each item's own fields as its knowledge text), "
            f"{len(runs)} seed{'s' * (len(runs) > 1)}: {FIELDS} / {model} HIT@10 {ratio(FIELDS, 'Base')}; "
            f"SeRALM / {FIELDS} {ratio('Base+SeRALM', FIELDS)}"]


def slice_table_rows(base: str, runs: list[dict]) -> list[list[str]]:
    """NDCG@10 (%) per slice of the test users (``eval_slices``), mean over the runs that have them."""
    rows = []
    for label in VARIANTS + (FIELDS,):
        cells = [run["variants"][label].get("slices") or {} for run in runs if label in run["variants"]]
        cells = [c for c in cells if c]
        if cells:
            rows.append([base, label, len(cells)] + [f"{100 * statistics.mean(c[name] for c in cells):.2f}"
                                                     for name in SLICE_COLUMNS])
    return rows


def section_body(dataset: str, records: dict, timing: dict | None) -> str:
    """The "seralm" section from every base model's records (each says when, where and how it ran).

    ``records``: base model -> its runs, the main run first, then the extra seeds.
    """
    rows, checks, latency_rows, provenance, curves, slice_rows = [], [], [], [], [], []
    for base, runs in records.items():  # base: the family's label (its base model, its own settings)
        stopped = [run for run in runs[1:] if stopped_before(run)]  # an interrupted extra seed: left out
        runs = [runs[0], *(run for run in runs[1:] if not stopped_before(run))]
        checks += [f"- {base}: seed {run['seed']} was stopped before {', '.join(stopped_before(run))} finished: left "
                   "out until its command continues it" for run in stopped]
        if stopped_before(runs[0]):  # an interrupted main run: what it measured, no comparison
            runs = runs[:1]
            rows += [[base, label, 1, *(f"{100 * runs[0]['variants'][label][m]:.2f}" for m in METRICS), "-",
                      f"{runs[0]['variants'][label]['minutes']:.1f}"] if label in runs[0]["variants"]
                     else [base, label, 0, "not finished", "-", "-", "-"] for label in VARIANTS]
            checks.append(f"- {base}: the run was stopped before {', '.join(stopped_before(runs[0]))} finished: "
                          "no comparison")
            provenance.append(f"- {base}: measured {runs[0]['measured']}; `{runs[0]['command']}`; {runs[0]['machine']}")
            continue
        hits = {label: [run["variants"][label]["hit@10"] for run in runs] for label in VARIANTS}
        for label in VARIANTS:
            ndcgs = [run["variants"][label]["ndcg@10"] for run in runs]
            per_run = " / ".join(f"{100 * hit:.2f}" for hit in hits[label])
            rows.append([base, label, len(runs), mean_sd(hits[label]), mean_sd(ndcgs), per_run,
                         f"{runs[0]['variants'][label]['minutes']:.1f}"])
        controlled = with_control(runs)
        if controlled:
            cells = [run["variants"][FIELDS] for run in controlled]
            rows.append([base, FIELDS, len(cells), mean_sd([c["hit@10"] for c in cells]),
                         mean_sd([c["ndcg@10"] for c in cells]), " / ".join(f"{100 * c['hit@10']:.2f}" for c in cells),
                         f"{cells[0]['minutes']:.1f}" if controlled[0] is runs[0] else "-"])
        plain, na, aligned = (statistics.mean(hits[label]) for label in VARIANTS)
        users = runs[0]["test_users"]
        noise = (plain * (1 - plain) / users) ** 0.5  # binomial standard error of one HIT@10
        ratios = [a / b for a, b in zip(hits["Base+SeRALM"], hits["Base"])]
        spread = f"standard error {standard_error(ratios):.3f}" if len(runs) > 1 else "one run: no standard error"
        model, setting = runs[0].get("base", base), base.partition(" ")[2]
        seeds = f"{len(runs)} seed{'s' * (len(runs) > 1)}"
        checks.append(f"- SeRALM({model}) / {model} HIT@10{' ' * bool(setting) + setting}, mean over {seeds}: "
                      f"{statistics.mean(ratios):.3f} ({spread}); aligned / un-aligned: {aligned / na:.3f}"
                      + (" (goal >= 1.03)" if base == "SASRec" else "")
                      + (f". Per run: {', '.join(f'{r:.3f}' for r in ratios)}" if len(runs) > 1 else "")
                      + f"; standard error of one HIT@10 over {users} test users: about {100 * noise:.1f} points")
        checks += control_line(model, runs)
        ms = runs[0]["latency_ms"]
        latency_rows.append([base, f"{ms['base']:.2f}", f"{ms['seralm']:.2f}", f"{ms['seralm'] / ms['base']:.2f}"])
        slice_rows += slice_table_rows(base, runs)
        main = runs[0]
        curves += alignment_curve(base, main["variants"]["Base+SeRALM"].get("alignment_trace", []))
        own = f", overrides {json.dumps(main['overrides'])}" if main["overrides"] else ""
        provenance.append(f"- {base}: measured {main['measured']}{own}; `{main['command']}`; {main['machine']}"
                          + (f". {main['note']}" if main.get("note") else ""))
        provenance += [f"  - seed {run['seed']}: measured {run['measured']}; `{run['command']}`; {run['machine']}; "
                       f"Base+SeRALM on the main run's aligned knowledge (llm_adapter={run['llm_adapter']})"
                       for run in runs[1:]]
        provenance += [f"  - seed {run['seed'] or 'main'}, {label}: measured {cell['measured']}; `{cell['command']}`; "
                       f"{cell['machine']}" for run in runs for label, cell in run["variants"].items()
                       if "machine" in cell and not same_call(cell, run)]
    timing_text = ["Timings: not measured yet."] if timing is None else [
        f"Knowledge generation + encoding per item ({timing['latency_items']} items, greedy, embedded LLM): "
        f"{timing['generation_s']:.2f} s + {timing['encoding_s']:.3f} s = "
        f"{timing['generation_s'] + timing['encoding_s']:.2f} s (paper, A100: 2.57 s).",
        "",
        f"Alignment ({timing['iterations']} iterations, SASRec): async {timing['async_s']:.2f} s/it"
        + (f" (generator refreshed every {timing['refresh_interval']} iterations, {timing['refreshes']} refreshes "
           "applied)" if "refreshes" in timing else " (generator never refreshed)") + ", "
        f"sync {timing['sync_s']:.2f} s/it, async/sync = {timing['async_s'] / timing['sync_s']:.2f} "
        f"(measured {timing['measured']}; {timing['machine']}).",
    ]
    return "\n".join([
        markdown_table(["base model", "variant", "runs", "HIT@10 (%)", "NDCG@10 (%)", "HIT@10 per run (%)",
                        "wall time (min, main run)"], rows),
        "",
        "Several runs: mean ± standard deviation over seeds (the main run first, then the extra seeds).",
        "",
        "Paper (MovieLens-1M, SASRec, HIT@10 %): Base {} / NA_LLM {} / SeRALM {} (x1.030).".format(*PAPER_SASREC),
        "",
        *checks,
        "",
        "Inference latency per batch (full ranking, cached knowledge vectors; paper LightSANs vs SeRALM_rec: 1.20x):",
        "",
        markdown_table(["base model", "base (ms)", "SeRALM (ms)", "ratio"], latency_rows),
        "",
        *timing_text,
        "",
        *(["NDCG@10 (%) by slice of the test users (target popularity in training: cold < 5 interactions, then thirds "
           "of the interactions; the user's history length in thirds), mean over the runs:", "",
           markdown_table(["base model", "variant", "runs"] + [c.split()[1] for c in SLICE_COLUMNS], slice_rows), ""]
          if slice_rows else []),
        *curves,
        "Earlier measurements, made before the generator refreshed within a run and weighted stale samples "
        "(SASRec and Caser over 5 seeds, LightSANs over 3): this section at commit 3ed7969.",
        "",
        "Where each base model's rows come from (records in benchmarks/records/seralm/):",
        "",
        *provenance,
        "",
        f"Protocol: {dataset}, leave-one-out in time order, full ranking over all items; "
        "the LLM is the embedded SmolLM2-135M-Instruct (the paper: Llama-2-7b-chat), the encoder all-MiniLM-L6-v2.",
    ])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--models", default="SASRec,Caser,LightSANs",
                        help="base models to (re)run; the records of the others are kept")
    parser.add_argument("--timing", choices=("auto", "yes", "no"), default="auto",
                        help="measure generation/alignment speed: auto = when no timing record exists")
    parser.add_argument("--timing_iterations", type=int, default=10)
    parser.add_argument("--latency_items", type=int, default=16)
    parser.add_argument("--fields_control", action="store_true",
                        help=f"also train {FIELDS}: SeRALM with each item's own fields as its knowledge (no LLM)")
    parser.add_argument("--seeds", default="main",
                        help="runs per base model: main (the configured seed, with alignment) and/or extra seeds, "
                             "e.g. main,2021,2022")
    args, rest = parser.parse_known_args()
    seeds = [None if seed == "main" else int(seed) for seed in filter(None, args.seeds.split(","))]
    variants = wanted(args.fields_control)
    everyone, per_base = split_overrides(rest)
    overrides = {"show_progress": False, **parse_overrides(everyone)}
    # The base models train with SeRALM's own settings, for a like-for-like comparison.
    shared = {"MAX_ITEM_LIST_LENGTH": 50, "epochs": 8, "train_batch_size": 256, "stopping_step": 2,
              "learning_rate": 0.001, "eval_slices": True, **overrides}

    timing_file = record_file(args.dataset, "timing")
    how = {"command": command()}
    with bare_argv():  # RecBole's Config would read our --key=value arguments from sys.argv
        for base in filter(None, args.models.split(",")):  # --models= only rewrites the section
            own = {key: value for key, value in {**overrides, **parse_overrides(per_base.get(base, []))}.items()
                   if key not in NEUTRAL}  # every setting of the command line that shapes this base's runs
            for seed in seeds:
                path = record_file(args.dataset, family(base, own), seed)
                earlier = load_record(path)
                finished = earlier and not earlier.get("unfinished") and set(variants) <= set(earlier["variants"])
                if finished and earlier.get("settings") == run_settings(shared, own, seed):
                    print(f"reused {path} ({earlier['measured']}, {earlier['command']})", flush=True)
                    continue
                record = run_base(base, args.dataset, shared, own, seed, earlier=earlier, variants_wanted=variants,
                                  how=how, save=lambda partial, path=path: write_record(path, partial))
                write_record(path, record)
        if args.timing == "yes" or (args.timing == "auto" and load_record(timing_file) is None):
            timing = run_timing(args.dataset, shared, args.timing_iterations, args.latency_items)
            write_record(timing_file, {**timing, **how})

    body = section_body(args.dataset, families(args.dataset), load_record(timing_file))
    write_section("seralm", f"SeRALM on {args.dataset}", body)
    print(body)


if __name__ == "__main__":
    main()
