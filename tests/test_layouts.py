"""Any causal LM layout transformers loads, through every LLM model: Llama-style with grouped-query
attention (Mistral), Qwen2 (q/k/v bias), GPT-2 (Conv1D layers under ``h``, a tokenizer without a pad
token), GPT-NeoX (fused ``query_key_value``) and Phi, as tiny random models.

Each mechanism test was checked by breaking the mechanism by hand; its docstring names the breakages it caught."""
import copy

import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_llm import load_config, registry
from recbole_llm.errors import InputError
from recbole_llm.llm.backbone import load_tokenizer
from recbole_llm.llm.lora import apply_lora, decoder_layers, keep_first_layers
from conftest import first_batch, total_loss, write_tiny_dataset
from tiny_models import tiny_causal_lm, tiny_llama

#: layout -> a layer of PEFT's LoRA targets for it (what the Llama-named defaults give way to where it lacks them).
LAYOUTS = {"mistral": "q_proj", "qwen2": "q_proj", "gpt2": "c_attn", "gpt_neox": "query_key_value", "phi": "q_proj"}
#: The layouts with Llama's MLP names, where E4SRec keeps its (the authors') gate/up/down targets.
LLAMA_MLP = ("mistral", "qwen2")
MODELS = {
    "LlamaRec": {"retriever_config": {"epochs": 1}, "candidate_k": 5},
    "E4SRec": {"id_model_config": {"epochs": 1}, "lora_r": 4, "llm_layers": 1},
    "Laser": {"id_model_config": {"epochs": 1}, "llm_layers": 1, "title_max_tokens": 6, "history_titles": 4},
    "SeRALM": {"knowledge_max_new_tokens": 4, "reference_config": {"epochs": 1}},
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, embedded_tokenizer):
    """Tiny data and one model folder per layout (GPT-2's tokenizer has no pad token); settings."""
    root = tmp_path_factory.mktemp("layouts")
    write_tiny_dataset(root / "data")
    folders = {}
    for layout in LAYOUTS:
        tokenizer = copy.deepcopy(embedded_tokenizer)
        if layout == "gpt2":
            tokenizer.pad_token = None
        folders[layout] = root / layout
        tiny_causal_lm(layout, tokenizer).save_pretrained(folders[layout])
        tokenizer.save_pretrained(folders[layout])
    settings = {
        "data_path": str(root / "data"), "checkpoint_dir": str(root / "saved"),
        "knowledge_vector_dir": str(root / "vectors"), "knowledge_dir": str(root / "knowledge"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "release_year", "class"]},
        "user_inter_num_interval": None, "item_inter_num_interval": None, "MAX_ITEM_LIST_LENGTH": 8,
        "train_batch_size": 16, "eval_batch_size": 16, "show_progress": False, "use_gpu": False, "state": "WARNING",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        yield folders, settings


def test_a_tokenizer_without_pad_token_pads_with_eos_on_the_left(layouts):
    folders, _ = layouts
    tokenizer = load_tokenizer(str(folders["gpt2"]))
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_every_llm_model_trains_and_ranks_on_every_layout(layouts, model_name, layout):
    """Each model builds on the layout, its loss reaches its trained parts, it scores every item; LoRA sits on
    the layout's own layers (PEFT's targets for it), ``llm_layers`` cuts the layout's layer list.

    Caught: layers looked up as ``decoder.layers`` (GPT-2: AttributeError), Llama names kept on other
    layouts (InputError), the cut depth not applied to GPT-2's ``h``."""
    folders, settings = layouts
    config = load_config(model_name, "tiny", config_dict={**settings, **MODELS[model_name], "llm_path": str(folders[layout])})
    train, _, test = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    model = registry.get_model(model_name)(config, train._dataset)
    model.train()
    total_loss(model.calculate_loss(first_batch(train))).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(first_batch(test))
    assert scores.shape[1] == train._dataset.item_num and torch.isfinite(scores[:, 1:]).all()

    if model_name == "SeRALM":  # its LLM gets LoRA when the alignment loads it
        from recbole_llm.trainer.alignment import SeRALMTrainer

        llm, _ = SeRALMTrainer(config, model).load_llm()
    else:
        llm = getattr(model, "_peft_model", None) or getattr(model, "llm")
    lora_layers = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in llm.named_modules() if name.endswith("lora_A")}
    if model_name != "Laser":  # Laser's LLM stays frozen, without LoRA
        assert ("gate_proj" if model_name == "E4SRec" and layout in LLAMA_MLP else LAYOUTS[layout]) in lora_layers
    if MODELS[model_name].get("llm_layers"):
        decoder = model.llm if model_name == "E4SRec" else model.llm.get_decoder()
        assert len(decoder_layers(decoder)[1]) == 1 and decoder.config.num_hidden_layers == 1


def test_lora_names_of_another_layout_mean_its_own_targets_and_a_partly_wrong_list_is_refused(caplog):
    """Caught: the fallback taken for a list with one real name (a typo passing silently)."""
    gpt2 = tiny_causal_lm("gpt2", 64)
    peft_model = apply_lora(gpt2, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    assert "c_attn" in str(peft_model.peft_config["default"].target_modules)
    assert peft_model.peft_config["default"].fan_in_fan_out  # Conv1D keeps its weight transposed
    with pytest.raises(InputError, match=r"\['q_prj'\] do not exist in LlamaForCausalLM.*'q_proj'"):
        apply_lora(tiny_llama(64), r=2, alpha=4, dropout=0.0, target_modules=["q_prj", "v_proj"])
    with pytest.raises(InputError, match=r"Linear and Conv1D layers are: \['c_attn', 'c_fc', 'c_proj'"):
        apply_lora(tiny_causal_lm("gpt2", 64), r=2, alpha=4, dropout=0.0, target_modules=["c_attn", "wrong"])


def test_llm_layers_on_a_layout_without_one_layer_list_is_refused_with_one_line():
    """Caught: the first ModuleList cut whatever it holds."""
    decoder = tiny_llama(64, layers=2).get_decoder()
    decoder.extra = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])  # two lists of 2 modules
    with pytest.raises(InputError, match="has no single list of its 2 layers to cut; set llm_layers: ~"):
        keep_first_layers(decoder, 1)
    assert keep_first_layers(decoder, None) == 2  # all layers: nothing to find


@pytest.mark.parametrize("layout", ["llama", *LAYOUTS])
def test_int8_copy_quantises_every_projection_of_any_layout(layout):
    """``int8_copy`` (LlamaRec's ``ranker_int8``) leaves no float32 projection in the decoder, GPT-2's Conv1D
    layers included, keeps the LM head float32, and scores as the float32 model does within int8's rounding.
    Breakage checked by hand (caught): GPT-2's Conv1D layers left as they are (nothing of GPT-2 quantised)."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear
    from transformers.pytorch_utils import Conv1D

    from recbole_llm.llm.batching import decoder_body
    from recbole_llm.llm.precision import int8_copy

    model = tiny_causal_lm(layout, 64).eval()
    copy_ = int8_copy(model)
    body = decoder_body(copy_)
    assert not any(isinstance(m, (torch.nn.Linear, Conv1D)) for m in body.modules())
    assert sum(isinstance(m, Int8Linear) for m in body.modules()) >= 4
    assert type(copy_.get_output_embeddings()) is torch.nn.Linear  # the LM head stays float32
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, int8 = model(input_ids=ids).logits[:, -1], copy_(input_ids=ids).logits[:, -1]
    assert torch.corrcoef(torch.stack([full.flatten(), int8.flatten()]))[0, 1] > 0.99
    assert any(isinstance(m, (torch.nn.Linear, Conv1D)) for m in decoder_body(model).modules())  # the original
