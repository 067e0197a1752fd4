"""Brain-MRI diffusion on NIfTI studies: 2D axial slices or 3D volumes, tumour-mask conditioning, DDPM or rectified
flow, in pixel, space-to-depth, Haar-wavelet or an autoencoder's latent space, with optional ScoreAug; generated
volumes written as NIfTI.

The recipe of a public brain-metastasis diffusion project: per-volume intensity scaling to [0, 1], axial slices
resized to 128 (2D) or [C, D, H, W] volumes padded in depth (3D); modes seg (masks), bravo (an image given its mask),
dual (t1_pre and t1_gd given the mask) and seg_sized (masks given a RANO-BM size histogram); DDPM (cosine, 1000
steps, eps-prediction; the reference samples with DDIM) or rectified flow (velocity, logit-normal t with the
resolution shift; the reference: Euler 50 steps), here both sampled with UniPC on the log-SNR grid (20 NFE, chosen in
bench.py samplers); Min-SNR-5 weighting; a UNet with channels 128 / 256 / 256 and attention at the two coarser levels.

    python train_mri.py                                           # the demo study (synthetic lesions), 2D bravo
    accelerate launch train_mri.py data=/path mode=bravo dims=3 batch_size=8
    accelerate launch train_mri.py data=/path mode=dual strategy=ddpm space=s2d
    python train_mri.py space=latent latent=runs/vae_mri          # in a `train_vae.py data=mri` autoencoder's space
    OMP_NUM_THREADS=1 python train_mri.py image_size=64 space=s2d size=tiny width=32 lr=5e-4 warmup=100 \\
        ema_decay=0.998 batch_size=16 max_steps=2500 out_dir=runs/mri_cpu   # the README's CPU check (~30 min)
    python evaluate.py runs/mri                                   # PSNR, MS-SSIM, FD-EffNet, tumour-region errors

Expected (the CPU check, held-out test subjects): PSNR 13.3 dB, MS-SSIM 0.52, FD-EffNet 184 (untrained: 4.9 dB,
0.02, 384).

Data: {split}/{subject}/{modality}.nii.gz with split in train / val / test and seg.nii.gz tumour masks (BraTS /
BrainMetShare layout). The default is a demo study built on first use into DATA_DIR from nilearn's packaged real
MNI152 brain, with SYNTHETIC subjects (random deformations) and SYNTHETIC ellipsoid lesions (see its README).
"""

import fcntl
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
import zlib

import nibabel as nib
import numpy as np
import pytorch_msssim
import scipy.ndimage
import scipy.ndimage as ndi
import scipy.spatial
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy.spatial.transform import Rotation

import common
import models

# data
DATA = ""  # a study root {split}/{subject}/{modality}.nii.gz; "" the demo study in DEMO_DIR (built when missing)
DEMO_DIR = "data/mri_demo"  # where the synthetic-lesion demo study on real anatomy is written
CACHE_DIR = "data/mri_cache"  # preprocessed slices / volumes, rebuilt when the files or the settings change
DIMS: common.choices(2, 3) = 2  # axial slices or whole volumes
IMAGE_SIZE: common.bounds("8..1024") = 128  # 2D: slice side in pixels
CROP: common.bounds("> 0") = (64, 96, 96)  # 3D: [D, H, W] voxels, centre crop or zero pad
MODE: common.choices("bravo", "dual", "seg", "seg_sized") = "bravo"  # what is generated, given what
# model
MODEL: common.choices("unet", "dit", "uvit", "hdit") = "unet"  # backbone (2D and 3D)
SIZE = ""  # preset in models.py; "" per backbone: unet mri, dit S, uvit small, hdit eeg
WIDTH: common.bounds("> 0 or -1") = -1  # base width (UNet channels, transformer dim, first HDiT level); -1 preset
PATCH: common.bounds("> 0") = 2  # patch side (all but the UNet)
CHECKPOINTING = False  # UNet gradient checkpointing (3D: less memory, more time)
# diffusion
STRATEGY: common.choices("rflow", "ddpm") = "rflow"  # rectified flow or DDPM (cosine, eps, DDIM sampling)
SPACE: common.choices("pixel", "s2d", "wavelet", "latent") = "pixel"  # where diffusion runs (latent: needs LATENT)
LATENT = ""  # space=latent: a train_vae.py run (data=mri, this mode, dims and size); its latents are cached in OUT_DIR
SCORE_AUG = False  # ScoreAug: transform x_t and the target together, the transform as a condition
MIN_SNR_GAMMA: common.bounds(">= 0") = 5.0  # Min-SNR-gamma weight; 0 off
SHIFT_BASE: common.bounds("> 0") = 64  # rflow shift r = side / SHIFT_BASE (numel ratio ^ 1/dims; latent: its side)
LABEL_DROP: common.bounds("0..1") = 0.1  # probability of training with the condition dropped (CFG)
GUIDANCE: common.bounds(">= 0") = 1.0  # sampling guidance scale (1 = conditional, no guidance)
# sampling: UniPC on the log-SNR grid to t = 0.03 (sigma / alpha about 0.03 on both paths), 19 steps + the final
# denoise = 20 NFE. bench.py samplers: 1.06x (cosine, ddpm) and 0.96x (flow, rflow) the error floor at 20 NFE,
# against 4.1x / 4.5x for the reference's 50 DDIM / Euler steps on the (unshifted) uniform grid; README: samplers
SAMPLER: common.choices(*common.DETERMINISTIC) = "unipc"  # ODE sampler (common.SAMPLERS)
SAMPLE_STEPS: common.bounds("> 0") = 19  # sampler steps (ddpm, uniform grid to 0: must divide 1000)
SAMPLE_GRID: common.choices(*common.GRIDS) = "logsnr"  # time grid (common.time_grid; rflow: then shifted by r)
T_MIN: common.bounds("0..0.999") = 0.03  # where the grid ends: 0 = t = 0 (uniform only); > 0 then a final denoise
# optim
BATCH_SIZE: common.bounds("> 0") = 16  # samples per optimizer update, across processes and accumulation
GRAD_ACCUM: common.bounds("> 0") = 1  # micro-batches per optimizer update
LR: common.bounds(">= 0") = 1e-4  # AdamW peak learning rate
WARMUP: common.bounds(">= 0") = 500  # optimizer updates of linear warmup, then cosine to 0
WEIGHT_DECAY: common.bounds(">= 0") = 0.0  # AdamW
CLIP: common.bounds("> 0") = 1.0  # gradient-norm clip
EMA_DECAY: common.bounds("0..1") = 0.999  # EMA of the weights, used for every sample
MAX_STEPS: common.bounds(">= 0") = 50_000  # optimizer updates; 0 saves the untrained weights (a baseline)
# io
OUT_DIR = "runs/mri"  # checkpoints, log.jsonl, samples/
LOG_EVERY: common.bounds("> 0") = 100  # steps between log lines
SAMPLE_EVERY: common.bounds("> 0 or -1") = 2500  # steps between diagnostic figures (EMA, fixed seeds); -1 off
CKPT_EVERY: common.bounds("> 0") = 2500  # steps between checkpoints
KEEP_CKPTS: common.bounds("> 0") = 3  # most recently written checkpoints kept
RESUME = ""  # "" fresh | "auto" newest in OUT_DIR | a checkpoint dir
INIT_FROM = ""  # fine-tune: a checkpoint (or run dir) whose weights and EMA start this run, fresh optimizer
# system
SEED: common.bounds(">= 0") = 0  # seeds the initial weights, the data order and every step's noise
MIXED_PRECISION: common.choices("no", "bf16", "fp16") = "bf16"  # used on GPU only (CPU runs fp32)
COMPILE = False  # torch.compile the model

_DEFAULT_SIZE = {"unet": "mri", "dit": "S", "uvit": "small", "hdit": "eeg"}
_MODALITIES = {  # mode -> (generated modalities, conditioned on the mask)
    "bravo": (("bravo",), True),
    "dual": (("t1_pre", "t1_gd"), True),
    "seg": (("seg",), False),
    "seg_sized": (("seg",), False),
}
_RANO = ("tiny", "small", "medium", "large")  # RANO-BM size classes: < 10, 10-20, 20-30, >= 30 mm
_SPLITS = ("train", "val", "test")
_DEMO_MODALITIES = ("bravo", "t1_pre", "t1_gd", "flair", "seg")  # BrainMetShare's file names
_MRI_CACHE_VERSION = 2  # bump when what the cache holds changes meaning: every cache is then rebuilt
_OMEGA = 15  # length of ScoreAug's transform code (score_aug: kind one-hot, rotation, flip axis, shift, cutout)

# ----------------------------------------------------------------------------------------------------------------
# A synthetic demo study: synthetic lesions on the real MNI152 2009 anatomy
# ----------------------------------------------------------------------------------------------------------------

_DEMO_README = """# SYNTHETIC demo MRI study (synthetic lesions on real anatomy)

Every subject here is SYNTHETIC. The anatomy is real: the MNI152 ICBM 2009a nonlinear symmetric template (T1 and
its grey/white-matter probability maps) as packaged by nilearn (Fonov et al., NeuroImage 2011, 2009; Copyright (C)
1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University;
permission to use, copy, modify and distribute is granted without fee provided this copyright notice and permission
notice appear in all copies; the template is provided "as is" without express or implied warranty). The lesions,
contrasts and perturbations are synthetic and are not a model of any patient.

How it was made (make_demo_study in train_mri.py; parameters in .complete): the template resampled to {spacing} mm;
per synthetic subject a random affine (rotation <= 8 degrees per axis, scale 0.92-1.08 per axis, shift <= 4 mm),
a smooth elastic displacement (<= 3 mm), then 1-4 synthetic ellipsoid lesions (diameter 4-35 mm, log-uniform) inside
the brain (seg.nii.gz). t1_pre: the warped T1 with a polynomial bias field, a gain and Rician noise; t1_gd: t1_pre
with the lesions brightened (enhancing rim, necrotic or enhancing core); bravo: t1_gd through a power contrast curve
with its own bias and gain; flair: a synthetic contrast from the GM/WM/CSF maps with hyperintense lesions and
surrounding oedema. The affine in each file is the subject's voxel-to-MNI-world map (the random affine included).
Layout: {{train,val,test}}/synthetic_NNN/{{bravo,t1_pre,t1_gd,flair,seg}}.nii.gz (images int16, seg uint8).
"""


def _synthetic_templates(spacing):
    """([t1, gm, wm] float32 1 mm MNI152 2009 arrays, their affine), Gaussian-smoothed so that sampling them every
    `spacing` mm does not alias (FWHM sqrt(spacing^2 - 1) mm). nilearn's packaged copies: no download."""
    from nilearn import datasets

    images = [
        datasets.load_mni152_template(resolution=1),
        datasets.load_mni152_gm_template(resolution=1),
        datasets.load_mni152_wm_template(resolution=1),
    ]
    arrays = [np.asarray(img.get_fdata(), dtype=np.float32) for img in images]
    sigma = max(spacing**2 - 1.0, 0.0) ** 0.5 / 2.355  # FWHM -> Gaussian sigma, in 1 mm voxels
    if sigma > 0:
        arrays = [ndi.gaussian_filter(a, sigma, truncate=3.0) for a in arrays]
    return arrays, images[0].affine


def _synthetic_smooth_field(shape, rng, coarse=5):
    """A smooth random field (shape) with max |value| 1: Gaussian noise on a coarse^3 control grid upsampled by cubic
    B-splines, as TorchIO's RandomElasticDeformation does (Perez-Garcia et al. 2021, arXiv:2003.04696). The spline
    upsampling is separable, so it is one (coarse, n) basis matrix per axis (= scipy.ndimage.zoom, order 3)."""
    bases = [ndi.zoom(np.eye(coarse), (1, n / coarse), order=3, mode="nearest")[:, :n] for n in shape]
    field = np.einsum("ijk,ix,jy,kz->xyz", rng.standard_normal((coarse,) * 3), *bases, optimize=True)
    return (field / np.abs(field).max()).astype(np.float32)


def _synthetic_warp(shape, spacing, template_affine, rng):
    """(coords (3, X, Y, Z): the 1 mm template voxel that each subject voxel samples, the subject's voxel-to-world
    affine 4x4). World = MNI mm. The affine is a random rotation (<= 8 deg per axis), per-axis scale (0.92-1.08) and
    shift (<= 4 mm) about the template's centre, composed with the spacing-mm grid; an elastic displacement (<= 3 mm,
    smooth) is added on top, so the written affine is exact up to the elastic part."""
    grid = template_affine @ np.diag([spacing, spacing, spacing, 1.0])  # subject grid before the perturbation
    centre = grid[:3, :3] @ ((np.array(shape) - 1) / 2) + grid[:3, 3]
    linear = Rotation.from_euler("xyz", rng.uniform(-8, 8, 3), degrees=True).as_matrix() @ np.diag(
        rng.uniform(0.92, 1.08, 3)
    )
    perturb = np.eye(4)
    perturb[:3, :3], perturb[:3, 3] = linear, centre + rng.uniform(-4, 4, 3) - linear @ centre
    affine = perturb @ grid
    to_template = np.linalg.inv(template_affine) @ affine  # subject voxel -> template voxel
    index = np.indices(shape, dtype=np.float32)  # (3, X, Y, Z)
    coords = np.einsum("ij,j...->i...", to_template[:3, :3].astype(np.float32), index)
    coords += to_template[:3, 3, None, None, None].astype(np.float32)
    amplitude = rng.uniform(1.0, 3.0) / np.sqrt(3)  # per axis, so the displacement's length stays <= 3 mm
    inv_linear = np.linalg.inv(template_affine[:3, :3]).astype(np.float32)  # world mm -> template voxels
    shift = np.stack([amplitude * _synthetic_smooth_field(shape, rng) for _ in range(3)])
    coords += np.einsum("ij,j...->i...", inv_linear, shift)
    return coords, affine


def _synthetic_bias(shape, rng, strength=0.25, order=3):
    """A multiplicative bias field exp(sum_ijk c_ijk x^i y^j z^k), i + j + k <= order, x, y, z in [-1, 1],
    c ~ U(-strength, strength) / (1 + i + j + k): TorchIO's RandomBiasField (Perez-Garcia et al. 2021; after Van
    Leemput et al. 1999)."""
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    log_field = np.zeros(shape, dtype=np.float32)
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                c = rng.uniform(-strength, strength) / (1 + i + j + k)
                log_field += c * (axes[0][:, None, None] ** i * axes[1][None, :, None] ** j * axes[2] ** k)
    return np.exp(log_field)


def _synthetic_lesions(brain, zooms, rng):
    """(lesion label map int (X, Y, Z), oedema bool (X, Y, Z)): 1-4 synthetic ellipsoids centred in the brain, largest
    diameter log-uniform in 4-35 mm, the other two 0.7-1 of it, random orientation, clipped to the brain (the centre
    voxel always kept, so a lesion below one voxel is still one voxel); oedema: the ellipsoid scaled by 1.5-2.5."""
    labels, oedema = np.zeros(brain.shape, dtype=np.int16), np.zeros(brain.shape, dtype=bool)
    inner = ndi.binary_erosion(brain, iterations=2)
    candidates = np.argwhere(inner if inner.any() else brain)
    for k in range(1, rng.integers(1, 5) + 1):
        diameter = np.exp(rng.uniform(np.log(4.0), np.log(35.0)))
        radii = diameter / 2 * rng.permutation([1.0, *rng.uniform(0.7, 1.0, 2)])
        rotation = Rotation.from_euler("xyz", rng.uniform(0, 360, 3), degrees=True).as_matrix()
        centre, swell = candidates[rng.integers(len(candidates))], rng.uniform(1.5, 2.5)
        reach = np.ceil(swell * radii.max() / np.asarray(zooms)).astype(int) + 1
        lo, hi = np.maximum(centre - reach, 0), np.minimum(centre + reach + 1, brain.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        offsets = np.stack(np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)], indexing="ij"), -1)
        q = np.sum(((offsets * zooms) @ rotation / radii) ** 2, axis=-1)  # ellipsoid radius^2 in its own axes
        inside = (q <= 1) & brain[box]
        inside[tuple(centre - lo)] = True
        labels[box][inside] = k
        oedema[box] |= (q <= swell**2) & brain[box]
    return labels, oedema


def _synthetic_rician(x, brain, rng, level):
    """Magnitude (Rician) noise |x + n1 + i n2|, n ~ N(0, level^2), inside the brain only (Gudbjartsson & Patz
    1995); the background stays exactly 0 so the brain is the nonzero voxels."""
    n1, n2 = (level * rng.standard_normal(x.shape, dtype=np.float32) for _ in range(2))
    noisy = np.hypot(x.astype(np.float32) + n1, n2)
    return np.where(brain, noisy, 0).astype(np.float32)


def _synthetic_blend(base, labels, values, sigma=0.6):
    """base with each lesion label k >= 1 replaced by values[k], edges softened by a Gaussian (sigma voxels)."""
    values = np.r_[0.0, values[1:]]  # label 0 is the background: keeps base
    weight = ndi.gaussian_filter((labels > 0).astype(np.float32), sigma)
    target = ndi.gaussian_filter(values[labels].astype(np.float32), sigma)
    return base * (1 - weight) + target


def _synthetic_subject(templates, template_affine, shape, spacing, rng):
    """({modality: float array (X, Y, Z)}, voxel-to-world affine) of one synthetic subject (see _DEMO_README)."""
    coords, affine = _synthetic_warp(shape, spacing, template_affine, rng)
    t1, gm, wm = [ndi.map_coordinates(a, coords, order=1, cval=0.0, prefilter=False) for a in templates]
    brain = t1 > 0.05  # the template is skull-stripped: its smoothed edge is cut here
    csf = np.clip(1 - gm - wm, 0, 1) * brain
    labels, oedema = _synthetic_lesions(brain, np.sqrt((affine[:3, :3] ** 2).sum(0)), rng)
    n = labels.max() + 1
    rim = (labels > 0) & ~ndi.binary_erosion(labels > 0)
    necrotic = np.r_[False, rng.random(n - 1) < 0.5]  # per lesion: necrotic (dark) or enhancing core
    core = np.where(necrotic, rng.uniform(0.2, 0.45, n), rng.uniform(0.95, 1.2, n))
    bias, level = _synthetic_bias(shape, rng), rng.uniform(0.01, 0.025)
    t1_pre = t1 * bias * rng.uniform(0.85, 1.15)
    gd = _synthetic_blend(t1, labels, core) * (1 - rim) + rim * rng.uniform(1.15, 1.4)  # enhancing rim
    t1_gd = gd * bias * rng.uniform(0.85, 1.15)
    bravo = np.clip(gd, 0, None) ** rng.uniform(1.3, 1.7) * _synthetic_bias(shape, rng) * rng.uniform(0.85, 1.15)
    flair = 0.1 * csf + rng.uniform(0.55, 0.65) * gm + rng.uniform(0.4, 0.48) * wm
    flair = _synthetic_blend(flair, oedema.astype(np.int16), np.array([0.0, rng.uniform(0.8, 0.95)]), sigma=1.0)
    flair = _synthetic_blend(flair, labels, rng.uniform(0.65, 0.9, n))
    flair = flair * _synthetic_bias(shape, rng) * rng.uniform(0.85, 1.15)
    out = {m: _synthetic_rician(x, brain, rng, level) for m, x in zip(_DEMO_MODALITIES, (bravo, t1_pre, t1_gd, flair))}
    out["seg"] = (labels > 0).astype(np.uint8)
    return out, affine


def make_demo_study(root, n_subjects=12, seed=0, spacing=2.0):
    """Write a SYNTHETIC study on REAL anatomy: root/{train,val,test}/synthetic_NNN/{bravo,t1_pre,t1_gd,flair,
    seg}.nii.gz, synthetic lesions on the MNI152 2009 template (see _DEMO_README, written to root/README.md), val =
    test = max(1, round(n / 6)) subjects (8/2/2 of 12). Deterministic given seed. root/.complete (the parameters) is
    written last; a root whose .complete holds the same parameters is returned untouched, any other is rebuilt.
    Returns root."""
    common.check(n_subjects >= 3, f"make_demo_study needs >= 3 subjects (one per split), got {n_subjects}")
    common.check(spacing >= 1, f"make_demo_study spacing {spacing} mm: the template is 1 mm, choose >= 1")
    params = {"synthetic": True, "n_subjects": int(n_subjects), "seed": int(seed), "spacing": float(spacing)}
    marker = os.path.join(root, ".complete")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return root
        os.remove(marker)
    for split in _SPLITS:
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
    templates, template_affine = _synthetic_templates(spacing)
    shape = tuple(int(np.ceil(n / spacing)) for n in templates[0].shape)
    n_held = max(1, round(n_subjects / 6))
    splits = ["train"] * (n_subjects - 2 * n_held) + ["val"] * n_held + ["test"] * n_held
    for i, split in enumerate(common.progress_bar(splits, desc="synthetic MRI study", disable=None)):
        volumes, affine = _synthetic_subject(
            templates, template_affine, shape, spacing, np.random.default_rng([seed, i])
        )
        folder = os.path.join(root, split, f"synthetic_{i:03d}")
        os.makedirs(folder, exist_ok=True)
        for name, x in volumes.items():
            data = x if name == "seg" else np.round(np.clip(x, 0, 32.767) * 1000).astype(np.int16)
            img = nib.Nifti1Image(data, affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, os.path.join(folder, f"{name}.nii.gz"))
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write(_DEMO_README.format(spacing=spacing))
    with open(marker, "w") as f:
        json.dump(params, f)
    return root


# ----------------------------------------------------------------------------------------------------------------
# Reading a study: subjects, volumes, scaling
# ----------------------------------------------------------------------------------------------------------------


def _split_counts(n, fractions):
    """How many of n subjects go to train, val, test: largest-remainder rounding of n * fractions, then at least one
    in each split when n >= 3 (taken from the largest)."""
    exact = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= 3:
        for i in np.flatnonzero(counts == 0):
            counts[np.argmax(counts)] -= 1
            counts[i] += 1
    return counts


def _subject_folders(folder):
    """Sorted names of the visible sub-folders of folder."""
    return sorted(
        n for n in os.listdir(folder) if not n.startswith((".", "_")) and os.path.isdir(os.path.join(folder, n))
    )


def find_subjects(root, modalities):
    """[dict(split, subject, paths {modality: path})] of a study in the BrainMetShare layout
    root/{train,val,test}/{subject}/{modality}.nii.gz (or .nii): splits from the split folders present (any of the
    three). A root without split folders holds the subject folders itself: they are split 0.8 / 0.1 / 0.1 by a
    fixed-seed (0) permutation of their sorted names. common.die (one line, naming it) on a missing root, a split
    folder without subjects, no subjects, or a subject missing a modality."""
    common.check(os.path.isdir(root), f"MRI study {root} is not a folder")
    present = [s for s in _SPLITS if os.path.isdir(os.path.join(root, s))]
    units = []
    if present:
        for split in present:
            names = _subject_folders(os.path.join(root, split))
            common.check(names, f"split folder {os.path.join(root, split)} is empty: no subject folders")
            units += [(split, name, os.path.join(root, split, name)) for name in names]
    else:
        names = _subject_folders(root)
        common.check(names, f"no subjects under {root}: expected {{train,val,test}}/<subject>/ or <subject>/ folders")
        order = np.random.default_rng(0).permutation(len(names))
        split_of = np.repeat(_SPLITS, _split_counts(len(names), (0.8, 0.1, 0.1)))
        units = sorted((split_of[rank], names[i], os.path.join(root, names[i])) for rank, i in enumerate(order))
    subjects = []
    for split, name, folder in units:
        paths = {}
        for m in modalities:
            found = [
                p for p in (os.path.join(folder, f"{m}.nii.gz"), os.path.join(folder, f"{m}.nii")) if os.path.isfile(p)
            ]
            common.check(found, f"subject {folder} has no {m}.nii.gz (or {m}.nii)")
            paths[m] = found[0]
        subjects.append({"split": split, "subject": name, "paths": paths})
    return subjects


def _open_nifti(path):
    """The nibabel image at path (3D, or 4D with one volume), or common.die naming the file."""
    try:
        img = nib.load(path)
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        common.die(f"{path} is not a readable NIfTI file ({' '.join(str(e).split())})")
    common.check(isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)), f"{path} is not a NIfTI file")
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    common.check(len(img.shape) == 3, f"{path} has shape {img.shape}: expected a 3D volume")
    return img


def _read_data(img, path):
    """float32 array of img, or common.die naming the file (truncated or corrupt data, NaN/inf)."""
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except (OSError, EOFError, ValueError, zlib.error) as e:
        common.die(f"{path} is truncated or corrupt ({' '.join(str(e).split())})")
    common.check(np.isfinite(data).all(), f"{path} contains NaN or infinite values")
    return data


def scale_intensity(x, path, lo_pct=0.5, hi_pct=99.5):
    """(x - lo) / (hi - lo) clipped to [0, 1], lo/hi the lo_pct/hi_pct percentiles of the nonzero voxels (the
    reference's per-volume scaling made robust to outliers); common.die naming path for a constant volume."""
    common.check(x.max() > x.min(), f"{path} is constant ({x.flat[0]:g}): an empty or broken volume")
    lo, hi = np.percentile(x[x != 0], [lo_pct, hi_pct])
    common.check(hi > lo, f"{path} has no intensity range: its {lo_pct}-{hi_pct} percentiles are equal ({lo:g})")
    return np.clip((x - lo) / (hi - lo), 0, 1).astype(np.float32)


def binarise_mask(x, path):
    """x > 0.01 as float32 {0, 1}; common.die "is not a mask" naming path when x has more than 2 levels after
    rounding to 2 decimals or a maximum above 1.5. An all-zero mask is valid (a subject without lesions)."""
    levels = np.unique(np.round(x, 2))
    common.check(
        len(levels) <= 2 and x.max() <= 1.5,
        f"{path} is not a mask: {len(levels)} distinct values in [{x.min():g}, {x.max():g}], expected 0 and 1",
    )
    return (x > 0.01).astype(np.float32)


def load_subject(paths, modalities):
    """(volumes float32 [M, D, H, W], affine 4x4 of the RAS+ canonical image, spacing (3,) mm in [D, H, W] order).
    Images scaled to [0, 1] (scale_intensity), "seg" binarised (binarise_mask). Every modality must have the first's
    shape and affine (to 1e-3), else common.die naming both files."""
    images = {m: _open_nifti(paths[m]) for m in modalities}
    first = modalities[0]
    for m in modalities[1:]:
        a, b = images[first], images[m]
        common.check(a.shape == b.shape, f"{paths[m]} has shape {b.shape} but {paths[first]} has {a.shape}")
        common.check(
            np.allclose(a.affine, b.affine, atol=1e-3), f"{paths[m]} and {paths[first]} have different affines"
        )
    volumes = []
    for m in modalities:
        canonical = nib.as_closest_canonical(images[m])
        data = _read_data(canonical, paths[m])
        data = binarise_mask(data, paths[m]) if m == "seg" else scale_intensity(data, paths[m])
        volumes.append(rearrange(data, "r a s -> s a r"))  # (D, H, W): axial slices along D
    spacing = np.sqrt((canonical.affine[:3, :3] ** 2).sum(axis=0))[::-1]  # voxel sizes from the affine, [D, H, W]
    return np.stack(volumes), canonical.affine.copy(), spacing


# ----------------------------------------------------------------------------------------------------------------
# 2D slices and 3D crops
# ----------------------------------------------------------------------------------------------------------------


def kept_slices(volumes, min_brain=0.05, seg_channel=None):
    """Indices of the axial slices (axis 1 of volumes [M, D, H, W]) in which the first image channel (the first
    channel that is not seg_channel) has more than min_brain of its H x W pixels nonzero (the reference keeps slices
    whose sum > 1; a fraction does not depend on the resolution)."""
    image = next(c for c in range(len(volumes)) if c != seg_channel)
    fraction = (volumes[image] != 0).mean(axis=(1, 2))
    return np.flatnonzero(fraction > min_brain)


def slices_2d(volumes, image_size, min_brain=0.05, seg_channel=None):
    """float32 [N, M, S, S] axial slices of volumes [M, D, H, W] kept by kept_slices, zero-padded to a centred square
    and resized to S = image_size with bilinear antialiased interpolation (a triangle filter, which keeps [0, 1]);
    the seg_channel (if any) re-binarised at > 0.5."""
    keep = kept_slices(volumes, min_brain, seg_channel)
    x = torch.from_numpy(np.ascontiguousarray(volumes[:, keep], dtype=np.float32))
    x = rearrange(x, "m n h w -> n m h w")
    h, w = x.shape[-2:]
    side = max(h, w)
    x = F.pad(x, ((side - w) // 2, side - w - (side - w) // 2, (side - h) // 2, side - h - (side - h) // 2))
    if side != image_size and len(x):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    if seg_channel is not None:
        x[:, seg_channel] = (x[:, seg_channel] > 0.5).float()
    return x.numpy()


def volume_3d(volumes, size):
    """volumes [M, D, H, W] centre-cropped or zero-padded per axis to size (d, h, w) (the reference pads depth 150 ->
    160; this does every axis, cropping (n - t) // 2 from the start or padding (t - n) // 2 before)."""
    out = np.zeros((len(volumes), *size), dtype=volumes.dtype)
    src, dst = [slice(None)], [slice(None)]
    for n, t in zip(volumes.shape[1:], size):
        if n >= t:
            src.append(slice((n - t) // 2, (n - t) // 2 + t))
            dst.append(slice(None))
        else:
            src.append(slice(None))
            dst.append(slice((t - n) // 2, (t - n) // 2 + n))
    out[tuple(dst)] = volumes[tuple(src)]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The cached study loader
# ----------------------------------------------------------------------------------------------------------------


def _mri_cache_key(root, subjects, modalities, dims, image_size, crop, min_brain):
    """What a cached split depends on: each file (path relative to root, size, mtime) and the settings."""
    files = []
    for s in subjects:
        for m in modalities:
            st = os.stat(s["paths"][m])
            files.append([os.path.relpath(s["paths"][m], root).replace(os.sep, "/"), st.st_size, st.st_mtime_ns])
    size = int(image_size) if dims == 2 else -1  # 3D does not resize
    settings = {"modalities": list(modalities), "dims": int(dims), "image_size": size, "crop": [int(c) for c in crop]}
    return {"version": _MRI_CACHE_VERSION, **settings, "min_brain": float(min_brain), "files": files}


def _mri_items(subject, modalities, dims, image_size, crop, min_brain):
    """(array [n, M, ...], info rows) of one subject: its kept 2D slices or its one 3D volume."""
    volumes, affine, spacing = load_subject(subject["paths"], modalities)
    origin = [0, 0, 0]  # the original [D, H, W] index of the (cropped / padded) volume's first voxel
    if crop:
        origin = [(n - t) // 2 if n >= t else -((t - n) // 2) for n, t in zip(volumes.shape[1:], crop)]
        volumes = volume_3d(volumes, crop)
    seg = modalities.index("seg") if "seg" in modalities else None
    row = {"subject": subject["subject"], "affine": affine.tolist(), "spacing": spacing.tolist()}
    row.update(shape=list(volumes.shape[1:]), origin=origin)
    if dims == 3:
        return volumes[None], [row]
    keep = kept_slices(volumes, min_brain, seg)
    return slices_2d(volumes, image_size, min_brain, seg), [{**row, "slice": int(i)} for i in keep]


def _build_mri(subjects, folder, key, modalities, dims, image_size, crop, min_brain, verbose):
    """Build the cache in a temporary folder beside `folder`, then os.replace it into place (a killed build leaves
    only the temporary folder, removed by the next build). Call with the lock held."""
    for stale in glob.glob(glob.escape(folder) + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{folder}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        parts, info, shapes = [], [], set()
        for s in common.progress_bar(subjects, desc="reading MRI", disable=None if verbose else True):
            x, rows = _mri_items(s, modalities, dims, image_size, crop, min_brain)
            if shapes and x.shape[1:] not in shapes:
                common.die(
                    f"subject {s['subject']} gives {x.shape[1:]}, others {next(iter(shapes))}: set crop=(d, h, w) "
                    "so every volume has one shape"
                )
            shapes.add(x.shape[1:])
            parts.append(os.path.join(tmp, f"part-{len(parts):05d}.npy"))
            np.save(parts[-1], x)
            info += rows
        common.check(info, f"no slices with more than {min_brain} brain in {len(subjects)} subjects")
        out = np.lib.format.open_memmap(os.path.join(tmp, "data.npy"), "w+", np.float32, (len(info), *shapes.pop()))
        at = 0
        for path in parts:  # one subject at a time in memory
            x = np.load(path)
            out[at : at + len(x)], at = x, at + len(x)
            os.remove(path)
        out.flush()
        del out
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump({**key, "info": info}, f)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_study(root, split, modalities, dims, image_size, crop, cache_dir, min_brain=0.05, verbose=True):
    """(tensor float32 [N, M, S, S] (dims 2: kept axial slices) or [N, M, d, h, w] (dims 3: volumes cropped/padded
    to crop), info [dict(subject, affine (4x4 canonical), spacing (3,) [D, H, W] mm, slice (2D: index after crop))])
    of one split, images in [0, 1] and seg in {0, 1}. crop: () none, else (d, h, w) applied to every volume before
    slicing. Cached in cache_dir/mri-<hash of the files and settings> (.npy + info.json): built once by one process
    (an fcntl lock; the others wait, then read), as load_eeg does. 3D needs one shape for all: a crop, or equal
    volumes."""
    common.check(dims in (2, 3), f"dims {dims}: expected 2 or 3")
    common.check(split in _SPLITS, f"split {split!r}: expected one of {', '.join(_SPLITS)}")
    subjects = [s for s in find_subjects(root, modalities) if s["split"] == split]
    common.check(subjects, f"no {split} subjects in {root}")
    crop = tuple(int(c) for c in crop)
    key = _mri_cache_key(root, subjects, modalities, dims, image_size, crop, min_brain)
    folder = os.path.join(cache_dir, "mri-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
    built, start = False, time.time()
    if not os.path.isdir(folder):
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with open(folder + ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process is killed
                if not os.path.isdir(folder):  # another process may have built it while this one waited
                    _build_mri(subjects, folder, key, modalities, dims, image_size, crop, min_brain, verbose)
                    built = True
        except OSError as e:
            common.die(f"cannot write the MRI cache in {cache_dir} ({e.strerror or e}); choose a writable cache dir")
    try:
        data = torch.from_numpy(np.load(os.path.join(folder, "data.npy")))
        with open(os.path.join(folder, "info.json")) as f:
            info = json.load(f)["info"]
    except (OSError, ValueError, KeyError) as e:
        common.die(f"the MRI cache {folder} is unreadable ({' '.join(str(e).split())}); delete it to rebuild")
    for row in info:
        row["affine"], row["spacing"] = np.array(row["affine"]), np.array(row["spacing"])
    if verbose:
        how = "built" if built else "read"
        print(
            f"MRI {split}: {tuple(data.shape)} from {len(subjects)} subjects ({how} {folder}, {time.time() - start:.1f} s)"
        )
    return data, info


# ----------------------------------------------------------------------------------------------------------------
# Spaces: pixel, space-to-depth, Haar wavelet (each an exact inverse pair)
# ----------------------------------------------------------------------------------------------------------------


def _blocks_pattern(dims):
    """The einops pattern that cuts each 2 x 2 (x 2) block out of [B, C, *spatial] into an axis j of 4 (8) entries,
    ordered with the first spatial axis most significant (j = 2 o + q in 2D, 4 o + 2 p + q in 3D)."""
    if dims == 2:
        return "b c (h p) (w q) -> b c (p q) h w"
    return "b c (d o) (h p) (w q) -> b c (o p q) d h w"


def _check_even(x, space):
    """One-line stop unless x is [B, C, *spatial] with 2 or 3 even spatial sides."""
    dims = x.ndim - 2
    common.check(dims in (2, 3), f"space={space} needs [B, C, H, W] or [B, C, D, H, W] tensors, got {tuple(x.shape)}")
    common.check(all(s % 2 == 0 for s in x.shape[2:]), f"space={space} needs even sides, got {tuple(x.shape[2:])}")
    return dims


def haar_matrix(dims, dtype=torch.float32, device=None):
    """The orthonormal one-level Haar analysis matrix (Haar 1910; Mallat 1989) for 2 x 2 (x 2) blocks, (2^dims,
    2^dims): the Kronecker product over the axes of h = [[1, 1], [1, -1]] / sqrt(2). Row k is sub-band k, its bits
    (first axis most significant) 0 = low-pass, 1 = high-pass: 2D LL, LH, HL, HH; 3D LLL, LLH, ..., HHH.
    Orthonormal, so the inverse is the transpose."""
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2.0)
    m = h
    for _ in range(dims - 1):
        m = torch.kron(m, h)
    return m.to(dtype=dtype, device=device)


def to_space(x, space, stats=None):
    """Map images [B, C, *spatial] to the diffusion space. "pixel": unchanged. "s2d": space-to-depth (pixel unshuffle)
    of 2 x 2 (x 2) blocks, [B, C * 2^dims, *spatial / 2], channel = c * 2^dims + j. "wavelet": one level of the
    orthonormal Haar transform (Haar 1910; Mallat 1989), z_k = sum_j haar[k, j] x_j over each block, sub-bands as
    channels [B, 2^dims * C, *spatial / 2] with channel = k * C + c (sub-band major, LL first), each sub-band then
    divided by stats[k] (its std on the training data, `wavelet_stats`); stats=None leaves it unnormalised.
    stats is ignored by "pixel" and "s2d"."""
    if space == "pixel":
        return x
    dims = _check_even(x, space)
    blocks = rearrange(x, _blocks_pattern(dims), p=2, q=2, **({"o": 2} if dims == 3 else {}))  # (B, C, J, *s/2)
    if space == "s2d":
        return rearrange(blocks, "b c j ... -> b (c j) ...")
    common.check(space == "wavelet", f"unknown space {space!r}; choose pixel, s2d or wavelet")
    z = torch.einsum("kj,bcj...->bkc...", haar_matrix(dims, x.dtype, x.device), blocks)  # (B, K, C, *s/2)
    if stats is not None:
        z = z / _band_scale(stats, dims, z)
    return rearrange(z, "b k c ... -> b (k c) ...")


def from_space(z, space, stats=None):
    """The exact inverse of `to_space`: multiply each wavelet sub-band back by stats[k], then apply the transposed
    Haar matrix (orthonormal: inverse = transpose), or undo the space-to-depth; "pixel" returns z unchanged."""
    if space == "pixel":
        return z
    common.check(space in ("s2d", "wavelet"), f"unknown space {space!r}; choose pixel, s2d or wavelet")
    dims = z.ndim - 2
    common.check(dims in (2, 3), f"space={space} needs [B, C, H, W] or [B, C, D, H, W] tensors, got {tuple(z.shape)}")
    n = 2**dims
    common.check(z.shape[1] % n == 0, f"space={space} needs a multiple of {n} channels, got {z.shape[1]}")
    if space == "s2d":
        blocks = rearrange(z, "b (c j) ... -> b c j ...", j=n)
    else:
        z = rearrange(z, "b (k c) ... -> b k c ...", k=n)  # (B, K, C, *s/2)
        if stats is not None:
            z = z * _band_scale(stats, dims, z)
        blocks = torch.einsum("kj,bkc...->bcj...", haar_matrix(dims, z.dtype, z.device), z)  # haar^T
    inverse = " -> ".join(reversed(_blocks_pattern(dims).split(" -> ")))
    return rearrange(blocks, inverse, p=2, q=2, **({"o": 2} if dims == 3 else {}))


def _band_scale(stats, dims, z):
    """stats (2^dims positive floats) as a tensor broadcasting over (B, K, C, *spatial)."""
    n = 2**dims
    common.check(len(stats) == n, f"wavelet stats need {n} sub-band stds for {dims}D, got {len(stats)}")
    common.check(all(s > 0 for s in stats), f"wavelet stats must be positive, got {list(stats)}")
    return torch.tensor(stats, dtype=z.dtype, device=z.device).view(1, n, *([1] * (z.ndim - 2)))


def wavelet_stats(x, batch=64):
    """Per-sub-band std of the Haar coefficients (Haar 1910; Mallat 1989) of training images x [N, C, *spatial]
    (model range), pooled over samples, channels and positions: a list of 2^dims floats, LL first, for
    `to_space(..., "wavelet", stats)`. A std below 1e-6 (a band that is constant, e.g. on blank data) is raised
    to 1e-6 so the normalisation stays finite."""
    dims = _check_even(torch.as_tensor(x[:1]), "wavelet")
    n = 2**dims
    total, total_sq, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), 0
    for i in range(0, len(x), batch):
        z = to_space(torch.as_tensor(x[i : i + batch]).double(), "wavelet")
        z = rearrange(z, "b (k c) ... -> k (b c ...)", k=n).cpu()
        total, total_sq, count = total + z.sum(1), total_sq + (z * z).sum(1), count + z.shape[1]
    var = (total_sq / count - (total / count) ** 2).clamp(min=0)
    return [max(float(s), 1e-6) for s in var.sqrt()]


# ----------------------------------------------------------------------------------------------------------------
# ScoreAug (Hou et al. 2025): one transform per sample on x_t and the target together, encoded as omega
# ----------------------------------------------------------------------------------------------------------------


def omega_dim():
    """K = 15, the length of ScoreAug's omega: one-hot kind (identity, rot90, flip, translate, cutout) [0:5], rot90
    k / 3 [5], flip axis one-hot [6:9], shift / max shift in [-1, 1] per axis [9:12], cutout box start / (side -
    box) in [0, 1] per axis [12:15]. Per-axis slots are aligned to the last axis (2D H, W use slots 1, 2 of 3;
    3D D, H, W all three), so K is the same in 2D and 3D; unused slots are 0."""
    return 15


def _draw_aug(r, spatial, p):
    """(kind, params, omega list) of one ScoreAug transform from uniforms r (5,) for a sample of sides `spatial`:
    with probability 1 - p identity, else rot90 / flip / translate / cutout with equal chance."""
    dims, omega = len(spatial), [0.0] * omega_dim()
    kind = 0 if r[0] >= p else 1 + min(int(r[1] * 4), 3)
    slot = 3 - dims  # the first per-axis slot used
    params = None
    if kind == 1:  # rot90 in the axial (H, W) plane; a non-square plane only allows k = 2 (the shape must stay)
        params = 1 + min(int(r[2] * 3), 2) if spatial[-1] == spatial[-2] else 2
        omega[5] = params / 3
    elif kind == 2:  # flip one spatial axis
        params = min(int(r[2] * dims), dims - 1)
        omega[6 + slot + params] = 1.0
    elif kind == 3:  # translate every axis by up to 1/8 of its side (circular, torch.roll)
        params = [round((2 * r[2 + i] - 1) * (s // 8)) for i, s in enumerate(spatial)]
        for i, s in enumerate(spatial):
            omega[9 + slot + i] = params[i] / max(s // 8, 1)
    elif kind == 4:  # cutout: a zeroed box of 1/4 side, fully inside
        box = [max(s // 4, 1) for s in spatial]
        start = [min(int(r[2 + i] * (s - b + 1)), s - b) for i, (s, b) in enumerate(zip(spatial, box))]
        params = (start, box)
        for i, (s, b) in enumerate(zip(spatial, box)):
            omega[12 + slot + i] = start[i] / max(s - b, 1)
    omega[kind] = 1.0
    return kind, params, omega


def _apply_aug(v, kind, params):
    """Apply one drawn ScoreAug transform to a sample v [C, *spatial]."""
    dims = v.ndim - 1
    if kind == 1:
        return torch.rot90(v, params, dims=(-2, -1))
    if kind == 2:
        return torch.flip(v, dims=(1 + params,))
    if kind == 3:
        return torch.roll(v, shifts=params, dims=tuple(range(1, 1 + dims)))
    if kind == 4:
        v = v.clone()
        start, box = params
        v[(slice(None),) + tuple(slice(a, a + b) for a, b in zip(start, box))] = 0
    return v


def score_aug(x_t, target, generator, dims, p=0.5):
    """ScoreAug (Hou et al. 2025): per sample one transform T, applied identically to the noisy input and the
    target, (T(x_t), T(target), omega (B, K)). With probability 1 - p T is the identity, else one of rot90 (k in
    {1, 2, 3}, the axial H-W plane), a flip of one spatial axis, a translation by up to 1/8 of each side (circular,
    torch.roll: a departure from zero-filled shifts, so no content is invented at the border) or a cutout (a box of
    1/4 side set to 0 in both). omega encodes T (layout in `omega_dim`, K = 15) for the zero-initialised condition
    MLP; sampling uses omega = 0 (no transform). Random draws come from `generator` only."""
    common.check(x_t.shape == target.shape, f"score_aug: x_t {tuple(x_t.shape)} and target {tuple(target.shape)}")
    common.check(x_t.ndim == dims + 2, f"score_aug: dims={dims} needs [B, C, *spatial], got {tuple(x_t.shape)}")
    device = generator.device if generator is not None else "cpu"
    uniforms = torch.rand(x_t.shape[0], 5, generator=generator, device=device).tolist()
    outs_x, outs_t, omegas = [], [], []
    for r, v, y in zip(uniforms, x_t, target):
        kind, params, omega = _draw_aug(r, tuple(x_t.shape[2:]), p)
        outs_x.append(_apply_aug(v, kind, params))
        outs_t.append(_apply_aug(y, kind, params))
        omegas.append(omega)
    omega = torch.tensor(omegas, dtype=x_t.dtype, device=x_t.device)
    return torch.stack(outs_x), torch.stack(outs_t), omega


# ----------------------------------------------------------------------------------------------------------------
# Region-aware tumour metrics (RANO-BM size classes, Lin et al. 2015)
# ----------------------------------------------------------------------------------------------------------------


def _numpy(x):
    """A numpy array of a numpy array or a (possibly CUDA, possibly grad-tracking) tensor."""
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def rano_class(d):
    """RANO-BM size class (Lin et al. 2015, Lancet Oncol.) of a longest diameter d in mm: "tiny" < 10 (below the
    measurable-disease threshold), "small" 10-20, "medium" 20-30, "large" >= 30."""
    if d < 10:
        return "tiny"
    if d < 20:
        return "small"
    if d < 30:
        return "medium"
    return "large"


def feret_mm(points):
    """Maximum Feret diameter: the largest pairwise distance between points (N, dims) in mm; for many points only
    the convex-hull vertices are compared (the farthest pair lies on the hull); a flat point set falls back to all
    pairs."""
    if len(points) < 2:
        return 0.0
    if len(points) > 512:
        try:
            points = points[scipy.spatial.ConvexHull(points).vertices]
        except scipy.spatial.QhullError:  # coplanar / collinear: the hull is not full-dimensional
            pass
    return float(scipy.spatial.distance.pdist(points).max())


def tumour_labels(mask):
    """int label map of the connected components of mask > 0.5 (scipy.ndimage.label): 8-connectivity for a slice
    [H, W], 26-connectivity for a volume [D, H, W]."""
    mask = _numpy(mask) > 0.5
    return scipy.ndimage.label(mask, structure=np.ones((3,) * mask.ndim))[0]


def components(mask, spacing, min_area=5):
    """Connected tumour components of a binary mask (scipy.ndimage.label): a 2D slice [H, W] with 8-connectivity, a
    volume [D, H, W] with 26-connectivity; spacing gives mm per axis (its last mask.ndim entries are used).
    Components of fewer than min_area voxels are dropped (noise). Each: dict(voxels, feret_mm, rano, label) with
    feret_mm the largest distance between boundary voxel centres in mm (it reads up to one voxel short of the
    edge-to-edge size), rano its `rano_class`, label its id in `tumour_labels(mask)`."""
    labels = tumour_labels(mask)
    spacing = np.asarray(spacing, dtype=np.float64)[-labels.ndim :]
    found = []
    for i, box in enumerate(scipy.ndimage.find_objects(labels), start=1):
        region = labels[box] == i
        voxels = int(region.sum())
        if voxels < min_area:
            continue
        boundary = region & ~scipy.ndimage.binary_erosion(region, border_value=0)
        offset = np.array([s.start for s in box])
        d = feret_mm((np.argwhere(boundary) + offset) * spacing)
        found.append({"voxels": voxels, "feret_mm": d, "rano": rano_class(d), "label": i})
    return found


def region_errors(pred, real, mask, spacing, min_area=5):
    """Mean absolute error of pred against real (same shape, [H, W] or [D, H, W]) inside the tumour, per RANO-BM size
    class of its connected component (`components`), over all tumour voxels ("tumour", including components under
    min_area) and outside ("outside"). Returns dict with "mae_<region>" (NaN where a region is empty) and
    "n_<region>" voxel counts, so a test set can be pooled as sum(mae * n) / sum(n)."""
    pred, real = _numpy(pred).astype(np.float64), _numpy(real).astype(np.float64)
    common.check(pred.shape == real.shape, f"region_errors: pred {pred.shape} and real {real.shape} differ")
    err = np.abs(pred - real)
    labels = tumour_labels(mask)
    found = components(mask, spacing, min_area)
    regions = {name: np.zeros(err.shape, bool) for name in ("tiny", "small", "medium", "large")}
    for c in found:
        regions[c["rano"]] |= labels == c["label"]
    regions["tumour"], regions["outside"] = labels > 0, labels == 0
    out = {}
    for name, where in regions.items():
        n = int(where.sum())
        out[f"mae_{name}"] = float(err[where].mean()) if n else float("nan")
        out[f"n_{name}"] = n
    return out


# ----------------------------------------------------------------------------------------------------------------
# Image quality: PSNR, SSIM, MS-SSIM (per sample)
# ----------------------------------------------------------------------------------------------------------------


def psnr(a, b, data_range=2.0):
    """Peak signal-to-noise ratio per sample (B,) of a, b [B, C, *spatial]: 10 log10(data_range^2 / MSE); the MSE is
    floored at 1e-10 so identical images give a finite value (106 dB at data_range 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(data_range**2 / mse)


def _win_size(side, largest=11):
    """The Gaussian window (odd) for SSIM at a smallest side `side`: `largest`, or the largest odd size <= side."""
    return max(1, min(largest, side if side % 2 else side - 1))


def ssim(a, b, data_range=2.0):
    """SSIM (Wang et al. 2004, IEEE TIP) per sample (B,) of a, b [B, C, H, W] or [B, C, D, H, W] via pytorch_msssim:
    Gaussian window sigma 1.5 of size 11, or the largest odd size that fits the smallest side."""
    win = _win_size(min(a.shape[2:]))
    return pytorch_msssim.ssim(a.float(), b.float(), data_range=data_range, size_average=False, win_size=win)


def _gaussian_blur(x, win_size, sigma=1.5):
    """Valid-mode separable Gaussian filter over every spatial axis of x [B, C, *spatial] (as pytorch_msssim does)."""
    g = torch.arange(win_size, dtype=x.dtype, device=x.device) - win_size // 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    dims, c = x.ndim - 2, x.shape[1]
    conv = F.conv2d if dims == 2 else F.conv3d
    for axis in range(dims):
        shape = [c, 1] + [1] * dims
        shape[2 + axis] = win_size
        x = conv(x, g.view(shape), groups=c)
    return x


def _ssim_cs(a, b, win_size, data_range, k1=0.01, k2=0.03):
    """(SSIM, contrast-structure cs) per (B, C) (Wang et al. 2004 eq. 13; 2003 eq. 3), pytorch_msssim's formula."""
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = _gaussian_blur(a, win_size), _gaussian_blur(b, win_size)
    var_a = _gaussian_blur(a * a, win_size) - mu_a**2
    var_b = _gaussian_blur(b * b, win_size) - mu_b**2
    cov = _gaussian_blur(a * b, win_size) - mu_a * mu_b
    cs_map = (2 * cov + c2) / (var_a + var_b + c2)
    ssim_map = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def ms_ssim_scales(side):
    """(win_size, weights) of MS-SSIM for a smallest spatial side `side`: win 11 when side >= 176 (5 scales of 11+),
    else 7; then as many scales (<= 5) as keep the coarsest side >= win, with the first weights of Wang et al. 2003
    (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), renormalised to sum 1 when fewer than 5 (all 5 kept as published, as
    pytorch_msssim does). 128 px: win 7 and 5 scales, 64: 7 and 4, 32: 7 and 3, 16: 7 and 2."""
    win = 11 if side >= 176 else _win_size(side, 7)
    levels = 1
    while levels < 5 and math.ceil(side / 2**levels) >= win:
        levels += 1
    weights = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]
    return win, weights if levels == 5 else [w / sum(weights[:levels]) for w in weights[:levels]]


def ms_ssim(a, b, data_range=2.0):
    """MS-SSIM (Wang et al. 2003) per sample (B,) of a, b [B, C, H, W] or [B, C, D, H, W]: prod_j cs_j^w_j over the
    finer scales times SSIM^w_M at the coarsest, 2x average pooling between scales, scales and window from
    `ms_ssim_scales` (smallest side over all spatial axes). The scale loop is written here because
    pytorch_msssim.ms_ssim asserts side > 16 (win - 1) whatever the number of scales; where it applies, the two agree
    (tests)."""
    common.check(a.shape == b.shape, f"ms_ssim: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a, b = a.float(), b.float()
    win, weights = ms_ssim_scales(min(a.shape[2:]))
    pool = F.avg_pool2d if a.ndim == 4 else F.avg_pool3d
    values = []
    for level in range(len(weights)):
        s, cs = _ssim_cs(a, b, win, data_range)
        values.append(torch.relu(cs if level < len(weights) - 1 else s))
        if level < len(weights) - 1:
            padding = [n % 2 for n in a.shape[2:]]
            a, b = pool(a, kernel_size=2, padding=padding), pool(b, kernel_size=2, padding=padding)
    w = torch.tensor(weights, dtype=a.dtype, device=a.device).view(-1, 1, 1)
    return torch.prod(torch.stack(values) ** w, dim=0).mean(1)


# ----------------------------------------------------------------------------------------------------------------
# NIfTI and montages
# ----------------------------------------------------------------------------------------------------------------


def write_nifti(path, volume, affine):
    """Write volume [D, H, W] (D the superior-inferior axis) as a float32 .nii.gz whose voxel axes are canonical RAS+
    (x, y, z) = (W, H, D): the transpose (2, 1, 0) of the reading convention, so `read_nifti` (and any viewer) gets
    it back. `affine` is the canonical (RAS+) voxel-to-world matrix the volume was read with."""
    volume, affine = _numpy(volume), np.asarray(affine, dtype=np.float64)
    common.check(volume.ndim == 3, f"write_nifti {path}: a volume is [D, H, W], got shape {volume.shape}")
    common.check(affine.shape == (4, 4), f"write_nifti {path}: the affine must be 4 x 4, got {affine.shape}")
    axes = nib.aff2axcodes(affine)
    common.check(axes == ("R", "A", "S"), f"write_nifti {path}: affine is {''.join(axes)}, not canonical RAS")
    img = nib.Nifti1Image(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        nib.save(img, path)
    except OSError as e:
        common.unwritable(path, e)


def read_nifti(path):
    """(volume float32 [D, H, W], canonical affine (4, 4)) of a NIfTI file: reoriented to RAS+ with
    nibabel.as_closest_canonical, then transposed (2, 1, 0) so axis 0 is the superior-inferior (axial) axis."""
    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises several types for non-NIfTI or truncated files
        common.die(f"cannot read {path} as NIfTI ({type(e).__name__}: {e})")
    common.check(data.ndim == 3, f"{path} is not a 3D volume (shape {data.shape})")
    return np.ascontiguousarray(data.transpose(2, 1, 0)), img.affine


def montage(volume, n=16, value_range=None):
    """A uint8 (H', W', 3) grid of n evenly spaced axial slices (the centres of n equal slabs along D) of a volume
    [D, H, W] (ceil(sqrt(n)) per row) or [C, D, H, W] (one row per channel), via common.image_grid. Intensities are
    mapped linearly from value_range (default: the volume's min and max) to black-white."""
    v = _numpy(volume).astype(np.float32)
    common.check(v.ndim in (3, 4), f"montage needs [D, H, W] or [C, D, H, W], got shape {v.shape}")
    v = v[None] if v.ndim == 3 else v
    n = min(n, v.shape[1])
    lo, hi = value_range if value_range is not None else (float(v.min()), float(v.max()))
    idx = ((np.arange(n) + 0.5) * v.shape[1] / n).astype(int)
    slices = torch.from_numpy(rearrange(v[:, idx], "c n h w -> (c n) 1 h w").copy())
    slices = ((slices - lo) / max(hi - lo, 1e-12) * 2 - 1).clamp(-1, 1)
    return common.image_grid(slices, nrow=math.ceil(math.sqrt(n)) if len(v) == 1 else n)


# ----------------------------------------------------------------------------------------------------------------
# Modes, spaces and conditions
# ----------------------------------------------------------------------------------------------------------------


def mode_files(mode):
    """The modalities read for `mode`: the generated ones, then seg when the mode is conditioned on the mask; mask
    modes also read bravo, only to keep the slices that hold brain."""
    generated, masked = _MODALITIES[mode]
    return generated + (("seg",) if masked else ("bravo",) if generated == ("seg",) else ())


def spatial_shape(config):
    """The pixel-space spatial shape of one sample: (S, S) in 2D, the crop in 3D."""
    return (config["image_size"],) * 2 if config["dims"] == 2 else tuple(config["crop"])


def space_factor(config):
    """How many channels one pixel-space channel (the mask's) becomes, and the spatial downsampling of the space
    (latent: the autoencoder's factor; the mask is average-pooled to one channel, see mask_in_space)."""
    if config["space"] == "latent":
        return 1, spatial_shape(config)[-1] // config["latent_shape"][-1]
    return (1, 1) if config["space"] == "pixel" else (2 ** config["dims"], 2)


def diffusion_shape(config):
    """(channels, *spatial) of one sample where diffusion runs: the generated modalities moved into the space, or the
    autoencoder's latent (config["latent_shape"], set by latent_autoencoder)."""
    if config["space"] == "latent":
        return tuple(config["latent_shape"])
    n_gen, (factor, down) = len(_MODALITIES[config["mode"]][0]), space_factor(config)
    return (n_gen * factor, *[s // down for s in spatial_shape(config)])


def mask_in_space(mask, config):
    """The tumour mask [B, 1, *spatial] in {-1, 1} at the diffusion space's resolution, for `concat`: as it is
    (pixel), space-to-depth (s2d, wavelet: 2^dims channels, exact), or average-pooled by the autoencoder's factor
    (latent: one channel in [-1, 1], the tumour fraction of each latent cell; the mask is not encoded, the
    autoencoder never saw masks)."""
    if mask is None or config["space"] == "pixel":
        return mask
    if config["space"] == "latent":
        pool = F.avg_pool2d if config["dims"] == 2 else F.avg_pool3d
        return pool(mask, space_factor(config)[1])
    return to_space(mask, "s2d")


def size_histogram(mask, spacing, dims):
    """seg_sized's condition: the number of tumour components per RANO-BM class (Lin et al. 2015) of a binary
    mask [*spatial] with voxel `spacing` mm, as log(1 + count) (4,), so one and several lesions stay comparable."""
    counts = np.zeros(len(_RANO), dtype=np.float32)
    for component in components(mask, spacing, min_area=5):
        counts[_RANO.index(component["rano"])] += 1
    return np.log1p(counts)


def split_sample(x, config):
    """A [N, M, *spatial] tensor in [0, 1] -> (the generated modalities in [-1, 1], the mask in {-1, 1} or None)."""
    n_gen = len(_MODALITIES[config["mode"]][0])
    masked = _MODALITIES[config["mode"]][1]
    return x[:, :n_gen] * 2 - 1, (x[:, n_gen : n_gen + 1] * 2 - 1 if masked else None)


def make_cond(concat, vector, drop, config, omega=None):
    """The model's cond: the mask already in the diffusion space (mask_in_space) as `concat`, seg_sized's size
    histogram and ScoreAug's transform code as one `vector`, and the CFG `drop` flags; None when there is nothing to
    condition on."""
    cond = {}
    if concat is not None:
        cond["concat"] = concat
    parts = [v for v in (vector, omega) if v is not None]
    if parts:
        cond["vector"] = torch.cat(parts, dim=1)
    return {**cond, "drop": drop} if cond else None


def vector_dim(config):
    return len(_RANO) * (config["mode"] == "seg_sized") + _OMEGA * config["score_aug"]


def model_kwargs(config):
    """What models.make_model needs beyond name and preset, from the resolved config."""
    kw = {"in_channels": diffusion_shape(config)[0], "dims": config["dims"]}
    if _MODALITIES[config["mode"]][1]:
        kw["concat_channels"] = space_factor(config)[0]
    if vector_dim(config):
        kw["vector_dim"] = vector_dim(config)
    if config["model"] == "unet":
        kw["checkpointing"] = config["checkpointing"]
        if config["width"] > 0:
            kw["channels"] = config["width"]
    else:
        kw["patch"] = config["patch"]
        widths = models.MODELS[config["model"]].PRESETS.get(config["size"], {}).get("widths")
        if config["width"] > 0 and widths:
            kw["widths"] = [config["width"] * w // widths[0] for w in widths]
        elif config["width"] > 0:
            kw["dim"] = config["width"]
    if config["model"] == "uvit":
        kw["input_size"] = list(diffusion_shape(config)[1:])
    return kw


def build_model(config):
    try:
        model = models.make_model(config["model"], config["size"], **config["model_kw"])
    except (ValueError, TypeError) as e:
        common.die(f"cannot build model={config['model']} size={config['size']}: {e}")
    if config["score_aug"]:  # ScoreAug's condition enters through a zero-initialised path (Hou et al. 2025)
        torch.nn.init.zeros_(model.cond_embed.vector_mlp[-1].weight)
        torch.nn.init.zeros_(model.cond_embed.vector_mlp[-1].bias)
    return model


def sampling_for(config, opts=None):
    """(sampler, common.sample keywords) of a run, or with `opts` of an evaluation's SAMPLER / GRID / T_MIN: ddpm
    snaps every time to its 1000 training steps, rflow shifts the grid by r; checkpoints from before the grids
    existed sampled with DDIM (ddpm) or Euler (rflow) on the uniform grid to t = 0."""
    o = opts or {}
    legacy = "ddim" if config["strategy"] == "ddpm" else "euler"
    sampler, options = common.sampling_settings(
        config, o.get("sampler", ""), o.get("grid", ""), o.get("t_min", -1.0), legacy
    )
    if config["strategy"] == "ddpm":
        options["t_steps"] = 1000
    else:
        options["shift"] = strategy(config)[2]
    return sampler, options


def check_shapes(config):
    """Build on the meta device and run one sample through, so a crop / size / patch / space that the backbone's
    downsampling cannot divide stops with one line before any data is read."""
    sampler, options = sampling_for(config)
    steps, t_steps = config["sample_steps"], options.get("t_steps", 0)
    common.check_sampling(sampler, options["grid"], options["t_min"], common.DETERMINISTIC, steps, t_steps)
    common.check(
        len(config["crop"]) == 3, f"crop={tuple(config['crop'])}: give three sizes (D, H, W), e.g. crop=(64,96,96)"
    )
    shape = spatial_shape(config)
    down = space_factor(config)[1]  # latent: load_autoencoder has checked the sides against its factor
    common.check(all(s % down == 0 for s in shape), f"space={config['space']} halves every side: {shape} must be even")
    with torch.device("meta"):
        model = build_model(config)
        common.check_fits(sum(p.numel() for p in model.parameters()), f"model={config['model']} size={config['size']}")
        x = torch.zeros(1, *diffusion_shape(config))
        mask = torch.zeros(1, 1, *shape) if _MODALITIES[config["mode"]][1] else None
        vector = torch.zeros(1, vector_dim(config)) if vector_dim(config) else None
        drop = torch.zeros(1, dtype=torch.bool)
        try:
            with torch.device("cpu"):
                cond = make_cond(mask_in_space(mask, config), vector, drop, config)
            cond = None if cond is None else {k: v.to("meta") for k, v in cond.items()}
            model(x, torch.zeros(1), cond=cond)
        except (ValueError, RuntimeError) as e:
            what = f"dims={config['dims']} " + (f"image_size={shape[0]}" if config["dims"] == 2 else f"crop={shape}")
            what += f" (latent {diffusion_shape(config)})" if config["space"] == "latent" else ""
            common.die(
                f"model={config['model']} cannot take {what} in space={config['space']}: {common.error_detail(e)}"
            )


# ----------------------------------------------------------------------------------------------------------------
# Strategies: DDPM and rectified flow
# ----------------------------------------------------------------------------------------------------------------


def strategy(config):
    """(schedule, prediction, resolution-shift ratio r) of the config's strategy."""
    if config["strategy"] == "ddpm":
        return common.Schedule("cosine"), "eps", 1.0
    # the side of the grid the noise acts on (Esser et al.'s argument for eq. 23 counts the diffused values): the
    # pixels for pixel / s2d / wavelet (rearrangements of them); in a latent run the latent grid, whose cells are not
    # redundant copies of their factor^dims pixels. SHIFT_BASE is then a latent side (128 px at f4: r = 32 / 64).
    latent = config.get("space") == "latent"
    side = float(np.prod(diffusion_shape(config)[1:] if latent else spatial_shape(config))) ** (1 / config["dims"])
    r = common.shift_ratio(side ** config["dims"], config["shift_base"] ** config["dims"], config["dims"])
    return common.Schedule("flow"), "flow", r


def training_loss(model, x0, mask, vector, config, gen):
    """DDPM (Ho et al. 2020, arXiv:2006.11239): t = i / 1000, eps target, cosine schedule; or rectified flow (Liu et
    al. 2022, arXiv:2209.03003): logit-normal t with the resolution shift (Esser et al. 2024, arXiv:2403.03206
    eq. 23), velocity target. Min-SNR-gamma weight (Hang et al. 2023, arXiv:2303.09556) when gamma > 0; ScoreAug
    (Hou et al. 2025) transforms x_t, the target and the mask together. x0: the generated modalities in [-1, 1], or
    in a latent run their cached scaled latents; mask in pixels. -> (mean, per-sample loss (B,), t (B,))."""
    schedule, prediction, r = strategy(config)
    B, dev = x0.shape[0], x0.device
    if config["strategy"] == "ddpm":
        t = torch.randint(1, 1001, (B,), generator=gen, device=dev).float() / 1000
    else:
        t = common.sample_t(B, "logit_normal", gen, dev, shift=r)
    z0 = x0 if config["space"] == "latent" else to_space(x0, config["space"], config.get("wavelet_stats"))
    concat = mask_in_space(mask, config)
    eps = torch.randn(z0.shape, generator=gen, device=dev)
    drop = torch.rand(B, generator=gen, device=dev) < config["label_drop"]
    z_t = common.add_noise(z0, eps, t, schedule)
    target = common.prediction_target(prediction, z0, eps, t, schedule)
    omega = None
    if config["score_aug"]:
        z_t, target, concat, omega = augment(z_t, target, concat, drop, config, gen)
    pred = model(z_t, t, cond=make_cond(concat, vector, drop, config, omega))
    weight = (
        common.loss_weight("min_snr", t, schedule, prediction, config["min_snr_gamma"])
        if config["min_snr_gamma"] > 0
        else 1.0
    )
    per_sample = weight * (pred.float() - target).pow(2).flatten(1).mean(1)
    return per_sample.mean(), per_sample, t


def augment(z_t, target, concat, drop, config, gen):
    """ScoreAug on the noisy input, the target and the mask (in the diffusion space: mask_in_space) as one tensor, so
    they move together (in a latent run on the latent grid); samples whose condition is dropped keep the identity
    (their transform code would be dropped with it)."""
    n = z_t.shape[1]
    stacked = torch.cat([z_t, target] + ([concat] if concat is not None else []), dim=1)
    moved, _, omega = score_aug(stacked, stacked, gen, config["dims"])
    keep = drop.view(-1, *[1] * (stacked.ndim - 1))
    moved, omega = torch.where(keep, stacked, moved), omega.masked_fill(drop[:, None], 0.0)  # 0: the identity
    return moved[:, :n], moved[:, n : 2 * n], None if concat is None else moved[:, 2 * n :], omega


@torch.no_grad()
def generate(model, mask, vector, seeds, config, guidance, steps, callback=None, ae=None, sampling=None):
    """Samples in pixel space [B, n_gen, *spatial] in [-1, 1] for the masks / vectors given (B rows): the run's
    sampler and grid (`sampling` = sampling_for(config, opts) replaces them), with classifier-free guidance at
    `guidance`; a latent run's samples are decoded by its autoencoder `ae`."""
    device = next(model.parameters()).device
    schedule, prediction, r = strategy(config)
    noise = common.seeded_noise(seeds, diffusion_shape(config), device)
    B = len(noise)
    drop = torch.zeros(B, dtype=torch.bool, device=device)
    omega = torch.zeros(B, _OMEGA, device=device) if config["score_aug"] else None
    cond = make_cond(mask_in_space(mask, config), vector, drop, config, omega)
    if cond is None:
        fn = lambda x, t: model(x, t)
    else:
        fn = common.cfg_model(model, cond, {**cond, "drop": ~drop}, guidance)
    denoise = common.make_denoiser(fn, schedule, prediction)
    sampler, options = sampling or sampling_for(config)
    z = common.sample(sampler, denoise, noise, steps, schedule, callback=callback, **options)
    return to_pixels(z, config, ae)


def to_pixels(z, config, ae=None):
    """Diffusion-space samples -> pixel space in [-1, 1]: from_space, or in a latent run the autoencoder's decoder
    (of the latents divided by their scale)."""
    if config["space"] != "latent":
        return from_space(z, config["space"], config.get("wavelet_stats")).clamp(-1, 1)
    import train_vae  # here, not at the top: train_vae imports this module

    return train_vae.decode(ae, z, config["latent_space"]["scale"]).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Data in model terms, diagnostics
# ----------------------------------------------------------------------------------------------------------------


def study_root(config, is_main):
    """DATA, or the demo study in DEMO_DIR, built by the main process when it is missing or half written."""
    if config["data"]:
        return config["data"]
    root = config["demo_dir"]
    if is_main and not os.path.isfile(os.path.join(root, ".complete")):
        print(f"building the demo study (real MNI152 anatomy, SYNTHETIC subjects and lesions) in {root}", flush=True)
        make_demo_study(root)
    return root


def prepare(config, root, split, verbose=True):
    """One split in model terms: (x float32 [N, M, *spatial] in [0, 1] (the generated modalities, then the mask),
    size histograms (N, 4) for seg_sized or None, per-sample info (subject, affine, spacing, slice))."""
    crop = tuple(config["crop"]) if config["dims"] == 3 else ()  # 2D: whole slices, padded square and resized
    x, info = load_study(
        root,
        split,
        mode_files(config["mode"]),
        config["dims"],
        config["image_size"],
        crop,
        config["cache_dir"],
        verbose=verbose,
    )
    common.check(
        len(x) > 0, f"{root}: the {split} split has no {'slices with brain' if config['dims'] == 2 else 'volumes'}"
    )
    vectors = None
    if config["mode"] == "seg_sized":
        vectors = torch.as_tensor(
            np.stack(
                [
                    size_histogram(s[-1].numpy() > 0.5, sample_spacing(i, config), config["dims"])
                    for s, i in zip(x, info)
                ]
            )
        )
    return x, vectors, info


@torch.no_grad()
def diagnostics(ema_model, fixed, config, out_dir, step, ae=None):
    """From EMA weights with fixed seeds: rows of [mask | generated | real] montages (2D: slices side by side) and
    the denoising trajectory of the first sample, plus the training loss by noise level (a latent run's samples and
    trajectory decoded by its autoencoder `ae`)."""
    prefix = os.path.join(out_dir, "samples", f"step_{step:07d}")
    x, vectors = fixed
    real, mask = split_sample(x, config)
    trajectory = []
    keep = lambda i, t, z, z0: trajectory.append(to_pixels(z0[:1], config, ae))
    steps = config["sample_steps"]
    fake = generate(ema_model, mask, vectors, range(len(x)), config, config["guidance"], steps, keep, ae)
    panels = [p for p in (mask, fake, real) if p is not None]
    save_panels(panels, prefix + "_grid.png", config)
    save_panels(
        [torch.cat(trajectory[:: max(1, len(trajectory) // 8)] + [fake[:1]])], prefix + "_trajectory.png", config
    )
    common.plot_bins(os.path.join(out_dir, "log.jsonl"), prefix + "_loss_bins.png", "loss_bins", "training loss")
    return prefix


def save_panels(panels, path, config):
    """Each tensor [B, C, *spatial] in [-1, 1] -> one row per sample of its channels (3D: the middle axial slice)."""
    rows = []
    for b in range(len(panels[0])):
        for p in panels:
            for c in range(p.shape[1]):
                image = p[b, c] if config["dims"] == 2 else p[b, c, p.shape[2] // 2]
                rows.append(image[None].cpu())
    per_row = sum(p.shape[1] for p in panels)
    common.save_image_grid(torch.stack(rows), path, nrow=per_row)


# ----------------------------------------------------------------------------------------------------------------
# Latent space: a train_vae.py autoencoder (data=mri), its latents of the training set cached once
# ----------------------------------------------------------------------------------------------------------------


def latent_autoencoder(config):
    """space=latent: the autoencoder of config["latent"] (CPU, frozen), stopped with one line unless it was trained on
    this run's data kind (mri, mode, dims, image_size / crop); stores latent_id and latent_shape in config.
    -> (autoencoder, (its config, its checkpoint folder)), or (None, None) in the other spaces."""
    if config["space"] != "latent":
        common.check(not config["latent"], f"latent= needs space=latent; this run has space={config['space']}")
        return None, None
    common.check(config["latent"], "space=latent needs latent=RUN: an autoencoder trained by train_vae.py data=mri")
    import train_vae  # here, not at the top: train_vae imports this module

    shape = (len(_MODALITIES[config["mode"]][0]), *spatial_shape(config))
    expect = {"data": "mri", "input_shape": shape, "mode": config["mode"], "dims": config["dims"]}
    if config["dims"] == 2:
        expect["image_size"] = config["image_size"]
    else:
        expect["crop"] = list(config["crop"])  # as the autoencoder's config.json stores it
    ae, ae_config, ae_dir, latent_id = train_vae.load_autoencoder(
        config["latent"], "cpu", expect, (config["out_dir"], config["resume"])
    )
    config.update(latent_id=latent_id, latent_shape=list(train_vae.latent_shape(ae, shape)))
    return ae, (ae_config, ae_dir)


def latent_training_set(ae, source, x, config, run):
    """The scaled latents (N, c, *spatial / f) of the training samples x, encoded once into OUT_DIR/latents.safetensors
    (rebuilt when the autoencoder or the data change), and config["latent_space"] (the scale, where the autoencoder
    came from). -> (latents, the weights every checkpoint carries), or (None, None) outside space=latent."""
    if ae is None:
        return None, None
    import train_vae  # here, not at the top: train_vae imports this module

    ae.to(run.device)
    size = f"image_size={config['image_size']}" if config["dims"] == 2 else f"crop={tuple(config['crop'])}"
    latents, scale = train_vae.latent_cache(
        ae,
        config["latent_id"],
        x,
        lambda chunk: split_sample(chunk, config)[0],  # the generated modalities in [-1, 1], as the autoencoder saw
        os.path.join(config["out_dir"], "latents.safetensors"),
        f"mri mode={config['mode']} dims={config['dims']} {size}",
        run.micro,
        run.device,
        run.is_main,
        run.accelerator.wait_for_everyone,
    )
    config["latent_space"] = train_vae.latent_info(*source, config["latent_id"], scale, config["latent_shape"])
    return latents, train_vae.attached(ae)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def main(argv):
    config = common.apply_overrides(globals(), argv)
    config.update(script="train_mri", size=SIZE or _DEFAULT_SIZE[MODEL])
    ae, ae_source = latent_autoencoder(config)  # space=latent: checked against this run before anything else happens
    config["model_kw"] = model_kwargs(config)
    check_shapes(config)
    run = common.setup_run(OUT_DIR, MIXED_PRECISION, BATCH_SIZE, GRAD_ACCUM, MAX_STEPS)
    root = study_root(config, run.is_main)
    run.accelerator.wait_for_everyone()
    x, vectors, info = prepare(config, root, "train", verbose=run.is_main)
    latents, attached = latent_training_set(ae, ae_source, x, config, run)  # (None, None) outside space=latent
    fixed = prepare(config, root, "val", verbose=run.is_main)[:2]
    pick = torch.linspace(0, len(fixed[0]) - 1, min(4, len(fixed[0]))).round().long()
    fixed = (fixed[0][pick].to(run.device), None if fixed[1] is None else fixed[1][pick].to(run.device))
    if SPACE == "wavelet":  # per-sub-band scale from the training data, saved with the run
        config["wavelet_stats"] = wavelet_stats(split_sample(x[common.subset(len(x), 256)], config)[0])
    config["data"], config["affine_example"] = root, np.asarray(info[0]["affine"]).tolist()
    common.seed_everything(SEED)  # the initial weights depend on SEED alone
    raw = build_model(config).to(run.device)
    ema = common.EMA(raw)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    subjects = len({i["subject"] for i in info})
    describe = f"MRI {root}: {len(x)} {'slices' if DIMS == 2 else 'volumes'} of {subjects} training subjects, "
    space = SPACE + (f" {tuple(config['latent_shape'])} of {ae_source[1]}" if ae is not None else "")
    describe += (
        f"{tuple(x.shape[2:])}; mode={MODE} {STRATEGY} space={space}{' ScoreAug' * SCORE_AUG}; {MODEL} {config['size']}"
    )
    model, optimizer, step = common.start(run, raw, ema.model, optimizer, config, RESUME, INIT_FROM, COMPILE, describe)
    per_epoch = max(1, len(x) // BATCH_SIZE)
    while step < MAX_STEPS:
        model.train()
        # stateless batches: epoch e is a permutation seeded by (SEED, e), so resume and process count change nothing
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SEED * 100_003 + step // per_epoch))
        batch = order[(step % per_epoch) * BATCH_SIZE :][:BATCH_SIZE]
        if len(batch) < BATCH_SIZE:  # fewer samples than one batch: draw with replacement
            batch = order[torch.arange(BATCH_SIZE) % len(order)]
        for m in range(GRAD_ACCUM):
            gen = common.step_generator(run, SEED, step, m)
            idx = batch[(m * run.world + run.rank) * run.micro :][: run.micro]
            x0, mask = split_sample(x[idx].to(run.device), config)
            if latents is not None:  # the cached latents of the same samples; the mask stays in pixels
                x0 = latents[idx].to(run.device)
            vector = None if vectors is None else vectors[idx].to(run.device)
            with common.micro_step(run, model, m, GRAD_ACCUM):
                loss, per_sample, t = training_loss(model, x0, mask, vector, config, gen)
                run.accelerator.backward(loss / GRAD_ACCUM)
            run.metrics.add(loss=per_sample)
            run.metrics.add_binned("loss_bins", per_sample, t)
        lr = common.lr_at(step, LR, WARMUP, MAX_STEPS)
        grad_norm = common.optimizer_step(run, step, model, optimizer, lr, CLIP, loss)
        ema.update(raw, EMA_DECAY)
        step += 1
        common.log_step(run, step, LOG_EVERY, optimizer, grad_norm)
        if SAMPLE_EVERY > 0 and (step % SAMPLE_EVERY == 0 or step == MAX_STEPS):
            common.check_finite(run)
            if run.is_main:
                prefix = diagnostics(ema.model, fixed, config, OUT_DIR, step, ae)
                print(f"step {step}: diagnostics from EMA weights in {prefix}_*.png", flush=True)
            run.accelerator.wait_for_everyone()
        if step % CKPT_EVERY == 0 or step == MAX_STEPS:
            common.checkpoint(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS, attached=attached)
    common.finish(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS, attached=attached)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (called by evaluate.py)
# ----------------------------------------------------------------------------------------------------------------

EVAL = {  # `python evaluate.py RUN key=value` options for train_mri checkpoints
    "N_SAMPLES": 64,  # held-out samples generated (sample i: seed i, the mask / sizes of held-out sample i)
    "SPLIT": "test",  # held-out split: test | val
    "GUIDANCE": -1.0,  # classifier-free guidance scale; -1 the checkpoint's
    "SAMPLE_STEPS": -1,  # -1 the checkpoint's
    "SAMPLER": "",  # "" the checkpoint's; one of common.DETERMINISTIC
    "GRID": "",  # "" the checkpoint's time grid; one of common.GRIDS
    "T_MIN": -1.0,  # where the grid ends (see T_MIN); -1 the checkpoint's
    "BATCH": 16,  # samples per sampling batch (deterministic samplers: results do not depend on it)
    "DATA": "",  # "" the checkpoint's study
    "N_NIFTI": 2,  # generated volumes written as .nii.gz (2D: the slices of one held-out subject stacked)
    "KID_SUBSET": 1000,  # KID subset size
}


def check_eval_options(opts):
    for key in ("n_samples", "batch"):
        common.check(opts[key] >= 2, f"{key}={opts[key]}: give at least 2")
    common.check(opts["split"] in ("test", "val"), f"split={opts['split']!r}: choose test or val")
    common.check(opts["sample_steps"] > 0 or opts["sample_steps"] == -1, "sample_steps= must be > 0, or -1")
    common.check(opts["guidance"] >= 0 or opts["guidance"] == -1, "guidance= must be >= 0, or -1")
    common.check(opts["t_min"] == -1 or 0 <= opts["t_min"] < 1, f"t_min={opts['t_min']}: give 0 <= t_min < 1, or -1")
    common.check(opts["n_nifti"] >= 0, "n_nifti= must be >= 0")


def axial_images(x, config):
    """[B, C, *spatial] in [-1, 1] -> axial slices [N, 3, H, W] for EffNet features (3D: 8 evenly spaced slices of
    the first channel per volume)."""
    if config["dims"] == 3:
        depth = x.shape[2]
        x = x[:, :1, torch.linspace(depth // 8, depth - 1 - depth // 8, 8).round().long()]
        x = x.transpose(1, 2).flatten(0, 1)
    return x[:, :1].expand(-1, 3, -1, -1).float()


def evaluate(model, config, opts, out_dir):
    """Generate N_SAMPLES held-out samples from their own masks (or size histograms) and score them against the real
    ones: PSNR, SSIM, MS-SSIM, FD/KID-EffNet on axial slices and tumour-region errors by RANO-BM class (image modes);
    tumour count and size distributions (mask modes). Writes NIfTI volumes, montages and the worst samples. A latent
    run's samples are decoded by the autoencoder saved beside its checkpoint (opts["checkpoint"], set by evaluate.py)
    before anything is scored or written."""
    check_eval_options(opts)
    device = next(model.parameters()).device
    ae = None
    if config["space"] == "latent":
        import train_vae  # here, not at the top: train_vae imports this module

        ae = train_vae.attached_autoencoder(opts["checkpoint"], config, device)
    guidance = opts["guidance"] if opts["guidance"] != -1 else config["guidance"]
    steps = opts["sample_steps"] if opts["sample_steps"] > 0 else config["sample_steps"]
    sampling = sampling_for(config, opts)
    sampler, options = sampling
    common.check_sampling(
        sampler, options["grid"], options["t_min"], common.DETERMINISTIC, steps, options.get("t_steps", 0)
    )
    root = opts["data"] or config["data"]
    x, vectors, info = prepare(config, root, opts["split"])
    pick = common.subset(len(x), opts["n_samples"])
    x, info = x[pick], [info[i] for i in pick]
    vectors = None if vectors is None else vectors[pick]
    extract = common.EffNetFeatures(device)
    real, mask = split_sample(x, config)
    fake, t0 = [], time.time()
    for s in common.progress_bar(range(0, len(x), opts["batch"]), desc="sampling"):
        sl = slice(s, s + opts["batch"])
        m = None if mask is None else mask[sl].to(device)
        v = None if vectors is None else vectors[sl].to(device)
        seeds = range(s, min(len(x), s + opts["batch"]))
        fake.append(generate(model, m, v, seeds, config, guidance, steps, ae=ae, sampling=sampling).cpu())
    fake = torch.cat(fake)
    result = {"n_samples": len(x), "split": opts["split"], "data": root, "guidance": guidance, "steps": steps}
    nfe = common.count_nfe(sampling[0], common.sample_grid(steps, strategy(config)[0], **sampling[1]))
    result.update(sampler=sampling[0], grid=sampling[1]["grid"], t_min=sampling[1]["t_min"], nfe=nfe)
    result["sampling_s"] = round(time.time() - t0, 1)
    f_fake = common.features(extract, axial_images(fake, config), opts["batch"])
    f_real = common.features(extract, axial_images(real, config), opts["batch"])
    result["FD-EffNet"] = common.frechet_distance(f_fake, f_real)
    result["KID-EffNet"] = common.kernel_inception_distance(f_fake, f_real, opts["kid_subset"])
    files = []
    if mask is not None:  # image modes: paired scores against the real images of the same masks
        a, b = (fake + 1) / 2, (real + 1) / 2
        scores = {"PSNR": psnr(a, b, 1.0), "SSIM": ssim(a, b, 1.0), "MS-SSIM": ms_ssim(a, b, 1.0)}
        result.update({k: float(v.mean()) for k, v in scores.items()})
        result["region_mae"] = region_table(a, b, mask > 0, info, config)
        worst = torch.argsort(scores["PSNR"])[:4]
        path = os.path.join(out_dir, "eval_worst.png")
        save_panels([mask[worst], fake[worst], real[worst]], path, config)
        files.append((path, "the 4 lowest-PSNR samples: mask | generated | real"))
    else:
        result.update(mask_statistics(fake > 0, x[:, 0] > 0.5, info, config))
    path = os.path.join(out_dir, "eval_samples.png")
    save_panels([p[:8] for p in (mask, fake, real) if p is not None], path, config)
    files.append((path, "the first 8 samples: (mask |) generated | real"))
    files += write_volumes(model, fake, info, config, opts, out_dir, root, guidance, steps, ae)
    return result, files


def region_table(a, b, mask, info, config):
    """Mean absolute error (images in [0, 1]) inside the tumour by RANO-BM class and outside it, pooled over the
    samples by voxel count: {region: MAE or None}."""
    sums, counts = {}, {}
    for i in range(len(a)):
        errors = region_errors(a[i, 0].numpy(), b[i, 0].numpy(), mask[i, 0].numpy(), sample_spacing(info[i], config))
        for key, n in errors.items():
            if key.startswith("n_") and n:
                region = key[2:]
                sums[region] = sums.get(region, 0.0) + errors[f"mae_{region}"] * n
                counts[region] = counts.get(region, 0) + n
    return {r: (sums[r] / counts[r] if counts.get(r) else None) for r in ("outside", "tumour", *_RANO)}


def mask_statistics(fake, real, info, config):
    """Tumour counts and RANO-BM size classes of generated vs real masks: mean components per sample, the class
    shares, and their total-variation distance (0 = the same size distribution)."""
    out = {}
    for name, masks in (("generated", fake[:, 0]), ("real", real)):
        classes = np.zeros(len(_RANO))
        counts = []
        for i in range(len(masks)):
            found = components(masks[i].numpy(), sample_spacing(info[i], config), min_area=5)
            counts.append(len(found))
            for c in found:
                classes[_RANO.index(c["rano"])] += 1
        out[f"tumours_per_sample_{name}"] = float(np.mean(counts))
        out[f"rano_share_{name}"] = dict(zip(_RANO, (classes / max(1, classes.sum())).round(4).tolist()))
    shares = [np.array(list(out[f"rano_share_{n}"].values())) for n in ("generated", "real")]
    out["rano_tv_distance"] = float(0.5 * np.abs(shares[0] - shares[1]).sum())
    return out


def save_png(image, path):
    """A uint8 (H, W, 3) image as PNG; an unwritable folder is one line."""
    import matplotlib.image

    try:
        matplotlib.image.imsave(path, image)
    except OSError as e:
        common.unwritable(path, e)


def sample_spacing(row, config):
    """Voxel spacing (mm) of one model sample: the volume's [D, H, W] in 3D; in 2D the in-plane spacing of a slice
    after padding to a square of side L and resizing to IMAGE_SIZE (spacing * L / S)."""
    d, h, w = row["spacing"]
    if config["dims"] == 3:
        return (d, h, w)
    scale = max(row["shape"][1:]) / config["image_size"]
    return (h * scale, w * scale)


def sample_affine(row, config, first_slice=0):
    """The RAS affine of generated samples written as [D, H, W] volumes (write_nifti's order, voxel (x, y, z) =
    (W, H, D) index): 3D, the subject's affine moved to the crop's first voxel; 2D, slices first_slice, first_slice
    + 1, ... stacked, in-plane voxels L / S times larger and shifted by the square padding."""
    affine = np.asarray(row["affine"], dtype=np.float64)
    t = np.eye(4)
    if config["dims"] == 3:
        t[:3, 3] = row["origin"][::-1]  # (W, H, D) offsets
        return affine @ t
    _, h, w = row["shape"]
    side = max(h, w)
    scale = side / config["image_size"]
    t[0, 0] = t[1, 1] = scale
    t[0, 3] = 0.5 * scale - 0.5 - (side - w) // 2  # pixel centres of the resized square in original voxels
    t[1, 3] = 0.5 * scale - 0.5 - (side - h) // 2
    t[2, 3] = first_slice
    return affine @ t


def write_volumes(model, fake, info, config, opts, out_dir, root, guidance, steps, ae=None):
    """Generated volumes as .nii.gz with their subject's geometry, each with a montage PNG: 3D, the first N_NIFTI
    samples; 2D, every slice of the first N_NIFTI held-out subjects generated from its own mask and stacked (slices
    without brain stay 0; a latent run's decoded by `ae`). Values are intensities in [0, 1] (masks 0 / 1).
    -> [(path, what)]."""
    folder, files, names = os.path.join(out_dir, "generated_nifti"), [], _MODALITIES[config["mode"]][0]
    os.makedirs(folder, exist_ok=True)
    if config["dims"] == 3:
        volumes = [(info[i], fake[i], 0) for i in range(min(opts["n_nifti"], len(fake)))]
    else:
        volumes = stacked_subjects(model, config, opts, root, guidance, steps, ae)
    for k, (row, volume, first) in enumerate(volumes):
        for c, name in enumerate(names):
            path = os.path.join(folder, f"{k:02d}_{row['subject']}_{name}.nii.gz")
            values = (volume[c].numpy() + 1) / 2
            write_nifti(
                path, (values > 0.5).astype(np.float32) if name == "seg" else values, sample_affine(row, config, first)
            )
            save_png(montage(values), path[: -len(".nii.gz")] + ".png")
        files.append((path, f"generated {', '.join(names)} of {row['subject']} as NIfTI (+ montage PNG)"))
    return files


def stacked_subjects(model, config, opts, root, guidance, steps, ae=None):
    """2D: every kept slice of the first N_NIFTI held-out subjects, generated from its mask (seed = slice index),
    stacked into [C, K, S, S] from the first to the last kept slice (a latent run's decoded by `ae`).
    -> [(info row, volume, first slice)]."""
    x, vectors, info = prepare(config, root, opts["split"], verbose=False)
    device, out, sampling = next(model.parameters()).device, [], sampling_for(config, opts)
    subjects = list(dict.fromkeys(r["subject"] for r in info))[: opts["n_nifti"]]
    for subject in subjects:
        rows = [i for i, r in enumerate(info) if r["subject"] == subject]
        slices = [info[i]["slice"] for i in rows]
        real, mask = split_sample(x[rows], config)
        parts = []
        for s in range(0, len(rows), opts["batch"]):
            m = None if mask is None else mask[s : s + opts["batch"]].to(device)
            v = None if vectors is None else vectors[rows[s : s + opts["batch"]]].to(device)
            seeds = slices[s : s + opts["batch"]]
            parts.append(generate(model, m, v, seeds, config, guidance, steps, ae=ae, sampling=sampling).cpu())
        fake = torch.cat(parts)
        volume = -torch.ones(fake.shape[1], max(slices) - min(slices) + 1, *fake.shape[2:])
        volume[:, [k - min(slices) for k in slices]] = fake.transpose(0, 1)
        out.append((info[rows[0]], volume, min(slices)))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
