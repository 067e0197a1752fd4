"""train_stl10.py on real photos written in the official STL-10 binary layout, and evaluate.py on its checkpoints.

There is no STL-10 offline, so the tests write small files in the exact official format (uint8, each image 3 x 96 x
96 channel by channel in column-major order, labels 1..10, class_names.txt) from 96x96 crops of the ten real colour
photographs that scikit-image and scikit-learn ship, one photograph per class, and read them back through the
real loader.
"""

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_stl10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHOTOS = [  # (class name, loader); one real photograph per class
    ("astronaut", "skimage:astronaut"),
    ("cat", "skimage:chelsea"),
    ("coffee", "skimage:coffee"),
    ("rocket", "skimage:rocket"),
    ("motorcycle", "skimage:stereo_motorcycle"),
    ("galaxy", "skimage:hubble_deep_field"),
    ("retina", "skimage:retina"),
    ("tissue", "skimage:immunohistochemistry"),
    ("palace", "sklearn:china.jpg"),
    ("flower", "sklearn:flower.jpg"),
]


def load_photo(source, short_side=144):
    """A shipped photograph as uint8 (3, H, W), resized (antialiased) so that its short side is `short_side`."""
    kind, name = source.split(":")
    if kind == "skimage":
        from skimage import data

        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
    else:
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    scale = short_side / min(x.shape[-2:])
    size = (round(x.shape[-2] * scale), round(x.shape[-1] * scale))
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).byte()


def photo_crops(n_per_class, seed):
    """(images uint8 (10 n, 3, 96, 96), labels 0..9): random 96x96 crops, n per photograph."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, (_, source) in enumerate(PHOTOS):
        photo = load_photo(source)
        for _ in range(n_per_class):
            top, left = rng.integers(0, photo.shape[1] - 95), rng.integers(0, photo.shape[2] - 95)
            images.append(photo[:, top : top + 96, left : left + 96])
            labels.append(k)
    return torch.stack(images), torch.tensor(labels)


def write_split(root, split, images, labels=None):
    """Write {split}_X.bin (and {split}_y.bin, labels 0..9 stored as 1..10) exactly as the official release does."""
    os.makedirs(root, exist_ok=True)
    images.numpy().transpose(0, 1, 3, 2).tofile(os.path.join(root, f"{split}_X.bin"))  # (N, C, W, H): column-major
    if labels is not None:
        (labels.numpy() + 1).astype(np.uint8).tofile(os.path.join(root, f"{split}_y.bin"))


def write_photo_stl10(data_dir, n_train=8, n_test=8, n_unlabeled=10, seed=0):
    """DATA_DIR/stl10_binary from photo crops: train, test (other crops of the same photographs), unlabeled."""
    root = os.path.join(data_dir, "stl10_binary")
    train = photo_crops(n_train, seed)
    write_split(root, "train", *train)
    write_split(root, "test", *photo_crops(n_test, seed + 1))
    write_split(root, "unlabeled", photo_crops(max(1, n_unlabeled // 10), seed + 2)[0])
    with open(os.path.join(root, "class_names.txt"), "w") as f:
        f.write("\n".join(name for name, _ in PHOTOS) + "\n")
    return train


@pytest.fixture(scope="module")
def photo_data(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("stl10"))
    train = write_photo_stl10(data_dir, n_train=8, n_test=4)
    return data_dir, train


def run(args, cwd=ROOT, check=True, timeout=600):
    """Run a command in a subprocess (the scripts' real entry points); returns the completed process."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train(data_dir, out_dir, *extra):
    """train_stl10.py at a tiny size; `extra` overrides replace the defaults given here (a key may be given once)."""
    args = [f"data_dir={data_dir}", f"out_dir={out_dir}", "size=tiny", "image_size=32", "batch_size=8"]
    args += ["grad_accum=2", "patch=4", "sample_steps=10", "grid_cols=2", "log_every=1", "mixed_precision=no"]
    keys = {a.split("=", 1)[0] for a in extra}
    return run([sys.executable, "train_stl10.py"] + [a for a in args if a.split("=", 1)[0] not in keys] + list(extra))


def losses(out_dir):
    import json

    return [r["loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if "loss" in r]


# ----------------------------------------------------------------------------------------------------------------
# The loader reads the official layout
# ----------------------------------------------------------------------------------------------------------------


def test_loader_reads_official_layout(photo_data):
    data_dir, (images, labels) = photo_data
    x, y, names = train_stl10.load_dataset(data_dir, "train")
    assert x.dtype == torch.uint8 and x.shape == (80, 3, 96, 96)
    assert torch.equal(y, labels) and y.min() == 0 and y.max() == 9
    assert torch.equal(x, images)  # orientation: rows stay rows (the files are column-major)
    assert names[1] == "cat" and len(names) == 10
    raw = np.fromfile(os.path.join(data_dir, "stl10_binary", "train_X.bin"), dtype=np.uint8)
    assert raw.size == 80 * 3 * 96 * 96
    assert np.array_equal(raw[:96], x[0, 0, :, 0].numpy())  # the official files run down the first column first
    assert not torch.equal(x[0, 0, :, 0], x[0, 0, 0, :])
    z = train_stl10.to_model_range(x[:4], 96)
    assert z.min() >= -1 and z.max() <= 1 and z.min() < -0.5 and z.max() > 0.5
    assert train_stl10.to_model_range(x[:4], 32).shape == (4, 3, 32, 32)
    xu, yu, _ = train_stl10.load_dataset(data_dir, "train", unlabeled=True)
    assert len(xu) == 90 and (yu == -1).sum() == 10


def test_evaluation_subsets_span_the_classes(photo_data):
    """The photo-crop splits are stored sorted by class; the evaluation's real and floor subsets (common.subset) must
    still span them."""
    import common

    data_dir, _ = photo_data
    _, labels, _ = train_stl10.load_dataset(data_dir, "train")  # 8 per class, sorted
    idx = common.subset(len(labels), 20)
    assert len(idx) == len(set(idx.tolist())) == 20 and torch.equal(idx, common.subset(len(labels), 20))
    assert len(set(labels[idx].tolist())) >= 8  # the first 20 would hold 3 classes
    assert torch.equal(common.subset(len(labels), 500), torch.arange(len(labels)))


def test_missing_and_truncated_files_die(photo_data, tmp_path):
    data_dir, _ = photo_data
    with pytest.raises(SystemExit, match="data_dir="):
        train_stl10.load_dataset(str(tmp_path / "nothing"), "train")
    root = tmp_path / "stl10_binary"
    root.mkdir()
    src = os.path.join(data_dir, "stl10_binary")
    (root / "train_X.bin").write_bytes(open(os.path.join(src, "train_X.bin"), "rb").read()[:-100])
    (root / "train_y.bin").write_bytes(open(os.path.join(src, "train_y.bin"), "rb").read())
    with pytest.raises(SystemExit, match="truncated"):
        train_stl10.load_dataset(str(tmp_path), "train")
    (root / "train_X.bin").write_bytes(open(os.path.join(src, "train_X.bin"), "rb").read()[: 96 * 96 * 3 * 79])
    with pytest.raises(SystemExit, match="truncated"):
        train_stl10.load_dataset(str(tmp_path), "train")
    os.remove(root / "train_y.bin")
    with pytest.raises(SystemExit, match="train_y.bin is missing"):
        train_stl10.load_dataset(str(tmp_path), "train")


def test_bad_overrides_give_one_line_errors(photo_data, tmp_path):
    data_dir, _ = photo_data
    proc = run([sys.executable, "train_stl10.py", f"data_dir={data_dir}", "model=unte"], check=False)
    assert proc.returncode != 0 and "model='unte'" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run([sys.executable, "train_stl10.py", f"data_dir={tmp_path}/none", "download=false"], check=False)
    assert proc.returncode != 0 and "data_dir=" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# End to end (subprocess): every model= and cond=, resume, two processes, evaluate.py
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,cond,lr",
    [
        ("unet", "class", 2e-3),
        ("dit", "class", 5e-3),
        ("uvit", "class", 2e-3),
        ("unet", "text", 2e-3),
        ("dit", "none", 5e-3),
    ],
)
def test_end_to_end(photo_data, tmp_path, model, cond, lr):
    data_dir, _ = photo_data
    out = str(tmp_path / "run")
    args = [f"model={model}", f"cond={cond}", "max_steps=40", f"lr={lr}", "sample_every=40", "batch_size=32"]
    proc = train(data_dir, out, *args)
    if cond == "text":
        found = re.search(r"cond=text \(caption read by (\d+) modules?\)", proc.stdout)
        assert found and int(found.group(1)) > 0, proc.stdout
    curve = losses(out)
    assert np.mean(curve[-10:]) < 0.9 * np.mean(curve[:5]), curve
    for kind in ("grid", "collage", "recon", "loss_bins") + (("embeddings",) if cond != "none" else ()):
        assert os.path.isfile(os.path.join(out, "samples", f"step_0000040_{kind}.png")), kind
    ev = run([sys.executable, "evaluate.py", out, "n_samples=6", "n_real=20", "sample_steps=4", "batch=3"])
    assert "FD-EffNet" in ev.stdout and os.path.isfile(os.path.join(out, "step_0000040", "eval.json"))
    if cond == "none":
        proc = run([sys.executable, "evaluate.py", out, "guidance=2"], check=False)
        assert proc.returncode != 0 and "unconditional" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("model,cond", [("hdit", "class"), ("localmamba", "class"), ("mmdit", "text")])
def test_new_backbones_lower_the_loss(photo_data, tmp_path, model, cond):
    """A tiny run of each of HDiT, LocalMamba and MMDiT (its caption tokens as the text stream) on the photo crops
    lowers the training loss, and evaluate.py rebuilds the network from the checkpoint alone."""
    data_dir, _ = photo_data
    out = str(tmp_path / "run")
    args = ["max_steps=30", "lr=2e-3", "sample_every=-1", "batch_size=16", "grad_accum=1", "patch=2"]
    proc = train(data_dir, out, f"model={model}", f"cond={cond}", *args)
    assert f"{model} tiny, cond={cond}" in proc.stdout, proc.stdout
    curve = losses(out)
    assert np.mean(curve[-10:]) < 0.9 * np.mean(curve[:5]), curve
    ev = run([sys.executable, "evaluate.py", out, "n_samples=2", "n_real=4", "sample_steps=2", "floor=false"])
    assert "FD-EffNet" in ev.stdout


@pytest.mark.slow
def test_resume_is_bitwise_and_init_from(photo_data, tmp_path):
    """N straight steps == N/2 steps, then N/2 more resumed from the checkpoint written at N/2 (bitwise on CPU)."""
    from safetensors.torch import load_file

    data_dir, _ = photo_data
    common = ["max_steps=6", "sample_every=-1", "ckpt_every=3", "model=unet", "cond=class"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train(data_dir, str(straight), *common)
    proc = train(data_dir, str(halves), *common, f"resume={straight / 'step_0000003'}")
    assert "resumed from" in proc.stdout
    for name in ("model", "ema"):
        a = load_file(str(straight / "step_0000006" / f"{name}.safetensors"))
        b = load_file(str(halves / "step_0000006" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    proc = train(data_dir, str(tmp_path / "tuned"), *common[1:], "max_steps=2", f"init_from={straight}")
    assert "weights from" in proc.stdout


@pytest.mark.slow
def test_two_processes_train(photo_data, tmp_path):
    data_dir, _ = photo_data
    out = str(tmp_path / "ddp")
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    args += ["train_stl10.py"]
    args += [f"data_dir={data_dir}", f"out_dir={out}", "size=tiny", "image_size=32", "batch_size=8", "grad_accum=2"]
    run(args + ["max_steps=4", "log_every=2", "sample_every=-1", "mixed_precision=no"])
    assert len(losses(out)) == 2 and os.path.isfile(os.path.join(out, "step_0000004", "ema.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: seeds, divergence, checkpoint before the first log line
# ----------------------------------------------------------------------------------------------------------------


def weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_seed_makes_fresh_runs_bitwise_equal(photo_data, tmp_path):
    """Two fresh runs with the same seed give bitwise equal weights after 2 steps (initialisation included);
    another seed gives other weights. A checkpoint before the first log line (ckpt_every < log_every) works."""
    data_dir, _ = photo_data
    args = ["max_steps=2", "sample_every=-1", "ckpt_every=1", "log_every=5", "grad_accum=1"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(data_dir, str(tmp_path / name), *args, f"seed={seed}")
        runs[name] = weights(str(tmp_path / name / "step_0000002"))
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert sum(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"]) > len(runs["a"]) // 2
    assert os.path.isfile(tmp_path / "a" / "step_0000001" / "model.safetensors")
    if importlib.util.find_spec("tensorboard"):  # optional: TensorBoard scalars through accelerate's tracker
        events = [f for _, _, fs in os.walk(tmp_path / "a" / "tensorboard") for f in fs if "tfevents" in f]
        assert events


def test_divergence_stops_and_keeps_the_last_good_checkpoint(photo_data, tmp_path):
    """10 good steps, then lr=1e6 clip=1e9 resume=auto: a non-zero exit with a one-line error naming the step and
    the last good checkpoint; `latest` stays that finite checkpoint."""
    data_dir, _ = photo_data
    out = str(tmp_path / "run")
    base = ["sample_every=-1", "ckpt_every=5", "log_every=5", "grad_accum=1", "lr=1e-3"]
    train(data_dir, out, *base, "max_steps=10")
    args = [f"data_dir={data_dir}", f"out_dir={out}", "size=tiny", "image_size=32", "batch_size=8"]
    args += ["mixed_precision=no", *base[:-1], "max_steps=40", "lr=1e6", "clip=1e9", "resume=auto"]
    proc = run([sys.executable, "train_stl10.py", *args], check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("error: the loss or gradient norm became non-finite at step ") and "step_0000010" in last
    latest = open(os.path.join(out, "latest")).read().strip()
    assert latest == "step_0000010"
    assert all(torch.isfinite(v).all() for v in weights(os.path.join(out, latest)).values())
    ev = run([sys.executable, "evaluate.py", out, "n_samples=2", "n_real=10", "sample_steps=2", "batch=2"], check=False)
    assert "non-finite" not in ev.stderr  # the checkpoint left behind is a good one


def test_sampling_grids_train_evaluate_and_bad_values(photo_data, tmp_path):
    """sampler= / sample_grid= / t_min= reach the diagnostics and evaluate.py (grid= and t_min= override there; the
    NFE is reported), and settings that cannot work on the 500-step schedule stop with one line."""
    data_dir, _ = photo_data
    out = str(tmp_path / "run")
    train(data_dir, out, "max_steps=2", "sample_every=2", "sampler=unipc", "sample_grid=logsnr", "t_min=0.002")
    assert os.path.isfile(os.path.join(out, "samples", "step_0000002_grid.png"))
    ev = run([sys.executable, "evaluate.py", out, "n_samples=2", "n_real=4", "sample_steps=5", "floor=false"])
    assert "grid: logsnr" in ev.stdout and "nfe: 6" in ev.stdout, ev.stdout  # 5 steps + the final denoise at t_min
    ev = run(
        [
            sys.executable,
            "evaluate.py",
            out,
            "n_samples=2",
            "n_real=4",
            "sample_steps=4",
            "floor=false",
            "grid=uniform",
            "t_min=0",
            "sampler=heun",
        ]
    )
    assert "grid: uniform" in ev.stdout and "nfe: 7" in ev.stdout, ev.stdout  # heun: 2 per step, 1 for the step to 0
    bad = [
        (["sample_grid=karras"], "t_min >= 1 / t_steps = 0.002"),
        (["sample_grid=logsnr", "t_min=0.001"], "t_min >= 1 / t_steps = 0.002"),
        (["sample_steps=7"], "does not divide t_steps=500"),
        (["sample_grid=linear"], "sample_grid='linear'"),
    ]
    for args, needle in bad:
        proc = run(
            [sys.executable, "train_stl10.py", f"data_dir={data_dir}", f"out_dir={tmp_path}/bad", *args], check=False
        )
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    for args, needle in ((["grid=karras", "t_min=0"], "t_min >= 1 / t_steps = 0.002"), (["grid=foo"], "grid='foo'")):
        proc = run([sys.executable, "evaluate.py", out, *args], check=False)
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_analytic_variance_reaches_diagnostics_and_evaluation(photo_data, tmp_path):
    """analytic_var=N (ddpm's Analytic-DPM variance, estimated on N training images) in training's diagnostics and in
    evaluate.py, where it is reported; with another sampler, or negative, it stops with one line."""
    data_dir, _ = photo_data
    out = str(tmp_path / "run")
    train(data_dir, out, "max_steps=2", "sample_every=2", "sampler=ddpm", "analytic_var=4")
    assert os.path.isfile(os.path.join(out, "samples", "step_0000002_grid.png"))
    args = [sys.executable, "evaluate.py", out, "n_samples=2", "n_real=4", "floor=false"]
    assert "analytic_var: 4" in run(args).stdout  # the checkpoint's
    assert "analytic_var: 10" in run(args + ["analytic_var=10"]).stdout  # one image per class
    assert "analytic_var: 80" in run(args + ["analytic_var=100000"]).stdout  # all 80 training images
    assert "analytic_var: 0" in run(args + ["analytic_var=0"]).stdout
    assert "analytic_var: 0" in run(args + ["sampler=ddim"]).stdout  # another sampler: not the checkpoint's setting
    for extra, needle in ((["sampler=unipc", "analytic_var=3"], "is for sampler=ddpm"), (["analytic_var=-2"], "-2")):
        proc = run(args + extra, check=False)
        assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
    proc = run(
        [
            sys.executable,
            "train_stl10.py",
            f"data_dir={data_dir}",
            f"out_dir={tmp_path}/bad",
            "sampler=unipc",
            "sample_grid=logsnr",
            "t_min=0.002",
            "analytic_var=8",
        ],
        check=False,
    )
    assert proc.returncode == 1 and "is for sampler=ddpm" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
