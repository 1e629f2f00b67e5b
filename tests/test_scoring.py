"""Full-sort scoring in item chunks (``score_chunk_items``) gives the same scores as all items at once (the
same dot products; BLAS may round a product of another shape in the last bit, so up to 1e-5) and the same ranking.

Breakages checked by hand (caught by the first test): the last, shorter chunk dropped; a chunk's scores
written wrong (one column shifted by 1e-3)."""
import pytest
import torch

from conftest import first_batch
from recbole_llm.model.scoring import chunked_scores
from test_precision import _build


def test_chunked_scores_equal_one_product_and_build_only_chunk_rows():
    torch.manual_seed(0)
    user, table = torch.randn(5, 8), torch.randn(23, 8)
    asked = []

    def rows(start, end):
        asked.append(end - start)
        return table[start:end]

    with torch.no_grad():
        whole = chunked_scores(user, rows, 23, 0)
        chunked = chunked_scores(user, rows, 23, 7)
    assert asked == [23, 7, 7, 7, 2]
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-5)
    chunked_with_grad = chunked_scores(user, rows, 23, 7)  # training: one product
    assert asked[-1] == 23 and torch.equal(chunked_with_grad, whole)


@pytest.mark.parametrize("model_name,extra", [("E4SRec", {"score_head": "tied"}), ("E4SRec", {}),
                                              ("Laser", {"item_repr": "both"})])
def test_model_scores_are_identical_chunked_and_unchunked(model_name, extra, tiny_data, tiny_llama_dir):
    _, model, (_, _, test) = _build(model_name, tiny_data, tiny_llama_dir, {"score_chunk_items": 7, **extra})
    assert model.score_chunk_items == 7 and model.n_items > 7
    model.eval()
    interaction = first_batch(test)
    with torch.no_grad():
        chunked = model.full_sort_predict(interaction)
        model.score_chunk_items = 0
        whole = model.full_sort_predict(interaction)
    assert chunked.shape == (len(interaction), model.n_items)
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-5)
    assert torch.equal(chunked.topk(10).indices, whole.topk(10).indices)
