"""Every sampler, driven by the closed-form optimal denoiser of a 2D Gaussian mixture, reproduces the mixture."""

import math

import pytest
import torch

import common

MIXTURE = common.GaussianMixture(
    weights=[0.5, 0.3, 0.2], means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], stds=[0.3, 0.5, 0.2]
)
# Steps per sampler for the distribution test (NFE: heun takes 2 * steps - 1, the others `steps`).
STEPS = {
    "ddpm": 400,
    "ddim": 200,
    "ddim_eta0.5": 200,
    "euler": 100,
    "heun": 100,
    "dpmpp_2m": 50,
    "dpmpp_3m": 50,
    "unipc": 50,
}
# Tolerances at N = 8000 samples; the sampling noise alone gives about weight 0.01, mean 0.05, std 0.03.
TOLERANCE = {"weight": 0.03, "mean": 0.12, "std": 0.07}
N = 8000


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These are many tiny tensor operations, which intra-op threads only slow down (badly on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [(sampler, schedule) for sampler in STEPS for schedule in common.Schedule.KINDS]
# eps-prediction on the flow path is left out: alpha(1) = 0 there, so x0 cannot be recovered from eps at t = 1.
PREDICTIONS = {
    kind: [p for p in common.PREDICTIONS if not (kind == "flow" and p == "eps")] for kind in common.Schedule.KINDS
}


def run(sampler, schedule, prediction, steps, n=N, seed=0):
    sch = common.Schedule(schedule)
    denoise = common.make_denoiser(MIXTURE.model(sch, prediction), sch, prediction)
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    name, eta = (sampler, 0.0) if "eta" not in sampler else ("ddim", float(sampler.split("eta")[1]))
    return common.sample(name, denoise, noise, steps, sch, generator=torch.Generator().manual_seed(seed + 1), eta=eta)


@pytest.mark.parametrize("sampler,schedule", CASES)
def test_sampler_reproduces_mixture(sampler, schedule):
    """With v-prediction, at the NFE in STEPS; the next test shows every other prediction gives the same samples."""
    x = run(sampler, schedule, "v", STEPS[sampler])
    assert torch.isfinite(x).all()
    err = MIXTURE.error(x)
    for key, tol in TOLERANCE.items():
        assert err[key] < tol, f"{sampler}/{schedule}: {key} error {err[key]:.3f} >= {tol} ({err})"


@pytest.mark.parametrize("sampler,schedule", CASES)
def test_every_prediction_type_gives_the_same_samples(sampler, schedule):
    """The optimal denoiser expressed as eps, v, x0 or flow velocity drives the sampler to the same points (same
    noise), so each reproduces the mixture as the v run above does."""
    reference = run(sampler, schedule, "v", STEPS[sampler] // 4, n=256)
    for prediction in PREDICTIONS[schedule]:
        x = run(sampler, schedule, prediction, STEPS[sampler] // 4, n=256)
        torch.testing.assert_close(x, reference, rtol=1e-6, atol=1e-6, msg=f"{sampler}/{schedule}/{prediction}")


@pytest.mark.parametrize("sampler", list(STEPS))
def test_distribution_error_falls_with_nfe(sampler):
    errors = [MIXTURE.error(run(sampler, "cosine", "v", steps))["max"] for steps in (5, 20, STEPS[sampler])]
    assert errors[0] > errors[1] > errors[2], errors


def ode_error(sampler, schedule, nfe, reference, t_min):
    steps = common.steps_for_nfe(sampler, nfe, t_min)
    x = common.sample(
        sampler,
        common.make_denoiser(MIXTURE.model(common.Schedule(schedule), "v"), common.Schedule(schedule), "v"),
        torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
        steps,
        common.Schedule(schedule),
        grid="logsnr",
        t_min=t_min,
        s_max=80.0,  # a jump from s = 1e4 to 80 (one DDIM step, error ~ c^2 / 2 s^2) leaves every run the same end
    )
    return float((x - reference).norm(dim=1).mean())


@pytest.mark.parametrize("schedule", ["flow", "cosine"])
def test_higher_order_solvers_beat_euler_on_the_mixture(schedule):
    """Endpoint error on the mixture against a 2000-step solve from the same noise (logsnr grid, final denoise at
    s = 0.01): at 20 and 40 NFE every higher-order solver is closer than Euler, and each error falls with NFE."""
    sch = common.Schedule(schedule)
    t_min = t_at_s(sch, 0.01)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = common.sample(
        "dpmpp_2m",
        common.make_denoiser(MIXTURE.model(sch, "v"), sch, "v"),
        noise,
        2000,
        sch,
        grid="logsnr",
        s_max=80.0,
        t_min=t_min,
    )
    errors = {s: [ode_error(s, schedule, nfe, reference, t_min) for nfe in (20, 40)] for s in common.DETERMINISTIC}
    for sampler, (e20, e40) in errors.items():
        assert e40 < e20, (sampler, errors)
        if sampler not in ("euler", "ddim"):
            assert e20 < errors["euler"][0] and e40 < errors["euler"][1], (sampler, errors)


@pytest.mark.parametrize("schedule", common.Schedule.KINDS)
def test_every_schedule_and_prediction_gives_finite_samples(schedule):
    """No (schedule, prediction) pair gives a non-finite sample with any sampler, eps on the flow path included
    (alpha(1) = 0 there), driven by the optimal denoiser and by an untrained-looking one (a fixed random map)."""
    sch = common.Schedule(schedule)
    net = torch.nn.Linear(3, 2).double()
    for prediction in common.PREDICTIONS:
        optimal = MIXTURE.model(sch, prediction)
        arbitrary = lambda x, t, cond=None: net(torch.cat([x, t[:, None]], 1)).detach()  # noqa: E731
        for model in (optimal, arbitrary):
            denoise = common.make_denoiser(model, sch, prediction)
            for sampler in common.SAMPLERS:
                noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
                x = common.sample(sampler, denoise, noise, 8, sch, generator=torch.Generator().manual_seed(1))
                assert torch.isfinite(x).all(), (schedule, prediction, sampler)


def test_cfg_scale_one_is_conditional_and_zero_unconditional():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)

    def model(x, t, cond=None):
        return net(torch.cat([x, cond[:, None].float()], 1)) * (1 + t[:, None])

    x, t = torch.randn(5, 2), torch.rand(5)
    cond, null = torch.ones(5), torch.zeros(5)
    torch.testing.assert_close(common.cfg_model(model, cond, null, 1.0)(x, t), model(x, t, cond=cond))
    torch.testing.assert_close(common.cfg_model(model, cond, null, 0.0)(x, t), model(x, t, cond=null))
    c, u = model(x, t, cond=cond), model(x, t, cond=null)
    torch.testing.assert_close(common.cfg_model(model, cond, null, 3.0)(x, t), u + 3.0 * (c - u))


def test_unknown_sampler_is_one_line_error():
    with pytest.raises(SystemExit, match="unknown sampler 'eulr'"):
        common.sample("eulr", None, torch.zeros(1, 2), 1, common.Schedule())


def test_ddpm_step_is_the_posterior_of_ho_et_al():
    """One ancestral step t -> s with a known x0 draws from q(x_s | x_t, x0) of Ho et al. 2020 eq. 6-7 written with
    alpha_bar: mean sqrt(ab_s) beta / (1 - ab_t) x0 + sqrt(a) (1 - ab_s) / (1 - ab_t) x_t, variance
    (1 - ab_s) / (1 - ab_t) beta, where a = ab_t / ab_s and beta = 1 - a."""
    sch = common.Schedule("cosine")
    t, s = 0.5, 0.3
    ab_t, ab_s = (float(sch.alpha_bar(torch.tensor(u, dtype=torch.float64))) for u in (t, s))
    a = ab_t / ab_s
    x0_value, x_t_value = 0.7, -0.4
    mean = math.sqrt(ab_s) * (1 - a) / (1 - ab_t) * x0_value + math.sqrt(a) * (1 - ab_s) / (1 - ab_t) * x_t_value
    var = (1 - ab_s) / (1 - ab_t) * (1 - a)

    def denoise(x, t_):
        x0 = torch.full_like(x, x0_value)
        alpha, sigma = (common.append_dims(v, x.ndim) for v in sch.alpha_sigma(t_))
        return x0, (x - alpha * x0) / sigma

    x = torch.full((400_000, 1), x_t_value, dtype=torch.float64)
    out = common.sample_ddpm(
        denoise, x, torch.tensor([t, s], dtype=torch.float64), sch, torch.Generator().manual_seed(0)
    )
    assert float(out.mean()) == pytest.approx(mean, abs=0.005)
    assert float(out.var()) == pytest.approx(var, rel=0.01)
    # DDIM eta = 0 (Song et al. 2021 eq. 12): x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps_hat, deterministic
    out = common.sample_ddim(denoise, x[:4], torch.tensor([t, s], dtype=torch.float64), sch, eta=0.0)
    eps_hat = (x_t_value - math.sqrt(ab_t) * x0_value) / math.sqrt(1 - ab_t)
    torch.testing.assert_close(out, torch.full_like(out, math.sqrt(ab_s) * x0_value + math.sqrt(1 - ab_s) * eps_hat))


GAUSSIAN = common.GaussianMixture(weights=[1.0], means=[[0.5, -1.0]], stds=[0.4])


def gaussian_posterior_variance(schedule, t):
    """Var(x0 | x_t) of GAUSSIAN: s^2 sigma^2 / (alpha^2 s^2 + sigma^2), the same for every x_t."""
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(torch.tensor(float(t), dtype=torch.float64)))
    s2 = float(GAUSSIAN.s[0]) ** 2
    return s2 * sigma**2 / (alpha**2 * s2 + sigma**2)


@pytest.mark.parametrize("schedule", ["cosine", "flow"])
def test_x0_variance_estimates_the_posterior_variance(schedule):
    """On Gaussian data the exact denoiser's mean squared error is the posterior variance, whatever x_t."""
    sch = common.Schedule(schedule)
    denoise = common.make_denoiser(GAUSSIAN.model(sch, "v"), sch, "v")
    variance = common.x0_variance(denoise, GAUSSIAN.sample(100_000, torch.Generator().manual_seed(0)), sch)
    for t in (1.0, 0.9, 0.5, 0.1, 0.01):
        assert variance(t) == pytest.approx(gaussian_posterior_variance(sch, t), rel=0.02), t
    assert variance(0.5) == variance(torch.tensor(0.5))  # memoised per time, the same draw of eps


@pytest.mark.parametrize("schedule", ["cosine", "linear", "flow"])
def test_analytic_ddpm_is_exact_on_a_gaussian_at_three_steps(schedule):
    """On Gaussian data every reverse kernel p(x_s | x_t) is Gaussian, with the mean of q(x_s | x_t, x0_hat) and the
    variance c^2 + k^2 Var(x0 | x_t) (k: x0's coefficient in that mean): so ancestral sampling with the Analytic-DPM
    variance reaches the exact marginal N(alpha m, alpha^2 s^2 + sigma^2) at t_min in 3 steps on any grid, where DDPM's
    posterior variance alone (c^2) falls short. Replacing k by alpha_s (x0's weight in x_s, a likely slip) fails it."""
    sch = common.Schedule(schedule)
    denoise = common.make_denoiser(GAUSSIAN.model(sch, "v"), sch, "v")
    noise = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_min = 0.2
    alpha, sigma = (float(v) for v in sch.alpha_sigma(torch.tensor(t_min, dtype=torch.float64)))
    std = math.sqrt(alpha**2 * float(GAUSSIAN.s[0]) ** 2 + sigma**2)

    def draw(x0_var):
        gen = torch.Generator().manual_seed(2)
        return common.sample(
            "ddpm", denoise, noise, 3, sch, gen, grid="logsnr", t_min=t_min, final="none", x0_var=x0_var
        )

    x = draw(lambda t: gaussian_posterior_variance(sch, t))
    torch.testing.assert_close(x.mean(0), alpha * GAUSSIAN.mu[0], atol=0.01, rtol=0)
    assert float(x.std(0).min()) == pytest.approx(std, rel=0.01) and float(x.std(0).max()) == pytest.approx(
        std, rel=0.01
    )
    assert float(draw(None).std(0).max()) < 0.95 * std  # DDPM's posterior variance: 0.6-0.9x the std at 3 steps


def test_analytic_ddpm_with_a_wrong_coefficient_fails(monkeypatch):
    """The exactness test above catches x0's coefficient k replaced by alpha_s."""

    def wrong(x, x0, eps, alpha_s, sigma_s, alpha_t, sigma_t, eta, generator, x0_var=0.0):
        c2 = eta**2 * max(sigma_t**2 - (alpha_t / alpha_s) ** 2 * sigma_s**2, 0.0) * sigma_s**2 / sigma_t**2
        var = c2 + alpha_s**2 * x0_var  # the slip: k = alpha_s
        x = alpha_s * x0 + math.sqrt(max(sigma_s**2 - c2, 0.0)) * eps
        return x + math.sqrt(var) * torch.randn(x.shape, generator=generator, dtype=x.dtype)

    monkeypatch.setattr(common, "_ancestral_step", wrong)
    with pytest.raises(AssertionError):
        test_analytic_ddpm_is_exact_on_a_gaussian_at_three_steps("cosine")


def test_x0_var_is_for_ddpm_only():
    with pytest.raises(SystemExit, match="x0_var .* is for the ddpm sampler, not 'unipc'"):
        common.sample("unipc", None, torch.zeros(1, 2), 1, common.Schedule(), x0_var=lambda t: 0.0)


def fixed_x0_denoiser(schedule, values):
    """A denoiser whose k-th call answers x0 = values[k] (eps follows from x_t), so each update can be written out."""
    calls = []

    def denoise(x, t):
        x0 = torch.full_like(x, values[min(len(calls), len(values) - 1)])
        calls.append(float(t[0]))
        alpha, sigma = (common.append_dims(v, x.ndim) for v in schedule.alpha_sigma(t))
        return x0, (x - alpha * x0) / sigma

    return denoise, calls


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_single_updates_match_the_written_out_methods(schedule):
    """Euler (in y = x / alpha, s = sigma / alpha), Heun (Karras et al. 2022 alg. 1, the trapezoid on x0 in lambda)
    and DPM-Solver++(2M) (Lu et al. 2022 alg. 2), two steps each, against the updates written out by hand."""
    sch = common.Schedule(schedule)
    ts = torch.tensor([0.8, 0.6, 0.4], dtype=torch.float64)
    x_start, c = 0.9, (0.3, -0.5, 0.2, 0.1)
    x = torch.full((1, 1), x_start, dtype=torch.float64)
    alpha = lambda t: float(sch.alpha_sigma(torch.tensor(t, dtype=torch.float64))[0])  # noqa: E731
    sigma = lambda t: float(sch.alpha_sigma(torch.tensor(t, dtype=torch.float64))[1])  # noqa: E731
    lam = lambda t: math.log(alpha(t) / sigma(t))  # noqa: E731

    s = lambda t: sigma(t) / alpha(t)  # noqa: E731  (Karras et al.'s coordinates: y = x / alpha, dy/ds = eps)
    eps = lambda t, x_, x0: (x_ - alpha(t) * x0) / sigma(t)  # noqa: E731

    denoise, calls = fixed_x0_denoiser(sch, c)
    out = common.sample_euler(denoise, x, ts, sch)
    y1 = x_start / alpha(0.8) + (s(0.6) - s(0.8)) * eps(0.8, x_start, c[0])
    y2 = y1 + (s(0.4) - s(0.6)) * eps(0.6, alpha(0.6) * y1, c[1])
    assert calls == [0.8, 0.6] and float(out) == pytest.approx(alpha(0.4) * y2, rel=1e-9)

    denoise, calls = fixed_x0_denoiser(sch, c)
    out = common.sample_heun(denoise, x, ts, sch)

    def heun_step(t0, t1, x_, x0, x0_next):  # x0 linear in lambda: int_0^h e^{-(h-u)} (x0 + (x0_next - x0) u / h) du
        h = lam(t1) - lam(t0)
        i0 = 1 - math.exp(-h)
        return sigma(t1) / sigma(t0) * x_ + alpha(t1) * (i0 * x0 + (h - i0) * (x0_next - x0) / h)

    x1 = heun_step(0.8, 0.6, x_start, c[0], c[1])
    x2 = heun_step(0.6, 0.4, x1, c[2], c[3])
    assert calls == pytest.approx([0.8, 0.6, 0.6, 0.4]) and float(out) == pytest.approx(x2, rel=1e-9)

    denoise, calls = fixed_x0_denoiser(sch, c)
    out = common.sample_dpmpp_2m(denoise, x, ts, sch)
    h1, h2 = lam(0.6) - lam(0.8), lam(0.4) - lam(0.6)
    x1 = sigma(0.6) / sigma(0.8) * x_start - alpha(0.6) * (math.exp(-h1) - 1) * c[0]
    r = h1 / h2
    d = (1 + 1 / (2 * r)) * c[1] - 1 / (2 * r) * c[0]
    x2 = sigma(0.4) / sigma(0.6) * x1 - alpha(0.4) * (math.exp(-h2) - 1) * d
    assert calls == [0.8, 0.6] and float(out) == pytest.approx(x2, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Time grids, the final step, NFE, and the order of every deterministic sampler
# ----------------------------------------------------------------------------------------------------------------


def t_at_s(schedule, s):
    """The t where sigma / alpha = s."""
    return float(schedule.t_from_log_snr(torch.tensor(-2 * math.log(s), dtype=torch.float64)))


@pytest.mark.parametrize("schedule", common.Schedule.KINDS)
def test_t_from_log_snr_inverts_log_snr(schedule):
    sch = common.Schedule(schedule)
    t = torch.linspace(1e-3, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(sch.t_from_log_snr(sch.log_snr(t)), t, rtol=0, atol=1e-10)


@pytest.mark.parametrize("schedule", common.Schedule.KINDS)
@pytest.mark.parametrize("grid", common.GRIDS)
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grid_endpoints_and_monotonicity(schedule, grid, steps):
    sch = common.Schedule(schedule)
    for t_max, t_min in ((1.0, 1e-3), (0.7, 0.05), (1.0, 0.95), (1.0, 0.0)):
        if grid != "uniform" and t_min == 0:
            continue
        ts = common.time_grid(steps, t_max, t_min, kind=grid, schedule=sch)
        assert len(ts) == steps + 1 and float(ts[0]) == t_max and float(ts[-1]) == t_min, (grid, ts)
        assert (ts[1:] < ts[:-1]).all(), (grid, ts)


@pytest.mark.parametrize("schedule", common.Schedule.KINDS)
def test_grids_are_uniform_in_their_coordinate(schedule):
    """karras: uniform in s^(1/rho) (Karras et al. eq. 5); logsnr: uniform in log-SNR; both after the jump from
    t_max to s_max when the schedule starts above s_max (the cosine and flow paths start at s = 1e4)."""
    sch = common.Schedule(schedule)
    t_min = t_at_s(sch, 0.002)
    for grid, rho in (("karras", 7.0), ("karras", 3.0), ("logsnr", 0.0)):
        ts = common.time_grid(12, 1.0, t_min, kind=grid, schedule=sch, rho=rho or 7.0, s_max=80.0)
        alpha, sigma = sch.alpha_sigma(ts)
        s = sigma / alpha.clamp_min(common.ALPHA_FLOOR)
        jumped = float(s[0]) > 80.0  # every schedule here: cosine and flow start at s = 1e4, linear VP at s = 153
        assert jumped
        coord = s.log() if grid == "logsnr" else s ** (1 / rho)
        coord = coord[1:] if jumped else coord
        if jumped:
            assert float(s[1]) == pytest.approx(80.0, rel=1e-9)
        gaps = coord[:-1] - coord[1:]
        torch.testing.assert_close(gaps, torch.full_like(gaps, float(gaps.mean())), rtol=1e-6, atol=0)


def test_grid_bad_arguments_are_one_line_errors():
    sch = common.Schedule("cosine")
    for grid in ("karras", "logsnr"):
        with pytest.raises(SystemExit, match=f"the {grid} grid needs t_min > 0"):
            common.time_grid(5, 1.0, 0.0, kind=grid, schedule=sch)
    with pytest.raises(SystemExit, match="0 <= t_min < t_max <= 1"):
        common.time_grid(5, 0.5, 0.6, kind="uniform", schedule=sch)
    with pytest.raises(SystemExit, match="unknown time grid 'karas'"):
        common.time_grid(5, kind="karas", schedule=sch)
    with pytest.raises(SystemExit, match="unknown final step 'jump'"):
        common.sample("ddim", None, torch.zeros(1, 2), 2, sch, final="jump")


def test_grid_snaps_to_a_discrete_schedule():
    ts = common.time_grid(20, 1.0, 0.002, kind="karras", schedule=common.Schedule("cosine"), t_steps=500)
    assert torch.equal(ts, (ts * 500).round() / 500) and (ts[1:] < ts[:-1]).all() and float(ts[-1]) == 0.002


@pytest.mark.parametrize("sampler", list(common.SAMPLERS))
@pytest.mark.parametrize(
    "grid,t_min,final",
    [("uniform", 0.0, "denoise"), ("karras", 1e-3, "denoise"), ("logsnr", 1e-3, "none"), ("uniform", 0.0, "none")],
)
def test_denoiser_calls_equal_the_nfe_reported(sampler, grid, t_min, final):
    sch = common.Schedule("cosine")
    calls = []

    def denoise(x, t):
        calls.append(float(t[0]))
        return MIXTURE.x0_eps(x, t, sch)

    for nfe in (3, 4, 10):
        calls.clear()
        steps = common.steps_for_nfe(sampler, nfe, t_min, final)
        x = common.sample(
            sampler,
            denoise,
            torch.zeros(4, 2, dtype=torch.float64),
            steps,
            sch,
            grid=grid,
            t_min=t_min,
            final=final,
            generator=torch.Generator().manual_seed(0),
        )
        ts = common.time_grid(steps, 1.0, t_min, kind=grid, schedule=sch)
        assert len(calls) == common.count_nfe(sampler, ts, final) <= nfe, (nfe, calls)
        assert len(calls) >= nfe - 1 and torch.isfinite(x).all()
        assert calls[-1] == pytest.approx(
            t_min if t_min > 0 and final == "denoise" else float(ts[-2]) if t_min == 0 else calls[-1]
        )


def point_mass_denoiser(schedule, c):
    """The data is the single point c: x0_hat = c, eps_hat = (x - alpha c) / sigma (the optimal denoiser)."""

    def denoise(x, t):
        alpha, sigma = (common.append_dims(v, x.ndim) for v in schedule.alpha_sigma(t.double()))
        return torch.full_like(x, c), (x - alpha * c) / sigma

    return denoise


@pytest.mark.parametrize("schedule", common.Schedule.KINDS)
@pytest.mark.parametrize("sampler", common.DETERMINISTIC)
def test_deterministic_samplers_are_exact_on_a_point_mass(schedule, sampler):
    """On a point mass the ODE's solution is x_t = alpha(t) c + sigma(t) eps_T (eps never changes), so every grid,
    final="none" lands exactly there, and final="denoise" (or t_min = 0) returns c."""
    sch = common.Schedule(schedule)
    c, x_T = 0.3, torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    alpha_T, sigma_T = common._scalars(sch, 1.0)
    eps_T = (x_T - alpha_T * c) / sigma_T
    for grid in common.GRIDS:
        t_min = t_at_s(sch, 0.01)
        out = common.sample(sampler, point_mass_denoiser(sch, c), x_T, 6, sch, grid=grid, t_min=t_min, final="none")
        alpha, sigma = common._scalars(sch, t_min)
        torch.testing.assert_close(out, alpha * c + sigma * eps_T, rtol=1e-9, atol=1e-9, msg=f"{grid}")
        out = common.sample(sampler, point_mass_denoiser(sch, c), x_T, 6, sch, grid=grid, t_min=t_min)
        torch.testing.assert_close(out, torch.full_like(out, c), rtol=0, atol=1e-12)
    out = common.sample(sampler, point_mass_denoiser(sch, c), x_T, 6, sch, grid="uniform", t_min=0.0)
    torch.testing.assert_close(out, torch.full_like(out, c), rtol=0, atol=1e-12)


GAUSS_MEAN, GAUSS_STD = 0.7, 0.4


def gaussian_denoiser(schedule):
    """The optimal denoiser of N(m, c^2): x0_hat = m + alpha c^2 / v (x - alpha m), eps_hat = sigma / v (x - alpha m),
    v = alpha^2 c^2 + sigma^2."""

    def denoise(x, t):
        alpha, sigma = (common.append_dims(v, x.ndim) for v in schedule.alpha_sigma(t.double()))
        var = alpha**2 * GAUSS_STD**2 + sigma**2
        return GAUSS_MEAN + alpha * GAUSS_STD**2 / var * (x - alpha * GAUSS_MEAN), sigma / var * (
            x - alpha * GAUSS_MEAN
        )

    return denoise


def gaussian_flow(schedule, x, t_from, t_to):
    """The exact probability-flow map of N(m, c^2) from t_from to t_to: it keeps (x - alpha m) / sqrt(v) fixed."""
    (a0, s0), (a1, s1) = common._scalars(schedule, t_from), common._scalars(schedule, t_to)
    z = (x - a0 * GAUSS_MEAN) / math.sqrt(a0**2 * GAUSS_STD**2 + s0**2)
    return a1 * GAUSS_MEAN + math.sqrt(a1**2 * GAUSS_STD**2 + s1**2) * z


def observed_order(sampler, schedule, steps=(16, 32, 64), grid="logsnr"):
    """log2 of the ratio of endpoint errors when the steps double, on a Gaussian from s = 10 to s = 0.05."""
    sch = common.Schedule(schedule)
    t_max, t_min = t_at_s(sch, 10.0), t_at_s(sch, 0.05)
    x = torch.linspace(-30, 30, 41, dtype=torch.float64)[:, None]
    exact = gaussian_flow(sch, x, t_max, t_min)
    errors = []
    for n in steps:
        out = common.sample(
            sampler, gaussian_denoiser(sch), x, n, sch, t_max=t_max, t_min=t_min, grid=grid, final="none"
        )
        errors.append(float((out - exact).abs().max()))
    return [math.log2(errors[i] / errors[i + 1]) for i in range(len(errors) - 1)], errors


ORDER = {
    "ddim": (0.9, 1.1),
    "euler": (0.9, 1.1),
    "heun": (1.9, 2.2),
    "dpmpp_2m": (1.8, 2.2),
    "dpmpp_3m": (2.8, 4.6),
    "unipc": (3.0, 4.9),
}


@pytest.mark.parametrize("schedule", ["cosine", "flow"])
@pytest.mark.parametrize("sampler", common.DETERMINISTIC)
def test_empirical_order_on_a_gaussian(schedule, sampler):
    """Euler / DDIM first order, Heun and DPM-Solver++(2M) second, DPM-Solver++(3M) third (its startup steps are
    lower order, but at high noise the data prediction barely moves, so the observed order is 3 to 4), UniPC at least
    third (its corrector adds one)."""
    orders, errors = observed_order(sampler, schedule)
    low, high = ORDER[sampler]
    assert all(low < p < high for p in orders), (orders, errors)


def test_a_wrong_coefficient_breaks_the_order(monkeypatch):
    """The order test can fail: halving the u^2 integral of the exponential integrator (I_2, the coefficient of the
    second divided difference) takes DPM-Solver++(3M) below third order."""
    good = common._phi_integrals
    monkeypatch.setattr(
        common, "_phi_integrals", lambda h, n: [v * (0.5 if k == 2 else 1) for k, v in enumerate(good(h, n))]
    )
    orders, _ = observed_order("dpmpp_3m", "cosine")
    assert not all(ORDER["dpmpp_3m"][0] < p for p in orders), orders


def test_exponential_weights_against_quadrature():
    """_exp_weights integrates e^{-(h - u)} times the interpolating polynomial exactly: compare with a fine
    Simpson rule on the Lagrange polynomial, for small and large h (series and recurrence branches)."""
    for h, nodes in (
        (0.05, [0.0, -0.04, -0.1]),
        (0.7, [0.7, 0.0, -0.5, -1.3]),
        (3.0, [0.0, -2.0]),
        (1e-4, [0.0, -1e-4, -3e-4]),
    ):
        values = [1.3, -0.4, 2.2, 0.9][: len(nodes)]
        u = torch.linspace(0, h, 20001, dtype=torch.float64)
        poly = sum(
            v * math.prod((u - nodes[k]) / (nodes[j] - nodes[k]) for k in range(len(nodes)) if k != j)
            for j, v in enumerate(values)
        )
        f = torch.exp(-(h - u)) * poly
        simpson = float((f[:-1:2] + 4 * f[1::2] + f[2::2]).sum() * (u[1] - u[0]) / 3)
        ours = sum(w * v for w, v in zip(common._exp_weights(h, nodes), values))
        assert ours == pytest.approx(simpson, rel=1e-9, abs=1e-15), (h, nodes)


def test_two_sample_error_is_zero_against_itself_and_small_between_draws():
    a = MIXTURE.sample(20000, torch.Generator().manual_seed(0))
    b = MIXTURE.sample(20000, torch.Generator().manual_seed(1))
    assert MIXTURE.error(a, a)["max"] == 0.0
    assert MIXTURE.error(a, b)["max"] < 0.1
    assert MIXTURE.error(a * 1.2, b)["max"] > 0.15


def test_explicit_times_are_used_and_checked():
    sch = common.Schedule("cosine")
    ts = torch.tensor([1.0, 0.6, 0.3, 0.05], dtype=torch.float64)
    seen = []
    denoise = common.make_denoiser(MIXTURE.model(sch, "v"), sch, "v")
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    common.sample("ddim", denoise, noise, 3, sch, times=ts, callback=lambda i, t, x, x0: seen.append(t))
    assert seen == pytest.approx([1.0, 0.6, 0.3])
    for bad in ([1.0, 0.3, 0.6, 0.05], [1.0, 0.5], [1.2, 0.5, 0.3, 0.1]):
        with pytest.raises(SystemExit, match="times: give steps"):
            common.sample_grid(3, sch, times=bad)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_fitted_grid_beats_the_logsnr_grid_on_fresh_noise(sampler):
    """fit_grid on a 300-sample pilot batch: the fitted grid's distance to an accurate solve must drop on the pilot
    and, on 2000 other noise samples, be below the logsnr grid it started from (the grid generalises, not memorises)."""
    sch = common.Schedule("cosine")
    denoise = common.make_denoiser(MIXTURE.model(sch, "v"), sch, "v")

    def noise(n, seed):
        return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    steps = 3 if sampler == "heun" else 5
    ts, info = common.fit_grid(sampler, denoise, noise(300, 0), steps, sch, rounds=1)
    assert len(ts) == steps + 1 and float(ts[0]) == 1.0 and bool((ts[1:] < ts[:-1]).all())
    assert info["after"] < info["before"] and info["calls"] > 0
    fresh = noise(2000, 1)
    t_ref = float(sch.t_from_log_snr(torch.tensor(-2 * math.log(1e-3), dtype=torch.float64)))
    reference = common.sample("unipc", denoise, fresh, 400, sch, grid="logsnr", t_min=t_ref, s_max=100.0)
    t_min = float(sch.t_from_log_snr(torch.tensor(-2 * math.log(0.03), dtype=torch.float64)))
    mse = lambda x: float(((x - reference) ** 2).sum(1).mean())  # noqa: E731
    fitted = mse(common.sample(sampler, denoise, fresh, steps, sch, times=ts))
    logsnr = mse(common.sample(sampler, denoise, fresh, steps, sch, grid="logsnr", t_min=t_min))
    assert fitted < 0.7 * logsnr, f"fitted {fitted:.4g} vs logsnr {logsnr:.4g}"


def test_fit_grid_refuses_a_stochastic_sampler_without_a_distribution_distance():
    sch = common.Schedule("cosine")
    denoise = common.make_denoiser(MIXTURE.model(sch, "v"), sch, "v")
    with pytest.raises(SystemExit, match="stochastic; give a distribution-level distance"):
        common.fit_grid("ddpm", denoise, torch.zeros(4, 2, dtype=torch.float64), 3, sch)
    with pytest.raises(SystemExit, match="unknown final step"):
        common.fit_grid("ddim", denoise, torch.zeros(4, 2, dtype=torch.float64), 3, sch, final="jump")


def _mixture_noise(n, seed):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_fit_grid_fits_ddpm_on_fixed_random_numbers():
    """ddpm fitted with a distribution-level distance: the same seed gives the same grid (the objective is a
    deterministic function of the grid), and on fresh noise and fresh random numbers the fitted grid's samples are
    closer as a distribution to an accurate solve than the logsnr grid it started from."""
    sch = common.Schedule("linear")
    denoise = common.make_denoiser(MIXTURE.model(sch, "v"), sch, "v")
    pilot, steps = _mixture_noise(1000, 0), 4
    ts, info = common.fit_grid("ddpm", denoise, pilot, steps, sch, MIXTURE.squared_error, rounds=1, seed=3)
    again, _ = common.fit_grid("ddpm", denoise, pilot, steps, sch, MIXTURE.squared_error, rounds=1, seed=3)
    assert torch.equal(ts, again) and info["after"] < info["before"]
    fresh = _mixture_noise(4000, 1)
    reference = common.accurate_solve(denoise, fresh, sch)
    t_min = float(sch.t_from_log_snr(torch.tensor(-2 * math.log(0.03), dtype=torch.float64)))
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    fitted = MIXTURE.squared_error(
        common.sample("ddpm", denoise, fresh, steps, sch, times=ts, generator=gen()), reference
    )
    logsnr = MIXTURE.squared_error(
        common.sample("ddpm", denoise, fresh, steps, sch, grid="logsnr", t_min=t_min, generator=gen()), reference
    )
    assert fitted < 0.7 * logsnr, f"fitted {fitted:.4g} vs logsnr {logsnr:.4g}"


def test_fit_grid_passes_the_sampler_options():
    """fit_grid's options reach the sampler at every evaluation: ddpm with the Analytic-DPM variance (x0_var) is
    fitted on its own objective, which differs from plain ddpm's on the same grid and random numbers."""
    sch = common.Schedule("cosine")
    denoise = common.make_denoiser(MIXTURE.model(sch, "v"), sch, "v")
    variance = common.x0_variance(denoise, MIXTURE.sample(2000, torch.Generator().manual_seed(5)), sch)
    pilot, steps = _mixture_noise(1000, 0), 3
    seen = []
    counted = lambda t: seen.append(float(t)) or variance(t)  # noqa: E731
    kw = dict(rounds=1, seed=3, s_max=10.0)
    _, analytic = common.fit_grid(
        "ddpm", denoise, pilot, steps, sch, MIXTURE.squared_error, options={"x0_var": counted}, **kw
    )
    _, plain = common.fit_grid("ddpm", denoise, pilot, steps, sch, MIXTURE.squared_error, **kw)
    assert seen and analytic["before"] != plain["before"] and analytic["after"] <= analytic["before"]


def test_fit_grid_starts_from_the_uniform_grid_too():
    """DDIM's best grid at 5 NFE is the uniform one whose last step lands on t = 0; Nelder-Mead from the logsnr grids
    alone stops in a worse optimum (measured: 1.38 against the uniform grid's 1.05). Among the starts, the fit can only
    end at or below the uniform grid on its own pilot."""
    sch = common.Schedule("cosine")
    denoise = common.make_denoiser(MIXTURE.model(sch, "v"), sch, "v")
    pilot, steps = _mixture_noise(1000, 0), 4
    reference = common.accurate_solve(denoise, pilot, sch)
    ts, info = common.fit_grid("ddim", denoise, pilot, steps, sch, MIXTURE.squared_error, rounds=1, reference=reference)
    uniform = common.sample("ddim", denoise, pilot, steps + 1, sch)  # 1, 0.8, ..., 0.2, 0: 5 calls
    assert info["after"] <= MIXTURE.squared_error(uniform, reference) + 1e-9


def test_bench_summary_compares_each_sampler_with_ddim_on_the_same_grids():
    import bench

    def row(grid, sampler, errors):
        return {"schedule": "cosine", "grid": grid, "sampler": sampler, "error": errors}

    rows = [
        row("uniform", "ddim", {5: 0.5, 10: 0.3}),
        row("fitted", "ddim", {5: 0.2, 10: 0.1}),
        row("uniform", "ddpm", {5: 0.4, 10: 0.35}),  # beats ddim's uniform at 5, loses at 10; no fitted row
        row("uniform", "unipc", {5: 0.6, 10: 0.2}),
        row("fitted", "unipc", {5: 0.15, 10: 0.02}),
    ]
    rows += [dict(r, schedule=kind) for kind in ("linear", "flow") for r in rows]
    summary = bench.sampler_summary(rows, (5, 10), floor=0.02)
    assert summary["best"]["cosine/10"] == {"sampler": "unipc", "grid": "fitted", "error": 0.02, "x_floor": 1.0}
    assert "cosine/uniform/unipc@5" in summary["worse_than_ddim"]
    assert "cosine/uniform/ddpm@10" in summary["worse_than_ddim"]
    assert [w for w in summary["best_grid_worse_than_ddim"] if w.startswith("cosine")] == ["cosine/ddpm@10"]


@pytest.mark.slow
def test_bench_samplers_runs_small_and_rejects_bad_options(tmp_path):
    import json
    import os
    import subprocess
    import sys

    def bench(*args):
        cmd = [sys.executable, "bench.py", "samplers", *args, f"out_dir={tmp_path}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)

    for bad, message in (("fit_pilot=0", "fit_pilot=0"), ("fit_nfes=1", "fit_nfes"), ("nfes=abc", "nfes")):
        out = bench(bad)
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = bench("n=500", "repeats=1", "nfes=5", "fit_nfes=5", "fit_pilot=50")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "bench_samplers.json").read_text())
    fitted = [r for r in result["rows"] if r["grid"] == "fitted"]
    assert {r["sampler"] for r in fitted} == set(bench_fitted()) and all(list(r["error"]) == ["5"] for r in fitted)
    assert all(len(r["times"]["5"]) == r["nfe_used"]["5"] for r in fitted if r["sampler"] != "heun")
    assert result["floor_draws"] == 16 and result["floor"] > 0
    assert 0 < result["accurate"]["cosine"] < 3 * result["floor"]  # an accurate solve scores near the floor


def bench_fitted():
    import bench

    return bench.FITTED


def test_squared_error_is_the_sum_of_squares_behind_error():
    x = MIXTURE.sample(4000, torch.Generator().manual_seed(0))
    ref = MIXTURE.sample(4000, torch.Generator().manual_seed(1))
    assert MIXTURE.squared_error(x, x) == 0.0
    e, sq = MIXTURE.error(x, ref), MIXTURE.squared_error(x, ref)
    assert e["max"] ** 2 <= sq <= 11 * e["max"] ** 2  # 3 components x (weight, 2 mean dimensions, std) terms
    shifted = x + torch.tensor(
        [0.0, 0.1], dtype=torch.float64
    )  # the narrow component (s = 0.2) moves by half a std, the others by 1/3 and 1/5
    assert MIXTURE.squared_error(shifted, x) == pytest.approx(
        (0.1 / 0.3) ** 2 + (0.1 / 0.5) ** 2 + (0.1 / 0.2) ** 2, rel=0.01
    )
