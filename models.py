"""Every backbone of nanodiffusion, as plain nn.Modules; this file imports nothing from the project.

Contract: every backbone is called as `model(x, t, cond=None)` and returns a tensor shaped like its output.
t (B,) is the noise level, in [0, 1] (t=0 clean, t=1 noise, see common.py) for the image backbones; ArcDenoiser
takes a log-SNR instead (see its docstring). `cond` for every image backbone (UNet, DiT, U-ViT, HDiT, LocalMamba,
MMDiT; ArcDenoiser has its own dict) is:
  - None: every condition the model was built with takes its learned null (unconditional);
  - class ids (B,) long, id num_classes being the null class: shorthand for {"class": ids};
  - a dict of any of
      "class"        (B,) long class ids;
      "vector"       (B, vector_dim) float, e.g. an age, augmentation parameters, a size histogram;
      "context"      (B, L, context_dim) float token sequence, read by cross-attention (U-ViT: as tokens);
      "context_mask" (B, L) bool, True = a real token; padding tokens are not attended;
      "concat"       (B, concat_channels, *spatial) float, e.g. a mask channel, concatenated to x along channels
                     before the first layer;
      "drop"         (B,) bool, True replaces EVERY condition of that sample by its learned null (classifier-free
                     guidance, Ho & Salimans 2022, arXiv:2207.12598, and training-time condition dropout).
    A key that is absent or None takes the learned null for the whole batch. A key the model was not built for
    raises ValueError naming the constructor argument; a wrong shape raises ValueError with expected and got shapes.
Learned nulls: class -> embedding row num_classes; vector -> a learned embedding replacing the embedded vector;
context -> one learned token (1, context_dim) standing in for the whole sequence (a dropped sample of a longer
context gets it at every position, all valid, which attends exactly like the single token; U-ViT, whose context
has a fixed count context_len, repeats it context_len times); concat -> a learned per-channel constant
(concat_channels,) broadcast over space.
The image backbones take `num_classes=0, vector_dim=0, context_dim=0, concat_channels=0`; the network sees
in_channels + concat_channels input channels and outputs out_channels (default in_channels). The context is read by
cross-attention (UNet, DiT; HDiT at its coarsest level), as tokens (U-ViT), as MMDiT's second token stream with
joint attention, or as a masked mean pooled into the conditioning vector (LocalMamba).
Every registry entry has a `tiny` preset.
The autoencoders of latent diffusion (KLVAE, VQVAE, DCAE: class attribute kind = "autoencoder") and the PatchGAN
discriminator (kind = "discriminator") are not denoisers: they are called as model(x), see their section.
Shape letters: B batch, C channels, H/W height/width, D model width, L tokens, G ARC grid side.
"""

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange

try:  # the fused CUDA selective scan (Gu & Dao 2023); optional, LocalMamba uses it on CUDA tensors when importable
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_selective_scan_fn
except ImportError:
    mamba_selective_scan_fn = None


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


class TimestepEmbedder(nn.Module):
    """Noise level (B,) -> (B, dim): sinusoidal features of scale * t, then Linear, SiLU, Linear (Ho et al. 2020,
    arXiv:2006.11239 app. B; the timestep embedder of DiT, arXiv:2212.09748)."""

    def __init__(self, dim, freq_dim=256, scale=1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        features = timestep_embedding(t, self.freq_dim, scale=self.scale)  # (B, freq_dim), float32
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # so a model cast to half precision still runs


COND_KEYS = {  # cond key -> the constructor argument that enables it
    "class": "num_classes",
    "vector": "vector_dim",
    "context": "context_dim",
    "context_mask": "context_dim",
    "concat": "concat_channels",
    "drop": None,  # valid for every model
}


def _check_shape(key, value, expected, dtype=None):
    """ValueError unless value has the dtype kind asked for ("bool", "int" or None = any) and a shape matching
    `expected` (None = any size)."""
    if dtype == "bool" and value.dtype != torch.bool:
        raise ValueError(f"cond[{key!r}]: expected a bool tensor, got {value.dtype}")
    if dtype == "int" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"cond[{key!r}]: expected integer class ids, got {value.dtype} (a context goes in 'context')")
    got = tuple(value.shape)
    if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
        sizes = ["L" if e is None else str(e) for e in expected]
        want = f"({', '.join(sizes)}{',' if len(sizes) == 1 else ''})"  # written like a tuple, L = any length
        raise ValueError(f"cond[{key!r}]: expected shape {want}, got {got}")


class ConditionEmbedder(nn.Module):
    """Turns `cond` (see the module docstring) into what a backbone consumes, with a learned null per condition for
    classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598): a (B, dim) embedding (class embedding + vector
    MLP) to add to the time embedding, the cross-attention context and its mask, and the channels to concatenate.

    The vector goes through a plain MLP; SDXL (Podell et al. 2023, arXiv:2307.01952, sec. 2.2) embeds each scalar
    with Fourier features first, which callers can do before passing the vector. `context_len` > 0 fixes the
    number of context tokens (U-ViT); 0 lets it vary, with the null a single token.
    """

    def __init__(self, dim, num_classes=0, vector_dim=0, context_dim=0, concat_channels=0, context_len=0):
        super().__init__()
        self.num_classes, self.vector_dim, self.context_dim = num_classes, vector_dim, context_dim
        self.concat_channels, self.context_len = concat_channels, context_len
        self.class_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None  # last row: the null class
        self.vector_mlp = (
            nn.Sequential(nn.Linear(vector_dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if vector_dim else None
        )
        self.vector_null = nn.Parameter(torch.zeros(dim)) if vector_dim else None
        self.context_null = nn.Parameter(torch.zeros(1, context_dim)) if context_dim else None
        self.concat_null = nn.Parameter(torch.zeros(concat_channels)) if concat_channels else None

    def _validate(self, cond, x):
        """cond -> a dict of the keys present (not None), each checked against the constructor and x (B, C, ...)."""
        if cond is None:
            return {}
        if torch.is_tensor(cond):
            cond = {"class": cond}
        if not isinstance(cond, dict):
            raise TypeError(f"cond must be None, class ids (B,) or a dict, got {type(cond).__name__}")
        cond = {k: v for k, v in cond.items() if v is not None}
        for key in cond:
            if key not in COND_KEYS:
                raise ValueError(f"unknown cond key {key!r}; the keys are {', '.join(COND_KEYS)}")
            if COND_KEYS[key] and not getattr(self, COND_KEYS[key]):
                raise ValueError(f"cond key {key!r} given, but the model was built with {COND_KEYS[key]}=0")
        if "context_mask" in cond and "context" not in cond:
            raise ValueError("cond['context_mask'] given without cond['context']")
        B = x.shape[0]
        L = cond["context"].shape[1] if "context" in cond else None
        expected = {
            "class": ((B,), "int"),
            "vector": ((B, self.vector_dim), None),
            "context": ((B, self.context_len or None, self.context_dim), None),
            "context_mask": ((B, L), "bool"),
            "concat": ((B, self.concat_channels, *x.shape[2:]), None),
            "drop": ((B,), "bool"),
        }
        for key, value in cond.items():
            _check_shape(key, value, *expected[key])
        return cond

    def forward(self, cond, x):
        """-> (emb (B, dim) or None, context (B, L, context_dim) or None, context_mask (B, L) bool or None,
        concat (B, concat_channels, *spatial) or None), for the network input x (B, C, *spatial)."""
        cond = self._validate(cond, x)
        # a drop flag always exists, so every null is in the autograd graph (DDP sees every parameter used)
        drop = cond.get("drop", torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        return (self._embedding(cond, drop), *self._context(cond, drop), self._concat(cond, drop, x))

    def _embedding(self, cond, drop):
        parts = []
        if self.class_emb is not None:
            ids = cond.get("class", torch.full_like(drop, self.num_classes, dtype=torch.long))
            parts.append(self.class_emb(ids.masked_fill(drop, self.num_classes)))
        if self.vector_mlp is not None:
            null = self.vector_null.expand(drop.shape[0], -1)
            emb = self.vector_mlp(cond["vector"].to(null.dtype)) if "vector" in cond else null
            parts.append(torch.where(drop[:, None], null, emb))
        return sum(parts[1:], parts[0]) if parts else None

    def _context(self, cond, drop):
        if not self.context_dim:
            return None, None
        if "context" not in cond:
            return self.context_null.expand(drop.shape[0], self.context_len or 1, -1), None
        context, mask = cond["context"], cond.get("context_mask")
        # a dropped sample gets the null token at every position, all valid: attending to L copies of one token is
        # attending to that token, so this equals the single null token of an unconditional call
        context = torch.where(drop[:, None, None], self.context_null.to(context.dtype), context)
        return context, None if mask is None else mask | drop[:, None]

    def _concat(self, cond, drop, x):
        if not self.concat_channels:
            return None
        spatial = [1] * (x.ndim - 2)
        null = self.concat_null.to(x.dtype).view(1, -1, *spatial).expand(x.shape[0], -1, *x.shape[2:])
        if "concat" not in cond:
            return null
        return torch.where(drop.view(-1, 1, *spatial), null, cond["concat"].to(x.dtype))


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, arXiv:1706.03762) via F.scaled_dot_product_attention.

    Self-attention when called without a context; cross-attention to a (B, L_kv, context_dim) sequence when built
    with context_dim > 0. qk_norm: RMSNorm on queries and keys per head (the QK-normalization of Esser et al. 2024,
    arXiv:2403.03206). zero_init: the output projection starts at zero, so a residual branch starts as the identity.
    """

    def __init__(self, dim, heads, context_dim=0, qk_norm=False, zero_init=False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads, self.is_cross = heads, context_dim > 0
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = zero_module(nn.Linear(dim, dim)) if zero_init else nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        """x (B, L_q, dim), context (B, L_kv, context_dim) or None -> (B, L_q, dim). mask: bool, True = may attend;
        (B, L_kv) key padding, or (1 or B, L_q, L_kv) per query. A query with no key to attend to outputs zero.
        """
        q = rearrange(self.q(x), "b l (h d) -> b h l d", h=self.heads)
        source = x if context is None else context
        k, v = rearrange(self.kv(source), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        if mask is not None:
            mask = mask[:, None, None] if mask.ndim == 2 else mask[:, None]  # (B or 1, 1, L_q or 1, L_kv)
            empty = ~mask.any(-1, keepdim=True)  # rows with no valid key would give NaN (softmax of all -inf)
            mask = mask | empty
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, L_q, D/heads)
        if mask is not None:
            out = out.masked_fill(empty, 0.0)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


def unpatchify(tokens, grid, patch, channels):
    """(B, prod(grid), prod(patch) * C) -> (B, C, grid_1 * patch_1, ..., grid_n * patch_n); tokens in row-major
    grid order, each token's values ordered (p_1, ..., p_n, C) as a patch-embedding Linear would produce them."""
    n = range(len(grid))
    g, p = " ".join(f"g{i}" for i in n), " ".join(f"p{i}" for i in n)
    pattern = f"b ({g}) ({p} c) -> b c " + " ".join(f"(g{i} p{i})" for i in n)
    return rearrange(tokens, pattern, c=channels, **{f"g{i}": grid[i] for i in n}, **{f"p{i}": patch[i] for i in n})


# ----------------------------------------------------------------------------------------------------------------
# ARC denoiser
# ----------------------------------------------------------------------------------------------------------------


class ArcBlock(nn.Module):
    """Post-LN transformer encoder layer (Vaswani et al. 2017, arXiv:1706.03762): x = LN(x + MHA(x)),
    x = LN(x + FFN(x)), with the shared Attention and a boolean mask (True = may attend). Dropout acts on the
    residual branches and inside the FFN, not on the attention weights (which would force the slow unfused
    attention kernel)."""

    def __init__(self, d_model, n_heads, dropout=0.1):
        super().__init__()
        self.attn = Attention(d_model, n_heads)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d_model, d_model)
        )
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        x = self.norm1(x + self.drop(self.attn(x, mask=mask)))
        return self.norm2(x + self.drop(self.ffn(x)))

    def _qkv(self, x):
        """Per-head queries, keys and values (B, heads, L, D / heads) of this layer's attention."""
        a = self.attn
        q = rearrange(a.q(x), "b l (h d) -> b h l d", h=a.heads)
        k, v = rearrange(a.kv(x), "b l (two h d) -> two b h l d", two=2, h=a.heads)
        return a.q_norm(q), a.k_norm(k), v

    def _rest(self, x, attended):
        """The layer after attention: output projection, residual, norms and FFN."""
        x = self.norm1(x + self.drop(self.attn.proj(rearrange(attended, "b h l d -> b l (h d)"))))
        return self.norm2(x + self.drop(self.ffn(x)))

    def prefix(self, x):
        """The layer on prefix tokens that attend to one another only: -> (x, (k, v)), k and v the keys and values
        the prefix offers the tokens after it (the same at every denoising step: a sampler computes them once)."""
        q, k, v = self._qkv(x)
        return self._rest(x, F.scaled_dot_product_attention(q, k, v)), (k, v)

    def suffix(self, x, kv):
        """The layer on tokens that attend to the prefix's keys and values kv and to one another. With prefix(),
        the same function as forward() with the mask that hides the suffix from the prefix, without computing the
        masked-out block, and without a mask (so fused attention kernels apply)."""
        q, k, v = self._qkv(x)
        k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        return self._rest(x, F.scaled_dot_product_attention(q, k, v))


class ArcDenoiser(nn.Module):
    """Denoiser of D3PM-uniform ARC output grids (Austin et al. 2021, arXiv:2107.03006), one (input, output) pair
    per example, the task named by a learned embedding; self-conditioned (Chen et al. 2022, arXiv:2208.04202).

    Tokens: prefix [task, D4, colour shift, G*G input cells], then [time, G*G noisy output cells]. Cells carry a
    colour embedding (PAD = 10 embeds to zero) plus learned row and column embeddings (D/2 each); tokens outside a
    grid are zero. Departure from a plain encoder: prefix tokens do not attend to the time and output tokens, so
    the size head (mean of the input-cell states) is a function of (task, augmentation, input) alone and sees
    the same thing at training and at inference, where predict_size() runs the prefix only. The same mask makes the
    prefix's keys and values independent of the noisy output: forward() runs the prefix on its own (encode_prefix)
    and then the time and output tokens against its keys and values (split attention: no work on masked pairs, no
    mask, so fused kernels apply), and a sampler passes encode_prefix(cond) as `cache` to every step.

    model(x, t, cond) -> colour logits (B, G, G, 10); with return_size=True also size logits (B, 2, G), where
    x (B, G, G) long is the noisy output (PAD outside its h x w) and cond a dict: task (B,), inp (B, G, G) long
    input (PAD outside), d4 (B,) in [0, 8), shift (B,) in [0, 9), self_cond (B, G, G, 10) logits of the previous
    estimate or None. These conditions are prefix tokens, so this model does not use ConditionEmbedder.
    Departure from the t-in-[0, 1] convention of the other backbones: t (B,) IS the noise level the time token
    embeds, the log-SNR log(alpha_bar / (1 - alpha_bar)) of the keep probability, in [-20, 20] (the caller computes
    it, e.g. with common.d3pm_log_snr), embedded with scale 1.
    """

    PRESETS = {
        "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4},
        "micro": {"d_model": 128, "n_layers": 4, "n_heads": 4},  # the CPU benchmark's (0.9M at grid 10)
        "toiny": {"d_model": 320, "n_layers": 3, "n_heads": 5},
        "smol": {"d_model": 384, "n_layers": 4, "n_heads": 6},
        "mediom": {"d_model": 640, "n_layers": 6, "n_heads": 10},
        "lorge": {"d_model": 896, "n_layers": 10, "n_heads": 14},
    }

    def __init__(
        self, d_model, n_layers, n_heads, n_tasks=1000, grid=30, n_colours=10, dropout=0.1, input_dropout=0.05
    ):
        super().__init__()
        self.grid, self.n_colours, self.pad, self.input_dropout = grid, n_colours, n_colours, input_dropout
        self.task_emb = nn.Embedding(n_tasks, d_model)
        self.d4_emb, self.shift_emb = nn.Embedding(8, d_model), nn.Embedding(n_colours - 1, d_model)
        self.time_embed = TimestepEmbedder(d_model, freq_dim=d_model, scale=1.0)  # t is a log-SNR, not in [0, 1]
        self.in_emb = nn.Embedding(n_colours + 1, d_model, padding_idx=n_colours)
        self.out_emb = nn.Embedding(n_colours + 1, d_model, padding_idx=n_colours)
        self.row_emb, self.col_emb = nn.Embedding(grid, d_model // 2), nn.Embedding(grid, d_model - d_model // 2)
        self.self_cond = zero_module(nn.Linear(n_colours, d_model))  # self-conditioning starts as a no-op
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([ArcBlock(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.head = nn.Linear(d_model, n_colours)
        self.size_head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 2 * grid))

    def _positions(self):
        rows, cols = self.row_emb.weight, self.col_emb.weight  # (G, D/2) each
        G = self.grid
        grid = torch.cat([rows[:, None].expand(G, G, -1), cols[None, :].expand(G, G, -1)], dim=-1)  # (G, G, D)
        return rearrange(grid, "r c d -> (r c) d")  # row-major, as the cells are flattened

    def _prefix(self, cond):
        """(B, 3 + G*G, D) prefix tokens and the (B, G*G) mask of valid input cells."""
        inp = rearrange(cond["inp"], "b r c -> b (r c)")
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

    def encode_prefix(self, cond):
        """The prefix pass: {"kv": per layer the prefix's keys and values, "h": its final states, "valid": the
        valid-input mask}. It does not depend on the noisy output or time, so a sampler computes it once per sample
        and passes it to every denoising step (forward's `cache`)."""
        prefix, valid = self._prefix(cond)
        h, kv = self.emb_drop(prefix), []
        for block in self.blocks:
            h, pair = block.prefix(h)
            kv.append(pair)
        return {"kv": kv, "h": h, "valid": valid}

    def _output_tokens(self, x, t, cond, dtype):
        """(B, 1 + G*G, D): the time token and the noisy output cells (with self-conditioning)."""
        B, G = x.shape[0], self.grid
        out = rearrange(x, "b r c -> b (r c)")
        out_valid = out != self.pad
        cells = self.out_emb(out) + self._positions()
        sc = torch.zeros(B, G * G, self.n_colours, device=x.device)  # no estimate yet: centred log-probs of 0
        if cond.get("self_cond") is not None:
            sc = rearrange(cond["self_cond"].float(), "b r c k -> b (r c) k").log_softmax(-1)
            sc = sc - sc.mean(-1, keepdim=True)
        cells = cells + self.self_cond(sc.to(cells.dtype))  # always applied, so every rank uses every parameter
        cells = cells * out_valid[..., None]  # noisy-output tokens are zero outside the output's h x w
        time = self.time_embed(t).to(dtype)[:, None]  # (B, 1, D)
        return torch.cat([time, cells], dim=1)

    def forward(self, x, t, cond=None, return_size=False, cache=None):
        """Split attention: the prefix pass (or `cache`, encode_prefix(cond) computed once), then the time and
        output tokens attending to the prefix's keys and values and to one another (ArcBlock.suffix)."""
        cache = self.encode_prefix(cond) if cache is None else cache
        h = self.emb_drop(self._output_tokens(x, t, cond, cache["h"].dtype))
        for block, kv in zip(self.blocks, cache["kv"]):
            h = block.suffix(h, kv)
        logits = rearrange(self.head(h[:, 1:]), "b (r c) k -> b r c k", r=self.grid)
        return (logits, self._size_logits(cache["h"], cache["valid"])) if return_size else logits

    def forward_masked(self, x, t, cond=None, return_size=False):
        """forward() as one masked attention over the whole sequence: the same function, computing the masked-out
        block too (the reference for tests, the 'before' of bench.py arc)."""
        prefix, valid = self._prefix(cond)
        h = self.emb_drop(torch.cat([prefix, self._output_tokens(x, t, cond, prefix.dtype)], dim=1))
        P, L = prefix.shape[1], h.shape[1]
        mask = torch.ones(1, L, L, dtype=torch.bool, device=h.device)
        mask[:, :P, P:] = False  # the prefix never sees time or the noisy output
        for block in self.blocks:
            h = block(h, mask)
        logits = rearrange(self.head(h[:, P + 1 :]), "b (r c) k -> b r c k", r=self.grid)
        return (logits, self._size_logits(h, valid)) if return_size else logits

    def predict_size(self, cond):
        """Size logits (B, 2, G) from the prefix alone (equal to forward's, which hides the rest from the prefix)."""
        cache = self.encode_prefix(cond)
        return self._size_logits(cache["h"], cache["valid"])


class MaskedArc(nn.Module):
    """An ArcDenoiser run the slow way: forward is forward_masked (one masked attention over the whole sequence,
    recomputing the prefix at every call). The reference for tests and the 'before' of bench.py arc."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None, return_size=False):
        return self.net.forward_masked(x, t, cond, return_size)

    def predict_size(self, cond):
        return self.net.predict_size(cond)


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

    def forward(self, x, context=None, mask=None):
        tokens = rearrange(x, "b c ... -> b (...) c")  # (B, L, C), L = all positions
        tokens = tokens + self.attn(rearrange(self.norm(x), "b c ... -> b (...) c"))
        if self.cross is not None:
            tokens = tokens + self.cross(self.cross_norm(tokens), context, mask)
        return rearrange(tokens, "b l c -> b c l").reshape(x.shape)


class UNet(nn.Module):
    """UNet denoiser (Ronneberger et al. 2015; Ho et al. 2020, arXiv:2006.11239; Dhariwal & Nichol 2021,
    arXiv:2105.05233): `dims` = 1, 2 or 3 from one definition.

    Per level: `num_res_blocks` ResBlocks (each followed by attention where `attn_levels` says so), then a stride-2
    conv down; a middle ResBlock-attention-ResBlock; the mirror path up (nearest + conv) with skip concatenation;
    a zero-initialised output conv, so the untrained model outputs exactly zero.
    Conditions (module docstring): class and vector embeddings are added to the time embedding that every ResBlock
    reads; the context is read by cross-attention at the attention levels; concat channels join x at the input.
    """

    PRESETS = {
        "tiny": dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(False, True), heads=2, groups=4),
        "small": dict(channels=64, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attn_levels=(False, False, True, True)),
        "base": dict(channels=128, channel_mult=(1, 2, 2, 4), num_res_blocks=2, attn_levels=(False, False, True, True)),
        "large": dict(channels=256, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(False, True, True, True)),
        # the brain-MRI project's 2D default: channels 128 / 256 / 256, attention at the two coarser levels
        "mri": dict(channels=128, channel_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(False, True, True)),
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
        film=False,
        num_classes=0,
        vector_dim=0,
        context_dim=0,
        concat_channels=0,
        checkpointing=False,
    ):
        super().__init__()
        self.checkpointing = checkpointing  # recompute each block in backward: less memory, ~30% more time (3D)
        if len(attn_levels) != len(channel_mult):
            raise ValueError(f"attn_levels {attn_levels} needs one entry per level of channel_mult {channel_mult}")
        self.dims, self.levels = dims, len(channel_mult)
        emb_dim = 4 * channels
        self.time_embed = TimestepEmbedder(emb_dim, freq_dim=emb_dim)
        self.cond_embed = ConditionEmbedder(emb_dim, num_classes, vector_dim, context_dim, concat_channels)
        block = lambda c_in, c_out: ResBlock(dims, c_in, c_out, emb_dim, groups, dropout, film)
        attn = lambda c: SpatialAttention(c, heads, groups, context_dim)

        self.conv_in = conv_nd(dims, in_channels + concat_channels, channels, 3, padding=1)
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

    def _run(self, layers, h, emb, context, mask):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(
                self._run_layers, layers, h, emb, context, mask, use_reentrant=False
            )
        return self._run_layers(layers, h, emb, context, mask)

    def _run_layers(self, layers, h, emb, context, mask):
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialAttention):
                h = layer(h, context, mask)
            else:
                h = layer(h)
        return h

    def forward(self, x, t, cond=None):
        factor = 2 ** (self.levels - 1)
        if x.ndim != self.dims + 2 or any(s % factor for s in x.shape[2:]):
            raise ValueError(f"UNet(dims={self.dims}) needs (B, C, *spatial) with sides divisible by {factor}")
        cond_emb, context, mask, concat = self.cond_embed(cond, x)
        emb = self.time_embed(t.expand(x.shape[0]))  # (B, 4 * channels)
        emb = emb if cond_emb is None else emb + cond_emb
        h = self.conv_in(x if concat is None else torch.cat([x, concat], dim=1))
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, context, mask)
            hs.append(h)
        h = self._run(self.mid, h, emb, context, mask)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb, context, mask)
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

    def __init__(self, dim, heads, mlp_ratio=4.0, context_dim=0, qk_norm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.cross = Attention(dim, heads, context_dim, qk_norm=qk_norm, zero_init=True) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(dim, 6 * dim)))

    def forward(self, x, c, context=None, mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each (B, D)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x), context, mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023, arXiv:2212.09748) on 1D, 2D or 3D inputs.

    Patches of any shape (`patch` an int or a tuple per axis, e.g. (1, 8) for a 1 x T time series as an image) ->
    tokens + fixed sin-cos positions -> adaLN-Zero blocks conditioned on time + class + vector embeddings ->
    adaLN final layer, zero-initialised, so the untrained model outputs exactly zero -> unpatchify.
    The context is read by cross-attention in every block; concat channels join x before patch embedding.
    qk_norm: RMSNorm on queries and keys (SD3, arXiv:2403.03206; not in the DiT paper).
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
        qk_norm=False,
        num_classes=0,
        vector_dim=0,
        context_dim=0,
        concat_channels=0,
    ):
        super().__init__()
        self.patch = (patch,) * dims if isinstance(patch, int) else tuple(patch)
        if len(self.patch) != dims:
            raise ValueError(f"patch {patch} must have one size per axis (dims={dims})")
        self.dims, self.dim, self.out_channels = dims, dim, out_channels or in_channels
        self.patch_embed = conv_nd(dims, in_channels + concat_channels, dim, self.patch, stride=self.patch)
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = ConditionEmbedder(dim, num_classes, vector_dim, context_dim, concat_channels)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio, context_dim, qk_norm) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(dim, 2 * dim)))
        self.linear_out = zero_module(nn.Linear(dim, math.prod(self.patch) * self.out_channels))

    def forward(self, x, t, cond=None):
        if x.ndim != self.dims + 2 or any(s % p for s, p in zip(x.shape[2:], self.patch)):
            raise ValueError(f"DiT(dims={self.dims}) needs (B, C, *spatial) with sides divisible by patch {self.patch}")
        cond_emb, context, mask, concat = self.cond_embed(cond, x)
        h = self.patch_embed(x if concat is None else torch.cat([x, concat], dim=1))  # (B, D, *grid)
        grid = h.shape[2:]
        # positions in the parameters' dtype: float32 under autocast (as before), bf16 in a bf16-cast model
        pos = sincos_position_embedding(grid, self.dim, x.device).to(self.patch_embed.weight.dtype)
        h = rearrange(h, "b d ... -> b (...) d") + pos  # (B, L, D)
        c = self.time_embed(t.expand(x.shape[0]))
        c = c if cond_emb is None else c + cond_emb
        for block in self.blocks:
            h = block(h, c, context, mask)
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

    def __init__(self, dim, heads, mlp_ratio=4.0, skip=False, qk_norm=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm=qk_norm)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, skip=None, mask=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """U-ViT (Bao et al. 2023, arXiv:2209.12152): everything is a token. [time, condition, context tokens, patches]
    with learned positions -> depth//2 blocks whose outputs feed long skips -> a middle block -> depth//2 blocks
    taking the skips -> linear to patches -> unpatchify -> a 3x3 conv (the paper's "last conv").
    The condition token is the class embedding (the paper's class token) plus the vector embedding (ours), present
    when num_classes or vector_dim > 0; the context (B, context_len, context_dim) is projected to context_len tokens
    (the paper's text-to-image variant), padding tokens masked out of every block's attention; concat channels
    join x before patch embedding. Positions are learned for `input_size`, so inputs must have that size.
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
        qk_norm=False,
        num_classes=0,
        vector_dim=0,
        context_dim=0,
        concat_channels=0,
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
        if context_dim and context_len < 1:
            raise ValueError(
                f"U-ViT with context_dim > 0 needs context_len >= 1 (its fixed token count); got {context_len}"
            )
        self.dims, self.dim, self.out_channels = dims, dim, out_channels or in_channels
        self.grid = tuple(s // p for s, p in zip(self.input_size, self.patch))
        context_len = context_len if context_dim else 0
        n_prefix = 1 + int(num_classes > 0 or vector_dim > 0) + context_len  # time, condition, context tokens
        self.patch_embed = conv_nd(dims, in_channels + concat_channels, dim, self.patch, stride=self.patch)
        self.time_embed = TimestepEmbedder(dim, freq_dim=dim)
        self.cond_embed = ConditionEmbedder(dim, num_classes, vector_dim, context_dim, concat_channels, context_len)
        self.context_embed = nn.Linear(context_dim, dim) if context_dim else None
        self.pos = nn.Parameter(torch.randn(1, n_prefix + math.prod(self.grid), dim) * 0.02)
        block = lambda skip: UViTBlock(dim, heads, mlp_ratio, skip, qk_norm)
        self.in_blocks = nn.ModuleList([block(False) for _ in range(depth // 2)])
        self.mid_block = block(False)
        self.out_blocks = nn.ModuleList([block(True) for _ in range(depth // 2)])
        self.norm_out = nn.LayerNorm(dim)
        self.linear_out = nn.Linear(dim, math.prod(self.patch) * self.out_channels)
        self.conv_out = conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)

    def forward(self, x, t, cond=None):
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"UViT was built for input_size {self.input_size}, got {tuple(x.shape[2:])}")
        cond_emb, context, context_mask, concat = self.cond_embed(cond, x)
        tokens = [self.time_embed(t.expand(x.shape[0]))[:, None]]  # (B, 1, D)
        if cond_emb is not None:
            tokens.append(cond_emb[:, None])
        if context is not None:
            tokens.append(self.context_embed(context))  # (B, context_len, D)
        n_prefix = sum(tok.shape[1] for tok in tokens)
        patches = self.patch_embed(x if concat is None else torch.cat([x, concat], dim=1))
        tokens.append(rearrange(patches, "b d ... -> b (...) d"))  # (B, L, D)
        h = torch.cat(tokens, dim=1) + self.pos
        mask = None  # every token may attend to every token except padded context tokens
        if context_mask is not None:
            n_before = n_prefix - context_mask.shape[1]
            mask = F.pad(context_mask, (n_before, h.shape[1] - n_prefix), value=True)  # (B, L_all)
        skips = []
        for block in self.in_blocks:
            h = block(h, mask=mask)
            skips.append(h)
        h = self.mid_block(h, mask=mask)
        for block in self.out_blocks:
            h = block(h, skips.pop(), mask)
        h = self.linear_out(self.norm_out(h))[:, n_prefix:]  # patch tokens only: (B, L, p * C)
        return self.conv_out(unpatchify(h, self.grid, self.patch, self.out_channels))


# ----------------------------------------------------------------------------------------------------------------
# HDiT
# ----------------------------------------------------------------------------------------------------------------


def neighbourhood_tiles(grid, kernel, device=None):
    """Tiles with halos for neighbourhood attention (NAT, Hassani et al. 2023, arXiv:2204.07143) on a row-major
    token grid -> queries (T, Q) and keys (T, R) flat token indices, mask (T, Q, R) bool: tile t holds the Q queries
    queries[t] and the R tokens keys[t] of their halo, mask[t, i, j] True where key j is in query i's neighbourhood.
    Neighbourhood (NATTEN's rule): per axis of size n, the k = min(kernel, n) positions from
    clamp(i - kernel // 2, 0, n - k), a window centred on i and shifted inward at the borders; prod(k) keys a query.
    Per axis a tile spans s = min(64^(1/dims), n) positions (the last tile shifted inward, so it may repeat some of
    its neighbour's queries) and its halo min(s + k - 1, n): Q and R do not grow with the grid, so the cost is
    O(L R), never L x L.
    """
    dims = len(grid)
    kernel = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)

    def place(x, *axes):  # view x at `axes` of the layout (tiles_1..d, queries_1..d, halo_1..d), size 1 elsewhere
        shape = [1] * (3 * dims)
        for axis, size in zip(axes, x.shape):
            shape[axis] = size
        return x.view(shape)

    queries = keys = torch.zeros((), dtype=torch.long, device=device)
    mask = torch.ones((), dtype=torch.bool, device=device)
    for a, (n, size) in enumerate(zip(grid, kernel)):
        stride, k, s = math.prod(grid[a + 1 :]), min(size, n), min(round(64 ** (1 / dims)), n)
        starts = (torch.arange(-(-n // s), device=device) * s).clamp(max=n - s)  # (tiles,) first query of each
        q_pos = starts[:, None] + torch.arange(s, device=device)  # (tiles, s)
        r = min(s + k - 1, n)
        r_pos = (starts - size // 2).clamp(0, n - r)[:, None] + torch.arange(r, device=device)  # (tiles, r) halos
        first = (q_pos - size // 2).clamp(0, n - k)[..., None]  # (tiles, s, 1) each query's window start
        inside = (r_pos[:, None] >= first) & (r_pos[:, None] < first + k)  # (tiles, s, r)
        queries = queries + place(q_pos * stride, a, dims + a)
        keys = keys + place(r_pos * stride, a, 2 * dims + a)
        mask = mask & place(inside, a, dims + a, 2 * dims + a)
    tiles = math.prod(mask.shape[:dims])
    queries, keys = queries.reshape(tiles, -1), keys.reshape(tiles, -1)
    return queries, keys, mask.reshape(tiles, queries.shape[1], keys.shape[1])


def neighbourhood_attention(q, k, v, grid, kernel, scale=None):
    """q, k, v (B, heads, L, d), tokens in row-major order on `grid` -> (B, heads, L, d): each query attends to the
    keys of its neighbourhood only, softmax(scale q . k_j) over them (see neighbourhood_tiles). Pure PyTorch: per
    tile, F.scaled_dot_product_attention over its halo with the neighbourhood as mask; time and memory O(L)."""
    queries, keys, mask = neighbourhood_tiles(grid, kernel, q.device)
    heads = q.shape[1]
    q_t = rearrange(q[:, :, queries], "b h t q d -> b (h t) q d")  # (B, heads * tiles, Q, d)
    k_t, v_t = (rearrange(x[:, :, keys], "b h t r d -> b (h t) r d") for x in (k, v))  # (B, heads * tiles, R, d)
    out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask.repeat(heads, 1, 1), scale=scale)
    pick = torch.empty(q.shape[2], dtype=torch.long, device=q.device)
    pick[queries.flatten()] = torch.arange(queries.numel(), device=q.device)  # one tile's copy of each query
    return rearrange(out, "b (h t) q d -> b h (t q) d", h=heads)[:, :, pick]


def axial_rope(grid, cell, head_dim, device=None):
    """Axial rotary position tables (RoPE, Su et al. 2021, arXiv:2104.09864; axial as in HDiT, arXiv:2401.11605):
    (cos, sin), each (prod(grid), r), r = dims * n angles, n = head_dim // (4 dims) frequencies per axis,
    log-spaced in [pi, 10 pi); rotating 2r channels covers half of each head (the paper's split), shared equally by
    the axes (3D: 6n <= head_dim / 2 channels). cell: level-0 tokens per token of this level along each axis. A
    token sits at the centre of its cell in one frame for every level, where the longest side of the level-0 grid
    spans [-1, 1] and every axis has the same unit (frequencies and frame as in the authors' released code).
    """
    n = head_dim // (4 * len(grid))  # departure for dims = 1 or 3: the paper's 2D split generalised per axis
    log_f = torch.linspace(math.log(math.pi), math.log(10 * math.pi), n + 1, device=device)[:-1]
    extent = [g * c for g, c in zip(grid, cell)]  # the level-0 grid
    axes = [
        ((torch.arange(g, device=device, dtype=torch.float32) + 0.5) * c - e / 2) * (2 / max(extent))
        for g, c, e in zip(grid, cell, extent)
    ]
    coords = torch.meshgrid(*axes, indexing="ij")
    angles = torch.cat([pos.reshape(-1, 1) * log_f.exp() for pos in coords], dim=-1)  # (L, dims * n), float32
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the channel pairs (x_i, x_{i+r}), i < r, of x (..., L, d) by the angles of (cos, sin) (L, r):
    x_i' = x_i cos - x_{i+r} sin, x_{i+r}' = x_{i+r} cos + x_i sin; channels 2r.. pass unchanged (RoPE,
    arXiv:2104.09864, eq. 34, in the half-split channel layout)."""
    r = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # tables are float32; follow the activations (bf16 / fp16)
    x1, x2, rest = x[..., :r], x[..., r : 2 * r], x[..., 2 * r :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _merge_pattern(n):
    fine = " ".join(f"g{i} m{i}" for i in range(n))
    coarse, block = " ".join(f"g{i}" for i in range(n)), " ".join(f"m{i}" for i in range(n))
    return f"b ({fine}) d", f"b ({coarse}) ({block} d)"


def merge_tokens(x, grid, factor):
    """(B, prod(grid), D) row-major on the fine `grid` -> (B, prod(grid / factor), prod(factor) * D): each coarse
    token concatenates its factor block of fine tokens, ordered (m_1, ..., m_n, D) (PixelUnshuffle on tokens)."""
    fine, coarse = _merge_pattern(len(grid))
    sizes = {f"g{i}": g // f for i, (g, f) in enumerate(zip(grid, factor))} | {f"m{i}": f for i, f in enumerate(factor)}
    return rearrange(x, f"{fine} -> {coarse}", **sizes)


def split_tokens(x, grid, factor):
    """Inverse of merge_tokens (PixelShuffle on tokens): (B, prod(grid), prod(factor) * D) on the coarse `grid` ->
    (B, prod(grid * factor), D) row-major on the fine grid."""
    fine, coarse = _merge_pattern(len(grid))
    sizes = {f"g{i}": g for i, g in enumerate(grid)} | {f"m{i}": f for i, f in enumerate(factor)}
    return rearrange(x, f"{coarse} -> {fine}", **sizes)


class TokenMerge(nn.Module):
    """HDiT token merge (arXiv:2401.11605): concatenate each factor block of tokens, then Linear to the next width.
    Also the patch embedding, applied to pixels as tokens (the paper's PixelUnshuffle + Linear patching)."""

    def __init__(self, dim_in, dim_out, factor):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(math.prod(factor) * dim_in, dim_out, bias=False)

    def forward(self, x, grid):
        """x (B, prod(grid), dim_in) on the fine grid -> (B, prod(grid / factor), dim_out)."""
        return self.proj(merge_tokens(x, grid, self.factor))


class TokenSplit(nn.Module):
    """HDiT token split (arXiv:2401.11605): Linear to prod(factor) * width, then PixelShuffle-style back to the
    fine grid."""

    def __init__(self, dim_in, dim_out, factor):
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(dim_in, math.prod(factor) * dim_out, bias=False)

    def forward(self, x, grid):
        """x (B, prod(grid), dim_in) on the coarse grid -> (B, prod(grid * factor), dim_out)."""
        return split_tokens(self.proj(x), grid, self.factor)


class AdaRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467) with a per-sample channel scale 1 + W c regressed from the
    mapping network's output c (HDiT, arXiv:2401.11605); W starts at zero, so the scale starts at 1."""

    def __init__(self, dim, cond_dim):
        super().__init__()
        self.linear = zero_module(nn.Linear(cond_dim, dim, bias=False))

    def forward(self, x, c):
        """x (B, L, D), c (B, cond_dim) -> (B, L, D)."""
        return F.rms_norm(x, x.shape[-1:], eps=1e-6) * (1 + self.linear(c))[:, None]


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020, arXiv:2002.05202): W_2 (x W * GELU(x V)); W_2
    zero-initialised as in HDiT, so a residual branch starts as zero."""

    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)
        self.drop = nn.Dropout(dropout)
        self.down = zero_module(nn.Linear(hidden, dim, bias=False))

    def forward(self, x):
        x, gate = self.up(x).chunk(2, dim=-1)
        return self.down(self.drop(x * F.gelu(gate)))


class MappingNetwork(nn.Module):
    """HDiT's mapping network (arXiv:2401.11605): RMSNorm, `depth` residual RMSNorm + GEGLU blocks, RMSNorm; its
    output conditions every AdaRMSNorm."""

    def __init__(self, dim, depth, mlp_ratio=3.0, dropout=0.0):
        super().__init__()
        self.norm_in, self.norm_out = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.norms = nn.ModuleList([nn.RMSNorm(dim, eps=1e-6) for _ in range(depth)])
        self.ffs = nn.ModuleList([GEGLU(dim, int(dim * mlp_ratio), dropout) for _ in range(depth)])

    def forward(self, x):
        x = self.norm_in(x)
        for norm, ff in zip(self.norms, self.ffs):
            x = x + ff(norm(x))
        return self.norm_out(x)


class HDiTBlock(nn.Module):
    """HDiT transformer block (Crowson et al. 2024, arXiv:2401.11605): AdaRMSNorm -> cosine-similarity attention
    (unit q and k, learned per-head temperature, init 10; Henry et al. 2020, arXiv:2010.04245) with axial RoPE on
    q and k -> zero-initialised projection, residual; AdaRMSNorm -> GEGLU, residual. Attention is neighbourhood
    attention with `kernel`, or global (F.scaled_dot_product_attention) when kernel is 0. context_dim > 0 adds
    cross-attention to the context after self-attention (ours; the paper has no text conditioning).
    """

    def __init__(self, dim, head_dim, cond_dim, kernel=0, mlp_ratio=3.0, dropout=0.0, context_dim=0):
        super().__init__()
        self.heads, self.kernel = dim // head_dim, kernel
        self.norm1 = AdaRMSNorm(dim, cond_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.temperature = nn.Parameter(torch.full((self.heads,), 10.0))
        self.drop = nn.Dropout(dropout)
        self.proj = zero_module(nn.Linear(dim, dim, bias=False))
        # departure: cross-attention (not in the paper), after an AdaRMSNorm, output projection zero at init
        self.cross_norm = AdaRMSNorm(dim, cond_dim) if context_dim else None
        self.cross = Attention(dim, self.heads, context_dim, zero_init=True) if context_dim else None
        self.norm2 = AdaRMSNorm(dim, cond_dim)
        self.ff = GEGLU(dim, int(dim * mlp_ratio), dropout)

    def forward(self, x, c, grid, rope, context=None, mask=None):
        """x (B, L, D) on `grid`, c (B, cond_dim), rope = axial_rope(...) tables of this level -> (B, L, D)."""
        q, k, v = rearrange(self.qkv(self.norm1(x, c)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        q = F.normalize(q, dim=-1, eps=1e-6) * self.temperature.to(q.dtype)[:, None, None]
        q, k = apply_rope(q, *rope), apply_rope(F.normalize(k, dim=-1, eps=1e-6), *rope)  # rotations keep norms
        if self.kernel:
            out = neighbourhood_attention(q, k, v, grid, self.kernel, scale=1.0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # the temperature is already in q
        x = x + self.proj(self.drop(rearrange(out, "b h l d -> b l (h d)")))
        if self.cross is not None:
            x = x + self.cross(self.cross_norm(x, c), context, mask)
        return x + self.ff(self.norm2(x, c))


class HDiT(nn.Module):
    """Hourglass Diffusion Transformer (Crowson et al. 2024, arXiv:2401.11605) on 1D, 2D or 3D inputs.

    Patching (PixelUnshuffle + Linear; `patch` an int or a tuple per axis, e.g. (1, 8) for a 1 x T series) -> per
    level i < last: depths[i] blocks with neighbourhood attention (`kernel`; a side smaller than the kernel is
    attended whole), keep a skip, token merge (`merge` per axis) to widths[i + 1] -> the last level, the middle of
    the hourglass: depths[-1] blocks with global attention -> back up: token split, x = lerp(skip, x, w) with a
    learned w per level (init 0.5), depths[i] blocks -> RMSNorm -> zero-initialised Linear -> unpatchify, so the
    untrained model outputs exactly zero. Every level but the last has depths[i] blocks on each side, encoder and
    decoder, as in the paper's released configurations. Residual outputs (attention, GEGLU) start at zero (paper).
    Conditioning: mapping network (time embedding + class/vector embedding) -> every AdaRMSNorm.
    Departures from the paper:
      - time: the shared TimestepEmbedder of t in [0, 1] replaces Fourier features of ln(sigma) / 4; no
        augmentation-conditioning input (pass augmentation parameters as the `vector` condition);
      - the context is read by cross-attention in the middle (global) level's blocks only (no text in the paper);
        concat channels join x before patching;
      - dims = 1 or 3 and per-axis patch/merge sizes (the paper: 2D, square); RoPE frequencies split over the axes;
      - neighbourhood attention in pure PyTorch, as masked attention over tiles with halos (NATTEN's semantics,
        not its kernels).
    kernel=0 gives global attention at every level.
    """

    PRESETS = {
        "tiny": dict(widths=(32, 64), depths=(1, 1), head_dim=16, mapping_width=64),
        "eeg": dict(patch=2, widths=(64, 128, 256), depths=(2, 2, 3), head_dim=64, kernel=7, mapping_width=256),
        "imagenet256": dict(patch=4, widths=(384, 768), depths=(2, 11), head_dim=64, kernel=7, mapping_width=768),
    }

    def __init__(
        self,
        in_channels=3,
        out_channels=None,
        dims=2,
        patch=2,
        widths=(64, 128, 256),
        depths=(2, 2, 3),
        head_dim=64,
        kernel=7,
        merge=2,
        mlp_ratio=3.0,
        mapping_width=256,
        mapping_depth=2,
        dropout=0.0,
        num_classes=0,
        vector_dim=0,
        context_dim=0,
        concat_channels=0,
    ):
        super().__init__()
        self.patch = (patch,) * dims if isinstance(patch, int) else tuple(patch)
        self.merge = (merge,) * dims if isinstance(merge, int) else tuple(merge)
        if len(self.patch) != dims or len(self.merge) != dims:
            raise ValueError(f"patch {patch} and merge {merge} need one size per axis (dims={dims})")
        if len(widths) != len(depths) or any(w % head_dim for w in widths):
            raise ValueError(
                f"widths {widths} need one depth each (depths {depths}) and to be multiples of {head_dim=}"
            )
        if head_dim < 4 * dims:
            raise ValueError(f"{head_dim=} leaves no RoPE frequency per axis; it needs >= 4 * dims = {4 * dims}")
        self.dims, self.levels, self.head_dim = dims, len(widths), head_dim
        self.out_channels = out_channels or in_channels
        self.time_embed = TimestepEmbedder(mapping_width)  # departure: not Fourier features of ln(sigma) / 4
        self.cond_embed = ConditionEmbedder(mapping_width, num_classes, vector_dim, context_dim, concat_channels)
        self.mapping = MappingNetwork(mapping_width, mapping_depth, mlp_ratio, dropout)
        self.patch_in = TokenMerge(in_channels + concat_channels, widths[0], self.patch)
        block = lambda i, context_dim=0: HDiTBlock(
            widths[i], head_dim, mapping_width, 0 if i == self.levels - 1 else kernel, mlp_ratio, dropout, context_dim
        )
        outer = range(self.levels - 1)
        self.down = nn.ModuleList([nn.ModuleList([block(i) for _ in range(depths[i])]) for i in outer])
        self.merges = nn.ModuleList([TokenMerge(widths[i], widths[i + 1], self.merge) for i in outer])
        # departure: cross-attention to the context, in the middle level only
        self.mid = nn.ModuleList([block(self.levels - 1, context_dim) for _ in range(depths[-1])])
        self.splits = nn.ModuleList([TokenSplit(widths[i + 1], widths[i], self.merge) for i in outer])
        self.skip_weights = nn.ParameterList([nn.Parameter(torch.tensor(0.5)) for _ in outer])
        self.up = nn.ModuleList([nn.ModuleList([block(i) for _ in range(depths[i])]) for i in outer])
        self.norm_out = nn.RMSNorm(widths[0], eps=1e-6)
        self.linear_out = zero_module(nn.Linear(widths[0], math.prod(self.patch) * self.out_channels, bias=False))

    def forward(self, x, t, cond=None):
        factor = tuple(p * m ** (self.levels - 1) for p, m in zip(self.patch, self.merge))
        if x.ndim != self.dims + 2 or any(s % f for s, f in zip(x.shape[2:], factor)):
            raise ValueError(
                f"HDiT(dims={self.dims}) needs (B, C, *spatial) with sides divisible by patch * merge^(levels-1) = "
                f"{factor}, got {tuple(x.shape)}"
            )
        cond_emb, context, mask, concat = self.cond_embed(cond, x)
        c = self.time_embed(t.expand(x.shape[0]))
        c = self.mapping(c if cond_emb is None else c + cond_emb)  # (B, mapping_width)
        x = x if concat is None else torch.cat([x, concat], dim=1)
        pixels = rearrange(x, "b c ... -> b (...) c")  # (B, prod(spatial), C): pixels as tokens
        h = self.patch_in(pixels, x.shape[2:])  # (B, L, widths[0])
        grid, cell = tuple(s // p for s, p in zip(x.shape[2:], self.patch)), (1,) * self.dims
        skips = []
        for blocks, merge in zip(self.down, self.merges):
            rope = axial_rope(grid, cell, self.head_dim, x.device)
            for blk in blocks:
                h = blk(h, c, grid, rope)
            skips.append((h, grid, cell, rope))
            h = merge(h, grid)
            grid = tuple(g // m for g, m in zip(grid, self.merge))
            cell = tuple(n * m for n, m in zip(cell, self.merge))
        rope = axial_rope(grid, cell, self.head_dim, x.device)
        for blk in self.mid:
            h = blk(h, c, grid, rope, context, mask)
        for blocks, split, weight in reversed(list(zip(self.up, self.splits, self.skip_weights))):
            skip, fine_grid, cell, rope = skips.pop()
            h = torch.lerp(skip, split(h, grid), weight.to(h.dtype))  # learned skip interpolation
            grid = fine_grid
            for blk in blocks:
                h = blk(h, c, grid, rope)
        h = self.linear_out(self.norm_out(h))  # (B, L, prod(patch) * C_out)
        return unpatchify(h, grid, self.patch, self.out_channels)


# ----------------------------------------------------------------------------------------------------------------
# LocalMamba
# ----------------------------------------------------------------------------------------------------------------


def _linear_recurrence(a, x):
    """h_t = a_t h_{t-1} + x_t, h_{-1} = 0, along dim -2 of a, x (..., T, N) with a in [0, 1] -> h (..., T, N).

    The work-efficient even/odd recursion of a parallel prefix scan (Blelloch 1990, "Prefix sums and their
    applications"; a first-order recurrence is a scan over (a, x) pairs): steps 2k, 2k+1 fuse into one step
    (a_{2k+1} a_{2k}, a_{2k+1} x_{2k} + x_{2k+1}), the half-length recurrence gives h at odd t, and
    h_{2k} = a_{2k} h_{2k-1} + x_{2k}. O(T) work in log2(T) levels; it only multiplies decays <= 1, so strong decay
    underflows to 0 where exp(-cumsum(delta A)) factorisations overflow.
    """
    T = x.shape[-2]
    if T == 1:
        return x
    if T % 2:  # odd length: append the identity step (a = 1, x = 0)
        a, x = F.pad(a, (0, 0, 0, 1), value=1.0), F.pad(x, (0, 0, 0, 1))
    a_even, a_odd, x_even, x_odd = a[..., 0::2, :], a[..., 1::2, :], x[..., 0::2, :], x[..., 1::2, :]
    h_odd = _linear_recurrence(a_odd * a_even, a_odd * x_even + x_odd)  # h_1, h_3, ...
    h_even = x_even + a_even * F.pad(h_odd[..., :-1, :], (0, 0, 1, 0))  # h_0 = x_0, h_2k = a_2k h_2k-1 + x_2k
    return rearrange([h_even, h_odd], "two ... t n -> ... (t two) n")[..., :T, :]


def _scan_chunk(u, delta, A, B, C, h):
    """One chunk of the selective scan from state h (b, g, d, N): u, delta (b, g, d, T); A (g, d, N); B, C
    (b, g, N, T) -> y (b, g, d, T) with y_t = C_t . h_t, and the state after the chunk's last step."""
    a = torch.exp(delta[..., None] * A[:, :, None])  # (b, g, d, T, N): exp(delta_t A) in (0, 1]
    x = (delta * u)[..., None] * rearrange(B, "b g n t -> b g 1 t n")  # (b, g, d, T, N): delta_t B_t u_t
    x = torch.cat([x[..., :1, :] + a[..., :1, :] * h[..., None, :], x[..., 1:, :]], dim=-2)  # the carried state
    states = _linear_recurrence(a, x)
    return torch.einsum("bgdtn,bgnt->bgdt", states, C), states[..., -1, :].clone()  # a copy frees the chunk's states


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=256):
    """Selective scan of Mamba (Gu & Dao 2023, arXiv:2312.00752, alg. 2, eq. 2 with the discretisation
    A_bar = exp(delta A), B_bar = delta B of its kernel), per channel d and state n:
        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t + D u_t,    y_t <- y_t * SiLU(z_t).

    Shapes as mamba_ssm's selective_scan_fn, which is used instead when importable and u is on CUDA: u, delta, z
    (B, D_in, L); A (D_in, N), negative; B, C (B, N, L) or (B, G, N, L), group g shared by channels g D_in/G to
    (g+1) D_in/G - 1; D, delta_bias (D_in,); delta <- softplus(delta + delta_bias) if delta_softplus -> y (B, D_in, L)
    in u's dtype. This PyTorch path computes in float32 (float64 if given) even under autocast, runs the chunks of
    `chunk` steps in sequence, each with the parallel scan of _linear_recurrence from the previous chunk's state
    (O(L) work, L / chunk iterations), and under autograd recomputes each chunk in backward (activation
    checkpointing), so only the chunk-boundary states (B, D_in, N) are kept, never all (B, D_in, L, N) states.
    """
    if mamba_selective_scan_fn is not None and u.is_cuda:
        D, delta_bias = (None if v is None else v.float() for v in (D, delta_bias))
        return mamba_selective_scan_fn(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus)
    dtype = u.dtype
    plain = not torch.amp.is_autocast_available(u.device.type)  # the meta device (shape checks) has no autocast
    with contextlib.nullcontext() if plain else torch.autocast(u.device.type, enabled=False):
        f = torch.promote_types(dtype, torch.float32)
        u, delta, A, B, C = (v.to(f) for v in (u, delta, A, B, C))
        if delta_bias is not None:
            delta = delta + delta_bias.to(f)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        B, C = (v if v.ndim == 4 else v[:, None] for v in (B, C))  # (B, G, N, L)
        G = B.shape[1]
        u_g, delta_g = (rearrange(v, "b (g d) l -> b g d l", g=G) for v in (u, delta))
        A_g = rearrange(A, "(g d) n -> g d n", g=G)
        h = u.new_zeros(*u_g.shape[:3], A.shape[-1])  # (B, G, D_in / G, N)
        ys = []
        for start in range(0, u.shape[-1], chunk):
            part = slice(start, start + chunk)
            args = (u_g[..., part], delta_g[..., part], A_g, B[..., part], C[..., part], h)
            if torch.is_grad_enabled():  # keep the chunk's inputs only; its states are recomputed in backward
                y, h = torch.utils.checkpoint.checkpoint(_scan_chunk, *args, use_reentrant=False)
            else:
                y, h = _scan_chunk(*args)
            ys.append(y)
        y = rearrange(torch.cat(ys, dim=-1), "b g d l -> b (g d) l")
        if D is not None:
            y = y + D.to(f)[:, None] * u
        if z is not None:
            y = y * F.silu(z.to(f))
    return y.to(dtype)


def _parse_scan(name, dims, window):
    """Scan name -> (kind "h" | "v" | "w", window side, flip); ValueError for an unknown name or "v" in 1D."""
    base = name.removesuffix("_flip")
    if base in ("h", "v") or (base[:1] == "w" and (base[1:] == "" or base[1:].isdigit() and int(base[1:]) > 0)):
        if base == "v" and dims == 1:
            raise ValueError(f"scan {name!r} needs dims >= 2 (a 1D sequence has only the horizontal order)")
        return base[0], int(base[1:] or window) if base[0] == "w" else 0, name != base
    raise ValueError(f"unknown scan {name!r}; scans are h, v, w (side `window`) or w<k>, each optionally + '_flip'")


def scan_order(grid, name, window=7, device=None):
    """Token order of the scan `name` on a token grid numbered row-major -> (order, inverse), long (L,):
    tokens[:, order] is the scanned sequence and scanned[:, inverse] restores row-major order.

    h: row-major (last axis fastest); v: column-major (first axis fastest; 3D: (w, h, d) order, ours; not in 1D);
    w / w<k>: LocalMamba's local scan (Huang et al. 2024, arXiv:2403.09338): k x k (x k) windows visited row-major,
    row-major inside each (3D windows ours; in 1D this is the order of h); a side not divisible by k ends in a
    shorter window instead of padding (ours), so no dummy token enters the recurrence and the order stays a
    permutation of the L real tokens; <name>_flip: the reverse order.
    """
    kind, side, flip = _parse_scan(name, len(grid), window)
    order = torch.arange(math.prod(grid), device="cpu").view(grid)  # boolean indexing below has no meta kernel
    axes = [f"a{i}" for i in range(len(grid))]
    if kind == "v":
        order = rearrange(order, f"{' '.join(axes)} -> ({' '.join(reversed(axes))})")
    elif kind == "w":
        order = F.pad(order, [p for s in reversed(grid) for p in (0, -s % side)], value=-1)  # -1: outside the grid
        windows, inside = " ".join(f"g{i}" for i in range(len(grid))), " ".join(f"w{i}" for i in range(len(grid)))
        pattern = " ".join(f"(g{i} w{i})" for i in range(len(grid))) + f" -> ({windows} {inside})"
        order = rearrange(order, pattern, **{f"w{i}": side for i in range(len(grid))})
        order = order[order >= 0]
    order = order.flatten().flip(0) if flip else order.flatten()
    return order.to(device), torch.argsort(order).to(device)


class SCAttn(nn.Module):
    """Spatial and channel attention on one scan branch before the branches are summed (LocalMamba, arXiv:2403.09338,
    fig. 3b): x_n = LN(x) (B, L, E); g = GELU(W_g mean_L(x_n)) (B, 1, E / 8); channel weights sigmoid(W_c g)
    (B, 1, E); spatial weights sigmoid(W_s [GELU(W_l x_n), g]) (B, L, 1); returns x * channel * spatial."""

    def __init__(self, dim, ratio=0.125):
        super().__init__()
        reduced = max(1, int(dim * ratio))
        self.norm = nn.LayerNorm(dim)
        self.global_reduce, self.local_reduce = nn.Linear(dim, reduced), nn.Linear(dim, reduced)
        self.channel_select, self.spatial_select = nn.Linear(reduced, dim), nn.Linear(2 * reduced, 1)

    def forward(self, x):
        x_n = self.norm(x)
        g = F.gelu(self.global_reduce(x_n.mean(1, keepdim=True)))  # (B, 1, E / 8)
        local = F.gelu(self.local_reduce(x_n))  # (B, L, E / 8)
        channel = torch.sigmoid(self.channel_select(g))
        spatial = torch.sigmoid(self.spatial_select(torch.cat([local, g.expand_as(local)], dim=-1)))
        return x * channel * spatial


class MultiScanMamba(nn.Module):
    """The Mamba block (Gu & Dao 2023, arXiv:2312.00752, fig. 3) along K scan orders (LocalMamba, arXiv:2403.09338):
    in_proj: x (B, L, dim) -> u, z (B, L, E), E = expand * dim; per order k: u, z gathered into scan order, causal
    depthwise conv (kernel d_conv) along the scan, SiLU, x_proj -> (dt (R = ceil(dim / 16)), B_t, C_t (N)),
    delta = dt_proj(dt), selective scan with A = -exp(A_log), D, gate SiLU(z); scattered back to token order, SCAttn;
    summed over k; out_proj. The orders share in_proj, out_proj and SCAttn, each has its own conv, x_proj, dt_proj,
    A, D (as the paper's code and Vim's bidirectional block, arXiv:2401.09417); the K orders run as one scan with K
    groups of (B_t, C_t). Init as Mamba's: A_n = n (S4D-real, arXiv:2206.11893), D = 1, dt_proj weight
    U(+-R^-1/2), bias softplus^-1(dt), dt log-uniform in [1e-3, 0.1].
    """

    def __init__(self, dim, scans, d_state=16, expand=2, d_conv=4):
        super().__init__()
        K, E, R = len(scans), expand * dim, math.ceil(dim / 16)
        self.scans, self.d_state, self.rank = tuple(scans), d_state, R
        self.in_proj = nn.Linear(dim, 2 * E, bias=False)
        self.conv = nn.Conv1d(K * E, K * E, d_conv, groups=K * E, padding=d_conv - 1)  # per order and channel
        self.x_proj = nn.Parameter(torch.empty(K, E, R + 2 * d_state).uniform_(-(E**-0.5), E**-0.5))
        self.dt_proj = nn.Parameter(torch.empty(K, R, E).uniform_(-(R**-0.5), R**-0.5))
        dt = torch.exp(torch.empty(K, E).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(K, E, 1))  # (K, E, N)
        self.D = nn.Parameter(torch.ones(K, E))
        self.attn = SCAttn(E)
        self.out_proj = nn.Linear(E, dim, bias=False)

    def forward(self, x, orders):
        """x (B, L, dim) in row-major token order, orders {name: (order, inverse)} from scan_order -> (B, L, dim)."""
        K, L = len(self.scans), x.shape[1]
        xz = self.in_proj(x)
        xz = torch.stack([xz.index_select(1, orders[name][0]) for name in self.scans], dim=1)  # (B, K, L, 2E)
        u, z = rearrange(xz, "b k l (two e) -> two b (k e) l", two=2)
        u = F.silu(self.conv(u)[..., :L])  # causal along each scan
        dbc = torch.einsum("bkel,ker->bkrl", rearrange(u, "b (k e) l -> b k e l", k=K), self.x_proj)
        dt, B, C = dbc.split([self.rank, self.d_state, self.d_state], dim=2)  # (B, K, R | N | N, L)
        delta = rearrange(torch.einsum("bkrl,kre->bkel", dt, self.dt_proj), "b k e l -> b (k e) l")
        A = -torch.exp(rearrange(self.A_log.float(), "k e n -> (k e) n"))
        y = selective_scan(u, delta, A, B, C, self.D.flatten(), z, self.dt_bias.flatten(), delta_softplus=True)
        y = rearrange(y, "b (k e) l -> k b l e", k=K)
        y = torch.stack([y[k].index_select(1, orders[name][1]) for k, name in enumerate(self.scans)])  # token order
        y = rearrange(self.attn(rearrange(y, "k b l e -> (k b) l e")), "(k b) l e -> k b l e", k=K)
        return self.out_proj(y.sum(0))


class LocalMambaBlock(nn.Module):
    """adaLN-Zero (DiT, arXiv:2212.09748) around the multi-scan Mamba: x + gate * mixer(LN(x) * (1 + scale) + shift),
    shift/scale/gate regressed from the conditioning vector c, the gate zero at init so the block starts as the
    identity (ours: the paper's blocks are unconditional); with mlp_ratio > 0 an MLP follows the same way (ours:
    LocalVim's and the original VMamba's blocks have none)."""

    def __init__(self, dim, emb_dim, scans, d_state, expand, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = MultiScanMamba(dim, scans, d_state, expand)
        hidden = int(dim * mlp_ratio)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if hidden else None
        self.mlp = (
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
            if hidden
            else None
        )
        self.ada = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(emb_dim, (6 if hidden else 3) * dim)))

    def forward(self, x, c, orders):
        shift1, scale1, gate1, *mlp_mod = self.ada(c).chunk(3 if self.mlp is None else 6, dim=-1)  # each (B, dim)
        x = x + gate1[:, None] * self.mixer(modulate(self.norm1(x), shift1, scale1), orders)
        if self.mlp is not None:
            shift2, scale2, gate2 = mlp_mod
            x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class PatchMerge(nn.Module):
    """Patch merging (Swin, Liu et al. 2021, arXiv:2103.14030, sec. 3.1; as in VMamba and LocalVMamba) on an N-D token
    grid: each 2 x ... x 2 group of tokens -> concatenated (2^dims C_in) -> LayerNorm -> Linear to C_out; halves every
    side. up=True is the mirror (patch expanding, Swin-Unet, arXiv:2105.05537): Linear C_in -> 2^dims C_out, each
    token split into a 2 x ... x 2 group, LayerNorm; doubles every side."""

    def __init__(self, dims, c_in, c_out, up=False):
        super().__init__()
        self.factor, self.up = (2,) * dims, up
        self.norm = nn.LayerNorm(c_out if up else 2**dims * c_in)
        self.proj = nn.Linear(c_in, 2**dims * c_out, bias=False) if up else nn.Linear(2**dims * c_in, c_out, bias=False)

    def forward(self, x, grid):
        """x (B, prod(grid), C_in) -> (B, prod(new grid), C_out), new grid; the token layout of HDiT's merge / split."""
        if self.up:
            return self.norm(split_tokens(self.proj(x), grid, self.factor)), tuple(2 * s for s in grid)
        return self.proj(self.norm(merge_tokens(x, grid, self.factor))), tuple(s // 2 for s in grid)


class LocalMamba(nn.Module):
    """LocalMamba (Huang et al. 2024, arXiv:2403.09338) as a U-shaped diffusion backbone on 1D, 2D or 3D inputs.

    Patches -> stage s: depths[s] adaLN-Zero multi-scan Mamba blocks of width widths[s], patch merging between
    stages (the paper's hierarchical LocalVMamba) -> mirrored up-stages: patch expanding, concatenation with the
    encoder's output at that stage and a Linear (a long skip), depths[s] blocks (the U-shape is ours: the paper's
    backbone is an encoder) -> adaLN final layer, zero-initialised, so the untrained model outputs exactly zero ->
    unpatchify. No position embedding: the scans are order-aware (as in VMamba; Vim adds one).
    scans (names: scan_order): one tuple for every layer, or a list of tuples with layer i (encoder then decoder, in
    the order they run) using scans[i % len(scans)]: the paper searches them per layer, we take them as given.
    None: 2D/3D layers alternate ("h", "v", "w") and ("h_flip", "v_flip", "w_flip") (ours: with forward orders only,
    the first token of every order never sees the rest of the grid); 1D uses ("h", "h_flip") in every layer.
    Conditions (module docstring): time + class + vector embeddings + a Linear of the masked mean of the context
    tokens (a pooled-text vector as in SD3, arXiv:2403.03206; ours) form the vector c read by every adaLN; concat
    channels join x before patch embedding.
    """

    PRESETS = {  # tiny for tests; eeg: the reference EEG project's sizes (scans None: h, v, w7 alternating with flips)
        "tiny": dict(widths=(32, 64), depths=(1, 1), d_state=8),
        "eeg": dict(widths=(64, 128, 256, 512), depths=(2, 2, 6, 2), d_state=16, window=7),
    }

    def __init__(
        self,
        in_channels=3,
        out_channels=None,
        dims=2,
        patch=2,
        widths=(64, 128, 256, 512),
        depths=(2, 2, 6, 2),
        d_state=16,
        expand=2,
        scans=None,
        window=7,
        mlp_ratio=0.0,
        num_classes=0,
        vector_dim=0,
        context_dim=0,
        concat_channels=0,
    ):
        super().__init__()
        self.patch = (patch,) * dims if isinstance(patch, int) else tuple(patch)
        if len(self.patch) != dims or len(widths) != len(depths):
            raise ValueError(f"patch {patch} needs one size per axis (dims={dims}), depths {depths} one per width")
        if scans is None:
            scans = ("h", "h_flip") if dims == 1 else [("h", "v", "w"), ("h_flip", "v_flip", "w_flip")]
        self.scans = [tuple(scans)] if isinstance(scans[0], str) else [tuple(s) for s in scans]
        self.scan_names = sorted({name for names in self.scans for name in names})
        for name in self.scan_names:
            _parse_scan(name, dims, window)
        self.dims, self.window, self.out_channels = dims, window, out_channels or in_channels
        emb_dim, stages = 4 * widths[0], len(widths)
        self.time_embed = TimestepEmbedder(emb_dim)
        self.cond_embed = ConditionEmbedder(emb_dim, num_classes, vector_dim, context_dim, concat_channels)
        self.context_embed = nn.Linear(context_dim, emb_dim) if context_dim else None
        self.patch_embed = conv_nd(dims, in_channels + concat_channels, widths[0], self.patch, stride=self.patch)
        n_layers = sum(depths) + sum(depths[:-1])
        layer_scans = iter([self.scans[i % len(self.scans)] for i in range(n_layers)])
        block = lambda width: LocalMambaBlock(width, emb_dim, next(layer_scans), d_state, expand, mlp_ratio)
        self.encoder = nn.ModuleList(nn.ModuleList(block(w) for _ in range(d)) for w, d in zip(widths, depths))
        up = [nn.ModuleList(block(widths[s]) for _ in range(depths[s])) for s in reversed(range(stages - 1))]
        self.decoder = nn.ModuleList(up[::-1])  # indexed by stage; built deepest first, so layers count as they run
        self.down = nn.ModuleList(PatchMerge(dims, widths[s], widths[s + 1]) for s in range(stages - 1))
        self.up = nn.ModuleList(PatchMerge(dims, widths[s + 1], widths[s], up=True) for s in range(stages - 1))
        self.skip = nn.ModuleList(nn.Linear(2 * widths[s], widths[s]) for s in range(stages - 1))
        self.norm_out = nn.LayerNorm(widths[0], elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(emb_dim, 2 * widths[0])))
        self.linear_out = zero_module(nn.Linear(widths[0], math.prod(self.patch) * self.out_channels))

    def forward(self, x, t, cond=None):
        factor = tuple(p * 2 ** (len(self.encoder) - 1) for p in self.patch)
        if x.ndim != self.dims + 2 or any(s % f for s, f in zip(x.shape[2:], factor)):
            raise ValueError(
                f"LocalMamba(dims={self.dims}) needs (B, C, *spatial) with sides divisible by {factor} "
                f"(patch x 2^(stages - 1)), got {tuple(x.shape)}"
            )
        cond_emb, context, context_mask, concat = self.cond_embed(cond, x)
        c = self.time_embed(t.expand(x.shape[0]))
        c = c if cond_emb is None else c + cond_emb
        if context is not None:  # masked mean over the valid tokens (a dropped sample: L copies of the null token)
            valid = torch.ones_like(context[..., 0], dtype=torch.bool) if context_mask is None else context_mask
            pooled = torch.where(valid[..., None], context, 0.0).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
            c = c + self.context_embed(pooled.to(c.dtype))
        h = self.patch_embed(x if concat is None else torch.cat([x, concat], dim=1))  # (B, D, *grid)
        grid = tuple(h.shape[2:])
        h = rearrange(h, "b d ... -> b (...) d")  # (B, L, D), row-major
        orders, skips = [], []
        for s, blocks in enumerate(self.encoder):
            if s:
                h, grid = self.down[s - 1](h, grid)
            orders.append({name: scan_order(grid, name, self.window, x.device) for name in self.scan_names})
            for block in blocks:
                h = block(h, c, orders[s])
            skips.append(h)
        for s in reversed(range(len(self.decoder))):
            h, grid = self.up[s](h, grid)
            h = self.skip[s](torch.cat([h, skips[s]], dim=-1))
            for block in self.decoder[s]:
                h = block(h, c, orders[s])
        shift, scale = self.ada_out(c).chunk(2, dim=-1)
        h = self.linear_out(modulate(self.norm_out(h), shift, scale))  # (B, L, prod(patch) * C_out)
        return unpatchify(h, grid, self.patch, self.out_channels)


# ----------------------------------------------------------------------------------------------------------------
# MMDiT
# ----------------------------------------------------------------------------------------------------------------


class JointAttention(nn.Module):
    """Joint attention of MMDiT (Esser et al. 2024, arXiv:2403.03206, fig. 2b): the image tokens x and the text
    tokens c each have their own q/k/v and output projections and their own per-head RMSNorm on q and k (sec. 5.3.2),
    and attention runs once over the concatenated sequence [x; c], as if the two streams were one transformer.

    Without a text stream (`context=False`, or c None) it is plain self-attention over x. `context_out=False` is the
    "pre-only" text stream of SD3's last block: its text tokens only supply keys and values, so no text queries and
    no text output projection exist.
    """

    def __init__(self, dim, heads, context=True, context_out=True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        # image stream: the same layout as the shared Attention (q, kv, q_norm, k_norm, proj)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6), nn.RMSNorm(dim // heads, eps=1e-6)
        # text stream: its own weights; queries and output only where the text tokens go on to a later block
        has_q = context and context_out
        self.context_q = nn.Linear(dim, dim) if has_q else None
        self.context_kv = nn.Linear(dim, 2 * dim) if context else None
        self.context_proj = nn.Linear(dim, dim) if has_q else None
        self.context_q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if has_q else None
        self.context_k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if context else None

    def _qkv(self, tokens, q, kv, q_norm, k_norm):
        """(B, L, D) -> normalised q (or None), normalised k, v, each (B, heads, L, D / heads)."""
        k, v = rearrange(kv(tokens), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        q = None if q is None else q_norm(rearrange(q(tokens), "b l (h d) -> b h l d", h=self.heads))
        return q, k_norm(k), v

    def forward(self, x, c=None, mask=None):
        """x (B, L_x, D), c (B, L_c, D) or None, mask (B, L_c) bool (True = a real text token) or None
        -> (x (B, L_x, D), c (B, L_c, D) or None). Image tokens are always valid keys, so no query is left empty."""
        q, k, v = self._qkv(x, self.q, self.kv, self.q_norm, self.k_norm)
        if c is not None:
            qc, kc, vc = self._qkv(c, self.context_q, self.context_kv, self.context_q_norm, self.context_k_norm)
            q = q if qc is None else torch.cat([q, qc], dim=2)  # (B, heads, L_x [+ L_c], D / heads)
            k, v = torch.cat([k, kc], dim=2), torch.cat([v, vc], dim=2)  # (B, heads, L_x + L_c, D / heads)
            if mask is not None:
                # key padding: SD3 attends to its pad tokens, this project's contract masks them (departure)
                mask = F.pad(mask, (x.shape[1], 0), value=True)[:, None, None]  # (B, 1, 1, L_x + L_c)
        out = rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b h l d -> b l (h d)")
        x_out = self.proj(out[:, : x.shape[1]])
        c_out = self.context_proj(out[:, x.shape[1] :]) if c is not None and self.context_proj is not None else None
        return x_out, c_out


class MMDiTBlock(nn.Module):
    """MM-DiT block (Esser et al. 2024, arXiv:2403.03206, fig. 2b): per stream, adaLN-Zero (DiT, arXiv:2212.09748)
    shift/scale/gate for attention and MLP regressed from the conditioning vector y, joint attention, per-stream MLP.
    Gates start at zero, so the block starts as the identity on both streams.

    pre_only: the last block's text stream, whose output nothing reads (as in SD3): only its pre-attention adaLN
    (shift, scale) and keys/values remain; no gate, output projection or MLP.
    """

    def __init__(self, dim, heads, mlp_ratio=4.0, context=False, pre_only=False):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        mlp = lambda: nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        norm = lambda: nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(dim, heads, context, context_out=not pre_only)
        self.norm1, self.norm2, self.mlp = norm(), norm(), mlp()
        self.ada = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(dim, 6 * dim)))
        self.context_chunks = (2 if pre_only else 6) if context else 0  # adaLN vectors of the text stream
        self.context_norm1 = norm() if context else None
        self.context_ada = (
            nn.Sequential(nn.SiLU(), zero_module(nn.Linear(dim, self.context_chunks * dim))) if context else None
        )
        self.context_norm2 = norm() if context and not pre_only else None
        self.context_mlp = mlp() if context and not pre_only else None

    def forward(self, x, c, y, mask=None):
        """x (B, L_x, D) image tokens, c (B, L_c, D) text tokens or None, y (B, D) conditioning vector,
        mask (B, L_c) bool or None -> (x, c), c None after a pre-only block."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(y).chunk(6, dim=-1)  # each (B, D)
        c_mod = None if c is None else self.context_ada(y).chunk(self.context_chunks, dim=-1)  # each (B, D)
        c_in = None if c is None else modulate(self.context_norm1(c), c_mod[0], c_mod[1])  # c_mod: shift, scale, ...
        x_attn, c_attn = self.attn(modulate(self.norm1(x), shift1, scale1), c_in, mask)
        x = x + gate1[:, None] * x_attn
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        if c_attn is None:  # no text stream, or a pre-only block
            return x, None
        c = c + c_mod[2][:, None] * c_attn
        return x, c + c_mod[5][:, None] * self.context_mlp(modulate(self.context_norm2(c), c_mod[3], c_mod[4]))


class MMDiT(nn.Module):
    """Multimodal Diffusion Transformer (Esser et al. 2024, arXiv:2403.03206, sec. 4, fig. 2) on 1D, 2D or 3D inputs.

    Patches (`patch` an int or a tuple per axis) + fixed sin-cos positions form the image stream; the context
    (B, L, context_dim) -> Linear to `dim` forms the text stream (no positions, as in the paper); both run through
    MM-DiT blocks with joint attention, each stream with its own weights, modulated by y = time embedding + class +
    vector embeddings (the "vector" is where SD3's pooled text vector goes) -> adaLN final layer, zero-initialised,
    so the untrained model outputs exactly zero -> unpatchify. Concat channels join x before patch embedding.
    With context_dim = 0 there is no text stream and every block is image-only (a DiT with qk-norm).
    Sizes follow the paper's depth scaling: depth d, width 64 d, d heads, MLP ratio 4.
    """

    PRESETS = {  # tiny for tests; S matched to DiT-S; SD3.5-medium-style (d = 24, 16-channel latent, T5 + pooled CLIP)
        "tiny": dict(dim=64, depth=2, heads=2),
        "S": dict(dim=384, depth=12, heads=6),  # off the paper's 64 d width line (d = 12 would be 768): DiT-S's size
        # SD3.5 medium puts a second self-attention in its first 13 blocks (MMDiT-X); plain MM-DiT blocks here
        "sd3.5-medium": dict(in_channels=16, patch=2, dim=1536, depth=24, heads=24, context_dim=4096, vector_dim=2048),
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
        vector_dim=0,
        context_dim=0,
        concat_channels=0,
    ):
        super().__init__()
        self.patch = (patch,) * dims if isinstance(patch, int) else tuple(patch)
        if len(self.patch) != dims:
            raise ValueError(f"patch {patch} must have one size per axis (dims={dims})")
        self.dims, self.dim, self.out_channels = dims, dim, out_channels or in_channels
        self.patch_embed = conv_nd(dims, in_channels + concat_channels, dim, self.patch, stride=self.patch)
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = ConditionEmbedder(dim, num_classes, vector_dim, context_dim, concat_channels)
        self.context_embed = nn.Linear(context_dim, dim) if context_dim else None
        text = context_dim > 0
        self.blocks = nn.ModuleList(
            [MMDiTBlock(dim, heads, mlp_ratio, text, pre_only=i == depth - 1) for i in range(depth)]
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(dim, 2 * dim)))
        self.linear_out = zero_module(nn.Linear(dim, math.prod(self.patch) * self.out_channels))

    def _text_mask(self, cond, context_mask, L):
        """The text key mask (B, L) or None. ConditionEmbedder gives a dropped sample the null token at all L
        positions, all valid: right for cross-attention, but in joint attention L copies of a key get L times its
        weight against the image keys. So a dropped sample keeps only position 0 as a key. Masked positions are never
        keys, so they reach nothing; position 0 then sees exactly what the single null token of an unconditional
        call sees (the image tokens and itself) through every block, and the output equals the unconditional one.
        SD3 drops a text encoder by zeroing its output instead; the learned null is this project's contract (departure).
        """
        drop = cond.get("drop") if isinstance(cond, dict) else None
        if drop is None:
            return context_mask
        first = torch.arange(L, device=drop.device) == 0  # (L,)
        mask = torch.ones_like(drop)[:, None].expand(-1, L) if context_mask is None else context_mask
        return torch.where(drop[:, None], first, mask)  # (B, L)

    def forward(self, x, t, cond=None):
        if x.ndim != self.dims + 2 or any(s % p for s, p in zip(x.shape[2:], self.patch)):
            raise ValueError(
                f"MMDiT(dims={self.dims}) needs (B, C, *spatial) with sides divisible by patch {self.patch}"
            )
        cond_emb, context, context_mask, concat = self.cond_embed(cond, x)
        h = self.patch_embed(x if concat is None else torch.cat([x, concat], dim=1))  # (B, D, *grid)
        grid = h.shape[2:]
        # the paper learns positions for a large grid and crops them; fixed sin-cos serves any size (departure)
        pos = sincos_position_embedding(grid, self.dim, x.device).to(self.patch_embed.weight.dtype)
        h = rearrange(h, "b d ... -> b (...) d") + pos  # (B, L_x, D)
        y = self.time_embed(t.expand(x.shape[0]))
        y = y if cond_emb is None else y + cond_emb  # (B, D)
        c, mask = None, None
        if context is not None:
            c = self.context_embed(context.to(self.context_embed.weight.dtype))  # (B, L_c, D)
            mask = self._text_mask(cond, context_mask, context.shape[1])
        for block in self.blocks:
            h, c = block(h, c, y, mask)
        shift, scale = self.ada_out(y).chunk(2, dim=-1)
        h = self.linear_out(modulate(self.norm_out(h), shift, scale))  # (B, L_x, prod(patch) * C_out)
        return unpatchify(h, grid, self.patch, self.out_channels)


# ----------------------------------------------------------------------------------------------------------------
# Autoencoders for latent diffusion (KL-VAE, VQ-VAE, DC-AE) and the PatchGAN discriminator
# ----------------------------------------------------------------------------------------------------------------
# Not denoisers, so not called as model(x, t, cond): an autoencoder is called as model(x) -> (x_hat, aux);
# encode(x) -> z (B, latent_channels, *[s // factor for s in spatial]) is what a latent diffusion model learns and
# decode(z) -> x_hat (B, out_channels, *spatial) maps its samples back. `kind` tells these apart in MODELS.


def norm_groups(channels, max_groups=32):
    """The largest group count <= max_groups dividing `channels`: LDM's 32 groups, fewer for narrow layers."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def group_norm(channels):
    return nn.GroupNorm(norm_groups(channels), channels, eps=1e-6)


def autoencoder_factor(dims, ch_mult, factor):
    """The spatial factor 2^(len(ch_mult) - 1) that ch_mult implies (one stride-2 step between consecutive levels).
    ValueError for dims outside 1..3, or a `factor` (None = take the implied one) that is not a power of 2 or that
    disagrees with ch_mult."""
    if dims not in (1, 2, 3):
        raise ValueError(f"dims={dims}: choose 1 (signals), 2 (images) or 3 (volumes)")
    implied = 2 ** (len(ch_mult) - 1)
    if factor is not None and (not isinstance(factor, int) or factor < 1 or factor & (factor - 1)):
        raise ValueError(f"factor={factor} is not a power of 2")
    if factor is not None and factor != implied:
        raise ValueError(
            f"factor={factor} disagrees with ch_mult {tuple(ch_mult)}: {len(ch_mult)} levels downsample by {implied};"
            f" give ch_mult {int(math.log2(factor)) + 1} entries for factor {factor}"
        )
    return implied


def check_autoencoder_input(model, x, channels, factor):
    """ValueError unless x is (B, channels, *spatial) with dims spatial sides, each divisible by factor."""
    if x.ndim != model.dims + 2 or x.shape[1] != channels:
        sides = ", ".join(["S"] * model.dims)
        raise ValueError(
            f"{type(model).__name__}(dims={model.dims}) expects (B, {channels}, {sides}), got {tuple(x.shape)}"
        )
    if any(s % factor for s in x.shape[2:]):
        raise ValueError(f"{type(model).__name__}: input size {tuple(x.shape[2:])} is not divisible by factor {factor}")


def run_blocks(blocks, h, checkpointing=False):
    """Apply blocks in turn; with checkpointing, each is recomputed in backward (memory of one block's activations
    instead of all, for ~30% more time: large volumes)."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        else:
            h = block(h)
    return h


class AEResBlock(nn.Module):
    """The autoencoders' residual block (LDM, arXiv:2112.10752; no time embedding, no dropout):
    skip(x) + conv(SiLU(GN(conv(SiLU(GN(x)))))), skip a 1x1 conv when the width changes, else the identity."""

    def __init__(self, dims, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), conv_nd(dims, c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), conv_nd(dims, c_out, c_out, 3, padding=1)
        self.skip = conv_nd(dims, c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def middle_blocks(dims, c, attention, heads):
    """LDM's middle: ResBlock, self-attention over every latent position (SDPA), ResBlock. SpatialAttention's output
    projection starts at zero, LDM's does not (departure: the branch starts as the identity)."""
    attn = [SpatialAttention(c, heads, norm_groups(c))] if attention else []
    return [AEResBlock(dims, c, c), *attn, AEResBlock(dims, c, c)]


class LDMEncoder(nn.Module):
    """The LDM autoencoder's encoder (arXiv:2112.10752, app. G): conv_in; per level num_res_blocks ResBlocks and,
    except after the last level, a stride-2 conv; the middle blocks; GroupNorm, SiLU, conv_out."""

    def __init__(self, dims, in_channels, out_channels, widths, num_res_blocks, attention, heads):
        super().__init__()
        self.checkpointing = False
        self.conv_in = conv_nd(dims, in_channels, widths[0], 3, padding=1)
        blocks, c = [], widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                blocks.append(AEResBlock(dims, c, width))
                c = width
            if level < len(widths) - 1:  # LDM pads (0, 1) then convolves unpadded; symmetric padding, same cost
                blocks.append(conv_nd(dims, c, c, 3, stride=2, padding=1))
        self.blocks = nn.ModuleList(blocks + middle_blocks(dims, c, attention, heads))
        self.norm_out, self.conv_out = group_norm(c), conv_nd(dims, c, out_channels, 3, padding=1)

    def forward(self, x):
        h = run_blocks(self.blocks, self.conv_in(x), self.checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class LDMDecoder(nn.Module):
    """The mirror of LDMEncoder: conv_in, the middle blocks, per level (coarsest first) num_res_blocks + 1 ResBlocks
    (one more than the encoder, as in LDM) and, except at the finest level, nearest upsampling by 2 and a conv;
    GroupNorm, SiLU, conv_out."""

    def __init__(self, dims, in_channels, out_channels, widths, num_res_blocks, attention, heads):
        super().__init__()
        self.checkpointing = False
        c = widths[-1]
        self.conv_in = conv_nd(dims, in_channels, c, 3, padding=1)
        blocks = middle_blocks(dims, c, attention, heads)
        for level in reversed(range(len(widths))):
            for _ in range(num_res_blocks + 1):
                blocks.append(AEResBlock(dims, c, widths[level]))
                c = widths[level]
            if level > 0:
                blocks.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_nd(dims, c, c, 3, padding=1))
                )
        self.blocks = nn.ModuleList(blocks)
        self.norm_out, self.conv_out = group_norm(c), conv_nd(dims, c, out_channels, 3, padding=1)

    def forward(self, z):
        h = run_blocks(self.blocks, self.conv_in(z), self.checkpointing)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLVAE(nn.Module):
    """KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, arXiv:2112.10752, sec. 3.1, app. G).

    The encoder gives the mean and log-variance of a diagonal Gaussian q(z|x); training decodes a sample
    z = mean + exp(logvar / 2) * eps and adds a weak KL(q(z|x) || N(0, I)) (LDM weights it 1e-6), which bounds the
    latent scale without the information loss of a strong prior. ch_mult sets the levels and so
    factor = 2^(len(ch_mult) - 1); a `factor` that disagrees raises ValueError. The middle attention is O(N^2) in
    the latent positions: attention=False for large volumes. checkpointing trades ~30% time for activation memory.
    """

    kind = "autoencoder"
    PRESETS = {
        "tiny": dict(channels=8, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4),  # factor 4
        "small": dict(channels=64, ch_mult=(1, 2, 2), num_res_blocks=2, latent_channels=4),  # factor 4
        "f4": dict(channels=128, ch_mult=(1, 2, 4), num_res_blocks=2, latent_channels=3),  # LDM's KL-f4
        "base": dict(channels=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4),  # SD's VAE, factor 8
    }

    def __init__(
        self,
        dims=2,
        in_channels=3,
        out_channels=None,
        channels=64,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        latent_channels=4,
        factor=None,
        attention=True,
        heads=1,
        checkpointing=False,
    ):
        super().__init__()
        self.factor = autoencoder_factor(dims, ch_mult, factor)
        self.dims, self.in_channels, self.out_channels = dims, in_channels, out_channels or in_channels
        self.latent_channels = latent_channels
        widths = [channels * m for m in ch_mult]
        # LDM follows conv_out by a 1x1 "quant_conv" (and the decoder's conv_in by a 1x1 "post_quant_conv"): linear
        # maps next to linear maps, folded away here (departure; 92 parameters fewer at the SD shape)
        self.encoder = LDMEncoder(dims, in_channels, 2 * latent_channels, widths, num_res_blocks, attention, heads)
        self.decoder = LDMDecoder(dims, latent_channels, self.out_channels, widths, num_res_blocks, attention, heads)
        self.encoder.checkpointing = self.decoder.checkpointing = checkpointing

    @property
    def last_layer(self):
        return self.decoder.conv_out.weight

    def posterior(self, x):
        """x -> (mean, logvar) of q(z|x), each (B, latent_channels, *latent_spatial); logvar clamped to [-30, 20]
        as in LDM, so exp(logvar) neither underflows to a zero std nor overflows."""
        check_autoencoder_input(self, x, self.in_channels, self.factor)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x):
        return self.posterior(x)[0]

    def decode(self, z):
        check_autoencoder_input(self, z, self.latent_channels, 1)
        return self.decoder(z)

    def forward(self, x):
        mean, logvar = self.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
        # KL(N(mean, var) || N(0, 1)) = 0.5 (mean^2 + var - 1 - log var) per element (Kingma & Welling 2014,
        # arXiv:1312.6114, app. B), summed over the latent
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)  # (B,)
        return self.decoder(z), {"kl": kl, "mean": mean, "logvar": logvar}


class VectorQuantizerEMA(nn.Module):
    """Vector quantiser with an EMA codebook and dead-code restarts (van den Oord et al. 2017, arXiv:1711.00937,
    sec. 3.2 and app. A.1; restarts as in Dhariwal et al. 2020, Jukebox, arXiv:2005.00341, sec. 3.1).

    Each vector z_e is replaced by its nearest code e_k. The codebook is not trained by gradient: in training mode
    each forward moves the per-code count N_k and vector sum m_k towards this batch's (n_k, sum of the z_e assigned
    to k) by an exponential moving average, and sets e_k = m_k / N_k (Laplace-smoothed N_k, so no division by 0).
    A code whose N_k falls below dead_threshold (default 0.01: fewer than one assignment per hundred batches) is
    moved onto a random encoder output of the batch, with N_k = 1, so every code stays in use. Under DDP the
    buffers follow rank 0 (DDP broadcasts buffers before each forward); the other ranks' statistics are dropped.
    """

    def __init__(self, codebook_size, dim, beta=0.25, decay=0.99, eps=1e-5, dead_threshold=0.01):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.decay, self.eps, self.dead_threshold = decay, eps, dead_threshold
        embedding = torch.randn(codebook_size, dim)
        self.register_buffer("embedding", embedding)  # (K, D) the codes e_k
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,) N_k; m_k / N_k = e_k from the start
        self.register_buffer("embed_sum", embedding.clone())  # (K, D) m_k

    @torch.no_grad()
    def nearest(self, flat):
        """(N, D) -> (N,) index of the nearest code: argmin_k ||e_k||^2 - 2 z . e_k (||z||^2 is the same for all k),
        in float32 even under autocast, where near-ties would flip."""
        off = (
            torch.autocast(flat.device.type, enabled=False) if flat.device.type != "meta" else contextlib.nullcontext()
        )
        with off:  # (the meta device, where shapes are checked, has no autocast)
            e = self.embedding
            return torch.addmm(e.square().sum(1), flat.float(), e.T, alpha=-2.0).argmin(1)

    @torch.no_grad()
    def update(self, flat, indices):
        """The EMA update (app. A.1) from this batch's vectors flat (N, D) and their codes (N,), then the dead-code
        restart. Returns the number of codes restarted (a tensor, so no host sync)."""
        flat = flat.float()
        n = torch.bincount(indices, minlength=self.codebook_size).float()  # (K,) n_k
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)  # (K, D) sum of z_e assigned to k
        self.cluster_size.lerp_(n, 1 - self.decay)  # N_k <- decay N_k + (1 - decay) n_k
        self.embed_sum.lerp_(sums, 1 - self.decay)  # m_k <- decay m_k + (1 - decay) sums_k
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total  # Laplace
        self.embedding.copy_(self.embed_sum / smoothed[:, None])  # e_k = m_k / N_k
        dead = self.cluster_size < self.dead_threshold  # (K,)
        # a candidate for every code, kept only where dead: no data-dependent branch; candidates may repeat
        candidates = flat[torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)]  # (K, D)
        self.embedding.copy_(torch.where(dead[:, None], candidates, self.embedding))
        self.embed_sum.copy_(torch.where(dead[:, None], candidates, self.embed_sum))
        self.cluster_size.masked_fill_(dead, 1.0)
        return dead.sum()

    def forward(self, z_e, update=None):
        """z_e (B, D, *spatial) -> z_q (B, D, *spatial), aux (see VQVAE). update: run the EMA update and restarts
        (default: in training mode); the codes used are those from before this step's update."""
        flat = rearrange(z_e, "b d ... -> (b ...) d")  # (N, D)
        indices = self.nearest(flat)
        e = F.embedding(indices, self.embedding).to(flat.dtype)  # (N, D), a copy: the update does not change it
        # commitment loss beta ||z_e - sg(e)||^2 (eq. 3, third term); the EMA replaces the codebook term
        vq_loss = self.beta * F.mse_loss(flat, e)
        update = self.training if update is None else update
        dead = self.update(flat.detach(), indices) if update else torch.zeros((), device=z_e.device)
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())  # exp(entropy of the code use)
        z_q = flat + (e - flat).detach()  # straight-through: forward gives e, backward passes the gradient to z_e
        z_q = rearrange(z_q, "(b s) d -> b d s", b=z_e.shape[0]).reshape(z_e.shape)
        indices = indices.view(z_e.shape[0], *z_e.shape[2:])
        usage = (counts > 0).float().mean()
        return z_q, {"vq_loss": vq_loss, "indices": indices, "perplexity": perplexity, "usage": usage, "dead": dead}


class VQVAE(nn.Module):
    """VQ-VAE (van den Oord et al. 2017, arXiv:1711.00937) on the LDM encoder/decoder trunk (the VQ-regularised
    autoencoder of arXiv:2112.10752), with an EMA codebook (VectorQuantizerEMA).

    latent_channels is the code dimension D. encode(x) gives the continuous encoder output z_e, where a latent
    diffusion model works (as in LDM); decode(z) snaps z to its nearest codes first. forward(x) -> (x_hat, aux):
    vq_loss (the commitment loss, add it to the reconstruction loss), indices (B, *latent_spatial), perplexity and
    usage of the codebook in the batch, dead (codes restarted this step). factor as in KLVAE.
    """

    kind = "autoencoder"
    PRESETS = {
        "tiny": dict(channels=8, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, codebook_size=64),
        "small": dict(channels=64, ch_mult=(1, 2, 2), num_res_blocks=2, latent_channels=4, codebook_size=512),
        "base": dict(channels=128, ch_mult=(1, 2, 4), num_res_blocks=2, latent_channels=3, codebook_size=8192),  # VQ-f4
    }

    def __init__(
        self,
        dims=2,
        in_channels=3,
        out_channels=None,
        channels=64,
        ch_mult=(1, 2, 2),
        num_res_blocks=2,
        latent_channels=4,
        factor=None,
        attention=True,
        heads=1,
        codebook_size=512,
        beta=0.25,
        decay=0.99,
        dead_threshold=0.01,
        checkpointing=False,
    ):
        super().__init__()
        self.factor = autoencoder_factor(dims, ch_mult, factor)
        self.dims, self.in_channels, self.out_channels = dims, in_channels, out_channels or in_channels
        self.latent_channels = latent_channels
        widths = [channels * m for m in ch_mult]
        # conv_out plays LDM's 1x1 quant conv (to the code dimension): a linear map after a linear map, folded away
        self.encoder = LDMEncoder(dims, in_channels, latent_channels, widths, num_res_blocks, attention, heads)
        self.quantizer = VectorQuantizerEMA(codebook_size, latent_channels, beta, decay, dead_threshold=dead_threshold)
        self.decoder = LDMDecoder(dims, latent_channels, self.out_channels, widths, num_res_blocks, attention, heads)
        self.encoder.checkpointing = self.decoder.checkpointing = checkpointing

    @property
    def last_layer(self):
        return self.decoder.conv_out.weight

    def encode(self, x):
        check_autoencoder_input(self, x, self.in_channels, self.factor)
        return self.encoder(x)

    def decode(self, z):
        check_autoencoder_input(self, z, self.latent_channels, 1)
        return self.decoder(self.quantizer(z, update=False)[0])

    def forward(self, x):
        z_q, aux = self.quantizer(self.encode(x))
        return self.decoder(z_q), aux


def space_to_channel(x):
    """(B, C, *spatial) -> (B, C * 2^dims, *spatial / 2): each 2 x ... x 2 block of positions becomes channels
    (pixel unshuffle), channel c * 2^dims + offset."""
    n = range(x.ndim - 2)
    sides, offsets = " ".join(f"(s{i} r{i})" for i in n), " ".join(f"r{i}" for i in n)
    return rearrange(x, f"b c {sides} -> b (c {offsets}) " + " ".join(f"s{i}" for i in n), **{f"r{i}": 2 for i in n})


def channel_to_space(x):
    """The inverse of space_to_channel: (B, C * 2^dims, *spatial) -> (B, C, *spatial * 2) (pixel shuffle)."""
    n = range(x.ndim - 2)
    sides, offsets = " ".join(f"(s{i} r{i})" for i in n), " ".join(f"r{i}" for i in n)
    return rearrange(
        x, f"b (c {offsets}) " + " ".join(f"s{i}" for i in n) + f" -> b c {sides}", **{f"r{i}": 2 for i in n}
    )


def channel_average(x, channels):
    """(B, G * channels, ...) -> (B, channels, ...): the mean of each group of G consecutive channels."""
    return rearrange(x, "b (c g) ... -> b c g ...", c=channels).mean(2)


class ResidualDown(nn.Module):
    """DC-AE's residual downsampling (Chen et al. 2024, arXiv:2410.10733, sec. 3.2, fig. 4): a stride-2 conv plus a
    non-parametric shortcut, space-to-channel then the mean of channel groups down to c_out, so the block learns
    only a residual on top of a lossless-ish rearrangement. The paper convolves to c_out / 2^dims channels and
    unshuffles; the stride-2 conv has the same FLOPs and no divisibility constraint (departure)."""

    def __init__(self, dims, c_in, c_out):
        super().__init__()
        if (c_in * 2**dims) % c_out:
            raise ValueError(f"DC-AE shortcut: {c_in} channels x 2^{dims} do not split into {c_out} equal groups")
        self.c_out, self.conv = c_out, conv_nd(dims, c_in, c_out, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x) + channel_average(space_to_channel(x), self.c_out)


class ResidualUp(nn.Module):
    """DC-AE's residual upsampling (sec. 3.2, fig. 4): nearest upsampling and a conv, plus the shortcut
    channel-to-space of the input with each channel duplicated to make c_out * 2^dims channels."""

    def __init__(self, dims, c_in, c_out):
        super().__init__()
        if (c_out * 2**dims) % c_in:
            raise ValueError(f"DC-AE shortcut: {c_in} channels do not duplicate evenly to {c_out} x 2^{dims}")
        self.repeats, self.conv = c_out * 2**dims // c_in, conv_nd(dims, c_in, c_out, 3, padding=1)

    def forward(self, x):
        h = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return h + channel_to_space(x.repeat_interleave(self.repeats, dim=1))


def dcae_stage(dims, width, depth, attention, head_dim):
    """One DC-AE level: depth ResBlocks, each after a self-attention block at attention levels. The paper's
    EfficientViT block is ReLU linear attention + a GLU MBConv; softmax attention (SDPA) + a ResBlock here (departure:
    coarse levels have few positions, so O(N^2) is cheap)."""
    blocks = []
    for _ in range(depth):
        if attention:
            blocks.append(SpatialAttention(width, max(1, width // head_dim), norm_groups(width)))
        blocks.append(AEResBlock(dims, width, width))
    return blocks


class DCAE(nn.Module):
    """Deep Compression Autoencoder (Chen et al. 2024, arXiv:2410.10733): factors of 32-64 by residual autoencoding.

    Every resolution change adds a non-parametric space<->channel shortcut (ResidualDown / ResidualUp), and so do
    the encoder's output (channel averaging to latent_channels) and the decoder's input (channel duplication), so
    the deep network only learns residuals: what lets the paper train high compression without the loss in
    reconstruction plain deep autoencoders show. Levels: ch_mult (factor = 2^(len - 1) as in KLVAE), depth blocks
    per level (the paper's depth lists; its decoder is deeper, ours mirrors the encoder), attention at the levels
    attn_levels marks. Deterministic: aux is {}. GroupNorm throughout (the paper uses RMSNorm / BatchNorm).
    """

    kind = "autoencoder"
    PRESETS = {  # f32 / f64: the paper's dc-ae-f32c32 / f64c128 widths and encoder depths
        "tiny": dict(
            channels=8, ch_mult=(1, 2, 2), depth=(1, 1, 1), attn_levels=(False, False, True), latent_channels=4
        ),
        "small": dict(channels=32, ch_mult=(1, 2, 4, 4, 8, 8), depth=(0, 2, 2, 2, 2, 2), latent_channels=32),
        "f32": dict(channels=128, ch_mult=(1, 2, 4, 4, 8, 8), depth=(0, 4, 8, 2, 2, 2), latent_channels=32),
        "f64": dict(channels=128, ch_mult=(1, 2, 4, 4, 8, 8, 16), depth=(0, 4, 8, 2, 2, 2, 2), latent_channels=128),
    }

    def __init__(
        self,
        dims=2,
        in_channels=3,
        out_channels=None,
        channels=128,
        ch_mult=(1, 2, 4, 4, 8, 8),
        depth=(0, 4, 8, 2, 2, 2),
        attn_levels=None,
        latent_channels=32,
        factor=None,
        head_dim=32,
        checkpointing=False,
    ):
        super().__init__()
        self.factor = autoencoder_factor(dims, ch_mult, factor)
        self.dims, self.in_channels, self.out_channels = dims, in_channels, out_channels or in_channels
        self.latent_channels, self.checkpointing = latent_channels, checkpointing
        levels = len(ch_mult)
        depth = (depth,) * levels if isinstance(depth, int) else tuple(depth)
        attn_levels = tuple(level >= levels // 2 for level in range(levels)) if attn_levels is None else attn_levels
        if len(depth) != levels or len(attn_levels) != levels:
            raise ValueError(
                f"depth {depth} and attn_levels {attn_levels} need one entry per level of ch_mult {ch_mult}"
            )
        widths = [channels * m for m in ch_mult]
        if widths[-1] % latent_channels:
            raise ValueError(f"latent_channels={latent_channels} must divide the last width {widths[-1]} (shortcuts)")
        stages = [dcae_stage(dims, w, d, a, head_dim) for w, d, a in zip(widths, depth, attn_levels)]
        self.conv_in = conv_nd(dims, in_channels, widths[0], 3, padding=1)
        downs = [[ResidualDown(dims, widths[i], widths[i + 1])] for i in range(levels - 1)] + [[]]
        self.down = nn.ModuleList([b for stage, down in zip(stages, downs) for b in stage + down])
        self.enc_norm, self.enc_out = group_norm(widths[-1]), conv_nd(dims, widths[-1], latent_channels, 3, padding=1)

        self.dec_in = conv_nd(dims, latent_channels, widths[-1], 3, padding=1)
        stages = [dcae_stage(dims, w, d, a, head_dim) for w, d, a in zip(widths, depth, attn_levels)]
        ups = [[]] + [[ResidualUp(dims, widths[i], widths[i - 1])] for i in range(1, levels)]
        self.up = nn.ModuleList([b for i in reversed(range(levels)) for b in stages[i] + ups[i]])
        self.dec_norm, self.dec_out = group_norm(widths[0]), conv_nd(dims, widths[0], self.out_channels, 3, padding=1)

    @property
    def last_layer(self):
        return self.dec_out.weight

    def encode(self, x):
        check_autoencoder_input(self, x, self.in_channels, self.factor)
        h = run_blocks(self.down, self.conv_in(x), self.checkpointing)
        return self.enc_out(F.silu(self.enc_norm(h))) + channel_average(h, self.latent_channels)  # output shortcut

    def decode(self, z):
        check_autoencoder_input(self, z, self.latent_channels, 1)
        h = self.dec_in(z) + z.repeat_interleave(self.dec_in.out_channels // self.latent_channels, dim=1)
        h = run_blocks(self.up, h, self.checkpointing)
        return self.dec_out(F.silu(self.dec_norm(h)))

    def forward(self, x):
        return self.decode(self.encode(x)), {}


class PatchGAN(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, arXiv:1611.07004, sec. 3.2.2; the LDM autoencoders' discriminator).

    Each output logit judges one patch of the input (70 x 70 pixels at n_layers=3): an adversarial loss on local
    texture, restoring the high frequencies a pixel-wise reconstruction loss blurs. 4-wide convs: n_layers with
    stride 2, then two with stride 1, so x (B, C, *spatial) -> logits (B, 1, *[s // 2^n_layers - 2]). GroupNorm
    instead of the paper's BatchNorm (departure: independent of the batch, so DDP and tiny batches behave).
    """

    kind = "discriminator"
    PRESETS = {"tiny": dict(channels=8, n_layers=2), "base": dict(channels=64, n_layers=3)}  # base: pix2pix / LDM

    def __init__(self, dims=2, in_channels=3, channels=64, n_layers=3):
        super().__init__()
        if dims not in (1, 2, 3):
            raise ValueError(f"dims={dims}: choose 1 (signals), 2 (images) or 3 (volumes)")
        self.dims, self.in_channels, self.n_layers = dims, in_channels, n_layers
        layers, c = [conv_nd(dims, in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)], channels
        for n in range(1, n_layers + 1):
            c_out = channels * min(2**n, 8)
            conv = conv_nd(dims, c, c_out, 4, stride=2 if n < n_layers else 1, padding=1, bias=False)
            layers += [conv, group_norm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        self.net = nn.Sequential(*layers, conv_nd(dims, c, 1, 4, stride=1, padding=1))
        for m in self.net:
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.normal_(m.weight, 0.0, 0.02)  # pix2pix's initialisation

    def forward(self, x):
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PatchGAN(dims={self.dims}) expects (B, {self.in_channels}, *spatial), got {tuple(x.shape)}"
            )
        if any(s // 2**self.n_layers < 3 for s in x.shape[2:]):
            raise ValueError(
                f"PatchGAN(n_layers={self.n_layers}): input size {tuple(x.shape[2:])} is below {3 * 2**self.n_layers}"
            )
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

MODELS = {  # name -> class; each class has a PRESETS dict with at least "tiny"
    "unet": UNet,
    "dit": DiT,
    "uvit": UViT,
    "hdit": HDiT,
    "localmamba": LocalMamba,
    "mmdit": MMDiT,
    "arc": ArcDenoiser,
    "klvae": KLVAE,
    "vqvae": VQVAE,
    "dcae": DCAE,
    "patchgan": PatchGAN,
}


def make_model(name, size="tiny", **kw):
    """Build registry entry `name` at preset `size`; keyword arguments override the preset."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name]
    if size not in cls.PRESETS:
        raise ValueError(f"unknown size {size!r} for model {name!r}; choose one of {sorted(cls.PRESETS)}")
    return cls(**{**cls.PRESETS[size], **kw})
