"""Build hook for the optional native extension (csrc/).

`pip install .` must always succeed, with or without a compiler, CUDA or even torch in the build
environment. The extension is therefore built only when torch's C++ extension tooling is importable
and MOE_PREFETCH_BUILD_EXT is not "0"; otherwise the pure-PyTorch reference twins are used at run time.
Until the native ops land (see csrc/README.md), no extension is declared.
"""
import os

from setuptools import setup


def _ext_modules():
    if os.environ.get("MOE_PREFETCH_BUILD_EXT", "1") == "0":
        return [], {}
    sources = [os.path.join("csrc", f) for f in sorted(os.listdir("csrc")) if f.endswith((".cpp", ".cu"))] if os.path.isdir("csrc") else []
    if not sources:
        return [], {}
    try:  # torch may be absent under pip's build isolation: then skip, never fail
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception:
        return [], {}
    cpp = [s for s in sources if s.endswith(".cpp")]
    return [CppExtension("moe_prefetch._C", cpp, extra_compile_args=["-O3"])], {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
