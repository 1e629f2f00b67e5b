"""Bad input, tried for real through the public entry points (issue 7).

Each case either fails with an ``InputError`` whose message names the file or setting and
the fix (the command line prints it as one line), or is handled and logged. The list of
cases is counted in docs/RESULTS.md.
"""
import logging
import re

import pytest
import torch
from recbole.data import create_dataset

from recbole_llm import load_config, run_recbole_llm
from recbole_llm.cli import main
from recbole_llm.data.item_text import item_texts
from recbole_llm.errors import InputError, MissingInputError
from recbole_llm.knowledge.generation import MAX_FIELD_CHARS, item_prompt_fields
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
    with pytest.raises(InputError, match=r"no item file \(.*notext\.item.*provide the \.item file"):
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
        result = run_recbole_llm("LRURec", "short", config_dict=overrides)
    assert "5 users have fewer than 3 interactions" in caplog.text
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0


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
