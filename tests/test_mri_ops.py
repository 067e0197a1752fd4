"""train_mri.py exact space inverses, Haar properties, ScoreAug, RANO-BM components, region errors,
PSNR / SSIM / MS-SSIM against pytorch_msssim, NIfTI round trips and montages."""

import math

import nibabel as nib
import numpy as np
import pytest
import pytorch_msssim
import torch

import train_mri as mri_ops


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- spaces


@pytest.mark.parametrize("space", ["pixel", "s2d", "wavelet"])
@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (2, 2, 4, 6, 8)])
def test_round_trip_exact(space, shape):
    x = _rand(*shape)
    dims = len(shape) - 2
    stats = [0.5 + 0.1 * k for k in range(2**dims)] if space == "wavelet" else None
    z = mri_ops.to_space(x, space, stats)
    if space != "pixel":
        assert z.shape == (shape[0], shape[1] * 2**dims, *(s // 2 for s in shape[2:]))
    assert torch.allclose(mri_ops.from_space(z, space, stats), x, atol=1e-6)


def test_s2d_matches_pixel_unshuffle():
    x = _rand(2, 3, 8, 8)
    assert torch.equal(mri_ops.to_space(x, "s2d"), torch.nn.functional.pixel_unshuffle(x, 2))


@pytest.mark.parametrize("dims", [2, 3])
def test_haar_constant_only_ll_and_energy(dims):
    c = 2
    x = torch.full((1, c) + (4,) * dims, 0.7)
    z = mri_ops.to_space(x, "wavelet")
    ll = 0.7 * 2 ** (dims / 2)  # orthonormal: the block sum / sqrt(2^dims)
    assert torch.allclose(z[:, :c], torch.full_like(z[:, :c], ll), atol=1e-6)
    assert z[:, c:].abs().max() < 1e-6
    y = _rand(3, c, *(6,) * dims)
    assert torch.allclose(mri_ops.to_space(y, "wavelet").pow(2).sum(), y.pow(2).sum(), rtol=1e-5)


def test_haar_bands_and_stats():
    # a signal varying only along W: all its detail energy is in LH (high-pass on the last axis)
    x = torch.tensor([1.0, -1.0] * 4).expand(1, 1, 8, 8).contiguous()
    z = mri_ops.to_space(x, "wavelet")
    assert z[:, 1].abs().min() > 1.9 and z[:, [0, 2, 3]].abs().max() < 1e-6
    y = torch.cat([_rand(64, 1, 8, 8, seed=1) * 0.5, _rand(64, 1, 8, 8, seed=2) * 0.1])
    stats = mri_ops.wavelet_stats(y, batch=20)
    z = mri_ops.to_space(y, "wavelet", stats)
    assert len(stats) == 4 and torch.allclose(z.std((0, 2, 3), unbiased=False), torch.ones(4), atol=1e-4)
    with pytest.raises(SystemExit, match="needs even sides"):
        mri_ops.to_space(_rand(1, 1, 7, 8), "wavelet")


# ---------------------------------------------------------------- ScoreAug


@pytest.mark.parametrize("dims", [2, 3])
def test_score_aug_same_transform_and_rot90_inverse(dims):
    x = _rand(64, 2, *(8,) * dims)
    target = 3 * x + 1  # an affine pointwise map commutes with every transform except cutout's zeroing
    xa, ta, omega = mri_ops.score_aug(x, target, torch.Generator().manual_seed(0), dims, p=1.0)
    assert omega.shape == (64, mri_ops.omega_dim())
    kinds = omega[:, :5].argmax(1)
    assert set(kinds.tolist()) == {1, 2, 3, 4}  # p=1: never identity, every other kind drawn
    for i in range(64):
        if kinds[i] == 4:  # cutout: zero in both, elsewhere the pointwise map holds
            hole = (xa[i] == 0) & (ta[i] == 0)
            assert hole.sum() == 2 * 2**dims and torch.allclose(ta[i][~hole], 3 * xa[i][~hole] + 1)
        else:
            assert torch.allclose(ta[i], 3 * xa[i] + 1)
        if kinds[i] == 1:
            k = round(omega[i, 5].item() * 3)
            assert torch.equal(torch.rot90(xa[i], -k, dims=(-2, -1)), x[i])
        if kinds[i] == 2:
            axis = omega[i, 6:9].argmax().item() - (3 - dims)  # per-axis slots are aligned to the last axis
            assert torch.equal(torch.flip(xa[i], dims=(1 + axis,)), x[i])


def test_score_aug_omega_distinct_and_identity():
    x = _rand(1, 1, 8, 8).expand(200, -1, -1, -1)  # one image: the output depends on the transform alone
    xa, ta, omega = mri_ops.score_aug(x, x.clone(), torch.Generator().manual_seed(1), 2, p=0.5)
    identity = omega[:, 0] == 1
    assert torch.equal(xa[identity], x[identity]) and 60 < identity.sum() < 140
    assert (omega[identity, 1:] == 0).all()
    # omega determines the transform: equal omegas gave equal outputs (different outputs, different omegas)
    for i in range(200):
        same = (omega == omega[i]).all(1)
        assert torch.equal(xa[same], xa[i].expand_as(xa[same]))
    assert len({tuple(o) for o in omega.tolist()}) > 20
    assert torch.equal(xa, ta)
    again = mri_ops.score_aug(x, x.clone(), torch.Generator().manual_seed(1), 2, p=0.5)
    assert torch.equal(again[2], omega)  # the generator alone decides


def test_score_aug_nonsquare_rot90_keeps_shape():
    x = _rand(32, 1, 8, 12)
    xa, _, omega = mri_ops.score_aug(x, x, torch.Generator().manual_seed(2), 2, p=1.0)
    assert xa.shape == x.shape
    assert torch.allclose(omega[omega[:, 1] == 1, 5], torch.tensor(2 / 3))


# ---------------------------------------------------------------- RANO-BM components and region errors


def _ball(shape, spacing, centre_mm, diameter_mm):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= (diameter_mm / 2) ** 2


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.9, 0.9)])
def test_components_rano_classes(spacing):
    shape = tuple(round(120 / s) for s in spacing)
    mask = np.zeros(shape, bool)
    expected = {8: "tiny", 15: "small", 25: "medium", 40: "large"}
    centres = {8: (20, 20, 20), 15: (20, 60, 90), 25: (70, 30, 60), 40: (75, 80, 90)}
    for d, c in centres.items():
        mask |= _ball(shape, spacing, c, d)
    found = mri_ops.components(mask, spacing)
    assert len(found) == 4
    for comp in found:
        d = min(expected, key=lambda e: abs(e - comp["feret_mm"]))
        assert abs(comp["feret_mm"] - d) <= max(spacing) + 0.5
        assert comp["rano"] == expected[d]


def test_components_2d_connectivity_and_min_area():
    mask = np.zeros((40, 40), bool)
    mask[5, 5] = mask[6, 6] = mask[7, 7] = mask[8, 8] = mask[9, 9] = True  # diagonal: one 8-connected component
    mask[20:24, 20] = True  # 4 voxels < min_area
    found = mri_ops.components(mask, (3.0, 0.5, 0.5))  # 2D uses the last two spacings
    assert len(found) == 1 and found[0]["voxels"] == 5
    assert math.isclose(found[0]["feret_mm"], 4 * 0.5 * math.sqrt(2), rel_tol=1e-9)
    assert mri_ops.rano_class(9.99) == "tiny" and mri_ops.rano_class(10) == "small"
    assert mri_ops.rano_class(29.9) == "medium" and mri_ops.rano_class(30) == "large"


def test_region_errors():
    shape, spacing = (40, 60, 60), (1.0, 1.0, 1.0)
    mask = _ball(shape, spacing, (20, 15, 15), 8) | _ball(shape, spacing, (20, 40, 40), 25)
    real = np.zeros(shape, np.float32)
    pred = np.where(_ball(shape, spacing, (20, 15, 15), 8), 0.5, 0.0) + np.where(
        _ball(shape, spacing, (20, 40, 40), 25), 0.2, 0.0
    )
    pred = pred + 0.01
    out = mri_ops.region_errors(torch.from_numpy(pred), real, mask, spacing)
    assert math.isclose(out["mae_tiny"], 0.51, rel_tol=1e-6) and math.isclose(out["mae_medium"], 0.21, rel_tol=1e-6)
    assert math.isclose(out["mae_outside"], 0.01, rel_tol=1e-6)
    assert math.isnan(out["mae_small"]) and out["n_small"] == 0 and out["n_large"] == 0
    assert out["n_tiny"] + out["n_medium"] == out["n_tumour"] == mask.sum()
    assert out["n_outside"] == mask.size - mask.sum()


# ---------------------------------------------------------------- PSNR / SSIM / MS-SSIM


def test_psnr():
    a = torch.zeros(2, 1, 8, 8)
    b = a.clone()
    b[0] += 0.2  # MSE 0.04 at range 2: 10 log10(4 / 0.04) = 20 dB
    p = mri_ops.psnr(a, b)
    assert p.shape == (2,) and math.isclose(p[0].item(), 20.0, rel_tol=1e-5) and p[1] > 100


@pytest.mark.parametrize("side,win", [(192, 11), (128, 7)])
def test_ms_ssim_matches_pytorch_msssim(side, win):
    a = _rand(2, 1, side, side, seed=3)
    b = (a + 0.3 * _rand(2, 1, side, side, seed=4)).clamp(-1, 1)
    assert mri_ops.ms_ssim_scales(side) == (win, pytest.approx([0.0448, 0.2856, 0.3001, 0.2363, 0.1333]))
    ours = mri_ops.ms_ssim(a, b)
    ref = pytorch_msssim.ms_ssim(a, b, data_range=2.0, size_average=False, win_size=win)
    assert torch.allclose(ours, ref, atol=1e-5)
    s = mri_ops.ssim(a, b)
    assert torch.allclose(s, pytorch_msssim.ssim(a, b, data_range=2.0, size_average=False), atol=1e-6)


def test_ms_ssim_small_and_3d():
    assert mri_ops.ms_ssim_scales(64)[0] == 7 and len(mri_ops.ms_ssim_scales(64)[1]) == 4
    win, weights = mri_ops.ms_ssim_scales(32)
    assert win == 7 and len(weights) == 3 and math.isclose(sum(weights), 1.0)
    for shape in [(2, 1, 32, 32), (2, 1, 16, 24, 24)]:
        a = _rand(*shape, seed=5)
        noisy = (a + 0.5 * _rand(*shape, seed=6)).clamp(-1, 1)
        same, worse = mri_ops.ms_ssim(a, a), mri_ops.ms_ssim(a, noisy)
        assert torch.allclose(same, torch.ones(2), atol=1e-5) and (worse < 0.9).all()
        assert torch.allclose(mri_ops.ssim(a, a), torch.ones(2), atol=1e-5) and (mri_ops.ssim(a, noisy) < 0.9).all()


# ---------------------------------------------------------------- NIfTI and montage


def test_nifti_round_trip(tmp_path):
    vol = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    affine = np.diag([0.9, 1.1, 2.5, 1.0])
    affine[:3, 3] = [-10, 20, 5]
    path = str(tmp_path / "out" / "v.nii.gz")
    mri_ops.write_nifti(path, vol, affine)
    back, aff = mri_ops.read_nifti(path)
    assert np.array_equal(back, vol) and np.allclose(aff, affine)
    assert nib.load(path).shape == (7, 6, 5)  # on disk (x, y, z) = (W, H, D)
    with pytest.raises(SystemExit, match="not canonical RAS"):
        mri_ops.write_nifti(path, vol, np.diag([-1.0, 1, 1, 1]))


def test_read_nifti_reorients_and_rejects(tmp_path):
    data = np.random.default_rng(1).random((7, 6, 5)).astype(np.float32)  # (x, y, z)
    lpi = np.array([[-1.0, 0, 0, 6], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # x stored right-to-left
    nib.save(nib.Nifti1Image(data[::-1].copy(), lpi), str(tmp_path / "f.nii.gz"))
    back, aff = mri_ops.read_nifti(str(tmp_path / "f.nii.gz"))
    assert np.array_equal(back, data.transpose(2, 1, 0)) and np.allclose(aff, np.eye(4))
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(SystemExit, match="bad.nii.gz"):
        mri_ops.read_nifti(str(tmp_path / "bad.nii.gz"))


def test_montage():
    vol = np.zeros((32, 10, 12), np.float32)
    vol[np.arange(32)] = np.arange(32)[:, None, None]  # slice i has value i
    img = mri_ops.montage(vol, n=4, value_range=(0, 31))
    assert img.dtype == np.uint8 and img.shape == (2 * 12 + 2, 2 * 14 + 2, 3)
    # slices 4, 12, 20, 28 (centres of 4 slabs of 8)
    assert img[2, 2, 0] == round(4 / 31 * 255) and img[2 + 12, 2 + 14, 0] == round(28 / 31 * 255)
    two = mri_ops.montage(np.stack([vol, vol]), n=4)
    assert two.shape == (2 * 12 + 2, 4 * 14 + 2, 3)
