"""E4SRec: item IDs fed into a frozen LLM, the whole catalogue ranked in one forward pass.

Xinhang Li, Chong Chen, Xiangyu Zhao, Yong Zhang, Chunxiao Xing. "E4SRec: An Elegant
Effective Efficient Extensible Solution of Large Language Models for Sequential
Recommendation." arXiv:2312.02443, 2023. Code: https://github.com/HestiaSky/E4SRec.

Follows the authors' code:

* stage 1: an ID-based sequential model (``id_model``, SASRec by default) trained with
  RecBole's own trainer on the same split, or loaded from ``id_model_checkpoint``; its item
  embedding table (row 0 = padding) is copied into a FROZEN table;
* ``Linear(id_dim, llm_hidden)`` with bias projects each history item into the LLM's input
  space;
* the LLM body without its LM head, frozen, with LoRA (r=16, alpha=16, dropout 0.05 on
  ``gate_proj``, ``up_proj``, ``down_proj``; ``lora_target_modules`` puts it elsewhere, e.g. on
  the attention projections ``[q_proj, k_proj, v_proj, o_proj]``) gets as ``inputs_embeds``
  ``[instruction tokens | projected items | "\\n### Response:\\n" tokens]``, the instruction in
  the Alpaca "no input" frame, tokenised without special tokens as the authors do;
* the last position's hidden state -> ``Linear(llm_hidden, n_items, bias=False)`` -> logits over
  ALL items; cross-entropy. ``full_sort_predict`` is one forward pass per batch of users.

Trainable ("pluggable") parameters: LoRA, the projection and the head. They save and load as
one small file (:class:`~recbole_llm.llm.pluggable.PluggableMixin`), so one LLM on disk
serves many datasets; the frozen item table comes from the stage-1 model of each dataset.

Choices the paper and code leave open, made here:

* History: each row's history is the whole prefix before its target, as in the authors' code,
  cut to RecBole's ``MAX_ITEM_LIST_LENGTH`` (our ml-100k default is 20, for CPU cost). RecBole
  right-pads histories; here the item part is LEFT-padded, as the authors' collator pads, so the
  last position is always the response frame; padded slots get ``attention_mask = 0`` and the
  position ids skip them, so a padded and an unpadded history give the same scores. Each batch
  is trimmed to its longest history.
* Training rows: the authors' (``train_targets_per_user: 50``): every position of the last 50
  training items of each user is a target (50 caps the targets per user, not the history);
  ``~`` keeps RecBole's rows, one per prefix of each user's whole training sequence
  (:class:`recbole_llm.data.sequence_windows.LastTargetsDataset`). On a CPU an epoch over all of
  them is too costly, so ``train_rows_per_epoch`` (optional) keeps a uniformly random subset of
  that size per epoch (each batch keeps its share of rows).
* Step size: the authors take 128 rows per optimiser step, AdamW lr 3e-4, 100 warm-up steps and
  a cosine decay (HF's Trainer): ``gradient_accumulation_steps`` (batches summed into one step),
  ``learning_rate``, ``warmup_steps``, ``lr_schedule: cosine`` (LLMTrainer). The defaults are
  sized for a CPU budget instead (fewer rows per step, more steps; docs/RESULTS.md).
* ``llm_layers`` (optional, a CPU compromise shared with Laser): keep only the first n decoder
  layers of the LLM; the authors use the whole LLM.
* The instruction prefix is the same for every user: with ``share_instruction_prefix`` its
  keys/values are computed once per batch (batch size 1, with gradients through LoRA) and
  repeated for every user, the same computation as feeding it per user, at a fraction of the
  cost. Gradient checkpointing turns this off (the checkpointed recompute would append to
  the cache twice) and the full sequence is fed instead.
* The projection and head use PyTorch's default initialisation (the authors' ``nn.Linear``);
  logits for the padding item 0 are part of the softmax as in RecBole's SASRec and are set to
  -inf by RecBole's evaluator.
* ``score_head``: ``linear`` (default) is the authors' ``Linear(llm_hidden, n_items)`` head
  trained from scratch; ``tied`` (beyond the paper) scores each item by the dot product of
  the last hidden state with that item's projected input embedding (the frozen ID table
  through the trained ``input_proj``), as SASRec ties its input and output item tables: no
  per-item parameters to learn, so a short CPU budget is spent on the mapping, not the head.
"""
from __future__ import annotations

from logging import getLogger

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from recbole_llm.llm.backbone import from_llm, load_llm, to_llm
from recbole_llm.llm.batching import forward_shared_prefix, left_align
from recbole_llm.llm.pluggable import PluggableMixin, rows_fraction, sample_rows
from recbole_llm.model.objectives import check_loss_type
from recbole_llm.model.pretrained import pretrained_id_model
from recbole_llm.model.scoring import check_chunk, chunked_scores
from recbole_llm.errors import InputError


class E4SRec(PluggableMixin, SequentialRecommender):
    """E4SRec as a RecBole sequential recommender (see the module docstring)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_loss_type(config, "E4SRec", ("CE",))  # before stage 1 trains
        logger = getLogger()
        self.rows_fraction = rows_fraction(config["train_rows_per_epoch"], len(dataset))
        gradient_checkpointing = bool(config["gradient_checkpointing"])
        self.share_instruction_prefix = bool(config["share_instruction_prefix"]) and not gradient_checkpointing

        # The LLM: frozen body without the LM head, LoRA on the MLP projections (fail fast on bad targets).
        peft_model, tokenizer = load_llm(
            config, logger, n_layers=config["llm_layers"],
            lora={"r": config["lora_r"], "alpha": config["lora_alpha"], "dropout": config["lora_dropout"],
                  "target_modules": config["lora_target_modules"]},
        )
        object.__setattr__(self, "_peft_model", peft_model)  # not a submodule: it wraps self.llm's own modules
        causal_lm = peft_model.get_base_model()
        self.llm = causal_lm.get_decoder()  # the body: LoRA layers are injected in place
        if isinstance(getattr(causal_lm, "lm_head", None), nn.Module):
            causal_lm.lm_head = None  # unused (tied weights stay in the body's input embeddings)
        self.llm_hidden = self.llm.config.hidden_size

        # The instruction frame, embedded once with the LLM's (frozen) input embeddings.
        instruction = config["instruction"]
        frame = config["instruction_frame"]
        self.instruction_text = frame.format(instruction=instruction)
        self.response_text = config["response_text"]
        with torch.no_grad():
            embed = self.llm.get_input_embeddings()
            device = embed.weight.device
            ids = [
                tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
                for text in (self.instruction_text, self.response_text)
            ]
            if ids[0].size(1) == 0 or ids[1].size(1) == 0:
                raise InputError("instruction and response_text must each give at least one token")
            self.register_buffer("instruction_embeds", embed(ids[0])[0].detach().clone(), persistent=False)
            self.register_buffer("response_embeds", embed(ids[1])[0].detach().clone(), persistent=False)

        # Stage 1: the frozen item table of a pretrained ID model on the same split.
        id_model_name = config["id_model"]
        id_model = pretrained_id_model(
            config,
            dataset,
            id_model_name,
            checkpoint=config["id_model_checkpoint"],
            overrides=config["id_model_config"],
            setting="id_model_checkpoint",
        )
        table = getattr(id_model, "item_embedding", None)
        if not isinstance(table, nn.Embedding) or table.num_embeddings != self.n_items:
            raise InputError(
                f"id_model={id_model_name!r} has no item_embedding table with {self.n_items} rows; "
                "E4SRec needs an ID model with an nn.Embedding named item_embedding (e.g. SASRec, GRU4Rec)."
            )
        self.item_embedding = nn.Embedding.from_pretrained(
            table.weight.detach().float().cpu().clone(), freeze=True, padding_idx=0
        )
        del id_model

        # The pluggable part: projection into the LLM's input space and the head over all items.
        self.input_proj = nn.Linear(self.item_embedding.embedding_dim, self.llm_hidden)
        self.score_head = config["score_head"]
        if self.score_head == "linear":
            self.score = nn.Linear(self.llm_hidden, self.n_items, bias=False)
        elif self.score_head != "tied":
            raise InputError(f"score_head must be 'linear' (the authors' head) or 'tied'; got {self.score_head!r}")
        self.score_chunk_items = check_chunk(config["score_chunk_items"])
        self.loss_fct = nn.CrossEntropyLoss()
        if config["pluggable_dir"]:
            self.load_pretrained(config["pluggable_dir"])
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        logger.info(f"E4SRec: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    def peft_model(self):
        """The LLM with its LoRA (see :meth:`~recbole_llm.llm.pluggable.PluggableMixin.save_pretrained`)."""
        return self._peft_model

    # ------------------------------------------------------------------ encoding
    def _history(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """Left-padded histories trimmed to the batch's longest one, [B, L]."""
        longest = max(int(item_seq_len.max()), 1)
        return left_align(item_seq, item_seq_len)[:, -longest:]

    def forward(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> torch.Tensor:
        """The last position's hidden state for each user, [B, llm_hidden] (float32)."""
        items = self._history(item_seq, item_seq_len)
        batch, length = items.shape
        item_mask = items > 0
        item_embeds = to_llm(self.input_proj(self.item_embedding(items)), self.llm)
        response = self.response_embeds.unsqueeze(0).expand(batch, -1, -1)
        prefix_len, response_len = self.instruction_embeds.size(0), self.response_embeds.size(0)
        tail_mask = torch.cat([item_mask, item_mask.new_ones(batch, response_len)], dim=1).long()
        # positions continue from the instruction through real items only
        tail_positions = prefix_len + tail_mask.cumsum(dim=1) - 1
        tail = torch.cat([item_embeds, response], dim=1)
        prefix_mask = tail_mask.new_ones(batch, prefix_len)
        if self.share_instruction_prefix:
            hidden = forward_shared_prefix(self.llm, {"inputs_embeds": self.instruction_embeds.unsqueeze(0)},
                                           {"inputs_embeds": tail}, tail_mask, use_cache=True).last_hidden_state
        else:
            prefix = self.instruction_embeds.unsqueeze(0).expand(batch, -1, -1)
            positions = torch.cat([torch.arange(prefix_len, device=items.device).expand(batch, -1), tail_positions], 1)
            hidden = self.llm(
                inputs_embeds=torch.cat([prefix, tail], dim=1),
                attention_mask=torch.cat([prefix_mask, tail_mask], dim=1),
                position_ids=positions,
                use_cache=False,
            ).last_hidden_state
        return from_llm(hidden[:, -1])

    # ------------------------------------------------------------------ RecBole API
    def calculate_loss(self, interaction):
        if self.training:
            interaction = sample_rows(interaction, self.rows_fraction)
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return self.loss_fct(self.item_scores(user), interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

    def full_sort_predict(self, interaction):
        """Scores of all items, [B, n_items], from one forward pass."""
        return self.item_scores(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]))

    def item_scores(self, user: torch.Tensor) -> torch.Tensor:
        """[B, n_items] from the users' last hidden states: the linear head, or (``tied``) the
        dot product with every item's projected input embedding."""
        if self.score_head == "tied":
            rows = lambda start, end: self.input_proj(self.item_embedding.weight[start:end])  # noqa: E731
        else:
            rows = lambda start, end: self.score.weight[start:end]  # noqa: E731
        return chunked_scores(user, rows, self.n_items, self.score_chunk_items)
