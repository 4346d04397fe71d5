import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# the CLI turns on JAX's persistent compilation cache; in tests it lives in a throw-away folder,
# never in the user's ~/.cache
import atexit
import shutil
import tempfile

_cache = tempfile.mkdtemp(prefix="mini-unlearn-test-jax-cache-")
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("MINI_UNLEARN_CACHE_DIR", _cache)
