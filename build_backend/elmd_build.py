"""elmd's build backend: setuptools', except that a wheel carries the native CPU kernels
compiled (elmd/engine/kernels/native.py prebuild), for every build of the machine's
architecture (x86-64's three, ARM64's neon), against the torch that pyproject.toml pins. A
wheel install then runs them from its first token, with no compiler; an editable install or an
sdist builds them at first use, as before. Such a wheel is tagged for the Python and the
platform it was built on (cp311-cp311-linux_x86_64, say), as one with extension modules is:
its kernels link torch's Python bindings.

Only building a wheel needs torch (and ninja) in the build environment; an editable install
does not pull them in."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 (sdist, editable and metadata hooks as setuptools has them)

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the kernels' ABI: the version pyproject.toml pins (tests/test_packaging.py checks)


def _builds_kernels() -> bool:
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64", "aarch64")


def get_requires_for_build_wheel(config_settings=None):
    extra = [TORCH, "ninja>=1.11"] if _builds_kernels() else []
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *extra]


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    if _builds_kernels():
        sys.path.insert(0, str(ROOT))
        from elmd.engine.kernels import native

        for library in native.prebuild():
            print(f"elmd: compiled {library.name}", file=sys.stderr)
        from setuptools.dist import Distribution

        Distribution.has_ext_modules = lambda self: True  # bdist_wheel: not pure, tagged for this platform
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
