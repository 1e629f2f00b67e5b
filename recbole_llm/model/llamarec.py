"""LlamaRec: two-stage recommendation with an LLM ranker.

Zhenrui Yue, Sara Rabhi, Gabriel de Souza Pereira Moreira, Dong Wang, Even Oldridge.
"LlamaRec: Two-Stage Recommendation using Large Language Models for Ranking",
PGAI@CIKM 2023 (arXiv:2311.02089).

* Stage 1, retrieval: an ID-based sequential model (``retriever``, LRURec by default, any
  RecBole sequential model) trained with its own RecBole trainer, or loaded from
  ``retriever_checkpoint``, then frozen. Its top ``candidate_k`` items, without the user's
  history as the authors (``exclude_history``), are the candidates.
* Stage 2, ranking: the history titles and the lettered candidates go into the authors'
  prompt (:mod:`recbole_llm.llm.prompts`; token ids assembled from each item's, tokenized once);
  the LLM, tuned with LoRA, scores all candidates in ONE forward pass through the letter verbalizer
  (only the last position's logits).
* Training (as the authors' code): every prefix of each training sequence is an example,
  with candidates = the true item + ``k - 1`` random non-history items, shuffled;
  next-token cross-entropy on the answer tokens (letter, EOS) only. Beyond the paper,
  ``ranker_train_candidates`` draws them like the evaluation lists instead (the retriever's
  top-k, or half of it and half random items; :meth:`LlamaRec.training_lists`).
* ``full_sort_predict`` returns a score for every item: the candidates, in the ranker's
  order, above all other items, which keep the retriever's order. For ``k <= 20`` RecBole's
  metrics are then the paper's "overall" metrics.

Choices the paper leaves open (details in :class:`LlamaRec`): truncation of long prompts,
left padding with position ids, ``share_prompt_prefix``, and, beyond the paper, ``fusion``
of the ranker's and the retriever's scores inside the top-k, training candidates drawn
from the retriever (``ranker_train_candidates``) and, for CPUs without bf16 units, ranking with a
dynamic-int8 copy of the LLM (``ranker_int8``, :meth:`LlamaRec.scoring_llm`).
"""
from __future__ import annotations

import random
from logging import getLogger

import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction
from recbole.model.abstract_recommender import SequentialRecommender
from tqdm import tqdm

from recbole_llm.data.interactions import item_sets, training_sequences
from recbole_llm.data.item_text import item_texts
from recbole_llm.llm.backbone import load_llm
from recbole_llm.llm.precision import adapter_fingerprint, from_llm, int8_copy
from recbole_llm.llm.batching import common_prefix_length, forward_shared_prefix, left_pad
from recbole_llm.llm.pluggable import PluggableMixin
from recbole_llm.llm.prompts import (ALPACA_TEMPLATE, RANKING_INSTRUCTION, RankingPrompt, RankingPromptIds,
                                     truncate_texts)
from recbole_llm.llm.verbalizer import LetterVerbalizer
from recbole_llm.model.objectives import check_loss_type
from recbole_llm.model.pretrained import pretrained_id_model
from recbole_llm.errors import InputError


def recent_items(item_seq: torch.Tensor, item_seq_len: torch.Tensor, n: int):
    """The last ``n`` items of RecBole's right-padded histories, still right-padded."""
    if item_seq.size(1) <= n:
        return item_seq, item_seq_len
    start = (item_seq_len - n).clamp(min=0)
    index = (start.unsqueeze(1) + torch.arange(n, device=item_seq.device)).clamp(max=item_seq.size(1) - 1)
    kept = item_seq.gather(1, index)
    new_len = item_seq_len.clamp(max=n)
    return kept * (torch.arange(n, device=item_seq.device) < new_len.unsqueeze(1)), new_len


def two_stage_scores(retrieval: torch.Tensor, candidates: torch.Tensor, candidate_scores: torch.Tensor) -> torch.Tensor:
    """Scores for all items: ``candidates`` ordered by ``candidate_scores`` above every
    other item, the other items in ``retrieval`` order."""
    below = retrieval - retrieval.max(dim=1, keepdim=True).values - 1  # every item <= -1
    lifted = candidate_scores - candidate_scores.min(dim=1, keepdim=True).values  # candidates >= 0
    return below.scatter(1, candidates, lifted.to(below.dtype))


class LlamaRec(PluggableMixin, SequentialRecommender):
    """LlamaRec as a RecBole sequential recommender (see the module docstring).

    The choices the paper leaves open, each a setting (properties/model/LlamaRec.yaml):

    * The history the candidates leave out is the user's whole history, as the authors': the
      training sequence (kept from the training split, so also the items older than the
      ``MAX_ITEM_LIST_LENGTH`` window) and the row's own item sequence, by one code path for
      validation, test and ``full_sort_predict``; a training prefix leaves out every item before
      its target. ``exclude_history: False`` allows repeats (datasets where users consume items
      again). The prompt shows the last ``ranker_history_len`` items of the row's sequence.
    * Prompts that are too long lose their oldest history items first (the authors truncate
      on the left, which can cut the instruction).
    * Left padding with explicit position ids, so a padded prompt scores exactly as an
      unpadded one.
    * The prompts of a batch share their instruction, which ``share_prompt_prefix`` runs once
      per batch (the longest common token prefix,
      :func:`recbole_llm.llm.batching.forward_shared_prefix`; the same scores, less compute).
    * Beyond the paper: ``fusion_weight`` adds ``w * log_softmax(retriever scores)`` to the
      ranker's ``log_softmax`` inside the top-k (``w = 0`` is the paper; the trainer picks
      ``w`` on validation when ``fusion: True``), because users of the authors' code saw the
      ranker lower results.
    * Beyond the paper: ``ranker_train_candidates`` (:meth:`training_lists`) draws training lists
      like the evaluation ones, since the ranker is evaluated on the retriever's top-k (hard, all
      plausible) but the paper trains it on random items (easy, mostly unpopular).
    """

    other_parameter_name = ["fusion_weight"]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        check_loss_type(config, "LlamaRec", ("CE",))  # before stage 1 trains
        self.logger = getLogger()
        self.k = config["candidate_k"]
        self.max_prompt_tokens = config["max_prompt_tokens"]
        self.eval_micro_batch = config["ranker_eval_batch_size"]
        self.share_prompt_prefix = config["share_prompt_prefix"]
        self.gradient_checkpointing = config["gradient_checkpointing"]
        self.fusion_weight = 0.0
        self.exclude_history = config["exclude_history"]
        self.train_candidates = config["ranker_train_candidates"]
        self.target_position = config["ranker_train_target_position"]
        self.ranker_enabled = True  # False: full_sort_predict returns the retriever's scores (for comparisons)
        self.int8 = config["ranker_int8"]
        self.__dict__["_int8_llm"] = None  # (adapter fingerprint, copy); not a submodule: out of state_dict and .to()
        texts = item_texts(dataset, config["item_text_fields"])  # first: a dataset without text fails fast
        # the users' whole training sequences, beyond the MAX_ITEM_LIST_LENGTH window (exclude_history)
        self.training_sequences = training_sequences(dataset)
        self.training_items = item_sets(self.training_sequences, self.n_items)  # sparse: no buffer (DDP broadcasts those)

        self.retriever = pretrained_id_model(
            config, dataset, config["retriever"], checkpoint=config["retriever_checkpoint"],
            overrides=config["retriever_config"], setting="retriever_checkpoint",
        )
        self.llm, self.tokenizer = load_llm(
            config, self.logger, adapter=config["ranker_adapter"], trainable=True,
            lora={"r": config["lora_r"], "alpha": config["lora_alpha"], "dropout": config["lora_dropout"],
                  "target_modules": config["lora_target_modules"]},
        )
        self.verbalizer = LetterVerbalizer(self.tokenizer, self.k)
        self.prompt = RankingPrompt(
            config["prompt_template"] or ALPACA_TEMPLATE, config["prompt_instruction"] or RANKING_INSTRUCTION,
            config["ranker_history_len"],
        )
        self.prompt_tokens = RankingPromptIds(  # each item's text tokenized once; checked on a few users' prompts
            self.prompt, self.tokenizer, truncate_texts(texts, self.tokenizer, config["title_max_tokens"]),
            self.verbalizer.letters, self.max_prompt_tokens, sample_histories=self.training_sequences,
        )

    def train(self, mode: bool = True):
        """Train the ranker; the frozen retriever stays in eval mode (no dropout), so the lists it
        proposes for training rows (``ranker_train_candidates``) are those it would give at evaluation."""
        super().train(mode)
        self.retriever.eval()
        if mode:
            self.__dict__["_int8_llm"] = None  # the adapter is about to change
        return self

    def scoring_llm(self):
        """The LLM that ranks: the trained one, or in eval mode with ``ranker_int8`` its dynamic-int8 copy
        (:func:`~recbole_llm.llm.precision.int8_copy`), made again whenever the adapter has changed since (a
        training step, a loaded checkpoint: its fingerprint says) and dropped when training resumes (:meth:`train`)."""
        if not self.int8 or self.training:
            return self.llm
        fingerprint = adapter_fingerprint(self.llm)
        if self._int8_llm is None or self._int8_llm[0] != fingerprint:
            self.__dict__["_int8_llm"] = (fingerprint, int8_copy(self.llm))
        return self._int8_llm[1]

    # ----- stage 1 -------------------------------------------------------------------
    def retrieval_scores(self, interaction) -> torch.Tensor:
        """The frozen retriever's scores for all items, [B, n_items]."""
        seq, seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        seq, seq_len = recent_items(seq, seq_len, self.retriever.max_seq_length)
        view = Interaction({**interaction.interaction, self.ITEM_SEQ: seq, self.ITEM_SEQ_LEN: seq_len})
        with torch.no_grad():
            return self.retriever.full_sort_predict(view)

    def top_candidates(self, retrieval: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
        """Top-k items by retrieval score, ``exclude`` (bool [B, n_items]) and padding left out."""
        masked = retrieval.masked_fill(exclude, float("-inf"))
        masked[:, 0] = float("-inf")
        return masked.topk(self.k, dim=1).indices

    def history_mask(self, interaction) -> torch.Tensor:
        """Items in each row's history, bool [B, n_items]: the user's whole training sequence (also
        what lies beyond the ``MAX_ITEM_LIST_LENGTH`` window) and the row's item sequence (which
        adds the validation item for a test row, and holds a training prefix's own items)."""
        seq = interaction[self.ITEM_SEQ]
        users = interaction[self.USER_ID]
        if self.training_items.device != users.device:
            self.training_items = self.training_items.to(users.device)
        mask = self.training_items.index_select(0, users).to_dense() > 0
        return mask.scatter_(1, seq, True)

    def candidate_exclusion(self, interaction) -> torch.Tensor:
        """Items that may not be candidates, bool [B, n_items]: the history (``exclude_history``)
        or nothing. The one rule for evaluation candidates (trainer cache and ``full_sort_predict``)."""
        if self.exclude_history:
            return self.history_mask(interaction)
        seq = interaction[self.ITEM_SEQ]
        return torch.zeros(seq.size(0), self.n_items, dtype=torch.bool, device=seq.device)

    # ----- stage 2 -------------------------------------------------------------------
    def _histories(self, interaction) -> list[list[int]]:
        seq, seq_len = interaction[self.ITEM_SEQ].tolist(), interaction[self.ITEM_SEQ_LEN].tolist()
        return [row[:n] for row, n in zip(seq, seq_len)]

    def _prompt_ids(self, history: list[int], candidates: list[int]) -> list[int]:
        """Token ids of one ranking prompt, dropping the oldest history items to fit (:class:`RankingPromptIds`)."""
        return self.prompt_tokens(history, candidates)

    def _llm_logits(self, sequences: list[list[int]], keep: int) -> torch.Tensor:
        """Next-token logits at the last ``keep`` positions of ``sequences`` (left-padded; their
        common prefix run once with ``share_prompt_prefix``; gradient checkpointing's recompute
        would extend the shared cache twice, so it turns sharing off in training)."""
        llm, shared = self.scoring_llm(), 0
        if self.share_prompt_prefix and len(sequences) > 1 and not (self.training and self.gradient_checkpointing):
            shared = min(common_prefix_length(sequences), min(len(s) for s in sequences) - keep)
        input_ids, attention, positions = left_pad([s[shared:] for s in sequences], self.tokenizer.pad_token_id,
                                                   self.device)
        if shared <= 0:
            return llm(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=keep).logits
        prefix = {"input_ids": torch.tensor([sequences[0][:shared]], device=self.device)}
        return forward_shared_prefix(llm, prefix, {"input_ids": input_ids}, attention, logits_to_keep=keep).logits

    def ranker_scores(self, histories: list[list[int]], candidates: torch.Tensor, show_progress: bool = False) -> torch.Tensor:
        """Verbalizer scores [B, k] of each row's candidates, in micro-batches."""
        rows = candidates.tolist()
        scores = []
        steps = range(0, len(rows), self.eval_micro_batch)
        for start in tqdm(steps, desc="Ranking", unit="batch", disable=not show_progress):
            chunk = slice(start, start + self.eval_micro_batch)
            prompts = [self._prompt_ids(h, c) for h, c in zip(histories[chunk], rows[chunk])]
            with torch.no_grad():
                logits = self._llm_logits(prompts, keep=1)[:, -1]
            scores.append(from_llm(self.verbalizer.scores(logits)))
        return torch.cat(scores)

    def fuse(self, ranker: torch.Tensor, retrieval_of_candidates: torch.Tensor, weight: float) -> torch.Tensor:
        """Candidate scores: the ranker's log-probabilities, plus ``weight`` times the retriever's."""
        fused = F.log_softmax(ranker, dim=1)
        if weight:
            fused = fused + weight * F.log_softmax(retrieval_of_candidates, dim=1)
        return fused

    def prior_items(self, user: int, window: list[int], target: int) -> set[int]:
        """Every item before ``target`` in ``user``'s training sequence (the authors draw training
        negatives outside all of them): the row's ``window`` and, when the window is full, the items
        before it in the user's sequence (where the window ends at the target)."""
        if len(window) < self.max_seq_length:
            return set(window)
        sequence = self.training_sequences[user]
        width = len(window)
        end = next((t for t in range(width, len(sequence)) if sequence[t] == target
                    and sequence[t - width:t] == window), None)
        return set(window) if end is None else set(sequence[:end])

    def _random_items(self, excluded: set[int], count: int) -> set[int]:
        """``count`` distinct random items outside ``excluded`` (which holds the padding item 0)."""
        if self.n_items - len(excluded) < count:
            raise InputError(f"only {self.n_items - len(excluded)} items besides the target"
                             f"{' and the history' if self.exclude_history else ''} for candidate_k={self.k}: "
                             "lower candidate_k")
        drawn = set()
        while len(drawn) < count:
            item = random.randrange(1, self.n_items)
            if item not in excluded:
                drawn.add(item)
        return drawn

    def training_candidates(self, history: set[int], target: int) -> tuple[list[int], int]:
        """The true item and ``k - 1`` random other items (not in the user's ``history`` with
        ``exclude_history``, the rule evaluation candidates follow), shuffled; and the true item's index."""
        excluded = (set(history) if self.exclude_history else set()) | {0, target}
        candidates = [target, *self._random_items(excluded, self.k - 1)]
        random.shuffle(candidates)
        return candidates, candidates.index(target)

    def retrieved_candidates(self, retrieval: torch.Tensor, history: set[int], proposed: list[int],
                             target: int) -> tuple[list[int], int]:
        """One training list from the retriever's ``proposed`` items (its top items for the row, best
        first, ``history`` left out): those items with the target, which replaces the last of them
        where absent, then random items outside the history and the proposed ones up to ``k``; the
        list in the retriever's order (``retrieval``, the row's scores of all items) as the
        evaluation lists, except a target the retriever did not propose with
        ``ranker_train_target_position: random``, which goes to a random position; with ``shuffle``
        the whole list is shuffled (as the paper's random lists), so no position tells the target:
        on its own training rows the retriever ranks the target first far more often than on
        validation rows, which its order would teach the ranker."""
        proposed_target = target in proposed
        chosen = list(proposed) if proposed_target else [*proposed[:-1], target]
        excluded = (set(history) if self.exclude_history else set()) | {0, *chosen}
        chosen += self._random_items(excluded, self.k - len(chosen))
        order = retrieval[chosen].argsort(descending=True, stable=True).tolist()
        candidates = [chosen[i] for i in order]
        if self.target_position == "shuffle":
            random.shuffle(candidates)
        elif not proposed_target and self.target_position == "random":
            candidates.remove(target)
            candidates.insert(random.randrange(self.k), target)
        return candidates, candidates.index(target)

    def training_lists(self, interaction) -> list[tuple[list[int], int]]:
        """Each training row's candidates and the index of its target, per ``ranker_train_candidates``:

        * ``random`` (the paper): :meth:`training_candidates`;
        * ``retriever``: the frozen retriever's top-k for the row's sequence, the row's history left
          out by the rule of the random lists (every item before the target, :meth:`prior_items`),
          the target in place of the k-th item where absent (:meth:`retrieved_candidates`);
        * ``mix``: the retriever's top ``k // 2`` items the same way (a fixed share: half the list
          hard, half the paper's easy random items), the rest random non-history items.

        The retriever scores the rows in one batched forward pass per call (``calculate_loss``'s
        micro-batch), in eval mode (:meth:`train`). Not precomputed for all training rows: a
        capped budget trains on each row at most once per pass, and on ml-100k (2 shared cores)
        LRURec took tens of milliseconds per row in batches of 2-4 against seconds per prompt for
        the LLM's forward and backward, while all 97k training prefixes at ~18 ms per row (batches
        of 256) would cost more than the 10,000 rows of a long run. The retriever saw these rows in
        its own training, so its top-k holds the target more often on them than on validation rows.
        """
        rows = list(zip(self._histories(interaction), interaction[self.USER_ID].tolist(),
                        interaction[self.POS_ITEM_ID].tolist()))
        priors = [self.prior_items(user, history, target) for history, user, target in rows]
        targets = [target for _, _, target in rows]
        if self.train_candidates == "random":
            return [self.training_candidates(prior, target) for prior, target in zip(priors, targets)]
        retrieval = self.retrieval_scores(interaction)
        exclude = torch.zeros_like(retrieval, dtype=torch.bool)
        if self.exclude_history:
            exclude[[r for r, prior in enumerate(priors) for _ in prior], [i for prior in priors for i in prior]] = True
        width = self.k if self.train_candidates == "retriever" else self.k // 2
        proposed = self.top_candidates(retrieval, exclude)[:, :width].tolist()
        retrieval = retrieval.float().cpu()
        return [self.retrieved_candidates(scores, prior, top, target)
                for scores, prior, top, target in zip(retrieval, priors, proposed, targets)]

    def calculate_loss(self, interaction):
        """Next-token cross-entropy on the answer tokens (letter, EOS) only. The letter's share is
        kept (detached) in ``letter_loss``: the ranker's trainer logs it next to ln(k), the loss of a
        ranker that has learned the answer format but cannot tell the target from the other candidates."""
        sequences, answers = [], []
        for history, (candidates, index) in zip(self._histories(interaction), self.training_lists(interaction)):
            answer = self.verbalizer.answer_ids(index)
            sequences.append(self._prompt_ids(history, candidates) + answer)
            answers.append(answer)
        # logits at positions -3 and -2 predict the letter and EOS
        logits = self._llm_logits(sequences, keep=3)[:, :2]
        labels = torch.tensor(answers, device=logits.device)
        losses = F.cross_entropy(from_llm(logits.reshape(-1, logits.size(-1))), labels.reshape(-1), reduction="none")
        self.letter_loss = losses.view(-1, 2)[:, 0].mean().detach()
        return losses.mean()

    # ----- RecBole's scoring contract -------------------------------------------------
    def full_sort_predict(self, interaction, exclude=None, candidates=None, ranker=None):
        """Scores for all items (see the module docstring).

        ``exclude`` (bool [B, n_items], default: :meth:`candidate_exclusion`) keeps items out
        of the candidates; ``candidates`` / ``ranker`` let a trainer pass cached values.
        """
        retrieval = self.retrieval_scores(interaction)
        if not self.ranker_enabled:
            return retrieval
        if candidates is None:
            candidates = self.top_candidates(retrieval, self.candidate_exclusion(interaction) if exclude is None else exclude)
        if ranker is None:
            ranker = self.ranker_scores(self._histories(interaction), candidates)
        fused = self.fuse(ranker.to(retrieval.device), retrieval.gather(1, candidates), self.fusion_weight)
        return two_stage_scores(retrieval, candidates, fused)

    def peft_model(self):
        """The ranker's LLM with its LoRA: :meth:`save_pretrained` writes that adapter as a PEFT
        folder, which ``PeftModel.from_pretrained`` or the ``ranker_adapter`` setting loads."""
        return self.llm

    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].unsqueeze(1)).squeeze(1)

