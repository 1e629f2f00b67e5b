"""SeRALM: any RecBole sequential recommender, its item embedding fused with LLM-generated knowledge.

Yankun Ren, Zhongde Chen, Xinxing Yang, Longfei Li, Cong Jiang, Lei Cheng, Bo Zhang, Linjian Mo,
Jun Zhou. "Enhancing Sequential Recommenders with Augmented Knowledge from Aligned Large Language
Models." SIGIR 2024, doi:10.1145/3626772.3657782 (no arXiv version). No public code exists; this
follows sections 4.2-4.4.

Mechanism (section 4.3): the ID-based recommender named by ``base_model`` (Caser, SASRec,
LightSANs, GRU4Rec, NARM; any RecBole sequential model with an ``nn.Embedding`` called
``item_embedding``) is built UNCHANGED from its own class and config, then its
``item_embedding`` is replaced by :class:`FusedItemEmbedding`::

    e(i) = W_f [ r_id(i) ; W_k r_s(i) + b_k ] + b_f        (r_s(i) = Encoder(knowledge of item i))

which offers both ``module(ids)`` and ``module.weight``, the two ways RecBole's models read
their item embedding, so the base model's loss, ``predict`` and ``full_sort_predict`` run
untouched. Knowledge (4.2) comes from :mod:`recbole_llm.knowledge` (generated once and
cached, encoded by a sentence-transformers model, vectors cached); alignment training (4.4)
lives in :class:`recbole_llm.trainer.alignment.SeRALMTrainer`.

Choices the paper leaves open (details in :class:`SeRALM`): ``knowledge_size`` and a fusion
layer back to the base model's width, ``fusion_init``, the padding row, ``encoder_mode``
(frozen or joint) and ``knowledge_text_format``.
"""
from __future__ import annotations

import contextlib
from logging import getLogger

import torch
from recbole.data.interaction import Interaction
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from recbole_llm.knowledge.encoding import TextEncoder, cached_vectors
from recbole_llm.knowledge.generation import dataset_knowledge, knowledge_prompt
from recbole_llm.knowledge.prompts import item_prompt_fields, knowledge_text
from recbole_llm.model.objectives import check_loss_type
from recbole_llm.model.pretrained import id_model_config
from recbole_llm.errors import InputError
from recbole_llm.registry import get_model

#: Base models tested with SeRALM (any RecBole sequential model with an nn.Embedding `item_embedding` works).
SUPPORTED_BASE_MODELS = ("Caser", "SASRec", "LightSANs", "GRU4Rec", "NARM")


def _unsupported(name, reason):
    return InputError(
        f"base_model={name!r} {reason}. SeRALM wraps a RecBole sequential model whose item table is an "
        f"nn.Embedding named `item_embedding`; supported (tested): {', '.join(SUPPORTED_BASE_MODELS)}."
    )


_FROZEN_ENCODERS: dict = {}


def frozen_encoder(name, device) -> TextEncoder:
    """One frozen encoder per (name, device) in the process, loaded on first use. Not a submodule of
    any model, so it is neither checkpointed nor copied into the alignment generator's snapshot."""
    key = (str(name), str(device))
    if key not in _FROZEN_ENCODERS:
        encoder = TextEncoder.load(name, device=device)
        encoder.requires_grad_(False)
        encoder.eval()
        _FROZEN_ENCODERS[key] = encoder
    return _FROZEN_ENCODERS[key]


def first_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """The distinct values of the 1-d ``ids`` in the order they first occur (``torch.unique`` returns
    them sorted, whatever its ``sorted`` argument says)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    first = torch.full((unique.numel(),), ids.numel(), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.numel(), device=ids.device), reduce="amin")
    return unique[first.argsort()]


class FusedItemEmbedding(nn.Module):
    """Drop-in replacement of a base model's ``item_embedding``: ID embedding ++ projected knowledge.

    ``forward(ids)`` -> ``[..., embedding_dim]`` (``ids`` of a batch, instance first: the per-instance
    knowledge of :meth:`override` applies); ``weight`` -> the fused table ``[n_items, embedding_dim]``
    with every item's own knowledge (shared by all instances, so never overridden).
    """

    def __init__(self, id_embedding: nn.Embedding, knowledge: torch.Tensor, knowledge_size: int = 64,
                 fusion_init: str = "identity", encoder: TextEncoder | None = None, texts=None,
                 joint_items_per_step: int = 256):
        super().__init__()
        n_items, dim = id_embedding.weight.shape
        if knowledge.shape[0] != n_items:
            raise InputError(f"knowledge has {knowledge.shape[0]} rows but the item table {n_items}")
        self.id_embedding = id_embedding
        self.num_embeddings, self.embedding_dim, self.padding_idx = n_items, dim, 0
        self.register_buffer("knowledge", knowledge.detach().float().clone())  # saved with the model
        self.knowledge_proj = nn.Linear(knowledge.shape[1], knowledge_size)
        self.fuse = nn.Linear(dim + knowledge_size, dim)
        if fusion_init == "identity":
            with torch.no_grad():
                self.fuse.weight.zero_()
                self.fuse.weight[:, :dim].copy_(torch.eye(dim))
                self.fuse.bias.zero_()
        self.encoder = encoder  # joint mode only
        self.texts = list(texts) if texts is not None else None
        self.joint_items_per_step = int(joint_items_per_step)
        self._fresh = None  # joint mode: (position of each item in vectors or -1 [n_items], vectors)
        self._override = None  # alignment: (items [B, K], vectors [B, K, d]) per instance
        self._table = None  # (version stamp, fused table) for inference

    # -- knowledge lookups
    def knowledge_of(self, ids: torch.Tensor, per_instance: bool = False) -> torch.Tensor:
        """Knowledge vectors of ``ids``: this step's fresh encodings (joint mode), else the memory;
        ``per_instance``: ``ids`` are a batch's, instance first, and an active :meth:`override`
        replaces instance b's knowledge of its overridden items."""
        vectors = self.knowledge[ids]
        if self._fresh is not None:
            position, fresh = self._fresh
            pos = position[ids]
            vectors = torch.where((pos >= 0).unsqueeze(-1), fresh[pos.clamp(min=0)], vectors)
        if per_instance and self._override is not None:
            items, new = self._override
            if ids.dim() == 0 or ids.size(0) != items.size(0):
                raise ValueError(f"the knowledge override is per instance ({items.size(0)} instances), but the "
                                 f"base model looked up ids of shape {tuple(ids.shape)}: instance first expected")
            shape = (items.size(0),) + (1,) * (ids.dim() - 1)
            for k in range(items.size(1)):
                hit = (ids == items[:, k].view(shape)) & (ids != 0)
                vectors = torch.where(hit.unsqueeze(-1), new[:, k].view(*shape, -1).to(vectors.dtype), vectors)
        return vectors

    def _fused(self, ids: torch.Tensor, per_instance: bool) -> torch.Tensor:
        id_vectors = self.id_embedding(ids)
        knowledge = self.knowledge_proj(self.knowledge_of(ids, per_instance))
        fused = self.fuse(torch.cat([id_vectors, knowledge], dim=-1))
        return torch.where((ids == 0).unsqueeze(-1), id_vectors, fused)  # padding: the base model's own row

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._fused(ids, per_instance=True)

    @property
    def weight(self) -> torch.Tensor:
        ids = torch.arange(self.num_embeddings, device=self.knowledge.device)
        cacheable = not torch.is_grad_enabled() and self._fresh is None
        if not cacheable:
            return self._fused(ids, per_instance=False)
        stamp = tuple((id(t), t._version) for t in (*self.parameters(), self.knowledge))
        if self._table is None or self._table[0] != stamp:
            self._table = (stamp, self._fused(ids, per_instance=False))
        return self._table[1]

    # -- joint training of the encoder
    def begin_step(self, items: torch.Tensor) -> None:
        """Re-encode (with gradients) the knowledge of ``items`` for this step (joint mode): the
        first ``joint_items_per_step`` distinct items in the order given (the caller puts targets first)."""
        if self.encoder is None or self.texts is None:
            return
        unique = first_occurrences(items[items > 0])[: self.joint_items_per_step]
        vectors = self.encoder([self.texts[i] for i in unique.tolist()])
        position = torch.full((self.num_embeddings,), -1, dtype=torch.long, device=self.knowledge.device)
        position[unique] = torch.arange(unique.numel(), device=position.device)
        self._fresh = (position, vectors)
        self._fresh_items = unique

    def end_step(self) -> None:
        """Write this step's encodings into the memory of item vectors (joint mode)."""
        if self._fresh is not None:
            with torch.no_grad():
                self.knowledge[self._fresh_items] = self._fresh[1].detach().to(self.knowledge.dtype)
        self._fresh = None

    @contextlib.contextmanager
    def override(self, items: torch.Tensor, vectors: torch.Tensor):
        """Within the block, instance b sees ``vectors[b, k]`` as the knowledge of item ``items[b, k]``."""
        self._override = (items, vectors)
        try:
            yield
        finally:
            self._override = None


class SeRALM(SequentialRecommender):
    """SeRALM around a RecBole sequential model (see the module docstring).

    The base model is built with its own config (RecBole's and our property files for it, the
    same data and ``MAX_ITEM_LIST_LENGTH``, plus ``base_model_config``). At inference only the
    cached knowledge vectors are used (end of 4.4); the fused table is computed once and reused
    while no weight changes (``weight`` caches it). The choices the paper leaves open, each a
    setting:

    * ``knowledge_size`` (64): width of the projected knowledge vector concatenated with the ID
      embedding. The paper concatenates and does not say how the base model then sees a wider
      vector; here a linear layer maps the concatenation back to the base model's embedding
      size (the only way to keep every base model's code unchanged).
    * ``fusion_init`` (``identity``): the fusion layer starts as ``[I | 0]``, so an untrained
      SeRALM scores exactly like its base model and learns how much knowledge to mix in;
      ``random`` uses PyTorch's default initialisation.
    * The padding item (id 0) keeps the base model's own padding row (no knowledge), as the base expects.
    * ``encoder_mode`` (``frozen``): frozen encoder + trainable projection (see
      :mod:`recbole_llm.knowledge.encoding`) or ``joint`` (the paper: the encoder is a submodule
      and trains with the recommender; per step the batch's items - targets first, at most
      ``joint_items_per_step`` - are re-encoded with gradients and the other rows come from a
      memory of each item's latest encoding; new knowledge after alignment is encoded by the
      trained encoder, and only the pretrained encoder's vectors are cached on disk).
    * ``knowledge_text_format`` (``"{description} {summarization}"``): what of the JSON answer
      is encoded (no text: a zero vector, logged). ``knowledge_source: fields``, beyond the paper,
      is the control without the LLM: each item's text is its own fields, as for an unusable answer.

    For the alignment trainer: :meth:`log_prob_target` (``log p(y|x,s)`` under a full softmax
    over all items, with the knowledge of chosen items replaced per instance) and
    :meth:`set_knowledge` (new cached vectors after alignment).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_loss_type(config, "SeRALM", ("CE", "BPR"))  # the base model trains with SeRALM's loss_type
        logger = getLogger()
        self.base_model_name = config["base_model"]
        base_class = self._base_class(self.base_model_name)
        overrides = {key: config[key] for key in ("MAX_ITEM_LIST_LENGTH", "loss_type")}
        if config["loss_type"] != "CE":  # RecBole refuses any train_neg_sample_args (even 'none') with CE
            overrides["train_neg_sample_args"] = config["train_neg_sample_args"]
        overrides.update(config["base_model_config"])
        self.base_config = id_model_config(config, self.base_model_name, overrides)
        self.base = base_class(self.base_config, dataset)
        table = getattr(self.base, "item_embedding", None)
        if not isinstance(table, nn.Embedding) or table.num_embeddings != self.n_items:
            raise _unsupported(self.base_model_name, "has no nn.Embedding `item_embedding` over all items")

        # Knowledge: cached records -> texts -> cached vectors.
        self.text_format = config["knowledge_text_format"]
        self.encoder_name = config["text_encoder"]
        self.encoder_mode = config["encoder_mode"]
        self.vector_dir = config["knowledge_vector_dir"] or f"{config['checkpoint_dir']}/knowledge"
        self.knowledge_prompt = knowledge_prompt(config)
        self.item_fields = item_prompt_fields(dataset, config["knowledge_fields"])
        if config["knowledge_source"] == "fields":  # the control without the LLM: no generation, no cache
            self.knowledge_file = None
            texts = [""] + [knowledge_text(None, self.text_format, f) for f in self.item_fields[1:]]
            source = "the items' own fields (knowledge_source: fields, no LLM)"
        else:
            rows, cache = dataset_knowledge(config, dataset, logger=logger)
            self.knowledge_file = str(cache.final)
            texts = self.knowledge_texts(rows, logger)
            source = f"knowledge from {cache.final.name}"
        encoder = None
        if self.encoder_mode == "joint":
            encoder = TextEncoder.load(self.encoder_name, device=config["device"],
                                       batch_size=config["encoder_batch_size"])
        if encoder is None:
            encoder_or_factory = lambda: frozen_encoder(self.encoder_name, config["device"])  # noqa: E731
        else:
            encoder_or_factory = encoder
        vectors = cached_vectors(texts, self.encoder_name, self.vector_dir, encoder=encoder_or_factory,
                                 batch_size=config["encoder_batch_size"], logger=logger)
        self.base.item_embedding = FusedItemEmbedding(
            table, vectors, knowledge_size=config["knowledge_size"],
            fusion_init=config["fusion_init"], encoder=encoder,
            texts=texts if encoder is not None else None,
            joint_items_per_step=config["joint_items_per_step"],
        )
        logger.info(f"SeRALM: {self.base_model_name} with {source} "
                    f"({vectors.shape[1]}-d {self.encoder_mode} encoder -> {self.fused.knowledge_proj.out_features}-d)")

    @property
    def fused(self) -> FusedItemEmbedding:
        """The fused item table (the base model's ``item_embedding``)."""
        return self.base.item_embedding

    @staticmethod
    def _base_class(name):
        if not isinstance(name, str) or name == "SeRALM":
            raise _unsupported(name, "is not a base model")
        try:
            cls = get_model(name)
        except ValueError:
            raise _unsupported(name, "is unknown") from None
        if not issubclass(cls, SequentialRecommender):
            raise _unsupported(name, "is not a sequential recommender")
        return cls

    # -- knowledge
    def knowledge_texts(self, rows, logger=None) -> list[str]:
        """One text per item (see :func:`knowledge_text`); items whose knowledge is empty or only
        copies the prompt's placeholders fall back to their own fields, counted in the log."""
        texts = [knowledge_text(r, self.text_format, f, self.knowledge_prompt) for r, f in zip(rows, self.item_fields)]
        texts[0] = ""
        own = sum(text == knowledge_text(None, self.text_format, f) for text, f in zip(texts[1:], self.item_fields[1:]))
        if own:
            (logger or getLogger()).warning(
                f"{own} of {len(texts) - 1} items have no usable knowledge (empty, or the prompt's placeholders "
                "copied): their knowledge text is their own fields."
            )
        return texts

    def text_encoder(self) -> TextEncoder:
        """The encoder of knowledge texts: the trained one (joint) or the frozen one (loaded once)."""
        if self.fused.encoder is not None:
            return self.fused.encoder
        return frozen_encoder(self.encoder_name, self.fused.knowledge.device)

    def encode_knowledge(self, texts, grad: bool = False) -> torch.Tensor:
        encoder = self.text_encoder()
        if grad and self.fused.encoder is not None:
            return encoder(list(texts))
        return encoder.encode(list(texts))

    def set_knowledge(self, rows, logger=None) -> None:
        """Use new knowledge records (per internal item id) from now on: re-encode and swap. The frozen
        encoder's vectors come from (and go to) the cache; the joint mode's trained encoder encodes
        them anew and caches nothing (the cache's key names the pretrained encoder)."""
        texts = self.knowledge_texts(rows)
        if self.fused.encoder is not None:
            vectors = self.fused.encoder.encode(texts)
            self.fused.texts = texts
        else:  # loads the encoder only to encode new texts
            vectors = cached_vectors(texts, self.encoder_name, self.vector_dir, encoder=self.text_encoder,
                                     logger=logger or getLogger())
        with torch.no_grad():
            self.fused.knowledge.copy_(vectors.to(self.fused.knowledge.device))

    # -- RecBole's contract, delegated to the base model
    def forward(self, *args, **kwargs):
        return self.base.forward(*args, **kwargs)

    def calculate_loss(self, interaction):
        if self.fused.encoder is not None and self.training:
            self.fused.begin_step(torch.cat([interaction[self.POS_ITEM_ID].flatten(), interaction[self.ITEM_SEQ].flatten()]))
            try:
                return self.base.calculate_loss(interaction)
            finally:
                self.fused.end_step()
        return self.base.calculate_loss(interaction)

    def predict(self, interaction):
        return self.base.predict(interaction)

    def full_sort_predict(self, interaction):
        return self.base.full_sort_predict(interaction)

    # -- for alignment training
    def log_prob_target(self, interaction, items=None, vectors=None) -> torch.Tensor:
        """``log p(y|x,s)`` per instance: softmax over all items (padding excluded) of the base
        model's scores, where instance b sees ``vectors[b, k]`` as the knowledge of
        ``items[b, k]`` (in its history and as a candidate)."""
        target = interaction[self.POS_ITEM_ID]
        context = self.fused.override(items, vectors) if items is not None else contextlib.nullcontext()
        with context:
            scores = self.base.full_sort_predict(interaction).clone()
            if items is not None:
                for k in range(items.size(1)):  # the resampled items' own rows, per instance
                    fields = dict(interaction.interaction)
                    fields[self.ITEM_ID] = items[:, k]
                    scores.scatter_(1, items[:, k:k + 1], self.base.predict(Interaction(fields)).unsqueeze(1))
        scores[:, 0] = float("-inf")
        return scores.log_softmax(dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
