"""The model contract of models.py for every registry entry at its tiny preset: output shape, finite values, a
gradient for every parameter, zero output at init where the paper says so, on 1D / 2D / 3D inputs where claimed;
the conditioning contract (each condition is wired, "drop" is the learned null, masked context tokens are ignored,
misuse raises ValueError); the shared Attention against an explicit-softmax reference.
"""

import math

import pytest
import torch

import models

B = 3
ALL_CONDS = dict(num_classes=4, vector_dim=5, context_dim=6, concat_channels=2)  # every condition kind at once
CASES = {  # name -> [(keyword arguments, input shape)]: the cases each MODELS entry supports; a new entry needs a row
    "unet": [
        (dict(dims=1, in_channels=4), (B, 4, 32)),
        (dict(dims=2, in_channels=3, film=True), (B, 3, 16, 16)),
        (dict(dims=3, in_channels=2, out_channels=1), (B, 2, 8, 8, 8)),
    ],
    "dit": [
        (dict(dims=1, in_channels=5, patch=8), (B, 5, 64)),
        (dict(dims=2, in_channels=1, patch=(1, 8), qk_norm=True), (B, 1, 4, 64)),  # a 1 x T time series as an image
        (dict(dims=3, in_channels=1, patch=2), (B, 1, 8, 8, 8)),
    ],
    "uvit": [
        (dict(dims=1, in_channels=5, input_size=64, patch=8, context_len=3), (B, 5, 64)),
        (dict(dims=2, in_channels=3, input_size=16, patch=4, context_len=3, qk_norm=True), (B, 3, 16, 16)),
    ],
    "hdit": [
        (dict(dims=1, in_channels=4), (B, 4, 64)),
        (dict(dims=2, in_channels=3), (B, 3, 16, 16)),
        (dict(dims=2, in_channels=1, patch=(1, 8), merge=(1, 2)), (B, 1, 4, 128)),  # a 1 x T series as an image
        (dict(dims=3, in_channels=2, out_channels=1, kernel=3), (B, 2, 8, 8, 8)),
    ],
    "localmamba": [
        (dict(dims=1, in_channels=4), (B, 4, 64)),
        (dict(dims=2, in_channels=3), (B, 3, 16, 16)),
        (dict(dims=3, in_channels=2, out_channels=1), (B, 2, 8, 8, 8)),
    ],
    "mmdit": [
        (dict(dims=1, in_channels=4, patch=8), (B, 4, 64)),
        (dict(dims=2, in_channels=3, patch=2), (B, 3, 16, 16)),
        (dict(dims=3, in_channels=1, out_channels=2, patch=(1, 2, 2)), (B, 1, 4, 8, 8)),
    ],
    "arc": [(dict(n_tasks=5, grid=6), (B, 6, 6))],
}
ZERO_AT_INIT = {
    "unet",
    "dit",
    "hdit",
    "mmdit",
}  # zero-initialised output layer (UNet conv, DiT / MMDiT adaLN-Zero, HDiT)
IMAGE = ["unet", "dit", "uvit", "hdit", "localmamba", "mmdit"]  # the backbones that take the shared cond contract
DENOISERS = [name for name, cls in models.MODELS.items() if getattr(cls, "kind", "denoiser") == "denoiser"]
PARAMS = [(name, i) for name in DENOISERS for i in range(len(CASES.get(name, [None])))]  # autoencoders: own tests


def perturb(model):
    """Zero-initialised layers block gradients and hide conditioning at init; move every weight off zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def full_cond(shape, context_len=3):
    """class (one null id) + vector + context with padding in two samples + concat, for input shape (B, C, ...)."""
    L = context_len
    return {
        "class": torch.tensor([0, 4, 2]),  # 4 = num_classes = the null class
        "vector": torch.randn(B, 5),
        "context": torch.randn(B, L, 6),
        "context_mask": torch.arange(L) < torch.tensor([L, 1, 2])[:, None],  # samples 1 and 2 are padded
        "concat": torch.randn(B, 2, *shape[2:]),
    }


def arc_cond(G, self_cond):
    inp = torch.randint(0, 10, (B, G, G))
    inp[:, :, G - 2 :] = 10  # PAD outside a G x (G-2) input grid
    cond = dict(task=torch.randint(0, 5, (B,)), inp=inp, d4=torch.randint(0, 8, (B,)), shift=torch.randint(0, 9, (B,)))
    return cond | {"self_cond": torch.randn(B, G, G, 10) if self_cond else None}


def build(name, i):
    """[(model, conds, expected output shapes)], x, t for CASES[name][i]; the last cond of each reaches every
    parameter (it uses every condition and drops some samples, so the nulls are used too)."""
    kw, shape = CASES[name][i]
    if name == "arc":
        G = kw["grid"]
        x, t = torch.randint(0, 11, shape), torch.empty(B).uniform_(-20, 20)  # t: a log-SNR
        model = models.make_model(name, "tiny", **kw)
        return [(model, [arc_cond(G, False), arc_cond(G, True)], [(B, G, G, 10), (B, 2, G)])], x, t
    x, t = torch.randn(shape), torch.rand(B)
    out_shape = [(B, kw.get("out_channels", kw["in_channels"]), *shape[2:])]
    cond = full_cond(shape, kw.get("context_len", 3))
    conds = [None, cond["class"], cond, cond | {"drop": torch.tensor([False, True, False])}]
    conditioned = models.make_model(name, "tiny", **kw, **ALL_CONDS)
    return [(conditioned, conds, out_shape), (models.make_model(name, "tiny", **kw), [None], out_shape)], x, t


def outputs(model, x, t, cond):
    if isinstance(model, models.ArcDenoiser):
        return model(x, t, cond, return_size=True)
    return (model(x, t, cond),)


@pytest.mark.parametrize("name,i", PARAMS, ids=[f"{n}-{i}" for n, i in PARAMS])
def test_contract(name, i):
    assert name in CASES, f"models.MODELS has {name!r}: add its cases to CASES in this file"
    torch.manual_seed(0)
    runs, x, t = build(name, i)
    for model, conds, shapes in runs:
        for cond in conds:
            out = outputs(model, x, t, cond)
            assert [tuple(o.shape) for o in out] == shapes and all(torch.isfinite(o).all() for o in out)
            if name in ZERO_AT_INIT:
                assert out[0].abs().max() == 0, "the paper's zero-initialised output layer should give exactly zero"
        perturb(model)
        sum(o.square().mean() for o in outputs(model, x, t, conds[-1])).backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, f"parameters without gradient: {missing}"


def conditioned_2d(name):
    """The 2D case of `name` with every condition, perturbed, in eval mode (no dropout), and its x, t, cond."""
    torch.manual_seed(0)
    kw, shape = next(c for c in CASES[name] if c[0]["dims"] == 2)
    model = perturb(models.make_model(name, "tiny", **kw, **ALL_CONDS)).eval()
    return model, torch.randn(shape), torch.rand(B), full_cond(shape, kw.get("context_len", 3))


@pytest.mark.parametrize("name", IMAGE)
def test_drop_is_the_null(name):
    """A dropped sample gets exactly what no condition at all gives it; the others keep their conditions."""
    model, x, t, cond = conditioned_2d(name)
    null = model(x, t)
    dropped = model(x, t, cond | {"drop": torch.tensor([False, False, True])})  # sample 2 has 2 valid tokens of 3
    torch.testing.assert_close(dropped[2], null[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[:2], model(x, t, cond)[:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dropped[0], null[0], atol=1e-5)
    torch.testing.assert_close(model(x, t, {"drop": torch.ones(B, dtype=torch.bool)}), null)


@pytest.mark.parametrize("name", IMAGE)
def test_each_condition_changes_output(name):
    """Class, vector, context (a valid token) and concat are each really wired into the prediction."""
    model, x, t, cond = conditioned_2d(name)
    out = model(x, t, cond)
    context = cond["context"].clone()
    context[:, 0] += 1.0  # token 0 is valid in every sample
    changes = {
        "class": torch.tensor([1, 0, 3]),
        "vector": torch.randn(B, 5),
        "context": context,
        "concat": torch.randn_like(cond["concat"]),
    }
    for key, value in changes.items():
        changed = model(x, t, cond | {key: value})
        assert all(not torch.allclose(changed[b], out[b], atol=1e-6) for b in range(B)), f"{key} is not wired"
    assert any(isinstance(m, models.Attention) and m.is_cross for m in model.modules()) or model.context_embed


@pytest.mark.parametrize("name", IMAGE)
def test_masked_context_token_is_ignored(name):
    """Changing the values of padded context tokens leaves the prediction unchanged."""
    model, x, t, cond = conditioned_2d(name)
    context = torch.where(cond["context_mask"][..., None], cond["context"], 100 * torch.randn_like(cond["context"]))
    torch.testing.assert_close(model(x, t, cond | {"context": context}), model(x, t, cond), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,kw,cond,match",
    [
        ("unet", {}, {"label": torch.zeros(B, dtype=torch.long)}, "unknown cond key 'label'"),
        ("dit", {}, torch.tensor([0, 1, 2]), "built with num_classes=0"),
        ("unet", {"num_classes": 4}, {"vector": torch.randn(B, 5)}, "built with vector_dim=0"),
        ("uvit", {"num_classes": 4}, {"context": torch.randn(B, 1, 6)}, "built with context_dim=0"),
        ("dit", {"num_classes": 4}, {"concat": torch.randn(B, 2, 16, 16)}, "built with concat_channels=0"),
        ("dit", {"vector_dim": 5}, {"vector": torch.randn(B, 4)}, r"expected shape \(3, 5\), got \(3, 4\)"),
        (
            "uvit",
            {"context_dim": 6, "context_len": 3},
            {"context": torch.randn(B, 2, 6)},
            r"expected shape \(3, 3, 6\)",
        ),
        ("unet", {"context_dim": 6}, {"context": torch.randn(B, 2, 5)}, r"expected shape \(3, L, 6\), got \(3, 2, 5\)"),
        ("unet", {"num_classes": 4}, torch.zeros(B, 1, dtype=torch.long), r"expected shape \(3,\), got \(3, 1\)"),
        ("unet", {"num_classes": 4}, torch.randn(B, 1, 6), "integer class ids"),  # a context passed bare
        ("dit", {"num_classes": 4}, {"drop": torch.zeros(B)}, "bool"),
        (
            "dit",
            {"context_dim": 6},
            {"context_mask": torch.ones(B, 2, dtype=torch.bool)},
            "without cond\\['context'\\]",
        ),
    ],
)
def test_condition_errors(name, kw, cond, match):
    extra = {"input_size": 16, "patch": 4} if name == "uvit" else {}
    model = models.make_model(name, "tiny", in_channels=3, **kw, **extra)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(B, 3, 16, 16), torch.rand(B), cond)


def reference_attention(attn, x, source, allowed):
    """Explicit softmax(q k^T / sqrt(d)) v for one sample, x (L_q, D), source (L_kv, ·), allowed (L_q, L_kv)."""
    h = attn.heads
    q = attn.q_norm(attn.q(x).view(x.shape[0], h, -1).transpose(0, 1))  # (h, L_q, d)
    k, v = attn.kv(source).view(source.shape[0], 2, h, -1).permute(1, 2, 0, 3)  # (h, L_kv, d) each
    scores = (q @ attn.k_norm(k).transpose(1, 2)) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    return attn.proj((weights @ v).transpose(0, 1).reshape(x.shape))


@pytest.mark.parametrize("context_dim,qk_norm", [(0, False), (6, True)])
def test_attention_masks_match_reference(context_dim, qk_norm):
    """A (B, L_kv) key-padding mask equals attention over each sample's unpadded keys; a (1, L_q, L_kv) mask equals
    the explicit masked softmax; a query with no allowed key gives zero, not NaN."""
    torch.manual_seed(0)
    attn = perturb(models.Attention(8, 2, context_dim, qk_norm=qk_norm))
    x = torch.randn(B, 5, 8)
    context = torch.randn(B, 4, context_dim) if context_dim else None
    source = x if context is None else context
    keep = torch.arange(source.shape[1]) < torch.tensor([source.shape[1], 2, 1])[:, None]  # (B, L_kv)
    out = attn(x, context, keep)
    for b in range(B):
        unpadded = source[b, keep[b]]
        torch.testing.assert_close(out[b], reference_attention(attn, x[b], unpadded, torch.ones(5, len(unpadded)) > 0))
    allowed = torch.rand(1, 5, source.shape[1]) < 0.5
    allowed[0, :4, 0] = True
    allowed[0, 4] = False  # the last query may attend to nothing
    out = attn(x, context, allowed)
    for b in range(B):
        torch.testing.assert_close(out[b, :4], reference_attention(attn, x[b], source[b], allowed[0])[:4])
    assert torch.equal(out[:, 4], attn.proj.bias.expand(B, -1))  # zero attention output, then the projection's bias


def test_presets_and_errors():
    assert {"tiny", "S", "B", "L", "XL"} <= set(models.DiT.PRESETS)
    assert {"tiny", "small"} <= set(models.UViT.PRESETS)
    dit_s = models.make_model("dit", "S", patch=2)
    assert 32e6 < sum(p.numel() for p in dit_s.parameters()) < 34e6  # DiT-S/2: 33M in the paper's table 4
    with pytest.raises(ValueError, match="divisible"):
        models.make_model("unet", "tiny")(torch.randn(1, 3, 15, 15), torch.rand(1))
    with pytest.raises(ValueError, match="input_size"):
        models.make_model("uvit", "tiny", input_size=16)(torch.randn(1, 3, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="unknown model"):
        models.make_model("unte")
    with pytest.raises(ValueError, match="unknown size"):
        models.make_model("dit", "XXL")


def test_unpatchify_inverts_patchify():
    """unpatchify puts each token's values back where its patch came from (2D, non-square patches)."""
    x = torch.arange(2 * 3 * 4 * 16, dtype=torch.float32).reshape(2, 3, 4, 16)
    p = (2, 8)
    tokens = x.reshape(2, 3, 2, 2, 2, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 2 * 8 * 3)  # (B, L, p1 p2 C)
    assert torch.equal(models.unpatchify(tokens, (2, 2), p, 3), x)
