"""The allowed values of every setting with a closed set of values or a range, declared once.

:data:`RULES` maps a setting to a :class:`Choice` (a closed set of names) or a :class:`Range`
(a whole number or a number between bounds), each with what the setting is. Where ``none`` is
given, ``~`` is allowed too and ``none`` says what it means. :func:`check_settings` runs in
:func:`recbole_llm.config.load_config` on every setting a run has, so a wrong value stops the run
with one line before anything is built; the models and trainers then just read the values.
Checks that need the built model (``llm_layers`` against the LLM's depth, ``router_top_k``
against ``n_experts``) stay where the model is built. The defaults and their comments are in
the property files (``properties/overall.yaml``, ``properties/model/<Model>.yaml``).
"""
from __future__ import annotations

import difflib
import string
from dataclasses import dataclass

from recbole_llm.errors import InputError


@dataclass(frozen=True)
class Choice:
    """One of ``values``; with ``many``, a non-empty list of them (a single name counts as a list of one)."""
    values: tuple[str, ...]
    meaning: str
    none: str = ""
    many: bool = False

    def problem(self, key: str, value) -> str | None:
        if value is None and self.none:
            return None
        names = value if self.many and isinstance(value, (list, tuple)) else [value]
        wrong = [name for name in names if name not in self.values]
        if names and not wrong:
            return None
        allowed = ", ".join(self.values) + (f" or ~ ({self.none})" if self.none else "")
        close = self._closest(wrong[0]) if wrong else None
        hint = f": did you mean {close}?" if close else "."
        fix = close or self.values[0]
        if self.many:
            names = [name if name in self.values else self._closest(name) for name in names]
            fix = ", ".join(name for name in names if name) or self.values[0]
            return (f"{key}={value!r} is not a non-empty list of {allowed}{hint} Set {key}: [{fix}] in your YAML "
                    f"file ({key}: {self.meaning}).")
        return (f"{key}={value!r} is not one of {allowed}{hint} Set --{key}={fix} (or {key}: {fix} in your YAML "
                f"file; {key}: {self.meaning}).")

    def bounds(self) -> str:
        """The allowed values in words, e.g. 'one of full, sample'."""
        return (("a list of " if self.many else "one of ") + ", ".join(self.values)
                + (f", or ~ ({self.none})" if self.none else ""))

    def _closest(self, name) -> str | None:
        close = difflib.get_close_matches(str(name), self.values, n=1, cutoff=0.6)
        return close[0] if close else None


@dataclass(frozen=True)
class Range:
    """A number of ``kind`` (int: a whole number; float: any number) from ``low`` to ``high``
    (``high`` None: no upper bound; ``*_open``: the bound itself is outside)."""
    kind: type
    low: float
    meaning: str
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: str = ""

    def problem(self, key: str, value) -> str | None:
        if value is None and self.none:
            return None
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if not is_number:
            what = "is not a number"
        elif self.kind is int and not whole:
            what = "is not a whole number"
        elif self._inside(value):
            return None
        else:
            what = "is out of range"
        return f"{key}={value!r} {what}: {self.meaning}, {self.bounds()}. Set --{key}=... (or {key}: ... in your YAML file)."

    def _inside(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def bounds(self) -> str:
        """The allowed values in words, e.g. 'a whole number from 1 to 26' or 'a number > 0'."""
        noun = "a whole number" if self.kind is int else "a number"
        if self.high is not None and not (self.low_open or self.high_open):
            text = f"{noun} from {self.low} to {self.high}"
        else:
            text = f"{noun} {'>' if self.low_open else '>='} {self.low}"
            if self.high is not None:
                text += f" and {'<' if self.high_open else '<='} {self.high}"
        return text + (f", or ~ ({self.none})" if self.none else "")


def whole(low: int, meaning: str, high: int | None = None, none: str = "") -> Range:
    return Range(int, low, meaning, high, none=none)


def positive(meaning: str, none: str = "") -> Range:
    return Range(float, 0, meaning, low_open=True, none=none)


def dropout(meaning: str) -> Range:
    """A dropout probability: from 0 up to, not including, 1."""
    return Range(float, 0, meaning, 1, high_open=True)


LLM_DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Setting -> its allowed values. Grouped by the property file that sets it first.
RULES: dict[str, Choice | Range] = {
    # overall.yaml (every model)
    "num_threads": whole(0, "torch's CPU threads for LLM work (0: torch's default)", none="torch's default"),
    "MAX_ITEM_LIST_LENGTH": whole(1, "the number of history items fed to the model"),
    "epochs": whole(1, "the number of training epochs"),
    "train_batch_size": whole(1, "the number of rows per training step"),
    "eval_batch_size": whole(1, "the number of users per evaluation batch"),
    "stopping_step": whole(1, "the number of epochs without improvement before early stopping"),
    "learning_rate": positive("the learning rate"),
    "weight_decay": Range(float, 0, "the optimizer's weight decay"),
    "score_chunk_items": whole(0, "items scored at a time in full-sort scoring (0: all at once)"),
    # LRURec.yaml
    "r_min": Range(float, 0, "the inner radius of the LRU eigenvalues' ring", 1, low_open=True, high_open=True),
    "r_max": Range(float, 0, "the outer radius of the LRU eigenvalues' ring", 1, low_open=True, high_open=True),
    # the LLM (E4SRec, Laser, LlamaRec, SeRALM)
    "llm_dtype": Choice(LLM_DTYPES, "the LLM's compute dtype", none="auto"),
    "llm_layers": whole(1, "the number of the frozen LLM's first decoder layers kept", none="all"),
    "lora_r": whole(1, "the LoRA rank"),
    "lora_alpha": whole(1, "the LoRA alpha"),
    "lora_dropout": dropout("the LoRA dropout"),
    # LLMTrainer (E4SRec, Laser)
    "lr_schedule": Choice(("constant", "cosine"), "the learning-rate schedule over all epochs"),
    "gradient_accumulation_steps": whole(1, "the number of batches per optimizer step"),
    "warmup_steps": whole(0, "the number of optimizer steps of linear learning-rate warm-up"),
    "train_rows_per_epoch": whole(1, "the number of training rows per epoch", none="all rows"),
    # E4SRec.yaml
    "score_head": Choice(("linear", "tied"), "the authors' Linear head over all items, or scores against the "
                                             "projected input item embeddings"),
    "train_targets_per_user": whole(1, "the number of each user's last training targets", none="RecBole's rows"),
    # Laser.yaml
    "history_titles": whole(1, "the number of last history items shown as titles"),
    "title_max_tokens": whole(1, "the number of tokens each item title is cut to"),
    "n_experts": whole(1, "the number of M-Former query experts"),
    "n_queries": whole(1, "the number of learnable queries per expert"),
    "router_top_k": whole(1, "the number of experts each user is routed to (at most n_experts)"),
    "mformer_layers": whole(1, "the number of M-Former blocks"),
    "mformer_heads": whole(1, "the number of M-Former attention heads"),
    "mformer_dropout": dropout("the dropout inside M-Former"),
    "balance_weight": Range(float, 0, "the weight of the MoE load-balancing loss"),
    "suffix_tokens": whole(0, "the number of learnable suffix tokens (0: the no-suffix ablation)"),
    "suffix_pooling": Choice(("mean", "last"), "how the suffix tokens' LLM outputs are pooled"),
    "item_repr": Choice(("suffix", "id", "text", "both"), "the item side's vectors", none="the scoring's own"),
    "item_batch_size": whole(1, "the number of items per LLM pass on the item side"),
    "scoring": Choice(("residual", "paper"), "SASRec's user vector plus a gated LLM correction, or the paper's "
                                             "mapped suffix output"),
    "item_phase_epochs": whole(0, "the number of phase-1 epochs (0: no phase 1)"),
    "item_phase_rows": whole(1, "the number of phase-1 training rows", none="all"),
    "item_phase_batch_size": whole(1, "the number of rows per phase-1 step", none="train_batch_size"),
    "item_phase_learning_rate": positive("the phase-1 learning rate"),
    "item_side_lr_scale": Range(float, 0, "the item side's phase-2 learning-rate factor (0: held)"),
    # LlamaRec.yaml
    "candidate_k": whole(1, "the number of candidates per user, named by the index letters A..Z",
                         high=len(string.ascii_uppercase)),
    "ranker_history_len": whole(1, "the number of history items in the prompt"),
    "max_prompt_tokens": whole(1, "the longest prompt in tokens"),
    "ranker_micro_batch_size": whole(1, "the number of prompts per forward and backward pass"),
    "ranker_train_candidates": Choice(("random", "retriever", "mix"), "where the ranker's training lists come from"),
    "ranker_train_target_position": Choice(("random", "retriever", "shuffle"),
                                           "where the target goes in a retriever training list"),
    "ranker_max_train_examples": whole(0, "the number of ranker training examples (0: no ranker training)"),
    "ranker_warmup_steps": whole(0, "the number of linear warm-up steps of ranker training"),
    "ranker_eval_step": whole(1, "the number of ranker steps between validations"),
    "ranker_stopping_step": whole(0, "the number of validations without improvement before stopping (0: never)"),
    "ranker_valid_users": whole(1, "the number of validation users per ranker check"),
    "ranker_eval_batch_size": whole(1, "the number of prompts per forward pass when scoring"),
    # SeRALM.yaml
    "knowledge_source": Choice(("llm", "fields"), "the LLM's answers, or (a control without the LLM) each item's "
                                                  "own fields"),
    "knowledge_max_new_tokens": whole(1, "the longest knowledge answer in tokens"),
    "knowledge_batch_size": whole(1, "the number of prompts per generate() call"),
    "encoder_mode": Choice(("frozen", "joint"), "cached knowledge vectors, or the paper's joint fine-tuning"),
    "joint_items_per_step": whole(1, "the number of items re-encoded with gradients per step"),
    "encoder_batch_size": whole(1, "the number of texts per encoder forward pass"),
    "knowledge_size": whole(1, "the width of the projected knowledge vector"),
    "fusion_init": Choice(("identity", "random"), "how the fusion layer starts"),
    "alignment_iterations": whole(0, "the number of alignment iterations (0: no alignment)"),
    "warmup_epochs": whole(0, "the number of epochs before alignment"),
    "align_batch_size": whole(1, "the number of training instances per alignment iteration"),
    "align_num_samples": whole(1, "the number of knowledge samples per instance"),
    "resample_items": Choice(("target", "last", "history"), "whose knowledge is sampled per instance", many=True),
    "align_max_new_tokens": whole(1, "the longest sampled knowledge in tokens"),
    "align_temperature": positive("the sampling temperature"),
    "align_top_p": Range(float, 0, "the nucleus-sampling share", 1, low_open=True),
    "kl_coef": Range(float, 0, "the weight of the KL penalty to the original LLM"),
    "kl_estimator": Choice(("full", "sample"), "the per-token KL estimator"),
    "ratio_clip": positive("the upper clip of each p(y|x,.)/p(y|x)", none="no clip"),
    "importance_clip": positive("the PPO clip range of the importance ratio", none="unclipped"),
    "align_llm_learning_rate": positive("the LoRA learning rate of alignment"),
    "align_rec_learning_rate": positive("the recommender's learning rate during alignment"),
    "align_clip_grad_norm": positive("the gradient-norm clip of the LoRA weights"),
    "align_log_interval": whole(1, "the number of iterations between alignment logs"),
    "generator_mode": Choice(("async", "sync"), "a worker thread generates on snapshots, or the trainer waits"),
    "refresh_interval": whole(1, "the number of iterations between snapshot refreshes",
                              none="min(50, alignment_iterations // 5), at least 1"),
    "generator_queue_size": whole(1, "the number of samples the worker may prepare ahead"),
}


def problem(key: str, value) -> str | None:
    """The one-line problem of ``value`` for setting ``key``, or None (also for a setting without a rule)."""
    rule = RULES.get(key)
    return rule.problem(key, value) if rule else None


def allowed(key: str) -> str | None:
    """The allowed values of setting ``key`` in words (None: it has no rule)."""
    rule = RULES.get(key)
    return rule.bounds() if rule else None


def check_settings(settings: dict) -> None:
    """Every setting of ``settings`` that has a rule: the first value outside it raises :class:`InputError`."""
    for key, value in settings.items():
        message = problem(key, value)
        if message:
            raise InputError(message)
