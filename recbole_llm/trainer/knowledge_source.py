"""Where SeRALM's alignment gets its samples: the generator job, run in the trainer's thread
(:class:`SyncKnowledgeSource`, the original algorithm) or by a worker thread on snapshots of the
LLM adapter and the recommender (:class:`AsyncKnowledgeSource`, Fig. 4 of the paper), refreshed
every ``refresh_interval`` iterations (:func:`resolve_refresh_interval`).
"""
from __future__ import annotations

import copy
import queue
import threading
from dataclasses import dataclass, field

import torch

from recbole_llm.knowledge.generator import KnowledgeGenerator
from recbole_llm.knowledge.prompts import DEFAULT_TEXT_FORMAT, KNOWLEDGE_PROMPT, knowledge_text, parse_knowledge
from recbole_llm.trainer.alignment_losses import reference_log_prob, token_log_probs

PAPER_REFRESH_INTERVAL = 50  # section 5.1.3: the generator job is refreshed every 50 iterations
MIN_REFRESHES = 5  # the default interval gives a run this many snapshots (the initial one included)


@dataclass
class Sample:
    """One batch from the generator job (everything Algorithm 1 lines 5-6 need)."""

    interaction: object
    items: torch.Tensor  # [B, K] resampled items
    prompt_ids: torch.Tensor  # [B*K, P]
    prompt_mask: torch.Tensor
    new_ids: torch.Tensor  # [B*K, T] sampled knowledge tokens
    new_mask: torch.Tensor
    texts: list  # [B*K] parsed knowledge texts
    vectors: torch.Tensor  # [B*K, d] encoded by the generator's encoder
    log_p_rec: torch.Tensor  # [B] log p(y|x,s) from the generator's recommender
    log_p_ref: torch.Tensor  # [B] log p(y|x) from the frozen knowledge-free recommender
    log_p_current: torch.Tensor  # [B] log p(y|x,s_now): the same recommender with the items' current knowledge
    logp_old: torch.Tensor | None = None  # [B*K, T] log p(t_k) under the LLM that sampled (None: the live one)
    fallbacks: int = 0
    version: int = 0  # snapshot version the sample was made with
    extra: dict = field(default_factory=dict)


class GeneratorJob:
    """Algorithm 1, lines 3-4: sample knowledge with ``llm`` and score it with ``recommender``:
    ``p(y|x,s)`` with the sampled knowledge, and the advantage's baseline ``p(y|x,s_now)`` with the
    items' current knowledge (the same recommender, the same instance).

    ``score_tokens``: also return the sampled tokens' log-probabilities under ``llm`` (a snapshot:
    the denominator of the importance ratio of a stale sample).
    """

    def __init__(self, llm, tokenizer, recommender, reference, item_fields, resample_items=("target",),
                 template=KNOWLEDGE_PROMPT, use_chat_template=True, max_new_tokens=64, temperature=1.0, top_p=1.0,
                 text_format=None, score_tokens=False, seed=0):
        self.llm, self.recommender, self.reference = llm, recommender, reference
        self.history_draws = torch.Generator().manual_seed(int(seed))  # for resample_items: history
        self.generator = KnowledgeGenerator(llm, tokenizer, template, use_chat_template, max_new_tokens)
        self.item_fields = item_fields
        self.resample_items = tuple(resample_items)
        self.temperature, self.top_p = temperature, top_p
        self.text_format = text_format
        self.score_tokens = score_tokens

    def resampled(self, interaction) -> torch.Tensor:
        """[B, K]: per instance, the items named by ``resample_items``: ``target`` (y), ``last`` (the most
        recent history item), ``history`` (a history item drawn uniformly, other than y where the history
        has one: the control that resamples as many items but none correlated with the label)."""
        model = self.recommender
        target = interaction[model.POS_ITEM_ID]
        seq, length = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
        columns = []
        for which in self.resample_items:
            if which == "target":
                columns.append(target)
            elif which == "last":
                columns.append(seq.gather(1, (length - 1).clamp(min=0).unsqueeze(1)).squeeze(1))
            else:
                columns.append(seq.gather(1, self.history_position(seq, length, target).unsqueeze(1)).squeeze(1))
        return torch.stack(columns, dim=1)

    def history_position(self, seq, length, target) -> torch.Tensor:
        """[B]: one uniformly drawn position of each instance's history, avoiding its target where it can."""
        in_history = torch.arange(seq.size(1), device=seq.device).unsqueeze(0) < length.clamp(min=1).unsqueeze(1)
        weights = (in_history & (seq != target.unsqueeze(1))).float()
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, in_history.float())
        return torch.multinomial(weights.cpu(), 1, generator=self.history_draws).squeeze(1).to(seq.device)

    def __call__(self, interaction) -> Sample:
        items = self.resampled(interaction)
        prompts = [self.generator.prompt(self.item_fields[i]) for i in items.flatten().tolist()]
        prompt_ids, prompt_mask, new_ids, new_mask = self.generator.generate_ids(
            prompts, do_sample=True, temperature=self.temperature, top_p=self.top_p)
        logp_old = None
        if self.score_tokens:
            was_training = self.llm.training
            self.llm.eval()  # the mode that sampled
            try:
                with torch.no_grad():
                    logp_old, _ = token_log_probs(self.llm, prompt_ids, prompt_mask, new_ids, new_mask)
            finally:
                self.llm.train(was_training)
        parsed = [parse_knowledge(text) for text in self.generator.decode(new_ids, new_mask)]
        fields = [self.item_fields[i] for i in items.flatten().tolist()]
        text_format = self.text_format or DEFAULT_TEXT_FORMAT
        texts = [knowledge_text(p, text_format, f, self.generator.template) for (p, _), f in zip(parsed, fields)]
        model = self.recommender
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                vectors = model.encode_knowledge(texts)
                log_p_rec = model.log_prob_target(interaction, items, vectors.view(items.size(0), items.size(1), -1))
                log_p_current = model.log_prob_target(interaction)
                log_p_ref = reference_log_prob(self.reference, interaction, model.POS_ITEM_ID)
        finally:
            model.train(was_training)
        return Sample(interaction, items, prompt_ids, prompt_mask, new_ids, new_mask, texts, vectors,
                      log_p_rec, log_p_ref, log_p_current, logp_old, fallbacks=sum(not ok for _, ok in parsed))


def snapshot_module(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` sharing every frozen parameter (``requires_grad=False``) with it."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    return copy.deepcopy(module, memo)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of what can change in training: trainable parameters and buffers."""
    state = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    state.update({name: b.detach().clone() for name, b in module.named_buffers()})
    return state


def load_trainable(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)


class SyncKnowledgeSource:
    """The original algorithm: the generator job runs in the trainer's thread with the live weights."""

    def __init__(self, job, batches):
        self.job, self.batches = job, batches
        self.refresh_count = 0

    def get(self) -> Sample:
        return self.job(next(self.batches))

    def step(self, iteration: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Failure:
    def __init__(self, error):
        self.error = error


class AsyncKnowledgeSource:
    """Fig. 4: a worker thread runs ``job`` on snapshots, ``refresh_interval`` iterations apart.

    ``live`` and ``snapshots`` map names to the trainer's modules and the worker's copies (the
    job must use the copies). :meth:`step` (called after each trainer iteration) copies the live
    weights into a pending snapshot every ``refresh_interval`` iterations; the worker applies it
    before its next sample. ``queue_size`` bounds how far the worker runs ahead.
    """

    def __init__(self, job, batches, live: dict, snapshots: dict, refresh_interval: int = 50,
                 queue_size: int = 2, poll_seconds: float = 0.05):
        self.job, self.batches = job, batches
        self.live, self.snapshots = live, snapshots
        self.refresh_interval = int(refresh_interval)
        self.poll = poll_seconds
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending = None
        self.requested_version = 0  # snapshots sent by the trainer
        self.applied_version = 0  # snapshot the worker is using
        self.refresh_count = 0
        self.error = None
        self.thread = threading.Thread(target=self._run, name="seralm-generator", daemon=True)
        self.thread.start()

    # worker side
    def _run(self):
        try:
            while not self._stop.is_set():
                self._apply_pending()
                sample = self.job(next(self.batches))
                sample.version = self.applied_version
                while not self._stop.is_set():
                    try:
                        self.queue.put(sample, timeout=self.poll)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # noqa: BLE001 - every failure must reach the trainer
            self.error = error
            self._put_failure(error)

    def _put_failure(self, error):
        while not self._stop.is_set():
            try:
                self.queue.put(_Failure(error), timeout=self.poll)
                return
            except queue.Full:
                continue

    def _apply_pending(self):
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            version, states = pending
            for name, state in states.items():
                load_trainable(self.snapshots[name], state)
            self.applied_version = version
            self.refresh_count += 1

    # trainer side
    def get(self) -> Sample:
        while True:
            try:
                item = self.queue.get(timeout=self.poll)
            except queue.Empty:
                if not self.thread.is_alive():
                    self.close()
                    raise RuntimeError("the knowledge generator worker stopped") from self.error
                continue
            if isinstance(item, _Failure):
                self.close()
                raise RuntimeError(f"the knowledge generator worker failed: {item.error!r}") from item.error
            return item

    def refresh(self) -> None:
        """Send the worker a snapshot of the live weights (taken now)."""
        states = {name: trainable_state(module) for name, module in self.live.items()}
        with self._lock:
            self.requested_version += 1
            self._pending = (self.requested_version, states)

    def step(self, iteration: int) -> None:
        if iteration % self.refresh_interval == 0:
            self.refresh()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the worker: it finishes (or abandons) its current sample and exits."""
        self._stop.set()
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resolve_refresh_interval(configured, iterations: int, slow: bool = False, logger=None) -> int:
    """Iterations between generator refreshes: ``configured``, or by default (``None``)
    ``min(PAPER_REFRESH_INTERVAL, iterations // MIN_REFRESHES)`` (at least 1), so that a short run
    still refreshes its generator ``MIN_REFRESHES - 1`` times or more; ``slow`` = the paper's
    ablation (60x). Logs one warning when the generator could never refresh within the run."""
    interval = int(configured) if configured is not None else min(PAPER_REFRESH_INTERVAL,
                                                                  max(1, int(iterations) // MIN_REFRESHES))
    if slow:
        interval *= 60
    if interval >= iterations > 0 and logger is not None:
        logger.warning(f"SeRALM: the asynchronous generator is never refreshed in this run (refresh_interval "
                       f"{interval} >= alignment_iterations {iterations}): every sample comes from the initial "
                       "LLM and recommender.")
    return interval
