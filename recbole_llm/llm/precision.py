"""The dtype boundary between the float32 ID side and an LLM of any dtype.

:func:`resolve_precision` turns the ``llm_dtype`` setting into a :class:`Precision` for the
hardware (``auto``: bfloat16 on CUDA, float16 on GPUs older than Ampere, and, through autocast
over float32 weights, on CPUs with bf16 matrix units, :func:`cpu_bf16_units`; float32 elsewhere). :func:`to_llm` and
:func:`from_llm` are the one place where the float32 ID models (embeddings, projections, heads,
losses, RecBole's evaluator) meet the LLM's dtype.
"""
import copy
import hashlib
import platform
import threading
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from recbole_llm.llm.batching import decoder_body


def llm_input_dtype(llm) -> torch.dtype:
    """The dtype ``llm`` (a causal LM, its body or a PEFT model) takes ``inputs_embeds`` in: its
    input embedding's. bfloat16 for a bf16 LLM; float32 for a 4-bit one, whose embeddings and
    norms ``prepare_model_for_kbit_training`` keeps in float32 (its 4-bit layers compute in
    ``llm_dtype`` and hand back their input's dtype)."""
    return llm.get_input_embeddings().weight.dtype


def to_llm(tensor, llm):
    """A float32 tensor of the ID side (projected item embeddings, virtual tokens) in ``llm``'s
    input dtype. With :func:`from_llm`, the one place where the float32 ID models (SASRec,
    LRURec embeddings, projections, heads) meet an LLM of another dtype."""
    return tensor.to(llm_input_dtype(llm))


def from_llm(tensor):
    """An LLM output (hidden states, logits) as float32 for the ID side: heads, softmaxes,
    losses and RecBole's evaluator always run in float32, whatever ``llm_dtype`` is."""
    return tensor.float()


@dataclass(frozen=True)
class Precision:
    """How the LLM computes: ``weights``, the dtype its weights are loaded in (what the optimiser
    updates stays in it: LoRA, prefixes, heads are float32 on a CPU); ``autocast``, the dtype its
    decoder's matrix products run in under ``torch.autocast`` (None: in ``weights``); ``why``,
    the reason, logged at each load."""

    weights: torch.dtype
    autocast: torch.dtype | None
    device_type: str
    why: str

    def describe(self) -> str:
        if self.autocast is None:
            return f"{dtype_name(self.weights)} ({self.why})"
        return (f"{dtype_name(self.autocast)} autocast over {dtype_name(self.weights)} weights "
                f"({self.why}; llm_dtype: float32 forces float32)")

    def apply(self, decoder: nn.Module) -> nn.Module:
        """Run every forward pass of ``decoder`` (the LLM's transformer body) under autocast.

        Forward hooks, so that every caller gets it (a PEFT model, ``generate``, RecBole's own
        Trainer through a model's forward) and nothing else does: the LM head, and every head,
        projection and loss of the ID side, run in float32 outside the decoder, so LlamaRec's
        letter logits and E4SRec's and Laser's item scores are float32. The decoder's output is
        float32 too (the residual stream stays in the weights' dtype). Gradient checkpointing
        recomputes under the autocast state it recorded.
        """
        if self.autocast is None or Precision.of(decoder) == self:
            return decoder
        contexts = threading.local()

        def enter(module, args):
            context = torch.autocast(self.device_type, dtype=self.autocast)
            context.__enter__()
            contexts.__dict__.setdefault("stack", []).append(context)

        def leave(module, args, output):
            contexts.stack.pop().__exit__(None, None, None)

        decoder.register_forward_pre_hook(enter)
        decoder.register_forward_hook(leave, always_call=True)
        decoder._recbole_llm_precision = self
        return decoder

    def store_frozen(self, decoder: nn.Module) -> None:
        """Under autocast, store each frozen Linear (or GPT-2 Conv1D) layer of ``decoder`` in the autocast dtype.

        Autocast casts a float32 weight to bfloat16 at every call (on a CPU, 34% of E4SRec's bf16
        step went to these copies); a frozen weight cast once gives the same products, rounded the
        same way, without the copy and in half the memory. What the optimiser updates (LoRA, any
        trainable layer) keeps float32 master weights, and so do the embeddings, the norms and the
        LM head, which are not Linear layers of the decoder: the residual stream and the scores
        stay float32. Call it once the trainable parameters are set (after LoRA).
        """
        if self.autocast is None:
            return
        from transformers.pytorch_utils import Conv1D  # GPT-2's projections

        for module in decoder.modules():
            if isinstance(module, (nn.Linear, Conv1D)) and not any(p.requires_grad for p in module.parameters()):
                module.to(self.autocast)

    @staticmethod
    def of(decoder: nn.Module):
        """The autocast :class:`Precision` :meth:`apply` gave ``decoder``; None if none."""
        return getattr(decoder, "_recbole_llm_precision", None)


def cpu_bf16_units() -> str | None:
    """The bf16 matrix units this CPU has, as torch reports them (AMX tiles, AVX-512 BF16) or, on
    Arm, as the kernel lists them (the ``bf16`` feature); None for a CPU without (AVX2 only).

    On x86 the units count only when torch's bf16 matrix multiplies reach them, through oneDNN
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: false for a torch built without oneDNN, or with
    oneDNN held below AVX-512 by ``ONEDNN_MAX_CPU_ISA``); otherwise a bf16 matmul takes torch's generic
    kernel: 0.25 GFLOP/s against float32's 100 (2048 x 2048, one thread, a Xeon's kernels held to AVX2)."""
    report = torch.cpu
    units = ("AMX" if getattr(report, "_is_amx_tile_supported", lambda: False)()
             else "AVX512-BF16" if getattr(report, "_is_avx512_bf16_supported", lambda: False)() else None)
    if units:
        return units if _onednn_bf16() else None
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in cpu_flags():
        return "Arm BF16"
    return None


def _onednn_bf16() -> bool:
    """Whether torch runs bf16 matrix multiplies on this CPU through oneDNN (see :func:`cpu_bf16_units`)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's op
        return False


def cuda_bf16_native(device="cuda") -> bool:
    """Whether the CUDA (or ROCm) ``device`` computes bf16 in hardware, as torch reports it: compute capability
    8.0 or above (Ampere on); older GPUs (V100, T4) emulate bf16, slower than their float16 units."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def resolve_precision(llm_dtype="auto", device="cpu", inference_only=False) -> Precision:
    """The :class:`Precision` of the ``llm_dtype`` setting on ``device``.

    ``auto``: bfloat16 weights on CUDA (float16 on a GPU without bf16 units, :func:`cuda_bf16_native`);
    on a CPU with bf16 units (:func:`cpu_bf16_units`),
    float32 weights with bfloat16 autocast (the forward 2.9x faster on 2 AMX cores; what the optimiser
    updates keeps float32 master weights, :func:`~recbole_llm.llm.backbone.load_llm` stores the
    frozen layers in bfloat16);
    float32 on a CPU without bf16 units (it emulates bf16 and gets slower). An LLM that only
    generates (``inference_only``: SeRALM's knowledge) computes in float32 on every CPU: its text is
    cached under the precision that wrote it, and float32 writes the same text on every CPU, so
    knowledge generated on one machine serves all (bf16 weights generated 1.12x faster on 2 AMX
    cores: not worth hours of regeneration per kind of CPU). A dtype name (``float32``,
    ``bfloat16``, ``float16``) loads the weights in that dtype and computes in it, on any device.
    """
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    if llm_dtype in (None, "auto"):
        if device_type == "cuda":
            if cuda_bf16_native(device):
                return Precision(torch.bfloat16, None, device_type, "llm_dtype: auto on a CUDA device with bf16 units")
            return Precision(torch.float16, None, device_type, "llm_dtype: auto on a CUDA device without bf16 units "
                             "(compute capability below 8.0, where bf16 is emulated): its float16 units")
        if inference_only:
            return Precision(torch.float32, None, device_type,
                             "llm_dtype: auto for generation on a CPU: the same text, and cache, on every CPU")
        units = cpu_bf16_units()
        if units:
            return Precision(torch.float32, torch.bfloat16, device_type, f"llm_dtype: auto on a CPU with {units} bf16 units")
        return Precision(torch.float32, None, device_type, "llm_dtype: auto on a CPU without bf16 units")
    if isinstance(llm_dtype, torch.dtype):
        return Precision(llm_dtype, None, device_type, f"llm_dtype: {dtype_name(llm_dtype)}")
    return Precision(getattr(torch, llm_dtype), None, device_type, f"llm_dtype: {llm_dtype}")


def int8_copy(llm: nn.Module) -> nn.Module:
    """A copy of the float32 causal LM ``llm`` (a PEFT model or a plain one) that only scores, on a CPU: its
    LoRA merged into the weights, then every Linear layer of its decoder (GPT-2's Conv1D layers as Linear ones,
    :func:`as_linear_layers`) in dynamic int8 (torch's ``quantize_dynamic``: int8 weights per output channel,
    activations quantised at each call, float32 out).
    The LM head stays float32, so the scores read from its logits have float32 resolution; ``llm`` is left as
    it was (it goes on training). Holds a float32 copy while it quantises, then about a quarter of it."""
    merged = copy.deepcopy(llm)
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    as_linear_layers(decoder_body(merged))
    with warnings.catch_warnings():  # torch 2.13 calls its own quantised-tensor constructors deprecated
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        quantization = torch.ao.quantization
        quantization.quantize_dynamic(decoder_body(merged), {nn.Linear: quantization.per_channel_dynamic_qconfig},
                                      inplace=True)
    return merged.eval().requires_grad_(False)


def adapter_fingerprint(llm: nn.Module) -> str:
    """A digest of the values of ``llm``'s trainable weights (its LoRA): it changes whenever they do, however
    they were changed (an optimiser step, ``load_state_dict``, an assignment), which a copy made from them
    (:func:`int8_copy`) is checked against."""
    digest = hashlib.blake2b(digest_size=16)
    for param in llm.parameters():
        if param.requires_grad:
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def as_linear_layers(module: nn.Module) -> None:
    """Replace, in place, each GPT-2 ``Conv1D`` layer inside ``module`` by the ``nn.Linear`` that computes the
    same (its weight transposed), so that what quantises Linear layers reaches GPT-2's projections too."""
    from transformers.pytorch_utils import Conv1D

    for name, child in list(module.named_children()):
        if isinstance(child, Conv1D):
            n_in, n_out = child.weight.shape
            linear = nn.Linear(n_in, n_out, dtype=child.weight.dtype, device=child.weight.device)
            linear.weight.data, linear.bias.data = child.weight.data.t().contiguous(), child.bias.data
            setattr(module, name, linear)
        else:
            as_linear_layers(child)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
