"""SeRALM's trainer: knowledge-enhanced training, alignment training (Algorithm 1) and the
asynchronous knowledge generator (section 4.4, Eq. 5-9, Fig. 4 of "Enhancing Sequential
Recommenders with Augmented Knowledge from Aligned Large Language Models", Ren et al., SIGIR 2024,
doi:10.1145/3626772.3657782; the paper has no arXiv version).

``SeRALMTrainer.fit`` runs, in order:

1. RecBole's own training loop on the cached vectors of the un-aligned LLM's knowledge
   (``alignment_iterations: 0`` is Base+NA_LLM; with alignment, a warm-up of ``warmup_epochs``).
2. Alignment, one iteration per batch of ``align_batch_size`` instances ``(x, y)``: knowledge
   ``s`` is sampled from the LLM with LoRA for the items of ``resample_items``; the LLM is
   updated by Eq. 6/8 with weight ``p(y|x,s) / p(y|x)`` (the recommender being trained over a
   frozen knowledge-free one) less a per-instance baseline, the same weight with the items'
   current knowledge, and a per-token KL penalty to the original LLM
   (:mod:`~recbole_llm.trainer.alignment_losses`); the recommender by Eq. 9.
3. With ``generator_mode: async`` (Fig. 4) a worker thread samples on snapshots of the adapter
   and the recommender, refreshed every ``refresh_interval`` iterations
   (:mod:`~recbole_llm.trainer.knowledge_source`); ``sync`` is the original algorithm.
4. The aligned adapter is saved as a PEFT folder (reused when ``alignment_cache``), the
   knowledge of ALL items is regenerated with it and re-encoded, and the recommender trains
   further for ``epochs`` on those cached vectors (end of 4.4).

Choices the paper leaves open (details in :meth:`SeRALMTrainer.align` and
:meth:`SeRALMTrainer.alignment_step`): the advantage's baseline,
``ratio_clip``, ``kl_estimator``, the default ``refresh_interval``, importance weighting of
stale samples (``importance_clip``) and ``lora_dropout: 0``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import set_color

from recbole_llm.cache_io import atomic_target, content_key, shaping_settings, unique_checkpoint_name
from recbole_llm.knowledge.encoding import encoder_identity
from recbole_llm.knowledge.generation import (adapter_dir_fingerprint, dataset_knowledge, knowledge_cache_for,
                                               knowledge_dir, knowledge_prompt)
from recbole_llm.knowledge.identity import llm_identity
from recbole_llm.knowledge.prompts import item_prompt_fields
from recbole_llm.llm.backbone import precision_identity
from recbole_llm.trainer.alignment_losses import alignment_loss, per_token_kl, token_log_probs
from recbole_llm.trainer.knowledge_source import (
    AsyncKnowledgeSource,
    GeneratorJob,
    Sample,
    SyncKnowledgeSource,
    resolve_refresh_interval,
    snapshot_module,
)

#: Bumped when the alignment learns something else from the same settings (2: the per-instance baseline).
ALIGNMENT_VERSION = 2
#: The statistics of every alignment iteration, saved in the aligned adapter's folder (its learning curve).
ALIGNMENT_TRACE = "alignment_trace.json"
#: Settings that do not shape the aligned adapter, besides the volatile ones of
#: :func:`~recbole_llm.cache_io.shaping_settings`: what runs only after the alignment (the final
#: training's ``epochs``, the regeneration of all items, the test split's sampling), speed, logging,
#: paths and process layout. Every other setting is in the key, one added later too; the LLM, the
#: text encoder and the LLM's precision enter by identity (not by path, name or ``auto``).
NOT_SHAPING_ALIGNMENT = frozenset({
    "epochs", "test_neg_sample_args", "metric_decimal_place", "loss_decimal_place", "knowledge_batch_size",
    "encoder_batch_size", "num_threads", "gradient_checkpointing", "align_log_interval", "alignment_cache",
    "llm_adapter", "knowledge_dir", "save_dataset", "save_dataloaders", "dataset_save_path", "dataloaders_save_path",
    "nproc", "world_size", "ip", "port", "offset",
    "llm_path", "llm_dtype", "load_in_4bit", "text_encoder",  # by identity
})


def alignment_key(config, knowledge_file) -> str:
    """The key of the adapter that SeRALM's alignment trains from ``config``, starting from the
    knowledge in ``knowledge_file`` (whose name is the knowledge cache's key): every setting that
    shapes the LLM being aligned, the recommender whose ``p(y|x,s)`` rewards it (warm-up, fusion,
    encoder, optimiser) and the reference giving ``p(y|x)`` (see :data:`NOT_SHAPING_ALIGNMENT`)."""
    return content_key({
        "version": ALIGNMENT_VERSION,
        "settings": shaping_settings(config, NOT_SHAPING_ALIGNMENT),
        "llm": llm_identity(config["llm_path"]), "precision": precision_identity(config),
        "encoder": encoder_identity(config["text_encoder"]),
        "knowledge": Path(knowledge_file).name,
    }, length=12)


def read_trace(adapter_dir) -> list[dict]:
    """The per-iteration statistics saved with an aligned adapter ([] for one aligned before they were kept)."""
    path = Path(adapter_dir) / ALIGNMENT_TRACE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return []


class SeRALMTrainer(Trainer):
    """RecBole's Trainer plus SeRALM's alignment stage (see the module docstring).

    :meth:`fit` runs the knowledge-enhanced training, then :meth:`align` (Algorithm 1: the iterations,
    the asynchronous generator of Fig. 4 and the choices the paper leaves open about it), then the
    inference knowledge; :meth:`alignment_step` is one iteration's two updates (Eq. 6-9: the sampled
    knowledge, the advantage's per-instance baseline, the KL penalty, the recommender's update).
    :meth:`generation_needed` is :meth:`fit`'s decision, run dry (what it would generate).
    """

    supports_distributed = False  # the alignment stage's own loop (distributed.check_distributed_trainer)

    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file = unique_checkpoint_name(self.saved_model_file)  # runs started together differ
        self.alignment_stats: dict = {}
        self.alignment_trace: list[dict] = []  # per iteration (:meth:`alignment_step`'s statistics)

    def _build_optimizer(self, **kwargs):
        kwargs.setdefault("params", [p for p in self.model.parameters() if p.requires_grad])
        return super()._build_optimizer(**kwargs)

    def _restart(self, epochs: int) -> None:
        """A fresh RecBole training stage of ``epochs`` epochs (best score and optimiser reset)."""
        self.epochs = int(epochs)
        self.eval_step = min(self.config["eval_step"], max(self.epochs, 1))
        self.start_epoch = 0
        self.cur_step = 0
        self.best_valid_score = -np.inf if self.valid_metric_bigger else np.inf
        self.best_valid_result = None
        self.optimizer = self._build_optimizer()

    # ---- fit
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """Steps 1-4 of the module docstring.

        Inference knowledge (end of 4.4): the aligned adapter is saved
        (``<knowledge_dir>/aligned-<base>-<key>/``, :func:`alignment_key`; reused by a later run with the
        same settings when ``alignment_cache``), the knowledge of ALL items is regenerated with it
        (greedy, by the LLM loaded with the saved adapter as a later run loads it; cached under the
        adapter's fingerprint) and re-encoded, and the recommender is trained further
        with RecBole's loop for ``epochs`` on those cached vectors. When the adapter is reused from
        the cache, the recommender updates of step 2 are not replayed.
        """
        config = self.config
        iterations = int(config["alignment_iterations"])
        if iterations <= 0 or config["llm_adapter"]:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        epochs = self.epochs
        warmup = int(config["warmup_epochs"])
        if warmup > 0:
            self.logger.info(set_color("SeRALM", "green") + f": warm-up, {warmup} epoch(s) on the un-aligned knowledge")
            self._restart(warmup)
            super().fit(train_data, valid_data, verbose, False, show_progress, None)
        adapter_dir = self.alignment_dir()
        if self.adapter_cached(adapter_dir):
            self.logger.info(f"SeRALM: reusing the aligned adapter {adapter_dir} (alignment skipped)")
            self.alignment_stats = {"reused": str(adapter_dir)}
            self.alignment_trace = read_trace(adapter_dir)
        else:
            llm, _ = self.align(train_data, show_progress=show_progress)
            self._save_adapter(llm, adapter_dir, self.alignment_trace)
            del llm  # the knowledge is generated by the saved adapter, loaded as a later run loads it
        start = time.perf_counter()
        rows, cache = dataset_knowledge(config, train_data._dataset, adapter_path=str(adapter_dir), logger=self.logger,
                                        show_progress=show_progress)
        self.model.set_knowledge(rows, logger=self.logger)
        self.alignment_stats["regenerate_seconds"] = time.perf_counter() - start
        self.alignment_stats["knowledge_file"] = str(cache.final)
        self.logger.info(set_color("SeRALM", "green") + f": training on the aligned knowledge ({cache.final.name})")
        self._restart(epochs)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def adapter_cached(self, adapter_dir: Path) -> bool:
        """Whether :meth:`fit` reuses the aligned adapter in ``adapter_dir`` instead of aligning."""
        return bool(self.config["alignment_cache"]) and (adapter_dir / "adapter_config.json").is_file()

    def generation_needed(self) -> str | None:
        """What :meth:`fit` would generate with the LLM before training (hours on a CPU), as a reason; None
        when nothing: no alignment (``alignment_iterations: 0``, or ``llm_adapter`` given), or the aligned
        adapter and the knowledge it generates both cached. The decision of :meth:`fit`, run dry."""
        config = self.config
        if int(config["alignment_iterations"]) <= 0 or config["llm_adapter"]:
            return None
        adapter = self.alignment_dir()
        if not self.adapter_cached(adapter):
            return (f"SeRALM alignment ({config['alignment_iterations']} iterations) would then regenerate the "
                    f"knowledge of every item with the aligned LLM; no aligned adapter is cached at {adapter}")
        cache = knowledge_cache_for(config, config["dataset"], adapter_dir_fingerprint(adapter))
        if cache.final.is_file() and not cache.parts():
            return None
        return (f"the aligned adapter {adapter} is cached but the knowledge it generates is not ({cache.final}): "
                "every item's knowledge would be regenerated with it")

    # ---- alignment
    def alignment_key(self) -> str:
        return alignment_key(self.config, self.model.knowledge_file)

    def alignment_dir(self) -> Path:
        return knowledge_dir(self.config) / f"aligned-{self.model.base_model_name}-{self.alignment_key()}"

    def _save_adapter(self, llm, adapter_dir: Path, trace: list[dict]) -> None:
        with atomic_target(adapter_dir) as tmp:
            llm.save_pretrained(str(tmp))
            (tmp / ALIGNMENT_TRACE).write_text(json.dumps(trace))  # the adapter and its curve appear together
        self.logger.info(f"SeRALM: aligned adapter saved to {adapter_dir} (llm_adapter={adapter_dir} reuses it)")

    def load_llm(self):
        """The LLM being aligned: the shared backbone, frozen, with a fresh LoRA (B = 0)."""
        from recbole_llm.llm.backbone import load_llm

        config = self.config
        return load_llm(config, logger=self.logger,
                        lora={"r": config["lora_r"], "alpha": config["lora_alpha"], "dropout": config["lora_dropout"],
                              "target_modules": config["lora_target_modules"]})

    def reference_model(self, dataset):
        """The frozen recommender pretrained without knowledge (p(y|x))."""
        from recbole_llm.model.pretrained import pretrained_id_model

        config = self.config
        overrides = {"MAX_ITEM_LIST_LENGTH": config["MAX_ITEM_LIST_LENGTH"],
                     **dict(config["base_model_config"]), **dict(config["reference_config"])}
        return pretrained_id_model(config, dataset, self.model.base_model_name,
                                   checkpoint=config["reference_checkpoint"], overrides=overrides,
                                   setting="reference_checkpoint")

    def instances(self, train_data):
        """Endless random batches of ``align_batch_size`` training instances (each repeated
        ``align_num_samples`` times: Eq. 6's k samples per instance)."""
        dataset = train_data._dataset
        batch_size = int(self.config["align_batch_size"])
        repeats = int(self.config["align_num_samples"])
        generator = torch.Generator().manual_seed(int(self.config["seed"]))
        while True:
            index = torch.randint(len(dataset), (batch_size,), generator=generator)
            batch = dataset.inter_feat[index]
            if repeats > 1:
                batch = batch.repeat_interleave(repeats)
            yield batch.to(self.device)

    def make_job(self, llm, tokenizer, recommender, reference, item_fields, score_tokens=False) -> GeneratorJob:
        config = self.config
        resample = config["resample_items"]
        resample = [resample] if isinstance(resample, str) else list(resample)
        return GeneratorJob(
            llm, tokenizer, recommender, reference, item_fields, resample,
            template=knowledge_prompt(config),
            use_chat_template=config["use_chat_template"],
            max_new_tokens=config["align_max_new_tokens"],
            temperature=config["align_temperature"], top_p=config["align_top_p"],
            text_format=config["knowledge_text_format"], score_tokens=score_tokens, seed=config["seed"],
        )

    def align(self, train_data, show_progress=False, llm=None, tokenizer=None, reference=None):
        """Algorithm 1 for ``alignment_iterations`` iterations (each: :meth:`alignment_step`); returns
        ``(llm, tokenizer)``.

        The asynchronous generator (Fig. 4): a worker thread (torch releases the GIL in its
        kernels, so generation and training overlap) samples ``s``, encodes it and computes
        ``p(y|x,s)`` and ``p(y|x)`` on SNAPSHOTS of the LLM adapter and of the recommender, into a
        bounded queue (``generator_queue_size``); every ``refresh_interval`` iterations the
        snapshots get the current weights. A snapshot shares the frozen LLM weights with the live
        model and copies only what trains. ``slow_refresh`` is the paper's ablation (a 60x larger
        interval). Errors in the worker are re-raised in the trainer; Ctrl-C or an error stops it.
        Choices the paper leaves open:

        * ``refresh_interval: ~`` (default) = ``min(50, alignment_iterations // 5)``, at least 1: the
          paper's 50 iterations, or less, so that a short run still refreshes its generator at
          least 4 times. A run whose interval reaches its iteration budget would never refresh: it
          says so in one warning.
        * Stale samples are importance-weighted (the paper does not say how it corrects for them):
          the worker also returns the sampled tokens' log-probabilities under its snapshot, and the
          policy term becomes PPO's clipped surrogate per token, ``-min(rho_t A, clip(rho_t, 1 - eps,
          1 + eps) A)`` with ``rho_t = pi_current(t_k) / pi_snapshot(t_k)``, ``A = A_b`` and
          ``eps = importance_clip`` (``~``: unclipped). Per token, not per
          sequence (whose ratio is a product of up to 64 factors), as in PPO fine-tuning. An
          on-policy sample (``sync``, or a fresh snapshot) has ``rho_t = 1``. Both weights of ``A_b``
          are the snapshot recommender's (as in Fig. 4) and the KL term is not reweighted.
        * ``lora_dropout`` defaults to 0: generation runs without dropout, so the LLM trained is
          the LLM that samples and an on-policy ratio is exactly 1.
        """
        config, model = self.config, self.model
        iterations = int(config["alignment_iterations"])
        mode = config["generator_mode"]
        interval = resolve_refresh_interval(config["refresh_interval"], iterations,
                                            bool(config["slow_refresh"]),
                                            self.logger if mode == "async" else None)
        if llm is None:
            llm, tokenizer = self.load_llm()
        dataset = train_data._dataset
        reference = reference if reference is not None else self.reference_model(dataset)
        item_fields = item_prompt_fields(dataset, dict(config["knowledge_fields"]))
        batches = self.instances(train_data)
        if mode == "async":
            llm_snapshot, model_snapshot = snapshot_module(llm), snapshot_module(model)
            job = self.make_job(llm_snapshot, tokenizer, model_snapshot, reference, item_fields, score_tokens=True)
            source = AsyncKnowledgeSource(job, batches, {"llm": llm, "rec": model},
                                          {"llm": llm_snapshot, "rec": model_snapshot}, interval,
                                          int(config["generator_queue_size"]))
        else:
            source = SyncKnowledgeSource(self.make_job(llm, tokenizer, model, reference, item_fields), batches)
        lora = [p for p in llm.parameters() if p.requires_grad]
        llm_optimizer = torch.optim.AdamW(lora, lr=float(config["align_llm_learning_rate"]), weight_decay=0.0)
        rec_optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                         lr=float(config["align_rec_learning_rate"]))
        self.logger.info(set_color("SeRALM", "green") + f": alignment, {iterations} iterations, {mode} generator"
                         + (f", refreshed every {interval} iterations" if mode == "async" else ""))
        history, start = [], time.perf_counter()
        steps = range(1, iterations + 1)
        if show_progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="alignment", unit="it")
        try:
            for iteration in steps:
                sample = source.get()
                stats = self.alignment_step(llm, sample, llm_optimizer, rec_optimizer)
                source.step(iteration)
                history.append(stats)
                if iteration % int(config["align_log_interval"]) == 0 or iteration == iterations:
                    recent = history[-int(config["align_log_interval"]):]
                    self.logger.info(
                        f"alignment {iteration}/{iterations}: " + ", ".join(
                            f"{k} {np.mean([h[k] for h in recent]):.4f}" for k in recent[0]))
        finally:
            source.close()
        seconds = time.perf_counter() - start
        self.alignment_trace = [{"iteration": i, **stats} for i, stats in enumerate(history, 1)]
        self.alignment_stats = {
            "iterations": iterations, "mode": mode, "refresh_interval": interval, "seconds": seconds,
            "seconds_per_iteration": seconds / max(iterations, 1), "refreshes": source.refresh_count,
            "refreshes_sent": getattr(source, "requested_version", 0),
            **{k: float(np.mean([h[k] for h in history])) for k in (history[0] if history else {})},
        }
        model.train()
        return llm, tokenizer

    def alignment_step(self, llm, sample: Sample, llm_optimizer, rec_optimizer) -> dict:
        """Algorithm 1 lines 5-6 on one sample; returns its statistics.

        * knowledge ``s`` is sampled from the LLM being aligned (the shared backbone with LoRA) for
          the items named by ``resample_items`` of each instance - ``target`` (default: the item
          ``y``), ``last`` (the most recent history item), ``history`` (a random one) or several; all
          other items keep their cached knowledge. The LLM's prompt for an item is its Fig. 3 prompt,
          so ``p(s|x)`` is the LLM's probability of ``s`` given that item's prompt; with two items,
          ``log p(s|x) = log p(s_target|...) + log p(s_last|...)``. ``align_num_samples`` (Eq. 6's
          k) samples are drawn per instance.
        * ``p(y|x,s)`` comes from the recommender being trained (full softmax over all items, where
          instance b sees its own sampled knowledge for its resampled items, in its history and as
          candidates); ``p(y|x)`` from a frozen knowledge-free recommender: the ``base_model``
          trained by RecBole on the same split (cached; or ``reference_checkpoint``).
        * LLM update (Eq. 6 and 8), gradient DESCENT on::

              loss_llm = -mean_b[A_b * log p_align(s_b|x_b)] + kl_coef * KL_b
              A_b = w(s_b) - w(s_now_b),   w(s) = p(y|x,s) / p(y|x)   (each optionally clipped at ratio_clip)

          ``w(s_b)`` is Eq. 6's weight. The baseline ``w(s_now_b)`` is the paper's open choice made
          per instance, as in self-critical training: the same recommender's probability of the same
          target with the knowledge the items have now (the cached greedy answers), over the same
          ``p(y|x)``. It does not depend on the sample, so the expected gradient is Eq. 6's (since
          ``E_s[grad log p(s|x)] = 0``), and it removes what a constant baseline cannot: the offset
          between the recommender being trained and the knowledge-free one (measured on ml-100k:
          ``w`` ~0.65 for nearly every sample, so ``w - 1`` lowered whatever was sampled). ``A_b > 0``
          when ``s_b`` helps this user's target more than the current knowledge (below the clip), the sign
          Eq. 10 describes (``p(y|x,t_c,t_k) / p(y|x,t_c) - 1``). The per-token KL penalty to the
          original LLM (Eq. 7; the same weights with the adapter disabled via PEFT's
          ``disable_adapter()``, no second copy) is, per ``kl_estimator``: ``full`` (default) the
          exact KL(p_align || p_orig) over the vocabulary at every generated position; ``sample``
          the score-function form on the sampled tokens. Both are zero, with zero gradient, when
          the adapter is the identity (LoRA B = 0 at init). Log-probabilities are summed over the
          tokens of ``s`` (up to and including EOS), as in Eq. 6.
        * recommender update (Eq. 9): gradient descent on ``-log p(y|x,s)`` with the same sampled
          knowledge (optimiser: Adam, ``align_rec_learning_rate``).
        """
        config, model = self.config, self.model
        full = config["kl_estimator"] == "full"
        batch, k = sample.items.shape
        # LLM (Eq. 6-8)
        llm.train()
        logp, logp_all = token_log_probs(llm, sample.prompt_ids, sample.prompt_mask, sample.new_ids, sample.new_mask, full)
        with torch.no_grad(), llm.disable_adapter():
            logp0, logp0_all = token_log_probs(llm, sample.prompt_ids, sample.prompt_mask, sample.new_ids,
                                               sample.new_mask, full)
        kl_tokens = per_token_kl(logp_all, logp0_all).view(batch, -1) if full else None
        loss_llm, stats = alignment_loss(
            logp.view(batch, -1), logp0.view(batch, -1), sample.new_mask.view(batch, -1), sample.log_p_rec,
            sample.log_p_ref, sample.log_p_current, kl_coef=float(config["kl_coef"]), ratio_clip=config["ratio_clip"],
            kl_tokens=kl_tokens, logp_old=None if sample.logp_old is None else sample.logp_old.view(batch, -1),
            importance_clip=config["importance_clip"])
        llm_optimizer.zero_grad(set_to_none=True)
        loss_llm.backward()
        torch.nn.utils.clip_grad_norm_([p for p in llm.parameters() if p.requires_grad],
                                       float(config["align_clip_grad_norm"]))
        llm_optimizer.step()
        del logp_all, logp0_all, kl_tokens
        # Recommender (Eq. 9) on (x, s, y)
        model.train()
        joint = model.fused.encoder is not None
        vectors = model.encode_knowledge(sample.texts, grad=True) if joint else sample.vectors
        log_p = model.log_prob_target(sample.interaction, sample.items, vectors.view(batch, k, -1))
        loss_rec = -log_p.mean()
        rec_optimizer.zero_grad(set_to_none=True)
        loss_rec.backward()
        rec_optimizer.step()
        return {**stats, "loss_llm": float(loss_llm.detach()), "loss_rec": float(loss_rec.detach()),
                "log_p_rec": float(sample.log_p_rec.mean()), "log_p_current": float(sample.log_p_current.mean()),
                "log_p_ref": float(sample.log_p_ref.mean()),
                "fallbacks": float(sample.fallbacks), "json_share": 1.0 - sample.fallbacks / sample.items.numel(),
                "snapshot": float(sample.version)}
