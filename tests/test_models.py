"""The model contract for the image backbones (UNet, DiT, U-ViT) at their tiny presets: output shape, finite values,
a gradient for every parameter, zero output at init where the paper says so, and 1D / 2D / 3D inputs where claimed.
"""

import pytest
import torch

import models

B = 2
CASES = [  # (name, keyword arguments, input shape, cond kind)
    ("unet", dict(in_channels=3), (B, 3, 16, 16), None),
    ("unet", dict(in_channels=3, num_classes=10), (B, 3, 16, 16), "class"),
    ("unet", dict(in_channels=3, context_dim=12, film=True), (B, 3, 16, 16), "context"),
    ("unet", dict(in_channels=2, out_channels=1, dims=3), (B, 2, 8, 8, 8), None),
    ("unet", dict(in_channels=4, dims=1, num_classes=3), (B, 4, 32), "class"),
    ("dit", dict(in_channels=3, num_classes=10), (B, 3, 16, 16), "class"),
    ("dit", dict(in_channels=3, context_dim=12), (B, 3, 16, 16), "context"),
    ("dit", dict(in_channels=1, patch=(1, 8)), (B, 1, 4, 64), None),  # a 1 x T time series as an image
    ("dit", dict(in_channels=20, dims=1, patch=8), (B, 20, 64), None),
    ("dit", dict(in_channels=1, dims=3, patch=2), (B, 1, 8, 8, 8), None),
    ("uvit", dict(in_channels=3, input_size=16, patch=4, num_classes=10), (B, 3, 16, 16), "class"),
    ("uvit", dict(in_channels=3, input_size=16, patch=4, context_dim=12, context_len=3), (B, 3, 16, 16), "context"),
    ("uvit", dict(in_channels=5, dims=1, input_size=64, patch=8), (B, 5, 64), None),
]
ZERO_AT_INIT = {"unet", "dit"}  # zero-initialised output conv (UNet) and adaLN-Zero final layer (DiT)


def make_cond(kind, kw):
    if kind == "class":
        return torch.tensor([0, kw["num_classes"]])  # a class and the null class
    if kind == "context":
        return torch.randn(B, kw.get("context_len", 2), kw["context_dim"])
    return None


def ids(case):
    return f"{case[0]}-{'x'.join(map(str, case[2][1:]))}-{case[3]}"


@pytest.mark.parametrize("name,kw,shape,kind", CASES, ids=map(ids, CASES))
def test_contract(name, kw, shape, kind):
    torch.manual_seed(0)
    model = models.make_model(name, "tiny", **kw)
    x, t, cond = torch.randn(shape), torch.rand(B), make_cond(kind, kw)
    out = model(x, t, cond=cond)
    expected = (B, kw.get("out_channels") or kw["in_channels"], *shape[2:])
    assert out.shape == expected and torch.isfinite(out).all()
    if name in ZERO_AT_INIT:
        assert out.abs().max() == 0, "the paper's zero-initialised output layer should give exactly zero"
    # zero-initialised layers block gradients at init; perturb every weight so that each one must be reached
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model(x, t, cond=cond).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", ["unet", "dit", "uvit"])
def test_condition_changes_output(name):
    """Conditioning is really wired in: another class or another context changes the prediction."""
    torch.manual_seed(0)
    kw = dict(in_channels=3, num_classes=10) | ({"input_size": 16, "patch": 4} if name == "uvit" else {})
    model = models.make_model(name, "tiny", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1), torch.full((2,), 0.5)
    out = model(x, t, cond=torch.tensor([1, 10]))
    assert not torch.allclose(out[0], out[1])
    ctx = models.make_model(name, "tiny", **(kw | {"num_classes": 0, "context_dim": 8}))
    with torch.no_grad():
        for p in ctx.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out = ctx(x, t, cond=torch.randn(2, 1, 8))
    assert not torch.allclose(out[0], out[1])
    assert sum(isinstance(m, models.Attention) and m.is_cross for m in ctx.modules()) > 0 or ctx.context_embed


def test_presets_and_errors():
    assert {"tiny", "S", "B", "L", "XL"} <= set(models.DiT.PRESETS)
    assert {"tiny", "small"} <= set(models.UViT.PRESETS)
    dit_s = models.make_model("dit", "S", patch=2)
    assert 32e6 < sum(p.numel() for p in dit_s.parameters()) < 34e6  # DiT-S/2: 33M in the paper's table 4
    with pytest.raises(ValueError, match="divisible"):
        models.make_model("unet", "tiny")(torch.randn(1, 3, 15, 15), torch.rand(1))
    with pytest.raises(ValueError, match="unconditional"):
        models.make_model("dit", "tiny")(torch.randn(1, 3, 8, 8), torch.rand(1), cond=torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown model"):
        models.make_model("unte")


def test_unpatchify_inverts_patchify():
    """unpatchify puts each token's values back where its patch came from (2D, non-square patches)."""
    x = torch.arange(2 * 3 * 4 * 16, dtype=torch.float32).reshape(2, 3, 4, 16)
    p = (2, 8)
    tokens = x.reshape(2, 3, 2, 2, 2, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 2 * 8 * 3)  # (B, L, p1 p2 C)
    assert torch.equal(models.unpatchify(tokens, (2, 2), p, 3), x)
