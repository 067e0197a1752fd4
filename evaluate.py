"""Rebuild a checkpoint from its own metadata and run the evaluation of the script that trained it.

    python evaluate.py runs/arc                              # newest checkpoint of a run (OUT_DIR/latest)
    python evaluate.py runs/stl10/step_0050000 n_samples=5000 weights=model
    python evaluate.py --help                                # the options of every domain

The config stored in model.safetensors names the network (model, size, model_kw), rebuilt from it alone, and the
script that trained it (script). That script's EVAL options take key=value overrides and its
evaluate(model, config, opts, out_dir) samples and scores; eval.json (the scores, the checkpoint, the options) and
the script's figures go to out= (default: the checkpoint folder).
"""

import json
import os
import sys

import torch

import common
import models
import train_arc
import train_eeg
import train_mri
import train_stl10
import train_vae

GENERIC = {  # options of every checkpoint
    "WEIGHTS": "ema",  # ema | model: the EMA weights or the raw ones
    "OUT": "",  # folder for eval.json and the figures; "" the checkpoint folder
}
DOMAINS = {  # config["script"] -> the train script whose EVAL options and evaluate() score its checkpoints
    "train_arc": train_arc,
    "train_eeg": train_eeg,
    "train_mri": train_mri,
    "train_stl10": train_stl10,
    "train_vae": train_vae,
}


def print_help():
    print(__doc__.strip() + "\n")
    common.print_help({**GENERIC, "__file__": __file__, "__options__": "GENERIC"}, "every checkpoint")
    for script, module in DOMAINS.items():
        print()
        options = {**module.EVAL, "__file__": module.__file__, "__options__": "EVAL"}
        common.print_help(options, f"{script} checkpoints ({script}.py)")


def rebuild(ckpt_dir, config, which):
    """models.make_model(model, size, **model_kw) from the stored config, with the `which` (ema | model) weights;
    stops with a one-line error when the config cannot build it or a weight is not finite."""
    missing = [k for k in ("model", "size", "model_kw") if k not in config]
    if missing:
        common.die(f"{ckpt_dir}: the stored config has no {', '.join(missing)}, so the network cannot be rebuilt")
    try:
        model = models.make_model(config["model"], config["size"], **config["model_kw"])
    except (ValueError, TypeError) as e:
        common.die(f"{ckpt_dir}: cannot rebuild model={config['model']!r} size={config['size']!r} ({e})")
    common.load_weights(ckpt_dir, model, which)
    bad = common.first_non_finite(model.state_dict())
    if bad is not None:
        path = os.path.join(ckpt_dir, f"{which}.safetensors")
        common.die(f"{path} has non-finite values (NaN or inf), e.g. in {bad}; not evaluated")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def main(argv):
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print_help()
        return
    ckpt_dir = common.resolve_checkpoint(argv[0])
    config = common.load_config(ckpt_dir)
    script = config.get("script", "")
    if script not in DOMAINS:
        common.die(
            f"{ckpt_dir} was written by {script!r}, which evaluate.py does not know; known: {', '.join(DOMAINS)}"
        )
    module = DOMAINS[script]
    opts = common.apply_overrides({**GENERIC, **module.EVAL}, argv[1:])
    if opts["weights"] not in ("ema", "model"):
        common.die(f"weights={opts['weights']!r}: choose ema or model")
    model = rebuild(ckpt_dir, config, opts["weights"])
    opts["checkpoint"] = ckpt_dir  # where a latent run's autoencoder.safetensors lies
    out_dir = opts["out"] or ckpt_dir
    os.makedirs(out_dir, exist_ok=True)
    result, files = module.evaluate(model, config, opts, out_dir)
    path = os.path.join(out_dir, "eval.json")
    with open(path, "w") as f:
        json.dump({"checkpoint": ckpt_dir, "script": script, "options": opts, **result}, f, indent=1)
    for k, v in result.items():
        if not isinstance(v, (dict, list)):
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    for p, what in [(path, "the scores, the checkpoint and the options"), *files]:
        print(f"wrote {p}: {what}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
