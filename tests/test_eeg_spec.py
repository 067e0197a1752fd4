"""The spectral half of train_eeg.py (spectrogram images, spectral metrics, classifier, nearest neighbours, EEG
files) on small synthetic signals: sines plus Gaussian noise at 125 Hz.

STFT frame count and log axis; a pure sine lands in its log-frequency row (and at the image's bottom for low
frequencies); image shapes and ranges per variant, the tiling checked exactly where no resize happens; image_to_db
inverts to_image's dB plane (exactly when every column is alike, to a measured seam error otherwise); Welch PSD
distance against a closed form; band errors pick up a 10 Hz alpha sine on both frequency axes; the classifier beats
chance and is deterministic; nearest distances against brute force; EDF (16-bit) and FIF round trips.
"""

import numpy as np
import pytest
import torch

import train_eeg as eeg_spec

SFREQ = 125.0
BANDS = {"delta": (0.5, 4), "theta": (4, 8), "alpha": (8, 13), "beta": (13, 30), "gamma": (30, 62.5)}


def synthetic_windows(n, freqs_hz, amplitude=10.0, noise=1.0, w=2048, ch=20, seed=0):
    """(n, ch, w) float32 microvolts: a sine of each frequency in freqs_hz (random phase per window and channel)
    plus white Gaussian noise, at SFREQ."""
    rng = np.random.default_rng(seed)
    t = np.arange(w) / SFREQ
    x = noise * rng.standard_normal((n, ch, w))
    for f in freqs_hz:
        x += amplitude * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi, (n, ch, 1)))
    return x.astype(np.float32)


def synthetic_spectrogram(n=4, n_bins=64, w=2048, seed=0):
    n_fft, hop = eeg_spec.stft_params(w)
    return eeg_spec.spectrogram(synthetic_windows(n, [3.0, 10.0], w=w, seed=seed), SFREQ, n_fft, hop, n_bins)


# ----------------------------------------------------------------------------------------------------------------
# STFT and log-frequency axis
# ----------------------------------------------------------------------------------------------------------------


def test_stft_params_give_12_frames_on_synthetic_windows():
    assert eeg_spec.stft_params(2048) == (511, 186)
    assert eeg_spec.stft_params(2048, stft_window=255) == (255, 186)
    for w in (2048, 1000, 256):
        n_fft, hop = eeg_spec.stft_params(w)
        spec = eeg_spec.spectrogram(synthetic_windows(2, [5.0], w=w), SFREQ, n_fft, hop, 32)
        assert spec.shape == (2, 20, 32, 12) and spec.dtype == torch.complex64
    with pytest.raises(ValueError, match="stft window"):
        eeg_spec.stft_params(256, stft_window=256)


def test_log_frequencies_endpoints_and_constant_ratio():
    f = eeg_spec.log_frequencies(64, SFREQ)
    assert f.shape == (64,) and f[0] == pytest.approx(0.125) and f[-1] == pytest.approx(62.5)
    assert np.allclose(f[1:] / f[:-1], (62.5 / 0.125) ** (1 / 63))
    with pytest.raises(ValueError):
        eeg_spec.log_frequencies(64, SFREQ, f_min=70.0)


@pytest.mark.parametrize("target_row", [25, 44, 55])
def test_synthetic_sine_lands_in_its_log_frequency_row_and_image_row(target_row):
    """A sine at row k's frequency (1.5, 9.6, 28 Hz). Rows are point samples of the linear STFT: above ~10 Hz they
    are sparser than its 0.245 Hz bins, so a sine between two rows can fall between the main lobes they sample."""
    n_bins = 64
    freq = eeg_spec.log_frequencies(n_bins, SFREQ)[target_row]
    n_fft, hop = eeg_spec.stft_params(2048)
    spec = eeg_spec.spectrogram(synthetic_windows(2, [freq], noise=0.1), SFREQ, n_fft, hop, n_bins)
    row = int(spec.abs().mean((0, 1, 3)).argmax())
    assert row == target_row
    image = eeg_spec.to_image(spec, "db-only", n_bins, eeg_spec.measure_db_range(spec))
    assert int(image.mean((0, 1, 3)).argmax()) == n_bins - 1 - row  # low frequencies at the bottom


def test_spectrogram_batches_agree():
    x = synthetic_windows(5, [7.0], w=512)
    n_fft, hop = eeg_spec.stft_params(512)
    one = eeg_spec.spectrogram(x, SFREQ, n_fft, hop, 16)
    assert torch.allclose(one, eeg_spec.spectrogram(x, SFREQ, n_fft, hop, 16, batch=2), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Images and their inverse
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, channels", [("db-only", 1), ("db-iq", 3), ("db-polar", 3)])
def test_synthetic_image_shapes_and_range_per_variant(variant, channels):
    spec = synthetic_spectrogram()
    db_range, amp = eeg_spec.measure_db_range(spec), eeg_spec.measure_amp_scale(spec)
    image = eeg_spec.to_image(spec, variant, 64, db_range, amp)
    assert image.shape == (4, channels, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    for c in range(channels):  # each plane uses its range rather than sitting clipped at one end
        inside = ((image[:, c] > -0.99) & (image[:, c] < 0.99)).float().mean()
        assert inside > 0.5, f"plane {c}: only {inside:.0%} inside (-1, 1)"
    assert torch.allclose(image, eeg_spec.to_image(spec, variant, 64, db_range, amp, batch=3))


def test_synthetic_image_tiling_is_exact_without_resize():
    """20 channels x 12 frames = 240 columns: at resolution 240 no resize happens, so the dB plane is exactly the
    scaled dB of channel c in columns 12c..12c+11, rows flipped."""
    spec = synthetic_spectrogram(n=2, n_bins=240)
    db_range = eeg_spec.measure_db_range(spec)
    image = eeg_spec.to_image(spec, "db-only", 240, db_range)
    db = 20 * torch.log10(spec.abs() + 1e-9)
    scaled = (2 * (db - db_range[0]) / (db_range[1] - db_range[0]) - 1).clamp(-1, 1)
    for c in (0, 7, 19):
        assert torch.allclose(image[:, 0, :, 12 * c : 12 * (c + 1)], scaled[:, c].flip(1), atol=1e-5)
    back = eeg_spec.image_to_db(image, db_range)
    assert torch.allclose(back, db.clamp(*db_range), atol=1e-3)  # dB: float32 rounding only


def synthetic_db_spectrogram(channel_step_db, n=2, n_bins=64, frames=12):
    """A complex spectrogram whose dB is a ramp over rows (0..30 dB) plus channel_step_db * c for channel c,
    constant over frames, with zero phase."""
    db = torch.linspace(0, 30, n_bins)[:, None] + channel_step_db * torch.arange(20.0)[:, None, None]
    db = db.expand(n, 20, n_bins, frames)
    return torch.polar(10 ** (db / 20), torch.zeros_like(db)).to(torch.complex64), db


def test_image_to_db_inverts_the_synthetic_db_plane_to_interpolation_error():
    """At resolution 64 the 240 columns are averaged down and interpolated back; the rows are untouched. With
    identical, time-constant channels every column is the same, so the round trip is exact through the resize. With
    channel c offset by 1.5 c dB, neighbours mix at the seams only: measured 0.69 dB on the seam frames (under half
    the 1.5 dB step between neighbours), falling to 0.016 dB on the two middle frames."""
    db_range = (-5.0, 70.0)
    spec, db = synthetic_db_spectrogram(0.0)
    back = eeg_spec.image_to_db(eeg_spec.to_image(spec, "db-only", 64, db_range), db_range)
    assert back.shape == db.shape and (back - db).abs().max() < 1e-3
    spec, db = synthetic_db_spectrogram(1.5)
    err = (eeg_spec.image_to_db(eeg_spec.to_image(spec, "db-only", 64, db_range), db_range) - db).abs()
    assert err.max() < 0.75 and err[..., 5:7].max() < 0.03


def test_to_image_refuses_bad_arguments():
    spec = synthetic_spectrogram(n=1, n_bins=32)
    with pytest.raises(ValueError, match="variant"):
        eeg_spec.to_image(spec, "db-phase", 32, (0.0, 50.0), 1.0)
    with pytest.raises(ValueError, match="amp_scale"):
        eeg_spec.to_image(spec, "db-iq", 32, (0.0, 50.0))
    with pytest.raises(ValueError, match="resolution"):
        eeg_spec.to_image(spec, "db-only", 64, (0.0, 50.0))


# ----------------------------------------------------------------------------------------------------------------
# Spectral metrics
# ----------------------------------------------------------------------------------------------------------------


def test_psd_distance_on_synthetic_sets_zero_identical_and_closed_form_for_a_gain():
    """Scaling every window by a multiplies every PSD by a^2: the distance is exactly 20 log10 a dB."""
    x = synthetic_windows(6, [10.0], w=512)
    freqs, psd = eeg_spec.welch_psd(x, SFREQ, 256)
    assert psd.shape == (6, 20, len(freqs)) and freqs[-1] == pytest.approx(62.5)
    present = np.ones(20, bool)
    assert eeg_spec.psd_distance(psd, psd, present) == pytest.approx(0.0, abs=1e-9)
    _, psd_loud = eeg_spec.welch_psd(2 * x, SFREQ, 256)
    assert eeg_spec.psd_distance(psd_loud, psd, present) == pytest.approx(20 * np.log10(2), rel=1e-6)
    different = synthetic_windows(6, [20.0], w=512, seed=1)
    assert eeg_spec.psd_distance(eeg_spec.welch_psd(different, SFREQ, 256)[1], psd, present) > 3.0


def test_psd_distance_ignores_absent_synthetic_channels():
    x = synthetic_windows(6, [10.0], w=512)
    _, psd = eeg_spec.welch_psd(x, SFREQ, 256)
    gen = psd.copy()
    gen[:, 3] *= 100.0  # channel 3 wrong by 20 dB
    present = np.ones(20, bool)
    assert eeg_spec.psd_distance(gen, psd, present) == pytest.approx(20.0 / 20, rel=1e-6)  # 20 dB on 1 of 20
    present[3] = False
    assert eeg_spec.psd_distance(gen, psd, present) == pytest.approx(0.0, abs=1e-9)
    per_window = np.ones((6, 20), bool)
    per_window[:, 3] = False  # the same, as a per-window mask
    assert eeg_spec.psd_distance(gen, psd, per_window) == pytest.approx(0.0, abs=1e-9)


def test_band_power_errors_pick_up_a_synthetic_alpha_sine():
    real = synthetic_windows(6, [], w=1024)
    gen = real + synthetic_windows(6, [10.0], amplitude=2.0, noise=0.0, w=1024, seed=1)
    freqs, psd_real = eeg_spec.welch_psd(real, SFREQ, 256)
    _, psd_gen = eeg_spec.welch_psd(gen, SFREQ, 256)
    bands = BANDS | {"above_nyquist": (70.0, 80.0)}
    errors = eeg_spec.band_power_errors(freqs, psd_gen, psd_real, np.ones(20, bool), bands)
    assert errors["above_nyquist"] is None
    assert errors["alpha"] > 3.0
    assert max(errors[b] for b in ("delta", "beta", "gamma")) < 0.5, errors


def test_band_power_errors_closed_form_on_a_synthetic_flat_psd():
    """A flat PSD on a 1 Hz grid with the 4 Hz bin ten times higher in the generated set: bands are lo <= f < hi,
    so theta (4, 5, 6, 7 Hz) goes from 4 to 13 and every other band is unchanged."""
    freqs = np.arange(63.0)
    psd_real = np.ones((2, 20, 63))
    psd_gen = psd_real.copy()
    psd_gen[:, :, 4] = 10.0
    errors = eeg_spec.band_power_errors(freqs, psd_gen, psd_real, np.ones(20, bool), BANDS)
    assert errors["theta"] == pytest.approx(10 * np.log10(13 / 4))
    assert all(errors[b] == 0.0 for b in ("delta", "alpha", "beta", "gamma"))


def test_band_power_errors_pick_up_a_synthetic_alpha_sine_on_the_log_axis():
    """The same check through spectrogram images: spectral_profile of image_to_db output as the PSD."""
    n_bins, w = 64, 2048
    real = synthetic_windows(4, [], w=w)
    gen = real + synthetic_windows(4, [10.0], amplitude=2.0, noise=0.0, w=w, seed=1)
    n_fft, hop = eeg_spec.stft_params(w)
    spec_real = eeg_spec.spectrogram(real, SFREQ, n_fft, hop, n_bins)
    db_range = eeg_spec.measure_db_range(spec_real, lo=0.0, hi=100.0)
    db_range = (db_range[0], db_range[1] + 20)  # room for the sine
    profiles = []
    for x in (gen, real):
        image = eeg_spec.to_image(eeg_spec.spectrogram(x, SFREQ, n_fft, hop, n_bins), "db-only", n_bins, db_range)
        profiles.append(eeg_spec.spectral_profile(eeg_spec.image_to_db(image, db_range)))
    freqs = eeg_spec.log_frequencies(n_bins, SFREQ)
    errors = eeg_spec.band_power_errors(freqs, *profiles, np.ones(20, bool), BANDS)
    assert errors["alpha"] > 3.0
    assert max(errors[b] for b in ("delta", "beta", "gamma")) < 0.5, errors
    assert eeg_spec.psd_distance(profiles[1], profiles[1], None) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Classifier and nearest neighbours
# ----------------------------------------------------------------------------------------------------------------


def two_synthetic_classes(n, seed):
    """Class 0: 5 Hz sines, class 1: 20 Hz sines (amplitude 2), both in unit noise; (n, 20, 128), labels (n,)."""
    y = np.arange(n) % 2
    x = np.where(
        y[:, None, None] == 0,
        synthetic_windows(n, [5.0], amplitude=2.0, w=128, seed=seed),
        synthetic_windows(n, [20.0], amplitude=2.0, w=128, seed=seed + 1),
    )
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("as_image", [False, True])
def test_classifier_beats_chance_on_two_synthetic_classes(as_image):
    x, y = two_synthetic_classes(256, seed=0)
    x_test, y_test = two_synthetic_classes(128, seed=10)
    if as_image:  # (N, 1, 20, 128): channels as image rows
        x, x_test = x[:, None], x_test[:, None]
    clf = eeg_spec.train_classifier(x, y, 2, steps=60, seed=0, batch=32, width=8)
    assert not clf.training
    assert eeg_spec.accuracy(clf, x_test, y_test) > 0.9
    again = eeg_spec.train_classifier(x, y, 2, steps=60, seed=0, batch=32, width=8)
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), again.state_dict().values()))


def test_nearest_distances_match_brute_force_on_synthetic_rows():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((23, 3, 5)).astype(np.float32)
    queries = rng.standard_normal((17, 3, 5)).astype(np.float32)
    queries[4] = reference[11]  # an exact copy: distance 0
    got = eeg_spec.nearest_distances(torch.from_numpy(queries), torch.from_numpy(reference), batch=7)
    q, r = queries.reshape(17, -1).astype(np.float64), reference.reshape(23, -1).astype(np.float64)
    brute = np.sqrt(((q[:, None] - r[None]) ** 2).sum(-1)).min(1)
    assert got.shape == (17,) and np.allclose(got, brute, rtol=1e-10, atol=1e-6)
    assert got[4] < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# EDF / FIF
# ----------------------------------------------------------------------------------------------------------------

NAMES = ["Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz", "C4", "T8", "P7", "P3", "Pz", "P4", "P8"]
NAMES += ["O1", "Oz", "O2"]


def test_edf_round_trip_of_synthetic_eeg_to_16_bit_precision(tmp_path):
    """T = 2048 is not a whole number of 1 s EDF records, so the padding path runs too. Channels span 0.5 to 500 uV,
    so a range shared across channels would miss the small channels' tolerance: one step (max - min) / 65534 of
    each channel's own range (rounding to the nearest step errs by at most half of it)."""
    x = synthetic_windows(1, [10.0], w=2048)[0] * np.geomspace(0.05, 50, 20, dtype=np.float32)[:, None]
    x[19] = 0.0  # a flat channel (MNE widens its physical range to [0, 1])
    path = str(tmp_path / "synthetic.edf")
    eeg_spec.write_eeg(path, x, NAMES, SFREQ)
    data, names, sfreq = eeg_spec.read_eeg(path)
    assert data.shape == x.shape and data.dtype == np.float32 and names == NAMES and sfreq == SFREQ
    step = (x[:19].max(1) - x[:19].min(1)) / 65534  # (19,) per-channel quantisation step
    err = np.abs(data[:19] - x[:19]).max(1)
    assert np.all(err <= step), (err / step).max()
    assert np.all(err > step / 4)  # the data really are quantised: the tolerance is not loose
    assert np.abs(data[19]).max() <= 1 / 65534  # the flat channel: one step of its [0, 1] range


def test_fif_round_trip_of_synthetic_eeg_is_exact(tmp_path):
    x = synthetic_windows(1, [10.0], w=300)[0] * 30
    path = str(tmp_path / "synthetic.fif")
    eeg_spec.write_eeg(path, x, NAMES, SFREQ)
    data, names, sfreq = eeg_spec.read_eeg(path)
    assert np.array_equal(data, x) and names == NAMES and sfreq == SFREQ


def test_write_eeg_refuses_other_suffixes(tmp_path):
    with pytest.raises(SystemExit, match=r"\.edf or \.fif"):
        eeg_spec.write_eeg(str(tmp_path / "x.csv"), np.zeros((20, 250), np.float32), NAMES, SFREQ)
