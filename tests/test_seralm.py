"""SeRALM: knowledge cache, fused item embedding over RecBole models, alignment losses, async generator."""
import json
import math

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from conftest import first_batch
from torch import nn

from recbole_llm import load_config
from recbole_llm.knowledge.generation import (
    KNOWLEDGE_PROMPT,
    KnowledgeCache,
    KnowledgeGenerator,
    adapter_dir_fingerprint,
    adapter_fingerprint,
    build_prompt,
    cache_key,
    generate_knowledge,
    item_prompt_hash,
    knowledge_text,
    parse_knowledge,
)
from recbole_llm.trainer.alignment import (
    AsyncKnowledgeSource,
    SeRALMTrainer,
    alignment_loss,
    per_token_kl,
    snapshot_module,
    token_log_probs,
)

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
    assert prompt.startswith(KNOWLEDGE_PROMPT.split("{item_json}")[0])
    assert prompt.endswith('{"title": "Titanic", "year": "1997", "genres": "Drama, Romance"}')


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

    from recbole_llm.llm.backbone import apply_lora

    llm = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), 4, 8, 0.0, ["q_proj", "v_proj"])
    assert adapter_fingerprint(llm) is None  # LoRA B = 0: the identity, i.e. the un-aligned LLM
    args = ("tiny", {"llm": "tiny"}, None, KNOWLEDGE_PROMPT, {"title": "movie_title"}, True, {"max_new_tokens": 8})
    base = cache_key(*args)
    assert cache_key(*args) == base
    assert cache_key(args[0], args[1], None, KNOWLEDGE_PROMPT + " Be brief.", *args[4:]) != base
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

    def grad(**kwargs):
        logp_all = theta.log_softmax(0).expand(1, 2, 3)
        logp0_all = theta0.log_softmax(0).expand(1, 2, 3)
        logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        logp0 = logp0_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        full = kwargs.pop("full", False)
        loss, _ = alignment_loss(logp, logp0, mask, log_p_rec, log_p_ref,
                                 kl_tokens=per_token_kl(logp_all, logp0_all) if full else None, **kwargs)
        (g,) = torch.autograd.grad(loss, theta)
        return g

    # Eq. 6 (k = 1): descend on -(p(y|x,s)/p(y|x)) log p(s|x)
    assert torch.allclose(grad(kl_coef=0.0, ratio_baseline=0.0), -2.0 * dlogp_s, atol=1e-6)
    # Eq. 10's baseline: (ratio - 1)
    assert torch.allclose(grad(kl_coef=0.0, ratio_baseline=1.0), -1.0 * dlogp_s, atol=1e-6)
    # Eq. 8 with the exact per-token KL: d KL(p||p0)/d theta = p * (log p/p0 - KL), at each of the 2 tokens
    kl = (p * (p.log() - p0.log())).sum()
    expected = -1.0 * dlogp_s + 0.5 * 2 * p * (p.log() - p0.log() - kl)
    assert torch.allclose(grad(kl_coef=0.5, ratio_baseline=1.0, full=True), expected, atol=1e-6)
    # the sampled-token (score-function) form: sum_t (log p(t) - log p0(t)) * (e_t - p)
    log_ratio = (p.log() - p0.log())[tokens[0]]
    score = sum(r * (torch.nn.functional.one_hot(t, 3).float() - p) for r, t in zip(log_ratio, tokens[0]))
    assert torch.allclose(grad(kl_coef=0.5, ratio_baseline=1.0), -1.0 * dlogp_s + 0.5 * score, atol=1e-6)
    # the ratio clip
    assert torch.allclose(grad(kl_coef=0.0, ratio_baseline=0.0, ratio_clip=1.5), -1.5 * dlogp_s, atol=1e-6)


def test_kl_is_zero_when_the_adapter_is_zero(tiny_llama_dir, embedded_tokenizer):
    from transformers import AutoModelForCausalLM

    from recbole_llm.llm.backbone import apply_lora

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
        loss, stats = alignment_loss(logp, logp0, new_mask, same, same, kl_coef=1.0, ratio_baseline=1.0,
                                     kl_tokens=per_token_kl(logp_all, logp0_all))
        loss.backward()
        sampled, _ = alignment_loss(logp, logp0, new_mask, same, same, kl_coef=1.0, ratio_baseline=1.0)
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
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "release_year"]},
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
    assert scores.shape == (len(interaction), model.n_items) and torch.isfinite(scores).all()
    model.train()
    loss = model.calculate_loss(first_batch(train))
    loss.backward()
    assert torch.isfinite(loss) and fused.fuse.weight.grad[:, size:].abs().sum() > 0  # knowledge gets a gradient
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


def test_alignment_end_to_end_with_the_async_generator(seralm_env, monkeypatch):
    config, model, (train, valid, test) = _build(
        seralm_env, monkeypatch, base_model="SASRec", alignment_iterations=2, warmup_epochs=0, refresh_interval=1,
        align_batch_size=2, align_max_new_tokens=4, generator_mode="async", align_llm_learning_rate=0.05)
    na_file = model.knowledge_file
    trainer = SeRALMTrainer(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    stats = trainer.alignment_stats
    assert stats["iterations"] == 2 and stats["refreshes"] >= 1 and math.isfinite(stats["loss_llm"])
    adapter_dir = trainer.alignment_dir()
    assert (adapter_dir / "adapter_config.json").is_file()
    assert stats["knowledge_file"] != na_file  # regenerated under the aligned adapter's key
    result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    assert 0.0 <= result["ndcg@10"] <= 1.0
    # a second run with the same settings reuses the aligned adapter and its knowledge
    config2, model2, (train2, valid2, _) = _build(
        seralm_env, monkeypatch, base_model="SASRec", alignment_iterations=2, warmup_epochs=0, refresh_interval=1,
        align_batch_size=2, align_max_new_tokens=4, generator_mode="async", align_llm_learning_rate=0.05)
    trainer2 = SeRALMTrainer(config2, model2)
    trainer2.fit(train2, valid2, saved=False, show_progress=False)
    assert trainer2.alignment_stats["reused"] == str(adapter_dir)
    assert trainer2.alignment_stats["knowledge_file"] == stats["knowledge_file"]


def test_aligned_adapter_is_keyed_by_its_inputs(seralm_env, monkeypatch):
    """A changed reference recommender, history length or alignment setting aligns anew."""
    def adapter_dir(**extra):
        config, model, _ = _build(seralm_env, monkeypatch, base_model="SASRec", **extra)
        return SeRALMTrainer(config, model).alignment_dir()

    same = adapter_dir()
    assert adapter_dir() == same
    for changed in ({"reference_config": {"epochs": 2}}, {"MAX_ITEM_LIST_LENGTH": 5}, {"kl_coef": 0.5}):
        assert adapter_dir(**changed) != same, changed


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
