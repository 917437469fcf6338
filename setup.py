"""Build for madtp-kernels: pure Python everywhere, plus madtp_kernels._C where nvcc and a CUDA torch exist.

MADTP_KERNELS_BUILD_CUDA=1 forces the extension (and fails loudly without nvcc), =0 skips it.
The extension compiles against the torch it will run with: install with `pip install --no-build-isolation .`.
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

packages = find_packages(include=["madtp_kernels", "madtp_kernels.*"])
packages += ["madtp" + p[len("madtp"):] for p in find_packages("python", include=["madtp", "madtp.*"])]

ROOT = os.path.dirname(os.path.abspath(__file__))


class SkipCuda(Exception):
    """Why madtp_kernels._C cannot be built here."""


def _nvidia_dirs(package):
    """Directories of an `nvidia.<package>` wheel (namespace package: possibly several)."""
    try:
        spec = importlib.util.find_spec(f"nvidia.{package}")
    except ModuleNotFoundError:  # no nvidia.* wheel at all
        return []
    return list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []


def _find_dir(candidates, filename, what):
    for d in candidates:
        if os.path.isfile(os.path.join(d, filename)):
            return d
    raise SkipCuda(f"{what} ({filename}) not found in {candidates or 'any nvidia.* wheel'}")


def _guess_cuda_home():
    """Toolkit root from nvcc itself when CUDA_HOME is unset: nvcc on PATH may be a wrapper script outside
    the toolkit (here /usr/local/bin/nvcc), and torch would then take /usr/local for CUDA_HOME."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return
    try:
        out = subprocess.run(["nvcc", "-dryrun", "-E", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            os.environ["CUDA_HOME"] = os.path.normpath(line[len("#$ TOP="):].strip())
            return


def _cuda_extension():
    _guess_cuda_home()  # before torch.utils.cpp_extension reads CUDA_HOME at import
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        raise SkipCuda(f"torch is not importable ({e}); install with `pip install --no-build-isolation .`") from e
    # torch adds --expt-relaxed-constexpr to every nvcc call; the kernels do not need it (their constexpr tile
    # math is __host__ __device__), and without it a host-only constexpr called from device code is an error
    # here instead of a silent host call. torch's own headers then warn (BFloat16.h), harmlessly: no kernel
    # here calls them on the device.
    from torch.utils import cpp_extension
    if "--expt-relaxed-constexpr" in cpp_extension.COMMON_NVCC_FLAGS:
        cpp_extension.COMMON_NVCC_FLAGS.remove("--expt-relaxed-constexpr")
    if torch.version.cuda is None:
        raise SkipCuda(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc")):
        raise SkipCuda("nvcc not found (set CUDA_HOME to the directory above its bin/)")
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        raise SkipCuda(f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit root)")

    # cuSPARSELt comes from the nvidia-cusparselt wheel torch depends on; its header includes cusparse.h,
    # which a CUDA toolkit may lack (13.0's does) and torch's nvidia/cu<major> wheel has.
    lt_root = _find_dir(_nvidia_dirs("cusparselt"), os.path.join("include", "cusparseLt.h"), "cuSPARSELt")
    lt_lib = os.path.join(lt_root, "lib")
    if not os.path.isfile(os.path.join(lt_lib, "libcusparseLt.so.0")):
        raise SkipCuda(f"libcusparseLt.so.0 not found in {lt_lib}")
    nvidia_roots = [os.path.dirname(d) for d in _nvidia_dirs("cusparselt")]
    cusparse_inc = _find_dir(
        [os.path.join(CUDA_HOME, "include")]
        + sorted(d for r in nvidia_roots for d in glob.glob(os.path.join(r, "*", "include"))),
        "cusparse.h", "cuSPARSE header",
    )

    csrc = "csrc"
    # SASS for the archs tuned for, plus PTX of the newest so that the driver JIT-compiles it on GPUs newer than
    # sm_90 (sm_100, sm_120: without it the first launch fails with "no kernel image"). compute_90, not 90a:
    # arch-specific PTX would load only on sm_90. The list is embedded in _C (ops.cpp's cuda_archs) for the
    # dispatcher.
    gencode = [("compute_80", "sm_80"), ("compute_90a", "sm_90a"), ("compute_90", "compute_90")]
    archs = ",".join(code for _, code in gencode)  # no spaces or quotes: the flag goes through ninja and a shell
    ext = CUDAExtension(
        name="madtp_kernels._C",
        sources=[os.path.join(csrc, f) for f in ("module.cpp", "ops.cpp", "cusparselt.cpp", "sparse_gemm.cpp",
                                                       "token_ops.cu", "prune_ops.cu", "varlen_attention.cu")],
        include_dirs=[os.path.join(ROOT, csrc, "include"), os.path.join(lt_root, "include")],
        extra_compile_args={
            # cusparse.h (needed by cusparseLt.h and ATen's CUDAContext.h) via -isystem: searched after every
            # -I, so the toolkit's own headers keep priority over the wheel's copies of them.
            # No -std: torch's BuildExtension adds the one its headers need (C++20 for torch 2.14).
            # MADTP_CUDA_ARCHS: for ops.cpp (C++ only; nvcc would split the commas of a -D into several macros).
            "cxx": ["-O3", "-isystem", cusparse_inc, f"-DMADTP_CUDA_ARCHS={archs}"],
            # No --use_fast_math: it flushes denormals, which would change the keep comparison and the
            # exact-zero weight-sum test against the torch/Triton backends.
            "nvcc": [
                "-O3", "-Xptxas=-v", "--threads=2", "-isystem", cusparse_inc,
                *(flag for arch, code in gencode for flag in ("-gencode", f"arch={arch},code={code}")),
            ],
        },
        library_dirs=[lt_lib],
        # -l: names the versioned file: the wheel ships no unversioned libcusparseLt.so. The rpath finds the
        # wheel from site-packages/madtp_kernels/_C*.so (torch also loads it first, by the same soname).
        extra_link_args=["-l:libcusparseLt.so.0", "-Wl,-rpath,$ORIGIN/../nvidia/cusparselt/lib"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _extension_and_cmdclass():
    flag = os.environ.get("MADTP_KERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        print("madtp-kernels: MADTP_KERNELS_BUILD_CUDA=0: not building madtp_kernels._C (pure Python install)")
        return [], {}
    try:
        return _cuda_extension()
    except SkipCuda as e:
        if flag == "1":
            sys.exit(f"madtp-kernels: MADTP_KERNELS_BUILD_CUDA=1 but madtp_kernels._C cannot be built: {e}")
        print(f"madtp-kernels: not building madtp_kernels._C: {e} (pure Python install)")
        return [], {}


ext_modules, cmdclass = _extension_and_cmdclass()

setup(
    packages=packages,
    package_dir={"madtp": "python/madtp"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
