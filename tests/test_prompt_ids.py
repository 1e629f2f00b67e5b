"""LlamaRec's prompts as token ids assembled from pieces cached once per item (RankingPromptIds):
the same ids as tokenizing the prompt's text, for several kinds of tokenizer, the same history cut,
the text path where a tokenizer merges across the pieces, and no tokenization per step."""
import random

import pytest
import torch
from recbole.data import create_dataset, data_preparation
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from recbole_llm import load_config
from recbole_llm.llm.prompts import RankingPrompt, RankingPromptIds
from recbole_llm.model.llamarec import LlamaRec
from recbole_llm.trainer.two_stage import LlamaRecTrainer, SubsetNDCG
from conftest import first_batch

LETTERS = [chr(ord("A") + i) for i in range(20)]
TITLES = ["", "Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)",
          "Copycat (1995)", "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)", "Twelve Monkeys (1995)",
          "Babe (1995)", "Dead Man Walking (1995)", "Richard III (1995)", "Seven (Se7en) (1995)",
          "Usual Suspects, The (1995)", "Mighty Aphrodite (1995)", "Postino, Il (1994)",
          "Mr. Holland's Opus (1995)", "French Twist (Gazon maudit) (1995)", "From Dusk Till Dawn (1996)",
          "White Balloon, The (1995)", "Antonia's Line (1995)", "Angels and Insects (1995)",
          "Muppet Treasure Island (1996)", "Braveheart (1995)", "Taxi Driver (1976)", "Rumble in the Bronx (1995)",
          "Birdcage, The (1996)", "Brothers McMullen, The (1995)", "Bad Boys (1995)", "Apollo 13 (1995)",
          "Batman Forever (1995)", "Belle de jour (1967)", "Crimson Tide (1995)", "Crumb (1994)",
          "Desperado (1995)", "Doom Generation, The (1995)", "Free Willy 2: The Adventure Home (1995)",
          "Mad Love (1995)", "Nadja (1994)", "Net, The (1995)", "Strange Days (1995)", "To Wong Foo, Thanks for "
          "Everything! Julie Newmar (1995)", "Billy Madison (1995)", "Clerks (1994)", "Disclosure (1994)",
          "Dolores Claiborne (1994)", "Eat Drink Man Woman (1994)", "Exotica (1994)", "Ed Wood (1994)",
          "Hoop Dreams (1994)", "I.Q. (1994)", "Star Wars (1977)", "Légionnaire (1998)", "Ça ira?",
          "What's Eating Gilbert Grape?", "Wrong Trousers, The!", "M*A*S*H", "8 1/2 (1963)", "Se7en...",
          "\"Quoted\" Title", "Title;", "Ends with colon:", "Numbers 12345 67890", "item 1234",
          " Leading space", "Trailing space ", "Tab\tinside", "Two  spaces", "Unicode — dash (2001)",
          "日本の映画 (2003)", "Émilie's Café", "x", "A", "(1) in parentheses", "(A) letter first"]
PROMPT = RankingPrompt(history_len=20)


def _prompt_texts():
    rng = random.Random(1)
    return [PROMPT.build(rng.sample(TITLES[1:], 8), rng.sample(TITLES[1:], 20), LETTERS) for _ in range(60)]


def _trained(tokenizer: Tokenizer, trainer, **special) -> PreTrainedTokenizerFast:
    tokenizer.train_from_iterator(_prompt_texts() + TITLES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def byte_level_bpe():
    """A GPT-2-style byte-level BPE (as the embedded SmolLM2's)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return _trained(tokenizer, trainer, eos_token="<eos>", pad_token="<eos>")


def merging_across_entries():
    """A byte-level BPE with no pre-tokenization and one merge, ' \n (' (ids 'ĊĠ('): across the boundary
    between an entry's piece (' title \n') and the next marker (' (2)'), but not across the anchor."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(["<eos>", *sorted(alphabet), "ĊĠ", "ĊĠ("])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ġ"), ("ĊĠ", "(")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


def sentencepiece_bpe(legacy):
    """A SentencePiece-style BPE as Llama-2's: '▁' for spaces, one prepended at the text's start (legacy:
    a normalizer that prepends it to every text, so a text starting with a space gets two), BOS added."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(_prompt_texts() + TITLES, trainer)  # words split at '▁', as SentencePiece's pieces
    if legacy:  # Llama-2's tokenizer.json: no pre-tokenizer, the normalizer does the '▁'
        tokenizer.pre_tokenizer = None
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def wordpiece():
    """A BERT-style WordPiece (lower case, [CLS] before and [SEP] after the text)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=1500, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    tokenizer.train_from_iterator(_prompt_texts() + TITLES, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


TOKENIZERS = {"byte-level BPE": lambda: byte_level_bpe(), "SentencePiece BPE": lambda: sentencepiece_bpe(False),
              "SentencePiece BPE (legacy)": lambda: sentencepiece_bpe(True), "WordPiece": wordpiece}


def _random_lists(count, seed=0):
    """``count`` (history, candidates) pairs of item ids: histories of 0 to 30 items (longer than the
    prompt's 20), with repeats; 20 distinct candidates."""
    rng = random.Random(seed)
    return [([rng.randrange(1, len(TITLES)) for _ in range(rng.randrange(0, 31))],
             rng.sample(range(1, len(TITLES)), len(LETTERS))) for _ in range(count)]


def _text(history, candidates):
    return PROMPT.build([TITLES[i] for i in history], [TITLES[c] for c in candidates], LETTERS)


def _assembled_equals_text(tokenizer, max_tokens=10_000):
    prompt_ids = RankingPromptIds(PROMPT, tokenizer, TITLES, LETTERS, max_tokens, [h for h, _ in _random_lists(8)])
    assert prompt_ids.assembles
    for history, candidates in _random_lists(200, seed=1):
        text = _text(history, candidates)
        assert prompt_ids._assembled(history, candidates) == tokenizer(text)["input_ids"], text
        assert prompt_ids(history, candidates) == tokenizer(text)["input_ids"]


def test_assembled_ids_are_the_tokenized_text_with_the_embedded_tokenizer(embedded_tokenizer):
    """Breakage checked by hand (caught): the ';' after the last history title cached as a piece of
    its own (SmolLM2 merges ')' and ';' into one token)."""
    _assembled_equals_text(embedded_tokenizer)


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_assembled_ids_are_the_tokenized_text_with_other_tokenizers(kind):
    """Also a Llama-2-style SentencePiece tokenizer (a piece's leading space tokenized alone gets another
    id than inside the text: pieces are tokenized after an anchor) and special tokens before and after."""
    _assembled_equals_text(TOKENIZERS[kind]())


@pytest.mark.parametrize("max_tokens", [260, 320, 400, 480])
def test_history_cut_gives_the_prompts_of_re_tokenizing_while_too_long(embedded_tokenizer, max_tokens):
    """The oldest history items go until the prompt fits, computed from the pieces' lengths: the same
    prompts as tokenizing again without the oldest item while too long (the rule before the cache).
    Breakage checked by hand (caught): the markers' lengths left out of the prompt's length."""
    prompt_ids = RankingPromptIds(PROMPT, embedded_tokenizer, TITLES, LETTERS, max_tokens)
    assert prompt_ids.assembles
    cut = 0
    for history, candidates in _random_lists(100, seed=2):
        expected = prompt_ids._tokenized(history, candidates)
        assert prompt_ids._assembled(history, candidates) == expected
        cut += len(embedded_tokenizer(_text(history, candidates))["input_ids"]) > len(expected)
    assert cut  # some prompts were cut: the rule was exercised


def test_a_tokenizer_merging_across_pieces_takes_the_text_path(caplog):
    """A tokenizer that merges across the pieces' boundaries: the check at build finds assembled ids that
    differ, so every prompt is tokenized as text, and the log says so once.
    Breakage checked by hand (caught): the check at build skipped."""
    tokenizer = merging_across_entries()
    histories = [h for h, _ in _random_lists(8)]
    with caplog.at_level("INFO"):
        prompt_ids = RankingPromptIds(PROMPT, tokenizer, TITLES, LETTERS, 10_000, histories)
    assert not prompt_ids.assembles
    assert sum("tokenized as text" in record.message for record in caplog.records) == 1
    for history, candidates in _random_lists(20, seed=3):
        text = _text(history, candidates)
        assert prompt_ids(history, candidates) == tokenizer(text)["input_ids"]


@pytest.fixture
def llamarec(tiny_data, tiny_llama_dir):
    name, overrides = tiny_data
    overrides = {**overrides, "llm_path": str(tiny_llama_dir), "candidate_k": 5, "retriever_config": {"epochs": 1},
                 "ranker_max_train_examples": 12, "ranker_eval_step": 100, "ranker_valid_users": 4,
                 "train_batch_size": 4}
    config = load_config("LlamaRec", name, config_dict=overrides)
    train, valid, test = data_preparation(config, create_dataset(config))
    return config, LlamaRec(config, train._dataset), (train, valid, test)


def test_training_and_scoring_tokenize_nothing(llamarec, monkeypatch):
    """The model's prompts come from the pieces its tokenizer cut once at build: a training loss and a
    ranking call tokenize no text. Breakage checked by hand (caught): the text path forced."""
    _, model, (train, _, test) = llamarec
    assert model.prompt_tokens.assembles
    calls = []
    tokenizer_type = type(model.tokenizer)
    call = tokenizer_type.__call__
    monkeypatch.setattr(tokenizer_type, "__call__", lambda self, *a, **k: (calls.append(a), call(self, *a, **k))[1])
    model.calculate_loss(first_batch(train)[:2])
    batch = first_batch(test)[:2]
    model.ranker_scores(model._histories(batch), torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]))
    assert calls == []


def test_a_ranker_step_reads_one_number(llamarec, monkeypatch):
    """Ranker training reads one number per optimizer step from the device (the logged loss), as
    RecBole's trainer: none per micro-batch. Breakage checked by hand (caught): each micro-batch's
    loss read with .item()."""
    import sys
    from pathlib import Path

    config, model, (train, valid, _) = llamarec
    trainer = LlamaRecTrainer(config, model)
    package = str(Path(sys.modules["recbole_llm"].__file__).parent)
    reads, item = [], torch.Tensor.item

    def counted(tensor):
        if sys._getframe(1).f_code.co_filename.startswith(package):
            reads.append(sys._getframe(1).f_code.co_name)
        return item(tensor)

    monkeypatch.setattr(trainer, "_validation_ndcg", lambda phase: SubsetNDCG(0.5, 0.0, 4))
    monkeypatch.setattr(torch.Tensor, "item", counted)
    trainer._train_ranker_steps(train, None, False, None)
    steps = -(-config["ranker_max_train_examples"] // train.step)
    assert reads == ["_train_ranker_steps"] * steps
