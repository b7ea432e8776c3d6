"""Build the Cython extensions in cython_ext/ as modules of ``sensorhub._ext``.

The ``.pyx`` sources live in ``cython_ext/``; their ``.pxd`` C-level APIs are
copied into a build include tree under the package path so that one extension
can ``cimport sensorhub._ext.<name>`` from another.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

HERE = Path(__file__).resolve().parent
SRC = Path("cython_ext")
INCLUDE = Path("build") / "cython_include"


def _copy_if_changed(src: Path, dst: Path) -> None:
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)


def _extensions(cythonized: bool = True) -> list[Extension]:
    pkg_inc = HERE / INCLUDE / "sensorhub" / "_ext"
    pkg_inc.mkdir(parents=True, exist_ok=True)
    for d in (pkg_inc.parent, pkg_inc):
        (d / "__init__.pxd").touch()
    # copied only when changed: a fresh mtime would make Cython rebuild everything
    for pxd in (HERE / SRC).glob("*.pxd"):
        _copy_if_changed(pxd, pkg_inc / pxd.name)
    for pyi in (HERE / SRC).glob("*.pyi"):
        _copy_if_changed(pyi, HERE / "sensorhub" / "_ext" / pyi.name)
    extra = ["-O3"] if os.name == "posix" else []
    exts = []
    only = {n for n in os.environ.get("SENSORHUB_BUILD_ONLY", "").split(",") if n}
    for pyx in sorted((HERE / SRC).glob("*.pyx")):
        if only and pyx.stem not in only:
            continue
        libs = ["z"] if pyx.stem in {"frame"} else []
        exts.append(
            Extension(
                f"sensorhub._ext.{pyx.stem}",
                [str(SRC / pyx.name)],
                include_dirs=[str(SRC)],
                libraries=libs,
                extra_compile_args=extra,
            )
        )
    if not cythonized:
        return exts
    from Cython.Build import cythonize

    return cythonize(
        exts,
        language_level=3,
        include_path=[str(INCLUDE), str(SRC)],
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    )


class build_ext(_build_ext):  # noqa: N801 - setuptools command name
    """Cythonizes only when extensions are actually built, not for metadata."""

    def finalize_options(self) -> None:
        self.distribution.ext_modules = _extensions()
        super().finalize_options()
        if not self.parallel:  # compile the extensions on every core (-j N still wins)
            self.parallel = os.cpu_count() or 1


setup(ext_modules=_extensions(cythonized=False), cmdclass={"build_ext": build_ext})
