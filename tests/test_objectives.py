"""Training objectives: every model honours the loss_type and negatives a RecBole user sets,
or refuses them with one line before anything trains."""
import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_llm import load_config
from recbole_llm.errors import InputError
from recbole_llm.model.lrurec import LRURec
from conftest import first_batch

NEGATIVES = {"distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False, "candidate_num": 0}


def _prepared(name, overrides, model):
    config = load_config(model, name, config_dict=overrides)
    return config, data_preparation(config, create_dataset(config))


def test_lrurec_bpr_trains_on_sampled_negatives(tiny_data):
    """With loss_type BPR, LRURec gets RecBole's rows of every prefix with a sampled negative,
    and its loss is -log sigmoid(score(target) - score(negative)) at the last position."""
    name, overrides = tiny_data
    config, (train, _, _) = _prepared(name, {**overrides, "loss_type": "BPR", "train_neg_sample_args": NEGATIVES}, "LRURec")
    ce_config, (ce_train, _, _) = _prepared(name, overrides, "LRURec")
    assert len(train.dataset) > len(ce_train.dataset)  # every prefix, not one row per window
    model = LRURec(config, train._dataset).eval()
    batch = first_batch(train)
    assert model.NEG_ITEM_ID in batch.interaction
    user = model.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    scores = model._scores(user)
    pos = scores.gather(1, batch[model.POS_ITEM_ID].unsqueeze(1)).squeeze(1)
    neg = scores.gather(1, batch[model.NEG_ITEM_ID].unsqueeze(1)).squeeze(1)
    expected = -torch.log(1e-10 + torch.sigmoid(pos - neg)).mean()
    assert torch.allclose(model.calculate_loss(batch), expected, atol=1e-5)


def test_lrurec_ce_rejects_sampled_negatives(tiny_data):
    name, overrides = tiny_data
    config = load_config("LRURec", name, config_dict=overrides)
    config["train_neg_sample_args"] = dict(NEGATIVES)  # as a RecBole user's own Config might carry
    train, _, _ = data_preparation(config, create_dataset(config))
    with pytest.raises(InputError, match="train_neg_sample_args: ~"):
        LRURec(config, train._dataset)


@pytest.mark.parametrize("model", ["LlamaRec", "E4SRec", "Laser"])
def test_cross_entropy_models_refuse_bpr_before_stage_1(tiny_data, model, monkeypatch):
    """A loss they cannot train with stops them with one line, before stage 1 trains."""
    import sys

    from recbole_llm.registry import get_model

    name, overrides = tiny_data
    model_class = get_model(model)
    monkeypatch.setattr(sys.modules[model_class.__module__], "pretrained_id_model",
                        lambda *a, **k: pytest.fail("stage 1 ran"))
    config, (train, _, _) = _prepared(name, {**overrides, "loss_type": "BPR", "train_neg_sample_args": NEGATIVES}, model)
    with pytest.raises(InputError, match=f"{model} trains with loss_type CE.*set loss_type: CE"):
        model_class(config, train._dataset)


@pytest.mark.parametrize("model", ["E4SRec", "SeRALM"])
def test_no_model_reads_sampled_negatives_as_next_items(tiny_data, model):
    """RecBole's own default negatives with a cross-entropy model: refused when the config is
    built (RecBole's check for CE models, which a POINTWISE input type would skip)."""
    name, overrides = tiny_data
    with pytest.raises(ValueError, match="train_neg_sample_args"):
        load_config(model, name, config_dict={**overrides, "train_neg_sample_args": NEGATIVES})


def test_seralm_honours_bpr_through_its_base_model(tiny_data, tiny_llama_dir, tmp_path):
    """SeRALM hands loss_type and the negatives to its base model: with BPR the base trains
    on the target's score against RecBole's sampled negative."""
    from recbole_llm.model.seralm import SeRALM

    name, overrides = tiny_data
    overrides = {**overrides, "llm_path": str(tiny_llama_dir), "knowledge_max_new_tokens": 4,
                 "knowledge_dir": str(tmp_path / "knowledge"), "knowledge_vector_dir": str(tmp_path / "vectors"),
                 "loss_type": "BPR", "train_neg_sample_args": NEGATIVES}
    config, (train, _, _) = _prepared(name, overrides, "SeRALM")
    model = SeRALM(config, train._dataset).eval()
    assert model.base.loss_type == "BPR"
    batch = first_batch(train)
    user = model.base.forward(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    table = model.base.item_embedding.weight
    pos = (user * table[batch[model.POS_ITEM_ID]]).sum(-1)
    neg = (user * table[batch[model.NEG_ITEM_ID]]).sum(-1)
    expected = -torch.log(1e-10 + torch.sigmoid(pos - neg)).mean()
    assert torch.allclose(model.calculate_loss(batch), expected, atol=1e-5)
