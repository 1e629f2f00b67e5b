"""benchmarks/llamarec_curve.py: one run per call as a record, reused by a later call with the same
settings; the section's summary pools the seeds of a setting; a bad setting stops before any training."""
import json
import statistics
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def curve(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import llamarec_curve

    return llamarec_curve


def _argv(tiny_data, tiny_llama_dir, tmp_path, **extra):
    name, overrides = tiny_data
    settings = {**overrides, "llm_path": str(tiny_llama_dir), "candidate_k": 5, "retriever_config": {"epochs": 1},
                "ranker_max_train_examples": 8, "ranker_eval_step": 1, "ranker_valid_users": 8,
                "fusion_weights": [0.0, 1.0], "ranker_train_candidates": "retriever", **extra}
    return ["--dataset", name, "--records", str(tmp_path / "records"), "--results", str(tmp_path / "RESULTS.md"),
            *(f"--{key}={json.dumps(value)}" for key, value in settings.items())]


def test_a_curve_point_is_a_record_reused_and_pooled_over_seeds(curve, tiny_data, tiny_llama_dir, tmp_path, monkeypatch):
    curve.main(_argv(tiny_data, tiny_llama_dir, tmp_path))
    [path] = (tmp_path / "records").glob("*.json")
    first = json.loads(path.read_text())
    numbers = first["numbers"]
    assert first["settings"]["ranker_train_candidates"] == "retriever" and first["settings"]["seed"] == 2020
    assert numbers["ratio"]["fusion"] == pytest.approx(
        numbers["test"]["fusion"]["ndcg@10"] / numbers["test"]["retriever_excluded"]["ndcg@10"])
    assert numbers["validation"] and all(c["users"] > 0 and c["se"] >= 0 for c in numbers["validation"])
    tokens = numbers["prompt_tokens"]  # the test prompts' lengths (issue: a leaner prompt, chosen by measurement)
    assert 0 < tokens["mean"] <= tokens["max"] and tokens["p95"] <= tokens["max"]

    def no_run(*args, **kwargs):
        raise AssertionError("a record with the same settings must be reused")

    monkeypatch.setattr(curve, "measure", no_run)
    curve.main(_argv(tiny_data, tiny_llama_dir, tmp_path))  # reused: no second run

    fusion, ranker = [numbers["ratio"]["fusion"]], [numbers["ratio"]["ranker"]]
    for seed, shift in ((7, 0.2), (8, 0.05)):  # two more seeds, their runs stood in for
        other = {**numbers, "ratio": {"ranker": ranker[0] + shift / 2, "fusion": fusion[0] + shift}}
        monkeypatch.setattr(curve, "measure", lambda *args, numbers=other, **kwargs: numbers)
        curve.main(_argv(tiny_data, tiny_llama_dir, tmp_path, seed=seed))
        fusion.append(other["ratio"]["fusion"])
        ranker.append(other["ratio"]["ranker"])
    body = (tmp_path / "RESULTS.md").read_text()
    assert len(list((tmp_path / "records").glob("*.json"))) == 3
    se = statistics.stdev(fusion) / 3 ** 0.5
    assert (f"LlamaRec / LRURec NDCG@10, history excluded for both, mean over 3 seeds: "
            f"{statistics.mean(ranker):.3f} ranker only, {statistics.mean(fusion):.3f} with fusion "
            f"(standard error {se:.3f})") in body
    assert (tmp_path / "llamarec_curve.png").stat().st_size > 0


def test_a_bad_setting_stops_before_any_training(curve, tiny_data, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(curve, "measure", lambda *args, **kwargs: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit, match=r"^error: ranker_train_candidates='retreiver' is not one of random, "):
        curve.main(_argv(tiny_data, tiny_llama_dir, tmp_path, ranker_train_candidates="retreiver"))
    assert not (tmp_path / "records").exists() and not (tmp_path / "saved").exists()


def test_the_slope_of_each_curve_predicts_the_budget_of_the_papers_ratio(curve):
    def run(examples, seed, ranker, fusion, **other):
        settings = {"ranker_max_train_examples": examples, "ranker_train_candidates": "random", "seed": seed, **other}
        return {"settings": settings, "numbers": {"ratio": {"ranker": ranker, "fusion": fusion}}}

    # a longer budget validates less often and never stops early: the same curve (its schedule does not split it)
    longer = {"ranker_eval_step": 160, "ranker_stopping_step": 0}
    groups = curve.group([run(640, 1, 0.90, 0.95), run(640, 2, 0.92, 0.97), run(6400, 1, 1.00, 1.02, **longer),
                          run(640, 1, 1.0, 1.0, learning_rate=1e-3), run(2560, 1, 0.9, 0.9, learning_rate=1e-3)])
    lines = curve.slope_lines(groups)
    # seeds pooled first (0.96 at 640), then +0.06 per decade: 1.07 is 0.05 above 1.02, 10 ** (0.05 / 0.06) x 6,400
    assert ("- random, 640 -> 6,400 examples: with fusion 0.960 -> 1.020, +0.060 per 10x examples (1.07 at ~43,603 "
            "examples); ranker only 0.910 -> 1.000, +0.090 per 10x examples (1.07 at ~38,367 examples)") in lines
    falling = next(line for line in lines if "learning_rate=0.001" in line)
    assert "with fusion 1.000 -> 0.900, -0.166 per 10x examples (never 1.07: not rising)" in falling
    assert curve.slope_lines(curve.group([run(640, 1, 0.9, 0.9)])) == []  # one budget: no slope
    flat = curve.slope_lines(curve.group([run(640, 1, 1.0, 1.0), run(6400, 1, 1.0, 1.01)]))[2]
    assert "+0.010 per 10x examples (1.07 only beyond 100x the largest budget measured)" in flat  # 10 ** 7 x 6,400
    untrained = curve.slope_lines(curve.group([run(0, 1, 0.8, 0.99), run(640, 1, 0.9, 0.95), run(6400, 1, 1.0, 1.01)]))
    assert "- random, 0 -> 640 -> 6,400 examples: with fusion 0.990 -> 0.950 -> 1.010, +0.060 per 10x" in untrained[2]
    assert curve.slope_lines(curve.group([run(0, 1, 0.8, 0.99), run(640, 1, 0.9, 0.95)])) == []  # one trained


def test_the_table_shows_each_settings_prompt_length_and_ranking_speed(curve):
    def run(mean, p95, rows, seconds):
        return {"numbers": {"prompt_tokens": {"mean": mean, "p95": p95, "max": p95 + 9}, "ranked_rows": rows,
                            "seconds": {"ranking": seconds}}}

    # the mean over a setting's seeds: (460 + 470) / 2 tokens, p95 (490 + 500) / 2; (557/250 + 557/300) / 2 users/s
    assert curve.prompt_cell([run(460, 490, 557, 250.0), run(470, 500, 557, 300.0)]) == "465 / 495; 2.04 users/s"
    assert curve.prompt_cell([{"numbers": {"seconds": {}}}]) == "-"  # a run before lengths were recorded
    checks = [{"step": 40, "ndcg@10": 0.3, "se": 0.02, "letter_loss": 2.951}, {"step": 80, "ndcg@10": 0.2, "se": 0.01}]
    assert curve.trace({"numbers": {"validation": checks}}) == "40: 0.3000 ± 0.0200 (letter loss 2.95); 80: 0.2000 ± 0.0100"
    assert curve.minutes_cell({"minutes": 31.3, "numbers": {}}) == "31"  # a run before resumes were recorded
    assert curve.minutes_cell({"minutes": 96.0, "numbers": {"resumed_at_step": 160}}) == "96 (resumed at step 160)"
    xeon = ("2 cores (Intel(R) Xeon(R) Processor; amx_bf16, avx2), torch 2.13.0+cpu, 1 thread, Python 3.11.7; LLM "
            "compute unless a setting says otherwise: bfloat16 autocast over float32 weights (llm_dtype: auto on a CPU "
            "with AMX bf16 units); load average 2.0 at the end of the run (above 2 = shared cores)")
    epyc = ("2 cores (AMD EPYC; avx2), torch 2.13.0+cpu, 1 thread, Python 3.11.7; LLM compute unless a setting says "
            "otherwise: float32 (llm_dtype: auto on a CPU without bf16 units); load average 2.0 at the end of the run")
    assert curve.where_cell({"machine": xeon, "settings": {}}) == "Intel(R) Xeon(R) Processor; bf16 autocast"
    assert curve.where_cell({"machine": epyc, "settings": {"llm_dtype": None}}) == "AMD EPYC; float32"
    assert curve.where_cell({"machine": xeon, "settings": {"llm_dtype": "float32"}}) == "Intel(R) Xeon(R) Processor; float32"


def test_the_int8_rescore_ranks_the_same_trained_ranker_through_its_int8_copy(curve, tiny_data, tiny_llama_dir,
                                                                               tmp_path, monkeypatch):
    from recbole_llm.model import llamarec

    copies = []
    monkeypatch.setattr(llamarec, "int8_copy", lambda llm, made=llamarec.int8_copy: copies.append(1) or made(llm))
    curve.main([*_argv(tiny_data, tiny_llama_dir, tmp_path, llm_dtype="float32", candidate_k=10, ranker_int8=False),
                "--int8_rescore"])
    [path] = (tmp_path / "records").glob("*.json")
    record = json.loads(path.read_text())
    numbers, int8 = record["numbers"], record["numbers"]["int8"]
    assert record["settings"]["int8_rescore"] is True and copies  # its own key; the int8 copy ranked
    for part in ("fusion", "ranker"):  # the float32 side is RecBole's own NDCG@10 of the same run, user by user
        assert int8[part]["float32"] == pytest.approx(numbers["test"][part]["ndcg@10"], abs=1e-4)
        assert int8[part]["difference"] == pytest.approx(int8[part]["int8"] - int8[part]["float32"], abs=1e-6)
        assert 0 <= int8[part]["recall@10_int8"] <= 1 and int8[part]["float32_se"] >= 0
    assert int8["users_per_s"]["float32"] > 0 and int8["users_per_s"]["int8"] > 0
    assert "int8 scoring of a trained ranker" in (tmp_path / "RESULTS.md").read_text()


def test_the_int8_rescore_needs_a_float32_llm_and_says_so_before_training(curve, tiny_data, tiny_llama_dir, tmp_path,
                                                                          monkeypatch):
    from recbole_llm.llm import precision

    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")  # auto: bf16 autocast
    monkeypatch.setattr(curve, "measure", lambda *args, **kwargs: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit, match=r"^error: --int8_rescore: ranker_int8: True ranks with an int8 copy"):
        curve.main([*_argv(tiny_data, tiny_llama_dir, tmp_path, candidate_k=10), "--int8_rescore"])
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)  # float32, where auto ranks in int8 already
    with pytest.raises(SystemExit, match=r"^error: --int8_rescore sets float32 ranking beside int8, but this run "
                                         r"already ranks in int8 \(ranker_int8=True\): add --ranker_int8=False"):
        curve.main([*_argv(tiny_data, tiny_llama_dir, tmp_path, candidate_k=10, ranker_int8=True), "--int8_rescore"])
    # now the list is too short to read NDCG@10 off
    with pytest.raises(SystemExit, match=r"^error: --int8_rescore reads each user's NDCG@10 off the candidates, but "
                                         r"candidate_k=5: set candidate_k: 10 or more"):
        curve.main([*_argv(tiny_data, tiny_llama_dir, tmp_path, ranker_int8=False), "--int8_rescore"])
    assert not (tmp_path / "records").exists()
