"""MMDiT (Esser et al. 2024, arXiv:2403.03206): joint attention against single-stream attention and an explicit
softmax, the learned null under joint attention, zero output at init, shapes in 1D / 2D / 3D, preset sizes, and
(when diffusers is installed) the parameter count against diffusers' SD3Transformer2DModel.
"""

import math

import pytest
import torch
from einops import rearrange

import models
import models as M

B, D, HEADS, LX, LC = 3, 32, 4, 5, 3
LENGTHS = torch.tensor([3, 1, 2])  # valid text tokens per sample


def perturb(module, scale=0.1):
    """Move every weight off its init (zero adaLN, unit RMSNorm scales) so no test passes by symmetry."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def text_mask():
    return torch.arange(LC) < LENGTHS[:, None]  # (B, LC), True = a real token


def test_joint_attention_with_shared_weights_is_attention_over_the_concatenation():
    torch.manual_seed(0)
    attn = perturb(models.Attention(D, HEADS, qk_norm=True))
    joint = M.JointAttention(D, HEADS)
    weights = attn.state_dict()  # q, kv (k and v in one Linear), q_norm, k_norm, proj
    joint.load_state_dict(weights | {f"context_{k}": v for k, v in weights.items()})
    x, c, mask = torch.randn(B, LX, D), torch.randn(B, LC, D), text_mask()
    ref = attn(torch.cat([x, c], dim=1), mask=torch.cat([torch.ones(B, LX, dtype=torch.bool), mask], dim=1))
    x_out, c_out = joint(x, c, mask)
    torch.testing.assert_close(x_out, ref[:, :LX])
    torch.testing.assert_close(c_out, ref[:, LX:])
    # no text stream: plain self-attention with the image stream's weights
    image_only = M.JointAttention(D, HEADS, context=False)
    image_only.load_state_dict(weights)
    torch.testing.assert_close(image_only(x)[0], attn(x))


def reference_joint_attention(joint, x, c, mask):
    """softmax(q k^T / sqrt(d)) v over [x; c], with q, k, v computed stream by stream with each stream's weights."""

    def qkv(tokens, q, kv, q_norm, k_norm):
        k, v = kv(tokens).chunk(2, dim=-1)
        split = lambda u: rearrange(u, "b l (h d) -> b h l d", h=HEADS)
        return q_norm(split(q(tokens))), k_norm(split(k)), split(v)

    qx, kx, vx = qkv(x, joint.q, joint.kv, joint.q_norm, joint.k_norm)
    qc, kc, vc = qkv(c, joint.context_q, joint.context_kv, joint.context_q_norm, joint.context_k_norm)
    q, k, v = torch.cat([qx, qc], 2), torch.cat([kx, kc], 2), torch.cat([vx, vc], 2)  # (B, heads, LX + LC, d)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D // HEADS)
    keys = torch.cat([torch.ones(B, LX, dtype=torch.bool), mask], dim=1)
    out = logits.masked_fill(~keys[:, None, None], -math.inf).softmax(-1) @ v
    out = rearrange(out, "b h l d -> b l (h d)")
    return joint.proj(out[:, :LX]), joint.context_proj(out[:, LX:])


def test_joint_attention_with_separate_weights_matches_explicit_softmax_and_ignores_padding():
    torch.manual_seed(0)
    joint = perturb(M.JointAttention(D, HEADS))
    x, c, mask = torch.randn(B, LX, D), torch.randn(B, LC, D), text_mask()
    x_out, c_out = joint(x, c, mask)
    x_ref, c_ref = reference_joint_attention(joint, x, c, mask)
    torch.testing.assert_close(x_out, x_ref)
    torch.testing.assert_close(c_out, c_ref)
    padded = torch.where(mask[..., None], c, 100 * torch.randn_like(c))  # new values for the padded tokens only
    x_pad, c_pad = joint(x, padded, mask)
    torch.testing.assert_close(x_pad, x_out)
    torch.testing.assert_close(c_pad[mask], c_out[mask])
    # the pre-only text stream (last block) supplies the same keys and values, and returns no text output
    pre_only = M.JointAttention(D, HEADS, context_out=False)
    pre_only.load_state_dict({k: v for k, v in joint.state_dict().items() if k in pre_only.state_dict()})
    x_pre, c_pre = pre_only(x, c, mask)
    torch.testing.assert_close(x_pre, x_out)
    assert c_pre is None


def conditioned_model():
    """A tiny perturbed 2D MMDiT with vector + context conditioning (context_dim 6), and x, t, a padded cond."""
    torch.manual_seed(0)
    model = perturb(M.MMDiT(**M.MMDiT.PRESETS["tiny"], in_channels=3, vector_dim=5, context_dim=6), 0.05).eval()
    cond = {"context": torch.randn(B, LC, 6), "context_mask": text_mask(), "vector": torch.randn(B, 5)}
    return model, torch.randn(B, 3, 8, 8), torch.rand(B), cond


def test_dropping_the_text_stream_is_the_learned_null():
    model, x, t, cond = conditioned_model()
    null = model(x, t)  # one null text token, null vector
    all_dropped = model(x, t, cond | {"drop": torch.ones(B, dtype=torch.bool)})
    torch.testing.assert_close(all_dropped, null, atol=1e-5, rtol=1e-5)
    full = model(x, t, cond)
    one_dropped = model(x, t, cond | {"drop": torch.tensor([False, True, False])})
    torch.testing.assert_close(one_dropped[1], null[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_dropped[[0, 2]], full[[0, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[1], null[1], atol=1e-4)
    # why the mask is needed: LC valid copies of the null token weigh LC times as much as one in joint attention
    copies = model.cond_embed.context_null.detach().expand(B, LC, -1)
    assert not torch.allclose(model(x, t, {"context": copies}), null, atol=1e-4)
    torch.testing.assert_close(model(x, t, {"context": copies[:, :1]}), null)


@pytest.mark.parametrize(
    "dims,shape,patch", [(1, (B, 4, 32), 8), (2, (B, 3, 8, 12), 2), (3, (B, 2, 4, 4, 8), (1, 2, 2))]
)
@pytest.mark.parametrize("context_dim", [0, 6])
def test_shapes_and_zero_at_init(dims, shape, patch, context_dim):
    torch.manual_seed(0)
    model = M.MMDiT(**M.MMDiT.PRESETS["tiny"], dims=dims, in_channels=shape[1], patch=patch, context_dim=context_dim)
    cond = {"context": torch.randn(B, 2, 6)} if context_dim else None
    out = model(torch.randn(shape), torch.rand(B), cond)
    assert out.shape == shape and out.abs().max() == 0  # adaLN-Zero final layer
    x, c, y = torch.randn(B, 7, 64), torch.randn(B, 2, 64), torch.randn(B, 64)
    x_out, c_out = model.blocks[0](x, c if context_dim else None, y)  # zero gates: the block is the identity
    torch.testing.assert_close(x_out, x)
    if context_dim:
        torch.testing.assert_close(c_out, c)
    # the last block's text stream is pre-only; without a context there is no text stream at all
    has_text = [block.context_kv is not None for block in (b.attn for b in model.blocks)]
    assert has_text == [context_dim > 0] * len(model.blocks)
    assert model.blocks[-1].context_mlp is None and model.blocks[-1].attn.context_proj is None


def test_bad_inputs_raise():
    model = M.MMDiT(**M.MMDiT.PRESETS["tiny"])
    with pytest.raises(ValueError, match="sides divisible by patch"):
        model(torch.randn(B, 3, 9, 8), torch.rand(B))
    with pytest.raises(ValueError, match=r"dims=2"):
        model(torch.randn(B, 3, 8), torch.rand(B))
    with pytest.raises(ValueError, match="one size per axis"):
        M.MMDiT(**M.MMDiT.PRESETS["tiny"], dims=3, patch=(2, 2))


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_preset_sizes():
    assert 31e6 < count(M.MMDiT(**M.MMDiT.PRESETS["S"])) < 34e6  # image stream only: DiT-S (32.5M) + qk-norm
    assert 60e6 < count(M.MMDiT(**M.MMDiT.PRESETS["S"], context_dim=384, vector_dim=384)) < 66e6  # two streams
    with torch.device("meta"):  # no memory for 2B parameters
        medium = count(M.MMDiT(**M.MMDiT.PRESETS["sd3.5-medium"]))
    # SD3.5 medium has 2.5B; the rest is its 384 x 384 learned position table and the dual attention of blocks 0-12
    assert 1.9e9 < medium < 2.2e9


def test_parameter_count_matches_diffusers_sd3():
    """Our MMDiT-S/4 with a caption stream against the SD3 transformer that `bench.py models` compares it with."""
    pytest.importorskip("diffusers")
    import bench

    ours = count(M.MMDiT(**M.MMDiT.PRESETS["S"] | {"patch": 4}, context_dim=384, vector_dim=384))
    theirs = count(bench.diffusers_reference("diffusers_sd3", 96)[1])
    print(f"MMDiT-S {ours:,} parameters, diffusers SD3Transformer2DModel at the same size {theirs:,}")
    # diffusers keeps the last block's unused text query projection and its norm; we have two learned nulls
    assert abs(ours - theirs) < 0.01 * theirs
