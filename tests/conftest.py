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

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _persistent_cache_only_inside_cli_tests():
    """An in-process CLI call turns JAX's persistent compilation cache on for the whole process;
    turn it off again after each test, so that the other tests' programs are not serialised into
    it. (Serialising some CPU executables has crashed jaxlib's writer: a user-loop program of
    tests/test_user_model.py segfaulted in executable.serialize() once in a fresh CI run.)"""
    yield
    import jax

    if jax.config.jax_compilation_cache_dir is not None:
        from jax._src import compilation_cache

        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
