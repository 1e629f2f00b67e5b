"""Shared pytest fixtures. Every test runs offline: nothing may reach the Hugging Face hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # must be set before huggingface_hub is imported
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def cpu_without_bf16_units(monkeypatch):
    """``llm_dtype: auto`` resolves as on a CPU without bf16 units (float32), whatever CPU runs the
    tests, so exact comparisons hold on every machine; the bf16 autocast path has its own tests,
    which report units by patching ``precision.cpu_bf16_units`` themselves."""
    from recbole_llm.llm import precision

    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)


@pytest.fixture(scope="session")
def embedded_llm_cache(tmp_path_factory):
    """A cache dir holding the embedded SmolLM2-135M-Instruct, converted from GGUF once per test run."""
    from recbole_llm.llm.backbone import resolve_llm_path

    cache_dir = tmp_path_factory.mktemp("recbole_llm_cache")
    resolve_llm_path(None, cache_dir=str(cache_dir))
    return cache_dir


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_llm_cache):
    """The real tokenizer of the embedded LLM (left padding, pad token set)."""
    from recbole_llm.llm.backbone import load_tokenizer

    return load_tokenizer(None, cache_dir=str(embedded_llm_cache))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_tokenizer):
    """A local model directory holding a tiny random Llama and the embedded tokenizer."""
    from tiny_models import tiny_llama

    model_dir = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(embedded_tokenizer).save_pretrained(model_dir)
    embedded_tokenizer.save_pretrained(model_dir)
    return model_dir


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=30, length=12, with_item_file=True):
    """Atomic files of a tiny dataset where each user watches items in the cyclic order
    start, start+1, ... (so the next item is learnable), with titles and years."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for user in range(1, n_users + 1):
        start = (user * 7) % n_items
        for step in range(length):
            item = (start + step) % n_items + 1
            lines.append(f"u{user}\ti{item}\t{1000 * user + step}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    if with_item_file:
        items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        items += [f"i{i}\tMovie Number {i}\t{1950 + i}\tDrama" for i in range(1, n_items + 1)]
        (folder / f"{name}.item").write_text("\n".join(items) + "\n")
    return folder


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """(dataset name, config overrides) for a tiny dataset; logs and checkpoints go to tmp_path."""
    monkeypatch.chdir(tmp_path)
    write_tiny_dataset(tmp_path / "data")
    overrides = {
        "data_path": str(tmp_path / "data"),
        "checkpoint_dir": str(tmp_path / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "movie_title", "release_year", "class"]},
        "item_text_fields": ["movie_title", "release_year"],
        "user_inter_num_interval": None,
        "item_inter_num_interval": None,
        "MAX_ITEM_LIST_LENGTH": 8,
        "epochs": 2,
        "train_batch_size": 32,
        "eval_batch_size": 64,
        "show_progress": False,
        "use_gpu": False,
        "state": "WARNING",
    }
    return "tiny", overrides


def first_batch(loader):
    """The first batch's interaction (full-sort evaluation loaders yield tuples)."""
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


def train_steps(model, loader, steps=2, lr=1e-2):
    """A few Adam steps on ``model``'s trainable parameters, on the loader's first batch."""
    import torch

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    batch = first_batch(loader)
    for _ in range(steps):
        optimizer.zero_grad()
        total_loss(model.calculate_loss(batch)).backward()
        optimizer.step()
    model.eval()


def total_loss(losses):
    """A model's loss, or the sum of its parts when it returns them as a tuple (as RecBole accepts)."""
    return sum(losses) if isinstance(losses, tuple) else losses
