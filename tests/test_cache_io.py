"""Caches: atomic writes, reads that heal a corrupt file, one lock per cache key, and
checkpoint names that two runs started together do not share."""
import logging
import threading

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_llm import load_config
from recbole_llm.cache_io import atomic_save, atomic_target, cache_lock, guarded_load, unique_checkpoint_name


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "cache.pt"
    atomic_save({"v": 1}, path)
    with pytest.raises(RuntimeError):
        with atomic_target(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert torch.load(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


def test_a_folder_replaces_the_old_folder(tmp_path):
    target = tmp_path / "adapter"
    for version in ("old", "new"):
        with atomic_target(target) as tmp:
            tmp.mkdir()
            (tmp / version).write_text(version)
    assert [p.name for p in target.iterdir()] == ["new"]


def test_two_writers_never_share_a_temp_name(tmp_path):
    with atomic_target(tmp_path / "x") as first, atomic_target(tmp_path / "x") as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("1")
        second.write_text("2")
    assert (tmp_path / "x").read_text() in ("1", "2")


def test_a_truncated_cache_is_logged_removed_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "cache.pt"
    atomic_save({"weights": torch.arange(1000)}, path)
    path.write_bytes(path.read_bytes()[:100])  # a kill during a non-atomic write
    with caplog.at_level(logging.WARNING):
        assert guarded_load(path, what="stage-1 cache") is None
    assert str(path) in caplog.text and "stage-1 cache" in caplog.text
    assert not path.exists()
    assert guarded_load(tmp_path / "absent.pt") is None


def test_the_second_run_waits_for_the_first_and_reuses_its_result(tmp_path):
    """Two 'runs' need the same cache: the builder runs once, both get its result."""
    path, builds, results, first_inside = tmp_path / "shared.pt", [], [], threading.Event()

    def run(release=None):
        with cache_lock(path):
            if release is not None:
                first_inside.set()
                release.wait()
            value = guarded_load(path)
            if value is None:
                builds.append(1)
                value = {"built": len(builds)}
                atomic_save(value, path)
        results.append(value)

    release = threading.Event()
    first = threading.Thread(target=run, args=(release,), daemon=True)
    first.start()
    assert first_inside.wait(timeout=60)
    second = threading.Thread(target=run, daemon=True)
    second.start()
    try:
        second.join(timeout=0.5)
        assert second.is_alive()  # blocked on the lock while the first builds
    finally:
        release.set()
    first.join(timeout=60)
    second.join(timeout=60)
    assert builds == [1] and results == [{"built": 1}, {"built": 1}]


def test_checkpoint_names_of_runs_started_in_the_same_second_differ(tiny_data):
    from recbole_llm.model.lrurec import LRURec
    from recbole_llm.registry import get_trainer

    name, overrides = tiny_data
    config = load_config("LRURec", name, config_dict=overrides)
    train, _, _ = data_preparation(config, create_dataset(config))
    trainer_class = get_trainer(LRURec)
    first, second = (trainer_class(config, LRURec(config, train._dataset)) for _ in range(2))
    assert first.saved_model_file != second.saved_model_file
    assert unique_checkpoint_name("saved/LRURec-Nov-30.pth").startswith("saved/LRURec-Nov-30-")


def test_corrupt_stage1_cache_and_resume_file_are_rebuilt(tiny_data, tiny_llama_dir, caplog):
    """A truncated stage-1 checkpoint and a truncated resume file: logged with their paths,
    removed, rebuilt; the run ends as a clean one does."""
    from pathlib import Path

    from recbole_llm.quick_start import run

    name, overrides = tiny_data
    settings = {**overrides, "llm_path": str(tiny_llama_dir), "id_model_config": {"epochs": 1}, "epochs": 1,
                "train_rows_per_epoch": 16, "lora_r": 2}
    clean = run("E4SRec", name, config_dict=settings)
    stage1 = next((Path(overrides["checkpoint_dir"]) / "stage1").glob("SASRec-*.pth"))
    stage1.write_bytes(stage1.read_bytes()[:64])
    resume = Path(overrides["checkpoint_dir"]) / "resume" / "E4SRec-tiny-fit-0.pth"
    resume.parent.mkdir(parents=True, exist_ok=True)
    resume.write_bytes(b"\x80\x02garbage")
    import recbole_llm.trainer.resume as resume_module

    real_path = resume_module.resume_path
    resume_module.resume_path = lambda config, what: resume if config["model"] == "E4SRec" else real_path(config, what)
    try:
        with caplog.at_level(logging.WARNING):
            again = run("E4SRec", name, config_dict=settings)
    finally:
        resume_module.resume_path = real_path
    assert str(stage1) in caplog.text and str(resume) in caplog.text
    assert stage1.is_file() and torch.load(stage1, weights_only=False)["model"] == "SASRec"
    assert again["test_result"] == clean["test_result"]


def test_a_run_whose_resume_key_another_run_holds_neither_resumes_nor_saves(tiny_data, monkeypatch, caplog):
    """Two identical commands at once: the resume state belongs to the first; the second trains
    without reading or writing it (and says so), and ends with the same result."""
    import recbole_llm.trainer.resume as resume
    from recbole_llm.quick_start import run

    name, overrides = tiny_data
    settings = {**overrides, "epochs": 2}
    saved = []
    real_save = resume.save_state
    monkeypatch.setattr(resume, "save_state", lambda path, state: (saved.append(path), real_save(path, state)))
    first = run("LRURec", name, config_dict=settings)
    assert saved  # the owner of the key saves its state every epoch
    saved.clear()
    monkeypatch.setattr(resume, "try_lock", lambda path: None)  # as if another run held the key
    monkeypatch.setattr(resume, "load_state", lambda path: pytest.fail("read another run's resume state"))
    with caplog.at_level(logging.WARNING):
        second = run("LRURec", name, config_dict=settings)
    assert not saved and "neither resumes from nor saves" in caplog.text
    assert second["test_result"] == first["test_result"]


def test_a_corrupt_knowledge_vector_cache_is_encoded_again(tmp_path, caplog):
    from torch import nn

    from recbole_llm.knowledge.encoding import cached_vectors

    class CountingEncoder(nn.Module):
        calls = 0

        def encode(self, texts):
            CountingEncoder.calls += 1
            return torch.ones(len(texts), 3)

    texts = ["", "a film", "another film"]
    first = cached_vectors(texts, "my-encoder", tmp_path, encoder=CountingEncoder())
    (cache,) = tmp_path.glob("vectors-*.pt")
    cache.write_bytes(cache.read_bytes()[:20])
    with caplog.at_level(logging.WARNING):
        again = cached_vectors(texts, "my-encoder", tmp_path, encoder=CountingEncoder())
    assert CountingEncoder.calls == 2 and torch.equal(first, again)
    assert str(cache) in caplog.text
    assert torch.equal(cached_vectors(texts, "my-encoder", tmp_path, encoder=CountingEncoder()), first)
    assert CountingEncoder.calls == 2  # the rebuilt cache is reused


def test_two_identical_commands_started_together_both_finish(tmp_path):
    """Two identical command lines at once, sharing saved/: both finish, each with its own
    checkpoint, and the same test result."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import write_tiny_dataset

    write_tiny_dataset(tmp_path / "data")
    root = Path(__file__).resolve().parent.parent
    script = ("import json, sys; import recbole.trainer.trainer as t; "
              "t.get_local_time = lambda: 'Nov-30-2026_12-00-00'; "  # both start within the same second
              "from recbole_llm.quick_start import run; "
              "r = run('LRURec', 'tiny', config_dict=json.loads(sys.argv[1])); print('RESULT', json.dumps(r['test_result']))")
    settings = json.dumps({"data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"),
                           "user_inter_num_interval": None, "item_inter_num_interval": None, "MAX_ITEM_LIST_LENGTH": 8,
                           "epochs": 2, "show_progress": False, "use_gpu": False, "state": "WARNING"})
    env = {"PYTHONPATH": str(root), "PATH": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", script, settings], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][1][-1500:] + outputs[1][1][-1500:]
    results = [out.split("RESULT ", 1)[1] for out, _ in outputs]
    assert results[0] == results[1]
    assert len(list((tmp_path / "saved").glob("LRURec-*.pth"))) == 2


def test_content_key_is_the_sha1_every_cache_key_was_made_with():
    """One helper for every cache key; its bytes are those of the schemes it replaced, so caches
    written before it stay valid (JSON with sorted keys, UTF-8 text, raw bytes, tensor values)."""
    import hashlib
    import json

    from recbole_llm.cache_io import content_key

    settings = {"b": [1, 2.5, None], "a": {"z": "é", "device": torch.device("cpu")}}
    assert content_key(settings, length=16) == \
        hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert content_key("prompt é", length=12) == hashlib.sha1("prompt é".encode()).hexdigest()[:12]
    assert content_key(b"\x00\x01") == hashlib.sha1(b"\x00\x01").hexdigest()
    tensor = torch.arange(6).view(2, 3).t()  # not contiguous: its values in row-major order
    assert content_key("k=5", tensor) == hashlib.sha1(b"k=5" + tensor.numpy().tobytes()).hexdigest()
    assert content_key("a", "b") == content_key("ab") != content_key("ba")


def test_item_noun_keeps_the_keys_of_caches_made_before_it(tmp_path, monkeypatch):
    """ml-100k's caches (stage 1, resume states) were keyed before ``item_noun`` existed, when every prompt spoke
    of a movie: its ``movie`` leaves their key as it was; another noun changes it.

    Caught: ``item_noun`` missing from ``_ADDED_LATER`` (every ml-100k cache rebuilt)."""
    from recbole_llm.cache_io import config_key

    monkeypatch.chdir(tmp_path)
    config = load_config("SASRec", "ml-100k", config_dict={"data_path": str(tmp_path / "data")})
    assert config["item_noun"] == "movie"
    key = config_key(config)
    del config.final_config_dict["item_noun"]
    assert config_key(config) == key
    config.final_config_dict["item_noun"] = "item"
    assert config_key(config) != key
