"""Every sampler, driven by the closed-form optimal denoiser of a 2D Gaussian mixture, reproduces the mixture."""

import math

import pytest
import torch

import common

MIXTURE = common.GaussianMixture(
    weights=[0.5, 0.3, 0.2], means=[[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], stds=[0.3, 0.5, 0.2]
)
# Steps per sampler for the distribution test (NFE: heun takes 2 * steps - 1, the others `steps`).
STEPS = {"ddpm": 400, "ddim": 200, "ddim_eta0.5": 200, "euler": 100, "heun": 50, "dpmpp_2m": 50}
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


def ode_error(sampler, schedule, nfe, reference):
    steps = (nfe + 1) // 2 if sampler == "heun" else nfe
    x = run(sampler, schedule, "v", steps, n=2000)
    return float((x - reference).norm(dim=1).mean())


@pytest.mark.parametrize("schedule", ["flow", "cosine"])
def test_second_order_solvers_converge_faster(schedule):
    """Endpoint error against a 1000-step Heun solve from the same noise: Euler is first order, Heun and
    DPM-Solver++(2M) second order (observed order above 1.4 between NFE 10 and 40, where the first-order final step
    of DPM-Solver++ does not yet dominate)."""
    reference = run("heun", schedule, "v", 1000, n=2000)
    order, final = {}, {}
    for sampler in ("euler", "heun", "dpmpp_2m"):
        e10, e20, e40 = (ode_error(sampler, schedule, nfe, reference) for nfe in (10, 20, 40))
        assert e10 > e20 > e40, (sampler, e10, e20, e40)
        order[sampler], final[sampler] = math.log2(e10 / e40) / 2, e40
    assert 0.7 < order["euler"] < 1.3, order
    assert order["heun"] > 1.4 and order["dpmpp_2m"] > 1.4, order
    assert final["heun"] < final["euler"] and final["dpmpp_2m"] < final["euler"], final


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


def fixed_x0_denoiser(schedule, values):
    """A denoiser whose k-th call answers x0 = values[k] (eps follows from x_t), so each update can be written out."""
    calls = []

    def denoise(x, t):
        x0 = torch.full_like(x, values[min(len(calls), len(values) - 1)])
        calls.append(float(t[0]))
        alpha, sigma = (common.append_dims(v, x.ndim) for v in schedule.alpha_sigma(t))
        return x0, (x - alpha * x0) / sigma

    return denoise, calls


def drift(schedule, t, x, x0, h=1e-6):
    """dx/dt = alpha'(t) x0 + sigma'(t) eps, with the derivatives taken by central differences."""
    a, s = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    (a1, s1), (a0, s0) = (schedule.alpha_sigma(torch.tensor(u, dtype=torch.float64)) for u in (t + h, t - h))
    return float(a1 - a0) / (2 * h) * x0 + float(s1 - s0) / (2 * h) * (x - a * x0) / s


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_single_updates_match_the_written_out_methods(schedule):
    """Euler, Heun (Karras et al. 2022 alg. 1) and DPM-Solver++(2M) (Lu et al. 2022 alg. 2), two steps each,
    against the updates written out by hand."""
    sch = common.Schedule(schedule)
    ts = torch.tensor([0.8, 0.6, 0.4], dtype=torch.float64)
    x_start, c = 0.9, (0.3, -0.5, 0.2, 0.1)
    x = torch.full((1, 1), x_start, dtype=torch.float64)
    alpha = lambda t: float(sch.alpha_sigma(torch.tensor(t, dtype=torch.float64))[0])  # noqa: E731
    sigma = lambda t: float(sch.alpha_sigma(torch.tensor(t, dtype=torch.float64))[1])  # noqa: E731
    lam = lambda t: math.log(alpha(t) / sigma(t))  # noqa: E731

    denoise, calls = fixed_x0_denoiser(sch, c)
    out = common.sample_euler(denoise, x, ts, sch)
    x1 = x_start + (0.6 - 0.8) * drift(sch, 0.8, x_start, c[0])
    x2 = x1 + (0.4 - 0.6) * drift(sch, 0.6, x1, c[1])
    assert calls == [0.8, 0.6] and float(out) == pytest.approx(x2, rel=1e-6)

    denoise, calls = fixed_x0_denoiser(sch, c)
    out = common.sample_heun(denoise, x, ts, sch)
    xe = x_start - 0.2 * drift(sch, 0.8, x_start, c[0])
    x1 = x_start - 0.2 * 0.5 * (drift(sch, 0.8, x_start, c[0]) + drift(sch, 0.6, xe, c[1]))
    xe = x1 - 0.2 * drift(sch, 0.6, x1, c[2])
    x2 = x1 - 0.2 * 0.5 * (drift(sch, 0.6, x1, c[2]) + drift(sch, 0.4, xe, c[3]))
    assert calls == pytest.approx([0.8, 0.6, 0.6, 0.4]) and float(out) == pytest.approx(x2, rel=1e-6)

    denoise, calls = fixed_x0_denoiser(sch, c)
    out = common.sample_dpmpp_2m(denoise, x, ts, sch)
    h1, h2 = lam(0.6) - lam(0.8), lam(0.4) - lam(0.6)
    x1 = sigma(0.6) / sigma(0.8) * x_start - alpha(0.6) * (math.exp(-h1) - 1) * c[0]
    r = h1 / h2
    d = (1 + 1 / (2 * r)) * c[1] - 1 / (2 * r) * c[0]
    x2 = sigma(0.4) / sigma(0.6) * x1 - alpha(0.4) * (math.exp(-h2) - 1) * d
    assert calls == [0.8, 0.6] and float(out) == pytest.approx(x2, rel=1e-9)
