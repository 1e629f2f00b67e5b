"""LlamaRec's trainer: stage-2 ranker training and candidate-aware evaluation.

Stage 1 (the retriever) is trained or loaded when the model is built. This trainer:

1. fixes each evaluation loader's candidates once: the retriever's top-k without the
   items :meth:`LlamaRec.candidate_exclusion` rules out (the history in the batch's own item
   sequence: RecBole 1.2.1 gives sequential models no ``history_index``), cached on disk
   under ``checkpoint_dir/llamarec/`` keyed by the retriever's weights, k, the exclusion
   rule and the rows;
2. trains the ranker's LoRA on RecBole's training rows (every prefix, with the lists
   ``ranker_train_candidates`` draws), capped at ``ranker_max_train_examples``, with linear
   warm-up and decay; every ``ranker_eval_step`` steps it ranks the retriever candidates of
   the first ``ranker_valid_users`` validation users whose target is among them and keeps the
   adapter with the best NDCG@10 (rows whose target is not a candidate score the same under
   any adapter; the log gives its standard error over those users); it stops after ``ranker_stopping_step`` validations
   without a better one (RecBole's ``stopping_step``, counted in validations);
3. scores every validation user once with the best adapter, then, with ``fusion``,
   picks the fusion weight on validation from ``fusion_weights`` (0 = the paper),
   doubling the largest weight while it is the best, so the chosen weight is bracketed
   by a worse one on each side (or is the grid's smallest); the curve is logged;
4. evaluates with RecBole's evaluator over all items, and logs the paper's "valid
   retrieval subset" metrics (users whose target is among the candidates).
"""
from __future__ import annotations

import math
import time
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from recbole.utils import set_color
from tqdm import tqdm

from recbole_llm import distributed
from recbole_llm.cache_io import atomic_save, cache_lock, content_key, guarded_load
from recbole_llm.trainer.llm_trainer import LLMTrainer, lr_factor
from recbole_llm.trainer.resume import (
    claim_resume, load_state, release, restore_trainer, resume_path, rng_state, save_state, set_rng_state,
    trainable_weights, trainer_state, wants_resume,
)


@dataclass
class EvalPhase:
    """One evaluation loader's candidates and (adapter-dependent) ranker scores, per batch."""

    candidates: list[torch.Tensor]
    retrieval: list[torch.Tensor]  # the retriever's scores of the candidates
    targets: list[torch.Tensor]
    histories: list[list[list[int]]]
    ranker: list[torch.Tensor] | None = None
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = sum(len(t) for t in self.targets)

    def flat(self, name):
        return torch.cat(getattr(self, name))


def target_ranks(candidate_scores: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor):
    """Which rows have their target among their candidates (bool [B]), and its 0-based rank by
    ``candidate_scores`` in those rows."""
    inside = (candidates == targets.unsqueeze(1)).any(1)
    order = candidate_scores[inside].argsort(dim=1, descending=True)
    ranked = candidates[inside].gather(1, order)
    return inside, (ranked == targets[inside].unsqueeze(1)).float().argmax(1)


def ndcg_gains(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's NDCG@k for one relevant item at 0-based ``rank``."""
    return (rank < k).float() / torch.log2(rank + 2)


def ranking_metrics(candidate_scores: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor, topk) -> dict:
    """Hit/Recall, MRR and NDCG @k over the rows whose target is among their candidates."""
    inside, rank = target_ranks(candidate_scores, candidates, targets)
    result = {"users": int(inside.sum()), "share": float(inside.float().mean())}
    for k in topk:
        hit = (rank < k).float()
        result[f"hit@{k}"] = float(hit.mean()) if len(rank) else 0.0
        result[f"mrr@{k}"] = float((hit / (rank + 1)).mean()) if len(rank) else 0.0
        result[f"ndcg@{k}"] = float(ndcg_gains(rank, k).mean()) if len(rank) else 0.0
    return result


class SubsetNDCG(NamedTuple):
    """The ranker's NDCG@10 on validation users whose target is a candidate: mean, its standard
    error over those users (sample standard deviation / sqrt(users); nan under two users), users."""

    ndcg: float
    se: float
    users: int

    @classmethod
    def from_sums(cls, total: float, squares: float, users: int) -> "SubsetNDCG":
        if users < 2:
            return cls(total / users if users else 0.0, math.nan, int(users))
        mean = total / users
        variance = max(0.0, squares - users * mean * mean) / (users - 1)
        return cls(mean, math.sqrt(variance / users), int(users))


class LlamaRecTrainer(LLMTrainer):
    """LlamaRec's two stages under RecBole's Trainer API (see the module docstring).

    Each checkpoint ``<name>.pth`` has the ranker's LoRA beside it as a PEFT folder
    ``<name>.adapter`` (the ``ranker_adapter`` setting loads it).

    Public after :meth:`fit`: ``fusion_results`` (fusion weight -> validation result);
    ``validation_trace`` (per check of ranker training: step, examples, mean train loss since the
    last check, valid-subset NDCG@10, its standard error over the users, users);
    ``ranker_resumed_at`` (the step an interrupted ranker training resumed at; None when it ran from step 0);
    after :meth:`evaluate`: ``subset_result`` (the metrics of the users whose target is among
    the candidates). ``timings`` (seconds per stage: candidates, ranker training, ranking) and
    ``ranked_rows`` (users the LLM ranked) add up over fit and evaluate; fit logs them.

    In RecBole's distributed mode each rank holds a share of the training rows and of the users
    to evaluate, so candidate generation and LLM ranking (the costly part) shard by rank: every
    rank ranks only its own users, and RecBole gathers the metrics. The ranker's gradients are
    averaged by RecBole's reduce hook (the global batch stays ``train_batch_size``), validation
    NDCG is averaged over the ranks, so all ranks keep the same best adapter; rank 0 alone
    writes checkpoints and the resume state and broadcasts what it reads.
    """

    pretrained_suffix = ".adapter"
    #: The ranker's learning rate after ``ranker_warmup_steps`` of warm-up (LlamaRec's authors'):
    #: a straight line to 0 at ``ranker_max_train_examples`` (:func:`~recbole_llm.trainer.llm_trainer.lr_factor`).
    lr_decay = "linear"

    def __init__(self, config, model):
        super().__init__(config, model)
        self.max_examples = config["ranker_max_train_examples"]
        self.micro_batch = config["ranker_micro_batch_size"]
        self.eval_every = config["ranker_eval_step"]
        self.valid_users = config["ranker_valid_users"]
        self.warmup = config["ranker_warmup_steps"]
        self.fusion = config["fusion"]
        self.fusion_weights = config["fusion_weights"]
        self.stopping_step = config["ranker_stopping_step"]
        self.cache_dir = Path(config["checkpoint_dir"]) / "llamarec"
        self._phases: dict[str, EvalPhase] = {}  # content key of the loader -> its phase
        self._loader_keys = weakref.WeakKeyDictionary()  # loader -> its content key, computed once
        self._active: EvalPhase | None = None
        self._batch_pos = 0
        self.subset_result = None
        self.fusion_results: dict = {}  # fusion weight -> validation result, after fit
        self.validation_trace: list[dict] = []  # one entry per check of ranker training, after fit
        self.ranker_resumed_at: int | None = None  # the step a resumed ranker training continued from
        self.timings = defaultdict(float)  # seconds per stage
        self.ranked_rows = 0

    @contextmanager
    def timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] += time.perf_counter() - start

    # ----- candidates ------------------------------------------------------------------
    def _phase(self, eval_data, show_progress=False) -> EvalPhase:
        """The phase of ``eval_data``, computed once per content: two loaders that yield the same
        batches share it, and a new loader never meets a stale one (as keying by ``id`` could)."""
        key = self._loader_key(eval_data)
        if key not in self._phases:
            with self.timed("candidates"):
                self._phases[key] = self._candidates(eval_data, show_progress)
        return self._phases[key]

    def _loader_key(self, eval_data) -> str:
        """What fixes ``eval_data``'s batches, hashed without iterating it: its class, batch size,
        the rows its sampler yields (a rank's share in a distributed run) and the columns the
        candidates read. Memoised per loader object (held weakly)."""
        key = self._loader_keys.get(eval_data)
        if key is None:
            model, dataset = self.model, eval_data._dataset
            fields = (self.config["USER_ID_FIELD"], model.ITEM_ID, model.ITEM_SEQ, model.ITEM_SEQ_LEN)
            rows = list(eval_data.sampler) if eval_data.sampler is not None else None
            key = content_key(type(eval_data).__name__, eval_data.step, rows,
                              *(dataset.inter_feat[name] for name in fields))
            self._loader_keys[eval_data] = key
        return key

    def _candidates(self, eval_data, show_progress) -> EvalPhase:
        model = self.model
        model.eval()
        batches = list(eval_data)
        fields = (self.config["USER_ID_FIELD"], model.ITEM_ID, model.ITEM_SEQ, model.ITEM_SEQ_LEN)
        key = content_key(f"k={model.k} exclude_history={model.exclude_history}",
                          *model.retriever.state_dict().values(),
                          *(interaction[name] for interaction, *_ in batches for name in fields), length=16)
        path = self.cache_dir / f"candidates-{key}.pt"
        histories = [model._histories(interaction) for interaction, *_ in batches]
        targets = [interaction[model.ITEM_ID].cpu() for interaction, *_ in batches]
        with cache_lock(path, self.logger):  # a second run with the same inputs waits, then reuses
            saved = guarded_load(path, lambda p: torch.load(p, weights_only=True), "candidates cache", self.logger)
            if saved is not None:
                self.logger.info(f"candidates reused from {path}")
                return EvalPhase(saved["candidates"], saved["retrieval"], targets, histories)
            candidates, retrieval = self._retrieve(batches, show_progress)
            atomic_save({"candidates": candidates, "retrieval": retrieval}, path)
        self.logger.info(f"candidates ({eval_data._dataset.inter_num} rows, k={model.k}) cached in {path}")
        return EvalPhase(candidates, retrieval, targets, histories)

    def _retrieve(self, batches, show_progress):
        """The retriever's top-k candidates of every batch and their retrieval scores."""
        model = self.model
        candidates, retrieval = [], []
        for interaction, *_ in tqdm(batches, desc="Candidates", disable=not show_progress):
            interaction = interaction.to(self.device)
            scores = model.retrieval_scores(interaction)
            top = model.top_candidates(scores, model.candidate_exclusion(interaction))
            candidates.append(top.cpu())
            retrieval.append(scores.gather(1, top).cpu())
        return candidates, retrieval

    def _score_phase(self, phase: EvalPhase, show_progress) -> None:
        """The ranker's scores of the rows whose target is among their candidates; other rows get
        zeros. Every metric is that of scoring all rows: a row whose target is not a candidate has
        it below all k candidates whatever the ranker says, and the items below the candidates
        keep the retriever's order. On ml-100k this sends about a quarter of the users to the LLM."""
        if phase.ranker is not None:
            return
        self.model.eval()  # scoring is inference (LoRA dropout off), whatever ran before
        histories, candidates = [h for batch in phase.histories for h in batch], phase.flat("candidates")
        rows = (candidates == phase.flat("targets").unsqueeze(1)).any(1).nonzero().squeeze(1)
        scores = torch.zeros(candidates.shape)
        if len(rows):
            with self.timed("ranking"):
                scores[rows] = self.model.ranker_scores([histories[i] for i in rows.tolist()], candidates[rows],
                                                        show_progress=show_progress).float().cpu()
        self.ranked_rows += len(rows)
        phase.ranker = list(scores.split([len(t) for t in phase.targets]))

    def _forget_ranker_scores(self):
        for phase in self._phases.values():
            phase.ranker = None

    # ----- ranker training -------------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return distributed.is_rank0(self.config)

    def _validation_ndcg(self, phase: EvalPhase) -> SubsetNDCG:
        """NDCG@10 of the ranker on the first ``ranker_valid_users`` rows with the target among the
        candidates (split over the ranks of a distributed run, and pooled over them), with its
        standard error over those users."""
        candidates, targets = phase.flat("candidates"), phase.flat("targets")
        rows = (candidates == targets.unsqueeze(1)).any(1).nonzero().squeeze(1)
        rows = rows[: math.ceil(self.valid_users / self.world_size)]
        histories = [h for batch in phase.histories for h in batch]
        self.model.eval()
        scores = self.model.ranker_scores([histories[i] for i in rows.tolist()], candidates[rows])
        self.model.train()
        gains = ndcg_gains(target_ranks(scores.float().cpu(), candidates[rows], targets[rows])[1], 10).double()
        total = torch.stack([gains.sum(), (gains * gains).sum(), torch.tensor(len(gains), dtype=torch.float64)])
        return SubsetNDCG.from_sums(*distributed.sum_over_ranks(self.config, total, self.device).tolist())

    def _resume_state(self, resume_file: Path) -> dict | None:
        """The saved ranker state if there is one (and resume is on): rank 0's, on every rank."""
        if not wants_resume(self.config):
            return None
        return distributed.from_rank0(self.config, lambda: load_state(resume_file))

    def _train_ranker(self, train_data, phase: EvalPhase, show_progress):
        """LoRA fine-tuning on ``ranker_max_train_examples`` examples (warmup, then linear decay),
        validated every ``ranker_eval_step`` steps; the best adapter is kept. Each validation
        step also writes the resume state, and an interrupted run continues from the last one
        with the same batches and random draws (:mod:`recbole_llm.trainer.resume`)."""
        resume_file = resume_path(self.config, "ranker")
        claim = claim_resume(self.config, resume_file)
        try:
            self._train_ranker_steps(train_data, phase, show_progress, resume_file if claim is not None else None)
        finally:
            release(claim)

    def _backward_in_micro_batches(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``calculate_loss`` and backward on micro-batches of ``ranker_micro_batch_size`` prompts, each
        loss weighted by its share of ``batch``: the gradient of the whole batch's mean loss, with the
        activations of one micro-batch in memory. Returns the batch's loss and its letter share
        (``letter_loss`` of the model; both detached)."""
        total, letter = 0.0, 0.0
        for start in range(0, len(batch), self.micro_batch):
            part = batch[start:start + self.micro_batch]
            loss = self._backward(lambda: self.model.calculate_loss(part) * (len(part) / len(batch)))
            total, letter = total + loss.detach(), letter + self.model.letter_loss * (len(part) / len(batch))
        return total, letter

    def _train_ranker_steps(self, train_data, phase, show_progress, resume_file):
        """The loop of :meth:`_train_ranker`; ``resume_file`` None: another run owns the state."""
        model = self.model
        global_batch = train_data.step * self.world_size  # RecBole gives each rank train_batch_size / world_size rows
        total_steps = math.ceil(self.max_examples / global_batch)
        warmup = min(self.warmup, total_steps)

        def factor(step):  # a function, not a callable object: LambdaLR then keeps it out of its state
            return lr_factor(self.lr_decay, step, total_steps, warmup)

        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.best_valid_score, seen, step, running, passes, best_weights = -1.0, 0, 0, 0.0, 0, None
        running_letter = 0.0  # the letter's loss summed since the last check (a tensor: read at checks only)
        stale, stopped = 0, False  # validations since the best one; early stop
        self.validation_trace = []
        resumed = self._resume_state(resume_file) if resume_file is not None else None
        if resumed:
            restore_trainer(self, resumed)
            scheduler.load_state_dict(resumed["scheduler"])
            seen, step, passes, best_weights = resumed["seen"], resumed["step"], resumed["passes"], resumed["best_weights"]
            stale, stopped = resumed["stale"], resumed["stopped"]
            self.validation_trace = resumed.get("validation_trace", [])
            self.ranker_resumed_at = step
            self.logger.info(f"resuming ranker training at step {step} ({seen} examples) from {resume_file} "
                             "(set resume: False to start over)")
        progress = tqdm(total=total_steps, initial=step, desc=set_color("Ranker training", "pink"),
                        disable=not show_progress)
        model.train()
        while seen < self.max_examples and not stopped:
            if self.world_size > 1:
                train_data.sampler.set_epoch(passes)  # the distributed sampler's shuffle of this pass
            if resumed:  # the pass the interrupted run was in: same order, then skip what it did
                set_rng_state(resumed["pass_rng"], train_data)
            pass_rng, batches, skip = rng_state(train_data), iter(train_data), resumed["pass_position"] if resumed else 0
            for _ in range(skip):
                next(batches)
            if resumed:
                set_rng_state(resumed["rng"])
                resumed = None
            for position, batch in enumerate(batches, start=skip + 1):
                self.optimizer.zero_grad()
                loss, letter = self._backward_in_micro_batches(batch.to(self.device))
                running_letter = running_letter + letter
                if self.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], **self.clip_grad_norm)
                self.optimizer.step()
                scheduler.step()
                loss_value = loss.item()  # one read per step, as RecBole's trainer
                seen, step, running = seen + len(batch) * self.world_size, step + 1, running + loss_value
                progress.update()
                progress.set_postfix(loss=f"{loss_value:.3f}")
                done = seen >= self.max_examples
                if step % self.eval_every == 0 or done:
                    with self.timed("ranker validation"):
                        ndcg, se, users = self._validation_ndcg(phase)
                    steps = step - (self.validation_trace[-1]["step"] if self.validation_trace else 0)
                    loss_mean, letter_mean = running / steps, float(running_letter) / steps
                    self.logger.info(f"ranker step {step} ({seen} examples): train loss {loss_mean:.4f} (its letter "
                                     f"part {letter_mean:.4f}; a uniform guess among {model.k}: {math.log(model.k):.4f}), "
                                     f"valid-subset NDCG@10 {ndcg:.4f} ± {se:.4f} (standard error) on {users} users")
                    self.validation_trace.append({"step": step, "examples": seen, "train_loss": loss_mean,
                                                  "letter_loss": letter_mean, "ndcg@10": ndcg, "se": se, "users": users})
                    running, running_letter = 0.0, 0.0
                    if ndcg > self.best_valid_score:
                        self.best_valid_score, self.cur_step, stale = ndcg, step, 0
                        best_weights = trainable_weights(model)  # detached CPU copies (PluggableMixin)
                        self._save_checkpoint(step, verbose=False)
                    else:
                        stale += 1
                    if self.stopping_step and stale >= self.stopping_step and not done:
                        self.logger.info(f"ranker training stops early at step {step} of {total_steps}: "
                                         f"{stale} validations without a better NDCG@10 (ranker_stopping_step)")
                        done = stopped = True
                    if self.is_main_process and resume_file is not None:
                        save_state(resume_file, trainer_state(
                            self, rng_state(), scheduler=scheduler.state_dict(), seen=seen, step=step,
                            best_weights=best_weights, passes=passes, pass_rng=pass_rng, pass_position=position,
                            stale=stale, stopped=stopped, validation_trace=self.validation_trace,
                        ))
                if done:
                    break
            passes += 1
        progress.close()
        model.load_state_dict(best_weights)
        if self.is_main_process and resume_file is not None:
            resume_file.unlink(missing_ok=True)
        self.logger.info(f"best ranker adapter: step {self.cur_step}, valid-subset NDCG@10 {self.best_valid_score:.4f}")

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        model = self.model
        phase = self._phase(valid_data, show_progress)
        self.cur_step = 0
        if self.max_examples > 0 and not self.config["ranker_adapter"]:
            with self.timed("ranker training (incl. validation)"):
                self._train_ranker(train_data, phase, show_progress)
        self._forget_ranker_scores()
        self._score_phase(phase, show_progress)
        results = self.fusion_results = self._fusion_curve(valid_data)
        model.fusion_weight = self._best_weight(results)
        self.best_valid_result = results[model.fusion_weight]
        self.best_valid_score = self.best_valid_result[self.valid_metric]
        self.logger.info(set_color("chosen fusion weight", "blue") + f": {model.fusion_weight}")
        self._save_checkpoint(self.cur_step, verbose=verbose)  # the adapter with the chosen fusion weight
        self.logger.info(set_color("time per stage", "blue") + ": "
                         + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in self.timings.items())
                         + f"; {self.ranked_rows} users ranked by the LLM")
        return self.best_valid_score, self.best_valid_result

    def _best_weight(self, results: dict) -> float:
        """The weight with the best validation score; the first (smallest) of equals."""
        sign = 1 if self.valid_metric_bigger else -1
        return max(results, key=lambda w: sign * results[w][self.valid_metric])

    def _fusion_curve(self, valid_data, max_doublings: int = 10) -> dict:
        """Validation results per fusion weight (ranker scores are cached: no LLM pass): the grid,
        then the largest weight doubled while it is the best."""
        results = {}

        def validate(weight: float):
            self.model.fusion_weight = weight
            results[weight] = self.evaluate(valid_data, load_best_model=False)

        for weight in sorted({float(w) for w in (self.fusion_weights if self.fusion else [0.0])}):
            validate(weight)
        for _ in range(max_doublings if self.fusion else 0):
            largest = max(results)
            if self._best_weight(results) != largest:
                break
            validate(largest * 2 if largest > 0 else 1.0)
        curve = ", ".join(f"{w:g}: {r[self.valid_metric]:.4f}" for w, r in results.items())
        self.logger.info(f"fusion weight -> valid {self.valid_metric}: {curve}")
        return results

    # ----- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            checkpoint = distributed.load_checkpoint(self.config, model_file or self.saved_model_file, self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self._forget_ranker_scores()
        phase = self._phase(eval_data, show_progress)
        self.model.eval()
        if self.model.ranker_enabled:
            self._score_phase(phase, show_progress)
        self._active, self._batch_pos = phase, 0
        result = super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)
        if self.model.ranker_enabled:
            fused = self.model.fuse(phase.flat("ranker"), phase.flat("retrieval"), self.model.fusion_weight)
            self.subset_result = ranking_metrics(fused, phase.flat("candidates"), phase.flat("targets"), self.config["topk"])
            self.logger.info(set_color("valid retrieval subset", "yellow") + f": {self.subset_result}")
        return result

    def _full_sort_batch_eval(self, batched_data):
        interaction, history_index, positive_u, positive_i = batched_data
        phase, i = self._active, self._batch_pos
        self._batch_pos += 1
        if not torch.equal(phase.targets[i], interaction[self.model.ITEM_ID].cpu()):
            raise RuntimeError("evaluation batches differ from those the candidates were computed for")
        scores = self.model.full_sort_predict(
            interaction.to(self.device),
            candidates=phase.candidates[i].to(self.device),
            ranker=None if phase.ranker is None else phase.ranker[i],
        )
        scores[:, 0] = -math.inf
        if history_index is not None:
            scores[history_index] = -math.inf
        return interaction, scores, positive_u, positive_i
