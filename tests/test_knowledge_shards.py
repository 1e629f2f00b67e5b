"""Knowledge generation for big catalogues: shards over ranks, resuming after an interruption or a kill,
and the merge into the final file by whichever rank finishes last.

Breakage checked by hand (caught by the concurrent-ranks test): the last rank merging only the records it
had read when it started (no final file). The kill test (slow) drives the real CLI in separate processes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recbole_llm.knowledge.generator import generate_knowledge
from recbole_llm.knowledge.store import KnowledgeCache
from test_seralm import FakeGenerator, _items


class InterruptedGenerator(FakeGenerator):
    """Stops the run (Ctrl-C) when asked for its ``stop_at``-th batch."""

    def __init__(self, stop_at):
        super().__init__()
        self.calls, self.stop_at = 0, stop_at

    def generate(self, fields):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return super().generate(fields)


def test_interrupted_run_resumes_without_redoing_finished_batches(tmp_path):
    cache = KnowledgeCache(tmp_path, "k")
    with pytest.raises(KeyboardInterrupt):
        generate_knowledge(InterruptedGenerator(stop_at=3), _items(8), cache, show_progress=False)
    assert not cache.final.is_file() and len(cache.part().read_text().splitlines()) == 4  # two batches kept
    resumed = FakeGenerator()
    records = generate_knowledge(resumed, _items(8), cache, show_progress=False)
    assert resumed.seen == ["Movie 5", "Movie 6", "Movie 7", "Movie 8"]
    assert sorted(records) == sorted(f"tok{i}" for i in range(1, 9)) and cache.final.is_file() and not cache.parts()


def test_the_rank_that_finishes_last_merges_every_shard_although_the_others_finished_after_it_started(tmp_path):
    """Rank 1 starts first; rank 0 runs and finishes while rank 1 is generating; rank 1, last to finish, merges."""
    cache = KnowledgeCache(tmp_path, "k")
    rank0 = FakeGenerator()

    class Rank1(FakeGenerator):
        def generate(self, fields):
            if not self.seen:  # rank 0 does all its work while rank 1 is in its first batch
                generate_knowledge(rank0, _items(8), KnowledgeCache(tmp_path, "k"), rank=0, world_size=2,
                                   show_progress=False)
                assert not cache.final.is_file()  # rank 0 could not merge: rank 1 is not done
            return super().generate(fields)

    rank1 = Rank1()
    records = generate_knowledge(rank1, _items(8), cache, rank=1, world_size=2, show_progress=False)
    assert rank0.seen == ["Movie 2", "Movie 4", "Movie 6", "Movie 8"]
    assert rank1.seen == ["Movie 1", "Movie 3", "Movie 5", "Movie 7"]
    assert cache.final.is_file() and not cache.parts() and len(records) == 8
    assert [json.loads(line)["token"] for line in cache.final.read_text().splitlines()] == [f"tok{i}" for i in range(1, 9)]


def _cli(tmp_path, tiny_data, tiny_llama_dir, rank, world_size=2):
    """The generation CLI as a separate process (its own log), on the tiny data and the tiny Llama."""
    name, overrides = tiny_data
    settings = {"data_path": overrides["data_path"], "load_col": overrides["load_col"], "checkpoint_dir":
                overrides["checkpoint_dir"], "user_inter_num_interval": None, "item_inter_num_interval": None,
                "knowledge_dir": str(tmp_path / "knowledge"), "knowledge_fields": {"title": "movie_title"},
                "state": "INFO", "show_progress": False}
    argv = [sys.executable, "-m", "recbole_llm.knowledge.generation", "--dataset", name, "--llm_path",
            str(tiny_llama_dir), "--num_threads", "1", "--batch_size", "2", "--max_new_tokens", "48",
            "--rank", str(rank), "--world_size", str(world_size)]
    argv += [f"--{key}={value!r}" for key, value in settings.items()]
    log = open(tmp_path / f"rank{rank}-{time.monotonic_ns()}.log", "w")
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}), Path(log.name)


def _final(knowledge: Path) -> list[Path]:
    return [p for p in knowledge.glob("knowledge-*.jsonl") if ".part-" not in p.name]


def _generated(log: Path) -> int:
    lines = [line for line in log.read_text().splitlines() if "generated knowledge for" in line]
    return int(lines[-1].split("generated knowledge for ")[1].split()[0]) if lines else 0


@pytest.mark.slow
def test_two_processes_one_killed_mid_way_resume_and_merge(tmp_path, tiny_data, tiny_llama_dir):
    """Ranks 0 and 1 of the CLI run side by side; rank 1 is SIGKILLed after its first batch; rank 0
    finishes; rank 1 started again generates only what it had not written, and merges the final file."""
    n_items = 30
    rank1, _ = _cli(tmp_path, tiny_data, tiny_llama_dir, 1)
    rank0, log0 = _cli(tmp_path, tiny_data, tiny_llama_dir, 0)
    knowledge = tmp_path / "knowledge"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        parts = list(knowledge.glob("*.part-1of2.jsonl")) if knowledge.is_dir() else []
        if parts and len(parts[0].read_text().splitlines()) >= 2:
            break
        assert rank1.poll() is None, "rank 1 ended before it could be killed"
        time.sleep(0.05)
    rank1.send_signal(signal.SIGKILL)
    rank1.wait()
    kept = len(parts[0].read_text().splitlines())
    assert 2 <= kept < n_items // 2
    assert rank0.wait(timeout=600) == 0 and _generated(log0) == n_items // 2
    assert not _final(knowledge)  # rank 1 is not done: no final file yet
    again, log1 = _cli(tmp_path, tiny_data, tiny_llama_dir, 1)
    assert again.wait(timeout=600) == 0
    assert _generated(log1) == n_items // 2 - kept  # nothing rank 1 had written is generated again
    final = _final(knowledge)
    assert len(final) == 1 and len(final[0].read_text().splitlines()) == n_items and not list(knowledge.glob("*.part-*"))
