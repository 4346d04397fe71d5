"""Run or resume the experiment grid described by a TOML file (default: experiments/grid/grid.toml).

    python experiments/grid/run.py experiments/grid/grid.toml
"""

import sys

from mini_unlearn_jax.app.harness import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["experiments/grid/grid.toml"]))
