"""The EEG data pipeline of train_eeg.py on real recordings: the BIDS demo in tests/data/eeg_demo (two subjects
of BCI Competition II converted by tests/data/make_eeg_demo.py), pyedflib's test EDF, and small FIF files written
here for the cases the real files cannot show (a bad sampling rate, a channel of another type, a corrupt file)."""

import glob
import os
import shutil
import subprocess
import sys

import mne
import numpy as np
import pandas as pd
import pyedflib
import pytest
import scipy.signal

import train_eeg as eeg_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "tests", "data", "eeg_demo")
TEST_EDF = os.path.join(os.path.dirname(pyedflib.__file__), "data", "test_generator.edf")
CHANNELS = ("Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz", "C4", "T8")
CHANNELS += ("P7", "P3", "Pz", "P4", "P8", "O1", "Oz", "O2")
C3, C4 = CHANNELS.index("C3"), CHANNELS.index("C4")


def write_fif(path, names, sfreq, seconds, types="eeg", seed=0):
    """A FIF recording of white noise in microvolts (about 20 uV) with the given channel names; returns the data in
    microvolts exactly as stored (float32 in the file)."""
    data = (np.random.default_rng(seed).standard_normal((len(names), round(sfreq * seconds))) * 20).astype(np.float32)
    raw = mne.io.RawArray(data.astype(np.float64) * 1e-6, mne.create_info(list(names), sfreq, types), verbose="error")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    raw.save(path, overwrite=True, verbose="error")
    return mne.io.read_raw(path, verbose="error").get_data() * 1e6  # every type here is stored in volts


def copy_demo(dest, runs=(1,)):
    """The demo's BIDS files with only the given runs of each subject (a smaller dataset to build caches from)."""
    os.makedirs(dest)
    for name in ("dataset_description.json", "participants.tsv", "participants.json"):
        shutil.copy(os.path.join(DEMO, name), dest)
    for subject in ("scp1", "scp2"):
        os.makedirs(os.path.join(dest, f"sub-{subject}", "eeg"))
        for run in runs:
            for path in glob.glob(os.path.join(DEMO, f"sub-{subject}", "eeg", f"*_run-{run}_*")):
                shutil.copy2(path, os.path.join(dest, f"sub-{subject}", "eeg"))
    return str(dest)


def plain_dataset(root, rows, recordings):
    """A plain folder: participants.csv from `rows` and one small FIF (C3, C4 at 250 Hz, 10 s) per path."""
    os.makedirs(root, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(root, "participants.csv"), index=False)
    for i, rel in enumerate(recordings):
        write_fif(os.path.join(root, rel), ["C3", "C4"], 250.0, 10, seed=i)
    return str(root)


def load(root, cache, window=256, on_corrupt="skip"):
    """load_eeg with the recipe's settings: the 20 channels at 125 Hz, windows overlapping by half."""
    return eeg_data.load_eeg(root, str(cache), CHANNELS, 125.0, window, 0.5, on_corrupt)


def caches(cache):
    """The finished cache folders in `cache` (not the locks, not a temporary build folder)."""
    return sorted(p for p in glob.glob(os.path.join(str(cache), "eeg-*")) if os.path.isdir(p))


def one_line(excinfo):
    """The message of a one-line error (SystemExit from common.die or ValueError)."""
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# ----------------------------------------------------------------------------------------------------------------
# One recording
# ----------------------------------------------------------------------------------------------------------------


def test_windows_count_and_starts():
    x = np.zeros((20, 1000))
    assert eeg_data.make_windows(x, 256, 0.5) == [0, 128, 256, 384, 512, 640]
    assert eeg_data.make_windows(x, 256, 0.0) == [0, 256, 512]
    assert eeg_data.make_windows(x, 250, 0.75) == list(range(0, 751, 62))  # hop round(62.5) = 62
    assert eeg_data.make_windows(x, 1000, 0.5) == [0]
    with pytest.raises(ValueError, match="shorter than one window"):
        eeg_data.make_windows(x, 1001)
    with pytest.raises(ValueError, match="overlap"):
        eeg_data.make_windows(x, 256, 1.0)


def test_channel_names_aliases_and_decorations():
    names = ["EEG FP1-REF", "EEG T3-LE", "c4", "Fp1-F7", "O2..", "EEG Cz-AVG", "FP2", "ECG", "T6", "Fz-Cz"]
    found = eeg_data.match_channels(names, CHANNELS)
    expect = {"Fp1": 0, "T7": 1, "C4": 2, "O2": 4, "Cz": 5, "Fp2": 6, "P8": 8}  # bipolar Fp1-F7, Fz-Cz match nothing
    assert {c: found[i] for i, c in enumerate(CHANNELS) if found[i] >= 0} == expect
    assert eeg_data.match_channels(["Fp1", "EEG Fp1-REF"], CHANNELS)[0] == 0  # the first of two takes the slot
    assert eeg_data.channel_key("EEG T5-REF") == "P7" and eeg_data.channel_key("t4") == "T8"


def test_read_recording_resamples_like_resample_poly(tmp_path):
    path = str(tmp_path / "rec_raw.fif")
    names, types = ["EEG Cz-REF", "T4", "Fz", "C3"], ["eeg", "eeg", "ecg", "eeg"]  # "Fz" is an ECG: dropped
    stored = write_fif(path, names, 250.0, 20, types)
    data, present, missing = eeg_data.read_recording(path, CHANNELS, 125.0)
    assert data.dtype == np.float32 and data.shape == (20, 2500)
    assert [c for c, p in zip(CHANNELS, present) if p] == ["C3", "Cz", "T8"] and "Fz" in missing and len(missing) == 17
    expect = scipy.signal.resample_poly(stored[[3, 0, 1]], 1, 2, axis=-1, padtype="line")
    np.testing.assert_allclose(data[[C3, CHANNELS.index("Cz"), CHANNELS.index("T8")]], expect, rtol=1e-5, atol=1e-4)
    assert not data[~present].any()
    # independently of scipy: a 10 Hz sine at 1000 Hz keeps its frequency and amplitude at 125 Hz (ratio 1/8)
    t = np.arange(10_000) / 1000
    info = mne.create_info(["C4"], 1000.0, "eeg")
    raw = mne.io.RawArray(50e-6 * np.sin(2 * np.pi * 10 * t)[None], info, verbose="error")
    raw.save(str(tmp_path / "sine_raw.fif"), verbose="error")
    data, _, _ = eeg_data.read_recording(str(tmp_path / "sine_raw.fif"), CHANNELS, 125.0)
    inner = np.arange(50, 1200)
    np.testing.assert_allclose(data[C4, inner], 50 * np.sin(2 * np.pi * 10 * inner / 125), atol=0.05)


def test_pyedflib_test_edf(tmp_path):
    with pytest.raises(ValueError) as e:  # its labels (squarewave, ramp, sine 8 Hz, ...) are no 10-20 names
        eeg_data.read_recording(TEST_EDF, CHANNELS, 125.0)
    assert "none of the 20 target channels" in one_line(e) and "squarewave" in one_line(e)
    header = bytearray(open(TEST_EDF, "rb").read())
    new = {0: "EEG Fp1-REF", 4: "EEG T3-LE", 5: "c4", 6: "Oz."}  # squarewave, sine 1 Hz, sine 8 Hz, sine 8.1777 Hz
    for i, label in new.items():  # EDF labels: 16 ASCII bytes each, after the 256-byte fixed header
        header[256 + 16 * i : 256 + 16 * (i + 1)] = label.ljust(16).encode()
    renamed = tmp_path / "renamed.edf"
    renamed.write_bytes(bytes(header))
    data, present, missing = eeg_data.read_recording(str(renamed), CHANNELS, 125.0)
    assert [c for c, p in zip(CHANNELS, present) if p] == ["Fp1", "T7", "C4", "Oz"] and len(missing) == 16
    source = mne.io.read_raw(TEST_EDF, verbose="error").get_data(picks=[0, 4, 5, 6], units="uV")
    expect = scipy.signal.resample_poly(source, 5, 8, axis=-1, padtype="line")  # 200 Hz -> 125 Hz
    index = [CHANNELS.index(c) for c in ("Fp1", "T7", "C4", "Oz")]
    np.testing.assert_allclose(data[index], expect, rtol=1e-5, atol=1e-3)
    assert data.shape == (20, 600 * 125) and 90 < np.abs(data[CHANNELS.index("T7")]).max() < 110  # 100 uV sine


def test_read_recording_errors(tmp_path):
    write_fif(str(tmp_path / "slow_raw.fif"), ["C3"], 100.0, 5)
    write_fif(str(tmp_path / "none_raw.fif"), ["X1", "Fp1-F7"], 250.0, 5)
    (tmp_path / "corrupt.edf").write_bytes(b"0       " + os.urandom(2000))
    cases = {"slow_raw.fif": "below the 125 Hz", "none_raw.fif": "none of the 20", "corrupt.edf": "unreadable"}
    for name, why in cases.items():
        with pytest.raises(ValueError) as e:
            eeg_data.read_recording(str(tmp_path / name), CHANNELS, 125.0)
        assert why in one_line(e) and name in one_line(e)


# ----------------------------------------------------------------------------------------------------------------
# Splits, statistics, weights
# ----------------------------------------------------------------------------------------------------------------


def window_table(classes, recordings_per_subject=2, windows_per_recording=3):
    """A window table with `classes` {health: number of subjects}, one dataset per class: the subject ids s0, s1, ...
    repeat across datasets and name different people."""
    rows = []
    for health, n in classes.items():
        dataset = f"{health}_data"
        for s in range(n):
            for r in range(recordings_per_subject):
                rec = f"{dataset}/s{s}/rec{r}.edf"
                rows += [
                    (rec, f"s{s}", dataset, "MF"[s % 2], 40.0, health, 100 * w) for w in range(windows_per_recording)
                ]
    return pd.DataFrame(rows, columns=["recording", "subject", "dataset", "sex", "age", "health", "start"])


def test_split_by_subject_is_disjoint_and_spreads_classes():
    meta = window_table({"healthy": 10, "ALS": 3, "epilepsy": 5})
    splits, by = eeg_data.split(meta, "auto", seed=0)
    assert by == "subject" and set(splits) == {"train", "val", "test"}
    per_subject = pd.DataFrame({"s": meta["dataset"] + meta["subject"], "split": splits}).groupby("s")["split"]
    assert (per_subject.nunique() == 1).all()  # every subject's windows in one split
    for health in ("healthy", "ALS", "epilepsy"):
        assert set(splits[meta["health"] == health]) == {"train", "val", "test"}
    reverse, _ = eeg_data.split(meta.iloc[::-1].reset_index(drop=True), "subject", seed=0)
    assert (reverse[::-1] == splits).all()  # deterministic, whatever the order of the rows
    other, _ = eeg_data.split(meta, "subject", seed=1)
    assert (other != splits).any()
    n_train = meta.loc[splits == "train", ["dataset", "subject"]].drop_duplicates().shape[0]
    assert n_train == 8 + 1 + 3  # subjects per split: 10 -> 8/1/1, 3 -> 1/1/1, 5 -> 3/1/1


def test_split_by_recording_when_a_class_is_small():
    meta = window_table({"healthy": 4, "ALS": 1}, recordings_per_subject=6)
    splits, by = eeg_data.split(meta, "auto", seed=3)
    assert by == "recording"
    assert (pd.Series(splits).groupby(meta["recording"]).nunique() == 1).all()
    for subject, group in pd.Series(splits).groupby(meta["dataset"] + meta["subject"]):
        assert sorted(group.unique()) == ["test", "train", "val"], subject  # 6 recordings: 4/1/1
    with pytest.raises(ValueError):
        eeg_data.split(meta, "window", seed=0)
    with pytest.raises(ValueError):
        eeg_data.split(meta, "subject", seed=0, fractions=(0.5, 0.1, 0.1))


def test_channel_stats_use_training_windows_only():
    rng = np.random.default_rng(0)
    windows = (rng.standard_normal((40, 20, 64)) * 3 + 1e4).astype(np.float32)  # a large DC offset
    present = rng.random((40, 20)) < 0.7
    present[:, 5] = False  # absent everywhere -> mean 0, std 1
    present[30:, 6], present[:30, 6] = True, False  # present only in held-out windows -> mean 0, std 1 too
    train = np.arange(40) < 30
    mean, std = eeg_data.channel_stats(windows, present, train, chunk=7)
    for c in range(20):
        x = windows[train & present[:, c], c].astype(np.float64)
        want = (x.mean(), x.std()) if x.size else (0.0, 1.0)
        np.testing.assert_allclose([mean[c], std[c]], want, rtol=1e-5)
    changed = windows.copy()
    changed[35] += 1000  # a validation window
    assert all(np.array_equal(a, b) for a, b in zip((mean, std), eeg_data.channel_stats(changed, present, train)))
    changed[3] += 1000  # a training window
    assert not np.array_equal(mean, eeg_data.channel_stats(changed, present, train)[0])


def test_sample_weights():
    meta = pd.DataFrame({"dataset": ["a"] * 90 + ["a"] * 9 + ["b"], "sex": ["M"] * 90 + ["F"] * 10})
    w = eeg_data.sample_weights(meta, cap=5.0)
    assert w.dtype == np.float64 and np.isclose(w.mean(), 1)
    assert np.isclose(w[0], w[1]) and np.isclose(w[90] / w[0], 10)  # inverse frequency: 90 vs 9
    assert w[99] < w[90] * 9  # the single ("b", "F") window is capped before the renormalisation
    uncapped = eeg_data.sample_weights(meta, cap=1e9)
    assert np.isclose(uncapped[99] / uncapped[0], 90) and np.isclose(uncapped.mean(), 1)


# ----------------------------------------------------------------------------------------------------------------
# Finding recordings
# ----------------------------------------------------------------------------------------------------------------


def test_find_recordings_bids_demo(tmp_path):
    found = eeg_data.find_recordings(DEMO)
    assert list(found.columns) == ["path", "subject", "dataset", "sex", "age", "health"]
    assert len(found) == 12 and found["path"][0] == "sub-scp1/eeg/sub-scp1_task-scp_run-1_eeg.edf"
    first = found.groupby("subject").first()
    assert first.loc["sub-scp1", ["dataset", "sex", "age", "health"]].tolist() == [
        "SelfRegulationSCP1",
        "F",
        30,
        "healthy",
    ]
    assert first.loc["sub-scp2", ["dataset", "sex", "age", "health"]].tolist() == ["SelfRegulationSCP2", "M", 55, "ALS"]
    root = copy_demo(tmp_path / "bids")  # derivatives/ and sourcedata/ are not raw recordings; dataset defaults
    for extra in ("derivatives/clean/sub-scp1/eeg", "sourcedata/sub-scp1/eeg"):
        os.makedirs(os.path.join(root, extra))
        shutil.copy(os.path.join(root, found["path"][0]), os.path.join(root, extra))
    pd.read_csv(os.path.join(root, "participants.tsv"), sep="\t").drop(columns="dataset").to_csv(
        os.path.join(root, "participants.tsv"), sep="\t", index=False
    )
    found = eeg_data.find_recordings(root)
    assert len(found) == 2 and set(found["dataset"]) == {"bids"}


def test_find_recordings_plain_folder(tmp_path):
    rows = {"subject": ["S1", "S10", "007"], "sex": ["male", "F", "f"], "age": [30, "n/a", 41.5]}
    rows["health"] = ["healthy", "ALS", "healthy"]
    paths = ["S1_a.fif", "S10_b.fif", "007/night/x_raw.fif", ".hidden/S1_c.fif"]
    root = plain_dataset(tmp_path / "plain", rows, paths)
    found = eeg_data.find_recordings(root).set_index("path")
    assert found["subject"].to_dict() == {"007/night/x_raw.fif": "007", "S10_b.fif": "S10", "S1_a.fif": "S1"}
    assert found.loc["S10_b.fif", "sex"] == "F" and np.isnan(found.loc["S10_b.fif", "age"])
    assert set(found["dataset"]) == {"plain"} and found.loc["007/night/x_raw.fif", "sex"] == "F"
    pd.DataFrame({**rows, "file": ["007/night/x_raw.fif", "S1_a.fif", "S10_b.fif"], "dataset": "mine"}).to_csv(
        os.path.join(root, "participants.csv"), index=False
    )
    found = eeg_data.find_recordings(root).set_index("path")  # a file column overrides the names
    assert found["subject"].to_dict() == {"007/night/x_raw.fif": "S1", "S10_b.fif": "007", "S1_a.fif": "S10"}
    assert set(found["dataset"]) == {"mine"}


@pytest.mark.parametrize(
    "case, message",
    [
        ("no recordings", "no EEG recordings"),
        ("missing column", "has no column 'health' (columns: subject, sex, age)"),
        ("unknown subject", "recording S2_a.fif is not in"),
        ("bad sex", "has sex 'X', not M, F, male or female"),
        ("no table", "neither dataset_description.json"),
    ],
)
def test_find_recordings_errors(tmp_path, case, message):
    rows = {"subject": ["S1"], "sex": ["X" if case == "bad sex" else "M"], "age": [30], "health": ["healthy"]}
    if case == "missing column":
        del rows["health"]
    paths = {"no recordings": [], "unknown subject": ["S1_a.fif", "S2_a.fif"]}.get(case, ["S1_a.fif"])
    root = plain_dataset(tmp_path / "plain", rows, paths)
    if case == "no table":
        os.remove(os.path.join(root, "participants.csv"))
    with pytest.raises(SystemExit) as e:
        eeg_data.find_recordings(root)
    assert message in one_line(e)


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------


def test_load_eeg_demo_windows_and_meta(tmp_path, capsys):
    windows, present, meta, report = load(copy_demo(tmp_path / "bids"), tmp_path / "cache")
    # run-1 of each: 30 trials * 896 (SCP1) or 1152 (SCP2) samples at 256 Hz -> 13125 or 16875 at 125 Hz
    assert len(windows) == (13125 - 256) // 128 + 1 + (16875 - 256) // 128 + 1 == 101 + 130
    assert windows.shape[1:] == (20, 256) and windows.dtype == np.float32 and present.shape == (231, 20)
    assert (present.sum(0) > 0).tolist() == [c in ("C3", "C4") for c in CHANNELS]
    assert list(meta.columns) == ["recording", "subject", "dataset", "sex", "age", "health", "start"]
    assert meta["start"].tolist()[:3] == [0, 128, 256] and (meta["health"] == "ALS").sum() == 130
    assert len(report) == 2 and report[0].endswith("2/20 target channels (missing Fp1, Fp2, F7, F3 and 14 more)")
    data, _, _ = eeg_data.read_recording(os.path.join(tmp_path, "bids", meta["recording"][200]), CHANNELS, 125.0)
    start = meta["start"][200]
    np.testing.assert_array_equal(windows[200], data[:, start : start + 256])
    assert 1 < windows[:, C3].std() < 200  # microvolts, not volts
    assert "2/20 target channels" in capsys.readouterr().out


def test_cache_reuse_and_rebuild(tmp_path, capsys):
    root, cache = copy_demo(tmp_path / "bids"), tmp_path / "cache"
    first = load(root, cache)
    assert len(caches(cache)) == 1 and "(built" in capsys.readouterr().out
    again = load(root, cache)
    assert len(caches(cache)) == 1 and "(read" in capsys.readouterr().out
    assert np.array_equal(first[0], again[0]) and first[2].equals(again[2]) and first[3] == again[3]
    edf = glob.glob(os.path.join(root, "sub-scp2", "eeg", "*.edf"))[0]
    os.utime(edf, ns=(os.stat(edf).st_atime_ns, os.stat(edf).st_mtime_ns + 10**9))  # touch a source file
    load(root, cache)
    assert len(caches(cache)) == 2 and "(built" in capsys.readouterr().out
    smaller = load(root, cache, window=512)  # a preprocessing setting
    assert len(caches(cache)) == 3 and smaller[0].shape[-1] == 512
    # a build killed half way leaves only its temporary folder: it is no cache, and the next build removes it
    newest = max(caches(cache), key=os.path.getmtime)
    os.rename(newest, newest + ".tmp-999999")
    assert len(load(root, cache, window=512)[0]) == len(smaller[0])
    assert not glob.glob(os.path.join(str(cache), "*.tmp-*"))


def test_two_processes_share_one_cache(tmp_path):
    root, cache = copy_demo(tmp_path / "bids", runs=(1, 2)), str(tmp_path / "cache")
    code = (
        "import sys; import train_eeg as eeg_data; "
        f"w, p, m, r = eeg_data.load_eeg({root!r}, {cache!r}, {CHANNELS!r}, 125.0, 256, 0.5, 'skip'); "
        "print('SUM', float(w.sum(dtype='float64')), len(w))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("(built" in o for o in outs) == 1 and sum("(read" in o for o in outs) == 1
    sums = [line for o in outs for line in o.splitlines() if line.startswith("SUM")]
    assert len(sums) == 2 and sums[0] == sums[1] and len(caches(cache)) == 1


def test_load_eeg_skips_or_stops_on_bad_recordings(tmp_path, capsys):
    rows = {"subject": ["S1", "S2"], "sex": ["M", "F"], "age": [30, 40], "health": ["healthy", "healthy"]}
    root = plain_dataset(tmp_path / "plain", rows, ["S1_good_raw.fif", "S2_good_raw.fif"])
    (tmp_path / "plain" / "S1_corrupt.edf").write_bytes(b"0       " + os.urandom(3000))
    write_fif(os.path.join(root, "S2_short_raw.fif"), ["C3"], 250.0, 1)  # 125 samples < one window of 256
    windows, present, meta, report = load(root, tmp_path / "cache")
    assert set(meta["recording"]) == {"S1_good_raw.fif", "S2_good_raw.fif"} and len(windows) == 2 * 8
    skipped = [line for line in report if line.startswith("skipped")]
    assert len(skipped) == 2 and "S1_corrupt.edf: unreadable" in skipped[0] and "shorter than one window" in skipped[1]
    assert "warning: skipped" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        load(root, tmp_path / "cache", on_corrupt="stop")
    assert "S1_corrupt.edf: unreadable" in one_line(e)
    assert not glob.glob(os.path.join(str(tmp_path / "cache"), "*.tmp-*"))
    os.remove(os.path.join(root, "S1_good_raw.fif"))
    os.remove(os.path.join(root, "S2_good_raw.fif"))
    with pytest.raises(SystemExit) as e:
        load(root, tmp_path / "cache")
    assert "no usable EEG recording" in one_line(e)
