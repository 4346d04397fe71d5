"""Process set-up for the command line: JAX's persistent compilation cache, quiet logs, a Ctrl-C
that a garbage-collector callback cannot swallow.

Library code never calls this; the CLI does, once, before it compiles anything. Users of the
Python API who want the same cache call :func:`enable_compilation_cache` themselves (or set
``JAX_COMPILATION_CACHE_DIR``).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

_IMPORTED = time.perf_counter()

CACHE_ENV = "MINI_UNLEARN_CACHE_DIR"  # a directory, or "off" to disable the persistent cache

_counts = {"hits": 0, "misses": 0}
_listening = False


def default_cache_dir() -> Path | None:
    """``$MINI_UNLEARN_CACHE_DIR``, else ``$JAX_COMPILATION_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/mini-unlearn/jax`` (``~/.cache/...``); None when set to ``off``."""
    value = os.environ.get(CACHE_ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if value:
        return None if value.lower() in ("off", "0", "none", "") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mini-unlearn" / "jax"


def _on_event(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        _counts["misses"] += 1


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache at ``path`` (default :func:`default_cache_dir`)
    for every program, however quick to compile, and count its hits and misses."""
    import jax

    global _listening
    cache = Path(path) if path is not None else default_cache_dir()
    if cache is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    return cache


def cache_counts() -> dict[str, int]:
    """Persistent-cache hits and misses seen by this process since the cache was enabled."""
    return dict(_counts)


def quiet_third_party_logs() -> None:
    """Silence library chatter a CLI user cannot act on (orbax's read-only manager notices,
    TensorFlow's start-up lines); errors still show."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # absl comes with orbax; nothing to quiet without it
        pass


def process_wall_s() -> float:
    """Seconds since this process started (interpreter start-up and imports included), read from
    ``/proc``; elsewhere, seconds since this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


@contextlib.contextmanager
def interrupts_not_lost(retry_s: float = 0.1):
    """Within the block, a Ctrl-C that Python would swallow is delivered again.

    Python raises ``KeyboardInterrupt`` at whatever bytecode runs when the signal arrives. If that
    is a garbage-collector callback (JAX registers one), a finaliser or a weakref callback, the
    exception is "ignored" (printed to stderr) and the program carries on: a long training run
    then ignores the user's Ctrl-C. Here such an ignored ``KeyboardInterrupt`` is noted by
    ``sys.unraisablehook`` and a watcher thread raises it again in the main thread
    (``_thread.interrupt_main``) within ``retry_s`` seconds, from outside the callback, where it
    propagates as usual. Any other ignored exception goes to the previous hook unchanged.

    The CLI enters it as ``main`` starts; a Ctrl-C during the package's own imports (the first
    second of the process, before any of its code runs) behaves as in plain Python.
    """
    swallowed = threading.Event()
    done = threading.Event()
    previous = sys.unraisablehook

    def hook(unraisable):
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            swallowed.set()
            return
        previous(unraisable)

    def watch():
        while not done.wait(retry_s):
            if swallowed.is_set():
                swallowed.clear()
                _thread.interrupt_main()

    watcher = threading.Thread(target=watch, name="mini-unlearn-interrupts", daemon=True)
    sys.unraisablehook = hook
    watcher.start()
    try:
        yield
    finally:
        done.set()
        sys.unraisablehook = previous
        watcher.join()
