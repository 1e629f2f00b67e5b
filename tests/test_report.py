"""benchmarks/report.py: one process and one record per model, reuse, failures recorded, tables and chart."""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import report

    return report


def test_report_runs_reuses_and_records_failures(tiny_data, tmp_path, report, capsys):
    name, overrides = tiny_data
    settings = [f"--{key}={json.dumps(value)}" for key, value in {**overrides, "epochs": 1}.items()]
    results = tmp_path / "docs" / "RESULTS.md"
    argv = ["--dataset", name, "--models", "LRURec,SASRec,SeRALM,NoSuchModel", f"--report_dir={tmp_path / 'rep'}",
            f"--results_file={results}", *settings]

    assert report.main(argv) == 0
    folder = tmp_path / "rep" / name
    records = {m: json.loads((folder / f"{m}.json").read_text()) for m in ("LRURec", "SASRec", "SeRALM", "NoSuchModel")}
    for model in ("LRURec", "SASRec"):
        record = records[model]
        assert record["status"] == "ok", record.get("traceback")
        assert {"recall@5", "mrr@10", "ndcg@10"} <= set(record["test_result"])
        assert record["trainable_params"] > 0 and record["total_params"] >= record["trainable_params"]
        assert record["peak_rss_mb"] > 0 and record["eval_users_per_s"] > 0 and record["test_users"] == 40
        assert record["settings_hash"] and record["date"] and "report.py --one" in record["command"]
    # SeRALM needs a knowledge cache the tiny dataset lacks: refused at once, not generated.
    assert records["SeRALM"]["status"] == "error" and "knowledge" in records["SeRALM"]["error"]
    assert "--allow_generation" in records["SeRALM"]["error"]
    assert not (tmp_path / "data" / name / "knowledge").exists() or not any((tmp_path / "data" / name / "knowledge").glob("*.jsonl"))
    assert records["NoSuchModel"]["status"] == "error" and "Unknown model" in records["NoSuchModel"]["error"]
    first = capsys.readouterr().out
    assert "LRURec: running" in first and "SASRec: running" in first

    # Second invocation: the two results are reused untouched (same run_id, same bytes); failures are retried.
    before = {m: (folder / f"{m}.json").read_text() for m in ("LRURec", "SASRec")}
    assert report.main(argv) == 0
    second = capsys.readouterr().out
    assert "LRURec: reused" in second and "SASRec: reused" in second and "SeRALM: running" in second
    assert {m: (folder / f"{m}.json").read_text() for m in ("LRURec", "SASRec")} == before

    # A changed setting for one model runs that model again, and only it.
    two = [a if not a.startswith("LRURec,") else "LRURec,SASRec" for a in argv]
    assert report.main(two + ["--SASRec.hidden_size=32"]) == 0
    third = capsys.readouterr().out
    assert "LRURec: reused" in third and "SASRec: settings changed" in third
    assert json.loads((folder / "SASRec.json").read_text())["run_id"] != records["SASRec"]["run_id"]
    assert (folder / "LRURec.json").read_text() == before["LRURec"]

    # Tables only: nothing runs, the section is rebuilt from the records.
    seralm = (folder / "SeRALM.json").read_text()
    assert report.main(["--dataset", name, "--tables_only", f"--report_dir={tmp_path / 'rep'}", f"--results_file={results}"]) == 0
    assert "running" not in capsys.readouterr().out.split("### Quality")[0]
    assert (folder / "SeRALM.json").read_text() == seralm

    text = results.read_text()
    section = text.split("<!-- BEGIN report -->")[1].split("<!-- END report -->")[0]
    quality = section.split("### Quality")[1].split("### Cost")[0]
    cost = section.split("### Cost")[1].split("### Relative gain")[0]
    gains = section.split("### Relative gain")[1]
    for model in ("LRURec", "SASRec", "SeRALM", "NoSuchModel"):
        assert f"| {model} |" in quality and f"| {model} |" in cost
    assert "not run: MissingInputError" in quality and "not run: InputError: Unknown model" in quality
    assert "| SASRec |" in quality and "1.000" in quality  # the NDCG@10 / SASRec column
    assert "| LRURec | SASRec |" in gains and "+35.1%" in gains  # paper: LlamaRec Table 1, 0.0705 / 0.0522
    assert "| SeRALM | SASRec | not run | +2.9% |" in gains
    png = results.parent / f"report-{name}-ndcg10.png"
    assert f"](report-{name}-ndcg10.png)" in section
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_child_crash_is_recorded_by_the_parent(tiny_data, tmp_path, report, monkeypatch):
    """A model process that dies without writing its record still leaves a failure record."""
    name, overrides = tiny_data
    monkeypatch.setattr(report, "child_command", lambda *a, **k: ["python", "-c", "raise SystemExit(3)"])
    monkeypatch.setattr(report, "settings_hash", lambda *a, **k: "h")
    record = report.run_model("SASRec", name, [], tmp_path / "rep", rerun=False, allow_generation=False,
                              timeout_minutes=None)
    assert record["status"] == "error" and "exit code 3" in record["error"]
    assert json.loads((tmp_path / "rep" / name / "SASRec.json").read_text())["error"] == record["error"]


def test_a_record_measured_before_the_models_last_change_runs_again(tiny_data, tmp_path, report, monkeypatch):
    """Incremental means what changed since is rerun: the same settings on code without the model's last change
    (status.CHANGES) do not count as measured."""
    name, _ = tiny_data
    runs = []
    monkeypatch.setattr(report, "settings_hash", lambda *a, **k: "h")
    monkeypatch.setattr(report, "child_command", lambda *a, **k: runs.append(a[0]) or ["python", "-c", "pass"])
    monkeypatch.setattr(report, "CHANGES", {"E4SRec": ("c1", "its last change")})
    monkeypatch.setattr(report, "is_current", lambda model, record: record["commit"] == "after")
    path = tmp_path / "rep" / name / "E4SRec.json"
    for code, expected in (("after", []), ("before", ["E4SRec"])):
        report.write_record(path, {"model": "E4SRec", "status": "ok", "settings_hash": "h", "code": code,
                                   "date": "2026-12-01 00:00:00 UTC", "test_result": {"ndcg@10": 0.1}})
        report.run_model("E4SRec", name, [], tmp_path / "rep", rerun=False, allow_generation=False, timeout_minutes=None)
        assert runs == expected


def test_baselines_run_with_the_reports_epochs_and_casers_own_history_length(tmp_path, report, monkeypatch):
    """RecBole baselines get BASELINE_EPOCHS and Caser its paper's L = 5 (at RecBole's 50 an epoch takes over 20
    minutes on one thread), unless the command line sets them; our models get neither."""
    given = {}
    monkeypatch.setattr(report, "run_model", lambda model, dataset, overrides, *a, **k: given.update({model: overrides}))
    monkeypatch.setattr(report, "assemble", lambda *a, **k: "")
    argv = ["--models", "Caser,SASRec,LRURec", f"--report_dir={tmp_path}", f"--results_file={tmp_path / 'R.md'}"]
    assert report.main(argv) == 0
    assert given == {"Caser": ["--epochs=8", "--MAX_ITEM_LIST_LENGTH=5"], "SASRec": ["--epochs=8"], "LRURec": []}
    assert report.main(argv + ["--Caser.MAX_ITEM_LIST_LENGTH=10", "--epochs=2"]) == 0
    assert given["Caser"] == ["--epochs=2", "--MAX_ITEM_LIST_LENGTH=10"] and given["LRURec"] == ["--epochs=2"]


def test_paper_gains_match_the_papers(report):
    """Each gain against the percentage the paper prints (SeRALM's Table 1); the LlamaRec paper prints its
    NDCG@10 values only, so its entry has nothing independent to be checked against."""
    assert report.PAPER_GAINS[("SeRALM", "SASRec")].gain == pytest.approx(0.0288, abs=1e-3)  # Table 1: +2.91%
    assert report.PAPER_GAINS[("SeRALM", "LightSANs")].gain == pytest.approx(0.0249, abs=1e-3)  # +2.50%
    assert report.PAPER_GAINS[("SeRALM", "Caser")].gain == pytest.approx(0.0260, abs=1e-3)  # +2.61%
    assert "E4SRec" in report.NO_PAPER_GAIN and "Laser" in report.NO_PAPER_GAIN


def _seralm_config(tiny_data, **settings):
    from recbole_llm.quick_start import load_config

    name, overrides = tiny_data
    config = load_config("SeRALM", name, config_dict=overrides)
    for key, value in settings.items():
        config[key] = value
    return config


def test_seralm_alignment_that_would_regenerate_knowledge_is_refused(tiny_data, tmp_path, report):
    """The report asks SeRALM's trainer for its dry run (``generation_needed``), the decision its fit takes."""
    from recbole_llm.trainer.alignment import SeRALMTrainer

    class FakeTrainer(SeRALMTrainer):
        def __init__(self, config):  # the decision needs the config and the adapter folder only
            self.config = config

        def alignment_dir(self):
            return tmp_path / "aligned-SASRec-x"

    assert report.alignment_needs_generation(FakeTrainer(_seralm_config(tiny_data, alignment_iterations=0))) is None
    config = _seralm_config(tiny_data, alignment_iterations=20, llm_adapter="dir")
    assert report.alignment_needs_generation(FakeTrainer(config)) is None
    config = _seralm_config(tiny_data, alignment_iterations=20)
    reason = report.alignment_needs_generation(FakeTrainer(config))
    assert "--allow_generation" in reason and "alignment_iterations=0" in reason
    adapter = tmp_path / "aligned-SASRec-x"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"q.lora_A.weight": torch.ones(2, 2), "q.lora_B.weight": torch.ones(2, 2)},
              str(adapter / "adapter_model.safetensors"))
    reason = report.alignment_needs_generation(FakeTrainer(config))  # cached adapter, its knowledge not
    assert "is cached but the knowledge it generates is not" in reason and "--allow_generation" in reason
    from recbole_llm.knowledge.generation import adapter_dir_fingerprint, knowledge_cache_for

    final = knowledge_cache_for(config, config["dataset"], adapter_dir_fingerprint(adapter)).final
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_text("{}\n")
    assert report.alignment_needs_generation(FakeTrainer(config)) is None
    assert report.alignment_needs_generation(object()) is None  # not SeRALM's trainer


def test_seralm_without_its_knowledge_cache_is_refused_before_it_is_built(tiny_data, report):
    from recbole_llm.knowledge.generation import knowledge_cache_for

    config = _seralm_config(tiny_data)
    assert "python -m recbole_llm.knowledge.generation --dataset tiny" in report.knowledge_missing(config)
    final = knowledge_cache_for(config, "tiny", None).final
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_text("{}\n")
    assert report.knowledge_missing(config) is None
    final.with_name(final.stem + ".part-0of1.jsonl").write_text("{}\n")  # an unfinished generation
    assert report.knowledge_missing(config) is not None
    assert report.knowledge_missing({"model": "SASRec"}) is None


def test_seralm_section_grows_one_base_model_at_a_time(monkeypatch):
    """benchmarks/seralm.py: each base model's runs are their own record; the section shows all of them,
    averaging a base model's extra seeds with its main run."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seralm

    def record(base, hits, overrides=None, seed=None):
        variants = {label: {"hit@10": hit, "ndcg@10": hit / 2, "minutes": 1.0, "alignment": {}}
                    for label, hit in zip(seralm.VARIANTS, hits)}
        return {"base": base, "overrides": overrides or {}, "measured": "2026-01-01 00:00 UTC", "machine": "m",
                "command": f"python benchmarks/seralm.py --models {base}", "variants": variants, "test_users": 100,
                "latency_ms": {"base": 10.0, "seralm": 12.0}, "seed": seed, "llm_adapter": "aligned-x"}

    records = {"SASRec": [record("SASRec", (0.10, 0.11, 0.12))],
               "Caser": [record("Caser", (0.20, 0.18, 0.15), {"MAX_ITEM_LIST_LENGTH": 5})]}
    body = seralm.section_body("ml-100k", records, timing=None)
    assert ("- SeRALM(SASRec) / SASRec HIT@10, mean over 1 seed: 1.200 (one run: no standard error); "
            "aligned / un-aligned: 1.091 (goal >= 1.03);") in body
    assert "- SeRALM(Caser) / Caser HIT@10, mean over 1 seed: 0.750 (one run: no standard error); aligned / un-aligned: 0.833;" in body
    assert "| Caser | Base+SeRALM | 1 | 15.00 | 7.50 | 15.00 | 1.0 |" in body and "| SASRec | 10.00 | 12.00 | 1.20 |" in body
    assert "about 3.0 points" in body  # sqrt(0.1 * 0.9 / 100)
    assert '- Caser: measured 2026-01-01 00:00 UTC, overrides {"MAX_ITEM_LIST_LENGTH": 5}' in body
    assert "Timings: not measured yet." in body
    assert "Alignment of" not in body  # no trace recorded: no curve
    trace = [{"iteration": i, "advantage": 0.1 * i, "advantage_std": 0.5, "kl": 0.01 * i, "importance": 1.0,
              "clipped": 0.0, "json_share": 0.75, "ratio": 0.6} for i in range(1, 26)]
    records["SASRec"][0]["variants"]["Base+SeRALM"]["alignment_trace"] = trace
    curve = seralm.section_body("ml-100k", records, timing=None).split("Alignment of SeRALM(SASRec)")[1]
    assert "main run (25 iterations" in curve
    assert "| 1-3 | +0.2000 | 0.5000 | 0.0200 | 1.000 | 0.000 | 0.75 | 0.600 |" in curve  # spans of 3: the means
    assert "| 25-25 |" not in curve and "| 25 | +2.5000 |" in curve
    del records["SASRec"][0]["variants"]["Base+SeRALM"]["alignment_trace"]
    assert "by slice" not in body  # no run with slices: no table
    slices = {f"ndcg@10 {name}": 0.01 * k for k, name in enumerate(("cold", "tail", "torso", "head", "short", "medium", "long"))}
    records["Caser"][0]["variants"]["Base"]["slices"] = slices
    sliced = seralm.section_body("ml-100k", records, timing=None).split("by slice")[1]
    assert "| base model | variant | runs | cold | tail | torso | head | short | medium | long |" in sliced
    assert "| Caser | Base | 1 | 0.00 | 1.00 | 2.00 | 3.00 | 4.00 | 5.00 | 6.00 |" in sliced and "| SASRec |" not in sliced
    del records["Caser"][0]["variants"]["Base"]["slices"]
    assert seralm.record_file("ml-100k", "Caser").parts[-3:] == ("seralm", "ml-100k", "Caser.json")

    records["SASRec"] += [record("SASRec", (0.12, 0.10, 0.14), seed=2021), record("SASRec", (0.14, 0.12, 0.16), seed=2022)]
    body = seralm.section_body("ml-100k", records, timing=None)
    # HIT@10 of Base over the seeds: 10, 12, 14 -> 12.00 ± 2.00; Base+SeRALM: 12, 14, 16 -> 14.00 ± 2.00
    assert "| SASRec | Base | 3 | 12.00 ± 2.00 | 6.00 ± 1.00 | 10.00 / 12.00 / 14.00 | 1.0 |" in body
    assert "| SASRec | Base+SeRALM | 3 | 14.00 ± 2.00 |" in body
    assert ("- SeRALM(SASRec) / SASRec HIT@10, mean over 3 seeds: 1.170 (standard error 0.017); aligned / un-aligned: "
            "1.273 (goal >= 1.03). Per run: 1.200, 1.167, 1.143;") in body  # ratios per seed; HIT@10 14 / 11
    assert "  - seed 2022: measured 2026-01-01 00:00 UTC" in body and "(llm_adapter=aligned-x)" in body
    stopped = {**records["SASRec"][1], "seed": 2023, "unfinished": ["Base", "Base+NA_LLM"],  # interrupted: left out
               "variants": {"Base+SeRALM": records["SASRec"][1]["variants"]["Base+SeRALM"]}}
    with_stopped = seralm.section_body("ml-100k", {**records, "SASRec": [*records["SASRec"], stopped]}, None)
    assert ("- SASRec: seed 2023 was stopped before Base, Base+NA_LLM finished: left out until its command continues "
            "it") in with_stopped
    assert "mean over 3 seeds: 1.170 (standard error 0.017)" in with_stopped  # the finished seeds' comparison
    assert seralm.record_file("ml-100k", "SASRec", 2021).name == "SASRec-seed2021.json"


def test_seralm_fields_control_joins_a_finished_record_and_its_own_line(monkeypatch):
    """``--fields_control``: a finished record gains only Base+Fields (SeRALM with knowledge_source: fields, no
    alignment), keeping the date, machine and command of the paper's variants; the section gives the control
    its row and its line, and a run stopped before the control alone is still compared.

    Caught: the finished record run again whole, the control trained with the LLM's knowledge or aligned, the
    record's provenance replaced by the control's, a missing control counted as an interrupted run."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seralm

    calls = []

    def fake_train_and_test(model, dataset, config_dict):
        calls.append((model, config_dict))
        return {"hit@10": 0.125, "ndcg@10": 0.0625}, object(), None, SimpleNamespace(_dataset=range(100)), 2.0

    monkeypatch.setattr(seralm, "train_and_test", fake_train_and_test)
    monkeypatch.setattr(seralm, "latency", lambda net, test: 0.01)
    monkeypatch.setattr(seralm, "slice_columns", lambda result: {})
    shared, own = {"epochs": 8}, {"MAX_ITEM_LIST_LENGTH": 5}
    variants = {label: {"hit@10": hit, "ndcg@10": hit / 2, "minutes": 1.0, "alignment": {}, "test_users": 100,
                        "latency_ms": 10.0} for label, hit in zip(seralm.VARIANTS, (0.10, 0.11, 0.14))}
    earlier = {"base": "Caser", "overrides": own, "settings": seralm.run_settings(shared, own, None), "seed": None,
               "measured": "2026-01-01 00:00 UTC", "machine": "xeon", "commit": "abc", "command": "old command",
               "variants": variants, "test_users": 100, "latency_ms": {"base": 10.0, "seralm": 12.0}}
    record = seralm.run_base("Caser", "ml-100k", shared, own, None, earlier=earlier,
                             variants_wanted=seralm.wanted(True), how={"command": "new command"})
    assert len(calls) == 1 and calls[0][0] == "SeRALM"
    assert calls[0][1]["knowledge_source"] == "fields" and calls[0][1]["alignment_iterations"] == 0
    assert "llm_adapter" not in calls[0][1] and calls[0][1]["MAX_ITEM_LIST_LENGTH"] == 5
    assert (record["measured"], record["machine"], record["command"]) == ("2026-01-01 00:00 UTC", "xeon", "old command")
    control = record["variants"][seralm.FIELDS]
    assert control["command"] == "new command" and control["measured"].endswith(" UTC") and control["machine"] != "xeon"
    assert record["variants"]["Base"] == {**variants["Base"], "measured": "2026-01-01 00:00 UTC", "machine": "xeon",
                                          "commit": "abc", "command": "old command"} and "unfinished" not in record

    body = seralm.section_body("ml-100k", {"Caser": [{**record, "unfinished": []}]}, timing=None)
    assert "| Caser | Base+Fields | 1 | 12.50 | 6.25 | 12.50 | 2.0 |" in body
    assert ("  - Control without the LLM (`knowledge_source: fields`: each item's own fields as its knowledge text), "
            "1 seed: Base+Fields / Caser HIT@10 1.250; SeRALM / Base+Fields 1.120") in body
    assert f"  - seed main, Base+Fields: measured {control['measured']}; `new command`;" in body
    assert record["variants"]["Base"]["machine"] == "xeon" and "seed main, Base:" not in body
    stopped_before_control = {**earlier, "unfinished": [seralm.FIELDS]}
    body = seralm.section_body("ml-100k", {"Caser": [stopped_before_control]}, timing=None)
    assert "SeRALM(Caser) / Caser HIT@10, mean over 1 seed: 1.400" in body and "no comparison" not in body
    assert "Base+Fields" not in body


def test_seralm_variants_stamp_the_machine_when_they_end(monkeypatch):
    """Each variant's machine (its "load average at the end of the run") is read when that variant ends, the
    record's is the last one's, and the variants of one call still share one provenance line.

    Caught: the machine read once when the call starts (a run that began beside another job but ended alone shows
    the start's load), a line per variant of the same call."""
    from itertools import count
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seralm

    reads = count()
    monkeypatch.setattr(seralm, "machine", lambda: f"cpu; load {next(reads)}")
    monkeypatch.setattr(seralm, "train_and_test", lambda model, dataset, config_dict: (
        {"hit@10": 0.125, "ndcg@10": 0.0625}, object(), None, SimpleNamespace(_dataset=range(100)), 2.0))
    monkeypatch.setattr(seralm, "latency", lambda net, test: 0.01)
    monkeypatch.setattr(seralm, "slice_columns", lambda result: {})
    saved = []
    record = seralm.run_base("Caser", "ml-100k", {"epochs": 8}, {}, None, save=saved.append, how={"command": "cmd"})
    loads = [record["variants"][label]["machine"] for label in ("Base+SeRALM", "Base", "Base+NA_LLM")]
    assert loads == ["cpu; load 1", "cpu; load 2", "cpu; load 3"] and record["machine"] == "cpu; load 3"
    assert [partial["machine"] for partial in saved] == ["cpu; load 1", "cpu; load 2"]
    body = seralm.section_body("ml-100k", {"Caser": [{**record, "unfinished": []}]}, timing=None)
    assert f"- Caser: measured {record['measured']}; `cmd`; cpu; load 3" in body and "seed main, Base" not in body


def test_seralm_extra_seeds_find_the_main_runs_adapter_by_the_knowledge_it_generated(monkeypatch, tmp_path):
    """An extra seed trains on the knowledge of the main run's aligned adapter: the adapter whose fingerprint that
    knowledge's meta names, wherever it was aligned, not the one this machine's alignment key would name (the key
    holds the LLM's precision: bf16 autocast on a CPU with bf16 units, float32 elsewhere). Without a match, the
    key's. Caught: the adapter looked up by this machine's key only (an AVX2-only CPU then found none)."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seralm

    folder = tmp_path / "knowledge"
    for seed, name in enumerate(("aligned-Caser-aaa", "aligned-Caser-bbb", "aligned-SASRec-ccc")):
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_config.json").write_text("{}")
        generator = torch.Generator().manual_seed(seed)
        save_file({f"layers.0.q_proj.lora_{part}.weight": torch.randn(2, 2, generator=generator) for part in "AB"},
                  str(folder / name / "adapter_model.safetensors"))
    (folder / "knowledge-k.meta.json").write_text(json.dumps({"adapter": seralm.adapter_dir_fingerprint(
        folder / "aligned-Caser-bbb")}))
    main = {"variants": {"Base+SeRALM": {"alignment": {"knowledge_file": str(folder / "knowledge-k.jsonl")}}}}

    class ByThisMachinesKey(Exception):
        pass

    def build(*args, **kwargs):
        raise ByThisMachinesKey

    monkeypatch.setattr(seralm, "build", build)
    assert seralm.aligned_adapter("Caser", "ml-100k", {}, main) == folder / "aligned-Caser-bbb"
    with pytest.raises(ByThisMachinesKey):  # no adapter of that base generated it
        seralm.aligned_adapter("LightSANs", "ml-100k", {}, main)
    with pytest.raises(ByThisMachinesKey):  # a main record from before the knowledge file was recorded
        seralm.aligned_adapter("Caser", "ml-100k", {}, {"variants": {"Base+SeRALM": {"alignment": {}}}})


def test_seralm_extra_seed_records_are_found_in_seed_order(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seralm

    monkeypatch.setattr(seralm, "RECORDS", tmp_path)
    for seed in (2022, 7):
        seralm.write_record(seralm.record_file("ml-100k", "SASRec", seed), {"base": "SASRec", "seed": seed})
    seralm.write_record(seralm.record_file("ml-100k", "SASRec"), {"base": "SASRec", "seed": None})  # the main run
    seralm.write_record(seralm.record_file("ml-100k", "Caser", 9), {"base": "Caser", "seed": 9})
    (tmp_path / "ml-100k" / "SASRec-seed5.json").write_text('{"base": "SAS')  # half-written: not a record
    assert [record["seed"] for record in seralm.seed_records("ml-100k", "SASRec")] == [7, 2022]


def test_laser_seeds_table_gives_each_ratio_their_mean_and_standard_error(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import laser

    stats = {"valid": [0.06, 0.05], "phase_1": True, "losses": [(5.6, 0.012)], "kept": "phase 1",
             "llm_off": {"ndcg@10": 0.044}}
    runs = [(1, {"ndcg@10": 0.05}, {"ndcg@10": 0.045}, stats), (2, {"ndcg@10": 0.04}, {"ndcg@10": 0.04}, stats),
            (3, {"ndcg@10": 0.05}, {"ndcg@10": 0.055}, stats)]
    table = laser.seeds_table(runs)
    assert "| 1 | 0.0500 | 0.0450 | 0.900 | phase 1 | 0.0440 | phase 1 0.0600, epoch 1 0.0500" in table
    assert "| 3 | 0.0500 | 0.0550 | 1.100 |" in table and "CE + 0.01 x balance: 5.600 + 0.012" in table
    # ratios 0.9, 1.0, 1.1: mean 1.000, sample sd 0.1, standard error 0.1 / sqrt(3) = 0.058
    assert "Laser (residual) / SASRec NDCG@10, mean over 3 seeds: 1.000 (standard error 0.058); goal >= 1." in table
    assert "standard error" not in laser.seeds_table(runs[:1])  # one run: no standard error to give


def _sliced_record(model, ndcg, cold_ndcg):
    part = lambda users, value, lo, hi: {"users": users, "range": [lo, hi], "ndcg@10": value, "ndcg@10_se": 0.01}  # noqa: E731
    slices = {"all": {"users": 40, "ndcg@10": ndcg},
              "popularity": {"cold": part(4, cold_ndcg, 0, 4), "tail": part(12, 0.1, 5, 9),
                             "torso": part(12, 0.2, 10, 20), "head": part(12, 0.3, 21, 90)},
              "history": {"short": part(13, 0.11, 6, 8), "medium": part(13, 0.22, 9, 12), "long": part(14, 0.33, 13, 30)}}
    return {"model": model, "status": "ok", "test_result": {"ndcg@10": ndcg}, "slices": slices, "date": "2026-11-30 14:00",
            "setup_seconds": 1, "fit_seconds": 2, "eval_users_per_s": 3, "peak_rss_mb": 4, "trainable_params": 5,
            "total_params": 6, "machine": "m, 1 thread,", "load_average": 0.5, "overrides": {}}


def test_report_has_a_slice_table_and_a_chart_per_slice(tmp_path, report):
    folder = tmp_path / "rep" / "tiny"
    folder.mkdir(parents=True)
    (folder / "SASRec.json").write_text(json.dumps(_sliced_record("SASRec", 0.05, 0.0123)))
    (folder / "LRURec.json").write_text(json.dumps(_sliced_record("LRURec", 0.06, 0.0456)))
    old = {"model": "GRU4Rec", "status": "ok", "test_result": {"ndcg@10": 0.04}, "date": "2026-11-29 10:00",
           "setup_seconds": 1, "fit_seconds": 2, "eval_users_per_s": 3, "peak_rss_mb": 4, "trainable_params": 5,
           "total_params": 6, "machine": "m", "overrides": {}}  # a record made before eval_slices
    (folder / "GRU4Rec.json").write_text(json.dumps(old))
    results = tmp_path / "docs" / "RESULTS.md"
    body = report.assemble("tiny", tmp_path / "rep", results, [])
    table = body.split("### Quality by slice")[1].split("![")[0]
    assert "| model | popularity cold | popularity tail |" in table and "history long |" in table
    assert "| LRURec | 0.0456 ± 0.0100 |" in table and "| SASRec | 0.0123 ± 0.0100 |" in table
    assert "| GRU4Rec |" not in table
    assert "| users | 4 | 12 | 12 | 12 | 13 | 13 | 14 |" in table
    assert "| training interactions | 0-4 | 5-9 |" in table
    png = results.parent / "report-tiny-slices.png"
    assert "](report-tiny-slices.png)" in body and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slices_benchmark_compares_a_checkpoint_with_its_base(tiny_data, tmp_path, monkeypatch):
    """benchmarks/slices.py on checkpoints of a tiny run: LRURec vs SASRec by slice; the pairs
    without a checkpoint are listed with the command that makes one."""
    from recbole_llm.quick_start import run_recbole_llm

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import slices

    name, overrides = tiny_data
    tests = {model: run_recbole_llm(model, name, config_dict={**overrides, "epochs": 1})["test_result"]
             for model in ("SASRec", "LRURec")}
    results = tmp_path / "docs" / "RESULTS.md"
    assert slices.main(["--saved", overrides["checkpoint_dir"], "--dataset", name, "--models", "LRURec",
                        "--data_path", overrides["data_path"], "--records", str(tmp_path / "records"),
                        "--results_file", str(results)]) == 0
    record = json.loads((tmp_path / "records" / "LRURec.json").read_text())
    assert record["slices"]["LRURec"]["all"]["users"] == record["slices"]["base"]["all"]["users"] == 40
    assert Path(record["base_checkpoint"]).name.startswith("SASRec-")
    # the saved checkpoints give the runs' own test metrics, each from its own checkpoint
    assert record["slices"]["LRURec"]["all"]["ndcg@10"] == tests["LRURec"]["ndcg@10"]
    assert record["slices"]["base"]["all"]["ndcg@10"] == tests["SASRec"]["ndcg@10"]
    text = results.read_text().split("<!-- BEGIN slices -->")[1]
    table = text.split("### LRURec vs SASRec")[1].split("###")[0]
    for row in ("| all | 40 |", "| popularity cold |", "| history long |"):
        assert row in table
    assert f"| {record['slices']['LRURec']['all']['ndcg@10']:.4f} ± " in table
    assert "Laser vs SASRec (its stage 1): not measured yet" in text and "python benchmarks/laser.py" in text
    # a pair measured earlier whose record is gone keeps its table; the others stay listed as not measured
    (tmp_path / "records" / "LRURec.json").unlink()
    assert slices.main(["--saved", str(tmp_path / "empty"), "--dataset", name, "--models", "LRURec",
                        "--data_path", overrides["data_path"], "--records", str(tmp_path / "records"),
                        "--results_file", str(results)]) == 0
    kept = results.read_text().split("<!-- BEGIN slices -->")[1]
    assert table.strip() in kept and "record is not on this machine" in kept
    assert "Laser vs SASRec (its stage 1): not measured yet" in kept


def test_a_new_results_section_goes_after_its_family(tmp_path, monkeypatch):
    """``write_between_markers``: a block is replaced in place; a new one follows the block whose name
    its own extends (``laser_paper`` after ``laser``), else it goes at the end."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from results_doc import write_between_markers

    doc = tmp_path / "RESULTS.md"
    doc.write_text("# R\n\n<!-- BEGIN laser -->\nA\n<!-- END laser -->\n\n## SeRALM\n")
    write_between_markers(doc, "laser_paper", "P")
    write_between_markers(doc, "other", "O")
    write_between_markers(doc, "laser", "A2")
    text = doc.read_text()
    assert text.index("A2") < text.index("<!-- BEGIN laser_paper -->") < text.index("## SeRALM") < text.index("O")
    assert text.count("<!-- BEGIN laser") == 2 and "\nA\n" not in text


def test_seralm_runs_are_reused_continued_and_kept_apart_by_their_settings(monkeypatch, tmp_path):
    """benchmarks/seralm.py: a finished record with the same settings is reused, an interrupted one continued
    from its last finished variant, and a run with other settings writes a family of records of its own."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import seralm

    monkeypatch.setattr(seralm, "RECORDS", tmp_path)
    monkeypatch.setattr(seralm, "latency", lambda net, test: 0.01)
    monkeypatch.setattr(seralm, "write_section", lambda *args: None)
    runs, stop_after = [], [None]

    def train_and_test(model, dataset, config_dict):
        if len(runs) == stop_after[0]:
            raise KeyboardInterrupt
        runs.append((model, config_dict.get("alignment_iterations"), config_dict.get("resample_items")))
        trainer = SimpleNamespace(alignment_stats={}, alignment_trace=[])
        return {"hit@10": 0.1, "ndcg@10": 0.05}, trainer, None, SimpleNamespace(_dataset=[0] * 100), 1.0

    monkeypatch.setattr(seralm, "train_and_test", train_and_test)

    def main(*args):
        monkeypatch.setattr(sys, "argv", ["seralm.py", "--models", "SASRec", "--timing", "no", *args])
        seralm.main()

    stop_after[0] = 1  # interrupted after Base+SeRALM
    with pytest.raises(KeyboardInterrupt):
        main()
    assert seralm.load_record(tmp_path / "ml-100k" / "SASRec.json")["unfinished"] == ["Base", "Base+NA_LLM"]
    stop_after[0] = None
    main()  # continued: the two variants left
    assert [model for model, _, _ in runs] == ["SeRALM", "SASRec", "SeRALM"] and runs[2][1] == 0
    record = seralm.load_record(tmp_path / "ml-100k" / "SASRec.json")
    assert "unfinished" not in record and set(record["variants"]) == set(seralm.VARIANTS)
    main("--num_threads=2")  # a neutral setting: the same record, reused
    assert len(runs) == 3
    main("--resample_items=['target','history']")  # another setting: a family of its own
    assert len(runs) == 6 and runs[-3][2] == ["target", "history"]
    assert list(seralm.families("ml-100k")) == ["SASRec", "SASRec (resample_items=['target', 'history'])"]
    assert seralm.load_record(tmp_path / "ml-100k" / "SASRec.json")["settings"] == record["settings"]


def test_llamarec_gain_is_over_its_retriever_under_the_same_history_rule(report):
    """LlamaRec's candidates leave out the user's history; the retriever's own row may recommend history items,
    so the gain uses the retriever measured in LlamaRec's run under LlamaRec's rule, and none without it."""
    def record(ndcg, **extra):
        return {"status": "ok", "test_result": {"ndcg@10": ndcg}, **extra}

    records = {"LlamaRec": record(0.10), "LRURec": record(0.06)}
    row = report.gain_rows(records)[0]
    assert row["ours"] is None and "not comparable with LRURec's row" in row["note"]
    records["LlamaRec"] = record(0.10, base_result={"ndcg@10": 0.08})
    row = report.gain_rows(records)[0]
    assert row["ours"] == pytest.approx(0.25) and row["base"] == "LRURec, history excluded"
    assert row["paper"] == pytest.approx(report.PAPER_GAINS[("LlamaRec", "LRURec")].gain)  # the paper's, history excluded
