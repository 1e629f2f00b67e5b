"""Tests for recbole_llm.llm: model resolution and loading (backbone), the embedded-model cache (embedded),
the compute precision (precision), LoRA and layer cutting (lora), 4-bit fallback."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from recbole_llm.llm import backbone, embedded, precision
from recbole_llm.llm.backbone import load_causal_lm, resolve_llm_path, set_num_threads
from recbole_llm.llm.embedded import EMBEDDED_LLM
from recbole_llm.llm.lora import apply_lora, keep_first_layers
from recbole_llm.llm.precision import cpu_bf16_units as reported_cpu_bf16_units  # before conftest's patch
from tiny_models import tiny_llama

FALLBACK_LINE = "load_in_4bit needs CUDA and bitsandbytes; falling back to LoRA in full precision on cpu"


def _fail_if_converted(*args, **kwargs):
    raise AssertionError("the GGUF file was converted again although the cache was complete")


def _copy_converted_model(converted_dir):
    """A stand-in for the GGUF conversion that copies an already converted model (keeps tests fast)."""

    def convert(gguf_path, output_dir):
        for name in os.listdir(converted_dir):
            if name != embedded.CACHE_SOURCE_FILE:
                shutil.copy(os.path.join(converted_dir, name), output_dir)

    return convert


def test_tiny_llama_forward_with_embedded_tokenizer(embedded_tokenizer):
    model = tiny_llama(embedded_tokenizer)
    batch = embedded_tokenizer(["### Response:\nA", "A"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(embedded_tokenizer))
    assert torch.isfinite(logits).all()
    assert model.config.pad_token_id == embedded_tokenizer.pad_token_id
    assert embedded_tokenizer.padding_side == "left"
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is padded on the left


def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, second = tiny_llama(100, seed=7), tiny_llama(100, seed=7)
    assert torch.rand(1) == expected_next
    assert torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)


def test_keep_first_layers_is_the_same_as_a_shallower_llm():
    """The cut LLM computes what an LLM built with only those layers (same weights) computes."""
    deep, shallow = tiny_llama(100, layers=3, seed=3), tiny_llama(100, layers=1, seed=3)
    shallow.load_state_dict({k: v for k, v in deep.state_dict().items() if ".layers.1." not in k and ".layers.2." not in k})
    assert keep_first_layers(deep.get_decoder(), 1) == 3
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(deep(input_ids=ids).logits, shallow(input_ids=ids).logits)
    assert deep.config.num_hidden_layers == 1
    assert keep_first_layers(deep.get_decoder(), None) == 1  # None keeps all


@pytest.mark.parametrize("n_layers", [0.5, 4, -1])
def test_keep_first_layers_rejects_impossible_depths(n_layers):
    with pytest.raises(ValueError, match="llm_layers must be an int between 1 and 3"):
        keep_first_layers(tiny_llama(100, layers=3).get_decoder(), n_layers)


def test_missing_local_path_names_llm_path(tmp_path):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="llm_path") as error:
        resolve_llm_path(missing)
    assert missing in str(error.value)


def test_existing_local_dir_and_hub_name_are_returned_as_is(tmp_path):
    assert resolve_llm_path(str(tmp_path)) == str(tmp_path)
    assert resolve_llm_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_unknown_hub_name_offline_names_llm_path():
    with pytest.raises(OSError, match="llm_path") as error:
        load_causal_lm("recbole-llm-test/no-such-model")
    assert "offline" in str(error.value)


def test_apply_lora_rejects_unknown_target_listing_real_names():
    with pytest.raises(ValueError, match="bogus_proj") as error:
        apply_lora(tiny_llama(64), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "bogus_proj"])
    message = str(error.value)
    for real_name in ("q_proj", "k_proj", "v_proj", "o_proj", "lm_head"):
        assert real_name in message


def test_apply_lora_freezes_base_weights():
    peft_model = apply_lora(tiny_llama(64), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    named = dict(peft_model.named_parameters())
    lora_params = {name: p for name, p in named.items() if "lora_" in name}
    base_params = {name: p for name, p in named.items() if "lora_" not in name}
    assert lora_params and base_params
    assert all(p.requires_grad for p in lora_params.values())
    assert not any(p.requires_grad for p in base_params.values())


def test_load_in_4bit_on_cpu_falls_back_with_one_log_line(tiny_llama_dir, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="recbole_llm"):
        model, tokenizer = load_causal_lm(str(tiny_llama_dir), load_in_4bit=True)
    fallback_lines = [record for record in caplog.records if record.getMessage() == FALLBACK_LINE]
    assert len(fallback_lines) == 1
    assert model.dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_load_causal_lm_uses_given_logger_and_no_warning_without_4bit(tiny_llama_dir, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    test_logger = logging.getLogger("recbole_llm.test_backbone")
    with caplog.at_level(logging.WARNING):
        load_causal_lm(str(tiny_llama_dir), load_in_4bit=False, logger=test_logger)
        assert not caplog.records
        load_causal_lm(str(tiny_llama_dir), load_in_4bit=True, logger=test_logger)
    assert [record.name for record in caplog.records] == ["recbole_llm.test_backbone"]


@pytest.mark.parametrize("amx, avx512_bf16, onednn_bf16, expected", [
    (True, True, True, "AMX"), (False, True, True, "AVX512-BF16"), (False, False, True, None),
    # units that torch's bf16 matmuls cannot reach (oneDNN missing or held to AVX2): its generic kernel, 400x slower
    (True, True, False, None), (False, True, False, None)])
def test_cpu_bf16_units_come_from_what_torch_reports(amx, avx512_bf16, onednn_bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(precision, "_onednn_bf16", lambda: onednn_bf16)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    assert reported_cpu_bf16_units() == expected


def test_onednn_bf16_follows_onednns_instruction_set_limit():
    """torch's own report, read in fresh processes: oneDNN held to AVX2 cannot reach bf16 units."""
    probe = [sys.executable, "-c", "from recbole_llm.llm.precision import _onednn_bf16; print(_onednn_bf16())"]
    limited = subprocess.run(probe, env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}, capture_output=True, text=True,
                             check=True)
    assert limited.stdout.strip() == "False"


def test_arm_bf16_units_come_from_the_kernels_feature_list(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"fp", "asimd", "bf16"})
    assert reported_cpu_bf16_units() == "Arm BF16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"fp", "asimd"})
    assert reported_cpu_bf16_units() is None


@pytest.mark.parametrize("units", ["AMX", None])
def test_auto_precision_follows_the_cpus_bf16_units_and_float32_forces_float32(units, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: units)
    auto = precision.resolve_precision("auto", "cpu")
    assert auto.weights == torch.float32  # master weights: what the optimiser updates stays float32
    assert auto.autocast == (torch.bfloat16 if units else None)
    assert (units or "without bf16 units") in auto.describe()
    forced = precision.resolve_precision("float32", "cpu")
    assert (forced.weights, forced.autocast) == (torch.float32, None)
    generating = precision.resolve_precision("auto", "cpu", inference_only=True)  # the same text on every CPU
    assert (generating.weights, generating.autocast) == (torch.float32, None)
    monkeypatch.setattr(precision, "cuda_bf16_native", lambda device: True)
    on_cuda = precision.resolve_precision("auto", "cuda:0")
    assert (on_cuda.weights, on_cuda.autocast) == (torch.bfloat16, None)
    assert precision.resolve_precision("bfloat16", "cpu").weights == torch.bfloat16


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_on_cuda_is_bf16_only_where_the_gpu_has_bf16_units(capability, expected, monkeypatch):
    """A T4 (7.5) or V100 (7.0) emulates bf16: ``auto`` takes its float16 units there, and says why."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    chosen = precision.resolve_precision("auto", "cuda:0")
    assert (chosen.weights, chosen.autocast) == (expected, None)
    assert ("without" in chosen.describe()) == (expected == torch.float16)
    assert precision.resolve_precision("float32", "cuda:0").weights == torch.float32


def test_autocast_decoder_computes_in_bf16_and_returns_float32(tiny_llama_dir, caplog, monkeypatch):
    """The load logs the compute dtype and why; the decoder's projections run in bf16, its output
    and the LM head's logits are float32, and the same model in float32 scores almost the same."""
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")
    with caplog.at_level(logging.INFO, logger="recbole_llm"):
        model, _ = load_causal_lm(str(tiny_llama_dir))
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("LLM compute:")] == [
        "LLM compute: bfloat16 autocast over float32 weights (llm_dtype: auto on a CPU with AMX bf16 units; "
        "llm_dtype: float32 forces float32)"]
    projected = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: projected.append(out.dtype))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        logits = model(input_ids=ids).logits
    assert projected == [torch.bfloat16, torch.bfloat16]
    assert hidden.dtype == torch.float32 and logits.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")  # the hooks left autocast as they found it
    exact, _ = load_causal_lm(str(tiny_llama_dir), dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(exact(input_ids=ids).logits, logits, atol=0.05, rtol=0.05)


def test_frozen_layers_stored_in_bf16_compute_exactly_as_autocast(tiny_llama_dir, monkeypatch):
    """Under autocast, ``load_llm`` stores the frozen Linear layers of the decoder in bf16 (once, not at
    every call) and keeps LoRA, the embeddings and the LM head float32; logits and LoRA gradients are
    exactly those of autocast over float32 weights. Breakages checked by hand (caught): no cast (the
    frozen projections stay float32), casting the LoRA layers too, casting to float16."""
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AMX")
    config = {"llm_path": str(tiny_llama_dir), "llm_dtype": "auto", "load_in_4bit": False,
              "gradient_checkpointing": False, "num_threads": None, "device": "cpu"}
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "down_proj"]}
    ids = torch.tensor([[5, 6, 7, 8, 9]])

    def logits_and_lora_grads():
        torch.manual_seed(0)
        model, _ = backbone.load_llm(config, lora=lora)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give A a gradient too
                torch.nn.init.normal_(parameter)
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        return model, logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    stored, logits, grads = logits_and_lora_grads()
    decoder = stored.get_decoder()
    frozen = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert frozen and all(m.weight.dtype == torch.bfloat16 for m in frozen)
    assert grads and all(p.dtype == torch.float32 for n, p in stored.named_parameters() if p.requires_grad)
    assert stored.get_input_embeddings().weight.dtype == stored.get_output_embeddings().weight.dtype == torch.float32
    assert logits.dtype == torch.float32

    monkeypatch.setattr(precision.Precision, "store_frozen", lambda self, decoder: None)
    per_call, logits_cast, grads_cast = logits_and_lora_grads()
    assert all(m.weight.dtype == torch.float32 for m in per_call.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    assert torch.equal(logits, logits_cast)
    assert grads.keys() == grads_cast.keys() and all(torch.equal(grads[n], grads_cast[n]) for n in grads)


def test_set_num_threads_keeps_default_for_none_and_zero():
    threads_before = torch.get_num_threads()
    set_num_threads(None)
    set_num_threads(0)
    assert torch.get_num_threads() == threads_before
    set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads_before)


def test_embedded_cache_is_a_plain_model_dir_and_is_reused(embedded_llm_cache, monkeypatch):
    model_dir = resolve_llm_path(None, cache_dir=str(embedded_llm_cache))
    assert model_dir == os.path.join(str(embedded_llm_cache), EMBEDDED_LLM)
    assert os.path.isfile(os.path.join(model_dir, "config.json"))
    assert os.path.isfile(os.path.join(model_dir, "model.safetensors"))
    config_mtime = os.stat(os.path.join(model_dir, "config.json")).st_mtime_ns

    monkeypatch.setattr(embedded, "_convert_gguf", _fail_if_converted)
    for alias in ("", "embedded", EMBEDDED_LLM):
        assert resolve_llm_path(alias, cache_dir=str(embedded_llm_cache)) == model_dir
    assert os.stat(os.path.join(model_dir, "config.json")).st_mtime_ns == config_mtime
    assert not [name for name in os.listdir(embedded_llm_cache) if name.startswith(".")]  # no temp dirs left


def test_embedded_cache_default_dir_from_env(embedded_llm_cache, monkeypatch):
    monkeypatch.setattr(embedded, "_convert_gguf", _fail_if_converted)
    monkeypatch.setenv("RECBOLE_LLM_CACHE", str(embedded_llm_cache))
    assert resolve_llm_path(None) == os.path.join(str(embedded_llm_cache), EMBEDDED_LLM)


@pytest.mark.parametrize("damage", ["delete_weights", "delete_config", "stale_source"])
def test_incomplete_or_stale_cache_is_rebuilt(embedded_llm_cache, tmp_path, monkeypatch, damage):
    converted_dir = os.path.join(str(embedded_llm_cache), EMBEDDED_LLM)
    damaged_dir = tmp_path / EMBEDDED_LLM
    shutil.copytree(converted_dir, damaged_dir)
    if damage == "delete_weights":
        (damaged_dir / "model.safetensors").unlink()
    elif damage == "delete_config":
        (damaged_dir / "config.json").unlink()
    else:
        (damaged_dir / embedded.CACHE_SOURCE_FILE).write_text('{"version": "0.0.0"}')
    monkeypatch.setattr(embedded, "_convert_gguf", _copy_converted_model(converted_dir))

    assert resolve_llm_path(None, cache_dir=str(tmp_path)) == str(damaged_dir)
    assert (damaged_dir / "config.json").is_file() and (damaged_dir / "model.safetensors").is_file()
    assert embedded._is_complete_cache(str(damaged_dir), embedded.embedded_gguf_source()[1])
    assert sorted(os.listdir(tmp_path)) == [EMBEDDED_LLM, f"{EMBEDDED_LLM}.lock"]  # no temp dir left


def test_embedded_model_loads_from_cache(embedded_llm_cache):
    model, tokenizer = load_causal_lm(None, cache_dir=str(embedded_llm_cache))
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    batch = tokenizer(["### Response:\nA"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch, logits_to_keep=1).logits
    assert logits.shape == (1, 1, model.config.vocab_size)
