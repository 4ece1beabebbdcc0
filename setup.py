"""Build gendd_fast, with its sampler extension ``gendd_fast._C`` when a compiler is there.

The extension is a CUDA extension where a CUDA toolkit and a CUDA build of torch exist and a C++
(CPU) extension otherwise. A failed build never fails the install: the package then compiles the
extension on first use (torch.utils.cpp_extension.load + ninja), or falls back to the pure-PyTorch
sampler with a one-line notice. Set GENDD_FAST_NO_EXT=1 to skip the build.
Torch is needed at build time, so install with ``pip install --no-build-isolation -e .``.
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def extension_modules():
    if os.environ.get("GENDD_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except ImportError:
        print("gendd_fast: torch is not importable at build time; the sampler extension will "
              "be compiled on first use (build with --no-build-isolation to avoid this)",
              file=sys.stderr)
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    cxx = ["-O3", "-std=c++17"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("GENDD_FAST_FORCE_CPU_EXT") != "1")
    if with_cuda:
        ext = CUDAExtension("gendd_fast._C", cpp + cu, define_macros=[("WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math"]},
                            include_dirs=[os.path.join(here, "csrc")])
    else:
        ext = CppExtension("gendd_fast._C", cpp, extra_compile_args=cxx,
                           include_dirs=[os.path.join(here, "csrc")])

    class OptionalBuildExt(BuildExtension):
        """Turn a compiler failure into a notice: the package works without the extension."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure means "no prebuilt ext"
                print(f"gendd_fast: building the sampler extension failed ({e}); it will be "
                      f"compiled on first use or the PyTorch sampler will run", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

# kernels/, csrc/ and configs/ sit at the top of the repository (the layout README.md's table
# describes) and are mapped into the package here, so an installed copy has gendd_fast.kernels,
# gendd_fast/csrc and gendd_fast/configs; a source checkout finds them through gendd_fast/layout.py
# (whose MAPPED names the same three folders).
MAPPED = {"gendd_fast.kernels": "kernels", "gendd_fast.csrc": "csrc",
          "gendd_fast.configs": "configs"}

setup(
    packages=find_packages(include=["gendd_fast", "gendd_fast.*"]) + sorted(MAPPED),
    package_dir=MAPPED,
    package_data={"gendd_fast.csrc": ["*.cpp", "*.h", "*.cu"], "gendd_fast.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
