import subprocess
import sys


def test_import_is_light():
    """`import mini_unlearn_jax` loads JAX and its own modules, not the evaluation or data stacks."""
    code = ("import sys, mini_unlearn_jax; "
            "print(' '.join(m for m in ('sklearn', 'scipy', 'matplotlib', 'tensorflow', 'tensorflow_datasets') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", f"loaded at import: {proc.stdout.strip()}"
