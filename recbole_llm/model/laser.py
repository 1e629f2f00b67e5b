"""Laser: Bi-Tuning a frozen LLM with collaborative information (Zhang et al., "Laser: Parameter-Efficient
LLM Bi-Tuning for Sequential Recommendation with Collaborative Information", arXiv:2409.01605; no public code).

The frozen LLM reads ``[prefix | prompt of the last history titles | suffix]``. The prefix comes from
M-Former: query experts (learnable query sets) that attend to one another and cross-attend to a frozen
stage-1 SASRec's per-position encodings, mixed by a router with a load-balancing loss. The suffix tokens'
outputs, mapped to the recommendation space, score every item in one forward pass.

Choices the paper leaves open (settings in properties/model/Laser.yaml, each with its comment):
* M-Former: experts share the block weights (an expert is its query set); post-LayerNorm blocks at the ID
  model's width; router = Linear on SASRec's last-position encoding, softmax, top-k renormalised; the
  balance loss is Switch-Transformer's (``balance_weight`` 0.01); prefix projection at token-embedding scale.
* Prompt titles come from the dataset's item table, never from the batch (it carries the TARGET's features).
* Suffix outputs are pooled (``suffix_pooling``), LayerNorm-ed without weights (LLM outputs have norms ~30,
  SASRec's below 1) and mapped by a Linear; ``suffix_tokens: 0`` pools the last prompt position instead.
* Items (``item_repr``): the paper's (``suffix``, the default of ``scoring: paper``) is the frozen LLM over
  ``[item title | item suffix tokens]`` (:class:`ItemTitles`, which states the choices); beyond the paper,
  for ``scoring: residual``: ``id``, ``text`` or ``both`` (its default).
* Scoring: ``paper`` = the mapped suffix output is the user embedding; ``residual`` (beyond the paper) =
  SASRec's user vector + a trained scalar gate (non-zero at start, so every part gets a gradient) x it.
* Two phases as the paper (:class:`recbole_llm.trainer.laser.LaserTrainer`): phase 1 trains the item side
  against the model's own user vectors, the user side held; phase 2 trains the user side with the item side
  held (no gradient at all: its vectors are computed once, without autograd) or slowed
  (``item_side_lr_scale``). A held item side is computed once per change of its weights, not per step.
* Logged loss = (cross-entropy, ``balance_weight`` x balance). CPU settings: ``llm_layers``,
  ``train_rows_per_epoch``, ``gradient_accumulation_steps``. Ablations: ``use_prefix``, ``suffix_tokens``,
  ``n_experts: 1``.
"""
from __future__ import annotations

from logging import getLogger

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from recbole_llm.data.item_text import item_texts
from recbole_llm.llm.backbone import load_llm, set_num_threads
from recbole_llm.llm.precision import from_llm, to_llm
from recbole_llm.llm.batching import cache_keyword, left_pad, position_ids
from recbole_llm.llm.pluggable import PluggableMixin, rows_fraction, sample_rows
from recbole_llm.llm.prompts import note_cut_texts
from recbole_llm.model.objectives import check_loss_type
from recbole_llm.model.pretrained import pretrained_id_model
from recbole_llm.model.scoring import chunked_scores
from recbole_llm.errors import InputError

HISTORY_SEPARATOR = ";"


def normalise(hidden: torch.Tensor) -> torch.Tensor:
    """LayerNorm without weights: the frozen LLM's outputs (float32, via ``from_llm``) at unit scale per dimension."""
    return F.layer_norm(hidden, hidden.shape[-1:])


class HistoryPrompt:
    """Token ids of ``prompt_template`` with ``{history}`` = the user's last item titles.

    Titles are tokenized once (with a leading space, cut to ``title_max_tokens``); a prompt is
    then head ids + title ids joined by the separator + tail ids, with no re-tokenization
    (:meth:`batch`).
    """

    def __init__(self, tokenizer, titles, template, history_titles, title_max_tokens):
        if "{history}" not in template:
            raise InputError(f"prompt_template must contain '{{history}}'; got {template!r}")
        head, tail = template.split("{history}", 1)
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.head, self.tail, self.separator = encode(head), encode(tail), encode(HISTORY_SEPARATOR)
        whole = [encode(" " + t) if t else [] for t in titles]
        note_cut_texts(sum(len(t) > title_max_tokens for t in whole), sum(1 for t in titles if t),
                       f"title_max_tokens={title_max_tokens}")
        self.titles = [t[:title_max_tokens] for t in whole]
        self.history_titles = history_titles
        self.max_length = (
            len(self.head) + len(self.tail)
            + history_titles * (title_max_tokens + len(self.separator)) - len(self.separator)
        )

    def batch(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor, pad_id: int):
        """``(input_ids, attention_mask)`` of the prompts of RecBole's right-padded histories, left-padded
        to the longest. A row is head ids + the titles of the last ``history_titles`` items joined by
        the separator + tail ids; built on ``item_seq``'s device from a table of title ids (one read of
        the longest length, no per-row copy to the host)."""
        device = item_seq.device
        if getattr(self, "_table_device", None) != device:
            width = max([len(t) for t in self.titles] + [1])
            table = torch.full((len(self.titles), width), pad_id, dtype=torch.long)
            for item, title in enumerate(self.titles):
                table[item, :len(title)] = torch.tensor(title, dtype=torch.long)
            self._title_table, self._title_lengths = table.to(device), torch.tensor([len(t) for t in self.titles],
                                                                                    device=device)
            self._head, self._tail = torch.tensor(self.head, device=device), torch.tensor(self.tail, device=device)
            self._separator = torch.tensor(self.separator, dtype=torch.long, device=device)
            self._table_device = device
        batch, slots = item_seq.size(0), self.history_titles
        start = item_seq_len.unsqueeze(1) - slots  # the last ``slots`` items of each history
        positions = start + torch.arange(slots, device=device)
        present = positions >= 0
        items = item_seq.gather(1, positions.clamp(min=0)) * present
        first = present & ~torch.cat([present.new_zeros(batch, 1), present[:, :-1]], dim=1)  # no separator before it
        titles = self._title_table[items]  # [B, slots, T]
        title_mask = torch.arange(titles.size(2), device=device) < self._title_lengths[items].unsqueeze(-1)
        separator = self._separator.expand(batch, slots, -1)
        separator_mask = (present & ~first).unsqueeze(-1).expand_as(separator)
        body = torch.cat([separator, titles], dim=2).flatten(1)
        body_mask = torch.cat([separator_mask, title_mask & present.unsqueeze(-1)], dim=2).flatten(1)
        ids = torch.cat([self._head.expand(batch, -1), body], dim=1)
        mask = torch.cat([body_mask.new_ones(batch, self._head.numel()), body_mask], dim=1)
        order = torch.sort(mask.long(), dim=1, stable=True).indices  # padding first, real tokens in order
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        longest = int(mask.sum(1).max())
        ids = torch.cat([ids[:, ids.size(1) - longest:], self._tail.expand(batch, -1)], dim=1)
        mask = torch.cat([mask[:, mask.size(1) - longest:], mask.new_ones(batch, self._tail.numel())], dim=1).long()
        return ids.masked_fill(mask == 0, pad_id), mask


class ItemTitles:
    """The frozen LLM over each item's title followed by trainable suffix tokens, for all items.

    The paper's item side (``item_repr: suffix``): the ACL 2025 version of Laser ("Bi-Tuning with
    Collaborative Information for Controllable LLM-based Sequential Recommendation") has the suffix
    "transform the LLM output into item/user embeddings", so an item is the frozen LLM over
    ``[item title | item suffix tokens]``, pooled, normalised and mapped by its own Linear. Items and
    users have their own suffix tokens and projection (one shared suffix would move the items while
    phase 2 trains the users). No collaborative prefix on the item side: M-Former's prefix is built
    from a user's sequence, which an item has not. Beyond the paper (``scoring: residual``): SASRec's
    embeddings (``id``), projected title vectors (the frozen LLM's mean-pooled title states, computed
    once: ``text``), or both (the projection starts at zero, so items start as SASRec's: ``both``).

    The title part never changes (frozen LLM, fixed text): with ``cache`` its keys and values are
    computed once, in chunks of ``batch_size`` items (left-padded within a chunk), and
    :meth:`with_suffix` runs only the suffix tokens over them; without, each call runs title and
    suffix together (same outputs, the title's cost every time, no memory held).
    """

    def __init__(self, decoder, titles, pad_id, batch_size, cache=True):
        self.decoder, self.pad_id, self.cache = decoder, pad_id, cache
        self.chunks = [[t or [pad_id] for t in titles[start:start + batch_size]]
                       for start in range(0, len(titles), batch_size)]
        self._stored = None  # per chunk: (device, [(keys, values) per layer])

    def _title_batch(self, chunk, device):
        return left_pad(chunk, self.pad_id, device)

    @torch.no_grad()
    def _title_cache(self, chunk, device):
        ids, mask, positions = self._title_batch(chunk, device)
        keyword = cache_keyword(type(self.decoder))
        cache = getattr(self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True),
                        keyword)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def with_suffix(self, suffix: torch.Tensor) -> torch.Tensor:
        """Last hidden states [n_items, n_suffix, H] of ``[title | suffix]`` for every item."""
        from transformers import DynamicCache

        device = suffix.device
        if self.cache and (self._stored is None or self._stored[0] != device):
            self._stored = (device, [self._title_cache(chunk, device) for chunk in self.chunks])
        outputs = []
        for index, chunk in enumerate(self.chunks):
            _, mask, positions = self._title_batch(chunk, device)
            rows, n_suffix = len(chunk), suffix.size(0)
            tokens = to_llm(suffix, self.decoder).unsqueeze(0).expand(rows, -1, -1)
            suffix_positions = mask.sum(1, keepdim=True) + torch.arange(n_suffix, device=device)
            full_mask = torch.cat([mask, mask.new_ones(rows, n_suffix)], dim=1)
            if self.cache:
                past = DynamicCache(ddp_cache_data=self._stored[1][index])
                hidden = self.decoder(inputs_embeds=tokens, attention_mask=full_mask, position_ids=suffix_positions,
                                      **{cache_keyword(type(self.decoder)): past}, use_cache=True).last_hidden_state
            else:
                ids, _, _ = self._title_batch(chunk, device)
                embedded = torch.cat([self.decoder.get_input_embeddings()(ids), tokens], dim=1)
                hidden = self.decoder(inputs_embeds=embedded, attention_mask=full_mask,
                                      position_ids=torch.cat([positions, suffix_positions], dim=1),
                                      use_cache=False).last_hidden_state[:, -n_suffix:]
            outputs.append(hidden)
        return torch.cat(outputs)


class MFormer(nn.Module):
    """Mixture of query experts over the ID model's encodings of a user's sequence.

    Returns ``(queries [B, n_queries, d], router weights [B, n_experts], balance loss)``.
    """

    def __init__(self, hidden, n_experts, n_queries, n_layers, n_heads, top_k, dropout):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise InputError(f"router_top_k must be between 1 and n_experts={n_experts}; got {top_k}")
        self.n_experts, self.n_queries, self.top_k = n_experts, n_queries, top_k
        self.queries = nn.Parameter(torch.randn(n_experts, n_queries, hidden) * 0.02)
        self.input_norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "self_attn": nn.MultiheadAttention(hidden, n_heads, dropout=dropout, batch_first=True),
                "norm1": nn.LayerNorm(hidden),
                "cross_attn": nn.MultiheadAttention(hidden, n_heads, dropout=dropout, batch_first=True),
                "norm2": nn.LayerNorm(hidden),
                "ffn": nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden)),
                "norm3": nn.LayerNorm(hidden),
            })
            for _ in range(n_layers)
        )
        # one expert needs no router (a softmax over one logit is constant: its weights would never train)
        self.router = nn.Linear(hidden, n_experts) if n_experts > 1 else None

    def route(self, user: torch.Tensor):
        """Top-k routing: (weights [B, E] summing to one per user, balance loss)."""
        if self.router is None:
            return user.new_ones(user.size(0), 1), user.new_zeros(())
        probs = F.softmax(self.router(user), dim=-1)
        top_values, top_index = probs.topk(self.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(1, top_index, top_values / top_values.sum(-1, keepdim=True))
        routed = torch.zeros_like(probs).scatter(1, top_index, 1.0)
        share = routed.mean(0) / self.top_k  # f_e: share of the top-k slots going to expert e
        balance = self.n_experts * (share * probs.mean(0)).sum()
        return weights, balance

    def forward(self, encodings: torch.Tensor, padding: torch.Tensor, user: torch.Tensor):
        batch, length, hidden = encodings.shape
        n_experts, n_queries = self.n_experts, self.n_queries
        weights, balance = self.route(user)
        memory = self.input_norm(encodings)
        # every expert's queries run as their own sequence: [B * E, Q, d]
        memory = memory.unsqueeze(1).expand(batch, n_experts, length, hidden).reshape(batch * n_experts, length, hidden)
        memory_padding = padding.unsqueeze(1).expand(batch, n_experts, length).reshape(batch * n_experts, length)
        x = self.queries.unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * n_experts, n_queries, hidden)
        for layer in self.layers:
            x = layer["norm1"](x + layer["self_attn"](x, x, x, need_weights=False)[0])
            attended = layer["cross_attn"](x, memory, memory, key_padding_mask=memory_padding, need_weights=False)[0]
            x = layer["norm2"](x + attended)
            x = layer["norm3"](x + layer["ffn"](x))
        x = x.reshape(batch, n_experts, n_queries, hidden)
        mixed = (weights.unsqueeze(-1).unsqueeze(-1) * x).sum(1)
        return mixed, weights, balance


class Laser(PluggableMixin, SequentialRecommender):
    """Laser on a frozen LLM and a frozen RecBole ID model (see the module docstring)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_loss_type(config, "Laser", ("CE",))  # before stage 1 trains
        logger = getLogger()
        set_num_threads(config["num_threads"])
        self.use_prefix = bool(config["use_prefix"])
        self.n_suffix = int(config["suffix_tokens"] or 0)
        self.suffix_pooling = config["suffix_pooling"]
        self.item_repr = config["item_repr"]
        self.scoring = config["scoring"]
        self.item_phase_epochs = int(config["item_phase_epochs"])
        self.item_side_lr_scale = float(config["item_side_lr_scale"])
        self.balance_weight = float(config["balance_weight"])
        self.rows_fraction = rows_fraction(config["train_rows_per_epoch"], len(dataset))
        self.item_repr = self.item_repr or ("suffix" if self.scoring == "paper" else "both")
        if self.item_repr == "suffix" and not self.n_suffix:
            raise InputError("item_repr: suffix maps items through the suffix tokens: set suffix_tokens >= 1")
        self.item_batch_size = int(config["item_batch_size"])
        self.item_side_held = self.item_side_lr_scale == 0  # phase 2; phase 1 lets it train (LaserTrainer)
        self._held_items = (None, None)  # (weights' versions, item vectors) of a held item side

        titles = item_texts(dataset, config["item_text_fields"])  # first: a dataset without text fails fast

        # Stage 1: the frozen ID model on the same split (SASRec by default).
        overrides = dict(config["id_model_config"] or {})
        overrides["MAX_ITEM_LIST_LENGTH"] = config["MAX_ITEM_LIST_LENGTH"]
        self.id_model = pretrained_id_model(
            config, dataset, config["id_model"],
            checkpoint=config["id_model_checkpoint"], overrides=overrides, setting="id_model_checkpoint",
        )
        for attribute in ("item_embedding", "position_embedding", "trm_encoder", "LayerNorm", "get_attention_mask"):
            if not hasattr(self.id_model, attribute):
                raise InputError(
                    f"id_model={config['id_model']!r}: Laser reads per-position encodings the way RecBole's "
                    f"SASRec computes them (item + position embeddings through trm_encoder); "
                    f"{type(self.id_model).__name__} has no '{attribute}'. Use SASRec (or a subclass)."
                )
        id_hidden = self.id_model.item_embedding.embedding_dim

        # The frozen LLM (decoder only: its LM head is never used).
        llm, tokenizer = load_llm(config, logger, n_layers=config["llm_layers"])
        decoder = llm.get_decoder()
        decoder.eval()
        self.llm = decoder
        llm_hidden = decoder.config.hidden_size
        embed = decoder.get_input_embeddings()
        embedding_std = embed.weight.float().std().item()

        # The history prompt, and the check that it fits the LLM's context.
        self.prompt = HistoryPrompt(tokenizer, titles, config["prompt_template"],
                                    int(config["history_titles"]), int(config["title_max_tokens"]))
        self.pad_token_id = tokenizer.pad_token_id
        self.n_prefix = int(config["n_queries"]) if self.use_prefix else 0
        longest = self.n_prefix + self.prompt.max_length + self.n_suffix
        context = decoder.config.max_position_embeddings
        if longest > context:
            raise InputError(
                f"Laser input too long for the LLM: {self.n_prefix} prefix tokens + up to {self.prompt.max_length} "
                f"prompt tokens ({config['history_titles']} titles x {config['title_max_tokens']} tokens + template) "
                f"+ {self.n_suffix} suffix tokens = {longest} > max_position_embeddings={context}. "
                "Lower n_queries, suffix_tokens, history_titles or title_max_tokens."
            )

        # Trainable parts: M-Former and prefix projection, suffix tokens, output and item-text projections.
        if self.use_prefix:
            self.mformer = MFormer(
                id_hidden, int(config["n_experts"]), int(config["n_queries"]), int(config["mformer_layers"]),
                int(config["mformer_heads"]), int(config["router_top_k"]), float(config["mformer_dropout"]),
            )
            self.prefix_projection = nn.Linear(id_hidden, llm_hidden)
            nn.init.normal_(self.prefix_projection.weight, std=embedding_std / id_hidden**0.5)
            nn.init.zeros_(self.prefix_projection.bias)
        if self.n_suffix:
            self.suffix = nn.Parameter(torch.randn(self.n_suffix, llm_hidden) * embedding_std)
        self.output_projection = nn.Linear(llm_hidden, id_hidden)
        if self.scoring == "residual":  # small, not zero: a zero gate gives everything before it no gradient
            self.output_gate = nn.Parameter(torch.tensor(float(config["output_gate_init"])))
        if self.item_repr in ("text", "both"):
            self.register_buffer("item_text_vectors", self._encode_item_texts(), persistent=False)
            self.text_projection = nn.Linear(llm_hidden, id_hidden, bias=False)
            if self.item_repr == "both":
                nn.init.zeros_(self.text_projection.weight)
        if self.item_repr == "suffix":
            self.item_suffix = nn.Parameter(torch.randn(self.n_suffix, llm_hidden) * embedding_std)
            self.item_projection = nn.Linear(llm_hidden, id_hidden)
            self.item_titles = ItemTitles(self.llm, self.prompt.titles, self.pad_token_id, self.item_batch_size,
                                          cache=bool(config["item_kv_cache"]))
        self.score_chunk_items = config["score_chunk_items"]
        self.loss_fct = nn.CrossEntropyLoss()
        self.to(config["device"])
        if config["pluggable_dir"]:
            self.load_pretrained(config["pluggable_dir"])

    # ----------------------------------------------------------------- setup helpers
    @torch.no_grad()
    def _encode_item_texts(self, batch_size=64):
        """Mean-pooled last hidden states of the frozen LLM over each item's (cut) title, [n_items, llm hidden]."""
        vectors = []
        device = self.llm.get_input_embeddings().weight.device
        titles = self.prompt.titles
        for start in range(0, len(titles), batch_size):
            ids = [titles[i] or [self.pad_token_id] for i in range(start, min(start + batch_size, len(titles)))]
            input_ids, mask, positions = left_pad(ids, self.pad_token_id, device)
            hidden = self.llm(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                              use_cache=False).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            vectors.append(normalise(from_llm((hidden * weights).sum(1) / weights.sum(1))))
        vectors = torch.cat(vectors)
        vectors[0] = 0.0  # padding item
        return vectors

    def train(self, mode: bool = True):
        """Train the pluggable part; the frozen LLM and ID model stay in eval mode (no dropout)."""
        super().train(mode)
        self.llm.eval()
        self.id_model.eval()
        return self

    # ----------------------------------------------------------------- forward
    def id_encodings(self, item_seq, item_seq_len):
        """The frozen SASRec's per-position encodings [B, L, d], padding mask [B, L] and user vector [B, d]."""
        sasrec = self.id_model
        with torch.no_grad():
            positions = torch.arange(item_seq.size(1), dtype=torch.long, device=item_seq.device)
            x = sasrec.item_embedding(item_seq) + sasrec.position_embedding(positions).unsqueeze(0)
            x = sasrec.dropout(sasrec.LayerNorm(x))
            layers = sasrec.trm_encoder(x, sasrec.get_attention_mask(item_seq), output_all_encoded_layers=True)
            encodings = layers[-1]
            user = self.gather_indexes(encodings, item_seq_len - 1)
        return encodings, item_seq == 0, user

    def forward(self, item_seq, item_seq_len):
        """User vectors [B, d] in the recommendation space, router weights [B, E] (or None), balance loss."""
        encodings, padding, id_user = self.id_encodings(item_seq, item_seq_len)
        text_ids, text_mask = self.prompt.batch(item_seq, item_seq_len, self.pad_token_id)
        embed = self.llm.get_input_embeddings()
        parts, masks = [], []
        weights, balance = None, encodings.new_zeros(())
        batch = item_seq.size(0)
        if self.use_prefix:
            queries, weights, balance = self.mformer(encodings, padding, id_user)
            parts.append(to_llm(self.prefix_projection(queries), self.llm))
            masks.append(text_mask.new_ones(batch, self.n_prefix))
        parts.append(embed(text_ids))
        masks.append(text_mask)
        if self.n_suffix:
            parts.append(to_llm(self.suffix, self.llm).unsqueeze(0).expand(batch, -1, -1))
            masks.append(text_mask.new_ones(batch, self.n_suffix))
        inputs, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
        hidden = self.llm(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids(mask),
                          use_cache=False).last_hidden_state
        user = self.output_projection(self._pool(hidden))
        if self.scoring == "residual":
            user = id_user + self.output_gate * user
        return user, weights, balance

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The suffix positions' LLM outputs pooled (``suffix_pooling``; the last position without a
        suffix), as float32 at unit scale."""
        if self.n_suffix and self.suffix_pooling == "mean":
            return normalise(from_llm(hidden[:, -self.n_suffix:].mean(1)))
        return normalise(from_llm(hidden[:, -1]))

    def item_representations(self, start: int = 0, end: int | None = None):
        """[n_items, d] (items ``start..end-1``): what user vectors are scored against (see ``item_repr``).
        A held item side (phase 2 with ``item_side_lr_scale: 0``, or evaluation) is computed without
        autograd once per change of its weights."""
        if self.training and not self.item_side_held:
            return self._item_vectors(start, end)
        versions = tuple((p.data_ptr(), p._version) for p in self.item_side_parameters())
        key = (versions, str(self.id_model.item_embedding.weight.device))
        if self._held_items[0] != key:
            with torch.no_grad():
                self._held_items = (key, self._item_vectors())
        return self._held_items[1][start:end]

    def _item_vectors(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        if self.item_repr == "suffix":
            return self.item_projection(self._pool(self.item_titles.with_suffix(self.item_suffix)))[start:end]
        ids = self.id_model.item_embedding.weight[start:end]
        if self.item_repr == "id":
            return ids
        text = self.text_projection(self.item_text_vectors[start:end])
        return text if self.item_repr == "text" else ids + text

    # ----------------------------------------------------------------- RecBole contract
    def item_side_parameters(self) -> list[nn.Parameter]:
        """What phase 1 trains: the item suffix and its projection, or the title projection (none
        with ``item_repr: id``)."""
        parts = {"suffix": ("item_suffix", "item_projection"), "text": ("text_projection",),
                 "both": ("text_projection",)}.get(self.item_repr, ())
        return [p for name, p in self.named_parameters() if name.split(".")[0] in parts]

    def optimizer_groups(self) -> list[dict]:
        """Phase 2's optimizer groups (LLMTrainer): everything but the item side at the learning rate,
        and the item side at ``item_side_lr_scale`` x it unless held (0: out of the optimizer; it
        gets no gradient either, so clipping sees only what phase 2 trains)."""
        item_side = {id(p) for p in self.item_side_parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in item_side]
        groups = [{"params": rest, "lr_scale": 1.0}]
        if item_side and not self.item_side_held:
            groups.append({"params": self.item_side_parameters(), "lr_scale": self.item_side_lr_scale})
        return groups

    def item_phase_loss(self, users: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Phase 1: cross-entropy of (held) user vectors against the item representations."""
        return self.loss_fct(users @ self.item_representations().t(), targets)

    @torch.no_grad()
    def phase_one_users(self, item_seq, item_seq_len) -> torch.Tensor:
        """The user vectors phase 1 fits the item side to: the model's own, from the held user side;
        for ``scoring: residual`` the frozen SASRec's alone (its own user vector at the start of phase 1
        up to ``output_gate_init`` x the LLM correction), which needs no LLM pass, so phase 1 can see
        every training row."""
        if self.scoring == "residual":
            return self.id_encodings(item_seq, item_seq_len)[2]
        return self.forward(item_seq, item_seq_len)[0]

    def calculate_loss(self, interaction):
        """``(cross-entropy, balance_weight x balance loss)``, or the cross-entropy alone without a router."""
        if self.training:
            interaction = sample_rows(interaction, self.rows_fraction)
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        targets = interaction[self.POS_ITEM_ID]
        user, _, balance = self.forward(item_seq, item_seq_len)
        logits = user @ self.item_representations().t()
        loss = self.loss_fct(logits, targets)
        if self.use_prefix and self.mformer.n_experts > 1:
            return loss, self.balance_weight * balance
        return loss

    def router_weights(self, interaction):
        """Router weights [B, n_experts] of each user in ``interaction`` (rows sum to one)."""
        _, _, id_user = self.id_encodings(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.mformer.route(id_user)[0]

    def full_sort_predict(self, interaction):
        user, _, _ = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return chunked_scores(user, self.item_representations, self.n_items, self.score_chunk_items)

    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)
