"""Rebuild any checkpoint from its own metadata, sample, score and plot.

    python evaluate.py runs/arc                 # newest checkpoint of a run (OUT_DIR/latest)
    python evaluate.py runs/arc/step_0002000 n_samples=64

The checkpoint's config (stored in model.safetensors metadata) says which script trained it; the matching
evaluation below runs, with `key=value` overrides of its own constants.
"""

import sys

import common

# ----------------------------------------------------------------------------------------------------------------
# ARC: pass@2 on the evaluation set (train_arc.py)
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Images: FD-EffNet / KID-EffNet (train_stl10.py)
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------

EVALUATORS = {  # config["script"] -> function(ckpt_dir, config, argv)
}


def main(argv):
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    ckpt_dir = common.resolve_checkpoint(argv[0])
    config = common.load_config(ckpt_dir)
    script = config.get("script", "")
    if script not in EVALUATORS:
        common.die(f"{ckpt_dir} was written by {script!r}, which evaluate.py does not know; known: {sorted(EVALUATORS)}")
    EVALUATORS[script](ckpt_dir, config, argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
