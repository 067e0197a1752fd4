"""Every backbone of nanodiffusion, as plain nn.Modules.

Contract: every denoiser is called as `model(x, t, cond=None)` with t in [0, 1] (t=0 clean, t=1 noise, see
common.py) and returns a tensor shaped like its output. Every registry entry has a `tiny` preset.
Shape letters: B batch, C channels, H/W height/width, D depth (3D) or model width, L tokens.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# Shared blocks
# ----------------------------------------------------------------------------------------------------------------


def timestep_embedding(t, dim, max_period=10_000.0):
    """Sinusoidal features of a (B,) tensor (Vaswani et al. 2017, sec. 3.5): [cos(t w_i), sin(t w_i)] -> (B, dim).

    t is scaled by 1000 first so that t in [0, 1] spans the same phases as an integer step index.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------

MODELS = {  # name -> class; each class has a PRESETS dict with at least "tiny"
}


def make_model(name, size="tiny", **kw):
    """Build registry entry `name` at preset `size`; keyword arguments override the preset."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    cls = MODELS[name]
    if size not in cls.PRESETS:
        raise ValueError(f"unknown size {size!r} for model {name!r}; choose one of {sorted(cls.PRESETS)}")
    return cls(**{**cls.PRESETS[size], **kw})
