"""common.py's metrics against closed forms and brute force, and evaluate.py's refusals and help.

Frechet distance: feature sets built so that their sample mean and covariance are exactly the prescribed ones, so
the distance must equal the closed form between the two Gaussians. KID: the unbiased MMD^2 estimate against a
double loop over the polynomial kernel. No downloads and no EffNet weights are needed.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

import common
import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------------------------


def exact_gaussian_features(mean, cov, n, seed):
    """(n, D) rows whose sample mean is exactly `mean` and sample covariance (ddof 1, as np.cov) exactly `cov`:
    random rows, centred, whitened by the inverse Cholesky factor of their own covariance, coloured by cov's."""
    z = np.random.default_rng(seed).standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return z @ np.linalg.cholesky(cov).T + mean


def random_spd(d, seed):
    a = np.random.default_rng(seed).standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def closed_form_fd(m1, c1, m2, c2):
    """||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), with scipy's general matrix square root."""
    root1 = scipy.linalg.sqrtm(c1).real
    cross = scipy.linalg.sqrtm(root1 @ c2 @ root1).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * cross))


def test_frechet_distance_matches_the_closed_form_for_non_commuting_covariances():
    d = 6
    m1, m2 = np.linspace(-1, 1, d), np.linspace(0.5, -0.3, d)
    c1, c2 = random_spd(d, 1), random_spd(d, 2)
    assert not np.allclose(c1 @ c2, c2 @ c1)  # the case where Tr (C1 C2)^1/2 != Tr C1^1/2 C2^1/2
    f1, f2 = exact_gaussian_features(m1, c1, 40, 3), exact_gaussian_features(m2, c2, 70, 4)
    assert np.allclose(f1.mean(0), m1) and np.allclose(np.cov(f1, rowvar=False), c1)  # the construction is exact
    expected = closed_form_fd(m1, c1, m2, c2)
    product_of_roots = scipy.linalg.sqrtm(c1).real @ scipy.linalg.sqrtm(c2).real  # right only when C1 C2 = C2 C1
    assert abs(np.trace(product_of_roots) - np.trace(scipy.linalg.sqrtm(c1 @ c2).real)) > 1e-3  # so it would show
    assert common.frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert common.frechet_distance(f2, f1) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert common.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_diagonal_case_by_hand():
    a, b = np.array([0.5, 1.0, 2.0, 4.0]), np.array([2.0, 1.0, 0.25, 9.0])
    m1, m2 = np.array([0.0, 1.0, -1.0, 2.0]), np.array([1.0, 1.0, 0.5, 0.0])
    f1, f2 = exact_gaussian_features(m1, np.diag(a), 25, 5), exact_gaussian_features(m2, np.diag(b), 30, 6)
    by_hand = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 7.25 + 2.0858...
    assert common.frechet_distance(f1, f2) == pytest.approx(by_hand, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------------------------


def mmd2_unbiased_brute(x, y):
    """Binkowski et al. 2018 eq. 2 with k(a, b) = (a.b / d + 1)^3, by explicit double loops."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_mmd2_with_the_cubic_kernel():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 5)) * 1.5 + 0.7
    expected = mmd2_unbiased_brute(x, y)
    assert expected > 0.1
    # one subset of the whole set: a permutation of each set, which the estimate does not depend on
    assert common.kernel_inception_distance(x, y, subset_size=9, n_subsets=1) == pytest.approx(expected, rel=1e-10)
    assert common.kernel_inception_distance(x, y, subset_size=9, n_subsets=4, seed=3) == pytest.approx(expected)


def test_kid_of_a_distribution_with_itself_is_about_zero():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))  # two samples of one distribution
    shifted = rng.standard_normal((400, 16)) + 0.5
    same = common.kernel_inception_distance(x, y, 200, 20)
    different = common.kernel_inception_distance(x, shifted, 200, 20)
    assert different > 0.2 and abs(same) < 0.02 * different
    # a set against itself: the cross term keeps the diagonal, so the estimate is -2 (mean k(x_i, x_i) - mean of
    # k(x_i, x_j), i != j) / m, of order 1/m
    k = (x @ x.T / 16 + 1) ** 3
    off = (k.sum() - np.trace(k)) / (400 * 399)
    itself = common.kernel_inception_distance(x, x, 400, 1)
    assert itself == pytest.approx(-2 * (np.diag(k).mean() - off) / 400) and abs(itself) < 0.1 * different


def test_subset_is_fixed_sorted_and_spans_sorted_classes():
    labels = torch.arange(10).repeat_interleave(8)  # stored sorted by class, as a split may be
    idx = common.subset(len(labels), 20)
    assert len(set(idx.tolist())) == 20 and torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, common.subset(len(labels), 20)) and not torch.equal(idx, common.subset(80, 20, seed=1))
    assert len(set(labels[idx].tolist())) >= 8  # the first 20 would hold 3 classes
    assert torch.equal(common.subset(80, 80), torch.arange(80)) and torch.equal(
        common.subset(80, 500), torch.arange(80)
    )


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py: refuses what it cannot evaluate, in one line; --help lists every domain's options
# ----------------------------------------------------------------------------------------------------------------


def run_evaluate(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "evaluate.py", *map(str, args)]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(proc):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


@pytest.fixture
def nan_checkpoint(tmp_path):
    """A step folder with a finite model.safetensors and an ema.safetensors holding one NaN, written directly (not
    through save_checkpoint, which may refuse it), with the metadata a train_stl10 checkpoint carries."""
    model_kw = {"in_channels": 3, "num_classes": 10}
    config = {"script": "train_stl10", "model": "unet", "size": "tiny", "model_kw": model_kw, "cond": "class"}
    config.update(guidance=2.0, sampler="ddim", sample_steps=4, image_size=32, n_classes=10, prompt="{}")
    config.update(schedule="cosine", prediction="v", data_dir=str(tmp_path / "no_data"), class_names=[])
    weights = {k: v.contiguous() for k, v in models.make_model("unet", "tiny", **model_kw).state_dict().items()}
    step = tmp_path / "run" / "step_0000001"
    step.mkdir(parents=True)
    metadata = {"config": json.dumps(config), "step": "1"}
    save_file(weights, str(step / "model.safetensors"), metadata=metadata)
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[1] = float("nan")
    save_file(weights, str(step / "ema.safetensors"), metadata=metadata)
    return step


def test_evaluate_refuses_non_finite_weights_in_one_line(nan_checkpoint):
    err = one_line_error(run_evaluate(nan_checkpoint))  # weights=ema by default
    assert "ema.safetensors" in err and "non-finite" in err
    # the finite model.safetensors passes the check and stops later, at the missing data (through the run folder)
    (nan_checkpoint.parent / "latest").write_text("step_0000001\n")
    err = one_line_error(run_evaluate(nan_checkpoint.parent, "weights=model"))
    assert "non-finite" not in err and "stl10_binary" in err


def test_evaluate_missing_checkpoint_is_one_line(tmp_path):
    one_line_error(run_evaluate(tmp_path / "nothing"))


def test_evaluate_checks_options_before_any_work(nan_checkpoint):
    import evaluate

    for arg, expected in [("real=foo", "real='foo'"), ("sampler=foo", "sampler='foo'"), ("n_samples=0", "n_samples=0")]:
        with pytest.raises(SystemExit, match=expected):  # the data is missing: a later check would name it instead
            evaluate.main([str(nan_checkpoint), "weights=model", arg])
    with pytest.raises(SystemExit, match="weights='last'"):
        evaluate.main([str(nan_checkpoint), "weights=last"])
    with pytest.raises(SystemExit, match="unknown key 'n_sample'"):
        evaluate.main([str(nan_checkpoint), "n_sample=3"])


def test_evaluate_help_lists_every_domain_with_descriptions():
    proc = run_evaluate("--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    line = lambda start: next(x for x in lines if x.strip().startswith(start))
    assert "ema | model" in line("weights='ema'")
    assert "augmentation voting" in line("mode='both'") and "held-out test pairs" in line("max_pairs=-1")
    assert "generated images" in line("n_samples=1000") and "KID subset size" in line("kid_subset=1000")
    assert "the checkpoint's" in line("sample_steps=-1")  # the EVAL entry's comment, not the training constant's
