"""SeRALM: knowledge cache, fused item embedding over RecBole models, alignment losses, async generator."""
import json
import math
from pathlib import Path

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from conftest import first_batch
from torch import nn

from recbole_llm import load_config
from recbole_llm.knowledge.generator import KnowledgeGenerator, generate_knowledge
from recbole_llm.knowledge.identity import (
    FLOAT32,
    adapter_dir_fingerprint,
    adapter_fingerprint,
    cache_key,
    item_prompt_hash,
)
from recbole_llm.knowledge.prompts import KNOWLEDGE_PROMPT, build_prompt, knowledge_text, parse_knowledge
from recbole_llm.knowledge.store import KnowledgeCache
from recbole_llm.trainer.alignment import SeRALMTrainer
from recbole_llm.trainer.alignment_losses import alignment_loss, per_token_kl, token_log_probs
from recbole_llm.trainer.knowledge_source import AsyncKnowledgeSource, resolve_refresh_interval, snapshot_module

torch.set_num_threads(1)


# --------------------------------------------------------------------------- parsing and the cache
def test_parse_knowledge_clean_salvaged_and_fallback():
    clean = 'Sure! {"description": "A heist film.", "summarization": "Fans of crime."} Hope it helps.'
    assert parse_knowledge(clean) == ({"description": "A heist film.", "summarization": "Fans of crime."}, True)
    truncated = '{"description": "A heist film.", "summarization": "Fans of cri'
    parsed, ok = parse_knowledge(truncated)
    assert not ok and parsed == {"description": "A heist film.", "summarization": "Fans of cri"}
    parsed, ok = parse_knowledge("just some words")
    assert not ok and parsed == {"description": "just some words", "summarization": ""}
    assert parse_knowledge('{"Description": "x"}') == ({"description": "x", "summarization": ""}, True)


def test_prompt_carries_the_item_fields_as_json():
    prompt = build_prompt({"title": "Titanic", "year": "1997", "genres": "Drama, Romance"})
    assert "summarize which types of users would enjoy a specific movie" in prompt  # the paper's Fig. 3
    assert '"description"' in prompt and '"summarization"' in prompt
    assert prompt.endswith('{"title": "Titanic", "year": "1997", "genres": "Drama, Romance"}')


#: Fig. 3 of the paper, as ml-100k's knowledge was generated with it (its cache key holds these bytes).
PAPER_PROMPT = (
    "You will serve as an assistant to help me summarize which types of users would enjoy a specific movie.\n"
    "I will provide you with information in the form of a JSON string that describes the movie:\n"
    '{"title": "the title of the movie", "year": "the year of the movie", "genres": "the genres of the movie"}\n'
    "Requirements:\n"
    "1. Please provide your answer in JSON format, following this structure:\n"
    '{"description": "a description of the movie", '
    '"summarization": "A summarization of what types of users would enjoy this movie"}\n'
    "Here is the movie information:\n"
    "{item_json}"
)


def test_default_knowledge_prompt_names_the_item_by_item_noun_and_ml100k_keeps_the_papers(tmp_path, monkeypatch):
    """ml-100k (``item_noun: movie``) keeps the paper's prompt byte for byte; another dataset's speaks of
    an item (or its ``item_noun``) with the keys of its ``knowledge_fields``.

    Caught: ``item_noun`` not read (ml-100k's prompt about an "item"), the skeleton's keys fixed."""
    from conftest import write_tiny_dataset
    from recbole_llm.knowledge.generation import knowledge_prompt

    monkeypatch.chdir(tmp_path)
    write_tiny_dataset(tmp_path / "data")
    data = {"data_path": str(tmp_path / "data")}
    assert knowledge_prompt(load_config("SeRALM", "ml-100k", config_dict=data)) == PAPER_PROMPT == KNOWLEDGE_PROMPT
    beauty = {**data, "knowledge_fields": {"title": "movie_title", "brand": "class"}}
    prompt = knowledge_prompt(load_config("SeRALM", "tiny", config_dict=beauty))
    assert "movie" not in prompt and "enjoy a specific item.\n" in prompt and "Here is the item information" in prompt
    assert '{"title": "the title of the item", "brand": "the brand of the item"}\n' in prompt
    prompt = knowledge_prompt(load_config("SeRALM", "tiny", config_dict={**beauty, "item_noun": "product"}))
    assert "enjoy a specific product.\n" in prompt and "the brand of the product" in prompt


class FakeGenerator:
    """Stands in for KnowledgeGenerator: answers from a function of the fields, counts the items it saw."""

    template = KNOWLEDGE_PROMPT
    batch_size = 2

    def __init__(self, answer=None):
        self.seen = []
        self.answer = answer or (lambda f: json.dumps({"description": f"about {f['title']}", "summarization": "all"}))

    def generate(self, fields):
        self.seen += [f["title"] for f in fields]
        return [self.answer(f) for f in fields]


def _items(n=6):
    return [(i, f"tok{i}", {"title": f"Movie {i}"}) for i in range(1, n + 1)]


def test_resumed_generation_skips_done_items_and_ignores_a_truncated_line(tmp_path):
    cache = KnowledgeCache(tmp_path, "k1")
    first = FakeGenerator()
    generate_knowledge(first, _items(6)[:3], cache, show_progress=False)  # an earlier run did 3 items ...
    cache.finalize(cache.load())  # (pretend it also wrote a final file for them)
    part = cache.part()
    record = {"token": "tok4", "description": "d", "summarization": "s",
              "prompt_hash": item_prompt_hash({"title": "Movie 4"})}
    generator = FakeGenerator()
    part.write_text(json.dumps(record) + "\n" + '{"token": "tok5", "descr')  # ... then crashed mid-line
    records = generate_knowledge(generator, _items(6), cache, show_progress=False)
    assert generator.seen == ["Movie 5", "Movie 6"]  # 1-3 (final) and 4 (progress file) were done
    assert set(records) == {f"tok{i}" for i in range(1, 7)}
    assert cache.final.is_file() and not cache.parts()
    lines = cache.final.read_text().splitlines()
    assert [json.loads(line)["token"] for line in lines] == [f"tok{i}" for i in range(1, 7)]
    again = FakeGenerator()
    generate_knowledge(again, _items(6), cache, show_progress=False)
    assert again.seen == []


def test_truncated_progress_line_is_cut_before_appending(tmp_path):
    cache = KnowledgeCache(tmp_path, "k2")
    cache.directory.mkdir(parents=True, exist_ok=True)
    cache.part().write_text('{"token": "a"}\n{"token": "b", "desc')
    with cache.open_part() as handle:
        KnowledgeCache.append(handle, [{"token": "c"}])
    assert [json.loads(line)["token"] for line in cache.part().read_text().splitlines()] == ["a", "c"]


def test_corrupt_final_file_is_detected_and_only_lost_items_regenerated(tmp_path):
    cache = KnowledgeCache(tmp_path, "k3")
    generate_knowledge(FakeGenerator(), _items(4), cache, show_progress=False)
    lines = cache.final.read_text().splitlines()
    cache.final.write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]) + "\n")
    generator = FakeGenerator()
    records = generate_knowledge(generator, _items(4), cache, show_progress=False)
    assert generator.seen == ["Movie 3"] and len(records) == 4
    assert all(json.loads(line) for line in cache.final.read_text().splitlines())


def test_malformed_json_falls_back_is_counted_and_logged(tmp_path, caplog):
    cache = KnowledgeCache(tmp_path, "k4")
    answers = {"Movie 1": '{"description": "fine", "summarization": "ok"}', "Movie 2": "no json at all"}
    items = [(1, "t1", {"title": "Movie 1"}), (2, "t2", {"title": "Movie 2"}), (3, "t3", {})]
    generator = FakeGenerator(lambda f: answers[f["title"]])
    with caplog.at_level("INFO", logger="recbole_llm"):
        records = generate_knowledge(generator, items, cache, show_progress=False)
    assert generator.seen == ["Movie 1", "Movie 2"]  # the item without text is not sent to the LLM
    assert records["t2"]["fallback"] and records["t2"]["description"] == "no json at all"
    assert records["t3"]["empty"] and records["t3"]["description"] == ""
    meta = json.loads(cache.meta_path.read_text())
    assert meta["fallbacks"] == 1 and meta["empty"] == 1
    assert "1 answer(s) were not clean JSON" in caplog.text and "no text fields" in caplog.text


def test_sharded_generation_splits_items_by_rank(tmp_path):
    cache = KnowledgeCache(tmp_path, "k5")
    rank0, rank1 = FakeGenerator(), FakeGenerator()
    generate_knowledge(rank0, _items(5), cache, rank=0, world_size=2, show_progress=False)
    assert rank0.seen == ["Movie 2", "Movie 4"] and not cache.final.is_file()
    generate_knowledge(rank1, _items(5), cache, rank=1, world_size=2, show_progress=False)
    assert rank1.seen == ["Movie 1", "Movie 3", "Movie 5"] and cache.final.is_file() and not cache.parts()


def test_cache_key_changes_with_prompt_and_adapter(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from recbole_llm.llm.lora import apply_lora

    llm = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), 4, 8, 0.0, ["q_proj", "v_proj"])
    assert adapter_fingerprint(llm) is None  # LoRA B = 0: the identity, i.e. the un-aligned LLM
    args = ("tiny", {"llm": "tiny"}, None, KNOWLEDGE_PROMPT, {"title": "movie_title"}, True, {"max_new_tokens": 8},
            FLOAT32)
    base = cache_key(*args)
    assert cache_key(*args) == base
    assert cache_key(args[0], args[1], None, KNOWLEDGE_PROMPT + " Be brief.", *args[4:]) != base
    assert cache_key(*args[:-1], {**FLOAT32, "autocast": "bfloat16"}) != base
    with torch.no_grad():
        next(p for n, p in llm.named_parameters() if "lora_B" in n).add_(0.01)
    fingerprint = adapter_fingerprint(llm)
    assert fingerprint is not None and cache_key(args[0], args[1], fingerprint, *args[3:]) != base
    llm.save_pretrained(tmp_path / "adapter")
    assert adapter_dir_fingerprint(tmp_path / "adapter") == fingerprint  # same key from disk and memory


# --------------------------------------------------------------------------- the alignment losses
def test_alignment_gradient_matches_eq_6_and_8_by_hand():
    theta = torch.tensor([0.2, -0.5, 1.0], requires_grad=True)  # a context-free policy over 3 tokens
    theta0 = torch.tensor([0.0, 0.3, -0.2])  # the original LLM
    tokens = torch.tensor([[2, 0]])  # the sampled knowledge s
    mask = torch.ones(1, 2)
    log_p_rec, log_p_ref = torch.log(torch.tensor([0.02])), torch.log(torch.tensor([0.01]))  # ratio 2
    p, p0 = theta.detach().softmax(0), theta0.softmax(0)
    dlogp_s = torch.nn.functional.one_hot(tokens[0], 3).sum(0).float() - 2 * p  # grad of log p(s) = sum_t (e_t - p)

    def grad(current=0.01, **kwargs):  # current: p(y|x,s_now), the baseline's p(y|x,.) (ratio current / 0.01)
        logp_all = theta.log_softmax(0).expand(1, 2, 3)
        logp0_all = theta0.log_softmax(0).expand(1, 2, 3)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        logp0 = logp0_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        full = kwargs.pop("full", False)
        loss, _ = alignment_loss(logp, logp0, mask, log_p_rec, log_p_ref, torch.log(torch.tensor([current])),
                                 kl_tokens=per_token_kl(logp_all, logp0_all) if full else None, **kwargs)
        (g,) = torch.autograd.grad(loss, theta)
        return g

    # Eq. 6 (k = 1) when the current knowledge never predicts y: descend on -(p(y|x,s)/p(y|x)) log p(s|x)
    assert torch.allclose(grad(current=0.0, kl_coef=0.0), -2.0 * dlogp_s, atol=1e-6)
    # the per-instance baseline: (ratio - the current knowledge's ratio), here 2 - 1; 2 - 3 when it predicts y better
    assert torch.allclose(grad(kl_coef=0.0), -1.0 * dlogp_s, atol=1e-6)
    assert torch.allclose(grad(current=0.03, kl_coef=0.0), 1.0 * dlogp_s, atol=1e-6)
    # Eq. 8 with the exact per-token KL: d KL(p||p0)/d theta = p * (log p/p0 - KL), at each of the 2 tokens
    kl = (p * (p.log() - p0.log())).sum()
    expected = -1.0 * dlogp_s + 0.5 * 2 * p * (p.log() - p0.log() - kl)
    assert torch.allclose(grad(kl_coef=0.5, full=True), expected, atol=1e-6)
    # the sampled-token (score-function) form: sum_t (log p(t) - log p0(t)) * (e_t - p)
    log_ratio = (p.log() - p0.log())[tokens[0]]
    score = sum(r * (torch.nn.functional.one_hot(t, 3).float() - p) for r, t in zip(log_ratio, tokens[0]))
    assert torch.allclose(grad(kl_coef=0.5), -1.0 * dlogp_s + 0.5 * score, atol=1e-6)
    # the ratio clip, of both ratios
    assert torch.allclose(grad(current=0.0, kl_coef=0.0, ratio_clip=1.5), -1.5 * dlogp_s, atol=1e-6)
    assert torch.allclose(grad(current=0.05, kl_coef=0.0, ratio_clip=1.5), 0.0 * dlogp_s, atol=1e-6)
    # a stale sample: token t's gradient carries rho_t = pi_current(t) / pi_snapshot(t), PPO-clipped at 1 +- 0.2
    logp_now = theta.detach().log_softmax(0)[tokens[0]].unsqueeze(0)
    per_token = [torch.nn.functional.one_hot(t, 3).float() - p for t in tokens[0]]  # grad log p(t)
    for rho, advantage, kept in [((1.1, 0.9), 1.0, (1.1, 0.9)),  # inside the range: weighted by rho
                                 ((1.5, 0.5), 1.0, (0.0, 0.5)),  # A > 0: rho > 1.2 is cut, rho < 0.8 kept
                                 ((1.5, 0.5), -0.5, (1.5, 0.0))]:  # A < 0: the other way round
        stale = logp_now - torch.log(torch.tensor([rho]))
        current = (2.0 - advantage) * 0.01  # the reward ratio is 2
        expected = -advantage * sum(w * g for w, g in zip(kept, per_token))
        assert torch.allclose(grad(current=current, kl_coef=0.0, logp_old=stale, importance_clip=0.2),
                              expected, atol=1e-6), rho
    unclipped = -1.0 * (1.5 * per_token[0] + 0.5 * per_token[1])  # importance_clip ~: plain importance weights
    stale = logp_now - torch.log(torch.tensor([[1.5, 0.5]]))
    assert torch.allclose(grad(kl_coef=0.0, logp_old=stale, importance_clip=None), unclipped,
                          atol=1e-6)


def test_kl_is_zero_when_the_adapter_is_zero(tiny_llama_dir, embedded_tokenizer):
    from transformers import AutoModelForCausalLM

    from recbole_llm.llm.lora import apply_lora

    llm = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), 4, 8, 0.0, ["q_proj", "v_proj"])
    generator = KnowledgeGenerator(llm, embedded_tokenizer, max_new_tokens=5)
    torch.manual_seed(0)
    prompt_ids, prompt_mask, new_ids, new_mask = generator.generate_ids(
        [generator.prompt({"title": "Heat"}), generator.prompt({"title": "The Usual Suspects", "year": "1995"})],
        do_sample=True)
    assert prompt_mask[0].min() == 0 or prompt_mask[1].min() == 0  # left padding is exercised

    def kl_and_grads():
        llm.zero_grad()
        logp, logp_all = token_log_probs(llm, prompt_ids, prompt_mask, new_ids, new_mask, full=True)
        with torch.no_grad(), llm.disable_adapter():
            logp0, logp0_all = token_log_probs(llm, prompt_ids, prompt_mask, new_ids, new_mask, full=True)
        same = torch.zeros(2)
        loss, stats = alignment_loss(logp, logp0, new_mask, same, same, same, kl_coef=1.0,
                                     kl_tokens=per_token_kl(logp_all, logp0_all))
        loss.backward()
        sampled, _ = alignment_loss(logp, logp0, new_mask, same, same, same, kl_coef=1.0)
        grads = [p.grad.abs().max() for p in llm.parameters() if p.requires_grad]
        return stats["kl"], float(sampled.detach()), max(grads)

    kl, sampled_kl, largest_grad = kl_and_grads()
    assert abs(kl) < 1e-6 and abs(sampled_kl) < 1e-6 and largest_grad < 1e-6
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    kl, _, largest_grad = kl_and_grads()
    assert kl > 1e-4 and largest_grad > 0


# --------------------------------------------------------------------------- the asynchronous generator
class _Sample:
    def __init__(self, value):
        self.value, self.version = value, None


def test_async_worker_refreshes_its_snapshot_every_refresh_interval():
    live = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        live.weight.zero_()
    snapshot = snapshot_module(live)
    job = lambda batch: _Sample(float(snapshot.weight.detach()))  # noqa: E731 - the worker reads only its snapshot
    batches = iter(range(10**6))
    seen = []
    with AsyncKnowledgeSource(job, batches, {"m": live}, {"m": snapshot}, refresh_interval=3, queue_size=1) as source:
        for iteration in range(1, 11):
            sample = source.get()
            seen.append((sample.version, sample.value))
            with torch.no_grad():
                live.weight.fill_(iteration)  # the trainer's update at this iteration
            source.step(iteration)
        assert source.requested_version == 3  # after iterations 3, 6 and 9
        for _ in range(5):  # the worker applies the last snapshot before its next sample
            sample = source.get()
            seen.append((sample.version, sample.value))
            if sample.version == 3:
                break
    assert not source.thread.is_alive()
    assert seen[-1] == (3, 9.0)
    versions = [v for v, _ in seen]
    assert versions == sorted(versions) and set(versions) <= {0, 1, 2, 3}
    assert all(value == {0: 0.0, 1: 3.0, 2: 6.0, 3: 9.0}[version] for version, value in seen)


def test_async_worker_error_reaches_the_trainer_and_the_worker_stops():
    calls = []

    def job(batch):
        calls.append(batch)
        if len(calls) == 3:
            raise ValueError("generation broke")
        return _Sample(batch)

    source = AsyncKnowledgeSource(job, iter(range(100)), {}, {}, refresh_interval=50, queue_size=1)
    with pytest.raises(RuntimeError, match="generation broke") as error:
        for _ in range(10):
            source.get()
    assert isinstance(error.value.__cause__, ValueError)
    source.close()
    assert not source.thread.is_alive()


def test_async_worker_stops_on_keyboard_interrupt():
    source = AsyncKnowledgeSource(lambda batch: _Sample(batch), iter(range(10**6)), {}, {}, queue_size=1)
    with pytest.raises(KeyboardInterrupt):
        with source:
            source.get()
            raise KeyboardInterrupt
    assert not source.thread.is_alive()


# --------------------------------------------------------------------------- the model around RecBole models
@pytest.fixture(scope="module")
def seralm_env(tmp_path_factory, tiny_llama_dir):
    """Tiny data plus knowledge and vector caches shared by the model tests (generated once)."""
    from conftest import write_tiny_dataset

    root = tmp_path_factory.mktemp("seralm")
    write_tiny_dataset(root / "data")
    overrides = {
        "data_path": str(root / "data"), "checkpoint_dir": str(root / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "release_year", "class"]},
        "user_inter_num_interval": None, "item_inter_num_interval": None, "MAX_ITEM_LIST_LENGTH": 8,
        "epochs": 1, "train_batch_size": 32, "eval_batch_size": 64, "show_progress": False, "use_gpu": False,
        "state": "WARNING", "llm_path": str(tiny_llama_dir), "knowledge_max_new_tokens": 6,
        "knowledge_dir": str(root / "knowledge"), "knowledge_vector_dir": str(root / "vectors"),
        "base_model_config": {"k_interests": 2}, "reference_config": {"epochs": 1},
    }
    return root, overrides


def _build(env, monkeypatch, **extra):
    from recbole_llm.model.seralm import SeRALM

    root, overrides = env
    monkeypatch.chdir(root)
    config = load_config("SeRALM", "tiny", config_dict={**overrides, **extra})
    train, valid, test = data_preparation(config, create_dataset(config))
    return config, SeRALM(config, train._dataset), (train, valid, test)




@pytest.mark.parametrize("base_model", ["Caser", "SASRec", "LightSANs", "GRU4Rec", "NARM"])
def test_fused_embedding_keeps_the_base_models_contract(seralm_env, monkeypatch, base_model):
    from recbole_llm.model.seralm import FusedItemEmbedding

    config, model, (train, _, test) = _build(seralm_env, monkeypatch, base_model=base_model)
    fused = model.base.item_embedding
    assert isinstance(fused, FusedItemEmbedding) and type(model.base).__name__ == base_model
    size = model.base_config["hidden_size" if base_model in ("SASRec", "LightSANs") else "embedding_size"]
    assert fused.embedding_dim == size and fused.weight.shape == (model.n_items, size)
    ids = torch.tensor([[0, 1, 2], [3, 0, 0]])
    assert fused(ids).shape == (2, 3, size)
    assert torch.allclose(fused(ids), fused.id_embedding(ids), atol=1e-6)  # identity init: scores like the base
    model.eval()
    interaction = first_batch(test)
    scores = model.full_sort_predict(interaction)
    model.base.item_embedding = fused.id_embedding  # the base model with its own, plain item table
    plain = model.base.full_sort_predict(interaction)
    model.base.item_embedding = fused
    assert scores.shape == (len(interaction), model.n_items) and torch.allclose(scores, plain, atol=1e-5)
    model.train()
    model.calculate_loss(first_batch(train)).backward()
    assert fused.fuse.weight.grad[:, size:].abs().sum() > 0  # knowledge gets a gradient
    assert fused.knowledge.shape == (model.n_items, 384) and not fused.knowledge[0].any()


def test_per_instance_knowledge_override_changes_only_that_instance(seralm_env, monkeypatch):
    _, model, (train, _, _) = _build(seralm_env, monkeypatch, base_model="SASRec", fusion_init="random")
    model.eval()
    batch = first_batch(train)[:4]
    target = batch["item_id"]
    with torch.no_grad():
        plain = model.log_prob_target(batch)
        vectors = torch.zeros(4, 1, 384)
        vectors[0, 0] = 5.0  # new knowledge for instance 0's target only
        items = target.unsqueeze(1)
        override = model.log_prob_target(batch, items, vectors.clone())
        same = model.log_prob_target(batch, items, model.fused.knowledge[items])
    assert not torch.isclose(override[0], plain[0])
    assert torch.allclose(same, plain, atol=1e-5)


def test_unknown_or_unfit_base_model_lists_the_supported_ones(seralm_env, monkeypatch):
    for name in ("NoSuchModel", "Pop"):
        with pytest.raises(ValueError, match="Caser, SASRec, LightSANs"):
            _build(seralm_env, monkeypatch, base_model=name)


def test_joint_mode_trains_the_encoder(seralm_env, monkeypatch):
    _, model, (train, _, _) = _build(seralm_env, monkeypatch, base_model="GRU4Rec", encoder_mode="joint",
                                     fusion_init="random", joint_items_per_step=8)
    before = model.fused.knowledge.clone()
    model.train()
    model.calculate_loss(first_batch(train)).backward()
    grads = [p.grad for p in model.fused.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert (model.fused.knowledge != before).any(dim=1).sum() <= 8  # the memory follows re-encoded items only


class _RecordingEncoder(nn.Module):
    """Stands in for the joint mode's encoder: records the texts it encodes."""

    dim = 3

    def __init__(self):
        super().__init__()
        self.seen = []
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, texts):
        self.seen += list(texts)
        return self.scale * torch.ones(len(texts), self.dim)


def test_joint_step_cap_keeps_the_targets_first():
    from recbole_llm.model.seralm import FusedItemEmbedding

    encoder = _RecordingEncoder()
    fused = FusedItemEmbedding(nn.Embedding(10, 4), torch.zeros(10, 3), knowledge_size=2, encoder=encoder,
                               texts=[f"text {i}" for i in range(10)], joint_items_per_step=2)
    targets, history = torch.tensor([9, 7, 9]), torch.tensor([1, 2, 3, 0, 7])
    fused.begin_step(torch.cat([targets, history]))  # as SeRALM.calculate_loss orders them
    assert encoder.seen == ["text 9", "text 7"]
    fused.end_step()
    assert fused.knowledge.any(dim=1).nonzero().flatten().tolist() == [7, 9]  # the memory: those two only


def test_history_resampling_draws_history_items_other_than_the_target_and_repeats_with_the_seed():
    from types import SimpleNamespace

    from recbole_llm.trainer.knowledge_source import GeneratorJob

    model = SimpleNamespace(POS_ITEM_ID="item_id", ITEM_SEQ="item_id_list", ITEM_SEQ_LEN="item_length")
    seq = torch.tensor([[4, 5, 6, 0, 0], [7, 7, 8, 9, 0], [3, 0, 0, 0, 0]])
    batch = {"item_id": torch.tensor([5, 7, 3]), "item_id_list": seq, "item_length": torch.tensor([3, 4, 1])}

    def draws(seed, n=200):
        job = GeneratorJob(None, None, model, None, {}, ("target", "history"), seed=seed)
        return torch.stack([job.resampled(batch) for _ in range(n)])  # [n, B, 2]

    items = draws(2020)
    assert torch.equal(items[:, :, 0], batch["item_id"].expand(200, 3))  # the target column is y
    assert set(items[:, 0, 1].tolist()) == {4, 6}  # the history but y, padding never
    assert set(items[:, 1, 1].tolist()) == {8, 9}
    assert set(items[:, 2, 1].tolist()) == {3}  # a history of y alone: y
    assert torch.equal(items, draws(2020)) and not torch.equal(items, draws(2021))
    last = GeneratorJob(None, None, model, None, {}, ("last",)).resampled(batch)
    assert last.flatten().tolist() == [6, 9, 3]


def test_knowledge_override_is_per_instance_even_when_the_batch_is_as_large_as_the_catalogue():
    from recbole_llm.model.seralm import FusedItemEmbedding

    torch.manual_seed(0)
    fused = FusedItemEmbedding(nn.Embedding(4, 3), torch.randn(4, 5), knowledge_size=2, fusion_init="random")
    items = torch.tensor([[3], [1], [2], [1]])  # 4 instances, 4 items: instance b overrides the knowledge of items[b]
    table, history = fused.weight.detach().clone(), torch.tensor([[1, 2], [1, 3], [2, 2], [0, 3]])
    with torch.no_grad(), fused.override(items, torch.randn(4, 1, 5)):
        assert torch.equal(fused.weight, table)  # the shared table keeps every item's own knowledge
        seen = fused(history)
        with pytest.raises(ValueError, match="per instance"):
            fused(torch.tensor([1, 2]))  # not one row per instance
    changed = (seen != table[history]).any(dim=-1)
    assert changed.tolist() == [[False, False], [True, False], [True, True], [False, False]]


def test_joint_mode_caches_only_the_pretrained_encoders_vectors(seralm_env, monkeypatch):
    from recbole_llm.knowledge.encoding import cached_vectors
    from recbole_llm.model.seralm import frozen_encoder

    _, model, _ = _build(seralm_env, monkeypatch, base_model="GRU4Rec", encoder_mode="joint")
    with torch.no_grad():  # a trained encoder: its vectors differ from the pretrained one's
        for param in model.fused.encoder.parameters():
            param.add_(0.05 * torch.randn_like(param))
    rows = [{}] + [{"description": f"An aligned answer about item {i}.", "summarization": "Fans."}
                   for i in range(1, model.n_items)]
    model.set_knowledge(rows)
    texts = model.knowledge_texts(rows)
    trained = model.fused.encoder.encode(texts)
    assert torch.allclose(model.fused.knowledge, trained, atol=1e-5)  # the memory: the trained encoder's
    pretrained = frozen_encoder(model.encoder_name, "cpu")
    cached = cached_vectors(texts, model.encoder_name, model.vector_dir, encoder=pretrained)
    assert torch.allclose(cached, pretrained.encode(texts), atol=1e-5)  # the cache: what its key names
    assert not torch.allclose(cached, trained, atol=1e-3)


def test_alignment_end_to_end_with_the_async_generator(seralm_env, monkeypatch):
    config, model, (train, valid, test) = _build(
        seralm_env, monkeypatch, base_model="SASRec", alignment_iterations=2, warmup_epochs=0,
        align_batch_size=2, align_max_new_tokens=4, generator_mode="async", align_llm_learning_rate=0.05)
    na_file = model.knowledge_file
    trainer = SeRALMTrainer(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    stats = trainer.alignment_stats
    # the default interval refreshes even a 2-iteration run (after each iteration)
    assert stats["iterations"] == 2 and stats["refresh_interval"] == 1 and stats["refreshes_sent"] == 2
    assert stats["kl"] > 0  # the first update moved the LLM away from the original one
    adapter_dir = trainer.alignment_dir()
    assert adapter_dir_fingerprint(adapter_dir) is not None  # saved, and not the identity adapter
    assert stats["knowledge_file"] != na_file  # regenerated under the aligned adapter's key
    trace = trainer.alignment_trace  # the curve: one entry per iteration, saved with the adapter
    assert [t["iteration"] for t in trace] == [1, 2] and trace[-1]["kl"] == pytest.approx(stats["kl"] * 2 - trace[0]["kl"])
    assert all(0 <= t["json_share"] <= 1 and {"advantage", "advantage_std", "importance"} <= set(t) for t in trace)
    trainer.evaluate(test, load_best_model=True, show_progress=False)  # the best checkpoint loads back
    # a second run with the same settings reuses the aligned adapter and its knowledge
    config2, model2, (train2, valid2, _) = _build(
        seralm_env, monkeypatch, base_model="SASRec", alignment_iterations=2, warmup_epochs=0,
        align_batch_size=2, align_max_new_tokens=4, generator_mode="async", align_llm_learning_rate=0.05)
    trainer2 = SeRALMTrainer(config2, model2)
    trainer2.fit(train2, valid2, saved=False, show_progress=False)
    assert trainer2.alignment_stats["reused"] == str(adapter_dir)
    assert trainer2.alignment_stats["knowledge_file"] == stats["knowledge_file"]
    assert trainer2.alignment_trace == trace  # a reused adapter brings its curve


def _aligner(env, monkeypatch, **extra):
    """A tiny SeRALM whose scores use its knowledge (random fusion), its trainer, the LLM being
    aligned (LoRA B = 0), the items' prompt fields and a batch of 3 training instances."""
    from recbole_llm.knowledge.prompts import item_prompt_fields

    config, model, (train, _, _) = _build(env, monkeypatch, base_model="SASRec", fusion_init="random",
                                          align_max_new_tokens=4, align_clip_grad_norm=1e9, **extra)
    trainer = SeRALMTrainer(config, model)
    llm, tokenizer = trainer.load_llm()
    fields = item_prompt_fields(train._dataset, dict(config["knowledge_fields"]))
    return trainer, model, llm, tokenizer, fields, first_batch(train)[:3]


def _move_lora(llm, seed=0):
    """A trainer update stand-in: random LoRA B (the LLM is no longer the original one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in llm.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def _logp(llm, sample, full=False):
    with torch.no_grad():
        return token_log_probs(llm, sample.prompt_ids, sample.prompt_mask, sample.new_ids, sample.new_mask, full)


def test_alignment_reward_is_the_recommenders_score_with_the_sampled_knowledge(seralm_env, monkeypatch):
    trainer, model, llm, tokenizer, fields, batch = _aligner(seralm_env, monkeypatch)
    job = trainer.make_job(llm, tokenizer, model, model, fields)  # (the model is its own reference here)
    samples = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        samples.append(job(batch))
    assert samples[0].texts != samples[1].texts
    model.eval()
    with torch.no_grad():
        for sample in samples:  # log p(y|x,s) with THIS sample's knowledge of the target
            vectors = model.encode_knowledge(sample.texts).view(len(batch), 1, -1)
            assert torch.allclose(sample.log_p_rec, model.log_prob_target(batch, sample.items, vectors), atol=1e-5)
        cached = model.log_prob_target(batch)  # the un-aligned knowledge
    assert not torch.allclose(samples[0].log_p_rec, cached, atol=1e-4)
    assert not torch.allclose(samples[0].log_p_rec, samples[1].log_p_rec, atol=1e-4)


class _SureReference(nn.Module):
    """A knowledge-free recommender far surer of every target than SeRALM (p(y|x) ~0.99): every
    sample's p(y|x,s) / p(y|x) is far below 1, as on ml-100k, where it is ~0.65."""

    def __init__(self, n_items, target_field):
        super().__init__()
        self.n_items, self.target_field = n_items, target_field

    def full_sort_predict(self, interaction):
        scores = torch.zeros(len(interaction), self.n_items)
        return scores.scatter(1, interaction[self.target_field].unsqueeze(1), 12.0)


def test_advantage_sign_follows_usefulness_whatever_the_offset_of_the_reference(seralm_env, monkeypatch):
    """Knowledge more useful to this user's target than the item's current knowledge is made more
    likely, less useful knowledge less likely, although both score far below the reference."""
    trainer, model, llm, tokenizer, fields, batch = _aligner(seralm_env, monkeypatch, kl_coef=0.0)
    batch = batch[:1]
    job = trainer.make_job(llm, tokenizer, model, _SureReference(model.n_items, model.POS_ITEM_ID), fields)
    lora = [p for p in llm.parameters() if p.requires_grad]

    def sample(seed):
        torch.manual_seed(seed)
        return job(batch)

    seeds = sorted(range(4), key=lambda seed: float(sample(seed).log_p_rec))
    worst, middle, best = seeds[0], seeds[len(seeds) // 2], seeds[-1]
    with torch.no_grad():  # the middle sample's knowledge becomes the target's current knowledge
        model.fused.knowledge[batch["item_id"][0]] = sample(middle).vectors[0]
    worse, better = sample(worst), sample(best)
    assert float(better.log_p_rec) > float(worse.log_p_rec) + 1e-4

    def uphill(s):
        """First-order change of log p_align(s|x) along the LLM step that alignment_step takes."""
        frozen = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0) for m in (llm, model)]
        trainer.alignment_step(llm, s, *frozen)
        step = [-p.grad.clone() for p in lora]
        llm.zero_grad()
        logp, _ = token_log_probs(llm, s.prompt_ids, s.prompt_mask, s.new_ids, s.new_mask)
        (logp * s.new_mask).sum().backward()
        return float(sum((d * p.grad).sum() for d, p in zip(step, lora)))

    assert uphill(better) > 0 > uphill(worse)
    for s in (better, worse):
        assert float(s.log_p_ref - s.log_p_rec) > math.log(10)  # the offset: every ratio < 0.1
    assert float(better.log_p_rec) > float(better.log_p_current) > float(worse.log_p_rec)


def test_alignment_step_kl_is_to_the_frozen_initial_llm(seralm_env, monkeypatch, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    trainer, model, llm, tokenizer, fields, batch = _aligner(seralm_env, monkeypatch, kl_coef=1.0)
    _move_lora(llm)
    torch.manual_seed(0)
    sample = trainer.make_job(llm, tokenizer, model, model, fields)(batch)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()  # an independent copy of the initial LLM
    _, now = _logp(llm, sample, full=True)
    _, before = _logp(original, sample, full=True)
    expected = float((per_token_kl(now, before) * sample.new_mask).sum() / len(batch))
    frozen = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0) for m in (llm, model)]
    stats = trainer.alignment_step(llm, sample, *frozen)
    assert expected > 1e-3 and stats["kl"] == pytest.approx(expected, rel=1e-4)


def test_alignment_step_weights_a_stale_sample_by_its_importance_ratio(seralm_env, monkeypatch):
    trainer, model, llm, tokenizer, fields, batch = _aligner(seralm_env, monkeypatch, kl_coef=0.0)
    _move_lora(llm)
    torch.manual_seed(0)
    sample = trainer.make_job(llm, tokenizer, model, model, fields)(batch)
    lora = [p for p in llm.parameters() if p.requires_grad]
    frozen = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0) for m in (llm, model)]

    def step(logp_old):
        sample.logp_old = logp_old
        stats = trainer.alignment_step(llm, sample, *frozen)
        return torch.cat([p.grad.flatten() for p in lora]), stats

    fresh, _ = _logp(llm, sample)  # what a snapshot equal to the live LLM returns
    on_policy, _ = step(None)
    assert on_policy.abs().max() > 0
    assert torch.allclose(step(fresh)[0], on_policy, atol=1e-7)
    stale, stats = step(fresh - math.log(1.1))  # sampled by a snapshot that gave every token 1/1.1 of its probability
    assert torch.allclose(stale, 1.1 * on_policy, rtol=1e-4, atol=1e-7)
    assert stats["importance"] == pytest.approx(1.1, rel=1e-4) and stats["clipped"] == 0
    trainer.config["importance_clip"] = 0.05  # the setting reaches the loss: 1.1 is now outside the range
    assert step(fresh - math.log(1.1))[1]["clipped"] == 1


def test_async_samples_after_a_refresh_come_from_the_refreshed_weights(seralm_env, monkeypatch):
    trainer, model, llm, tokenizer, fields, batch = _aligner(seralm_env, monkeypatch)
    llm_snapshot, model_snapshot, reference = snapshot_module(llm), snapshot_module(model), snapshot_module(model)
    job = trainer.make_job(llm_snapshot, tokenizer, model_snapshot, reference, fields, score_tokens=True)
    model.eval()

    def scored_by_live(sample):
        now, _ = _logp(llm, sample)
        with llm.disable_adapter():
            initial, _ = _logp(llm, sample)
        with torch.no_grad():
            rec = model.log_prob_target(sample.interaction, sample.items, sample.vectors.view(len(batch), 1, -1))
        return now, initial, rec

    def batches():
        while True:
            yield batch

    with AsyncKnowledgeSource(job, batches(), {"llm": llm, "rec": model}, {"llm": llm_snapshot, "rec": model_snapshot},
                              refresh_interval=1, queue_size=1) as source:
        first = source.get()
        _move_lora(llm)  # the trainer's update: new LoRA and recommender weights ...
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.1)
        source.step(1)  # ... sent to the worker
        for _ in range(6):
            sample = source.get()
            if sample.version == 1:
                break
    assert first.version == 0 and sample.version == 1
    now, initial, rec = scored_by_live(sample)
    assert torch.allclose(sample.logp_old, now, atol=1e-5)  # sampled and scored by the refreshed LLM
    assert not torch.allclose(sample.logp_old, initial, atol=1e-3)
    assert torch.allclose(sample.log_p_rec, rec, atol=1e-5)  # rewarded by the refreshed recommender
    _, initial_first, _ = scored_by_live(first)
    assert torch.allclose(first.logp_old, initial_first, atol=1e-5)  # the first sample: the initial LLM


def test_default_refresh_interval_refreshes_a_short_run_and_a_run_that_cannot_says_so(caplog):
    import logging

    assert resolve_refresh_interval(None, 20) == 4  # the CPU default: refreshed after iterations 4, 8, 12, 16
    assert resolve_refresh_interval(None, 1000) == 50  # the paper's interval once the budget allows
    for iterations in (2, 5, 20, 49, 250, 1000):
        interval = resolve_refresh_interval(None, iterations)
        assert (iterations - 1) // interval >= min(4, iterations - 1)  # refreshes that a later sample can use
    logger = logging.getLogger("test_seralm")
    with caplog.at_level("WARNING", logger="test_seralm"):
        assert resolve_refresh_interval(10, 20, logger=logger) == 10
        assert "never refreshed" not in caplog.text
        assert resolve_refresh_interval(None, 20, slow=True, logger=logger) == 240  # the paper's 60x ablation
    assert caplog.text.count("never refreshed") == 1


def test_aligned_adapter_is_keyed_by_everything_that_shapes_it(seralm_env, monkeypatch):
    """A changed LLM precision, reference, recommender (its encoder, fusion, optimiser, loss) or
    alignment setting aligns anew; what runs only after the alignment, or how fast, does not."""
    from recbole_llm.trainer.alignment import alignment_key

    root, overrides = seralm_env
    monkeypatch.chdir(root)

    def key(**extra):
        return alignment_key(load_config("SeRALM", "tiny", config_dict={**overrides, **extra}), "knowledge-k.jsonl")

    same = key()
    assert key() == same and alignment_key(load_config("SeRALM", "tiny", config_dict=overrides), "other.jsonl") != same
    for changed in ({"reference_config": {"epochs": 2}}, {"MAX_ITEM_LIST_LENGTH": 5}, {"kl_coef": 0.5},
                    {"importance_clip": 0.1}, {"refresh_interval": 7}, {"text_encoder": "another-encoder"},
                    {"encoder_mode": "joint"}, {"knowledge_text_format": "{description}"}, {"knowledge_size": 32},
                    {"fusion_init": "random"}, {"learning_rate": 0.01}, {"train_batch_size": 64},
                    {"loss_type": "BPR", "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1}},
                    {"llm_dtype": "bfloat16"}, {"seed": 7}, {"base_model": "GRU4Rec"}, {"weight_decay": 0.1}):
        assert key(**changed) != same, changed
    for unchanged in ({"epochs": 5}, {"eval_batch_size": 8}, {"num_threads": 1}, {"knowledge_batch_size": 2},
                      {"load_in_4bit": True}):  # 4-bit: this machine cannot quantise, the LLM loads as before
        assert key(**unchanged) == same, unchanged
    monkeypatch.setattr("recbole_llm.llm.backbone.four_bit_available", lambda device: True)
    assert key(load_in_4bit=True) != same


COMMITTED_KNOWLEDGE = Path(__file__).resolve().parents[1] / "dataset" / "ml-100k" / "knowledge"


def test_knowledge_cache_is_keyed_by_precision_and_the_committed_float32_caches_stay_found(tmp_path, monkeypatch):
    """ml-100k's committed knowledge was generated in float32: a float32 run finds it (un-aligned, and
    that of the committed aligned adapter); another precision, or an LLM in 4-bit, addresses another cache."""
    from recbole_llm.knowledge.generation import knowledge_cache_for

    monkeypatch.chdir(tmp_path)

    def final(adapter=None, **extra):
        config = load_config("SeRALM", "ml-100k", config_dict={
            "data_path": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "saved"), "use_gpu": False,
            "knowledge_dir": str(COMMITTED_KNOWLEDGE), "state": "WARNING", **extra})
        return knowledge_cache_for(config, "ml-100k", adapter).final

    float32 = final(llm_dtype="float32")
    assert float32.name == "knowledge-72a893e7f3d8d22d.jsonl" and float32.is_file()
    aligned = adapter_dir_fingerprint(COMMITTED_KNOWLEDGE / "aligned-SASRec-892d42f840e2")  # the first alignment's
    assert final(aligned, llm_dtype="float32").name == "knowledge-8c0b121373990e78.jsonl"
    assert final(llm_dtype="bfloat16") != float32
    assert final(llm_dtype="float32", load_in_4bit=True) == float32  # no CUDA here: it loads in float32
    monkeypatch.setattr("recbole_llm.llm.backbone.four_bit_available", lambda device: True)
    assert final(llm_dtype="float32", load_in_4bit=True) != float32



def test_copied_placeholders_fall_back_to_the_items_own_fields():
    """SmolLM2-135M often answers with the prompt's own example values; those carry nothing
    about the item, so its knowledge text becomes its fields instead."""
    fields = {"title": "Heavyweights", "year": "1994", "genres": "Children's, Comedy"}
    copied = {"description": "A description of the movie",
              "summarization": "A summary of what types of users would enjoy this movie."}
    assert knowledge_text(copied, fields=fields) == "Heavyweights, 1994, Children's, Comedy"
    half = {**copied, "description": "A camp comedy about a summer fat camp."}
    assert knowledge_text(half, fields=fields) == "A camp comedy about a summer fat camp."
    real = {"description": "A camp comedy.", "summarization": "Families with kids."}
    assert knowledge_text(real, fields=fields) == "A camp comedy. Families with kids."
    assert knowledge_text(None) == ""


def test_generation_command_line_reads_key_value_settings_as_recbole_does(seralm_env, monkeypatch, tmp_path):
    """``python -m recbole_llm.knowledge.generation``: --key=value reaches the config through RecBole's
    own command-line reading (the one parser), the flags through argparse; --key value is refused."""
    import yaml

    from recbole_llm.errors import InputError
    from recbole_llm.knowledge.cli import main

    root, overrides = seralm_env
    monkeypatch.chdir(root)
    files = tmp_path / "tiny.yaml"
    files.write_text(yaml.safe_dump({k: v for k, v in overrides.items() if k not in ("llm_path", "knowledge_dir")}))
    out = tmp_path / "from_the_command_line"
    main(["--dataset", "tiny", "--llm_path", overrides["llm_path"], "--max_new_tokens", "3",
          "--config_files", str(files), f"--knowledge_dir={out}", "--knowledge_batch_size=64"])
    meta = json.loads(next(out.glob("knowledge-*.meta.json")).read_text())
    assert meta["decoding"]["max_new_tokens"] == 3 and meta["items"] > 0
    with pytest.raises(InputError, match="--knowledge_dir"):
        main(["--dataset", "tiny", "--config_files", str(files), "--knowledge_dir", str(out)])


def test_retired_ratio_baseline_stops_the_run_with_one_line(seralm_env, monkeypatch):
    from recbole_llm.errors import InputError

    root, overrides = seralm_env
    monkeypatch.chdir(root)
    with pytest.raises(InputError, match=r"^ratio_baseline \(in config_dict\) is retired: .*current knowledge") as error:
        load_config("SeRALM", "tiny", config_dict={**overrides, "ratio_baseline": 0.0})
    assert "\n" not in str(error.value)


def test_two_trainers_started_in_the_same_second_save_different_checkpoints(seralm_env, monkeypatch):
    import recbole.trainer.trainer

    monkeypatch.setattr(recbole.trainer.trainer, "get_local_time", lambda: "Dec-06-2026_23-00-00")  # the same second
    config, model, _ = _build(seralm_env, monkeypatch, base_model="GRU4Rec")
    first, second = SeRALMTrainer(config, model), SeRALMTrainer(config, model)
    assert first.saved_model_file != second.saved_model_file
    assert first.saved_model_file.startswith(f"{config['checkpoint_dir']}/SeRALM-Dec-06-2026_23-00-00")


def test_fields_control_encodes_each_items_own_fields_without_the_llm(seralm_env, monkeypatch):
    """``knowledge_source: fields``: every item's knowledge vector is the encoding of its own fields' text (the
    fallback text of an unusable LLM answer), and no LLM knowledge is read or generated; with alignment or an
    adapter it stops with one line before anything is built.

    Caught: the LLM's knowledge read anyway (dataset_knowledge called), another text than the fields'."""
    import recbole_llm.model.seralm as seralm_module
    from recbole_llm.errors import InputError
    from recbole_llm.model.seralm import frozen_encoder

    def no_llm(*args, **kwargs):
        raise AssertionError("knowledge_source: fields read the LLM's knowledge")

    monkeypatch.setattr(seralm_module, "dataset_knowledge", no_llm)
    config, model, _ = _build(seralm_env, monkeypatch, base_model="SASRec", knowledge_source="fields",
                              alignment_iterations=0)
    expected = [", ".join(fields.values()) for fields in model.item_fields[1:]]
    assert all(expected) and model.knowledge_file is None
    encoded = frozen_encoder(config["text_encoder"], "cpu").encode(expected)
    assert torch.allclose(model.fused.knowledge[1:], encoded, atol=1e-5) and not model.fused.knowledge[0].any()
    root, overrides = seralm_env
    for wrong in ({"alignment_iterations": 5}, {"alignment_iterations": 0, "llm_adapter": str(root)}):
        with pytest.raises(InputError, match="^knowledge_source=fields .* set alignment_iterations: 0") as error:
            load_config("SeRALM", "tiny", config_dict={**overrides, "knowledge_source": "fields", **wrong})
        assert "\n" not in str(error.value)
