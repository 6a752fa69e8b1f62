"""Builds dinv._C: the C++ kernels (CPU, OpenMP) always, the CUDA kernels too when both a CUDA
toolkit and a CUDA build of torch are present.

Environment knobs:
  DINV_BUILD_CUDA=0|1   force the CUDA part off (0) or require it (1); default: auto.
  CUDA_HOME             toolkit root; default: found behind the real nvcc (see find_cuda_home).
  TORCH_CUDA_ARCH_LIST  default when no GPU is visible: DEFAULT_CUDA_ARCHS.
"""
import glob
import os
import re
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

# Volta is gone from CUDA 13; Ampere (8.0), Ada (8.9) and Hopper (9.0) cover the cards people run
# this on, and the PTX of 9.0 lets newer cards JIT.
DEFAULT_CUDA_ARCHS = "8.0;8.9;9.0+PTX"


def find_cuda_home():
    """The toolkit root (the folder holding bin/nvcc and include/cuda_runtime.h).

    The nvcc on PATH may be a wrapper script (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`), in which
    case its parent's parent is not the toolkit: follow symlinks, then look inside scripts."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(real)
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                candidates += re.findall(r"(/[^\s\"']*/bin/nvcc)\b", head.decode(errors="ignore"))
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    for path in candidates:
        root = os.path.dirname(os.path.dirname(os.path.realpath(path)))
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def pip_cuda_include_dirs(torch_dir):
    """Headers of pip's nvidia-* CUDA 13 wheels, which the CUDA build of torch is linked against:
    beside torch (also inside pip's isolated build environment) or in site-packages."""
    bases = {os.path.dirname(torch_dir), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"]}
    return sorted({d for base in bases
                   for d in glob.glob(os.path.join(base, "nvidia", "cu13", "include"))})


def extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils import cpp_extension

    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home

    want = os.environ.get("DINV_BUILD_CUDA", "auto")
    why_not = None
    if want == "0":
        why_not = "DINV_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU build"
    elif cuda_home is None:
        why_not = "no CUDA toolkit found (set CUDA_HOME)"
    use_cuda = why_not is None
    if want == "1" and not use_cuda:
        sys.exit(f"dinv: DINV_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(f"dinv: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
              f"archs {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPUs')})")
    else:
        print(f"dinv: building the CPU kernels only: {why_not}")

    sources = sorted(glob.glob("csrc/*.cpp"))
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # No -std: BuildExtension adds the standard the installed torch needs (C++20 for 2.14).
    # -fno-trapping-math lets GCC turn the selects of the polynomial exp/log (csrc/dinv_cpu.h) into
    # vector blends; values are unchanged (nothing here enables floating-point traps).
    cxx_flags = ["-O3", "-fno-trapping-math"] + openmp
    kwargs = dict(
        name="dinv._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=openmp,
        py_limited_api=True,  # BuildExtension then defines Py_LIMITED_API
    )
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["include_dirs"] += pip_cuda_include_dirs(os.path.dirname(torch.__file__))
        kwargs["extra_compile_args"] = {
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        }
        return cpp_extension.CUDAExtension(sources=sources, **kwargs), cpp_extension
    kwargs["extra_compile_args"] = {"cxx": cxx_flags}
    return cpp_extension.CppExtension(sources=sources, **kwargs), cpp_extension


ext, cpp_extension = extension()


class BuildExtension(cpp_extension.BuildExtension):
    """Falls back to the CPU kernels when the CUDA part fails to compile (unless
    DINV_BUILD_CUDA=1), so the package still installs, and says why."""

    def build_extension(self, extension):
        try:
            super().build_extension(extension)
        except Exception as error:  # noqa: BLE001 - any compiler failure, reported below
            cuda_sources = [s for s in extension.sources if s.endswith(".cu")]
            if not cuda_sources or os.environ.get("DINV_BUILD_CUDA") == "1":
                raise
            print(f"dinv: WARNING: the CUDA kernels failed to build ({error}); installing the CPU "
                  "kernels only. Set DINV_BUILD_CUDA=1 to make this an error.", file=sys.stderr)
            extension.sources = [s for s in extension.sources if not s.endswith(".cu")]
            super().build_extension(extension)


setup(
    packages=find_packages(include=["dinv", "dinv.*"]) + ["dinv.kernels"],
    package_dir={"dinv.kernels": "kernels"},
    package_data={"dinv.models": ["weights/*.pt"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
