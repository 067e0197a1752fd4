"""The MRI data pipeline of train_mri.py: the synthetic demo study, reading, scaling, slicing, cropping,
splits, bad inputs and the cache. Fast: the demo study is 4 subjects at 4 mm."""

import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

import train_mri as mri_data

MODALITIES = ("bravo", "t1_pre", "t1_gd", "flair", "seg")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A synthetic demo study of 4 subjects at 4 mm (2 train, 1 val, 1 test)."""
    return mri_data.make_demo_study(str(tmp_path_factory.mktemp("mri") / "demo"), n_subjects=4, seed=0, spacing=4.0)


def _write(folder, names=("t1_pre", "seg"), shape=(6, 7, 8), affine=None, seed=0):
    """A tiny subject: random positive images with a zero border, a seg with one blob."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        data = np.zeros(shape, np.float32)
        if name == "seg":
            data[2:4, 2:4, 2:4] = 1
        else:
            data[1:-1, 1:-1, 1:-1] = rng.uniform(1, 100, [n - 2 for n in shape])
        nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), os.path.join(folder, f"{name}.nii.gz"))
    return {n: os.path.join(folder, f"{n}.nii.gz") for n in names}


def _one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith("error: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_demo_study_reads_back(demo):
    subjects = mri_data.find_subjects(demo, MODALITIES)
    assert [s["split"] for s in subjects] == ["train", "train", "val", "test"]
    assert all(s["subject"].startswith("synthetic_") for s in subjects)
    assert os.path.isfile(os.path.join(demo, ".complete"))
    with open(os.path.join(demo, "README.md")) as f:
        readme = f.read()
    assert "SYNTHETIC" in readme and "MNI152" in readme and "Copyright" in readme
    volumes, affine, spacing = mri_data.load_subject(subjects[0]["paths"], MODALITIES)
    assert volumes.shape == (5, 48, 59, 50) and volumes.dtype == np.float32  # 189/4, 233/4, 197/4 rounded up
    assert volumes.min() >= 0 and volumes.max() <= 1 and affine.shape == (4, 4)
    assert np.all(np.abs(spacing - 4) < 4 * 0.1)  # 4 mm times the random scale 0.92-1.08 (and rotation)
    seg = volumes[4]
    assert set(np.unique(seg)) == {0.0, 1.0} and seg.sum() >= 1
    assert np.all(volumes[0][seg > 0] > 0)  # lesions lie inside the brain
    assert (volumes[0] > 0).mean() > 0.15  # a brain, not an empty volume


def test_demo_study_deterministic_and_varied(demo, tmp_path):
    again = mri_data.make_demo_study(str(tmp_path / "again"), n_subjects=4, seed=0, spacing=4.0)
    a = mri_data.find_subjects(demo, MODALITIES)
    b = mri_data.find_subjects(again, MODALITIES)
    for s, t in zip(a, b):
        va, aa, _ = mri_data.load_subject(s["paths"], MODALITIES)
        vb, ab, _ = mri_data.load_subject(t["paths"], MODALITIES)
        np.testing.assert_array_equal(va, vb)
        np.testing.assert_array_equal(aa, ab)
    v0, a0, _ = mri_data.load_subject(a[0]["paths"], MODALITIES)
    v1, a1, _ = mri_data.load_subject(a[1]["paths"], MODALITIES)
    assert not np.allclose(a0, a1) and not np.array_equal(v0[4], v1[4])  # subjects differ


def test_demo_study_rebuilds_half_written(tmp_path):
    root = str(tmp_path / "half")
    os.makedirs(os.path.join(root, "train", "junk"))
    mri_data.make_demo_study(root, n_subjects=3, seed=1, spacing=6.0)  # no .complete: rebuilt, junk removed
    assert not os.path.exists(os.path.join(root, "train", "junk"))
    assert len(mri_data.find_subjects(root, MODALITIES)) == 3


def test_orientation_flipped_affine_loads_identical(demo, tmp_path):
    subject = mri_data.find_subjects(demo, MODALITIES)[0]
    flipped = {}
    for m, path in subject["paths"].items():
        img = nib.load(path)
        data = np.asarray(img.dataobj)
        flip = np.diag([-1.0, 1, 1, 1])
        flip[0, 3] = data.shape[0] - 1  # voxel i -> n - 1 - i: the same world point
        out = nib.Nifti1Image(data[::-1].copy(), img.affine @ flip)
        flipped[m] = str(tmp_path / f"{m}.nii.gz")
        nib.save(out, flipped[m])
    a, aff_a, sp_a = mri_data.load_subject(subject["paths"], MODALITIES)
    b, aff_b, sp_b = mri_data.load_subject(flipped, MODALITIES)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(aff_a, aff_b, atol=1e-5)
    np.testing.assert_allclose(sp_a, sp_b)


def test_axis_order_is_superior_anterior_right(tmp_path):
    data = np.zeros((4, 5, 6), np.float32)  # RAS voxel axes with an identity affine
    data[...] = np.arange(6)[None, None, :] + 1  # value rises along S
    paths = {"t1_pre": str(tmp_path / "t1.nii.gz")}
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0])), paths["t1_pre"])
    volumes, _, spacing = mri_data.load_subject(paths, ("t1_pre",))
    assert volumes.shape == (1, 6, 5, 4)  # [D=S, H=A, W=R]
    np.testing.assert_allclose(spacing, [3.0, 2.0, 1.0])
    assert np.all(np.diff(volumes[0, :, 0, 0]) > 0)


def test_scaling_percentiles():
    x = np.zeros((10, 10, 20), np.float32)
    x[:, :, :10] = np.arange(1, 1001, dtype=np.float32).reshape(10, 10, 10)
    y = mri_data.scale_intensity(x, "x.nii")
    lo, hi = np.percentile(np.arange(1, 1001), [0.5, 99.5])
    assert y.min() == 0 and y.max() == 1 and np.all(y[:, :, 10:] == 0)
    assert (y == 1).sum() == (x >= hi).sum() == 5 and (y[x > 0] == 0).sum() == (x[x > 0] <= lo).sum() == 5
    np.testing.assert_allclose(y[x == 500], (500 - lo) / (hi - lo), rtol=1e-5)


def test_slices_count_brain_filter_and_resize():
    volumes = np.zeros((2, 10, 12, 8), np.float32)  # [M, D, H, W], channel 1 the seg
    volumes[0, 2:7, 2:10, 2:6] = 0.5  # 32 of 96 pixels in slices 2-6
    volumes[0, 8, 0, 0] = 1.0  # one pixel: below min_brain
    volumes[1, 3:5, 4:8, 3:5] = 1
    assert list(mri_data.kept_slices(volumes, 0.05, seg_channel=1)) == [2, 3, 4, 5, 6]
    x = mri_data.slices_2d(volumes, 16, min_brain=0.05, seg_channel=1)
    assert x.shape == (5, 2, 16, 16) and x.dtype == np.float32
    assert set(np.unique(x[:, 1])) == {0.0, 1.0} and x[:, 0].max() <= 0.5 + 1e-6
    area = x[:, 1].sum(axis=(1, 2))  # a 4 x 2 blob in a 12 x 12 square, resized to 16: about 8 * (16 / 12)^2 = 14
    assert list(area > 0) == [False, True, True, False, False] and np.all(np.abs(area[1:3] - 14.2) < 4)
    assert mri_data.slices_2d(volumes, 16, min_brain=0.5, seg_channel=1).shape[0] == 0
    # padding to a square keeps the content centred: W 8 -> 12 adds 2 columns each side
    x12 = mri_data.slices_2d(volumes, 12, min_brain=0.05, seg_channel=1)
    assert np.all(x12[:, 0, :, :4] == 0) and np.all(x12[:, 0, :, 8:] == 0) and np.all(x12[:, 0, 2:10, 4:8] == 0.5)


def test_volume_3d_pad_and_crop():
    volumes = np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, 5, 6, 7) + 1
    out = mri_data.volume_3d(volumes, (8, 4, 7))
    assert out.shape == (2, 8, 4, 7)
    np.testing.assert_array_equal(out[:, 1:6], volumes[:, :, 1:5])  # depth padded 1 before, 2 after; H cropped 1
    assert np.all(out[:, 0] == 0) and np.all(out[:, 6:] == 0)
    np.testing.assert_array_equal(mri_data.volume_3d(out, (5, 4, 7)), volumes[:, :, 1:5])  # crop undoes the pad


def test_flat_study_split(tmp_path):
    for i in range(10):
        _write(str(tmp_path / f"p{i:02d}"), seed=i)
    subjects = mri_data.find_subjects(str(tmp_path), ("t1_pre", "seg"))
    splits = [s["split"] for s in subjects]
    assert splits.count("train") == 8 and splits.count("val") == 1 and splits.count("test") == 1
    assert subjects == mri_data.find_subjects(str(tmp_path), ("t1_pre", "seg"))  # fixed seed
    assert sorted(s["subject"] for s in subjects) == [f"p{i:02d}" for i in range(10)]


def test_bad_studies(tmp_path):
    with pytest.raises(SystemExit) as e:
        mri_data.find_subjects(str(tmp_path), ("t1_pre",))
    _one_line_error(e, "no subjects", str(tmp_path))
    _write(str(tmp_path / "train" / "a"))
    os.makedirs(tmp_path / "val")
    with pytest.raises(SystemExit) as e:
        mri_data.find_subjects(str(tmp_path), ("t1_pre", "seg"))
    _one_line_error(e, "empty", str(tmp_path / "val"))
    shutil.rmtree(tmp_path / "val")
    with pytest.raises(SystemExit) as e:
        mri_data.find_subjects(str(tmp_path), ("t1_pre", "flair"))
    _one_line_error(e, str(tmp_path / "train" / "a"), "flair")


def _expect_die(paths, modalities, *words):
    with pytest.raises(SystemExit) as e:
        mri_data.load_subject(paths, modalities)
    _one_line_error(e, *words)


def test_bad_volumes(tmp_path):
    paths = _write(str(tmp_path / "ok"))
    other = _write(str(tmp_path / "shape"), shape=(6, 7, 9))
    _expect_die({**paths, "seg": other["seg"]}, ("t1_pre", "seg"), other["seg"], paths["t1_pre"], "shape")
    shifted = _write(str(tmp_path / "affine"), affine=np.diag([1.0, 1.0, 1.01, 1.0]))
    _expect_die({**paths, "seg": shifted["seg"]}, ("t1_pre", "seg"), shifted["seg"], paths["t1_pre"], "affine")
    text = tmp_path / "text.nii.gz"
    text.write_text("not an image")
    _expect_die({"t1_pre": str(text)}, ("t1_pre",), str(text))
    with open(paths["t1_pre"], "rb") as f:
        raw = f.read()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(raw)[:-100]))
    _expect_die({"t1_pre": str(truncated)}, ("t1_pre",), str(truncated))
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    _expect_die({"t1_pre": str(cut)}, ("t1_pre",), str(cut))
    for name, value in (("nan", np.nan), ("const", 3.0)):
        data = np.full((6, 7, 8), 1.0 if name == "nan" else value, np.float32)
        data[0, 0, 0] = value
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
        _expect_die({"t1_pre": str(tmp_path / f"{name}.nii.gz")}, ("t1_pre",), f"{name}.nii.gz")
    soft = np.random.default_rng(0).uniform(0, 1, (6, 7, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(soft, np.eye(4)), tmp_path / "soft.nii.gz")
    _expect_die({"seg": str(tmp_path / "soft.nii.gz")}, ("seg",), "soft.nii.gz", "is not a mask")
    nib.save(nib.Nifti1Image((soft > 0.5) * 255.0, np.eye(4)), tmp_path / "u8.nii.gz")
    _expect_die({"seg": str(tmp_path / "u8.nii.gz")}, ("seg",), "u8.nii.gz", "is not a mask")
    volumes, _, _ = mri_data.load_subject(paths, ("t1_pre", "seg"))  # the good one loads
    assert volumes.shape == (2, 8, 7, 6) and volumes[1].sum() == 8


def test_load_study_2d_3d_and_cache(demo, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    x, info = mri_data.load_study(demo, "train", MODALITIES, 2, 32, (), cache, verbose=False)
    assert x.dtype.is_floating_point and x.shape[1:] == (5, 32, 32) and len(info) == len(x) > 20
    assert {r["subject"] for r in info} == {"synthetic_000", "synthetic_001"}
    assert info[0]["affine"].shape == (4, 4) and info[0]["spacing"].shape == (3,) and "slice" in info[0]
    assert set(np.unique(x[:, 4].numpy())) <= {0.0, 1.0} and x.min() >= 0 and x.max() <= 1
    folders = [f for f in os.listdir(cache) if not f.endswith(".lock")]

    def fail(*args):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(mri_data, "load_subject", fail)
    y, _ = mri_data.load_study(demo, "train", MODALITIES, 2, 32, (), cache, verbose=False)
    assert (x == y).all()
    monkeypatch.undo()
    path = mri_data.find_subjects(demo, MODALITIES)[0]["paths"]["flair"]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a changed source file: a new cache
    try:
        z, _ = mri_data.load_study(demo, "train", MODALITIES, 2, 32, (), cache, verbose=False)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (x == z).all() and len([f for f in os.listdir(cache) if not f.endswith(".lock")]) == len(folders) + 1
    v, vinfo = mri_data.load_study(demo, "val", ("t1_gd", "seg"), 3, 32, (48, 64, 48), cache, verbose=False)
    assert v.shape == (1, 2, 48, 64, 48) and len(vinfo) == 1 and "slice" not in vinfo[0]
    w, _ = mri_data.load_study(demo, "train", ("flair",), 3, 32, (), cache, verbose=False)
    assert w.shape == (2, 1, 48, 59, 50)  # the demo's subjects share one grid: no crop needed
    _write(str(tmp_path / "uneven" / "train" / "a"))
    _write(str(tmp_path / "uneven" / "train" / "b"), shape=(6, 7, 9))
    with pytest.raises(SystemExit) as e:
        mri_data.load_study(str(tmp_path / "uneven"), "train", ("t1_pre",), 3, 32, (), cache, verbose=False)
    _one_line_error(e, "crop", "b")
