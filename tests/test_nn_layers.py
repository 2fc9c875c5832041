"""Layers, radial bases, cutoffs and SO(3) helpers of spkserve.nn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spkserve.nn import so3
from spkserve.nn.cutoff import CosineCutoff, MollifierCutoff, build_cutoff
from spkserve.nn.layers import Dense, activation, build_mlp, shifted_softplus
from spkserve.nn.radial import BesselRBF, GaussianRBF, GaussianRBFCentered, build_rbf

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("cls", [CosineCutoff, MollifierCutoff])
def test_cutoff_is_one_at_origin_and_zero_beyond_smoothly(cls):
    rc = 3.0
    f = cls(rc)
    d = torch.linspace(0.0, 5.0, 5001, dtype=torch.float64, requires_grad=True)
    y = f(d)
    (g,) = torch.autograd.grad(y.sum(), d)
    assert y[0].item() == pytest.approx(1.0)
    beyond = d >= rc
    assert torch.all(y[beyond] == 0) and torch.all(g[beyond] == 0)
    assert torch.isfinite(g).all()
    # approaches zero continuously with vanishing slope
    near = (d > rc - 0.01) & (d < rc)
    assert y[near].abs().max() < 1e-3
    assert g[near].abs().max() < 0.05
    # monotone decreasing inside
    inside = ~beyond
    assert torch.all(torch.diff(y[inside]) <= 1e-12)


def test_unknown_cutoff_and_activation_are_named():
    with pytest.raises(ValueError, match="unknown cutoff function 'hard'"):
        build_cutoff("hard", 5.0)
    with pytest.raises(ValueError, match="unknown activation 'sigmoidal'"):
        activation("sigmoidal")
    with pytest.raises(ValueError, match="unknown radial basis"):
        build_rbf("fourier", 10, 5.0)


def test_shifted_softplus_and_dense():
    x = torch.linspace(-5, 5, 11, dtype=torch.float64)
    assert shifted_softplus(torch.zeros(1)).item() == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(shifted_softplus(x), torch.log(0.5 * torch.exp(x) + 0.5))
    layer = Dense(4, 3, "silu")
    z = torch.randn(7, 4)
    assert torch.allclose(layer(z), torch.nn.functional.silu(z @ layer.weight.T + layer.bias))
    mlp = build_mlp(16, 1, n_layers=3)
    assert [m.out_features for m in mlp] == [8, 4, 1]
    with pytest.raises(ValueError, match="n_hidden lists"):
        build_mlp(16, 1, n_hidden=[4], n_layers=3)


def test_radial_bases():
    d = torch.tensor([1e-9, 0.5, 2.0, 4.9], dtype=torch.float64)
    g = GaussianRBF(20, 5.0)(d)
    assert g.shape == (4, 20)
    centres = torch.linspace(0.0, 5.0, 20, dtype=torch.float64)
    assert int(g[2].argmax()) == int((centres - 2.0).abs().argmin())
    assert g[2].max() >= np.exp(-1.0 / 8.0)  # nearest centre within half a spacing
    c = GaussianRBFCentered(8, 5.0)(d)
    assert torch.all(torch.diff(c[1]) > 0)  # wider Gaussians give larger values at fixed d
    b = BesselRBF(6, 5.0)(d)
    n = torch.arange(1, 7, dtype=torch.float64)
    assert torch.allclose(b[1], torch.sin(n * torch.pi * 0.5 / 5.0) / 0.5)
    assert torch.allclose(b[0], n * torch.pi / 5.0, rtol=1e-6)  # limit d -> 0


def _rotation(seed: int) -> np.ndarray:
    return so3._random_rotations(1, np.random.default_rng(seed))[0]


@pytest.mark.parametrize("l", [0, 1, 2])
def test_real_harmonics_form_orthogonal_representations(l):
    R1, R2 = _rotation(1), _rotation(2)
    D1, D2, D12 = so3.wigner_d(R1, l), so3.wigner_d(R2, l), so3.wigner_d(R1 @ R2, l)
    assert np.allclose(D1 @ D1.T, np.eye(2 * l + 1), atol=1e-10)
    assert np.allclose(D1 @ D2, D12, atol=1e-10)  # homomorphism
    u = np.random.default_rng(0).normal(size=(5, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    Y = so3.real_spherical_harmonics(torch.from_numpy(u), 2).numpy()
    assert np.allclose(Y[:, l * l : (l + 1) ** 2].__pow__(2).sum(1), 2 * l + 1)


@pytest.mark.parametrize("path", so3.coupling_paths(2, parity_invariant=False))
def test_clebsch_gordan_couplings_are_equivariant(path):
    l1, l2, l3 = path
    C = so3.clebsch_gordan(l1, l2, l3)
    assert np.linalg.norm(C) == pytest.approx(1.0)
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=2 * l1 + 1), rng.normal(size=2 * l2 + 1)
    R = _rotation(11)
    D1, D2, D3 = (so3.wigner_d(R, l) for l in path)
    lhs = np.einsum("abc,a,b->c", C, D1 @ a, D2 @ b)
    rhs = D3 @ np.einsum("abc,a,b->c", C, a, b)
    assert np.allclose(lhs, rhs, atol=1e-9)


def test_clebsch_gordan_known_cases():
    # l1 = l2, l3 = 0 is the dot product; (1,1,1) is the cross product (antisymmetric)
    assert np.allclose(so3.clebsch_gordan(1, 1, 0)[:, :, 0], np.eye(3) / np.sqrt(3))
    C111 = so3.clebsch_gordan(1, 1, 1)
    assert np.allclose(C111, -C111.transpose(1, 0, 2))
    assert so3.clebsch_gordan(2, 2, 1).any()
    assert (1, 1, 1) not in so3.coupling_paths(2, parity_invariant=True)
    assert not so3.clebsch_gordan(0, 1, 2).any()  # triangle rule
