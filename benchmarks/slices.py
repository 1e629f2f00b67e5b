"""Where each model helps: NDCG@10 by slice of each model against its ID base, from saved checkpoints.

    python benchmarks/slices.py --saved saved [--dataset ml-100k] [--models LRURec,Laser,LlamaRec,E4SRec,SeRALM]
                                [--records saved/slices] [--data_path dataset] [--results_file docs/RESULTS.md]

For each model, the newest checkpoint ``<saved>/<Model>-*.pth`` is evaluated on its test split
with the settings it was trained with (the config pickled in the checkpoint, with
``eval_slices: True``), and so is its ID base, on the same split and training counts:

- LlamaRec vs its retriever (LRURec) with the user's history excluded, as LlamaRec's candidates are (the
  retriever's own order of the same candidates), and vs the retriever as RecBole evaluates it (which may
  recommend history items); Laser vs its frozen SASRec: the model's own stage-1 part;
- E4SRec vs its SASRec: the stage-1 model it copied its item table from (rebuilt from the stage-1 cache);
- SeRALM vs its base: the knowledge-free reference of its base model (SASRec, LightSANs, Caser...);
- LRURec vs SASRec: the newest ``<saved>/SASRec-*.pth``.

Stage-1 models are reused from ``<saved>/stage1`` as the models themselves do. Each pair writes
``<records>/<Model>.json``; the "slices" section of docs/RESULTS.md is assembled from every record
present, keeps the table of a pair measured earlier whose record is not here, and names the command
for each pair never measured.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import results_doc
import torch
from results_doc import load_record, machine, markdown_table, write_record, write_section

#: model -> its ID base, as named in the section.
PAIRS = {"LRURec": "SASRec", "LlamaRec": "LRURec (its retriever), history excluded", "E4SRec": "SASRec (its stage 1)",
         "Laser": "SASRec (its stage 1)", "SeRALM": "its base model, without knowledge"}
#: What makes a missing checkpoint (a run saves <checkpoint_dir>/<Model>-<time>.pth).
MAKE = {"LRURec": "python run_recbole_llm.py --model=LRURec,SASRec --dataset=ml-100k",
        "LlamaRec": "python benchmarks/llamarec_quality.py", "E4SRec": "python benchmarks/e4srec_vs_sasrec.py",
        "Laser": "python benchmarks/laser.py", "SeRALM": "python run_recbole_llm.py --model=SeRALM --dataset=ml-100k"}
SLICE_ORDER = [("all", None), ("popularity", "cold"), ("popularity", "tail"), ("popularity", "torso"),
               ("popularity", "head"), ("history", "short"), ("history", "medium"), ("history", "long")]


def newest(saved: Path, model: str) -> Path | None:
    found = sorted(saved.glob(f"{model}-*.pth"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def setup(checkpoint: Path, saved: Path, data_path: Path):
    """The checkpoint's model rebuilt with its own config: (config, model, trainer, train, test)."""
    import torch

    from recbole_llm import compat, registry
    from recbole_llm.quick_start import build

    compat.apply()
    config = torch.load(checkpoint, map_location="cpu", weights_only=False)["config"]
    config.compatibility_settings()  # what RecBole's Config.__init__ does for numpy>=1.24 (unpickling skips it)
    for key, value in {"eval_slices": True, "show_progress": False, "checkpoint_dir": str(saved),
                       "data_path": str(data_path / config["dataset"]), "use_gpu": False, "device": torch.device("cpu"),
                       "single_spec": True, "local_rank": 0}.items():
        config[key] = value
    registry.register_datasets()
    config, model, trainer, (train, _, test) = build(config["model"], config["dataset"], config=config)
    trainer.eval_collector.data_collect(train)
    return config, model, trainer, train, test


class RetrieverWithoutHistory(torch.nn.Module):
    """LlamaRec's retriever with the user's history excluded: LlamaRec's own candidates, lifted above the
    other items in the retriever's order (for k <= candidate_k, the retriever's full ranking minus history)."""

    def __init__(self, llamarec):
        super().__init__()
        self.llamarec = llamarec

    @torch.no_grad()
    def full_sort_predict(self, interaction):
        from recbole_llm.model.llamarec import two_stage_scores

        model = self.llamarec
        retrieval = model.retrieval_scores(interaction)
        candidates = model.top_candidates(retrieval, model.candidate_exclusion(interaction))
        return two_stage_scores(retrieval, candidates, retrieval.gather(1, candidates))


def base_of(name: str, config, model, trainer, train):
    """The ID base of an LLM model, built as the model builds it (stage 1 reused from its cache)."""
    if name == "LlamaRec":
        return RetrieverWithoutHistory(model)
    if name == "Laser":
        return model.id_model
    if name == "E4SRec":
        from recbole_llm.model.pretrained import pretrained_id_model

        return pretrained_id_model(config, train._dataset, config["id_model"] or "SASRec",
                                   checkpoint=config["id_model_checkpoint"], overrides=config["id_model_config"] or {},
                                   setting="id_model_checkpoint")
    if name == "SeRALM":
        return trainer.reference_model(train._dataset)
    raise ValueError(name)


def evaluate_pair(name: str, saved: Path, data_path: Path) -> dict:
    """Slices of ``name``'s newest checkpoint and of its base; raises FileNotFoundError without one."""
    from recbole.trainer import Trainer

    from recbole_llm.trainer.slices import sliced

    checkpoint = newest(saved, name)
    if checkpoint is None:
        raise FileNotFoundError(f"no {saved}/{name}-*.pth")
    start = time.perf_counter()
    config, model, trainer, train, test = setup(checkpoint, saved, data_path)
    result = trainer.evaluate(test, load_best_model=True, model_file=str(checkpoint), show_progress=False)
    record = {"model": name, "checkpoint": str(checkpoint), "base": PAIRS[name], "slices": {name: result["slices"]}}
    if name in ("LRURec",):
        base_checkpoint = newest(saved, "SASRec")
        if base_checkpoint is None:
            raise FileNotFoundError(f"no {saved}/SASRec-*.pth for LRURec's base")
        _, _, base_trainer, _, base_test = setup(base_checkpoint, saved, data_path)
        base_result = base_trainer.evaluate(base_test, load_best_model=True, model_file=str(base_checkpoint))
        record["base_checkpoint"] = str(base_checkpoint)
    else:
        base_trainer = sliced(Trainer)(config, base_of(name, config, model, trainer, train))
        base_trainer.eval_collector.data_collect(train)
        base_result = base_trainer.evaluate(test, load_best_model=False)
        if name == "LlamaRec":  # also the retriever as RecBole evaluates it (it may recommend history items)
            recbole_trainer = sliced(Trainer)(config, model.retriever)
            recbole_trainer.eval_collector.data_collect(train)
            record["slices"]["retriever as RecBole evaluates it"] = recbole_trainer.evaluate(test, load_best_model=False)["slices"]
    record["slices"]["base"] = base_result["slices"]
    record["seconds"] = time.perf_counter() - start
    record["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    record["machine"] = machine()
    record["command"] = results_doc.command()
    return record


def cell(m: dict) -> str:
    if "ndcg@10" not in m:
        return "-"
    se = f" ± {m['ndcg@10_se']:.4f}" if m.get("ndcg@10_se") is not None else ""
    return f"{m['ndcg@10']:.4f}{se}"


def pair_table(record: dict) -> str:
    ours, base = record["slices"][record["model"]], record["slices"]["base"]
    extra = {k: v for k, v in record["slices"].items() if k not in (record["model"], "base")}  # more bases, shown first
    rows = []
    for group, part in SLICE_ORDER:
        pick = (lambda slices: slices[group]) if part is None else (lambda slices: slices[group][part])
        m, b = pick(ours), pick(base)
        span = "{}-{}".format(*m["range"]) if "range" in m else ""
        ratio = f"{m['ndcg@10'] / b['ndcg@10']:.2f}" if m.get("ndcg@10") is not None and b.get("ndcg@10") else "-"
        rows.append([group if part is None else f"{group} {part}", m["users"], span,
                     *(cell(pick(other)) for other in extra.values()), cell(b), cell(m), ratio])
    header = ["slice", "users", "training interactions", *extra, f"base: {record['base']}", record["model"],
              "model / base"]
    return markdown_table(header, rows)


def earlier_blocks(results_file: Path) -> dict[str, str]:
    """Each pair's block ("### Model vs ...") in the current "slices" section, by model name."""
    text = results_file.read_text() if results_file.exists() else ""
    section_text = text.split("<!-- BEGIN slices -->")[-1].split("<!-- END slices -->")[0] if "<!-- BEGIN slices -->" in text else ""
    blocks = {}
    for block in section_text.split("\n### ")[1:]:
        name = block.split(" vs ")[0]
        if name in PAIRS:
            blocks[name] = "### " + block.split("\nTest NDCG@10 ± its standard error")[0].rstrip() + "\n"
    return blocks


def section(records: dict[str, dict], missing: dict[str, str], kept: dict[str, str] | None = None) -> str:
    """The section from the records, then the ``kept`` blocks of pairs measured earlier without a record here."""
    parts = []
    for name in [n for n in PAIRS if n in records or n in (kept or {})]:
        if name not in records:
            parts += [kept[name].rstrip(), "(Kept from the section as it was: this pair's record is not on this machine.)", ""]
            continue
        record = records[name]
        parts += [f"### {name} vs {record['base']}", "", pair_table(record), "",
                  f"Checkpoint `{Path(record['checkpoint']).name}`"
                  + (f", base `{Path(record['base_checkpoint']).name}`" if record.get("base_checkpoint") else "")
                  + f"; evaluated {record['date']} in {record['seconds'] / 60:.1f} min"
                  + (f" by `{record['command']}`" if record.get("command") else "") + ".", ""]
    if missing:
        parts += ["### Not measured yet", ""]
        parts += [f"- {name} vs {PAIRS[name]}: {why}. Without a checkpoint `saved/{name}-*.pth`, make one with "
                  f"`{MAKE[name]}`; then run `python benchmarks/slices.py --saved saved --models {name}`."
                  for name, why in missing.items()]
        parts.append("")
    parts.append(
        "Test NDCG@10 ± its standard error over the slice's users, from one full-ranking pass per model "
        "(`eval_slices`). Slices: the target item's popularity in the training split (cold: under 5 training "
        "interactions; tail / torso / head: a third of the other items' training interactions each) and the "
        "user's history (training interactions; short / medium / long: thirds of the users); 'training "
        "interactions' is the slice's range of that count. Each model with the settings saved in its checkpoint; "
        "its base on the same split. One run each: where the two standard errors overlap, the slice does not "
        "tell the models apart.")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saved", default="saved", help="checkpoint_dir of the runs (holds <Model>-*.pth, stage1/)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default="dataset", help="the folder holding <dataset>/ (as the runs saw it)")
    parser.add_argument("--models", default=",".join(PAIRS))
    parser.add_argument("--records", default="saved/slices", help="where each pair's record is written")
    parser.add_argument("--results_file", default=str(results_doc.RESULTS), help="the markdown file to write")
    args = parser.parse_args(argv)
    saved, data_path, folder = Path(args.saved).resolve(), Path(args.data_path).resolve(), Path(args.records)
    missing = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in PAIRS:
            raise SystemExit(f"slices.py: no base known for {name}; models: {', '.join(PAIRS)}")
        try:
            record = evaluate_pair(name, saved, data_path)
        except FileNotFoundError as error:
            print(f"{name}: not measured ({error})", flush=True)
            continue
        write_record(folder / f"{name}.json", record)
        print(f"{name}: done in {record['seconds'] / 60:.1f} min", flush=True)
    records = {n: r for n in PAIRS if (r := load_record(folder / f"{n}.json"))}
    kept = {n: block for n, block in earlier_blocks(Path(args.results_file)).items()
            if n not in records and "Not measured yet" not in block}
    for name in PAIRS:
        if name not in records and name not in kept:
            missing[name] = "not measured yet"
    body = section(records, missing, kept)
    write_section("slices", f"Where each model helps: NDCG@10 by slice against its ID base ({args.dataset})", body,
                  results=Path(args.results_file))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
