"""LRURec: the defining properties of the authors' design, on tiny inputs."""
import math

import numpy as np
import pytest
import torch
from recbole.data import create_dataset, data_preparation

from recbole_llm import load_config
from recbole_llm.data.sequence_windows import window_rows
from recbole_llm.model.lrurec import LRURec, left_align, parallel_scan, sequential_scan
from conftest import first_batch


def test_parallel_scan_equals_step_by_step_recurrence():
    torch.manual_seed(0)
    batch, length, n = 3, 16, 5
    u = torch.randn(batch, length, n, dtype=torch.cfloat)
    lamb = torch.polar(torch.rand(n) * 0.5 + 0.5, torch.rand(n) * 6.28)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    mask[2, :15] = False
    assert torch.allclose(parallel_scan(u, lamb, mask), sequential_scan(u, lamb, mask), atol=1e-5)


def test_parallel_scan_rejects_length_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        parallel_scan(torch.zeros(1, 6, 2, dtype=torch.cfloat), torch.ones(2, dtype=torch.cfloat), torch.ones(1, 6, dtype=torch.bool))


def test_left_align_moves_items_to_the_end():
    seq = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [9, 0, 0, 0, 0]])
    aligned = left_align(seq, torch.tensor([3, 5, 1]))
    assert aligned.tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9]]


def test_window_rows_tile_each_users_sequence():
    users = np.array([1] * 7 + [2] * 3)
    # window 3: user 1 keeps rows 6, 3, 0 (from the end); user 2 keeps row 9 only
    assert window_rows(users, 3).tolist() == [0, 3, 6, 9]


@pytest.fixture
def lrurec_setup(tiny_data):
    name, overrides = tiny_data
    config = load_config("LRURec", name, config_dict=overrides)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    torch.manual_seed(0)
    model = LRURec(config, train._dataset)
    return config, model, train, test




def test_left_padding_does_not_change_outputs(lrurec_setup):
    _, model, *_ = lrurec_setup
    model.eval()
    items = torch.tensor([[3, 4, 5, 6]])
    padded = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5, 6]])
    with torch.no_grad():
        short, long = model.encode(items), model.encode(padded)
    assert torch.allclose(short, long[:, -4:], atol=1e-5)


def test_full_sort_predict_covers_all_items(lrurec_setup):
    config, model, _, test = lrurec_setup
    interaction = first_batch(test)
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(interaction)
    assert scores.shape == (interaction.length, model.n_items)
    predicted = model.predict(interaction)
    chosen = scores.gather(1, interaction["item_id"].unsqueeze(1)).squeeze(1)
    assert torch.allclose(predicted, chosen, atol=1e-5)


def test_training_steps_lower_the_loss(lrurec_setup):
    _, model, train, _ = lrurec_setup
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = first_batch(train)
    model.train()
    first = model.calculate_loss(batch).item()
    for _ in range(30):
        optimizer.zero_grad()
        model.calculate_loss(batch).backward()
        optimizer.step()
    assert model.calculate_loss(batch).item() < 0.7 * first


def test_training_split_keeps_one_row_per_window(lrurec_setup):
    config, _, train, _ = lrurec_setup
    # 12 interactions per user: 10 training targets, windows of 8 -> 2 rows per user
    users = train._dataset.inter_feat["user_id"].numpy()
    assert np.bincount(users)[1:].tolist() == [2] * 40


def test_every_position_loss_in_chunks_equals_the_whole(lrurec_setup, monkeypatch):
    """With a score budget below one batch's (chunks of a few positions, scores recomputed in the backward
    pass), LRURec's loss and its gradients are those of one cross-entropy over all positions, and no
    chunk scores more positions than the budget. Breakage checked by hand (caught): the last, shorter
    chunk dropped; the chunks' sum divided by the number of chunks instead of positions."""
    from recbole_llm.model import objectives

    _, model, train, _ = lrurec_setup
    model.eval()  # no dropout: the two passes must agree
    batch = first_batch(train)
    items = left_align(batch[model.ITEM_SEQ], batch[model.ITEM_SEQ_LEN])
    with torch.no_grad():
        positions = int((items > 0).sum())
    size = next(size for size in (5, 7, 11) if positions % size)  # the last chunk is shorter

    def loss_and_grads():
        model.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, whole_grads = loss_and_grads()
    rows_scored = []
    scores = model._scores
    monkeypatch.setattr(model, "_scores", lambda states: rows_scored.append(len(states)) or scores(states))
    monkeypatch.setattr(objectives, "CHUNK_ELEMENTS", size * model.n_items)
    chunked, chunked_grads = loss_and_grads()
    assert max(rows_scored) == size and len(rows_scored) == 2 * math.ceil(positions / size)  # forward + recompute
    torch.testing.assert_close(chunked, whole)
    for part, full in zip(chunked_grads, whole_grads, strict=True):
        torch.testing.assert_close(part, full, atol=1e-6, rtol=1e-4)
