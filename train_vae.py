"""Autoencoders for latent diffusion: a KL-VAE, a VQ-VAE or a DC-AE trained on STL-10 photos, EEG spectrograms or time
series, or brain MRI (2D slices, 3D volumes), whose latent space train_stl10.py, train_eeg.py and train_mri.py then
diffuse in with `latent=RUN`.

The loss of the latent-diffusion autoencoders (Rombach et al. 2022, arXiv:2112.10752, appendix G): L1 reconstruction
+ a perceptual term + a small KL (KL-VAE) or the VQ commitment term (VQ-VAE, EMA codebook) + a PatchGAN hinge loss
from GAN_START on, weighted adaptively (Esser et al. 2021, arXiv:2012.09841, eq. 7). LPIPS weights cannot be had
offline, so the perceptual term is an unweighted feature distance in the offline EfficientNet-Lite0 (ImageNet) at
five depths, called "perceptual (EffNet)" everywhere; it is off for masks and 1D time series (no image to look at).

    python train_vae.py                                        # KL-VAE f4 on STL-10 96x96 (GPU)
    accelerate launch train_vae.py data=mri dims=3 model=klvae size=small latent_channels=4
    python train_vae.py data=eeg variant=timeseries ts_layout=1d model=dcae size=tiny
    OMP_NUM_THREADS=1 python train_vae.py data_dir=data/photo_stl10 image_size=32 size=small width=32 \\
        batch_size=8 lr=4e-4 warmup=100 gan_weight=0 ema_decay=0.99 max_steps=2500 out_dir=runs/vae_cpu  # CPU check
    python evaluate.py runs/vae                                # PSNR, SSIM, rFD-EffNet on held-out data
    python train_stl10.py latent=runs/vae                      # latent diffusion in this autoencoder's space

Each dataset's own data options pass through (data=stl10: data_dir, image_size, hflip, unlabeled; data=eeg:
variant, resolution, window, ...; data=mri: mode, dims, image_size, crop, ...), with that script's defaults.
Expected: see the README's train_vae.py section for what the CPU check measured (the full recipe has not been run
without a GPU). `python train_vae.py data=eeg --help` lists a dataset's options.
"""

import fcntl
import hashlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import common
import models
import train_eeg
import train_mri
import train_stl10

# data
DATA: common.choices("stl10", "eeg", "mri") = "stl10"  # which dataset (its script's data options pass through)
DATA_DIR = ""  # "" the dataset script's default (stl10 data/stl10, eeg the bundled demo, mri the demo study)
# model
MODEL: common.choices("klvae", "vqvae", "dcae") = "klvae"  # autoencoder
SIZE = ""  # preset in models.py; "" per model: klvae f4, vqvae small, dcae f32
WIDTH: common.bounds("> 0 or -1") = -1  # base channels; -1 the preset's
LATENT_CHANNELS: common.bounds("> 0 or -1") = -1  # latent channels (VQ: code dimension); -1 the preset's
CODEBOOK_SIZE: common.bounds("> 1 or -1") = -1  # VQ-VAE codes; -1 the preset's
# loss
PERCEPTUAL_WEIGHT: common.bounds(">= 0") = 1.0  # EffNet-Lite0 feature distance; forced 0 for masks and 1D series
KL_WEIGHT: common.bounds(">= 0") = 1e-6  # KL-VAE: x KL summed over the latent / pixels per sample (LDM's ratio)
VQ_WEIGHT: common.bounds(">= 0") = 1.0  # VQ-VAE: commitment term (beta = 0.25 inside)
GAN_WEIGHT: common.bounds(">= 0") = 0.5  # adversarial term's factor (x the adaptive weight); 0 off
GAN_START: common.bounds(">= 0") = 20_000  # step from which the discriminator trains and the adversarial term counts
DISC_LAYERS: common.bounds("1..6 or -1") = -1  # PatchGAN stride-2 layers; -1 the preset's (tiny 2, else 3)
# optim
BATCH_SIZE: common.bounds("> 0") = 16  # samples per optimizer update, across processes
LR: common.bounds(">= 0") = 1e-4  # Adam learning rate of the autoencoder (and the discriminator)
WARMUP: common.bounds(">= 0") = 500  # optimizer updates of linear warmup, then constant
BETAS: common.bounds("0..0.999999") = (0.5, 0.9)  # Adam (the LDM / VQGAN autoencoders' betas)
CLIP: common.bounds("> 0") = 1.0  # gradient-norm clip
EMA_DECAY: common.bounds("0..1") = 0.999  # EMA of the weights (evaluate.py and latent= use it)
MAX_STEPS: common.bounds(">= 0") = 50_000  # optimizer updates; 0 saves the untrained weights (a baseline)
# io
OUT_DIR = "runs/vae"  # checkpoints, log.jsonl, samples/
LOG_EVERY: common.bounds("> 0") = 100  # steps between log lines
SAMPLE_EVERY: common.bounds("> 0 or -1") = 2500  # steps between reconstruction figures (EMA); -1 off
CKPT_EVERY: common.bounds("> 0") = 2500  # steps between checkpoints
KEEP_CKPTS: common.bounds("> 0") = 3  # most recently written checkpoints kept
RESUME = ""  # "" fresh | "auto" newest in OUT_DIR | a checkpoint dir
INIT_FROM = ""  # fine-tune: a checkpoint (or run dir) whose weights and EMA start this run, fresh optimizer
# system
SEED: common.bounds(">= 0") = 0  # seeds the initial weights, the data order, the split and every step's noise
MIXED_PRECISION: common.choices("no", "bf16", "fp16") = "bf16"  # used on GPU only (CPU runs fp32)
COMPILE = False  # torch.compile the autoencoder

_DEFAULT_SIZE = {"klvae": "f4", "vqvae": "small", "dcae": "f32"}
_MODULES = {"stl10": train_stl10, "eeg": train_eeg, "mri": train_mri}
_PASS = {  # the dataset script's data constants that pass through (with that script's default and checks)
    "stl10": ("IMAGE_SIZE", "HFLIP", "UNLABELED"),
    "eeg": ("CACHE_DIR", "SFREQ", "WINDOW", "OVERLAP", "SPLIT_BY", "ON_CORRUPT", "VARIANT", "RESOLUTION")
    + ("STFT_WINDOW", "TS_LAYOUT"),
    "mri": ("DEMO_DIR", "CACHE_DIR", "DIMS", "IMAGE_SIZE", "CROP", "MODE"),
}
_DATA_KEY = {"stl10": "data_dir", "eeg": "data", "mri": "data"}  # where DATA_DIR goes in the dataset's config


# ----------------------------------------------------------------------------------------------------------------
# Data: every dataset as float tensors in the model range ([-1, 1] images; z units for EEG series)
# ----------------------------------------------------------------------------------------------------------------


def dataset_config(data, overrides, seed, data_dir):
    """The dataset script's data config: its constants' defaults, the passed-through overrides, SEED (EEG's split)
    and DATA_DIR; stored with the autoencoder, so the latent runs check they read the same kind of data."""
    module = _MODULES[data]
    config = {k.lower(): v for k, v in vars(module).items() if k.isupper() and not k.startswith("_")}
    config = {k: v for k, v in config.items() if isinstance(v, (bool, int, float, str, tuple))}
    config.update(overrides, seed=seed, data_name=data)
    if data_dir:
        config[_DATA_KEY[data]] = data_dir
    if data == "eeg":
        config["data"] = config["data"] or train_eeg._DEMO
    return config


def data_shape(dcfg):
    """(channels, *spatial) of one autoencoder input, and its kind: image | spectrogram | series | mri | mask."""
    if dcfg["data_name"] == "stl10":
        return (3, dcfg["image_size"], dcfg["image_size"]), "image"
    if dcfg["data_name"] == "eeg":
        shape = train_eeg.input_shape(dcfg)
        return shape, "series" if dcfg["variant"] == "timeseries" else "spectrogram"
    n_gen = len(train_mri._MODALITIES[dcfg["mode"]][0])
    kind = "mask" if dcfg["mode"].startswith("seg") else "mri"
    return (n_gen, *train_mri.spatial_shape(dcfg)), kind


def load_data(dcfg, is_main, wait):
    """(train, held_out, extra): tensors in the dataset's storage (STL-10 uint8, the rest float) that to_input turns
    into autoencoder inputs, and what evaluation needs (EEG statistics; MRI per-sample info)."""
    name = dcfg["data_name"]
    if name == "stl10":
        if is_main and dcfg["download"] and not os.path.isdir(os.path.join(dcfg["data_dir"], "stl10_binary")):
            train_stl10.download(dcfg["data_dir"])
        wait()
        train = train_stl10.load_dataset(dcfg["data_dir"], "train", dcfg["unlabeled"])[0]
        return train, train_stl10.load_dataset(dcfg["data_dir"], "test")[0], {}
    if name == "eeg":
        data = train_eeg.prepare(dcfg, dcfg["data"], verbose=is_main)
        held = data.split == "test" if (data.split == "test").any() else data.split == "val"
        common.check(held.any(), f"{dcfg['data']}: the split leaves no held-out window; add subjects or recordings")
        extra = {"stats": data.stats, "present": data.present[held]}
        return data.x[np.flatnonzero(data.split == "train")], data.x[np.flatnonzero(held)], extra
    root = train_mri.study_root(dcfg, is_main)
    wait()
    dcfg["data"] = root
    train = train_mri.prepare(dcfg, root, "train", verbose=is_main)[0]
    held_split = "test" if any(s["split"] == "test" for s in train_mri.find_subjects(root, ("bravo",))) else "val"
    held, _, info = train_mri.prepare(dcfg, root, held_split, verbose=is_main)
    return train, held, {"info": info}


def to_input(batch, dcfg):
    """Stored samples -> autoencoder inputs: STL-10 uint8 -> [-1, 1] at image_size; MRI [0, 1] -> the generated
    modalities (or the mask) in [-1, 1]; EEG model-space tensors as they are."""
    if dcfg["data_name"] == "stl10":
        return train_stl10.to_model_range(batch, dcfg["image_size"])
    if dcfg["data_name"] == "mri":
        return train_mri.split_sample(batch.float(), dcfg)[0]
    return batch.float()


def pictures(x, dcfg, extra):
    """Autoencoder inputs -> images (N, 3, H, W) in [-1, 1] for grids and EffNet features (EEG series through their
    db-only spectrogram; MRI volumes as axial slices)."""
    if dcfg["data_name"] == "eeg":
        return train_eeg.pictures(x, dcfg, extra["stats"])
    if dcfg["data_name"] == "mri":
        return train_mri.axial_images(x.clamp(-1, 1), dcfg)
    return x.float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------


class EffNetPerceptual(torch.nn.Module):
    """An unweighted LPIPS-style distance (Zhang et al. 2018, arXiv:1801.03924, eq. 1 without the learned weights
    w_l) in the frozen EfficientNet-Lite0: sum over five depths l of mean_{h,w} ||f_l(x) - f_l(y)||^2 / C_l with
    f_l unit-normalised over channels. Inputs (B, 1 or 3, H, W) in [-1, 1] at their own resolution (at least 64)."""

    TAPS = (0, 2, 4, 7, 10)  # block indices ending the 16-, 24-, 40-, 80- and 112-channel stages

    def __init__(self):
        super().__init__()
        self.net = common.EffNetFeatures("cpu").net.requires_grad_(False).eval()

    def train(self, mode=True):  # always evaluation mode (batch-norm statistics fixed)
        return super().train(False)

    def features(self, x):
        x = x.expand(-1, 3, *x.shape[2:]) if x.shape[1] == 1 else x
        if min(x.shape[-2:]) < 64:
            x = F.interpolate(x, size=(max(64, x.shape[-2]), max(64, x.shape[-1])), mode="bilinear")
        h, out = self.net._swish(self.net._bn0(self.net._conv_stem(x))), []
        for i, block in enumerate(self.net._blocks[: self.TAPS[-1] + 1]):
            h = block(h)
            if i in self.TAPS:
                out.append(F.normalize(h, dim=1))
        return out

    def forward(self, x, y):
        with torch.no_grad():
            target = self.features(y)
        return sum((a - b).pow(2).sum(1).mean((1, 2)) / a.shape[1] for a, b in zip(self.features(x), target))


def perceptual_views(x, dims):
    """The 2D views the perceptual term looks at: images as they are; 3D volumes as 4 evenly spaced axial slices."""
    if dims == 2:
        return x
    depth = x.shape[2]
    picks = torch.linspace(depth // 8, depth - 1 - depth // 8, 4).round().long()
    return x[:, :, picks].transpose(1, 2).flatten(0, 1)


def hinge_d_loss(real_logits, fake_logits):
    """Discriminator hinge loss (Lim & Ye 2017, arXiv:1705.02894): mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_loss(fake_logits):
    """The autoencoder's adversarial term under the hinge game: -mean(D(x_hat))."""
    return -fake_logits.mean()


def adaptive_weight(rec_loss, g_loss, last_layer, max_weight=1e4):
    """The adaptive adversarial weight (Esser et al. 2021, arXiv:2012.09841, eq. 7):
    lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + 1e-4), L the decoder's last layer, clamped to [0, max_weight]
    and detached, so the adversarial gradient at the output is as large as the reconstruction one."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, max_weight).detach()


def autoencoder_loss(model, raw, disc, x, config, perceptual, gan_on):
    """L1 + perceptual + KL / VQ terms (+ the adaptively weighted adversarial term once gan_on).
    -> (loss, x_hat, {term: scalar tensor}, the model's aux dict)."""
    x_hat, aux = model(x)
    l1 = (x_hat.float() - x).abs().flatten(1).mean(1)  # (B,)
    rec = l1.mean()
    terms = {"l1": rec.detach()}
    if perceptual is not None:
        p = perceptual(perceptual_views(x_hat.float(), raw.dims), perceptual_views(x, raw.dims)).mean()
        rec = rec + config["perceptual_weight"] * p
        terms["perceptual"] = p.detach()
    loss = rec
    if "kl" in aux:  # KL summed over the latent, per pixel of the input: LDM's weighting against a summed L1
        kl = aux["kl"].float().mean() / x[0].numel()
        loss = loss + config["kl_weight"] * kl
        terms["kl"] = aux["kl"].detach().float().mean()
    if "vq_loss" in aux:
        loss = loss + config["vq_weight"] * aux["vq_loss"]
        terms.update(vq=aux["vq_loss"].detach(), perplexity=aux["perplexity"].detach().float())
    if gan_on:
        g = generator_loss(disc(x_hat))
        w = adaptive_weight(rec, g, raw.last_layer) if torch.is_grad_enabled() else torch.ones(())
        loss = loss + config["gan_weight"] * w * g
        terms.update(g_loss=g.detach(), adaptive_weight=w)
    return loss, x_hat, terms, aux


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def model_kwargs(config, shape):
    """What models.make_model needs beyond name and preset: dims and channels from the data, the size overrides."""
    kw = {"dims": len(shape) - 1, "in_channels": shape[0]}
    if config["width"] > 0:
        kw["channels"] = config["width"]
    if config["latent_channels"] > 0:
        kw["latent_channels"] = config["latent_channels"]
    if config["codebook_size"] > 0:
        common.check(config["model"] == "vqvae", f"codebook_size= is a vqvae option, not {config['model']}'s")
        kw["codebook_size"] = config["codebook_size"]
    return kw


def build(name, size, kw, what):
    try:
        return models.make_model(name, size, **kw)
    except (ValueError, TypeError) as e:
        common.die(f"cannot build {what} model={name} size={size}: {e}")


def check_shapes(config, shape):
    """Build on the meta device and run one input through the autoencoder and the discriminator, so a size the
    downsampling cannot divide stops with one line before any data is read."""
    with torch.device("meta"):
        model = build(config["model"], config["size"], config["model_kw"], "autoencoder").eval()
        common.check_fits(sum(p.numel() for p in model.parameters()), f"model={config['model']} size={config['size']}")
        disc = build("patchgan", config["disc_size"], config["disc_kw"], "discriminator")
        try:
            decode = model.decoder if config["model"] == "vqvae" else model.decode  # code counts have no meta kernel
            x_hat = decode(model.encode(torch.zeros(1, *shape)))
        except (ValueError, RuntimeError) as e:
            common.die(
                f"model={config['model']} size={config['size']} (factor {model.factor}) cannot take input {shape}: "
                f"{common.error_detail(e)}; every spatial side must be a multiple of the factor"
            )
        common.check(
            tuple(x_hat.shape[1:]) == tuple(shape),
            f"model={config['model']} size={config['size']} reconstructs {tuple(x_hat.shape[1:])} from {shape}",
        )
        if config["gan_weight"] > 0:
            try:
                disc(x_hat)
            except (ValueError, RuntimeError) as e:
                common.die(
                    f"the discriminator ({disc.n_layers} stride-2 layers) cannot take input {shape}: "
                    f"{common.error_detail(e)}; give fewer disc_layers= or gan_weight=0"
                )


# ----------------------------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(model, x, batch=32):
    """Deterministic reconstructions decode(encode(x)) (the KL posterior mean; VQ codes without an update)."""
    device = next(model.parameters()).device
    out = [model.decode(model.encode(x[i : i + batch].to(device))).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


@torch.no_grad()
def diagnostics(ema_model, fixed, config, extra, out_dir, step):
    """From EMA weights: a grid of held-out inputs above their reconstructions, the latent statistics per channel
    (mean and std, a bar plot and the log) and, for the VQ-VAE, the code-use histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dcfg = config["dataset"]
    prefix = os.path.join(out_dir, "samples", f"step_{step:07d}")
    recon = reconstruct(ema_model, fixed)
    common.save_image_grid(
        torch.cat([pictures(fixed, dcfg, extra), pictures(recon, dcfg, extra)]), prefix + "_recon.png"
    )
    z = ema_model.encode(fixed.to(next(ema_model.parameters()).device)).float().cpu()
    per_channel = z.transpose(0, 1).flatten(1)  # (latent channels, N * positions)
    fig, ax = plt.subplots(1, 2 if config["model"] == "vqvae" else 1, figsize=(10, 3.5), squeeze=False)
    ax[0, 0].bar(range(len(per_channel)), per_channel.mean(1), yerr=per_channel.std(1), capsize=3)
    ax[0, 0].set(xlabel="latent channel", ylabel="mean +- std", title=f"latents of {len(fixed)} held-out samples")
    if config["model"] == "vqvae":
        counts = ema_model.quantizer.cluster_size.float().cpu()
        ax[0, 1].bar(range(len(counts)), counts, width=1.0)
        ax[0, 1].set(xlabel="code", ylabel="EMA count", title=f"code use: {(counts > 1e-3).float().mean():.0%} alive")
    common.save_figure(fig, prefix + "_latents.png")
    return prefix, [round(float(v), 4) for v in per_channel.std(1)]


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def resolve(argv):
    """Overrides, with the chosen dataset's data constants added to this script's (data=eeg variant=timeseries).
    -> (config, input shape, data kind)."""
    data = DATA
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key.strip().lower() == "data":
            data = value
    common.check(data in _MODULES, f"data={data!r} is not a choice; choose one of {', '.join(_MODULES)}")
    module = _MODULES[data]
    for name in _PASS[data]:  # borrowed with their defaults and their rules
        globals()[name] = getattr(module, name)
        if name in module.__annotations__:
            __annotations__[name] = module.__annotations__[name]
    if any(a in ("-h", "--help", "help") for a in argv):
        common.print_help({k: v for k, v in globals().items() if k not in _PASS[data]})
        names = {k: getattr(module, k) for k in _PASS[data]}
        print()
        common.print_help(
            {**names, "__file__": module.__file__, "__annotations__": module.__annotations__}, f"data={data}"
        )
        raise SystemExit(0)
    config = common.apply_overrides(globals(), argv)
    overrides = {k.lower(): config[k.lower()] for k in _PASS[data]}
    config["dataset"] = dataset_config(data, overrides, SEED, DATA_DIR)
    shape, kind = data_shape(config["dataset"])
    config.update(script="train_vae", size=SIZE or _DEFAULT_SIZE[MODEL], kind=kind, input_shape=list(shape))
    config["model_kw"] = model_kwargs(config, shape)
    config["disc_size"] = "tiny" if config["size"] == "tiny" else "base"
    config["disc_kw"] = {"dims": len(shape) - 1, "in_channels": shape[0]}
    if DISC_LAYERS > 0:
        config["disc_kw"]["n_layers"] = DISC_LAYERS
    if kind in ("mask", "series"):
        config["perceptual_weight"] = 0.0  # no image to look at: said in the start-up line
    return config, shape, kind


def main(argv):
    config, shape, kind = resolve(argv)
    check_shapes(config, shape)
    run = common.setup_run(OUT_DIR, MIXED_PRECISION, BATCH_SIZE, 1, MAX_STEPS)
    dcfg = config["dataset"]
    train, held, extra = load_data(dcfg, run.is_main, run.accelerator.wait_for_everyone)
    common.check(len(train) > 0, "the dataset has no training samples")
    if "stats" in extra:
        config["eeg_stats"] = extra["stats"]  # the z-score and dB range EEG pictures and latent runs need
    common.seed_everything(SEED)  # the initial weights depend on SEED alone
    raw = build(MODEL, config["size"], config["model_kw"], "autoencoder").to(run.device)
    disc_raw = build("patchgan", config["disc_size"], config["disc_kw"], "discriminator")
    disc_raw = disc_raw.to(run.device)
    ema = common.EMA(raw)
    optimizer = torch.optim.Adam(raw.parameters(), lr=LR, betas=BETAS)
    disc_opt = torch.optim.Adam(disc_raw.parameters(), lr=LR, betas=BETAS)
    perceptual = EffNetPerceptual().to(run.device) if config["perceptual_weight"] > 0 else None
    describe = (
        f"{DATA} ({kind}) {tuple(shape)}: {len(train)} training / {len(held)} held-out samples; {MODEL} "
        f"{config['size']} f{raw.factor} -> latent {raw.latent_channels} x "
        f"{'x'.join(str(s // raw.factor) for s in shape[1:])}; perceptual (EffNet) "
        f"{'x ' + format(config['perceptual_weight'], 'g') if perceptual else 'off'}, "
        f"GAN {'from step ' + str(GAN_START) if GAN_WEIGHT > 0 else 'off'}"
    )
    model, optimizer, step = common.start(run, raw, ema.model, optimizer, config, RESUME, INIT_FROM, COMPILE, describe)
    if run.resumed_state.get("extra", {}).get("disc"):
        disc_raw.load_state_dict(run.resumed_state["extra"]["disc"])
        disc_opt.load_state_dict(run.resumed_state["extra"]["disc_opt"])
    disc, disc_opt = run.accelerator.prepare(disc_raw, disc_opt)
    fixed = held[common.subset(len(held), 8)]
    fixed = to_input(fixed, dcfg)
    per_epoch, codes = max(1, len(train) // BATCH_SIZE), None
    state = lambda: {"disc": disc_raw.state_dict(), "disc_opt": disc_opt.state_dict()}
    while step < MAX_STEPS:
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SEED * 100_003 + step // per_epoch))
        batch = order[(step % per_epoch) * BATCH_SIZE :][:BATCH_SIZE]
        if len(batch) < BATCH_SIZE:  # fewer samples than one batch: draw with replacement
            batch = order[torch.arange(BATCH_SIZE) % len(order)]
        gen = common.step_generator(run, SEED, step, 0)  # flips; the KL-VAE's posterior sample (global RNG)
        idx = batch[run.rank * run.micro :][: run.micro]
        x = to_input(train[idx], dcfg).to(run.device)
        if dcfg["data_name"] == "stl10" and dcfg["hflip"]:
            flip = torch.rand(len(idx), generator=gen, device=run.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        gan_on = GAN_WEIGHT > 0 and step >= GAN_START
        with common.micro_step(run, model, 0, 1):
            loss, x_hat, terms, aux = autoencoder_loss(model, raw, disc, x, config, perceptual, gan_on)
            run.accelerator.backward(loss)
        run.metrics.add(loss=loss.detach().reshape(1), **{k: v.reshape(1) for k, v in terms.items()})
        if config["model"] == "vqvae":  # code use over the log interval, for the collapse warning
            used = torch.bincount(aux["indices"].flatten(), minlength=raw.quantizer.codebook_size)
            codes = used if codes is None else codes + used
        lr = common.lr_at(step, LR, WARMUP, kind="constant")
        grad_norm = common.optimizer_step(run, step, model, optimizer, lr, CLIP, loss)
        if gan_on:  # the discriminator's step on the same batch (hinge loss)
            disc_opt.zero_grad(set_to_none=True)  # drop what the autoencoder's adversarial term left there
            with run.accelerator.autocast():  # one forward of real and fake (per-sample GroupNorm: the same as two)
                real_logits, fake_logits = disc(torch.cat([x, x_hat.detach()])).chunk(2)
                d_loss = hinge_d_loss(real_logits, fake_logits)
            run.accelerator.backward(d_loss)
            run.accelerator.clip_grad_norm_(disc.parameters(), CLIP)
            for group in disc_opt.param_groups:
                group["lr"] = lr
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
            run.metrics.add(d_loss=d_loss.detach().reshape(1))
        ema.update(raw, EMA_DECAY)
        step += 1
        extra_log = {}
        if codes is not None and (step % LOG_EVERY == 0 or step == MAX_STEPS):
            codes = run.accelerator.reduce(codes, "sum")
            extra_log["code_use"] = float((codes > 0).float().mean())
            if run.is_main and extra_log["code_use"] < 0.1:
                print(
                    f"warning: only {int((codes > 0).sum())} of {len(codes)} VQ codes ({extra_log['code_use']:.1%}) "
                    f"were used in the last {LOG_EVERY} steps: the codebook is collapsing or larger than the data "
                    "needs; lower lr= or codebook_size=",
                    file=sys.stderr,
                    flush=True,
                )
            codes = None
        common.log_step(run, step, LOG_EVERY, optimizer, grad_norm, **extra_log)
        if SAMPLE_EVERY > 0 and (step % SAMPLE_EVERY == 0 or step == MAX_STEPS):
            common.check_finite(run)
            if run.is_main:
                prefix, stds = diagnostics(ema.model, fixed, config, extra, OUT_DIR, step)
                print(
                    f"step {step}: reconstructions (EMA) in {prefix}_*.png; latent std per channel {stds}", flush=True
                )
            run.accelerator.wait_for_everyone()
        if step % CKPT_EVERY == 0 or step == MAX_STEPS:
            common.checkpoint(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS, extra=state())
    common.finish(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS, extra=state())


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (called by evaluate.py)
# ----------------------------------------------------------------------------------------------------------------

EVAL = {  # `python evaluate.py RUN key=value` options for train_vae checkpoints
    "N_SAMPLES": 500,  # held-out samples reconstructed (a fixed subset)
    "BATCH": 32,  # samples per encode / decode / feature batch
    "DATA_DIR": "",  # "" the checkpoint's data
}


def evaluate(model, config, opts, out_dir):
    """Reconstruct N_SAMPLES held-out samples and score them against the originals: PSNR and SSIM (per sample, in
    the [-1, 1] range), rFD-EffNet (the Frechet distance between the EffNet features of reconstructions and
    originals), for EEG also the PSD distance; the same scores (resize_*) for the simple baseline of shrinking by the
    autoencoder's factor and enlarging again; a grid of originals above reconstructions."""
    common.check(opts["n_samples"] >= 2, f"n_samples={opts['n_samples']}: give at least 2")
    common.check(opts["batch"] > 0, f"batch={opts['batch']}: give a positive number")
    dcfg = dict(config["dataset"])
    if opts["data_dir"]:
        dcfg[_DATA_KEY[dcfg["data_name"]]] = opts["data_dir"]
    dcfg["download"] = False
    _, held, extra = load_data(dcfg, True, lambda: None)
    extra.setdefault("stats", config.get("eeg_stats"))
    x = to_input(held[common.subset(len(held), opts["n_samples"])], dcfg)
    t0 = time.time()
    recon = reconstruct(model, x, opts["batch"])
    result = {"n_samples": len(x), "reconstruct_s": round(time.time() - t0, 1)}
    # the simple baseline: shrink by the factor (area average) and enlarge again (linear interpolation)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[x.ndim - 2]
    shrunk = F.interpolate(x, scale_factor=1 / model.factor, mode="area")
    resized = F.interpolate(shrunk, size=x.shape[2:], mode=mode, align_corners=False)
    for name, y in (("", recon), ("resize_", resized)):
        if config["kind"] == "series":
            result[name + "PSNR"] = float(train_mri.psnr(y, x, data_range=float(x.max() - x.min())).mean())
            result[name + "MAE_z"] = float((y - x).abs().mean())
        else:
            result[name + "PSNR"] = float(train_mri.psnr(y.clamp(-1, 1), x).mean())
            result[name + "SSIM"] = float(train_mri.ssim(y.clamp(-1, 1), x).mean())
    effnet = common.EffNetFeatures(next(model.parameters()).device)
    f_real = common.features(effnet, pictures(x, dcfg, extra), opts["batch"])
    f_rec = common.features(effnet, pictures(recon, dcfg, extra), opts["batch"])
    f_resized = common.features(effnet, pictures(resized, dcfg, extra), opts["batch"])
    result["rFD-EffNet"] = common.frechet_distance(f_rec, f_real)
    result["resize_rFD-EffNet"] = common.frechet_distance(f_resized, f_real)
    if dcfg["data_name"] == "eeg":
        present = extra["present"][common.subset(len(held), opts["n_samples"]).numpy()]
        psd_real = train_eeg.power_spectra(x, dcfg, extra["stats"])[1]
        for name, y in (("", recon), ("resize_", resized)):
            psd = train_eeg.power_spectra(y, dcfg, extra["stats"])[1]
            result[name + "PSD_dB"] = train_eeg.psd_distance(psd, psd_real, present)
    with torch.no_grad():
        z = torch.cat(
            [
                model.encode(x[i : i + opts["batch"]].to(effnet.device)).float().cpu()
                for i in range(0, len(x), opts["batch"])
            ]
        )
    result["latent_shape"] = list(z.shape[1:])
    result["latent_std"] = float(z.std())
    files = []
    if dcfg["data_name"] == "mri" and dcfg["dims"] == 3:  # the first volume and its reconstruction, for a viewer
        pick = int(common.subset(len(held), opts["n_samples"])[0])
        affine = train_mri.sample_affine(extra["info"][pick], dcfg)
        for name, v in (("original", x[0, 0]), ("reconstruction", recon[0, 0].clamp(-1, 1))):
            path = os.path.join(out_dir, f"eval_{name}.nii.gz")
            train_mri.write_nifti(path, (v + 1) / 2, affine)
            files.append((path, f"held-out volume {extra['info'][pick]['subject']}: {name}, in [0, 1]"))
    path = os.path.join(out_dir, "eval_recon.png")
    n = min(16, len(x))
    show = torch.linspace(0, len(x) - 1, n).round().long()  # spread over the set (a split may be sorted by class)
    common.save_image_grid(
        torch.cat([pictures(x[show], dcfg, extra), pictures(recon[show], dcfg, extra)]), path, nrow=n
    )
    return result, [(path, f"{n} held-out samples (top) and their reconstructions (bottom)"), *files]


# ----------------------------------------------------------------------------------------------------------------
# Latent diffusion: what train_stl10.py, train_eeg.py and train_mri.py call with latent=RUN
# ----------------------------------------------------------------------------------------------------------------


def load_autoencoder(path, device, expect, resume=None):
    """The autoencoder of a train_vae run or step folder (EMA weights, frozen, eval) for a latent diffusion run.
    `expect` {data, kind, input_shape (channels, *spatial), and dataset keys such as variant or mode} must match what
    it was trained on; anything else stops with one line. -> (model, its config, its checkpoint folder, latent_id:
    a hash of its weights). resume (OUT_DIR, RESUME): a checkpoint to resume from in another autoencoder's latent
    space stops here, before any encoding."""
    ckpt = common.resolve_checkpoint(path)
    config = common.load_config(ckpt)
    if config.get("script") != "train_vae":
        common.die(
            f"latent={path!r} is a {config.get('script', 'unknown')} checkpoint, not an autoencoder; give a run of "
            "train_vae.py"
        )
    dcfg, want = config["dataset"], dict(expect)
    common.check(
        dcfg["data_name"] == want.pop("data"),
        f"latent={path!r} was trained on data={dcfg['data_name']}, this run diffuses {expect['data']} data",
    )
    shape = list(want.pop("input_shape"))
    common.check(
        config["input_shape"][0] == shape[0] and len(config["input_shape"]) == len(shape),
        f"latent={path!r} encodes {config['input_shape'][0]}-channel {len(config['input_shape']) - 1}D inputs "
        f"{tuple(config['input_shape'])}, this run has {tuple(shape)}; train an autoencoder on the same settings",
    )
    for key, value in want.items():
        value = list(value) if isinstance(value, tuple) else value  # the stored config went through JSON
        common.check(
            dcfg.get(key) == value,
            f"latent={path!r} was trained with {key}={dcfg.get(key)!r}, this run has {key}={value!r}",
        )
    model = models.make_model(config["model"], config["size"], **config["model_kw"])
    common.load_weights(ckpt, model, "ema")
    common.check(
        all(s % model.factor == 0 for s in shape[1:]),
        f"the input {tuple(shape)} is not a multiple of the autoencoder's factor {model.factor} ({path})",
    )
    digest = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        digest.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    latent_id = digest.hexdigest()[:16]
    previous = common.resolve_resume(*resume) if resume else None
    if previous and common.load_config(previous).get("latent_id") != latent_id:
        common.die(
            f"{previous} was trained with latent_id={common.load_config(previous).get('latent_id')!r}, this run has "
            f"latent_id={latent_id!r} (latent={path!r}); give the autoencoder it was trained with, or a fresh out_dir="
        )
    return model.to(device).eval().requires_grad_(False), config, ckpt, latent_id


def latent_shape(ae, input_shape):
    return (ae.latent_channels, *[s // ae.factor for s in input_shape[1:]])


@torch.no_grad()
def encode(ae, x, batch, device, progress=False):
    """Latents (N, c, *spatial / f) float32 on the CPU of inputs (N, C, *spatial) in the model range."""
    chunks = common.progress_bar(range(0, len(x), batch), desc="encoding", disable=not progress)
    return torch.cat([ae.encode(x[i : i + batch].to(device).float()).float().cpu() for i in chunks])


@torch.no_grad()
def decode(ae, z, scale, batch=32):
    """Scaled latents (N, c, ...) on any device -> autoencoder outputs ae.decode(z / scale), on z's device."""
    device = next(ae.parameters()).device
    return torch.cat(
        [ae.decode(z[i : i + batch].to(device).float() / scale).to(z.device) for i in range(0, len(z), batch)]
    )


def latent_cache(ae, latent_id, samples, to_inputs, path, what, batch, device, is_main, wait, flip=False):
    """Scaled latents of every sample: encode `samples` (the stored tensor; to_inputs(chunk) -> autoencoder inputs,
    described by `what`) once, measure scale = 1 / std of the latents (Rombach et al. 2022, sec. 4.3.2), and keep
    both in `path` (safetensors; metadata: the autoencoder's weight hash, a hash of the samples and `what`). A cache
    of another autoencoder or other data is rebuilt, saying so; one process builds it under a lock, the others wait.
    flip=True also encodes each input mirrored along its last axis (-> latents (N, 2, c, ...): as is, mirrored).
    -> (latents (N, c, ...) float32 CPU, already multiplied by scale, scale)."""
    digest = hashlib.sha256(what.encode())
    flat = samples.contiguous().view(-1).view(torch.uint8) if samples.dtype != torch.uint8 else samples.reshape(-1)
    for i in range(0, len(flat), 1 << 26):
        digest.update(flat[i : i + (1 << 26)].numpy().tobytes())
    key = {"latent_id": latent_id, "data": digest.hexdigest()[:16], "what": what, "flip": flip}

    def read():
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            stored = json.loads(meta.get("key", "{}"))
            if stored != key:
                differs = [k for k in key if stored.get(k) != key[k]]
                names = {
                    "latent_id": "another autoencoder",
                    "data": "other data",
                    "what": "other settings",
                    "flip": "flips",
                }
                if is_main:
                    print(f"latent cache {path} was built from {', '.join(names[k] for k in differs)}; rebuilding")
                return None
            return load_file(path)["latents"], float(meta["scale"])
        except Exception as e:  # a truncated or foreign file is rebuilt
            if is_main:
                print(f"latent cache {path} is unreadable ({common.error_detail(e)}); rebuilding")
            return None

    if is_main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found = read()
            if found is None:
                chunks, start = [], time.time()
                for i in common.progress_bar(range(0, len(samples), 256), desc="encoding the dataset"):
                    x = to_inputs(samples[i : i + 256])
                    z = encode(ae, x, batch, device)
                    chunks.append(torch.stack([z, encode(ae, x.flip(-1), batch, device)], 1) if flip else z)
                z = torch.cat(chunks)
                common.check(bool(torch.isfinite(z).all()), f"the autoencoder gives non-finite latents ({what})")
                scale = float(1.0 / z.std().clamp_min(1e-8))
                tmp = path + ".tmp"
                save_file(
                    {"latents": (z * scale).contiguous()}, tmp, metadata={"key": json.dumps(key), "scale": str(scale)}
                )
                os.replace(tmp, path)
                print(f"latent cache {path}: {tuple(z.shape)} in {time.time() - start:.0f} s, scale {scale:.4f}")
    wait()
    found = read()
    common.check(found is not None, f"the latent cache {path} could not be read after it was built")
    return found


def latent_info(ae_config, ae_dir, latent_id, scale, shape):
    """What a latent diffusion run stores in its config: the autoencoder (to rebuild it from the attached weights),
    where it came from, its weight hash and the scale."""
    keep = {k: ae_config[k] for k in ("model", "size", "model_kw", "input_shape", "kind", "dataset")}
    return {"run": ae_dir, "scale": scale, "shape": list(shape), "autoencoder": keep, "id": latent_id}


def attached(ae):
    """The weights that travel with every checkpoint of a latent diffusion run (autoencoder.safetensors)."""
    return {"autoencoder": ae.state_dict()}


def attached_autoencoder(ckpt_dir, config, device):
    """The autoencoder saved beside a latent diffusion checkpoint, rebuilt from the run's stored config."""
    info = config["latent_space"]["autoencoder"]
    model = models.make_model(info["model"], info["size"], **info["model_kw"])
    common.load_weights(ckpt_dir, model, "autoencoder")
    return model.to(device).eval().requires_grad_(False)


if __name__ == "__main__":
    main(sys.argv[1:])
