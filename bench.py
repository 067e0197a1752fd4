"""Performance benchmarks; never part of the test pass/fail.

    python bench.py samplers     # distribution error against NFE for every sampler (2D Gaussian mixture)
    python bench.py arc          # ARC training examples/s and peak memory per preset
    python bench.py models       # image backbones: train / sample samples/s and peak memory

Each prints a table and writes bench_<name>.json (key out_dir=... to choose the folder).
"""

import sys

import common

# ----------------------------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# arc
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------

BENCHES = {  # name -> function(argv)
}


def main(argv):
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            common.die(f"unknown benchmark {argv[0]!r}; choose one of {sorted(BENCHES)}")
        return
    BENCHES[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
