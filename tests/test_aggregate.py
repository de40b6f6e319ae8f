"""The aggregation maths of federated rounds (privacy/aggregate.py), with numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ownlm.errors import InvalidInput
from ownlm.privacy import aggregate as agg

P = "model.layers.0.self_attn.q_proj"


def _dev(a, b) -> agg.Factors:
    return {P: (torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))}


# two devices, rank 1, a 2x2 weight: A (1, 2), B (2, 1)
D1 = _dev([[1.0, 0.0]], [[1.0], [0.0]])  # B @ A = [[1, 0], [0, 0]]
D2 = _dev([[0.0, 1.0]], [[0.0], [1.0]])  # B @ A = [[0, 0], [0, 1]]


def _vectors(method, devices):
    tensors = [agg.tensors_for(method, d) for d in devices]
    layout = agg.Layout.of(tensors[0])
    return layout, [layout.flatten(t) for t in tensors]


def test_fedavg_of_factors_is_not_the_average_of_products():
    layout, vecs = _vectors("factors", [D1, D2])
    a, b = agg.aggregate("factors", layout, vecs, [1, 1], r=1)[P]
    assert torch.equal(a, torch.tensor([[0.5, 0.5]])) and torch.equal(b, torch.tensor([[0.5], [0.5]]))
    # mean(B) @ mean(A) = 0.25 everywhere; the mean of the products is diag(0.5, 0.5)
    assert torch.allclose(b @ a, torch.full((2, 2), 0.25))
    mean_product = (D1[P][1] @ D1[P][0] + D2[P][1] @ D2[P][0]) / 2
    assert torch.equal(mean_product, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
    assert (b @ a - mean_product).abs().max() == 0.25


def test_product_is_exact_when_r_covers_the_devices_ranks_and_best_rank_r_otherwise():
    layout, vecs = _vectors("product", [D1, D2])
    a, b = agg.aggregate("product", layout, vecs, [1, 3], r=2)[P]
    assert a.shape == (2, 2) and b.shape == (2, 2)
    assert torch.allclose(b @ a, torch.tensor([[0.25, 0.0], [0.0, 0.75]]), atol=1e-6)  # weighted 1:3, exact
    a1, b1 = agg.aggregate("product", layout, vecs, [1, 3], r=1)[P]
    assert a1.shape == (1, 2) and b1.shape == (2, 1)
    # Eckart-Young: the best rank-1 approximation keeps the larger singular value, the error is the smaller
    assert torch.allclose(b1 @ a1, torch.tensor([[0.0, 0.0], [0.0, 0.75]]), atol=1e-6)
    assert float(torch.linalg.matrix_norm(b1 @ a1 - torch.diag(torch.tensor([0.25, 0.75])), ord=2)) == pytest.approx(0.25)


def test_product_refactor_of_a_random_rank_8_sum():
    torch.manual_seed(0)
    devices = [_dev(torch.randn(4, 16).tolist(), torch.randn(12, 4).tolist()) for _ in range(2)]
    layout, vecs = _vectors("product", devices)
    a, b = agg.aggregate("product", layout, vecs, [2, 5], r=8)[P]
    want = (2 * devices[0][P][1] @ devices[0][P][0] + 5 * devices[1][P][1] @ devices[1][P][0]) / 7
    assert torch.allclose(b @ a, want, atol=1e-4)  # rank 4 + 4 <= 8: exact
    a4, b4 = agg.aggregate("product", layout, vecs, [2, 5], r=4)[P]
    assert (b4 @ a4 - want).abs().max() > 1e-2  # rank 4 cannot hold it


def test_latent_averages_latents_and_scales_then_takes_signs():
    lat1 = {f"{P}.lora_A": torch.tensor([[0.3, -0.1]]), f"{P}.lora_B": torch.tensor([[0.2], [-0.4]]),
            f"{P}.lora_A.scale": torch.tensor([0.2]), f"{P}.lora_B.scale": torch.tensor([0.3])}
    lat2 = {f"{P}.lora_A": torch.tensor([[-0.1, -0.3]]), f"{P}.lora_B": torch.tensor([[-0.6], [0.1]]),
            f"{P}.lora_A.scale": torch.tensor([0.4]), f"{P}.lora_B.scale": torch.tensor([0.1])}
    tensors = [agg.tensors_for("latent", {}, lat) for lat in (lat1, lat2)]
    layout = agg.Layout.of(tensors[0])
    a, b = agg.aggregate("latent", layout, [layout.flatten(t) for t in tensors], [3, 1], r=1)[P]
    # weights 3:1: mean latent A = [0.2, -0.15] -> signs (+, -); mean scale A = 0.25
    assert torch.equal(a, torch.tensor([[0.25, -0.25]]))
    # mean latent B = [0.0, -0.275] -> signs (+ (sign(0) = +1), -); mean scale B = 0.25
    assert torch.allclose(b, torch.tensor([[0.25], [-0.25]]))
    with pytest.raises(InvalidInput, match="latent"):
        agg.tensors_for("latent", D1)


def test_weighted_mean_and_the_sum_interface():
    v1, v2 = np.array([1, 2, 3], np.float32), np.array([5, 6, 7], np.float32)
    assert np.allclose(agg.weighted_mean([v1, v2], [1, 3]), [4, 5, 6])
    s = agg.PlainSum(3)
    for v, w in ((v2, 3), (v1, 1)):  # the order does not matter
        s.add(agg.weighted(v, w), w)
    total, weight = s.total()
    assert weight == 4 and np.allclose(total, [16, 20, 24]) and np.allclose(agg.finish(total, weight), [4, 5, 6])
    with pytest.raises(InvalidInput):
        s.add(np.zeros(2, np.float32), 1)
    with pytest.raises(InvalidInput):
        agg.weighted(v1, 0)
    with pytest.raises(InvalidInput):
        agg.finish(np.zeros(3), 0.0)


def test_layout_roundtrip_and_mismatch():
    t = agg.tensors_for("factors", D1)
    layout = agg.Layout.of(t)
    assert layout.dim == 4 and agg.Layout.from_json(layout.to_json()) == layout
    back = layout.unflatten(layout.flatten(t))
    assert all(torch.equal(back[k], t[k]) for k in t)
    with pytest.raises(InvalidInput):
        layout.unflatten(np.zeros(5, np.float32))
    with pytest.raises(InvalidInput):
        layout.flatten({**t, "x": torch.zeros(1)})
    other = agg.Layout.of(agg.tensors_for("factors", _dev([[1.0, 0.0, 0.0]], [[1.0], [0.0]])))
    assert other.sha256 != layout.sha256


def test_merged_factors_become_the_one_bit_artifact():
    from ownlm.bitdelta.quant import dequantise

    layout, vecs = _vectors("factors", [D1, D2])
    factors = agg.aggregate("factors", layout, vecs, [1, 1], r=1)
    delta = agg.to_delta(factors, r=1, alpha=2, base_sha256="00" * 32)
    assert delta.mode == "lora1" and delta.lora_r == 1 and delta.bits == 1
    qa = delta.quantised[f"{P}.lora_A"]
    assert torch.allclose(dequantise(qa), torch.tensor([[0.5, 0.5]]))  # signs + mean |x|
    with pytest.raises(InvalidInput):
        agg.check_method("median")
