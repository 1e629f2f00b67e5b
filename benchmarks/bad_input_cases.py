"""Bad input, tried for real: each case runs through the command line (``run_recbole_llm.py``)
on a tiny dataset and its outcome goes to the "bad_input" section of docs/RESULTS.md.

    python benchmarks/bad_input_cases.py [--only=N,M]

A case ends in one of: a clear line (``error: ...``, exit status 1, no traceback), a warning
(the run goes on; the warning names the file or setting, the count and the fix), or a correct
result (the run trains and tests). Any other exception is recorded as a TRACEBACK, a failure.
Cases of LLM settings stop at the pre-flight check (``load_config`` and ``preflight``, what
the run does before stage 1) where the input is fine for it, so that no LLM is trained; the stage-1 case trains the retriever for one epoch.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from results_doc import ROOT, markdown_table, write_section

sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_tiny_dataset  # noqa: E402  (the tests' tiny dataset writer)

TINY = {  # the tiny run: 40 users x 12 interactions, 30 items; one epoch of LRURec takes seconds
    "user_inter_num_interval": None, "item_inter_num_interval": None, "MAX_ITEM_LIST_LENGTH": 8, "epochs": 1,
    "train_batch_size": 32, "eval_batch_size": 64, "show_progress": False, "use_gpu": False, "state": "WARNING",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "release_year"]},
}


@dataclass
class Case:
    area: str  # the class of bad input (issue 16.4 / 17.x)
    name: str
    args: list = field(default_factory=list)  # command-line arguments after --model/--dataset/--config_files
    prepare: Callable[[Path], None] | None = None  # edits the case folder (data in data/tiny)
    model: str = "LRURec"
    entry: str = "cli"  # cli: run_recbole_llm.py for real; preflight: load_config + preflight; stage1: train stage 1


# ------------------------------------------------------------------ edits of the tiny dataset
def _inter(folder):
    return folder / "data" / "tiny" / "tiny.inter"


def append(text):
    def edit(folder):
        with open(_inter(folder), "a", encoding="utf-8") as f:
            f.write(text)
    return edit


def replace(old, new, suffix="inter"):
    def edit(folder):
        path = folder / "data" / "tiny" / f"tiny.{suffix}"
        path.write_text(path.read_text().replace(old, new))
    return edit


def set_line(number, text):
    def edit(folder):
        lines = _inter(folder).read_text().splitlines()
        lines[number - 1] = text
        _inter(folder).write_text("\n".join(lines) + "\n")
    return edit


def rewrite(transform):
    def edit(folder):
        path = _inter(folder)
        path.write_bytes(transform(path.read_bytes()))
    return edit


def tiny_users(length):
    def edit(folder):
        write_tiny_dataset(folder / "data", length=length)
    return edit


def duplicate_second_line(folder):
    append(_inter(folder).read_text().splitlines()[1] + "\n")(folder)


def write(relative, text):
    def edit(folder):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return edit


def model_folder(architecture, config_class):
    def edit(folder):
        import transformers

        getattr(transformers, config_class)(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=8, architectures=[architecture]
                                            ).save_pretrained(folder / "model")
    return edit


def _both(*edits):
    def edit(folder):
        for one in edits:
            one(folder)
    return edit


CASES = [
    # A. what RecBole's reader accepts is accepted (issue 16.4)
    Case("A file format", "extra field on one line (as RecBole's own test.inter)", prepare=append("u1\ti3\t5\textra\n")),
    Case("A file format", "line with too few fields", prepare=append("u1\ti3\n")),
    Case("A file format", "text in a float field", prepare=append("u1\ti3\tyesterday\n")),
    Case("A file format", "header type that RecBole lacks (timestamp:date)", prepare=replace("timestamp:float", "timestamp:date")),
    Case("A file format", "latin-1 bytes in a UTF-8 file", prepare=rewrite(lambda b: b + "u1\ti3\t5\xe9\n".encode("latin-1"))),
    Case("A file format", "byte-order mark at the start", prepare=rewrite(lambda b: b"\xef\xbb\xbf" + b)),
    Case("A file format", "field opening a quote it does not close", prepare=append('u1\t"i3\t5\n')),
    Case("A file format", "blank lines between the interactions", prepare=append("\n\nu1\ti3\t5\n")),
    Case("A file format", "Windows line endings (CRLF)", prepare=rewrite(lambda b: b.replace(b"\n", b"\r\n"))),
    # B. data (issue 17.1)
    Case("B data", "interaction file with a header and no rows",
         prepare=rewrite(lambda b: b.split(b"\n", 1)[0] + b"\n")),
    Case("B data", "filtering leaves no interaction", args=["--user_inter_num_interval=[50,inf)"]),
    Case("B data", "every user has 3 interactions (no validation target)", prepare=tiny_users(3)),
    Case("B data", "5 users with a single interaction", prepare=append("".join(f"solo{u}\ti{u}\t{u}\n" for u in range(1, 6)))),
    Case("B data", "empty time value", prepare=set_line(5, "u1\ti5\t")),
    Case("B data", "no time column while ordering by time (order TO)",
         prepare=rewrite(lambda b: b"\n".join(b"\t".join(line.split(b"\t")[:2]) for line in b.split(b"\n"))),
         args=["--load_col={'inter':['user_id','item_id']}"]),
    Case("B data", "time column declared :token", prepare=replace("timestamp:float", "timestamp:token")),
    Case("B data", "comma-separated file, default field_separator", prepare=replace("\t", ",")),
    Case("B data", "comma-separated files with --field_separator=,",
         prepare=_both(replace("\t", ","), replace("\t", ",", "item")), args=["--field_separator=,"]),
    Case("B data", ".item file missing ids of .inter", prepare=append("u1\ti99\t5\nu2\ti99\t6\nu3\ti98\t7\n")),
    Case("B data", "exact duplicate interactions", prepare=duplicate_second_line),
    Case("B data", "exact duplicates with --drop_exact_duplicates=True", prepare=duplicate_second_line,
         args=["--drop_exact_duplicates=True"]),
    Case("B data", "load_col names a field the file lacks", args=["--load_col={'inter':['user_id','item_id','timestamp','rating']}"]),
    Case("B data", "dataset folder that does not exist", args=["--data_path=nowhere"]),
    # C. settings (issue 17.2)
    Case("C settings", "misspelt setting --learnig_rate=0.01", args=["--learnig_rate=0.01"]),
    Case("C settings", "--epochs 5 (with a space)", args=["--epochs", "5"]),
    Case("C settings", "the same setting twice, two values", args=["--epochs=1", "--epochs=2"]),
    Case("C settings", "--epochs=ten", args=["--epochs=ten"]),
    Case("C settings", "--epochs=0", args=["--epochs=0"]),
    Case("C settings", "--train_batch_size=-1", args=["--train_batch_size=-1"]),
    Case("C settings", "--MAX_ITEM_LIST_LENGTH=0", args=["--MAX_ITEM_LIST_LENGTH=0"]),
    Case("C settings", "--learning_rate=0", args=["--learning_rate=0"]),
    Case("C settings", "LlamaRec's --ranker_eval_batch_size=0", model="LlamaRec", args=["--ranker_eval_batch_size=0"]),
    Case("C settings", "--topk=[0,10]", args=["--topk=[0,10]"]),
    Case("C settings", "--valid_metric=NDCG@20 (topk is [5, 10])", args=["--valid_metric=NDCG@20"]),
    Case("C settings", "metric name RecBole lacks (NDGC)", args=["--metrics=['NDGC']"]),
    Case("C settings", "config file that does not parse", prepare=write("bad.yaml", "epochs: [1, 2\n"),
         args=["--config_files=tiny.yaml bad.yaml"]),
    Case("C settings", "config file that does not exist", args=["--config_files=tiny.yaml missing.yaml"]),
    Case("C settings", "model name in lower case (llamarec)", model="llamarec"),
    Case("C settings", "two models, the second misspelt (LRURec,LlamaRek)", model="LRURec,LlamaRek"),
    Case("C settings", "two models, the second fails after the first finished (SASRec with 3 heads of 64)",
         model="LRURec,SASRec", args=["--n_heads=3"]),
    # D. LLM settings, before stage 1 (issue 17.3)
    Case("D LLM settings", "llm_path that does not exist", model="LlamaRec", args=["--llm_path=./no_such_model"]),
    Case("D LLM settings", "llm_path holding a BERT (masked LM)", model="LlamaRec",
         prepare=model_folder("BertForMaskedLM", "BertConfig"), args=["--llm_path=./model"]),
    Case("D LLM settings", "llm_path holding a PEFT adapter", model="LlamaRec",
         prepare=write("adapter/adapter_config.json", "{}"), args=["--llm_path=./adapter"]),
    Case("D LLM settings", "llm_path holding a causal LM config (Llama)", model="LlamaRec", entry="preflight",
         prepare=model_folder("LlamaForCausalLM", "LlamaConfig"), args=["--llm_path=./model"]),
    Case("D LLM settings", "ranker_adapter without adapter_config.json", model="LlamaRec",
         prepare=write("weights/model.bin", ""), args=["--ranker_adapter=./weights"]),
    Case("D LLM settings", "candidate_k=27 (letters A..Z)", model="LlamaRec", args=["--candidate_k=27"]),
    Case("D LLM settings", "load_in_4bit=True without CUDA", model="LlamaRec", entry="preflight",
         args=["--load_in_4bit=True"]),
    # E. output folders (issue 17.6)
    Case("E output folders", "checkpoint_dir under a file", prepare=write("a_file", ""),
         args=["--checkpoint_dir=a_file/saved"]),
    Case("E output folders", "./log is a file", prepare=write("log", "")),
    # F. stage 1 says what it runs (issue 17.7)
    Case("F stage 1", "LlamaRec's retriever (LRURec) with --retriever_config={'epochs':1}", model="LlamaRec",
         entry="stage1", args=["--retriever_config={'epochs':1}"]),
]


class Captured(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def run_case(case: Case, folder: Path) -> tuple[str, str]:
    """``(outcome, what the user sees)`` of one case, run in ``folder``."""
    from recbole_llm import cli, errors, load_config

    folder.mkdir(parents=True)
    os.chdir(folder)
    write_tiny_dataset(folder / "data")
    (folder / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "data_path": "data", "checkpoint_dir": "saved"}))
    if case.prepare:
        case.prepare(folder)
    errors._warned.clear()
    argv = [f"--model={case.model}", "--dataset=tiny", "--config_files=tiny.yaml", *case.args]
    captured = Captured()
    logging.getLogger("recbole_llm").addHandler(captured)
    logging.getLogger().addHandler(captured)
    sys.argv = ["run_recbole_llm.py", *argv]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = _run(case, argv, load_config, cli)
    except SystemExit as stop:
        printed = [line for line in out.getvalue().splitlines() if line.startswith("written")]
        return "clear line", " ".join([str(stop)] + printed)
    except Exception as error:  # noqa: BLE001 - that is what this script looks for
        return "TRACEBACK", f"{type(error).__name__}: {error} | {traceback.format_exc().splitlines()[-3].strip()}"
    finally:
        logging.getLogger("recbole_llm").removeHandler(captured)
        logging.getLogger().removeHandler(captured)
        sys.argv = sys.argv[:1]
    ours = list(dict.fromkeys(r.getMessage() for r in captured.records
                              if r.name == "recbole_llm" and r.levelno >= logging.WARNING))
    if case.entry == "stage1":
        report = next(r.getMessage() for r in captured.records if r.getMessage().startswith("stage 1:"))
        return "logged", report.replace(" with\n  ", " with: ").replace("\n  ", "; ")
    if ours:
        return "warning", " / ".join(ours) + (f" (then: {result})" if result else "")
    return "correct result", result


def _run(case, argv, load_config, cli) -> str:
    if case.entry == "cli":
        results = cli.main(argv)
        return "; ".join(f"{model} trained, test ndcg@10 {r['test_result']['ndcg@10']:.4f}" for model, r in results.items())
    from recbole_llm.quick_start import preflight

    config = load_config(case.model, "tiny", ["tiny.yaml"])
    preflight(config)
    if case.entry == "preflight":
        return "pre-flight checks passed (no LLM loaded)"
    from recbole.data import create_dataset

    from recbole_llm.model.pretrained import pretrained_id_model

    logging.getLogger().setLevel(logging.INFO)  # the report is an INFO line of the root logger, as RecBole's
    pretrained_id_model(config, create_dataset(config), config["retriever"], overrides=config["retriever_config"],
                        setting="retriever_checkpoint")
    return "stage 1 trained"


def main():
    own_argv = [os.path.abspath(sys.argv[0]), *sys.argv[1:]]  # each case sets sys.argv (RecBole's Config reads it)
    only = next((arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--only=")), None)
    chosen = [int(n) for n in only.split(",")] if only else range(len(CASES))
    logging.getLogger("recbole_llm").setLevel(logging.INFO)
    rows, counts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in chosen:
            case = CASES[n]
            outcome, seen = run_case(case, Path(tmp) / f"case{n}")
            counts[outcome] = counts.get(outcome, 0) + 1
            run = {"cli": "run_recbole_llm.py", "preflight": "pre-flight", "stage1": "stage 1"}[case.entry]
            rows.append([n, case.area, case.name, run, outcome, seen.replace("|", "\\|").replace("\n", " ")])
            print(f"{n:2d} {outcome:14s} {case.name}: {seen[:150]}", file=sys.__stdout__, flush=True)
    os.chdir(ROOT)
    sys.argv = own_argv
    summary = ", ".join(f"{count} {outcome}" for outcome, count in sorted(counts.items()))
    body = (
        f"{len(rows)} cases, each run for real through `run_recbole_llm.py` (in-process, `recbole_llm.cli.main`) on "
        "a tiny dataset (40 users x 12 interactions, 30 items; LRURec unless named), outcomes: "
        f"{summary}. A clear line is the one `error: ...` line the command prints (exit status 1, no traceback); "
        "a warning lets the run go on (the run's result follows it); TRACEBACK would be a failure. Cases whose run is "
        "pre-flight ran `load_config` and `preflight` only (what a run does before stage 1; their checks of the LLM settings pass and no LLM is trained); the "
        "stage-1 case trained the retriever for one epoch and shows the line it logged.\n\n"
        + markdown_table(["#", "class", "case", "run", "outcome", "what the user sees"], rows)
    )
    if not only:
        write_section("bad_input", "Bad input, tried for real", body)
    print(f"{summary}", file=sys.__stdout__)
    sys.exit(1 if "TRACEBACK" in counts else 0)


if __name__ == "__main__":
    main()
