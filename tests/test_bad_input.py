"""Bad input, tried for real through the public entry points (issue 7).

Each case either fails with an ``InputError`` whose message names the file or setting and
the fix (the command line prints it as one line), or is handled and logged. The list of
cases is counted in docs/RESULTS.md.
"""
import logging
import re
from pathlib import Path

import pytest
import torch
from recbole.data import create_dataset

from recbole_llm import errors, load_config, quick_start, run_recbole_llm
from recbole_llm.cli import main
from recbole_llm.data import datasets
from recbole_llm.data.datasets import drop_exact_duplicates
from recbole_llm.data.item_text import item_texts
from recbole_llm.errors import InputError, MissingInputError
from recbole_llm.knowledge.prompts import MAX_FIELD_CHARS, item_prompt_fields
from recbole_llm.model.pretrained import pretrained_id_model
from conftest import write_tiny_dataset


def _append(path, text: bytes):
    with open(path, "ab") as f:
        f.write(text)


def _dataset(tiny_data):
    name, overrides = tiny_data
    config = load_config("LRURec", name, config_dict=overrides)
    return config, create_dataset(config)


def test_inter_line_with_a_missing_field(tiny_data, tmp_path):
    name, overrides = tiny_data
    _append(tmp_path / "data" / "tiny" / "tiny.inter", b"u1\ti3\n")
    with pytest.raises(InputError, match=r"tiny\.inter: line 482 has 2 fields but the header has 3") as error:
        load_config("LRURec", name, config_dict=overrides)
    assert "field_separator" in str(error.value)


def test_inter_line_with_text_in_a_float_field(tiny_data, tmp_path):
    name, overrides = tiny_data
    _append(tmp_path / "data" / "tiny" / "tiny.inter", b"u1\ti3\tyesterday\n")
    with pytest.raises(InputError, match=r"line 482, field 'timestamp' is declared float but holds 'yesterday'"):
        load_config("LRURec", name, config_dict=overrides)


def test_header_with_an_unknown_type(tiny_data, tmp_path):
    name, overrides = tiny_data
    inter = tmp_path / "data" / "tiny" / "tiny.inter"
    inter.write_text(inter.read_text().replace("timestamp:float", "timestamp:date", 1))
    with pytest.raises(InputError, match=r"header field 3 is 'timestamp:date'.*token, token_seq, float, float_seq"):
        load_config("LRURec", name, config_dict=overrides)


def test_non_utf8_bytes_name_the_line_and_the_encoding_setting(tiny_data, tmp_path):
    name, overrides = tiny_data
    _append(tmp_path / "data" / "tiny" / "tiny.item", "i31\tAm\xe9lie\t2001\tComedy\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"tiny\.item: line 32 is not valid UTF-8.*encoding: latin-1"):
        load_config("LRURec", name, config_dict=overrides)
    # ... and the fix it names works
    config = load_config("LRURec", name, config_dict={**overrides, "encoding": "latin-1"})
    dataset = create_dataset(config)
    assert "Amélie (2001)" in item_texts(dataset, ["movie_title", "release_year"])


def test_missing_item_file_for_a_text_model(tmp_path, monkeypatch, tiny_llama_dir):
    """LlamaRec needs titles: without tiny.item it stops before any training."""
    monkeypatch.chdir(tmp_path)
    write_tiny_dataset(tmp_path / "data", name="notext", with_item_file=False)
    overrides = {"data_path": str(tmp_path / "data"), "llm_path": str(tiny_llama_dir), "state": "WARNING",
                 "user_inter_num_interval": None, "item_inter_num_interval": None,
                 "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title"]}}
    with pytest.raises(InputError, match=r"has no notext\.item in .*this model reads item text; add that file"):
        run_recbole_llm("LlamaRec", "notext", config_dict=overrides)
    assert not (tmp_path / "saved" / "stage1").exists()  # failed before stage 1


def test_empty_and_5000_character_titles_are_handled(tiny_data, tmp_path, embedded_tokenizer, caplog):
    name, overrides = tiny_data
    item_file = tmp_path / "data" / "tiny" / "tiny.item"
    lines = item_file.read_text().splitlines()
    lines[1] = "i1\t\t1951\tDrama"  # empty title
    lines[2] = "i2\t" + "Long " * 1000 + "\t1952\tDrama"  # 5,000 characters
    item_file.write_text("\n".join(lines) + "\n")
    config, dataset = _dataset(tiny_data)
    with caplog.at_level(logging.WARNING):
        texts = item_texts(dataset, ["movie_title", "release_year"])
    empty, long = (dataset.token2id(dataset.iid_field, token) for token in ("i1", "i2"))
    assert texts[empty] == "item i1 (1951)" and "1 of 30 items have an empty 'movie_title'" in caplog.text

    from recbole_llm.llm.prompts import truncate_texts

    cut = truncate_texts(texts, embedded_tokenizer, 32)  # what LlamaRec puts in its prompts
    assert len(embedded_tokenizer(cut[long], add_special_tokens=False)["input_ids"]) <= 32
    fields = item_prompt_fields(dataset, {"title": "movie_title", "year": "release_year"})  # SeRALM's prompts
    assert len(fields[long]["title"]) == MAX_FIELD_CHARS and "title" not in fields[empty]


def test_users_with_one_interaction_are_trained_on_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    folder = write_tiny_dataset(tmp_path / "data", name="short")
    _append(folder / "short.inter", b"".join(f"solo{u}\ti{u}\t{u}\n".encode() for u in range(1, 6)))
    overrides = {"data_path": str(tmp_path / "data"), "user_inter_num_interval": None, "item_inter_num_interval": None,
                 "epochs": 1, "MAX_ITEM_LIST_LENGTH": 8, "show_progress": False, "state": "WARNING",
                 "load_col": {"inter": ["user_id", "item_id", "timestamp"]}}
    with caplog.at_level(logging.WARNING):
        run_recbole_llm("LRURec", "short", config_dict=overrides)  # completes: nothing refuses those users
    assert "5 of 45 users have fewer than 4 interactions" in caplog.text


def test_checkpoint_with_items_the_dataset_lacks(tiny_data, tmp_path):
    """A retriever trained on 40 items, loaded for a dataset of 31 (30 + padding)."""
    config, dataset = _dataset(tiny_data)
    other_root = tmp_path / "other"
    write_tiny_dataset(other_root, n_items=40)
    other_config = load_config("LRURec", "tiny", config_dict={**tiny_data[1], "data_path": str(other_root)})
    other_model = pretrained_id_model(other_config, create_dataset(other_config), "LRURec", overrides={"epochs": 1})
    checkpoint = tmp_path / "lrurec_40_items.pth"
    torch.save({"state_dict": other_model.state_dict()}, checkpoint)
    with pytest.raises(InputError, match=r"retriever_checkpoint=.*shape \(41,.*\) in the checkpoint but \(31,.*another dataset"):
        pretrained_id_model(config, dataset, "LRURec", checkpoint=str(checkpoint), setting="retriever_checkpoint")


@pytest.mark.parametrize(
    "setting, value, problem",
    [("epochs", "ten", "must be a whole number"),
     ("learning_rate", "fast", "must be a number"),
     ("candidate_k", 2.5, "must be a whole number"),
     ("load_in_4bit", "yes", "must be True or False"),
     ("retriever_config", [1, 2], "must be a mapping \\(key: value\\)")],
    ids=["epochs=ten", "learning_rate=fast", "candidate_k=2.5", "load_in_4bit=yes", "retriever_config=list"],
)
def test_config_value_of_the_wrong_type(tiny_data, setting, value, problem):
    name, overrides = tiny_data
    expected = rf"Setting {setting}={re.escape(repr(value))} \(\w+\) {problem}; its default in .*\.yaml is "
    with pytest.raises(InputError, match=expected):
        load_config("LlamaRec", name, config_dict={**overrides, setting: value})


def test_command_line_prints_one_error_line(tiny_data, monkeypatch):
    """``--epochs=ten`` (not a Python literal, so RecBole keeps the string) ends in one line."""
    name, overrides = tiny_data
    monkeypatch.setattr("sys.argv", ["run_recbole_llm.py", "--model=LRURec", f"--dataset={name}", "--epochs=ten",
                                     f"--data_path={overrides['data_path']}"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert str(stop.value).startswith("error: Setting epochs='ten' (str) must be a whole number")


def test_non_existent_llm_path(tiny_data, tmp_path):
    from recbole_llm.llm.backbone import load_causal_lm

    with pytest.raises(MissingInputError, match=r"llm_path='.*no_such_model'.*found nothing.*leave it unset"):
        load_causal_lm(str(tmp_path / "no_such_model"))


# ---------------------------------------------------------------------------- issue 17: each class of bad input
@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees its warnings (a run warns once per process)."""
    monkeypatch.setattr(errors, "_warned", set())


def _inter(tmp_path, name="tiny"):
    return tmp_path / "data" / name / f"{name}.inter"


def _edit_line(path, number, text):
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "recbole_llm"]


# A. what RecBole's reader accepts is accepted
def test_extra_field_on_a_line_loads_as_recbole_reads_it_with_one_warning(tiny_data, tmp_path, caplog):
    """RecBole's own tests/test_data/test/test.inter has such a line: RecBole keeps the header's fields."""
    name, overrides = tiny_data
    _append(_inter(tmp_path), b"u1\ti3\t5\tan extra field\n")
    with caplog.at_level(logging.WARNING):
        config = load_config("LRURec", name, config_dict=overrides)
        load_config("LRURec", name, config_dict=overrides)  # a run builds configs several times: one warning
        dataset = create_dataset(config)
    extra = [m for m in _warnings(caplog) if "more fields than the header" in m]
    assert len(extra) == 1 and "tiny.inter: 1 line(s)" in extra[0] and "line 482" in extra[0]
    assert dataset.inter_num == 481  # RecBole read the line (its first 3 fields)


# B. data
def test_interaction_file_without_rows(tiny_data, tmp_path):
    name, overrides = tiny_data
    _inter(tmp_path).write_text("user_id:token\titem_id:token\ttimestamp:float\n")
    with pytest.raises(InputError, match=r"tiny\.inter has a header but no interactions"):
        load_config("LRURec", name, config_dict=overrides)


def test_filtering_that_leaves_no_interaction(tiny_data):
    name, overrides = tiny_data
    with pytest.raises(InputError, match=r"filtering of tiny left no interactions .*user_inter_num_interval"):
        quick_start.build("LRURec", name, config_dict={**overrides, "user_inter_num_interval": "[50,inf)"})


def test_every_user_too_short_for_a_validation_target(tmp_path, monkeypatch):
    """3 interactions per user: leave-one-out gives each a training row and a test target, no
    validation target, and RecBole would fail at the first validation."""
    monkeypatch.chdir(tmp_path)
    write_tiny_dataset(tmp_path / "data", name="three", length=3)
    overrides = {"data_path": str(tmp_path / "data"), "user_inter_num_interval": None, "item_inter_num_interval": None,
                 "state": "WARNING", "show_progress": False, "use_gpu": False}
    with pytest.raises(InputError, match=r"40 users remain with at most 3 interaction\(s\) each; .*validation "
                                         r"target only from 4 interactions, so the validation set would be empty"):
        quick_start.build("SASRec", "three", config_dict=overrides)


def test_empty_time_value(tiny_data, tmp_path):
    name, overrides = tiny_data
    _edit_line(_inter(tmp_path), 5, "u1\ti5\t")
    with pytest.raises(InputError, match=r"tiny\.inter: 1 line\(s\) have no 'timestamp' value \(first: line 5\); "
                                         r"RecBole fills them with the mean"):
        load_config("LRURec", name, config_dict=overrides)


def test_no_time_column_while_ordering_by_time(tiny_data, tmp_path):
    name, overrides = tiny_data
    inter = _inter(tmp_path)
    inter.write_text("\n".join("\t".join(line.split("\t")[:2]) for line in inter.read_text().splitlines()) + "\n")
    with pytest.raises(InputError, match=r"eval_args order: TO sorts each history by TIME_FIELD='timestamp', but "
                                         r".*tiny\.inter has no field 'timestamp'"):
        load_config("LRURec", name, config_dict={**overrides, "load_col": {"inter": ["user_id", "item_id"]}})


def test_time_field_declared_as_token(tiny_data, tmp_path):
    name, overrides = tiny_data
    inter = _inter(tmp_path)
    inter.write_text(inter.read_text().replace("timestamp:float", "timestamp:token", 1))
    with pytest.raises(InputError, match=r"TIME_FIELD 'timestamp' is declared ':token'.*'timestamp:float'"):
        load_config("LRURec", name, config_dict=overrides)


def test_comma_separated_file(tiny_data, tmp_path):
    name, overrides = tiny_data
    inter = _inter(tmp_path)
    inter.write_text(inter.read_text().replace("\t", ","))
    with pytest.raises(InputError, match=r"the header is separated by ',' but field_separator is '\\t'.*"
                                         r"field_separator: ','"):
        load_config("LRURec", name, config_dict=overrides)
    # ... and the fix it names works (the .item file stays tab-separated: convert it too)
    item = tmp_path / "data" / "tiny" / "tiny.item"
    item.write_text(item.read_text().replace("\t", ","))
    config = load_config("LRURec", name, config_dict={**overrides, "field_separator": ","})
    assert create_dataset(config).inter_num == 480


def test_item_file_that_does_not_cover_the_interactions(tiny_data, tmp_path, caplog):
    name, overrides = tiny_data
    _append(_inter(tmp_path), b"u1\ti99\t5\nu2\ti99\t6\nu3\ti98\t7\n")
    with caplog.at_level(logging.WARNING):
        config = load_config("LRURec", name, config_dict=overrides)
    assert any("tiny.inter: 3 interaction(s) of 2 item_id(s) missing from" in m and "RecBole drops them" in m
               and "filter_inter_by_user_or_item" in m for m in _warnings(caplog))
    assert create_dataset(config).inter_num == 480  # the count is what RecBole drops


def test_exact_duplicate_interactions_warn_and_a_setting_drops_them(tiny_data, tmp_path, caplog):
    name, overrides = tiny_data
    inter = _inter(tmp_path)
    second = inter.read_text().splitlines()[1]
    _append(inter, f"{second}\n{second}\n".encode())
    with caplog.at_level(logging.WARNING):
        config = load_config("LRURec", name, config_dict=overrides)
    assert any("tiny.inter: 2 interaction(s) are exact duplicates of an earlier line (line 482 repeats line 2)" in m
               and "drop_exact_duplicates: True" in m for m in _warnings(caplog))
    assert drop_exact_duplicates(config, create_dataset(config)) == 0  # off by default
    config = load_config("LRURec", name, config_dict={**overrides, "drop_exact_duplicates": True})
    dataset = create_dataset(config)
    assert dataset.inter_num == 482 and drop_exact_duplicates(config, dataset) == 2 and dataset.inter_num == 480


def test_field_opening_a_quote_it_does_not_close(tiny_data, tmp_path):
    """pandas (RecBole's reader) would read on across fields and lines to the next quote."""
    name, overrides = tiny_data
    _append(_inter(tmp_path), b'u1\t"i3\t5\n')
    with pytest.raises(InputError, match=r"line 482, field 'item_id' starts with a double quote it does not close"):
        load_config("LRURec", name, config_dict=overrides)


def test_byte_order_mark(tiny_data, tmp_path):
    name, overrides = tiny_data
    inter = _inter(tmp_path)
    inter.write_bytes(b"\xef\xbb\xbf" + inter.read_bytes())
    with pytest.raises(InputError, match=r"tiny\.inter starts with a byte-order mark.*encoding: utf-8-sig"):
        load_config("LRURec", name, config_dict=overrides)
    assert load_config("LRURec", name, config_dict={**overrides, "encoding": "utf-8-sig"})  # the fix works


# C. settings
def test_unknown_setting_gets_did_you_mean(tiny_data, caplog):
    name, overrides = tiny_data
    with caplog.at_level(logging.WARNING):
        load_config("LRURec", name, config_dict={**overrides, "learnig_rate": 0.01})
    assert any("'learnig_rate' (in config_dict) is not a setting of RecBole or recbole-llm" in m
               and "did you mean learning_rate?" in m for m in _warnings(caplog))


def test_key_space_value_is_refused_with_the_right_form(tiny_data, monkeypatch):
    name, overrides = tiny_data
    argv = ["--model=LRURec", f"--dataset={name}", "--epochs", "5"]
    monkeypatch.setattr("sys.argv", ["run_recbole_llm.py", *argv])
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert str(stop.value) == ("error: --epochs 5: RecBole reads settings only as --key=value and would ignore "
                               "this one. Write --epochs=5.")


@pytest.mark.parametrize("setting, value", [("epochs", 0), ("train_batch_size", -8), ("eval_batch_size", 0),
                                            ("MAX_ITEM_LIST_LENGTH", 0), ("stopping_step", 0)])
def test_setting_out_of_range(tiny_data, setting, value):
    name, overrides = tiny_data
    with pytest.raises(InputError, match=rf"^{setting}={value} is out of range: .* a whole number >= 1"):
        load_config("LRURec", name, config_dict={**overrides, setting: value})


def test_batch_size_of_an_llm_model_out_of_range(tiny_data):
    name, overrides = tiny_data
    with pytest.raises(InputError, match=r"^ranker_eval_batch_size=0 is out of range: .* a whole number >= 1"):
        load_config("LlamaRec", name, config_dict={**overrides, "ranker_eval_batch_size": 0})


@pytest.mark.parametrize("setting, value, problem", [
    ("learning_rate", 0.0, r"^learning_rate=0.0 is out of range: the learning rate, a number > 0"),
    ("topk", [0, 10], r"^RecBole refused the settings: topk must be a positive integer"),  # RecBole's own check
])
def test_learning_rate_and_cut_offs_out_of_range(tiny_data, setting, value, problem):
    name, overrides = tiny_data
    with pytest.raises(InputError, match=problem):
        load_config("LRURec", name, config_dict={**overrides, setting: value})


def test_valid_metric_that_is_not_computed(tiny_data):
    name, overrides = tiny_data
    with pytest.raises(InputError, match=r"valid_metric='NDCG@20' is not among the metrics computed \(Recall@5, "):
        load_config("LRURec", name, config_dict={**overrides, "valid_metric": "NDCG@20"})
    assert load_config("LRURec", name, config_dict={**overrides, "valid_metric": "ndcg@5"})  # RecBole lowercases it


def test_metric_name_that_recbole_does_not_know(tiny_data):
    name, overrides = tiny_data
    with pytest.raises(InputError, match=r"There is no metric named 'NDGC'.*did you mean ndcg"):
        load_config("LRURec", name, config_dict={**overrides, "metrics": ["NDGC"]})


@pytest.mark.parametrize("text, problem", [
    ("epochs: [1, 2\n", r"is not valid YAML at line 2, column 1"),
    (None, r"does not exist"),
    ("- epochs\n", r"holds a list, not 'key: value' lines"),
], ids=["does not parse", "missing", "not a mapping"])
def test_config_file_that_cannot_be_read(tiny_data, tmp_path, text, problem):
    name, overrides = tiny_data
    path = tmp_path / "my config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError, match=rf"config file '{re.escape(str(path))}' {problem}"):
        load_config("LRURec", name, config_file_list=[str(path)], config_dict=overrides)


@pytest.mark.parametrize("given, suggested", [("llamarec", "LlamaRec"), ("sasrec", "SASRec"), ("LRURek", "LRURec")])
def test_model_name_in_another_case_or_misspelt(given, suggested):
    with pytest.raises(InputError, match=rf"Unknown model '{given}': did you mean {suggested}\?"):
        load_config(given, "tiny")


# D. LLM settings, before stage 1
def _llm_config(tiny_data, **settings):
    """LlamaRec's config after the pre-flight checks that ``build`` runs before stage 1."""
    name, overrides = tiny_data
    config = load_config("LlamaRec", name, config_dict={**overrides, **settings})
    quick_start.preflight(config)
    return config


def test_llm_settings_are_checked_before_stage_one(tiny_data, tmp_path):
    name, overrides = tiny_data
    with pytest.raises(InputError, match=r"candidate_k=27 is out of range"):
        quick_start.build("LlamaRec", name, config_dict={**overrides, "candidate_k": 27})
    assert not (tmp_path / "saved").exists()  # no stage-1 model was trained or cached


@pytest.mark.parametrize("setting, value, problem", [
    ("ranker_train_candidates", "retreiver", r"^ranker_train_candidates='retreiver' is not one of random, retriever, "
                                             r"mix: did you mean retriever\? Set --ranker_train_candidates=retriever "),
    ("ranker_train_target_position", "last", r"^ranker_train_target_position='last' is not one of random, retriever, shuffle\. "
                                             r"Set --ranker_train_target_position=random "),
])
def test_training_list_setting_outside_its_choices(tiny_data, tmp_path, setting, value, problem):
    """One line naming the choices, before stage 1 trains."""
    name, overrides = tiny_data
    with pytest.raises(InputError, match=problem):
        quick_start.build("LlamaRec", name, config_dict={**overrides, setting: value})
    assert not (tmp_path / "saved").exists()


def test_llm_path_that_does_not_exist(tiny_data, tmp_path):
    with pytest.raises(MissingInputError, match=r"llm_path='.*no_such_model'.*found nothing"):
        _llm_config(tiny_data, llm_path=str(tmp_path / "no_such_model"))


def test_llm_path_that_is_not_a_causal_lm(tiny_data, tmp_path):
    from transformers import BertConfig, LlamaConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
               architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "bert")
    with pytest.raises(InputError, match=r"llm_path='.*bert' is a BertForMaskedLM model, not a causal language model"):
        _llm_config(tiny_data, llm_path=str(tmp_path / "bert"))
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama")
    assert _llm_config(tiny_data, llm_path=str(tmp_path / "llama"))  # config.json only: no weights are read


def test_llm_path_that_is_an_adapter_folder(tiny_data, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(MissingInputError, match=r"holds a PEFT adapter \(adapter_config.json\), not a model"):
        _llm_config(tiny_data, llm_path=str(tmp_path / "adapter"))


def test_ranker_adapter_that_is_not_a_peft_folder(tiny_data, tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(MissingInputError, match=r"ranker_adapter='.*weights' has no adapter_config.json"):
        _llm_config(tiny_data, ranker_adapter=str(tmp_path / "weights"))
    with pytest.raises(MissingInputError, match=r"ranker_adapter='.*nothing_here' is not a folder"):
        _llm_config(tiny_data, ranker_adapter=str(tmp_path / "nothing_here"))


@pytest.mark.parametrize("k", [0, 27])
def test_candidate_k_beyond_the_index_letters(tiny_data, k):
    with pytest.raises(InputError, match=rf"candidate_k={k} is out of range: .*A..Z.* from 1 to 26"):
        _llm_config(tiny_data, candidate_k=k)


def test_more_candidates_than_items(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_dataset(tmp_path / "data", name="few", n_items=10)
    overrides = {"data_path": str(tmp_path / "data"), "user_inter_num_interval": None, "item_inter_num_interval": None,
                 "state": "WARNING", "show_progress": False, "use_gpu": False, "candidate_k": 20,
                 "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title"]}}
    with pytest.raises(InputError, match=r"candidate_k=20 but few has only 10 items after filtering"):
        quick_start.build("LlamaRec", "few", config_dict=overrides)
    assert not (tmp_path / "saved").exists()  # before stage 1


def test_load_in_4bit_without_cuda_says_once_it_uses_lora(tiny_data, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        config = _llm_config(tiny_data, load_in_4bit=True)
        _llm_config(tiny_data, load_in_4bit=True)
    assert _warnings(caplog).count("load_in_4bit needs CUDA and bitsandbytes; falling back to LoRA in full "
                                   "precision on cpu") == 1
    assert config["load_in_4bit"] is False  # so the backbone loader does not say it again


# E. output folders
def test_checkpoint_dir_that_cannot_be_written(tiny_data, tmp_path):
    name, overrides = tiny_data
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match=r"checkpoint_dir='.*a_file/saved' cannot be written: .*a_file is a file, "
                                         r"not a folder. Set checkpoint_dir to a folder you can write"):
        load_config("LRURec", name, config_dict={**overrides, "checkpoint_dir": str(tmp_path / "a_file" / "saved")})


def test_log_folder_that_cannot_be_written(tiny_data, tmp_path):
    name, overrides = tiny_data
    (tmp_path / "log").write_text("not a folder")  # the working directory is tmp_path
    with pytest.raises(InputError, match=r"RecBole's log folder ./log .* cannot be written"):
        load_config("LRURec", name, config_dict=overrides)


# F. stage 1 says what it runs
def test_stage_one_logs_its_settings_and_where_each_came_from(tiny_data, tmp_path, monkeypatch, caplog):
    from recbole_llm.model import pretrained

    name, overrides = tiny_data
    config = _llm_config(tiny_data, retriever_config={"epochs": 1})
    monkeypatch.setattr(pretrained, "train_id_model", lambda *args: None)
    with caplog.at_level(logging.INFO):
        pretrained.pretrained_id_model(config, create_dataset(config), "SASRec", overrides=config["retriever_config"],
                                       setting="retriever_checkpoint")
    report = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("stage 1: SASRec for LlamaRec"))
    assert "epochs=1 (your retriever_config)" in report
    assert "n_heads=2 (RecBole's SASRec.yaml)" in report
    assert "stopping_step=10 (recbole-llm's overall.yaml)" in report
    assert "train_batch_size=256 (recbole-llm's overall.yaml)" in report  # not the main model's 32
    config["retriever_config"] = {"epochs": 60, "stopping_step": 8}  # LlamaRec.yaml's own value
    stage_one = pretrained.id_model_config(config, "LRURec", config["retriever_config"])
    report = pretrained.settings_report(config, stage_one, "LRURec", config["retriever_config"], "retriever_checkpoint")
    assert "epochs=60 (LlamaRec.yaml's retriever_config)" in report and "hidden_size=64 (recbole-llm's LRURec.yaml)" in report


@pytest.mark.parametrize("fields, problem", [
    (["movie_title", "brnad"], "item_text_fields names ['brnad'], which tiny.item does not have; its fields are "
                               "['item_id', 'movie_title', 'release_year', 'class']"),
    (["movie_title", "class"], "item_text_fields names ['class'], which tiny.item has but load_col does not load"),
])
def test_a_text_field_the_item_file_lacks_or_load_col_skips_stops_before_stage_1(tiny_data, tiny_llama_dir, fields,
                                                                                 problem):
    """A misspelt or unloaded field of ``item_text_fields`` (and of SeRALM's ``knowledge_fields``) is one
    line naming it and the .item file's fields, before the ID model trains.

    Caught: the missing field silently left out (the former behaviour)."""
    name, overrides = tiny_data
    overrides = {**overrides, "load_col": {**overrides["load_col"], "item": ["item_id", "movie_title", "release_year"]},
                 "llm_path": str(tiny_llama_dir), "item_text_fields": fields}
    with pytest.raises(InputError, match=re.escape(problem)):
        quick_start.build("Laser", name, config_dict=overrides)
    assert not list(Path(overrides["checkpoint_dir"]).glob("**/*.pth"))  # no ID model trained
    config, dataset = _dataset((name, overrides))
    with pytest.raises(InputError, match=re.escape(problem.replace("item_text_fields", "knowledge_fields"))):
        item_prompt_fields(dataset, {"title": fields[0], "brand": fields[1]})
    with pytest.raises(InputError, match=re.escape(problem)):  # as a command line gives it: a string
        item_texts(dataset, f"[{fields[0]},{fields[1]}]")


def test_title_max_tokens_that_cuts_over_a_tenth_of_the_items_says_so_once(tiny_data, embedded_tokenizer, caplog):
    """Laser's and LlamaRec's cut of item text is measured and logged once when it cuts over a tenth of the items.

    Caught: the count taken after the cut (never over the limit)."""
    from recbole_llm.llm.prompts import truncate_texts
    from recbole_llm.model.laser import HistoryPrompt

    config, dataset = _dataset(tiny_data)
    texts = item_texts(dataset, ["movie_title", "release_year"])  # "Movie Number 7 (1957)": 7 tokens and more
    with caplog.at_level(logging.INFO):
        HistoryPrompt(embedded_tokenizer, texts, "{history}", 4, 3)
    assert caplog.text.count("title_max_tokens=3 cuts the text of 30 of 30 items (100%)") == 1
    caplog.clear()
    with caplog.at_level(logging.INFO):
        truncate_texts(texts, embedded_tokenizer, 3)
        HistoryPrompt(embedded_tokenizer, texts, "{history}", 4, 32)
        truncate_texts(texts, embedded_tokenizer, 32)
    assert caplog.text.count("cuts the text of 30 of 30 items") == 1 and "title_max_tokens=32" not in caplog.text


def test_dataset_files_are_parsed_once_for_the_same_files_and_settings(tmp_path, monkeypatch):
    """The several configs of one run parse the atomic files once; a setting the checks read, or an edited
    file, checks them again."""
    write_tiny_dataset(tmp_path / "data", name="once")
    parsed = []
    read = datasets.read_atomic_file
    monkeypatch.setattr(datasets, "read_atomic_file", lambda path, *a, **k: parsed.append(path) or read(path, *a, **k))
    settings = {"data_path": str(tmp_path / "data")}
    load_config("SASRec", "once", config_dict=settings)
    first = len(parsed)
    load_config("SASRec", "once", config_dict=settings)
    load_config("LRURec", "once", config_dict=settings)
    assert first > 0 and len(parsed) == first
    other = {**settings, "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]}}
    load_config("SASRec", "once", config_dict=other)
    assert len(parsed) > first  # load_col is read by the checks
    second = len(parsed)
    load_config("SASRec", "once", config_dict=other)
    assert len(parsed) == second
    with open(tmp_path / "data" / "once" / "once.inter", "a") as inter:
        inter.write("u1\ti1\n")  # a line with too few fields
    with pytest.raises(InputError, match="line .* has 2 fields"):
        load_config("SASRec", "once", config_dict=other)


def test_a_dataset_recbole_downloads_is_left_to_recbole_and_an_unknown_one_is_refused(tmp_path):
    config = load_config("SASRec", "ml-1m", config_dict={"data_path": str(tmp_path)})  # no folder: RecBole's download
    assert config["data_path"] == str(tmp_path / "ml-1m") and not (tmp_path / "ml-1m").exists()
    with pytest.raises(MissingInputError, match="Dataset 'my-data' not found"):
        load_config("SASRec", "my-data", config_dict={"data_path": str(tmp_path)})
