"""The autoencoders of models.py (KLVAE, VQVAE, DCAE), the PatchGAN discriminator and train_vae's GAN losses: shapes
in 1D / 2D / 3D at tiny and a gradient for every parameter; the KL term, the VQ straight-through gradient, the EMA
codebook update and the dead-code restart against hand computations on hand-made inputs; DC-AE's shortcuts against
pooling / pixel unshuffle / nearest upsampling; the adaptive GAN weight against its definition; errors on misuse.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import models
import train_vae

AUTOENCODERS = ["klvae", "vqvae", "dcae"]
SHAPES = {1: (2, 2, 16), 2: (2, 3, 8, 8), 3: (2, 1, 8, 8, 8)}  # the tiny presets downsample by 4


def perturb(model):
    """Zero-initialised attention outputs block the gradient of q / kv at init; move every weight off zero."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("name", AUTOENCODERS)
def test_shapes_and_gradients(name, dims):
    """encode -> (B, latent, *spatial / 4), decode and forward -> (B, out_channels, *spatial), the documented aux
    entries, finite values, and every parameter gets a gradient from the reconstruction (+ kl / vq_loss)."""
    torch.manual_seed(0)
    shape = SHAPES[dims]
    model = perturb(models.make_model(name, "tiny", dims=dims, in_channels=shape[1], out_channels=2))
    assert (model.dims, model.factor, model.latent_channels) == (dims, 4, 4)
    assert (model.in_channels, model.out_channels) == (shape[1], 2)
    x = torch.randn(shape)
    latent = (2, 4, *[s // 4 for s in shape[2:]])
    z = model.encode(x)
    assert tuple(z.shape) == latent
    assert tuple(model.decode(z).shape) == (2, 2, *shape[2:])
    x_hat, aux = model(x)
    assert tuple(x_hat.shape) == (2, 2, *shape[2:]) and torch.isfinite(x_hat).all()
    expected = {
        "klvae": {"kl": (2,), "mean": latent, "logvar": latent},
        "vqvae": {"vq_loss": (), "indices": (2, *latent[2:]), "perplexity": (), "usage": (), "dead": ()},
        "dcae": {},
    }[name]
    assert {k: tuple(v.shape) for k, v in aux.items()} == expected
    assert isinstance(model.last_layer, torch.nn.Parameter) and model.last_layer.shape[0] == 2
    loss = x_hat.square().mean() + sum(aux[k].mean() for k in ("kl", "vq_loss") if k in aux)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_presets():
    """tiny presets are tens of thousands of parameters; base is SD's AutoencoderKL shape: 83,653,863 parameters
    in diffusers less its two 1x1 quant convs (8 * 8 + 8 and 4 * 4 + 4), which KLVAE folds away."""
    for name in [*AUTOENCODERS, "patchgan"]:
        assert 1e4 < n_params(models.make_model(name, "tiny")) < 1e5, name
    with torch.device("meta"):
        base = models.make_model("klvae", "base")
        f32, f64 = models.make_model("dcae", "f32"), models.make_model("dcae", "f64")
    assert n_params(base) == 83_653_863 - 72 - 20 and base.factor == 8
    assert (f32.factor, f32.latent_channels, f64.factor, f64.latent_channels) == (32, 32, 64, 128)


def test_kl_against_hand_computation():
    """With the encoder's output conv set to a constant, mean and logvar are known: KL = 0.5 * sum over the
    latent of (mean^2 + var - 1 - logvar), logvar clamped to [-30, 20]; eval decodes the mean, training decodes
    mean + exp(logvar / 2) * eps with eps from the global RNG."""
    model = models.make_model("klvae", "tiny").eval()
    conv = model.encoder.conv_out
    x = torch.randn(2, 3, 8, 8)  # latent 2 x 2 positions
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([1.0, 0.0, -2.0, 0.5, 0.0, math.log(2.0), 3.0, -1.5]))  # 4 means, 4 logvars
    _, aux = model(x)
    per_position = (
        (1 + 1 - 1 - 0) + (0 + 2 - 1 - math.log(2)) + (4 + math.exp(3) - 1 - 3) + (0.25 + math.exp(-1.5) - 1 + 1.5)
    )
    torch.testing.assert_close(aux["kl"], torch.full((2,), 0.5 * per_position * 4))
    with torch.no_grad():
        conv.bias[4:] = torch.tensor([50.0, -50.0, 20.0, -30.0])
    assert aux["mean"][:, 0].eq(1.0).all()
    assert model(x)[1]["logvar"][0, :, 0, 0].tolist() == [20.0, -30.0, 20.0, -30.0]

    torch.manual_seed(0)
    model = perturb(models.make_model("klvae", "tiny"))
    x_hat, aux = model.eval()(x)
    mean, std = aux["mean"], torch.exp(0.5 * aux["logvar"])
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(aux["kl"], kl.flatten(1).sum(1))
    torch.testing.assert_close(x_hat, model.decode(mean))
    model.train()
    torch.manual_seed(1)
    x_hat, aux = model(x)
    torch.manual_seed(1)
    eps = torch.randn_like(aux["mean"])
    torch.testing.assert_close(x_hat, model.decode(aux["mean"] + torch.exp(0.5 * aux["logvar"]) * eps))


def test_vq_straight_through():
    """z_q is the nearest code (brute force); the gradient reaching z_e is the gradient at z_q (straight-through)
    plus the commitment term's 2 beta (z_e - e) / numel; vq_loss = beta mean((z_e - e)^2); eval does not update."""
    torch.manual_seed(0)
    vq = models.VectorQuantizerEMA(8, 3, beta=0.25).eval()
    before = vq.embedding.clone()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.randn(2, 3, 4, 4)
    z_q, aux = vq(z_e)
    z_q.retain_grad()
    flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(flat, vq.embedding).argmin(1)
    assert torch.equal(aux["indices"].flatten(), nearest)
    codes = vq.embedding[nearest].reshape(2, 4, 4, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, codes)
    torch.testing.assert_close(aux["vq_loss"], 0.25 * (z_e.detach() - codes).square().mean())
    (z_q * w).sum().backward(retain_graph=True)
    torch.testing.assert_close(z_e.grad, z_q.grad)
    torch.testing.assert_close(z_e.grad, w)
    z_e.grad = None
    ((z_q * w).sum() + aux["vq_loss"]).backward()
    torch.testing.assert_close(z_e.grad, w + 2 * 0.25 * (z_e.detach() - codes) / z_e.numel())
    assert torch.equal(vq.embedding, before)


def test_ema_update_against_formula():
    """One training-mode forward on a hand-made batch: N_k <- decay N_k + (1 - decay) n_k, m_k <- decay m_k +
    (1 - decay) (sum of the z_e assigned to k), e_k = m_k / Laplace-smoothed N_k; z_q uses the old codes; the
    perplexity and usage of the batch's code use."""
    K, decay, eps = 3, 0.9, 1e-5
    vq = models.VectorQuantizerEMA(K, 2, decay=decay, eps=eps, dead_threshold=0.0).train()
    old = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    N, m = [1.0, 2.0, 0.5], [[0.5, 0.5], [20.0, 1.0], [0.0, 5.0]]
    vq.embedding.copy_(old)
    vq.cluster_size.copy_(torch.tensor(N))
    vq.embed_sum.copy_(torch.tensor(m))
    vectors = [[1.0, 1.0], [-1.0, 0.0], [9.0, 1.0], [11.0, -1.0]]  # codes 0, 0, 1, 1; code 2 unused
    z_q, aux = vq(torch.tensor(vectors).T[None])  # (1, 2, 4): a 1D latent of 4 positions
    assert aux["indices"].tolist() == [[0, 0, 1, 1]]
    assert torch.equal(z_q, old[[0, 0, 1, 1]].T[None])
    n, sums = [2, 2, 0], [[0.0, 1.0], [20.0, 0.0], [0.0, 0.0]]
    N = [decay * N[k] + (1 - decay) * n[k] for k in range(K)]
    m = [[decay * m[k][d] + (1 - decay) * sums[k][d] for d in range(2)] for k in range(K)]
    total = sum(N)
    e = [[m[k][d] / ((N[k] + eps) / (total + K * eps) * total) for d in range(2)] for k in range(K)]
    torch.testing.assert_close(vq.cluster_size, torch.tensor(N))
    torch.testing.assert_close(vq.embed_sum, torch.tensor(m))
    torch.testing.assert_close(vq.embedding, torch.tensor(e))
    torch.testing.assert_close(aux["perplexity"], torch.tensor(2.0))  # two codes used equally often
    torch.testing.assert_close(aux["usage"], torch.tensor(2 / 3))
    assert aux["dead"] == 0


def test_dead_code_restart():
    """Codes whose EMA count falls below dead_threshold move onto vectors of the batch, with count 1 and sum = that
    vector; the live codes keep the EMA update."""
    torch.manual_seed(0)
    vq = models.VectorQuantizerEMA(4, 2, decay=0.9, dead_threshold=0.5).train()
    embedding = torch.tensor([[0.0, 0.0], [10.0, 0.0], [100.0, 100.0], [-100.0, 100.0]])
    counts = torch.tensor([1.0, 1.0, 0.3, 0.4])  # codes 2 and 3 decay to 0.27 and 0.36 < 0.5 with no use
    vq.embedding.copy_(embedding)
    vq.cluster_size.copy_(counts)
    vq.embed_sum.copy_(embedding * counts[:, None])
    batch = torch.tensor([[0.5, 0.1], [-0.3, 0.2], [9.5, 0.3], [10.2, -0.4], [0.1, -0.6], [11.0, 0.5]])  # codes 0, 1
    _, aux = vq(batch.T[None])
    assert aux["dead"] == 2
    for k in (2, 3):
        assert any(torch.equal(vq.embedding[k], v) for v in batch), f"code {k} was not moved onto a batch vector"
        assert torch.equal(vq.embed_sum[k], vq.embedding[k]) and vq.cluster_size[k] == 1
    torch.testing.assert_close(vq.cluster_size[:2], 0.9 * counts[:2] + 0.1 * torch.tensor([3.0, 3.0]))
    assert vq.embedding[0].norm() < 1 and (vq.embedding[1] - torch.tensor([10.0, 0.0])).norm() < 1  # still live


def test_vqvae_updates_only_in_training_forward():
    """The training forward moves the codebook; decode (nearest code, then the decoder) and eval never do."""
    torch.manual_seed(0)
    model = models.make_model("vqvae", "tiny")
    x = torch.randn(2, 3, 8, 8)
    z = model.encode(x)
    before = model.quantizer.embedding.clone()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    codes = before[torch.cdist(flat, before).argmin(1)].reshape(2, 2, 2, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(model.decode(z), model.decoder(codes))
    model.eval()(x)
    assert torch.equal(model.quantizer.embedding, before)
    model.train()(x)
    assert not torch.equal(model.quantizer.embedding, before)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_dcae_shortcuts(dims):
    """space_to_channel then averaging all 2^dims offsets is 2x average pooling; channel_to_space inverts
    space_to_channel (= pixel unshuffle in 2D); duplicating each channel 2^dims times then channel_to_space is
    nearest upsampling."""
    x = torch.randn(2, 3, *[4] * dims)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    torch.testing.assert_close(models.channel_average(models.space_to_channel(x), 3), pool(x, 2))
    assert torch.equal(models.channel_to_space(models.space_to_channel(x)), x)
    upsampled = models.channel_to_space(x.repeat_interleave(2**dims, dim=1))
    assert torch.equal(upsampled, F.interpolate(x, scale_factor=2, mode="nearest"))
    if dims == 2:
        assert torch.equal(models.space_to_channel(x), F.pixel_unshuffle(x, 2))


def test_dcae_residual_down_by_hand():
    """With its conv at zero, ResidualDown(4 -> 8 channels, 2D) outputs the shortcut alone: output channel j is the
    mean of input channel j // 2 over horizontal pairs in rows of parity j % 2."""
    down = models.ResidualDown(2, 4, 8)
    torch.nn.init.zeros_(down.conv.weight)
    torch.nn.init.zeros_(down.conv.bias)
    x = torch.randn(2, 4, 6, 6)
    out = down(x)
    for j in range(8):
        rows = x[:, j // 2, j % 2 :: 2]  # (B, 3, 6)
        torch.testing.assert_close(out[:, j], 0.5 * (rows[..., 0::2] + rows[..., 1::2]))


def test_dcae_residual_up_by_hand():
    """With its conv at zero, ResidualUp(8 -> 4 channels, 2D) outputs the shortcut alone: each channel duplicated
    twice (16 = 4 x 2^2), then channel-to-space: output channel c at rows of parity r is input channel 2c + r,
    each value repeated over two columns."""
    up = models.ResidualUp(2, 8, 4)
    torch.nn.init.zeros_(up.conv.weight)
    torch.nn.init.zeros_(up.conv.bias)
    x = torch.randn(2, 8, 3, 3)
    out = up(x)
    assert out.shape == (2, 4, 6, 6)
    for c in range(4):
        for r in range(2):
            assert torch.equal(out[:, c, r::2], x[:, 2 * c + r].repeat_interleave(2, dim=-1))


def test_dcae_latent_shortcuts():
    """With the encoder's output conv and the decoder's input conv at zero, the latent is the channel average of the
    last encoder features (16 -> 4 channels: groups of 4) and the decoder's first features are the latent with each
    channel repeated 4 times."""
    torch.manual_seed(0)
    model = models.make_model("dcae", "tiny")
    for conv in (model.enc_out, model.dec_in):
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
    seen = {}
    model.enc_norm.register_forward_hook(lambda module, args, out: seen.update(features=args[0]))
    model.up[0].register_forward_pre_hook(lambda module, args: seen.update(decoder_in=args[0]))
    z = model.encode(torch.randn(2, 3, 8, 8))
    h = seen["features"]  # (2, 16, 2, 2)
    torch.testing.assert_close(z, torch.stack([h[:, 4 * c : 4 * c + 4].mean(1) for c in range(4)], dim=1))
    model.decode(z)
    assert torch.equal(seen["decoder_in"], torch.cat([z[:, c : c + 1].expand(-1, 4, -1, -1) for c in range(4)], dim=1))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_patchgan(dims):
    """logits (B, 1, *[s // 2^n_layers - 2]); every parameter gets a gradient."""
    torch.manual_seed(0)
    for n_layers, side in [(2, 16), (3, 32)] if dims < 3 else [(2, 16)]:
        disc = models.make_model("patchgan", "tiny", dims=dims, in_channels=2, n_layers=n_layers)
        logits = disc(torch.randn(2, 2, *[side] * dims))
        assert tuple(logits.shape) == (2, 1, *[side // 2**n_layers - 2] * dims)
        logits.square().mean().backward()
        missing = [n for n, p in disc.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not missing, f"parameters without gradient: {missing}"


def test_gan_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    torch.testing.assert_close(train_vae.hinge_d_loss(real, fake), torch.tensor((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    torch.testing.assert_close(train_vae.generator_loss(fake), torch.tensor(1 / 3))


def test_adaptive_weight():
    """lambda = ||grad rec|| / (||grad g|| + 1e-4) at the last layer, clamped to max_weight, detached: on linear
    losses with known gradients, and on a real decoder against gradients from separate .backward() passes."""
    W = torch.nn.Parameter(torch.randn(2, 2))
    rec = (torch.tensor([[3.0, 4.0], [0.0, 0.0]]) * W).sum()  # gradient norm 5
    g = (torch.tensor([[0.0, 0.0], [2.0, 0.0]]) * W).sum()  # gradient norm 2
    weight = train_vae.adaptive_weight(rec, g, W)
    torch.testing.assert_close(weight, torch.tensor(5 / (2 + 1e-4)))
    assert not weight.requires_grad
    assert train_vae.adaptive_weight(rec, (0 * W).sum(), W, max_weight=1e4) == 1e4  # 5 / 1e-4, clamped

    torch.manual_seed(0)
    model = perturb(models.make_model("klvae", "tiny")).eval()
    disc = models.make_model("patchgan", "tiny")
    x = torch.randn(2, 3, 16, 16)
    losses = {"rec": lambda x_hat: (x - x_hat).abs().mean(), "g": lambda x_hat: train_vae.generator_loss(disc(x_hat))}
    x_hat = model(x)[0]
    weight = train_vae.adaptive_weight(losses["rec"](x_hat), losses["g"](x_hat), model.last_layer)
    norms = {}
    for key, loss_of in losses.items():
        model.zero_grad(set_to_none=True)
        loss_of(model(x)[0]).backward()
        norms[key] = model.last_layer.grad.norm()
    torch.testing.assert_close(weight, norms["rec"] / (norms["g"] + 1e-4))


def test_checkpointing_matches():
    """checkpointing=True recomputes blocks in backward: same output and gradients."""
    torch.manual_seed(0)
    plain = perturb(models.make_model("klvae", "tiny")).eval()
    ckpt = models.make_model("klvae", "tiny", checkpointing=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8)
    for model in (plain, ckpt):
        model(x)[0].square().mean().backward()
    torch.testing.assert_close(ckpt(x)[0], plain(x)[0])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_errors(name):
    """Options that disagree, a bad dims, an input whose size the factor does not divide, a wrong latent."""
    with pytest.raises(ValueError, match="factor=8 disagrees with ch_mult"):
        models.make_model(name, "tiny", factor=8)
    with pytest.raises(ValueError, match="factor=6 is not a power of 2"):
        models.make_model(name, "tiny", factor=6)
    with pytest.raises(ValueError, match="dims=4"):
        models.make_model(name, "tiny", dims=4)
    model = models.make_model(name, "tiny", factor=4)  # agreeing is fine
    with pytest.raises(ValueError, match=r"input size \(10, 12\) is not divisible by factor 4"):
        model(torch.randn(1, 3, 10, 12))
    with pytest.raises(ValueError, match=r"expects \(B, 3, S, S\)"):
        model.encode(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match=r"expects \(B, 4, S, S\), got \(1, 3, 2, 2\)"):
        model.decode(torch.randn(1, 3, 2, 2))


def test_dcae_and_patchgan_errors():
    with pytest.raises(ValueError, match="latent_channels=3 must divide"):
        models.make_model("dcae", "tiny", latent_channels=3)
    with pytest.raises(ValueError, match="one entry per level"):
        models.make_model("dcae", "tiny", depth=(1, 1))
    with pytest.raises(ValueError, match="do not split into"):
        models.ResidualDown(1, 8, 32)
    with pytest.raises(ValueError, match=r"input size \(8, 8\) is below 12"):
        models.make_model("patchgan", "tiny")(torch.randn(1, 3, 8, 8))
