"""Every backbone of nanodiffusion, as plain nn.Modules.

Contract: every denoiser is called as `model(x, t, cond=None)` with t in [0, 1] (t=0 clean, t=1 noise, see
common.py) and returns a tensor shaped like its output. Every registry entry has a `tiny` preset.
Shape letters: B batch, C channels, H/W height/width, D depth (3D) or model width, L tokens.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------------------------------------------------
# Shared blocks
# ----------------------------------------------------------------------------------------------------------------


def timestep_embedding(t, dim, max_period=10_000.0, scale=1000.0):
    """Sinusoidal features of a (B,) tensor (Vaswani et al. 2017, sec. 3.5): [cos(u w_i), sin(u w_i)] -> (B, dim),
    u = scale * t, w_i = max_period^(-i / half).

    The default scale 1000 makes t in [0, 1] span the same phases as an integer step index; a log-SNR in [-20, 20]
    is embedded with scale 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = scale * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def conv_nd(dims, *args, **kw):
    """nn.Conv1d / Conv2d / Conv3d chosen by `dims`, so one definition serves 1D signals, images and volumes."""
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](*args, **kw)


def zero_module(module):
    """Zero a module's parameters, so a residual branch or an output layer starts as the zero function."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, arXiv:1706.03762) via F.scaled_dot_product_attention.

    Self-attention when `context_dim` is 0; cross-attention to a (B, L_c, context_dim) sequence otherwise.
    """

    def __init__(self, dim, heads, context_dim=0, zero_init=False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads, self.is_cross = heads, context_dim > 0
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = zero_module(nn.Linear(dim, dim)) if zero_init else nn.Linear(dim, dim)

    def forward(self, x, context=None):
        B, L, D = x.shape
        source = x if context is None else context
        q = self.q(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, L, D/heads)
        k, v = self.kv(source).view(B, source.shape[1], 2, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, D/heads)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


def class_or_context(cond, batch, num_classes, context_dim, device):
    """Split `cond` into (class ids (B,) or None, context (B, L, context_dim) or None).

    Class ids: None means the null class `num_classes` (classifier-free guidance, Ho & Salimans 2022, arXiv:2207.12598).
    Context: a float sequence; None means no cross-attention input (the caller supplies its own null, e.g. "").
    """
    if num_classes:
        if cond is None:
            return torch.full((batch,), num_classes, dtype=torch.long, device=device), None
        if cond.dtype.is_floating_point or cond.shape != (batch,):
            raise ValueError(f"class-conditional model expects cond = class ids of shape ({batch},), got {cond.shape}")
        return cond, None
    if context_dim and cond is not None:
        if cond.ndim != 3 or cond.shape[0] != batch or cond.shape[2] != context_dim:
            raise ValueError(
                f"context model expects cond of shape ({batch}, L, {context_dim}), got {tuple(cond.shape)}"
            )
        return None, cond
    if cond is not None and not context_dim:
        raise ValueError("this model is unconditional (num_classes=0, context_dim=0) but got a cond")
    return None, None


def unpatchify(tokens, grid, patch, channels):
    """(B, prod(grid), prod(patch) * C) -> (B, C, grid_1 * patch_1, ..., grid_n * patch_n)."""
    n = len(grid)
    x = tokens.reshape(tokens.shape[0], *grid, *patch, channels)  # (B, g_1..g_n, p_1..p_n, C)
    order = [0, 2 * n + 1] + [a for i in range(n) for a in (1 + i, 1 + n + i)]  # B, C, g_1, p_1, ..., g_n, p_n
    return x.permute(*order).reshape(tokens.shape[0], channels, *[g * p for g, p in zip(grid, patch)])


# ----------------------------------------------------------------------------------------------------------------
# ARC denoiser
# ----------------------------------------------------------------------------------------------------------------


class ArcBlock(nn.Module):
    """Post-LN transformer encoder layer (Vaswani et al. 2017, arXiv:1706.03762): x = LN(x + MHA(x)),
    x = LN(x + FFN(x)); attention through scaled_dot_product_attention with a boolean mask (True = may attend).
    Dropout acts on the residual branches and inside the FFN, not on the attention weights (which would force the
    slow unfused attention kernel)."""

    def __init__(self, d_model, n_heads, dropout=0.1):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d_model, d_model)
        )
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (3, B, h, L, D/h)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        a = a.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        x = self.norm1(x + self.drop(self.proj(a)))
        return self.norm2(x + self.drop(self.ffn(x)))


class ArcDenoiser(nn.Module):
    """Denoiser of D3PM-uniform ARC output grids (Austin et al. 2021, arXiv:2107.03006), one (input, output) pair
    per example, the task named by a learned embedding; self-conditioned (Chen et al. 2022, arXiv:2208.04202).

    Tokens: prefix [task, D4, colour shift, G*G input cells], then [time, G*G noisy output cells]. Cells carry a
    colour embedding (PAD = 10 embeds to zero) plus learned row and column embeddings (D/2 each); tokens outside a
    grid are zero. Departure from a plain encoder: prefix tokens do not attend to the time and output tokens, so
    the size head (mean of the input-cell states) is a function of (task, augmentation, input) alone and sees
    the same thing at training and at inference, where predict_size() runs the prefix only.

    model(x, t, cond) -> colour logits (B, G, G, 10); with return_size=True also size logits (B, 2, G), where
    x (B, G, G) long is the noisy output (PAD outside its h x w), t (B,) in [0, 1] and cond a dict: task (B,),
    inp (B, G, G) long input (PAD outside), d4 (B,) in [0, 8), shift (B,) in [0, 9), self_cond (B, G, G, 10)
    logits of the previous estimate or None.
    """

    PRESETS = {
        "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4},
        "toiny": {"d_model": 320, "n_layers": 3, "n_heads": 5},
        "smol": {"d_model": 384, "n_layers": 4, "n_heads": 6},
        "mediom": {"d_model": 640, "n_layers": 6, "n_heads": 10},
        "lorge": {"d_model": 896, "n_layers": 10, "n_heads": 14},
    }

    def __init__(
        self,
        d_model,
        n_layers,
        n_heads,
        n_tasks=1000,
        grid=30,
        n_colours=10,
        dropout=0.1,
        input_dropout=0.05,
        keep_floor=0.02,
    ):
        super().__init__()
        self.grid, self.n_colours, self.pad, self.input_dropout = grid, n_colours, n_colours, input_dropout
        self.keep_floor = keep_floor  # the time token embeds the log-SNR of alpha_bar(t) = d3pm_keep_prob(t, floor)
        self.task_emb = nn.Embedding(n_tasks, d_model)
        self.d4_emb, self.shift_emb = nn.Embedding(8, d_model), nn.Embedding(n_colours - 1, d_model)
        self.time_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.in_emb = nn.Embedding(n_colours + 1, d_model, padding_idx=n_colours)
        self.out_emb = nn.Embedding(n_colours + 1, d_model, padding_idx=n_colours)
        self.row_emb, self.col_emb = nn.Embedding(grid, d_model // 2), nn.Embedding(grid, d_model - d_model // 2)
        self.self_cond = nn.Linear(n_colours, d_model)  # zero-initialised: self-conditioning starts as a no-op
        nn.init.zeros_(self.self_cond.weight)
        nn.init.zeros_(self.self_cond.bias)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([ArcBlock(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.head = nn.Linear(d_model, n_colours)
        self.size_head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 2 * grid))

    def _positions(self):
        rows, cols = self.row_emb.weight, self.col_emb.weight  # (G, D/2) each
        G = self.grid
        return torch.cat([rows[:, None].expand(G, G, -1), cols[None, :].expand(G, G, -1)], dim=-1).flatten(0, 1)

    def _prefix(self, cond):
        """(B, 3 + G*G, D) prefix tokens and the (B, G*G) mask of valid input cells."""
        inp = cond["inp"].flatten(1)  # (B, G*G)
        valid = inp != self.pad
        if self.training and self.input_dropout > 0:  # input-grid dropout: drop a cell's colour, keep its position
            inp = torch.where(torch.rand(inp.shape, device=inp.device) < self.input_dropout, self.pad, inp)
        cells = (self.in_emb(inp) + self._positions()) * valid[..., None]
        extra = torch.stack([self.task_emb(cond["task"]), self.d4_emb(cond["d4"]), self.shift_emb(cond["shift"])], 1)
        return torch.cat([extra, cells], dim=1), valid

    def _size_logits(self, h, valid):
        cells = h[:, 3 : 3 + valid.shape[1]]  # (B, G*G, D) input-cell states
        pooled = (cells * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return self.size_head(pooled).view(-1, 2, self.grid)  # (B, 2, G): height and width classes 1..G

    def forward(self, x, t, cond=None, return_size=False):
        B, G = x.shape[0], self.grid
        prefix, valid = self._prefix(cond)
        out = x.flatten(1)  # (B, G*G)
        out_valid = out != self.pad
        cells = self.out_emb(out) + self._positions()
        sc = torch.zeros(B, G * G, self.n_colours, device=x.device)  # no estimate yet: centred log-probs of 0
        if cond.get("self_cond") is not None:
            sc = cond["self_cond"].float().flatten(1, 2).log_softmax(-1)  # (B, G*G, 10)
            sc = sc - sc.mean(-1, keepdim=True)
        cells = cells + self.self_cond(sc.to(cells.dtype))  # always applied, so every rank uses every parameter
        cells = cells * out_valid[..., None]  # noisy-output tokens are zero outside the output's h x w
        log_snr = common.d3pm_log_snr(t.float(), self.keep_floor)  # (B,) in [-20, 20]
        time = self.time_mlp(timestep_embedding(log_snr, prefix.shape[-1], scale=1.0).to(prefix.dtype))[:, None]
        h = self.emb_drop(torch.cat([prefix, time, cells], dim=1))  # (B, L, D), L = 4 + 2 G*G
        P, L = prefix.shape[1], h.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool, device=h.device)
        mask[:P, P:] = False  # the prefix never sees time or the noisy output
        for block in self.blocks:
            h = block(h, mask)
        logits = self.head(h[:, P + 1 :]).view(B, G, G, self.n_colours)
        return (logits, self._size_logits(h, valid)) if return_size else logits

    def predict_size(self, cond):
        """Size logits (B, 2, G) from the prefix alone (equal to forward's, which hides the rest from the prefix)."""
        prefix, valid = self._prefix(cond)
        h = self.emb_drop(prefix)
        for block in self.blocks:
            h = block(h)
        return self._size_logits(h, valid)


# ----------------------------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Residual block (Ho et al. 2020, arXiv:2006.11239, app. B): GroupNorm, SiLU, conv; the embedding is added
    after the first conv, or applied as a FiLM scale-shift `norm(h) * (1 + scale) + shift` (Dhariwal & Nichol 2021,
    arXiv:2105.05233, sec. 3); GroupNorm, SiLU, dropout, zero-initialised conv.
    """

    def __init__(self, dims, c_in, c_out, emb_dim, groups, dropout, film):
        super().__init__()
        self.film = film
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = conv_nd(dims, c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out if film else c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv_nd(dims, c_out, c_out, 3, padding=1))
        self.skip = conv_nd(dims, c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(F.silu(emb))
        e = e.view(*e.shape, *([1] * (x.ndim - 2)))  # (B, C or 2C, 1, ...)
        if self.film:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.dropout(F.silu(h)))


class SpatialAttention(nn.Module):
    """Self-attention over all positions of a feature map, then optional cross-attention to a context sequence
    (Rombach et al. 2022, arXiv:2112.10752, sec. 3.3); both residual, both with zero-initialised output projections.
    """

    def __init__(self, channels, heads, groups, context_dim=0):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = Attention(channels, heads, zero_init=True)
        self.cross_norm = nn.LayerNorm(channels) if context_dim else None
        self.cross = Attention(channels, heads, context_dim, zero_init=True) if context_dim else None

    def forward(self, x, context=None):
        tokens = x.flatten(2).transpose(1, 2)  # (B, L, C)
        tokens = tokens + self.attn(self.norm(x).flatten(2).transpose(1, 2))
        if self.cross is not None and context is not None:
            tokens = tokens + self.cross(self.cross_norm(tokens), context)
        return tokens.transpose(1, 2).reshape(x.shape)


class UNet(nn.Module):
    """UNet denoiser (Ronneberger et al. 2015; Ho et al. 2020, arXiv:2006.11239; Dhariwal & Nichol 2021,
    arXiv:2105.05233): `dims` = 1, 2 or 3 from one definition.

    Per level: `num_res_blocks` ResBlocks (each followed by attention where `attn_levels` says so), then a stride-2
    conv down; a middle ResBlock-attention-ResBlock; the mirror path up (nearest + conv) with skip concatenation;
    a zero-initialised output conv, so the untrained model outputs exactly zero.
    cond: class ids (B,) when num_classes > 0 (id num_classes = null), or a context (B, L, context_dim) when
    context_dim > 0, read by cross-attention at the attention levels.
    """

    PRESETS = {
        "tiny": dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(False, True), heads=2, groups=4),
        "small": dict(channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attn_levels=(False, False, True, True)),
        "base": dict(channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attn_levels=(False, False, True, True)),
        "large": dict(channels=256, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(False, True, True, True)),
    }

    def __init__(
        self,
        in_channels=3,
        out_channels=None,
        channels=64,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=2,
        attn_levels=(False, False, True, True),
        heads=8,
        groups=8,
        dropout=0.1,
        dims=2,
        num_classes=0,
        context_dim=0,
        film=False,
    ):
        super().__init__()
        if len(attn_levels) != len(channel_mult):
            raise ValueError(f"attn_levels {attn_levels} needs one entry per level of channel_mult {channel_mult}")
        self.channels, self.dims, self.levels = channels, dims, len(channel_mult)
        self.num_classes, self.context_dim = num_classes, context_dim
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None  # last row: null class
        block = lambda c_in, c_out: ResBlock(dims, c_in, c_out, emb_dim, groups, dropout, film)
        attn = lambda c: SpatialAttention(c, heads, groups, context_dim)

        self.conv_in = conv_nd(dims, in_channels, channels, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([block(c, channels * mult)]))
                c = channels * mult
                if attn_levels[level]:
                    self.down[-1].append(attn(c))
                skips.append(c)
            if level < self.levels - 1:
                self.down.append(nn.ModuleList([conv_nd(dims, c, c, 3, stride=2, padding=1)]))
                skips.append(c)
        self.mid = nn.ModuleList([block(c, c), attn(c), block(c, c)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([block(c + skips.pop(), channels * mult)]))
                c = channels * mult
                if attn_levels[level]:
                    self.up[-1].append(attn(c))
                if level > 0 and i == num_res_blocks:
                    self.up[-1].append(nn.Upsample(scale_factor=2, mode="nearest"))
                    self.up[-1].append(conv_nd(dims, c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = zero_module(conv_nd(dims, c, out_channels or in_channels, 3, padding=1))

    def _run(self, layers, h, emb, context):
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialAttention):
                h = layer(h, context)
            else:
                h = layer(h)
        return h

    def forward(self, x, t, cond=None):
        factor = 2 ** (self.levels - 1)
        if x.ndim != self.dims + 2 or any(s % factor for s in x.shape[2:]):
            raise ValueError(f"UNet(dims={self.dims}) needs (B, C, *spatial) with sides divisible by {factor}")
        labels, context = class_or_context(cond, x.shape[0], self.num_classes, self.context_dim, x.device)
        emb = self.time_mlp(timestep_embedding(t.expand(x.shape[0]), 4 * self.channels))
        if labels is not None:
            emb = emb + self.class_emb(labels)
        h = self.conv_in(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, context)
            hs.append(h)
        h = self._run(self.mid, h, emb, context)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------------------


def sincos_position_embedding(grid, dim, device):
    """Fixed sin-cos position embedding of an N-D token grid (Vaswani et al. 2017; N-D as in DiT, arXiv:2212.09748):
    each axis gets an equal, even share of `dim` (the rest zero-padded) -> (prod(grid), dim), row-major order.
    """
    share = 2 * (dim // (2 * len(grid)))
    coords = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    parts = [timestep_embedding(c.reshape(-1), share, scale=1.0) for c in coords]
    return F.pad(torch.cat(parts, dim=-1), (0, dim - share * len(grid)))  # (L, dim)


def modulate(x, shift, scale):
    """adaLN: LayerNorm output scaled and shifted per sample, x * (1 + scale) + shift (DiT, arXiv:2212.09748)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero (Peebles & Xie 2023, arXiv:2212.09748, fig. 3): shift/scale/gate for attention and
    MLP regressed from the conditioning vector, gates zero at init so the block starts as the identity; optional
    cross-attention to a context sequence after self-attention (the paper's cross-attention variant).
    """

    def __init__(self, dim, heads, mlp_ratio=4.0, context_dim=0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.cross = Attention(dim, heads, context_dim, zero_init=True) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(dim, 6 * dim)))

    def forward(self, x, c, context=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None and context is not None:
            x = x + self.cross(self.cross_norm(x), context)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023, arXiv:2212.09748) on 1D, 2D or 3D inputs.

    Patches of any shape (`patch` an int or a tuple per axis, e.g. (1, 8) for a 1 x T time series as an image) ->
    tokens + fixed sin-cos positions -> adaLN-Zero blocks conditioned on time (+ class) -> adaLN final layer,
    zero-initialised, so the untrained model outputs exactly zero -> unpatchify.
    cond: class ids (B,) when num_classes > 0 (id num_classes = null), or a context (B, L, context_dim) read by
    cross-attention when context_dim > 0.
    """

    PRESETS = {  # the paper's table 1; tiny for tests
        "tiny": dict(dim=64, depth=2, heads=2),
        "S": dict(dim=384, depth=12, heads=6),
        "B": dict(dim=768, depth=12, heads=12),
        "L": dict(dim=1024, depth=24, heads=16),
        "XL": dict(dim=1152, depth=28, heads=16),
    }

    def __init__(
        self,
        in_channels=3,
        out_channels=None,
        dims=2,
        patch=2,
        dim=384,
        depth=12,
        heads=6,
        mlp_ratio=4.0,
        num_classes=0,
        context_dim=0,
    ):
        super().__init__()
        self.patch = (patch,) * dims if isinstance(patch, int) else tuple(patch)
        if len(self.patch) != dims:
            raise ValueError(f"patch {patch} must have one size per axis (dims={dims})")
        self.dims, self.dim, self.out_channels = dims, dim, out_channels or in_channels
        self.num_classes, self.context_dim = num_classes, context_dim
        self.patch_embed = conv_nd(dims, in_channels, dim, self.patch, stride=self.patch)
        self.time_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None  # last row: null class
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio, context_dim) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(dim, 2 * dim)))
        self.linear_out = zero_module(nn.Linear(dim, math.prod(self.patch) * self.out_channels))

    def forward(self, x, t, cond=None):
        if x.ndim != self.dims + 2 or any(s % p for s, p in zip(x.shape[2:], self.patch)):
            raise ValueError(f"DiT(dims={self.dims}) needs (B, C, *spatial) with sides divisible by patch {self.patch}")
        B = x.shape[0]
        labels, context = class_or_context(cond, B, self.num_classes, self.context_dim, x.device)
        h = self.patch_embed(x)  # (B, D, *grid)
        grid = h.shape[2:]
        h = h.flatten(2).transpose(1, 2) + sincos_position_embedding(grid, self.dim, x.device)  # (B, L, D)
        c = self.time_mlp(timestep_embedding(t.expand(B), 256))
        if labels is not None:
            c = c + self.class_emb(labels)
        for block in self.blocks:
            h = block(h, c, context)
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        h = self.linear_out(modulate(self.norm_out(h), shift, scale))  # (B, L, prod(patch) * C_out)
        return unpatchify(h, grid, self.patch, self.out_channels)


# ----------------------------------------------------------------------------------------------------------------
# U-ViT
# ----------------------------------------------------------------------------------------------------------------


class UViTBlock(nn.Module):
    """Pre-LN transformer block; with `skip`, a long skip from the mirrored shallow block is concatenated and mixed
    by a linear layer first (Bao et al. 2023, arXiv:2209.12152, sec. 3.1).
    """

    def __init__(self, dim, heads, mlp_ratio=4.0, skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT (Bao et al. 2023, arXiv:2209.12152): everything is a token. [time token, condition token(s), patches]
    with learned positions -> depth//2 blocks whose outputs feed long skips -> a middle block -> depth//2 blocks
    taking the skips -> linear to patches -> unpatchify -> a 3x3 conv (the paper's "last conv").
    cond: class ids (B,) when num_classes > 0 (id num_classes = null, one token), or a context (B, L_c, context_dim)
    projected to L_c tokens when context_dim > 0 (the paper's text-to-image variant; L_c fixed by `context_len`).
    Positions are learned for `input_size`, so inputs must have that size.
    """

    PRESETS = {  # U-ViT-S (paper table 1); tiny for tests
        "tiny": dict(dim=64, depth=3, heads=2),
        "small": dict(dim=512, depth=13, heads=8),
        "mid": dict(dim=768, depth=17, heads=12),
    }

    def __init__(
        self,
        in_channels=3,
        out_channels=None,
        dims=2,
        input_size=(96, 96),
        patch=4,
        dim=512,
        depth=13,
        heads=8,
        mlp_ratio=4.0,
        num_classes=0,
        context_dim=0,
        context_len=1,
    ):
        super().__init__()
        self.patch = (patch,) * dims if isinstance(patch, int) else tuple(patch)
        self.input_size = (input_size,) * dims if isinstance(input_size, int) else tuple(input_size)
        if (
            len(self.patch) != dims
            or len(self.input_size) != dims
            or any(s % p for s, p in zip(self.input_size, self.patch))
        ):
            raise ValueError(f"input_size {input_size} must be divisible by patch {patch}, one entry per axis ({dims})")
        if depth % 2 == 0:
            raise ValueError(f"U-ViT depth must be odd (in blocks, a middle block, out blocks); got {depth}")
        self.dims, self.dim, self.out_channels = dims, dim, out_channels or in_channels
        self.num_classes, self.context_dim = num_classes, context_dim
        self.grid = tuple(s // p for s, p in zip(self.input_size, self.patch))
        n_cond = 1 if num_classes else context_len if context_dim else 0
        self.patch_embed = conv_nd(dims, in_channels, dim, self.patch, stride=self.patch)
        self.time_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.class_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None  # last row: null class
        self.context_embed = nn.Linear(context_dim, dim) if context_dim else None
        self.pos = nn.Parameter(torch.randn(1, 1 + n_cond + math.prod(self.grid), dim) * 0.02)
        self.in_blocks = nn.ModuleList([UViTBlock(dim, heads, mlp_ratio) for _ in range(depth // 2)])
        self.mid_block = UViTBlock(dim, heads, mlp_ratio)
        self.out_blocks = nn.ModuleList([UViTBlock(dim, heads, mlp_ratio, skip=True) for _ in range(depth // 2)])
        self.norm_out = nn.LayerNorm(dim)
        self.linear_out = nn.Linear(dim, math.prod(self.patch) * self.out_channels)
        self.conv_out = conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)

    def forward(self, x, t, cond=None):
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"UViT was built for input_size {self.input_size}, got {tuple(x.shape[2:])}")
        B = x.shape[0]
        labels, context = class_or_context(cond, B, self.num_classes, self.context_dim, x.device)
        tokens = [self.time_mlp(timestep_embedding(t.expand(B), self.dim))[:, None]]  # (B, 1, D)
        if self.class_emb is not None:
            tokens.append(self.class_emb(labels)[:, None])
        elif self.context_embed is not None:
            if context is None:
                raise ValueError("UViT with context_dim > 0 needs a context (its null is supplied by the caller)")
            tokens.append(self.context_embed(context))  # (B, L_c, D)
        tokens.append(self.patch_embed(x).flatten(2).transpose(1, 2))  # (B, L, D)
        h = torch.cat(tokens, dim=1) + self.pos
        skips = []
        for block in self.in_blocks:
            h = block(h)
            skips.append(h)
        h = self.mid_block(h)
        for block in self.out_blocks:
            h = block(h, skips.pop())
        h = self.linear_out(self.norm_out(h))[:, -math.prod(self.grid) :]  # patch tokens only: (B, L, p * C)
        return self.conv_out(unpatchify(h, self.grid, self.patch, self.out_channels))


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

MODELS = {  # name -> class; each class has a PRESETS dict with at least "tiny"
    "unet": UNet,
    "dit": DiT,
    "uvit": UViT,
    "arc": ArcDenoiser,
}


def make_model(name, size="tiny", **kw):
    """Build registry entry `name` at preset `size`; keyword arguments override the preset."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name]
    if size not in cls.PRESETS:
        raise ValueError(f"unknown size {size!r} for model {name!r}; choose one of {sorted(cls.PRESETS)}")
    return cls(**{**cls.PRESETS[size], **kw})
