"""The pure-JAX core: objectives and models, the snapshot buffer, training, linear algebra, the
Mini-Unlearning solver, trajectory unlearning, the baselines and the method registry.

Nothing here imports argparse, orbax, scikit-learn, scipy, matplotlib or the ``evaluation`` and
``app`` layers (``tests/test_imports.py`` checks it).
"""
