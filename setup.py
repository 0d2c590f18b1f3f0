"""Build fusedres and its extension fusedres._C.

Always builds the C++ CPU kernels; adds the CUDA kernels when the installed torch has CUDA and
nvcc is found. Environment overrides:
  FUSEDRES_FORCE_CUDA=1        build the CUDA kernels even without a visible CUDA torch / GPU
  FUSEDRES_SKIP_CUDA_BUILD=1   never build them
  TORCH_CUDA_ARCH_LIST         target GPUs (default "8.0;9.0+PTX": A100, H100 and PTX for newer)
  MAX_JOBS                     parallel compile jobs (default: from cores and memory)
  CUDA_HOME                    the CUDA toolkit (default: the one the `nvcc` on PATH belongs to)
Build with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup


def _toolkit_of_nvcc():
    """(toolkit folder, how it was found) of the `nvcc` on PATH, or (None, why not).

    torch's extension builder takes the parent of nvcc's folder as CUDA_HOME, which is wrong where
    nvcc is reached through a link or a wrapper script outside its toolkit (/usr/local/bin/nvcc
    running /usr/local/cuda-13.0/bin/nvcc: the link then fails with `cannot find -lcudart`). nvcc
    itself says where it lives: its --dryrun prints `TOP=<toolkit>/bin/..`."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "no nvcc on PATH"
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stderr + dry.stdout, re.MULTILINE)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{nvcc} --dryrun failed ({e})"
    home = os.path.realpath(top.group(1).strip()) if top else os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return home, f"from {nvcc}" + (" (--dryrun TOP)" if top else " (resolved path)")


# Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    _home, _how = _toolkit_of_nvcc()
    if _home is not None:
        os.environ["CUDA_HOME"] = _home
    CUDA_HOME_SOURCE = _how
else:
    CUDA_HOME_SOURCE = "from the CUDA_HOME / CUDA_PATH variable"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pip's isolated build env has no torch; installing one there would pull GBs
    sys.exit("fusedres: torch must be installed first; then build with "
             "`pip install --no-build-isolation .`")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_decision():
    if _flag("FUSEDRES_SKIP_CUDA_BUILD"):
        return False, "skipped: FUSEDRES_SKIP_CUDA_BUILD is set"
    if _flag("FUSEDRES_FORCE_CUDA"):
        return True, "forced by FUSEDRES_FORCE_CUDA"
    if torch.version.cuda is None:
        return False, f"skipped: torch {torch.__version__} is a CPU-only build"
    if CUDA_HOME is None:
        return False, "skipped: nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, toolkit {CUDA_HOME} ({CUDA_HOME_SOURCE})"


def _default_jobs():
    # nvcc with heavy templates takes ~1.5 GB per job; leave the rest of the machine usable.
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 4.0
    return max(1, min(cores, int(mem_gb // 1.5)))


def _extension():
    with_cuda, why = _cuda_decision()
    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # the language standard is torch.utils.cpp_extension's choice (C++20 since 2.10).
    # -fno-trapping-math: floating-point operations may run where a branch would have skipped them
    # (no trap is ever enabled), so a select such as LeakyReLU's u > 0 ? u : u * slope becomes a
    # vector blend instead of a branch per element (10 ms -> under 1 ms over 2.4M values);
    # -fno-math-errno: libm calls need not set errno. Neither changes a value: IEEE results, NaN kept.
    cxx_flags = ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))]
        ext = CUDAExtension(
            "fusedres._C", sources,
            define_macros=[("FUSEDRES_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        ext = CppExtension("fusedres._C", sources, extra_compile_args={"cxx": cxx_flags})
    os.environ.setdefault("MAX_JOBS", str(_default_jobs()))
    print(f"fusedres build: CPU kernels: yes; CUDA kernels: {'yes' if with_cuda else 'no'} ({why})"
          + (f"; TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}" if with_cuda else "")
          + f"; MAX_JOBS={os.environ['MAX_JOBS']}", flush=True)
    return ext


setup(
    name="fusedres",
    version="0.1.0",
    description="Fused BatchNorm/ReLU/residual kernels and drop-in ResNet blocks for PyTorch",
    packages=find_packages(include=["fusedres", "fusedres.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "packaging"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # one build folder per torch: builds against two torches (scripts/test.sh's two stages) never
    # share objects, and a rebuild against the same torch reuses its own
    options={"build": {"build_base": os.path.join("build", f"torch-{torch.__version__}")}},
    zip_safe=False,
)
