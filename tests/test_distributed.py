"""RecBole's distributed mode with 2 processes on the CPU (gloo, localhost), on tiny data:
LRURec through ``run(nproc=2)``, E4SRec (frozen LLM + LoRA, stage 1 on rank 0) and the LlamaRec
ranker (its own training loop, LLM ranking sharded by rank) rank by rank."""
import hashlib
import math
import socket
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from recbole_llm.errors import InputError
from recbole_llm.quick_start import run


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return str(sock.getsockname()[1])


@pytest.fixture
def one_thread_per_rank(monkeypatch):
    """Two ranks share the machine's cores: one thread each (read by torch in the children)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _assert_recbole_result(result):
    assert set(result) == {"best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}
    assert {"recall@5", "mrr@10", "ndcg@10", "hit@10"} <= set(result["test_result"])
    for metrics in (result["best_valid_result"], result["test_result"]):
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values())


def test_lrurec_trains_and_evaluates_with_two_cpu_processes(tiny_data, one_thread_per_rank):
    name, overrides = tiny_data
    result = run("LRURec", name, config_dict=overrides, nproc=2, port=_free_port())
    _assert_recbole_result(result)  # rank 0's result, handed back through the queue
    assert len(list((Path(overrides["checkpoint_dir"])).glob("LRURec-*.pth"))) == 1  # saved by rank 0 only


def _rank(rank, model_name, dataset, config_dict, queue):
    """What ``quick_start._run_rank`` runs, returning every rank's result, a digest of its weights,
    its share of the training rows, all rows, and (LlamaRec) the test rows its LLM ranked."""
    import torch.distributed as dist

    from recbole_llm.quick_start import build

    config, model, trainer, (train, valid, test) = build(model_name, dataset, config_dict=dict(config_dict, local_rank=rank))
    _, best_valid = trainer.fit(train, valid, saved=True, show_progress=False)
    # after fit, before evaluate loads rank 0's checkpoint on every rank: the weights each rank trained
    digest = hashlib.sha1(b"".join(p.detach().cpu().float().numpy().tobytes() for p in model.parameters())).hexdigest()
    ranked_before_test = getattr(trainer, "ranked_rows", 0)
    test_result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    ranked = None
    if hasattr(trainer, "ranked_rows"):  # LlamaRec: (rows the LLM ranked, this rank's test rows, those with a hit)
        phase = trainer._phase(test)
        hits = int((phase.flat("candidates") == phase.flat("targets").unsqueeze(1)).any(1).sum())
        ranked = (trainer.ranked_rows - ranked_before_test, phase.rows, hits)
    queue.put((rank, {"best_valid_result": best_valid, "test_result": test_result}, digest, len(train.sampler),
               len(train.dataset), ranked, len(test.dataset)))
    dist.destroy_process_group()


def _spawn(model_name, dataset, settings):
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(model_name, dataset, settings, queue), nprocs=2, join=True)
    return dict((got[0], got[1:]) for got in (queue.get(), queue.get()))


def _distributed():
    return {"world_size": 2, "nproc": 2, "offset": 0, "ip": "localhost", "port": _free_port()}


def test_e4srec_ranks_train_in_step_and_agree(tiny_data, tiny_llama_dir, one_thread_per_rank):
    name, overrides = tiny_data
    settings = {**overrides, "llm_path": str(tiny_llama_dir), "lora_r": 4, "id_model_config": {"epochs": 1},
                "epochs": 1, "train_rows_per_epoch": 64, **_distributed()}
    ranks = _spawn("E4SRec", name, settings)
    (result0, digest0, seen0, rows, *_), (result1, digest1, seen1, *_) = ranks[0], ranks[1]
    for result in (result0, result1):
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for m in result.values() for v in m.values())
    assert result0 == result1  # metrics gathered over both ranks' halves of the users
    assert digest0 == digest1  # same weights: DDP averaged the gradients; same stage-1 table and best checkpoint
    assert seen0 == seen1 == math.ceil(rows / 2)  # each rank trained on its half of the rows
    stage1 = list((Path(overrides["checkpoint_dir"]) / "stage1").glob("SASRec-*.pth"))
    assert len(stage1) == 1  # stage 1 trained and cached once, by rank 0


def test_llamarec_ranker_trains_in_step_and_ranks_each_users_once(tiny_data, tiny_llama_dir, one_thread_per_rank):
    """The ranker's own loop: gradients averaged across ranks (same adapter on both), one best adapter
    chosen from validation averaged over the ranks, and each rank's LLM ranks only its half of the test users."""
    name, overrides = tiny_data
    settings = {**overrides, "llm_path": str(tiny_llama_dir), "candidate_k": 5, "retriever_config": {"epochs": 1},
                "train_batch_size": 4, "ranker_max_train_examples": 16, "ranker_eval_step": 2, "ranker_valid_users": 8,
                "ranker_warmup_steps": 1, "fusion_weights": [0.0, 1.0], **_distributed()}
    ranks = _spawn("LlamaRec", name, settings)
    (result0, digest0, seen0, rows, ranked0, users), (result1, digest1, seen1, _, ranked1, _) = ranks[0], ranks[1]
    assert result0 == result1
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for m in result0.values() for v in m.values())
    assert digest0 == digest1  # the adapter each rank trained is the same: averaged gradients, one best step
    assert seen0 == seen1 == math.ceil(rows / 2)
    # the test users are split between the ranks, not repeated, and each LLM ranks only its users with a hit
    assert ranked0[1] == ranked1[1] == math.ceil(users / 2)
    assert ranked0[0] == ranked0[2] and ranked1[0] == ranked1[2]
    adapters = list(Path(overrides["checkpoint_dir"]).glob("LlamaRec-*.adapter"))
    assert len(adapters) == 1  # written by rank 0 only


def test_a_trainer_with_its_own_loop_refuses_a_distributed_run(tiny_data):
    name, overrides = tiny_data
    with pytest.raises(InputError, match="one process"):
        run("SeRALM", name, config_dict=overrides, nproc=2)  # alignment: refused before any process starts
