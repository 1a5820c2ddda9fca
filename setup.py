"""Build hook for the optional native extension moe_prefetch._C (csrc/).

`pip install .` must always succeed, with or without a compiler, CUDA or even torch in the build
environment, because every native op has a PyTorch twin (moe_prefetch/_native.py). So:
  - MOE_PREFETCH_BUILD_EXT=0, or torch not importable (pip's default build isolation): no extension;
  - a CUDA build of torch and a CUDA toolkit (nvcc): CUDAExtension, host ops + the CUDA staging ring;
  - otherwise: CppExtension, host ops only;
  - a compiler that is missing or fails: a warning, and the package installs without the extension.
To build it with pip, let the build see your torch: `pip install --no-build-isolation .`
(or compile later, just in time: `python -m moe_prefetch._native --build`).
"""
import os
import sys

from setuptools import setup


def _ext_modules():
    if os.environ.get("MOE_PREFETCH_BUILD_EXT", "1") == "0":
        return [], {}
    csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    if not os.path.isdir(csrc):
        return [], {}
    try:  # torch may be absent under pip's build isolation: then skip, never fail
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception:  # noqa: BLE001 - any import problem means "no extension", not a failed install
        print("moe_prefetch: torch is not importable at build time; skipping the native extension "
              "(use pip install --no-build-isolation . to build it)", file=sys.stderr)
        return [], {}

    rel = os.path.relpath(csrc)  # setuptools wants relative source paths
    cpp = sorted(os.path.join(rel, f) for f in os.listdir(csrc) if f.endswith(".cpp"))
    cu = sorted(os.path.join(rel, f) for f in os.listdir(csrc) if f.endswith(".cu"))
    cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None
    # same flags as the just-in-time build (moe_prefetch/_native.py: compile_flags)
    flags = {"cxx": ["-O3", "-fvisibility=hidden"] + (["-DMOE_PREFETCH_WITH_CUDA"] if cuda else []),
             "nvcc": ["-O3", "-Xcompiler", "-fvisibility=hidden"]}
    if cuda:
        ext = CUDAExtension("moe_prefetch._C", cpp + cu, include_dirs=[csrc], extra_compile_args=flags)
    else:
        ext = CppExtension("moe_prefetch._C", cpp, include_dirs=[csrc], extra_compile_args=flags)

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that warns and skips instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - no compiler, missing headers, ninja or link errors
                self._skip(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._skip(e)

        def get_outputs(self):  # a skipped extension has no file to install
            return [p for p in super().get_outputs() if os.path.exists(p)]

        @staticmethod
        def _skip(e):
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            print(f"WARNING: moe_prefetch: building the native extension failed ({type(e).__name__}: {msg}); "
                  "installing without it: the PyTorch reference copies will be used", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
