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
import copy
import difflib
import json
import math
import os
import random
import re
import shutil
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# ----------------------------------------------------------------------------------------------------------------
# Errors and key=value overrides
# ----------------------------------------------------------------------------------------------------------------


def die(msg):
    """Stop with a one-line message on stderr and exit status 1; no traceback."""
    raise SystemExit(f"error: {msg}")


def _constants(namespace):
    return {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_") and _is_constant(v)}


def _is_constant(v):
    if isinstance(v, tuple):
        return all(_is_constant(x) for x in v)
    return isinstance(v, (bool, int, float, str))


def _comments(namespace):
    """The trailing `# comment` of each `NAME = value  # comment` line of the script that owns `namespace`."""
    path = namespace.get("__file__")
    if not path or not os.path.exists(path):
        return {}
    found = {}
    for line in open(path, encoding="utf-8"):
        m = re.match(r"^([A-Z][A-Z0-9_]*)\s*=.*?#\s?(.*)$", line.rstrip())
        if m:
            found[m.group(1)] = m.group(2)
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
    except (ValueError, SyntaxError):
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
    return value


def print_help(namespace):
    """Print the script's docstring and every constant with its default and comment."""
    doc = (namespace.get("__doc__") or "").strip()
    if doc:
        print(doc + "\n")
    comments = _comments(namespace)
    consts = _constants(namespace)
    width = max((len(k) + len(repr(v)) for k, v in consts.items()), default=0) + 3
    print("overrides (key=value):")
    for k, v in consts.items():
        left = f"{k.lower()}={v!r}"
        print(f"  {left:<{width}} {comments.get(k, '')}")


def apply_overrides(namespace, argv):
    """Apply `key=value` / `--key=value` arguments to the UPPER_CASE constants of `namespace` (a script's globals()).

    Values parse with ast.literal_eval (strings stay raw); int -> float and list -> tuple are coerced; bools take
    true/false. An unknown key, a missing `=` or a wrong type stops with a one-line error. `--help` prints every
    constant and exits. Returns the resolved config as {lower_case_key: value}.
    """
    consts = _constants(namespace)
    for arg in argv:
        if arg in ("-h", "--help", "help"):
            print_help(namespace)
            raise SystemExit(0)
        body = arg[2:] if arg.startswith("--") else arg
        if "=" not in body:
            die(f"argument {arg!r} has no '='; write key=value (see --help)")
        key, raw = body.split("=", 1)  # the value itself may contain '='
        name = key.strip().upper()
        if name not in consts:
            near = difflib.get_close_matches(name, list(consts), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(n.lower() for n in near)}?" if near else "; see --help"
            die(f"unknown key {key.strip()!r}{hint}")
        namespace[name] = consts[name] = _coerce(name, raw, consts[name])
    return {k.lower(): v for k, v in consts.items()}


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
    The first two divide by alpha or sigma and so are undefined at t = 1 (eps) or t = 0 (x0); samplers never ask.
    """
    alpha, sigma = (append_dims(a, x_t.ndim).to(x_t.dtype) for a in schedule.alpha_sigma(t))
    if prediction == "eps":
        return (x_t - sigma * pred) / alpha, pred
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


def cfg_model(model, cond, null_cond, scale):
    """Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598 eq. 6) on the raw prediction:
    out = uncond + scale * (cond - uncond), so scale 1 is conditional and 0 unconditional. Both halves run in one
    batched call of model(x, t, cond=...); guiding any prediction type is the same, as conversions are affine."""

    def guided(x, t):
        if scale == 1.0:
            return model(x, t, cond=cond)
        out = model(torch.cat([x, x]), torch.cat([t, t]), cond=torch.cat([cond, null_cond]))
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


def d3pm_uniform_posterior(x_t, p_x0, keep_t, keep_s):
    """Unnormalised p(x_s | x_t) proportional to sum_x0 q(x_s, x_t | x0) p(x0 | x_t) for uniform D3PM (Austin et al.
    2021, arXiv:2107.03006 eq. 4, the x0-parameterisation), with q(x_s, x_t | x0) = q(x_t | x_s) q(x_s | x0):
    (a_ts onehot(x_t) + (1 - a_ts) / K) * (keep_s p_x0 + (1 - keep_s) / K), a_ts = keep_t / keep_s.
    x_t (...) long in [0, K), p_x0 (..., K) probabilities, keep_t / keep_s floats -> (..., K)."""
    K = p_x0.shape[-1]
    a_ts = keep_t / keep_s  # keep probability from level s to level t
    likelihood = a_ts * torch.nn.functional.one_hot(x_t, K) + (1 - a_ts) / K  # q(x_t | x_s) as a function of x_s
    return likelihood * (keep_s * p_x0 + (1 - keep_s) / K)  # times q(x_s | x0) averaged over p(x0 | x_t)


# ----------------------------------------------------------------------------------------------------------------
# Samplers: sampler(denoise, x, ts, schedule, generator, **options) -> x at ts[-1]
# denoise(x, t) -> (x0_hat, eps_hat), t a (B,) tensor; ts a decreasing grid from 1 to 0.
# ----------------------------------------------------------------------------------------------------------------


def time_grid(steps, t_max=1.0, t_min=0.0):
    """`steps` + 1 uniformly spaced times from t_max down to t_min (float64)."""
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


def _call(denoise, x, t):
    return denoise(x, torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype))


def _scalars(schedule, t):
    alpha, sigma = schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
    return float(alpha), float(sigma)


def _ancestral_step(x, x0, eps, alpha_s, sigma_s, alpha_t, sigma_t, eta, generator):
    """One DDIM step t -> s < t (Song et al. 2021, arXiv:2010.02502 eq. 12) in alpha/sigma form: the posterior
    q(x_s | x_t, x0) has variance c^2 = sigma_{t|s}^2 sigma_s^2 / sigma_t^2, sigma_{t|s}^2 = sigma_t^2 -
    (alpha_t / alpha_s)^2 sigma_s^2 (Kingma et al. 2021, arXiv:2107.00630 eq. 33); with c -> eta c,
    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z. eta = 1 is DDPM ancestral sampling."""
    c2 = 0.0
    if eta > 0 and sigma_t > 0 and alpha_s > 0:
        sigma_ts2 = max(sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2, 0.0)
        c2 = eta**2 * sigma_ts2 * sigma_s**2 / sigma_t**2
    x = alpha_s * x0 + math.sqrt(max(sigma_s**2 - c2, 0.0)) * eps
    if c2 > 0:
        x = x + math.sqrt(c2) * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x


def sample_ddim(denoise, x, ts, schedule, generator=None, eta=0.0, callback=None):
    """DDIM (Song et al. 2021, arXiv:2010.02502 eq. 12); eta = 0 deterministic, eta = 1 ancestral DDPM."""
    for i in range(len(ts) - 1):
        x0, eps = _call(denoise, x, ts[i])
        alpha_t, sigma_t = _scalars(schedule, ts[i])
        alpha_s, sigma_s = _scalars(schedule, ts[i + 1])
        if callback:
            callback(i, float(ts[i]), x, x0)
        x = _ancestral_step(x, x0, eps, alpha_s, sigma_s, alpha_t, sigma_t, eta, generator)
    return x


def sample_ddpm(denoise, x, ts, schedule, generator=None, eta=1.0, callback=None):
    """Ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, arXiv:2006.11239 alg. 2)."""
    return sample_ddim(denoise, x, ts, schedule, generator=generator, eta=1.0, callback=callback)


def _velocity(schedule, t, x0, eps):
    """Probability-flow ODE drift dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat (the marginal velocity of the path
    x_t = alpha x0 + sigma eps; Song et al. 2021 arXiv:2011.13456 eq. 13 written for this parameterisation)."""
    d_alpha, d_sigma = schedule.d_alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
    return float(d_alpha) * x0 + float(d_sigma) * eps


def sample_euler(denoise, x, ts, schedule, generator=None, callback=None):
    """Euler's method on the probability-flow ODE in t; the last step to t = 0 lands on x0_hat (sigma' is
    unbounded at t = 0 for VP schedules, and x_0 = x0_hat there exactly)."""
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x0, eps = _call(denoise, x, t)
        if callback:
            callback(i, t, x, x0)
        x = x0 if t_next == 0 else x + (t_next - t) * _velocity(schedule, t, x0, eps)
    return x


def sample_heun(denoise, x, ts, schedule, generator=None, callback=None):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, arXiv:2206.00364 alg. 1): an Euler
    step, then the trapezoid of the drifts at both ends; the step to t = 0 is a plain denoise, as in alg. 1."""
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x0, eps = _call(denoise, x, t)
        if callback:
            callback(i, t, x, x0)
        if t_next == 0:
            x = x0
            continue
        d = _velocity(schedule, t, x0, eps)
        x_euler = x + (t_next - t) * d
        x0_next, eps_next = _call(denoise, x_euler, t_next)
        x = x + (t_next - t) * 0.5 * (d + _velocity(schedule, t_next, x0_next, eps_next))
    return x


def sample_dpmpp_2m(denoise, x, ts, schedule, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095 alg. 2), multistep in lambda = log(alpha / sigma):
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i, h_i = lambda_i - lambda_{i-1},
    D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}, r_i = h_{i-1} / h_i; first order on the first step and
    on the last step to t = 0 (where h is infinite), as the paper's lower-order final step."""
    x0_prev, h_prev = None, None
    for i in range(len(ts) - 1):
        t, t_next = float(ts[i]), float(ts[i + 1])
        x0, _ = _call(denoise, x, t)
        if callback:
            callback(i, t, x, x0)
        alpha_t, sigma_t = _scalars(schedule, t)
        alpha_s, sigma_s = _scalars(schedule, t_next)
        if sigma_s == 0:
            x = x0
            continue
        lam_t = math.log(alpha_t / sigma_t) if alpha_t > 0 else -math.inf
        h = math.log(alpha_s / sigma_s) - lam_t
        d = x0
        if x0_prev is not None and math.isfinite(h_prev):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}


def sample(name, denoise, noise, steps, schedule, generator=None, eta=0.0, progress=False, callback=None, t_max=1.0):
    """Run sampler `name` for `steps` steps from `noise` (the state at t_max) down to t = 0.

    NFE is `steps` for every sampler but heun, which takes 2 * steps - 1. With progress=True a tqdm bar counts steps.
    """
    if name not in SAMPLERS:
        die(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    ts = time_grid(steps, t_max=t_max)
    bar = progress_bar(total=steps, desc=f"sampling ({name})", disable=not progress)

    def step_callback(i, t, x, x0):
        bar.update(1)
        if callback:
            callback(i, t, x, x0)

    options = {"eta": eta} if name == "ddim" else {}
    with torch.no_grad():
        x = SAMPLERS[name](denoise, noise, ts, schedule, generator=generator, callback=step_callback, **options)
    bar.close()
    return x


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

    def error(self, x):
        """How far samples x (N, D) are from the mixture: assign each to its most likely component, then the max over
        components of |weight error|, |mean error| / s_k (per dimension) and |std / s_k - 1|."""
        x = x.double()
        r, _ = self.posterior(
            x, torch.ones(len(x), 1, dtype=torch.float64), torch.zeros(len(x), 1, dtype=torch.float64)
        )
        k = r.argmax(-1)
        errors = {"weight": 0.0, "mean": 0.0, "std": 0.0}
        for j in range(len(self.w)):
            xj = x[k == j]
            errors["weight"] = max(errors["weight"], abs(len(xj) / len(x) - float(self.w[j])))
            if len(xj) < 2:
                errors["mean"] = errors["std"] = math.inf
                continue
            errors["mean"] = max(errors["mean"], float((xj.mean(0) - self.mu[j]).abs().max() / self.s[j]))
            std = float(((xj - xj.mean(0)) ** 2).mean().sqrt())
            errors["std"] = max(errors["std"], abs(std / float(self.s[j]) - 1))
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


def save_checkpoint(out_dir, step, model, ema_model, optimizer, config, extra=None, keep=3):
    """Write OUT_DIR/step_{step:07d} atomically, point OUT_DIR/latest at it, keep the newest `keep`.

    Everything goes to a temporary folder first and is renamed into place with os.replace, then `latest` is
    replaced the same way, so a run that dies mid-write leaves the last good checkpoint as `latest`.
    """
    os.makedirs(out_dir, exist_ok=True)
    for stale in (d for d in os.listdir(out_dir) if d.startswith(".tmp_")):  # left by a run that died mid-write
        shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    name = f"step_{step:07d}"
    final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f".tmp_{name}")
    os.makedirs(tmp)
    metadata = {"config": json.dumps(config), "step": str(step)}
    save_file(_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata=metadata)
    if ema_model is not None:
        save_file(_state_dict(ema_model), os.path.join(tmp, "ema.safetensors"), metadata=metadata)
    state = {"step": step, "rng": rng_state(), "extra": extra or {}}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, os.path.join(tmp, "train_state.pt"))
    if os.path.exists(final):  # re-saving the same step: move the old one aside, swap, then delete it
        os.replace(final, tmp + "_old")
    os.replace(tmp, final)
    shutil.rmtree(tmp + "_old", ignore_errors=True)
    with open(os.path.join(out_dir, "latest.tmp"), "w") as f:
        f.write(name + "\n")
    os.replace(os.path.join(out_dir, "latest.tmp"), os.path.join(out_dir, "latest"))
    for old in sorted(d for d in os.listdir(out_dir) if re.fullmatch(r"step_\d+", d))[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(out_dir, old))
    return final


def resolve_checkpoint(path):
    """A step folder as it is, or a run folder through its `latest` file; stops with a one-line error if neither."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        ckpt = os.path.join(path, open(latest).read().strip())
        if os.path.isfile(os.path.join(ckpt, "model.safetensors")):
            return ckpt
        die(f"{latest} points to {ckpt}, which has no model.safetensors")
    die(f"no checkpoint at {path!r}: expected a step folder with model.safetensors or a run folder with `latest`")


def resolve_resume(out_dir, resume):
    """RESUME "" -> None (fresh run); "auto" -> the newest checkpoint in out_dir, or None; else that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        return resolve_checkpoint(out_dir) if os.path.isfile(os.path.join(out_dir, "latest")) else None
    return resolve_checkpoint(resume)


def load_config(ckpt_dir):
    """The resolved config stored in model.safetensors' metadata."""
    with safe_open(os.path.join(ckpt_dir, "model.safetensors"), framework="pt") as f:
        return json.loads(f.metadata()["config"])


def load_weights(ckpt_dir, model, which="ema"):
    """Load ema.safetensors (or model.safetensors) into `model`, strictly."""
    path = os.path.join(ckpt_dir, f"{which}.safetensors")
    if not os.path.isfile(path):
        die(f"{path} does not exist")
    model.load_state_dict(load_file(path), strict=True)
    return model


def load_checkpoint(ckpt_dir, model, ema_model=None, optimizer=None):
    """Restore model, EMA, optimizer and RNG states from `ckpt_dir`; returns the train state (step, extra, ...).
    train_state.pt loads with weights_only=True, so it can hold no pickled objects."""
    load_weights(ckpt_dir, model, "model")
    if ema_model is not None:
        load_weights(ckpt_dir, ema_model, "ema")
    state = torch.load(os.path.join(ckpt_dir, "train_state.pt"), map_location="cpu", weights_only=True)
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state


def setup_accelerator(mixed_precision, batch_size, grad_accum):
    """An accelerate.Accelerator and the per-process micro-batch. Mixed precision only on GPU (CPU runs fp32);
    cpu=True on a CPU machine, which is what makes `torchrun` processes join one gloo group. Stops with a one-line
    error when the global batch does not divide by processes x accumulation steps."""
    from accelerate import Accelerator

    on_gpu = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision if on_gpu else "no", cpu=not on_gpu)
    world = accelerator.num_processes
    if batch_size % (world * grad_accum):
        die(f"batch_size={batch_size} must divide by processes x grad_accum = {world} x {grad_accum}")
    return accelerator, batch_size // (world * grad_accum)


# ----------------------------------------------------------------------------------------------------------------
# Logging, progress bars, images and plots
# ----------------------------------------------------------------------------------------------------------------


def progress_bar(iterable=None, desc="", disable=False, total=None):
    """A tqdm bar (shown only when not disabled, i.e. on the main process)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=False)


def peak_memory_mb(device):
    """Peak memory in MiB: allocated CUDA memory on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


class Logger:
    """One console line and one JSON line in OUT_DIR/log.jsonl per call, on the main process only."""

    def __init__(self, out_dir, is_main=True):
        self.path, self.is_main, self.t0 = os.path.join(out_dir, "log.jsonl"), is_main, time.time()
        if is_main:
            os.makedirs(out_dir, exist_ok=True)

    def log(self, step, **values):
        if not self.is_main:
            return
        values = {k: (float(v) if torch.is_tensor(v) else v) for k, v in values.items()}
        record = {"step": step, "time": round(time.time() - self.t0, 2), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        parts = [f"step {step}"]
        for k, v in values.items():
            if isinstance(v, float):
                parts.append(f"{k} {v:.4g}")
            elif not isinstance(v, (list, dict)):
                parts.append(f"{k} {v}")
        print(" | ".join(parts), flush=True)


class LossBins:
    """Loss summed per noise-level bin on the device (no .item() per step); means() reads them once per log."""

    def __init__(self, n_bins=10, device=None):
        self.n_bins = n_bins
        self.sums = torch.zeros(n_bins, device=device, dtype=torch.float64)
        self.counts = torch.zeros(n_bins, device=device, dtype=torch.float64)

    def add(self, per_sample_loss, t):
        idx = (t.detach() * self.n_bins).long().clamp(0, self.n_bins - 1)
        self.sums.index_add_(0, idx, per_sample_loss.detach().double())
        self.counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def means(self):
        return [s / c if c > 0 else float("nan") for s, c in zip(self.sums.tolist(), self.counts.tolist())]

    def reset(self):
        self.sums.zero_()
        self.counts.zero_()


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

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    matplotlib.image.imsave(path, image_grid(x, nrow))


def plot_loss(log_path, png_path, key="loss"):
    """Plot `key` against step from a log.jsonl, with a log-scale y axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(log_path) if line.strip()]
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot(*zip(*points))
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
# (metrics section: filled in by the evaluation work)
