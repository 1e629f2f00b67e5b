"""The precision paths of every LLM model, on the tiny Llama on this CPU: ``llm_dtype: auto`` on a CPU that
reports bf16 units (bfloat16 autocast over float32 master weights, frozen decoder layers stored in bfloat16; the
report is patched, autocast runs on any CPU),
``llm_dtype: bfloat16``, and ``load_in_4bit`` (NF4 through bitsandbytes). Each model trains one step and evaluates; knowledge
generation generates. Scores, losses and heads stay float32 whatever the LLM's dtype
(``precision.to_llm`` / ``precision.from_llm``, the one place where the two sides meet).

4-bit on a CPU: the project falls back to full-precision LoRA without CUDA (tested below), so these
tests let bitsandbytes' CPU backend quantise (``four_bit_available`` patched to yes). If bitsandbytes
is missing, or one of its ops fails on this CPU, the test skips with that exact failure.

Breakages checked by hand (caught): ``Precision.apply`` registering no hooks (autocast: the attention
ran in float32); the hooks wrapping the whole causal LM instead of its decoder (autocast: LM-head logits
in bfloat16); ``to_llm`` returning its input unchanged (bf16 E4SRec and Laser:
dtype error in the LLM); ``from_llm`` returning its input unchanged (bf16 LlamaRec and Laser: dtype error
in the float32 heads).
"""
import contextlib
import importlib.metadata
import logging
import traceback

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from conftest import first_batch
from recbole_llm import load_config, registry
from recbole_llm.llm import backbone
from recbole_llm.llm import precision as llm_precision

PRECISIONS = {"autocast": {"llm_dtype": "auto"}, "bfloat16": {"llm_dtype": "bfloat16"},
              "4bit": {"llm_dtype": "bfloat16", "load_in_4bit": True}}
FALLBACK_LINE = "load_in_4bit needs CUDA and bitsandbytes; falling back to LoRA in full precision on cpu"
TINY_LLM = {"lora_r": 4, "lora_alpha": 8}
SETTINGS = {
    "LlamaRec": {**TINY_LLM, "candidate_k": 4, "retriever_config": {"epochs": 1}},
    "E4SRec": {**TINY_LLM, "id_model_config": {"epochs": 1}, "train_rows_per_epoch": None},
    "Laser": {"id_model_config": {"epochs": 1, "train_batch_size": 64, "stopping_step": 1}, "history_titles": 4,
              "title_max_tokens": 6, "n_experts": 2, "n_queries": 2, "router_top_k": 1, "suffix_tokens": 2,
              "llm_layers": None, "train_rows_per_epoch": None},
}


@pytest.fixture(params=list(PRECISIONS))
def precision(request, monkeypatch):
    """(name, settings); for autocast this CPU reports bf16 units; for 4-bit, bitsandbytes' CPU
    backend stands in for CUDA."""
    if request.param == "autocast":
        monkeypatch.setattr(llm_precision, "cpu_bf16_units", lambda: "AMX")
    if request.param == "4bit":
        try:
            importlib.metadata.version("bitsandbytes")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("bitsandbytes is not installed (pip install -e .[qlora]): the 4-bit path cannot run")
        monkeypatch.setattr(backbone, "four_bit_available", lambda device: True)
    return request.param, PRECISIONS[request.param]


@contextlib.contextmanager
def bitsandbytes_ops():
    """Run our code; an error raised inside bitsandbytes (an op this CPU cannot run) skips the test
    with that error and the bitsandbytes frame it came from, rather than failing or hiding it."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - re-raised unless bitsandbytes raised it
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "bitsandbytes" in f.filename]
        if not frames:
            raise
        version = importlib.metadata.version("bitsandbytes")
        where = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno} {frames[-1].name}"
        pytest.skip(f"bitsandbytes {version} cannot run on this CPU: {type(error).__name__}: {error} (at {where})")


def assert_llm_precision(llm, name):
    """The LLM really is in bf16 (its attention weights) or really quantised to 4-bit NF4."""
    if name == "4bit":
        import bitsandbytes as bnb

        quantised = [m for m in llm.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert quantised, "load_in_4bit gave no Linear4bit layer"
        assert all(m.weight.quant_type == "nf4" and m.compute_dtype == torch.bfloat16 for m in quantised)
    else:  # under autocast the frozen projections are stored in bf16 and the embeddings stay float32
        weights = [m.weight for name_, m in llm.named_modules() if name_.endswith("k_proj")]
        assert weights and all(w.dtype == torch.bfloat16 for w in weights)
        embedding_dtype = torch.float32 if name == "autocast" else torch.bfloat16
        assert llm.get_input_embeddings().weight.dtype == embedding_dtype


def watch_dtypes(llm, seen):
    """Record in ``seen`` the dtypes that ``llm``'s attention key projections and its LM head (where
    it keeps one) return: ``{"attention": {...}, "lm_head": {...}}``. Returns the hook handles."""
    handles = []
    for name, module in llm.named_modules():
        part = "attention" if name.endswith("k_proj") else "lm_head" if name.endswith("lm_head") else None
        if part and isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(lambda m, a, out, part=part: seen[part].add(out.dtype)))
    return handles


@contextlib.contextmanager
def computed_dtypes(llm):
    """:func:`watch_dtypes` while the block runs."""
    seen = {"attention": set(), "lm_head": set()}
    handles = watch_dtypes(llm, seen)
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def assert_computed_in(seen, name):
    """bf16 attention for autocast and bfloat16; the LM head's logits float32 under autocast."""
    if name == "4bit":
        return
    assert seen["attention"] == {torch.bfloat16}, seen
    if name == "autocast" and seen["lm_head"]:
        assert seen["lm_head"] == {torch.float32}, seen


def _build(model_name, tiny_data, tiny_llama_dir, extra):
    name, overrides = tiny_data
    config = load_config(model_name, name, config_dict={**overrides, "llm_path": str(tiny_llama_dir),
                                                        **SETTINGS.get(model_name, {}), **extra})
    train, valid, test = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    return config, registry.get_model(model_name)(config, train._dataset), (train, valid, test)


def _llm(model):
    return model.llm


@pytest.mark.parametrize("model_name", ["LlamaRec", "E4SRec", "Laser"])
def test_model_trains_one_step_and_evaluates(model_name, precision, tiny_data, tiny_llama_dir):
    name, extra = precision
    with bitsandbytes_ops():
        config, model, (train, _, test) = _build(model_name, tiny_data, tiny_llama_dir, extra)
        assert_llm_precision(_llm(model), name)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in trainable.values())  # LoRA and heads train in float32
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        with computed_dtypes(model) as training:
            loss = model.calculate_loss(first_batch(train))
            loss = sum(loss) if isinstance(loss, tuple) else loss  # Laser returns its loss parts, as RecBole allows
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            loss.backward()
        assert_computed_in(training, name)
        optimizer.step()
        moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
        assert moved, "one step changed no trainable parameter"
        model.eval()
        interaction = first_batch(test)
        with torch.no_grad(), computed_dtypes(model) as scoring:
            scores = model.full_sort_predict(interaction)
    assert_computed_in(scoring, name)
    if model_name == "LlamaRec" and name == "autocast":
        assert scoring["lm_head"] == {torch.float32}  # the letter logits that rank the candidates
    assert scores.shape == (len(interaction), model.n_items) and scores.dtype == torch.float32
    assert torch.isfinite(scores[:, 1:]).all()


SERALM = {
    "user_inter_num_interval": None, "item_inter_num_interval": None, "MAX_ITEM_LIST_LENGTH": 8, "epochs": 1,
    "knowledge_max_new_tokens": 4, "base_model": "SASRec", "reference_config": {"epochs": 1},
    "alignment_iterations": 1, "warmup_epochs": 0, "align_batch_size": 2, "align_max_new_tokens": 4,
    "generator_mode": "sync", "lora_r": 4,
}


def _seralm_config(tiny_data, tiny_llama_dir, tmp_path, extra):
    name, overrides = tiny_data
    settings = {**overrides, **SERALM, "llm_path": str(tiny_llama_dir), "knowledge_dir": str(tmp_path / "knowledge"),
                "knowledge_vector_dir": str(tmp_path / "vectors"), **extra}
    return load_config("SeRALM", name, config_dict=settings)


def test_knowledge_generation_generates(precision, tiny_data, tiny_llama_dir, tmp_path):
    from recbole_llm.knowledge.generation import dataset_items, generate_knowledge, knowledge_cache_for, load_generator

    name, extra = precision
    config = _seralm_config(tiny_data, tiny_llama_dir, tmp_path, extra)
    dataset = create_dataset(config)
    items = dataset_items(dataset, dict(config["knowledge_fields"]))[:3]
    with bitsandbytes_ops():
        generator = load_generator(config)
        with computed_dtypes(generator.model) as generating:
            records = generate_knowledge(generator, items, knowledge_cache_for(config, "tiny", None),
                                         show_progress=False)
    if name == "autocast":  # generation only: float32 on every CPU, so the cached text does not depend on the CPU
        assert all(p.dtype == torch.float32 for p in generator.model.parameters())
        assert generating["attention"] == {torch.float32}
    else:
        assert_llm_precision(generator.model, name)
        assert_computed_in(generating, name)
    assert sorted(records) == sorted(token for _, token, _ in items)
    assert all(record["raw"] for record in records.values())  # every item got an answer from the LLM


def test_seralm_aligns_one_iteration_and_evaluates(precision, tiny_data, tiny_llama_dir, tmp_path, monkeypatch):
    from recbole_llm.model.seralm import SeRALM

    name, extra = precision
    config = _seralm_config(tiny_data, tiny_llama_dir, tmp_path, extra)
    train, valid, test = data_preparation(config, create_dataset(config))
    loaded, aligning = [], {"attention": set(), "lm_head": set()}
    load_llm = backbone.load_llm

    def watched_load_llm(*args, **kwargs):
        loaded.append(load_llm(*args, **kwargs))
        watch_dtypes(loaded[-1][0], aligning)
        return loaded[-1]

    monkeypatch.setattr(backbone, "load_llm", watched_load_llm)
    with bitsandbytes_ops():
        model = SeRALM(config, train._dataset)  # generates the un-aligned knowledge with the LLM
        trainer = registry.get_trainer(SeRALM)(config, model)
        trainer.fit(train, valid, saved=False, show_progress=False)  # aligns, regenerates, trains
        result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    if name == "autocast":  # the aligned (trained) LLM autocasts (its attention computes in bf16, in a mix with
        # the float32 generator)
        assert {llm.get_input_embeddings().weight.dtype for llm, _ in loaded} == {torch.float32}
        assert torch.bfloat16 in aligning["attention"]
    else:
        assert loaded and all(assert_llm_precision(llm, name) is None for llm, _ in loaded)
        assert_computed_in(aligning, name)
    assert trainer.alignment_stats["iterations"] == 1 and torch.isfinite(torch.tensor(trainer.alignment_stats["kl"]))
    assert all(torch.isfinite(torch.tensor(value)) for value in result.values())  # scores read in float32, no NaN


def test_4bit_without_cuda_falls_back_to_lora_with_one_line(tiny_data, tiny_llama_dir, caplog, monkeypatch):
    """No CUDA: ``load_in_4bit`` says once that it uses LoRA in full precision, and the model trains as LoRA."""
    from recbole_llm import errors
    from recbole_llm.llm.preflight import check_llm_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(errors, "_warned", set())  # the line is said once per process: count it in this one

    name, overrides = tiny_data
    config = load_config("E4SRec", name, config_dict={**overrides, "llm_path": str(tiny_llama_dir),
                                                      **SETTINGS["E4SRec"], "load_in_4bit": True})
    with caplog.at_level(logging.WARNING):
        check_llm_settings(config)  # what every entry point runs before stage 1
        train, _, _ = data_preparation(config, create_dataset(config))
        model = registry.get_model("E4SRec")(config, train._dataset)
    assert [r.getMessage() for r in caplog.records].count(FALLBACK_LINE) == 1
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert model.llm.get_input_embeddings().weight.dtype == torch.float32
