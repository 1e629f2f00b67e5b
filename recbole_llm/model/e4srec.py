"""E4SRec: item IDs fed into a frozen LLM, the whole catalogue ranked in one forward pass.

Li et al., "E4SRec: An Elegant Effective Efficient Extensible Solution of Large Language Models for
Sequential Recommendation", arXiv:2312.02443. Follows the authors' code (github.com/HestiaSky/E4SRec):
a stage-1 ID model's item table (frozen) -> ``Linear(id_dim, llm_hidden)`` -> the LLM body (frozen, LoRA
r=16 alpha=16 dropout 0.05 on the MLPs) reads ``[Alpaca instruction | items | "### Response:"]`` ->
the last hidden state -> ``Linear(llm_hidden, n_items)`` -> cross-entropy over ALL items. LoRA, the
projection and the head are the pluggable part, saved as a PEFT folder (one LLM serves many datasets).

Choices the paper and code leave open (settings in properties/model/E4SRec.yaml):
* History = the whole prefix before the target (as the authors), cut to ``MAX_ITEM_LIST_LENGTH``,
  LEFT-padded as their collator, with masked padding and position ids that skip it (padding-invariant).
* Rows: ``train_targets_per_user: 50`` = the authors' (every position of the last 50 training items of a
  user is a target; 50 caps targets, not history); ``train_rows_per_epoch`` samples a subset on a CPU.
* Step size as settings (the authors: 128 rows per step, AdamW 3e-4, 100 warm-up steps, cosine):
  ``gradient_accumulation_steps``, ``learning_rate``, ``warmup_steps``, ``lr_schedule``.
* ``lora_target_modules`` can put LoRA on the attention projections; ``llm_layers`` keeps the first n
  decoder layers (a CPU compromise shared with Laser).
* ``share_instruction_prefix``: the shared instruction's keys/values are computed once per batch and reused
  (same result; off under gradient checkpointing).
* ``score_head: tied`` (beyond the paper) scores items by their projected input embeddings instead of a
  head trained from scratch. Default PyTorch init; item 0 (padding) is set to -inf by RecBole's evaluator.
"""
from __future__ import annotations

from logging import getLogger

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from torch import nn

from recbole_llm.llm.backbone import load_llm
from recbole_llm.llm.precision import from_llm, to_llm
from recbole_llm.llm.batching import forward_shared_prefix, left_align
from recbole_llm.llm.pluggable import PluggableMixin, count_parameters, rows_fraction, sample_rows
from recbole_llm.model.objectives import check_loss_type
from recbole_llm.model.pretrained import pretrained_id_model
from recbole_llm.model.scoring import chunked_scores
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
        if self.score_head == "linear":  # else tied: no per-item head
            self.score = nn.Linear(self.llm_hidden, self.n_items, bias=False)
        self.score_chunk_items = config["score_chunk_items"]
        self.loss_fct = nn.CrossEntropyLoss()
        if config["pluggable_dir"]:
            self.load_pretrained(config["pluggable_dir"])
        trainable, total = count_parameters(self)
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
