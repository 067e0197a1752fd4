"""common.py: schedules, conversions, timestep sampling, loss weights, LR, EMA, parser and checkpoints."""

import json
import math
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", common.Schedule.KINDS)
def test_schedule_endpoints_and_monotone(kind):
    sch = common.Schedule(kind)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha, sigma = sch.alpha_sigma(t)
    assert float(alpha[0]) == pytest.approx(1.0) and float(sigma[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(alpha[-1]) < 7e-3 and float(sigma[-1]) == pytest.approx(1.0, abs=1e-4)
    log_snr = sch.log_snr(t[1:-1])
    assert (log_snr[1:] < log_snr[:-1]).all(), "log-SNR must fall strictly with t"
    assert (alpha[1:] <= alpha[:-1]).all() and (sigma[1:] >= sigma[:-1]).all()
    if kind != "flow":
        torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))


@pytest.mark.parametrize("kind", common.Schedule.KINDS)
def test_schedule_derivatives_match_finite_differences(kind):
    sch = common.Schedule(kind)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    (a1, s1), (a0, s0) = sch.alpha_sigma(t + h), sch.alpha_sigma(t - h)
    d_alpha, d_sigma = sch.d_alpha_sigma(t)
    torch.testing.assert_close(d_alpha, (a1 - a0) / (2 * h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_sigma, (s1 - s0) / (2 * h), rtol=1e-5, atol=1e-6)


def test_cosine_matches_the_discrete_formula():
    """Nichol & Dhariwal: alpha_bar_i = f(i/T) / f(0) with f = cos^2(((i/T) + s) / (1 + s) * pi / 2)."""
    T, s = 500, 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ts = common.discrete_times(T)
    ab = common.Schedule("cosine").alpha_bar(ts)
    for i in (0, 1, 250, 499):
        assert float(ab[i]) == pytest.approx(f(i / T) / f(0), rel=1e-9)


def test_linear_beta_matches_ho_et_al_product():
    """alpha_bar_i = prod_j (1 - beta_j), beta linear 1e-4 .. 0.02 over 1000 steps, is the continuous limit at i/T."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab_discrete = torch.cumprod(1 - betas, 0)
    ab = common.Schedule("linear").alpha_bar(common.discrete_times(1000)[1:])
    torch.testing.assert_close(ab, ab_discrete, rtol=5e-2, atol=2e-4)  # O(beta^2) apart


def test_unknown_schedule():
    with pytest.raises(SystemExit, match="unknown schedule 'cosin'"):
        common.Schedule("cosin")


# ---------------------------------------------------------------- predictions


@pytest.mark.parametrize("kind", common.Schedule.KINDS)
@pytest.mark.parametrize("prediction", common.PREDICTIONS)
def test_conversions_round_trip(kind, prediction):
    sch = common.Schedule(kind)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(16, 3, 4, 4, generator=g).double()
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x_t = common.add_noise(x0, eps, t, sch)
    target = common.prediction_target(prediction, x0, eps, t, sch)
    x0_hat, eps_hat = common.to_x0_eps(target, x_t, t, sch, prediction)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_known_targets():
    sch = common.Schedule("flow")
    x0, eps, t = torch.ones(2, 3), 2 * torch.ones(2, 3), torch.tensor([0.25, 0.5])
    torch.testing.assert_close(common.prediction_target("flow", x0, eps, t, sch), eps - x0)
    vp = common.Schedule("cosine")
    alpha, sigma = vp.alpha_sigma(t)
    torch.testing.assert_close(
        common.prediction_target("v", x0, eps, t, vp), alpha[:, None] * eps - sigma[:, None] * x0
    )


def test_d3pm_uniform_noise():
    x0 = torch.randint(0, 10, (4, 5000), generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([1.0, 0.0, 0.5, 0.02])
    x_t = common.d3pm_uniform_noise(x0, keep, 10, generator=torch.Generator().manual_seed(1))
    same = (x_t == x0).double().mean(1)
    assert float(same[0]) == 1.0
    # kept w.p. a, else uniform (which hits the old class w.p. 1/10): P(same) = a + (1 - a) / 10
    for i, a in enumerate(keep.tolist()):
        assert float(same[i]) == pytest.approx(a + (1 - a) / 10, abs=0.03)
    assert float(common.d3pm_keep_prob(torch.tensor(0.0))) == pytest.approx(1.0)
    assert float(common.d3pm_keep_prob(torch.tensor(1.0))) == pytest.approx(0.02, abs=1e-6)
    assert float(common.d3pm_log_snr(torch.tensor(0.0))) == 20.0  # +inf clamped
    assert float(common.d3pm_log_snr(torch.tensor(1.0))) == pytest.approx(math.log(0.02 / 0.98), abs=1e-4)


# ---------------------------------------------------------------- timesteps and loss weights


def test_sample_t_ranges_and_shift():
    g = torch.Generator().manual_seed(0)
    u = common.sample_t(20000, "uniform", generator=g)
    ln = common.sample_t(20000, "logit_normal", generator=g)
    assert 0 < float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(torch.logit(ln).mean())) < 0.03 and abs(float(torch.logit(ln).std()) - 1) < 0.03
    shifted = common.sample_t(20000, "logit_normal", generator=torch.Generator().manual_seed(1), shift=3.0)
    assert float(shifted.mean()) > float(ln.mean()) + 0.1
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(common.resolution_shift(t, 3.0), torch.tensor([0.0, 0.75, 1.0]))
    assert common.shift_ratio(64 * 64, 32 * 32, 2) == pytest.approx(2.0)


def test_min_snr_weights_match_hang_et_al():
    sch = common.Schedule("cosine")
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    snr = sch.snr(t)
    torch.testing.assert_close(common.loss_weight("min_snr", t, sch, "eps", 5.0), snr.clamp(max=5) / snr)
    torch.testing.assert_close(common.loss_weight("min_snr", t, sch, "v", 5.0), snr.clamp(max=5) / (snr + 1))
    torch.testing.assert_close(common.loss_weight("min_snr", t, sch, "x0", 5.0), snr.clamp(max=5))
    soft = common.loss_weight("soft_min_snr", t, sch, "x0", 5.0)
    assert (soft <= snr.clamp(max=5) + 1e-12).all()
    torch.testing.assert_close(common.loss_weight("uniform", t, sch, "eps"), torch.ones_like(t))
    flow = common.Schedule("flow")
    snr_f = flow.snr(t)  # flow target u: x0 error = t * u error, so weight = min(SNR, g) * t^2
    torch.testing.assert_close(common.loss_weight("min_snr", t, flow, "flow", 5.0), snr_f.clamp(max=5) * t**2)


# ---------------------------------------------------------------- LR and EMA


def test_lr_at_boundaries():
    lr = lambda s, **k: common.lr_at(s, 1e-3, 100, 1100, **k)  # noqa: E731
    assert lr(0) == 0.0
    assert lr(50) == pytest.approx(5e-4)
    assert lr(100) == pytest.approx(1e-3)
    assert lr(600) == pytest.approx(5e-4)
    assert lr(1100) == pytest.approx(0.0, abs=1e-15)
    assert lr(5000, min_lr=1e-5) == pytest.approx(1e-5)
    assert lr(0, warmup_start=0.01) == pytest.approx(1e-5)
    assert lr(5000, kind="constant") == 1e-3
    assert common.lr_at(0, 1e-3, 0, 10) == pytest.approx(1e-3)


def test_ema_matches_hand_computation():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = common.EMA(model)
    for value in (3.0, 5.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model, 0.9)
    # 1 -> 0.9 * 1 + 0.1 * 3 = 1.2 -> 0.9 * 1.2 + 0.1 * 5 = 1.58
    assert float(ema.model.weight) == pytest.approx(1.58)
    assert not ema.model.weight.requires_grad


def test_ema_decay_schedules():
    assert common.ema_decay_warmup(0) == 0.0
    assert common.ema_decay_warmup(9, power=0.5, max_decay=0.99) == pytest.approx(1 - 10**-0.5)
    assert common.ema_decay_warmup(10**9, max_decay=0.999) == 0.999
    assert common.ema_decay_ramp(0, 0.99, 0.9995, 2000) == 0.99
    assert common.ema_decay_ramp(1000, 0.99, 0.9995, 2000) == pytest.approx(0.99475)
    assert common.ema_decay_ramp(5000, 0.99, 0.9995, 2000) == 0.9995


# ---------------------------------------------------------------- the override parser

SCRIPT = textwrap.dedent('''
    """A toy script for the parser."""
    import sys
    sys.path.insert(0, {root!r})
    import common
    BATCH_SIZE = 8       # global batch
    LR = 1e-4            # peak learning rate
    USE_EMA = True       # keep an EMA copy
    NAME = "run"         # run name
    CHANNELS = (64, 128) # per level
    if __name__ == "__main__":
        common.apply_overrides(globals(), sys.argv[1:])
''')


def toy_namespace(tmp_path):
    """The toy script's globals, as `apply_overrides(globals(), argv)` sees them."""
    path = tmp_path / "toy.py"
    path.write_text(SCRIPT.format(root=ROOT))
    consts = dict(BATCH_SIZE=8, LR=1e-4, USE_EMA=True, NAME="run", CHANNELS=(64, 128))
    return {"__file__": str(path), "__doc__": "A toy script for the parser.", "__name__": "toy", **consts}


def test_parser_coerces(tmp_path):
    ns = toy_namespace(tmp_path)
    cfg = common.apply_overrides(ns, ["batch_size=16", "--lr=3", "use_ema=false", "name=a=b c", "channels=[32, 64]"])
    assert cfg == {"batch_size": 16, "lr": 3.0, "use_ema": False, "name": "a=b c", "channels": (32, 64)}
    assert [type(v) for v in cfg.values()] == [int, float, bool, str, tuple]
    assert ns["LR"] == 3.0 and ns["CHANNELS"] == (32, 64)  # the script's constants are updated in place
    assert common.apply_overrides(toy_namespace(tmp_path), ["use_ema=True", "channels=7"])["channels"] == (7,)
    words = {"NAMES": ("unet", "dit")}  # a tuple of strings takes bare comma-separated words, or a literal
    assert common.apply_overrides(dict(words), ["names=uvit"])["names"] == ("uvit",)
    assert common.apply_overrides(dict(words), ["names=dit, uvit"])["names"] == ("dit", "uvit")
    assert common.apply_overrides(dict(words), ["names=('dit',)"])["names"] == ("dit",)


@pytest.mark.parametrize(
    "arg,message",
    [
        ("batch_sise=4", "unknown key 'batch_sise'; did you mean batch_size?"),
        ("batch_size", "has no '='"),
        ("batch_size=abc", "batch_size='abc': expected int"),
        ("lr=fast", "lr='fast': expected float"),
        ("use_ema=maybe", "expected true or false"),
        ("batch_size=1.5", "expected int like 8, got float"),
        ("channels=3.5", "expected a tuple of int"),
    ],
)
def test_parser_errors_are_one_line(tmp_path, arg, message):
    with pytest.raises(SystemExit) as info:
        common.apply_overrides(toy_namespace(tmp_path), [arg])
    text = str(info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text, text


def test_parser_error_in_a_real_process_has_no_traceback(tmp_path):
    toy_namespace(tmp_path)
    out = subprocess.run(
        [sys.executable, str(tmp_path / "toy.py"), "batch_sise=4"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip() == "error: unknown key 'batch_sise'; did you mean batch_size?"


def test_parser_help(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        common.apply_overrides(toy_namespace(tmp_path), ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "A toy script for the parser." in out
    assert "batch_size=8" in out and "global batch" in out and "lr=0.0001" in out and "peak learning rate" in out


# ---------------------------------------------------------------- checkpoints


def tiny_training_objects(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 4))
    ema = common.EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, ema, opt


def train_steps(model, ema, opt, n):
    for _ in range(n):
        x = torch.randn(16, 4)
        loss = ((model(x) - x.flip(1)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model, 0.9)


def test_save_load_identity_and_resume_matches_straight_run(tmp_path):
    model, ema, opt = tiny_training_objects()
    train_steps(model, ema, opt, 3)
    config = {"script": "toy", "width": 8}
    ckpt = common.save_checkpoint(str(tmp_path), 3, model, ema.model, opt, config, extra={"note": "x"})
    train_steps(model, ema, opt, 3)  # the straight run continues, drawing from the RNG stream
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model2, ema2, opt2 = tiny_training_objects(seed=123)
    torch.manual_seed(999)  # scramble RNGs: resume must restore them
    random.seed(5)
    np.random.seed(5)
    state = common.load_checkpoint(common.resolve_resume(str(tmp_path), "auto"), model2, ema2.model, opt2)
    assert state["step"] == 3 and state["extra"] == {"note": "x"}
    assert common.load_config(ckpt) == config
    train_steps(model2, ema2, opt2, 3)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_rng_state_resumes_the_same_stream():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = common.rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    common.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


def test_keep_newest_and_resolve(tmp_path):
    model, ema, opt = tiny_training_objects()
    for step in (1, 2, 3, 4):
        common.save_checkpoint(str(tmp_path), step, model, ema.model, opt, {"script": "toy"}, keep=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_")) == ["step_0000003", "step_0000004"]
    assert common.resolve_checkpoint(str(tmp_path)).endswith("step_0000004")
    assert common.resolve_resume(str(tmp_path), "") is None
    assert common.resolve_resume(str(tmp_path / "nothing"), "auto") is None
    with pytest.raises(SystemExit, match="no checkpoint at"):
        common.resolve_checkpoint(str(tmp_path / "nothing"))


def test_write_that_raises_halfway_keeps_last_good(tmp_path, monkeypatch):
    """A full disk while writing a checkpoint: a one-line error naming the last good checkpoint, which stays."""
    model, ema, opt = tiny_training_objects()
    good = common.save_checkpoint(str(tmp_path), 1, model, ema.model, opt, {"script": "toy"})
    good_weights = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, ema, opt, 1)
    calls = []

    def dying_save(*args, **kwargs):  # the second file of the checkpoint fails
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    real_save = common.save_file
    monkeypatch.setattr(common, "save_file", dying_save)
    with pytest.raises(SystemExit) as info:
        common.save_checkpoint(str(tmp_path), 2, model, ema.model, opt, {"script": "toy"})
    message = str(info.value.code)
    assert "No space left on device" in message and good in message and "\n" not in message, message
    monkeypatch.undo()
    assert common.resolve_checkpoint(str(tmp_path)) == good
    fresh, fresh_ema, fresh_opt = tiny_training_objects(seed=7)
    assert common.load_checkpoint(common.resolve_resume(str(tmp_path), "auto"), fresh, fresh_ema.model, fresh_opt)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, good_weights[k])
    common.save_checkpoint(str(tmp_path), 3, model, ema.model, opt, {"script": "toy"})  # stale tmp is cleaned
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".tmp_")]


def test_rotation_by_write_order_protects_the_resume_point(tmp_path):
    """Resuming from an older checkpoint writes smaller steps than the newer folders: rotation goes by write
    order, never deletes the folder just written or the protected one (the resume point)."""
    model, ema, opt = tiny_training_objects()
    for step in (2, 3, 4, 5):
        common.save_checkpoint(str(tmp_path), step, model, ema.model, opt, {"script": "toy"}, keep=4)
    resumed = str(tmp_path / "step_0000002")
    common.save_checkpoint(str(tmp_path), 3, model, ema.model, opt, {"script": "toy"}, keep=3, protect=[resumed])
    kept = sorted(d for d in os.listdir(tmp_path) if d.startswith("step_"))
    assert kept == ["step_0000002", "step_0000003", "step_0000004", "step_0000005"], kept  # 3 newest + protected
    common.save_checkpoint(str(tmp_path), 4, model, ema.model, opt, {"script": "toy"}, keep=2, protect=[resumed])
    kept = sorted(d for d in os.listdir(tmp_path) if d.startswith("step_"))
    assert kept == ["step_0000002", "step_0000003", "step_0000004"], kept  # step 5 is older than the re-saved 3, 4
    assert common.resolve_checkpoint(str(tmp_path)).endswith("step_0000004")


def test_refuses_to_write_non_finite_tensors(tmp_path):
    model, ema, opt = tiny_training_objects()
    common.save_checkpoint(str(tmp_path), 1, model, ema.model, opt, {"script": "toy"})
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(SystemExit, match="refusing to write .*step_0000002: model.0.weight is not finite"):
        common.save_checkpoint(str(tmp_path), 2, model, ema.model, opt, {"script": "toy"})
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_")) == ["step_0000001"]


def test_resave_killed_mid_swap_keeps_a_complete_latest(tmp_path):
    """Re-saving an existing step, killed at each point of the swap: `latest` always names a complete checkpoint,
    and the next save finishes the swap."""
    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        import common
        model = torch.nn.Linear(2, 2)
        common.save_checkpoint({str(tmp_path)!r}, 1, model, None, None, {{"script": "toy"}})
        with torch.no_grad():
            model.weight.fill_(7.0)
        real_replace, calls = os.replace, []
        def replace(src, dst):
            calls.append(dst)
            if len(calls) == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        common.os.replace = replace
        common.save_checkpoint({str(tmp_path)!r}, 1, model, None, None, {{"script": "toy"}})
    """)
    for kill_at in range(1, 6):  # latest -> tmp, old aside, tmp -> final, latest -> final (+ one past the end)
        out = subprocess.run([sys.executable, "-c", code, str(kill_at)], capture_output=True, timeout=300)
        ckpt = common.resolve_resume(str(tmp_path), "auto")
        weight = common.load_file(os.path.join(ckpt, "model.safetensors"))["weight"]
        assert float(weight[0, 0]) in (7.0,) or out.returncode == -9, (kill_at, out.stderr)
        assert weight.shape == (2, 2), kill_at
        common.save_checkpoint(str(tmp_path), 2, torch.nn.Linear(2, 2), None, None, {"script": "toy"})
        assert not [d for d in os.listdir(tmp_path) if d.startswith((".tmp_", ".old_"))], kill_at
        assert common.resolve_resume(str(tmp_path), "auto").endswith("step_0000002")
        for d in os.listdir(tmp_path):
            if d.startswith("step_"):
                common.shutil.rmtree(tmp_path / d)
        os.remove(tmp_path / "latest")


def test_write_killed_halfway_keeps_last_good(tmp_path):
    """A process killed (SIGKILL) while writing train_state.pt leaves `latest` on the previous checkpoint."""
    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        import common
        model = torch.nn.Linear(2, 2)
        common.save_checkpoint({str(tmp_path)!r}, 1, model, None, None, {{"script": "toy"}})
        real_save = torch.save
        def killed(obj, path, *a, **k):
            open(path, "wb").write(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed
        common.save_checkpoint({str(tmp_path)!r}, 2, model, None, None, {{"script": "toy"}})
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert out.returncode == -9
    assert any(d.startswith(".tmp_step_0000002") for d in os.listdir(tmp_path))
    ckpt = common.resolve_resume(str(tmp_path), "auto")
    assert ckpt.endswith("step_0000001")
    state = common.load_checkpoint(ckpt, torch.nn.Linear(2, 2))
    assert state["step"] == 1


def test_corrupt_files_are_one_line_errors(tmp_path):
    """A pickled object, a truncated or random-bytes file, a missing file, another model's shape: each a one-line
    error naming the file."""
    model, ema, opt = tiny_training_objects()
    ckpt = common.save_checkpoint(str(tmp_path), 1, model, ema.model, opt, {"script": "toy"})
    state_path = os.path.join(ckpt, "train_state.pt")
    good_state = open(state_path, "rb").read()

    def error(fn):
        with pytest.raises(SystemExit) as info:
            fn()
        text = str(info.value.code)
        assert text.startswith("error: ") and "\n" not in text, text
        return text

    torch.save({"step": 1, "rng": common.rng_state(), "evil": tiny_training_objects}, state_path)
    assert "pickled objects" in error(lambda: common.load_checkpoint(ckpt, model))
    open(state_path, "wb").write(good_state[: len(good_state) // 2])
    assert "train_state.pt is missing, truncated or corrupt" in error(lambda: common.load_checkpoint(ckpt, model))
    open(state_path, "wb").write(good_state)
    weights = os.path.join(ckpt, "model.safetensors")
    good_weights = open(weights, "rb").read()
    for bad in (good_weights[:-50], os.urandom(4096), b""):
        open(weights, "wb").write(bad)
        assert "model.safetensors" in error(lambda: common.load_checkpoint(ckpt, model))
        assert "not a readable checkpoint" in error(lambda: common.load_config(ckpt))
    open(weights, "wb").write(good_weights)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
    assert "does not fit this model" in error(lambda: common.load_checkpoint(ckpt, wider))
    os.remove(state_path)
    assert "train_state.pt is missing" in error(lambda: common.load_checkpoint(ckpt, model))


def test_import_prints_nothing():
    out = subprocess.run([sys.executable, "-c", "import common"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


def test_image_grid_and_loss_plot(tmp_path):
    x = torch.linspace(-1, 1, 5 * 3 * 8 * 8).reshape(5, 3, 8, 8)
    grid = common.image_grid(x, nrow=3, pad=2)
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3) and grid.dtype == np.uint8
    assert grid[2, 2, 0] == 0 and grid[0, 0].tolist() == [255, 255, 255]  # x[0, 0, 0, 0] = -1 -> 0; white padding
    common.save_image_grid(x, str(tmp_path / "grid.png"))
    log = common.Logger(str(tmp_path))
    for step in range(1, 4):
        log.log(step, loss=1.0 / step, lr=1e-3, loss_bins=[1.0, None])
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["loss"] for r in rows] == [1.0, 0.5, 1.0 / 3]
    common.plot_loss(str(tmp_path / "log.jsonl"), str(tmp_path / "loss.png"))
    common.plot_bins(str(tmp_path / "log.jsonl"), str(tmp_path / "bins.png"))
    common.plot_loss(str(tmp_path / "missing.jsonl"), str(tmp_path / "none.png"))  # no log yet: no plot, no error
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "bins.png").stat().st_size > 0 and not (tmp_path / "none.png").exists()


def test_metrics_sums_means_and_bins():
    metrics = common.Metrics(torch.device("cpu"), n_bins=4)
    metrics.add(loss=torch.tensor([1.0, 3.0]))
    metrics.add(loss=torch.tensor([5.0]))
    metrics.add_binned("loss_bins", torch.tensor([1.0, 3.0, 5.0, 7.0]), torch.tensor([0.1, 0.2, 0.6, 1.0]))
    out = metrics.reduce()
    assert out == {"loss": 3.0, "loss_bins": [2.0, None, 5.0, 7.0]}
    assert metrics.reduce() == {"loss": None, "loss_bins": [None] * 4}  # reset after reading


def test_rules_and_choices(tmp_path):
    ns = {"BATCH_SIZE": 8, "EVERY": 5, "DROP": 0.1, "MODE": "a", "BETAS": (0.9, 0.99)}
    ns["__annotations__"] = {
        "BATCH_SIZE": common.bounds("> 0"),
        "EVERY": common.bounds("> 0 or -1"),
        "DROP": common.bounds("0..1"),
        "MODE": common.choices("a", "b"),
        "BETAS": common.bounds("0..0.999"),
    }
    assert common.apply_overrides(dict(ns), ["every=-1", "drop=1", "mode=b"])["every"] == -1
    for arg, message in [
        ("batch_size=0", "batch_size=0 is out of range; it must be > 0"),
        ("batch_size=-8", "it must be > 0"),
        ("every=0", "every=0 is out of range; it must be > 0 or -1"),
        ("drop=1.5", "drop=1.5 is out of range; it must be 0..1"),
        ("mode=c", "mode='c' is not a choice; choose one of a, b"),
        ("betas=(0.9,1.5)", "betas=1.5 is out of range"),
        ("drop=1e999", "expected a finite number"),
    ]:
        with pytest.raises(SystemExit) as info:
            common.apply_overrides(dict(ns), [arg])
        assert message in str(info.value.code), (arg, info.value.code)
    with pytest.raises(SystemExit, match="mode is given twice"):
        common.apply_overrides(dict(ns), ["mode=a", "mode=b"])


def _uniform_step(a, K):
    """The uniform-D3PM transition matrix M[i, j] = P(next = j | current = i) = a [i = j] + (1 - a) / K."""
    return a * torch.eye(K, dtype=torch.float64) + (1 - a) / K


def test_d3pm_reverse_is_exact_for_the_ideal_denoiser():
    """With the ideal per-cell denoiser of a known categorical prior pi, p(x0 | x_t) oc pi q(x_t | x0), one reverse
    step equals the exact q(x_s | x_t) by Bayes, q(x_s | x_t) oc q(x_t | x_s) q(x_s), for every x_t."""
    K, keep_t, keep_s = 5, 0.3, 0.7
    pi = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q_s = pi @ _uniform_step(keep_s, K)  # q(x_s)
    q_ts = _uniform_step(keep_t / keep_s, K)  # q(x_t | x_s)
    q_t0 = _uniform_step(keep_t, K)  # q(x_t | x0)
    for x_t in range(K):
        posterior = pi * q_t0[:, x_t] / (pi * q_t0[:, x_t]).sum()  # the ideal denoiser's p(x0 | x_t)
        exact = q_ts[:, x_t] * q_s / (q_ts[:, x_t] * q_s).sum()
        step = common.d3pm_uniform_reverse(torch.tensor(x_t), posterior, keep_t, keep_s)
        torch.testing.assert_close(step, exact)
        assert float(step.sum()) == pytest.approx(1.0)


def test_d3pm_reverse_chain_returns_the_prior():
    """From the exact marginal at the noisiest level, the chain of exact reverse steps driven by the ideal denoiser
    returns the prior: the distribution of every x_s, tracked in closed form, is q(x_s), ending at pi."""
    K, floor = 4, 0.02
    pi = torch.tensor([0.55, 0.25, 0.15, 0.05], dtype=torch.float64)
    levels = torch.linspace(1, 0, 9, dtype=torch.float64)
    keep = common.d3pm_keep_prob(levels, floor)
    dist = pi @ _uniform_step(float(keep[0]), K)  # q(x_1)
    for k in range(len(levels) - 1):
        keep_t, keep_s = float(keep[k]), float(keep[k + 1])
        q_t0 = _uniform_step(keep_t, K)
        x_t = torch.arange(K)
        posterior = pi * q_t0.T / (pi * q_t0.T).sum(-1, keepdim=True)  # (K x_t, K x0)
        kernel = common.d3pm_uniform_reverse(x_t, posterior, keep_t, keep_s)  # (K x_t, K x_s)
        dist = dist @ kernel
        torch.testing.assert_close(dist, pi @ _uniform_step(keep_s, K))
    torch.testing.assert_close(dist, pi)
    # the eq. 4 kernel without the division by q(x_t | x0) (the earlier sampler) does not return the prior
    dist = pi @ _uniform_step(float(keep[0]), K)
    for k in range(len(levels) - 1):
        keep_t, keep_s = float(keep[k]), float(keep[k + 1])
        q_t0 = _uniform_step(keep_t, K)
        posterior = pi * q_t0.T / (pi * q_t0.T).sum(-1, keepdim=True)
        dist = dist @ common.d3pm_uniform_reverse_austin(torch.arange(K), posterior, keep_t, keep_s)
    assert (dist - pi).abs().max() > 0.02


def test_d3pm_austin_kernel_is_their_eq4_summed_over_x0():
    """d3pm_uniform_reverse_austin against the brute-force sum over x0 of q(x_s | x0) q(x_t | x_s) p(x0 | x_t),
    normalised over x_s (Austin et al. 2021 eq. 4), for every x_t and an arbitrary posterior."""
    K, keep_t, keep_s = 5, 0.3, 0.7
    g = torch.Generator().manual_seed(0)
    q_s0, q_ts = _uniform_step(keep_s, K), _uniform_step(keep_t / keep_s, K)
    for x_t in range(K):
        posterior = torch.rand(K, generator=g, dtype=torch.float64).softmax(-1)
        brute = sum(posterior[k] * q_s0[k] * q_ts[:, x_t] for k in range(K))
        step = common.d3pm_uniform_reverse_austin(torch.tensor(x_t), posterior, keep_t, keep_s)
        torch.testing.assert_close(step, brute / brute.sum())


def test_d3pm_reverse_samples_match_in_a_monte_carlo_chain():
    """Sampling cell by cell through the chain (as train_arc.sample_grids does) reproduces pi empirically."""
    K, floor, n = 4, 0.02, 40000
    pi = torch.tensor([0.55, 0.25, 0.15, 0.05], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    levels = torch.linspace(1, 0, 9, dtype=torch.float64)
    keep = common.d3pm_keep_prob(levels, floor)
    x = torch.multinomial(pi @ _uniform_step(float(keep[0]), K), n, replacement=True, generator=g)
    for k in range(len(levels) - 1):
        keep_t, keep_s = float(keep[k]), float(keep[k + 1])
        like = _uniform_step(keep_t, K)[:, x].T  # (n, K): q(x_t | x0 = k)
        posterior = pi * like / (pi * like).sum(-1, keepdim=True)
        q = common.d3pm_uniform_reverse(x, posterior, keep_t, keep_s)
        x = torch.multinomial(q, 1, generator=g)[:, 0]
    freq = torch.bincount(x, minlength=K).double() / n
    assert (freq - pi).abs().max() < 0.01, freq
