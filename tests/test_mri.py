"""train_mri.py end to end on a small demo study written to disk (real MNI152 anatomy from nilearn; SYNTHETIC subjects
and SYNTHETIC lesions): every mode x strategy lowers the loss in 2D, spaces and ScoreAug train, one 3D case, a run
resumes exactly, evaluate.py writes NIfTI volumes that sit where their subject is, and bad input stops with one line;
latent diffusion in a tiny train_vae.py autoencoder's space trains, resumes, evaluates from the checkpoint alone."""

import glob
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import common
import train_mri

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 4-subject demo study at 4 mm (train 2, val 1, test 1 subjects), written once."""
    root = str(tmp_path_factory.mktemp("mri") / "study")
    train_mri.make_demo_study(root, n_subjects=4, seed=0, spacing=4.0)
    return root


def base_config(study, **overrides):
    config = {k.lower(): v for k, v in vars(train_mri).items() if k.isupper() and not k.startswith("_")}
    config.update(size="tiny", image_size=32, crop=(16, 32, 32), data=study, label_drop=0.0, warmup=0)
    config["cache_dir"] = os.path.join(os.path.dirname(study), "cache")
    config.update(overrides)
    config["model_kw"] = train_mri.model_kwargs(config)
    return config


def fixed_batch_loss(model, x0, mask, vector, config):
    with torch.no_grad():
        return float(train_mri.training_loss(model, x0, mask, vector, config, torch.Generator().manual_seed(7))[0])


def lowers_the_loss(study, steps=30, **overrides):
    config = base_config(study, **overrides)
    train_mri.check_shapes(config)
    x, vectors, _ = train_mri.prepare(config, study, "train", verbose=False)
    pick = torch.linspace(0, len(x) - 1, 8).round().long()
    x0, mask = train_mri.split_sample(x[pick], config)
    vector = None if vectors is None else vectors[pick]
    if config["space"] == "wavelet":
        config["wavelet_stats"] = train_mri.wavelet_stats(train_mri.split_sample(x, config)[0])
    torch.manual_seed(0)
    model = train_mri.build_model(config)
    before = fixed_batch_loss(model, x0, mask, vector, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        loss = train_mri.training_loss(model, x0, mask, vector, config, torch.Generator().manual_seed(step))[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = fixed_batch_loss(model, x0, mask, vector, config)
    assert np.isfinite(after) and after < 0.95 * before, f"{overrides}: loss {before:.4f} -> {after:.4f}"


QUICK = {("bravo", "rflow"), ("seg_sized", "ddpm")}  # the default run; the other six run with -m slow
MODES = [
    pytest.param(mode, strategy, marks=() if (mode, strategy) in QUICK else pytest.mark.slow)
    for mode in ("bravo", "dual", "seg", "seg_sized")
    for strategy in ("rflow", "ddpm")
]


@pytest.mark.parametrize("mode,strategy", MODES)
def test_every_mode_and_strategy_lowers_the_loss(study, mode, strategy):
    lowers_the_loss(study, mode=mode, strategy=strategy)


@pytest.mark.parametrize("space", ["s2d", pytest.param("wavelet", marks=pytest.mark.slow)])
def test_spaces_and_score_aug_lower_the_loss(study, space):
    lowers_the_loss(study, space=space, score_aug=space == "s2d")


def test_3d_lowers_the_loss(study):
    lowers_the_loss(study, dims=3, crop=(8, 16, 16), steps=20)


@pytest.mark.parametrize(
    "model,dims",
    [
        ("hdit", 3),
        *[
            pytest.param(m, d, marks=pytest.mark.slow)
            for m, d in [("dit", 2), ("dit", 3), ("uvit", 2), ("uvit", 3), ("hdit", 2)]
        ],
    ],
)
def test_transformer_backbones_in_2d_and_3d(study, model, dims):
    config = base_config(study, model=model, dims=dims, patch=4)
    train_mri.check_shapes(config)
    x, _, _ = train_mri.prepare(config, study, "val", verbose=False)
    x0, mask = train_mri.split_sample(x[:2], config)
    loss = train_mri.training_loss(train_mri.build_model(config), x0, mask, None, config, torch.Generator())[0]
    assert torch.isfinite(loss)


def test_resolution_shift_closed_form():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    r = 2.0
    assert torch.allclose(common.resolution_shift(t, r), r * t / (1 + (r - 1) * t))
    config = {"strategy": "rflow", "dims": 2, "image_size": 128, "shift_base": 64, "crop": (1, 1, 1)}
    assert abs(train_mri.strategy(config)[2] - 2.0) < 1e-9  # r = (128^2 / 64^2)^(1/2)
    config.update(dims=3, crop=(64, 128, 128))
    assert abs(train_mri.strategy(config)[2] - (64 * 128 * 128 / 64**3) ** (1 / 3)) < 1e-9


def test_2d_stack_geometry_matches_the_subject(study):
    """Real slices of one subject, stacked and written with sample_affine, land on the subject's own voxels."""
    from nilearn.image import resample_to_img

    config = base_config(study, image_size=32)
    x, _, info = train_mri.prepare(config, study, "test", verbose=False)
    subject = info[0]["subject"]
    rows = [i for i, r in enumerate(info) if r["subject"] == subject]
    slices = [info[i]["slice"] for i in rows]
    volume = np.zeros((max(slices) - min(slices) + 1, 32, 32), np.float32)
    volume[[s - min(slices) for s in slices]] = x[rows, 0].numpy()
    path = os.path.join(os.path.dirname(study), "stack.nii.gz")
    train_mri.write_nifti(path, volume, train_mri.sample_affine(info[rows[0]], config, min(slices)))
    original = nib.load(os.path.join(study, "test", subject, "bravo.nii.gz"))
    written = nib.load(path)
    resampled = resample_to_img(original, written, interpolation="linear", force_resample=True, copy_header=True)
    corr = np.corrcoef(written.get_fdata().ravel(), resampled.get_fdata().ravel())[0, 1]
    assert corr > 0.97, corr


def run(args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train_cmd(study, out, *extra):
    """train_mri.py's arguments at a tiny size; a key given in `extra` replaces the default one."""
    base = [f"data={study}", "size=tiny", "image_size=32", "batch_size=4", "log_every=2", "warmup=0", f"out_dir={out}"]
    base.append(f"cache_dir={out}_cache")
    given = {a.split("=")[0] for a in extra}
    return ["train_mri.py", *[a for a in base if a.split("=")[0] not in given], *extra]


def test_train_resume_evaluate_and_nifti(study, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = run(train_cmd(study, straight, "max_steps=4", "ckpt_every=2", "sample_every=4", "keep_ckpts=5"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(straight / "samples" / "step_0000004_grid.png")
    # the same run resumed from its step-2 checkpoint into another folder: steps 3 and 4 must come out the same
    r = run(
        train_cmd(study, resumed, "max_steps=4", "ckpt_every=2", "sample_every=-1", f"resume={straight}/step_0000002")
    )
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "step_0000004" / "ema.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a), "2 + 2 resumed steps differ from 4 straight steps"
    r = run(
        [
            "evaluate.py",
            str(straight),
            "n_samples=4",
            "batch=4",
            "sample_steps=2",
            "n_nifti=1",
            "sampler=unipc",
            "grid=logsnr",
            "t_min=0.02",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(straight / "step_0000004" / "eval.json"))
    assert (result["sampler"], result["grid"], result["nfe"]) == ("unipc", "logsnr", 3)  # 2 steps + final denoise
    for key in ("PSNR", "SSIM", "MS-SSIM", "FD-EffNet"):
        assert np.isfinite(result[key]), key
    assert set(result["region_mae"]) >= {"outside", "tumour"}
    (path,) = glob.glob(str(straight / "step_0000004" / "generated_nifti" / "*.nii.gz"))
    img = nib.load(path)
    config = json.load(open(straight / "config.json"))
    x, _, info = train_mri.prepare({**config, "cache_dir": str(tmp_path / "c")}, study, "test", verbose=False)
    subject = os.path.basename(path).split("_", 1)[1].rsplit("_", 1)[0]
    rows = [r for r in info if r["subject"] == subject]
    expected = train_mri.sample_affine(rows[0], config, min(r["slice"] for r in rows))
    assert np.allclose(img.affine, expected, atol=1e-4) and img.shape[:2] == (32, 32)
    assert np.isfinite(img.get_fdata()).all() and 0 <= img.get_fdata().min() and img.get_fdata().max() <= 1


def one_line_error(r):
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    return r.returncode == 1 and "Traceback" not in r.stderr and lines and lines[-1].startswith("error:")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["space=latent"], "needs latent=RUN"),
        (["dims=3", "crop=15,32,32"], "cannot take"),
        (["strategy=ddpm", "sample_steps=7", "sample_grid=uniform", "t_min=0"], "does not divide t_steps=1000"),
        (["sample_grid=logsnr", "t_min=0"], "needs t_min > 0"),
        (["strategy=ddpm", "sample_grid=karras", "t_min=0.0005"], "t_min >= 1 / t_steps = 0.001"),
        (["sampler=ddpm"], "sampler='ddpm'"),
        (["space=s2d", "image_size=33"], "even"),
        (["data=/nonexistent/mri"], "/nonexistent/mri"),
    ],
)
def test_bad_input_is_one_line(study, tmp_path, args, needle):
    args = [a.replace("crop=15,32,32", "crop=(15,32,32)") for a in args]
    r = run(train_cmd(study, tmp_path / "run", "max_steps=1", *args))
    assert one_line_error(r), r.stderr[-1500:]
    assert needle in r.stderr, r.stderr[-500:]


def test_bravo_on_a_study_without_seg(study, tmp_path):
    copy = tmp_path / "noseg"
    shutil.copytree(study, copy)
    for path in glob.glob(str(copy / "*" / "*" / "seg.nii.gz")):
        os.remove(path)
    r = run(train_cmd(str(copy), tmp_path / "run", "max_steps=1"))
    assert one_line_error(r) and "seg" in r.stderr, r.stderr[-1500:]


# ----------------------------------------------------------------------------------------------------------------
# Latent diffusion (space=latent) in a train_vae.py autoencoder's space
# ----------------------------------------------------------------------------------------------------------------


def train_autoencoder(study, out, *extra):
    """A tiny KL-VAE on the study's generated modalities (train_vae.py data=mri), 2 steps, no perceptual term."""
    base = ["data=mri", f"data_dir={study}", "model=klvae", "size=tiny", "image_size=32", "batch_size=4"]
    base += ["perceptual_weight=0", "max_steps=2", f"out_dir={out}", f"cache_dir={out}_cache"]
    given = {a.split("=")[0] for a in extra}
    r = run(["train_vae.py", *[a for a in base if a.split("=")[0] not in given], *extra])
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out)


@pytest.fixture(scope="module")
def autoencoder(study, tmp_path_factory):
    """A train_vae.py run (2D, mode=bravo, image_size=32) shared by the latent tests."""
    return train_autoencoder(study, tmp_path_factory.mktemp("mri_ae") / "vae")


def test_latent_mask_pooling_and_score_aug_move_together(study):
    config = {**base_config(study), "space": "latent", "latent_shape": [4, 8, 8]}  # a factor-4 autoencoder at 32
    mask = -torch.ones(2, 1, 32, 32)
    mask[0, :, :4, :2] = 1  # half of the first 4 x 4 cell
    pooled = train_mri.mask_in_space(mask, config)
    assert pooled.shape == (2, 1, 8, 8) and pooled[0, 0, 0, 0] == 0 and (pooled.flatten()[1:] == -1).all()
    z = torch.randn(8, 1, 8, 8)
    moved_z, moved_target, moved_mask, omega = train_mri.augment(
        z, z.clone(), z.clone(), torch.zeros(8, dtype=torch.bool), config, torch.Generator().manual_seed(0)
    )
    assert torch.equal(moved_z, moved_target) and torch.equal(moved_z, moved_mask) and omega.abs().sum() > 0


@pytest.mark.slow
def test_latent_train_resume_evaluate_from_the_checkpoint_alone(study, autoencoder, tmp_path):
    """space=latent with ScoreAug: 4 straight steps equal 2 + 2 resumed, the latents are cached in the run, every
    checkpoint carries the autoencoder, so evaluate.py needs neither the autoencoder's run nor its cache."""
    ae = str(tmp_path / "vae")
    shutil.copytree(autoencoder, ae)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common_args = ["space=latent", f"latent={ae}", "score_aug=true", "max_steps=4", "ckpt_every=2", "sample_steps=2"]
    r = run(train_cmd(study, straight, *common_args, "sample_every=4", "keep_ckpts=5"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(straight / "samples" / "step_0000004_grid.png")
    assert os.path.isfile(straight / "latents.safetensors")
    config = json.load(open(straight / "config.json"))
    assert config["latent_space"]["shape"] == [4, 8, 8] and config["latent_id"] == config["latent_space"]["id"]
    assert config["model_kw"]["in_channels"] == 4 and config["model_kw"]["concat_channels"] == 1
    r = run(train_cmd(study, resumed, *common_args, "sample_every=-1", f"resume={straight}/step_0000002"))
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "step_0000004" / "ema.safetensors")) for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a), "2 + 2 resumed steps differ from 4 straight steps"
    shutil.rmtree(ae)  # evaluation rebuilds the autoencoder from autoencoder.safetensors beside the checkpoint
    r = run(["evaluate.py", str(straight), "n_samples=4", "batch=4", "sample_steps=2", "n_nifti=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.load(open(straight / "step_0000004" / "eval.json"))
    for key in ("PSNR", "SSIM", "MS-SSIM", "FD-EffNet", "KID-EffNet"):
        assert np.isfinite(result[key]), key
    assert set(result["region_mae"]) >= {"outside", "tumour"}
    (path,) = glob.glob(str(straight / "step_0000004" / "generated_nifti" / "*.nii.gz"))
    values = nib.load(path).get_fdata()
    assert nib.load(path).shape[:2] == (32, 32) and np.isfinite(values).all() and 0 <= values.min() <= values.max() <= 1


@pytest.mark.slow
def test_latent_3d_trains_and_evaluates(study, tmp_path):
    crop = "crop=(16,32,32)"
    ae = train_autoencoder(study, tmp_path / "vae3", "dims=3", crop, "batch_size=2", "disc_layers=2")
    out = tmp_path / "run3"
    args = ["space=latent", f"latent={ae}", "dims=3", crop, "batch_size=2", "max_steps=2", "sample_every=2"]
    r = run(train_cmd(study, out, *args))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(out / "config.json"))["latent_space"]["shape"] == [4, 4, 8, 8]
    r = run(["evaluate.py", str(out), "n_samples=2", "batch=2", "sample_steps=2", "n_nifti=1"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.isfinite(json.load(open(out / "step_0000002" / "eval.json"))["PSNR"])
    (path,) = glob.glob(str(out / "step_0000002" / "generated_nifti" / "*.nii.gz"))
    assert nib.load(path).shape == (32, 32, 16)  # (W, H, D) on disk


@pytest.mark.parametrize(
    "args,needle",
    [
        (["latent={ae}"], "needs space=latent"),
        (["space=latent", "latent={diffusion}"], "not an autoencoder"),
        (["space=latent", "latent={ae}", "mode=seg"], "mode='bravo'"),
        pytest.param(["space=latent", "latent={ae}", "dims=3", "crop=(16,32,32)"], "2D inputs", marks=pytest.mark.slow),
        pytest.param(["space=latent", "latent={ae}", "image_size=64"], "image_size=32", marks=pytest.mark.slow),
    ],
)
def test_latent_bad_input_is_one_line(study, autoencoder, tmp_path, args, needle):
    diffusion = str(tmp_path / "pixel_run")  # a train_mri checkpoint (untrained) is no autoencoder
    if any("{diffusion}" in a for a in args):
        model = train_mri.build_model(base_config(study))
        common.save_checkpoint(diffusion, 0, model, None, None, {"script": "train_mri"})
    args = [a.format(ae=autoencoder, diffusion=diffusion) for a in args]
    r = run(train_cmd(study, tmp_path / "run", "max_steps=1", *args))
    assert one_line_error(r), r.stderr[-1500:]
    assert needle in r.stderr, r.stderr[-500:]
