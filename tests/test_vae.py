"""train_vae.py end to end on real photos in the STL-10 layout, its evaluation, and latent diffusion in
train_stl10.py (latent=RUN): the cache, its invalidation, the autoencoder travelling with the checkpoint, bad input."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_stl10 import ROOT, run, write_photo_stl10  # noqa: E402

import train_vae  # noqa: E402


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("stl10"))
    write_photo_stl10(data_dir, n_train=8, n_test=4)
    return data_dir


def train_ae(data_dir, out_dir, *extra, check=True):
    """train_vae.py on the photos at a tiny size; `extra` replaces the defaults given here."""
    args = [f"data_dir={data_dir}", f"out_dir={out_dir}", "size=tiny", "image_size=32", "batch_size=4"]
    args += ["log_every=1", "sample_every=2", "ckpt_every=2", "mixed_precision=no", "max_steps=2"]
    keys = {a.split("=", 1)[0] for a in extra}
    args = [a for a in args if a.split("=", 1)[0] not in keys] + list(extra)
    return run([sys.executable, "train_vae.py"] + args, check=check)


def train_latent(data_dir, out_dir, ae_dir, *extra, check=True):
    args = [f"data_dir={data_dir}", f"out_dir={out_dir}", f"latent={ae_dir}", "size=tiny", "image_size=32"]
    args += ["batch_size=4", "grad_accum=1", "sample_steps=5", "grid_cols=2", "log_every=1", "mixed_precision=no"]
    args += ["max_steps=2", "sample_every=2", "ckpt_every=2"]
    keys = {a.split("=", 1)[0] for a in extra}
    args = [a for a in args if a.split("=", 1)[0] not in keys] + list(extra)
    return run([sys.executable, "train_stl10.py"] + args, check=check)


@pytest.fixture(scope="module")
def ae_run(photos, tmp_path_factory):
    """A tiny KL-VAE after 2 steps, the discriminator on from step 1 (its loss and state exercised)."""
    out = str(tmp_path_factory.mktemp("vae") / "klvae")
    train_ae(photos, out, "gan_start=1", "perceptual_weight=1")
    return out


def error_line(proc):
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


# ----------------------------------------------------------------------------------------------------------------
# train_vae.py
# ----------------------------------------------------------------------------------------------------------------


def test_train_vae_writes_checkpoint_diagnostics_and_disc_state(ae_run):
    import json

    ckpt = os.path.join(ae_run, "step_0000002")
    assert os.path.isfile(os.path.join(ckpt, "ema.safetensors"))
    state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=True)
    assert state["extra"]["disc"] and state["extra"]["disc_opt"]["state"]  # the discriminator stepped
    records = [json.loads(line) for line in open(os.path.join(ae_run, "log.jsonl"))]
    assert {"l1", "perceptual", "kl", "g_loss", "d_loss", "adaptive_weight"} <= set(records[-1])
    assert os.path.isfile(os.path.join(ae_run, "samples", "step_0000002_recon.png"))
    assert os.path.isfile(os.path.join(ae_run, "samples", "step_0000002_latents.png"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["vqvae", "dcae"])
def test_other_autoencoders_train(photos, tmp_path, model):
    extra = ["image_size=64"] if model == "dcae" else []  # DC-AE's tiny preset downsamples further
    proc = train_ae(photos, str(tmp_path / model), f"model={model}", "perceptual_weight=0", *extra)
    assert "done: step 2" in proc.stdout
    if model == "vqvae":
        import json

        assert "VQ codes" not in proc.stderr
        # 4096 codes for 4 x 8 x 8 latent vectors a step: at most 6% can be used, which is warned about with the figure
        many = train_ae(photos, str(tmp_path / "many"), "model=vqvae", "perceptual_weight=0", "codebook_size=4096")
        assert "warning: only" in many.stderr and "of 4096 VQ codes" in many.stderr

        records = [json.loads(line) for line in open(tmp_path / model / "log.jsonl")]
        assert "perplexity" in records[-1] and 0 < records[-1]["code_use"] <= 1


@pytest.mark.slow
def test_resume_is_bitwise(photos, tmp_path):
    """4 straight steps == 2, then 2 more resumed (autoencoder, EMA and discriminator)."""
    from safetensors.torch import load_file

    common = ["max_steps=4", "sample_every=-1", "gan_start=1", "perceptual_weight=0"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train_ae(photos, str(straight), *common)
    proc = train_ae(photos, str(halves), *common, f"resume={straight / 'step_0000002'}")
    assert "resumed from" in proc.stdout
    for name in ("model", "ema"):
        a = load_file(str(straight / "step_0000004" / f"{name}.safetensors"))
        b = load_file(str(halves / "step_0000004" / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    d = [
        torch.load(p / "step_0000004" / "train_state.pt", weights_only=True)["extra"]["disc"]
        for p in (straight, halves)
    ]
    assert all(torch.equal(d[0][k], d[1][k]) for k in d[0])


def test_evaluate_scores_reconstructions(ae_run, tmp_path):
    import json

    out = str(tmp_path / "eval")
    run([sys.executable, "evaluate.py", ae_run, "n_samples=8", "batch=4", f"out={out}"])
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["script"] == "train_vae" and result["n_samples"] == 8
    assert 0 < result["PSNR"] < 60 and -1 <= result["SSIM"] <= 1 and result["rFD-EffNet"] >= 0
    assert result["latent_shape"] == [4, 8, 8] or result["latent_shape"][1:] == [8, 8]
    assert os.path.isfile(os.path.join(out, "eval_recon.png"))


@pytest.mark.slow
def test_bad_inputs_are_one_line(photos, tmp_path):
    cases = [
        (["variant=db-iq"], "unknown key"),  # an EEG option with data=stl10
        (["data=fmri"], "not a choice"),
        (["image_size=30"], "multiple of the factor"),
        (["codebook_size=16"], "vqvae option"),
        (["kl_weight=-1"], "out of range"),
        (["model=klvae", "size=huge"], "unknown size"),
    ]
    for extra, expected in cases:
        line = error_line(train_ae(photos, str(tmp_path / "bad"), *extra, check=False))
        assert expected in line, (extra, line)


# ----------------------------------------------------------------------------------------------------------------
# Latent diffusion (train_stl10.py latent=RUN)
# ----------------------------------------------------------------------------------------------------------------


def test_latent_stl10_end_to_end(photos, ae_run, tmp_path):
    """Train in the latent space (the cache is built once, the autoencoder rides along with every checkpoint), resume
    bitwise, then evaluate from the checkpoint alone (the autoencoder run deleted)."""
    import json
    import shutil

    from safetensors.torch import load_file

    ae_copy = str(tmp_path / "ae")
    shutil.copytree(ae_run, ae_copy)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    proc = train_latent(photos, str(straight), ae_copy, "max_steps=4", "sample_every=4")
    assert "latent cache" in proc.stdout and "scale" in proc.stdout
    ckpt = straight / "step_0000004"
    assert os.path.isfile(ckpt / "autoencoder.safetensors")
    config = json.load(open(straight / "config.json"))
    assert config["sample_shape"][1:] == [8, 8] and config["latent_space"]["scale"] > 0
    train_latent(photos, str(halves), ae_copy, "max_steps=4", "sample_every=4", f"resume={straight / 'step_0000002'}")
    for name in ("model", "ema"):
        a, b = (load_file(str(p / "step_0000004" / f"{name}.safetensors")) for p in (straight, halves))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert os.path.isfile(straight / "samples" / "step_0000004_grid.png")
    shutil.rmtree(ae_copy)  # evaluation needs nothing but the diffusion checkpoint
    out = str(tmp_path / "eval")
    run(
        [
            sys.executable,
            "evaluate.py",
            str(straight),
            "n_samples=4",
            "n_real=4",
            "batch=4",
            "floor=false",
            f"out={out}",
        ]
    )
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["n_samples"] == 4 and result["FD-EffNet"] >= 0
    # ddpm's Analytic-DPM variance estimated on training images encoded by the autoencoder that travels along
    ev = run(
        [
            sys.executable,
            "evaluate.py",
            str(straight),
            "n_samples=2",
            "n_real=4",
            "batch=4",
            "floor=false",
            "sample_steps=5",
            "analytic_var=6",
            f"out={out}",
        ]
    )
    assert "analytic_var: 6" in ev.stdout


def test_latent_cache_reuse_and_invalidation(tmp_path):
    """Reused when the autoencoder and data are the same; rebuilt (and said) when either changes; a truncated file is
    rebuilt too. The scale is 1 / std of the latents."""
    import models

    torch.manual_seed(0)
    ae = models.make_model("klvae", "tiny", in_channels=3).eval()
    samples = torch.rand(6, 3, 16, 16) * 2 - 1
    path = str(tmp_path / "latents.safetensors")
    args = (path, "test", 4, "cpu", True, lambda: None)
    z, scale = train_vae.latent_cache(ae, "id-a", samples, lambda c: c, *args)
    raw = train_vae.encode(ae, samples, 4, "cpu")
    assert abs(scale - 1 / float(raw.std())) < 1e-5 * scale
    assert torch.allclose(z, raw * scale, atol=1e-6)
    mtime = os.path.getmtime(path)
    z2, _ = train_vae.latent_cache(ae, "id-a", samples, lambda c: c, *args)
    assert os.path.getmtime(path) == mtime and torch.equal(z, z2)
    z4, _ = train_vae.latent_cache(ae, "id-a", samples.flip(0), lambda c: c, *args)  # other data: rebuilt
    assert torch.allclose(z4, z.flip(0), atol=1e-6)
    with open(path, "r+b") as f:  # truncate: rebuilt, not a crash
        f.truncate(100)
    z3, _ = train_vae.latent_cache(ae, "id-a", samples, lambda c: c, *args)
    assert torch.allclose(z3, z, atol=1e-6)


def test_latent_cache_says_why_it_rebuilds(tmp_path, capsys):
    import models

    ae = models.make_model("klvae", "tiny", in_channels=3).eval()
    samples = torch.rand(4, 3, 16, 16) * 2 - 1
    path = str(tmp_path / "latents.safetensors")
    args = (path, "test", 4, "cpu", True, lambda: None)
    train_vae.latent_cache(ae, "id-a", samples, lambda c: c, *args)
    capsys.readouterr()
    train_vae.latent_cache(ae, "id-b", samples, lambda c: c, *args)
    assert "another autoencoder" in capsys.readouterr().out
    train_vae.latent_cache(ae, "id-b", samples + 0.5, lambda c: c, *args)
    assert "other data" in capsys.readouterr().out


@pytest.mark.slow
def test_latent_bad_inputs_are_one_line(photos, ae_run, tmp_path):
    diffusion = str(tmp_path / "diffusion")
    train_latent(photos, diffusion, ae_run, "sample_every=-1")
    cases = [
        ([f"latent={diffusion}"], "not an autoencoder"),  # a diffusion checkpoint
        (["latent=/nonexistent/vae"], "no checkpoint"),
        (["image_size=16"], "image_size"),  # the autoencoder was trained at 32
    ]
    for extra, expected in cases:
        line = error_line(train_latent(photos, str(tmp_path / "bad"), ae_run, *extra, check=False))
        assert expected in line, (extra, line)
    other = str(tmp_path / "other_ae")  # another autoencoder: resuming the diffusion run with it is refused
    train_ae(photos, other, "seed=1", "perceptual_weight=0")
    proc = train_latent(photos, diffusion, other, "resume=auto", "max_steps=4", check=False)
    assert "latent_id" in error_line(proc) and "latent cache" not in proc.stdout  # refused before any encoding
