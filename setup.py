"""Build and install l2c_kernels.

    pip install --no-build-isolation .            # or -e . for development

`--no-build-isolation` builds the extension against the torch already installed (an isolated
build would download another torch). What gets built:

* always: the C++ CPU kernels, extension module ``l2c_kernels._C``;
* CUDA kernels in the same module, when ``torch.version.cuda`` is set (a CUDA build of torch)
  and a CUDA toolkit is found (``CUDA_HOME``, or ``nvcc`` on PATH). No GPU is needed or probed.

Environment variables:

    L2C_SKIP_CUDA_BUILD=1   build the CPU kernels only
    L2C_FORCE_CUDA_BUILD=1  fail (with the reason) unless the CUDA kernels can be built
    TORCH_CUDA_ARCH_LIST    CUDA architectures, default "8.0;9.0"
    L2C_ALLOW_NO_EXT=1      if the extension cannot be built, install the pure-Python package
                            (l2c_kernels.build_info() then reports the missing extension)
    L2C_DEBUG=1             -O0 with debug info (default: -O3, no debug info)
    MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


ALLOW_NO_EXT = _env_flag("L2C_ALLOW_NO_EXT")
SKIP_CUDA = _env_flag("L2C_SKIP_CUDA_BUILD")
DEBUG = _env_flag("L2C_DEBUG")
FORCE_CUDA = _env_flag("L2C_FORCE_CUDA_BUILD")


def _warn(msg: str) -> None:
    print(f"l2c_kernels setup: {msg}", file=sys.stderr)


try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # torch missing: typically pip's isolated build environment
    if not ALLOW_NO_EXT:
        raise RuntimeError(
            "l2c_kernels builds its C++/CUDA extension against the installed torch, which could "
            "not be imported. Install torch first, then build without isolation:\n"
            "    pip install torch && pip install --no-build-isolation .\n"
            "(L2C_ALLOW_NO_EXT=1 installs the pure-Python package without the extension.)"
        ) from exc
    torch = None
    cpp_extension = None


def _has_cuda_headers(home) -> bool:
    return bool(home) and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))


def _resolve_cuda_home():
    """torch finds CUDA_HOME from $CUDA_HOME, else from `which nvcc` (two levels up), which is wrong
    when nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc). Ask nvcc where it lives then,
    so the C++ sources find cuda_runtime_api.h and the linker finds libcudart."""
    home = cpp_extension.CUDA_HOME
    if _has_cuda_headers(home) or sys.platform == "win32":
        return home
    import shutil
    import subprocess

    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates.append(shutil.which("nvcc"))
    for nvcc in filter(None, candidates):
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                top = os.path.normpath(line.split("TOP=", 1)[1].strip().strip('"'))
                if _has_cuda_headers(top):
                    _warn(f"using CUDA toolkit {top} (CUDA_HOME={home} has no CUDA headers)")
                    cpp_extension.CUDA_HOME = top
                    os.environ["CUDA_HOME"] = top
                    return top
    return home


def _want_cuda() -> bool:
    """Whether to compile the CUDA kernels. Decided from the toolchain only (never a GPU)."""
    if SKIP_CUDA and FORCE_CUDA:
        raise RuntimeError("L2C_SKIP_CUDA_BUILD and L2C_FORCE_CUDA_BUILD are both set; choose one")
    if SKIP_CUDA:
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(
            f"the installed torch {torch.__version__} is not a CUDA build (torch.version.cuda is "
            "None); install a CUDA build of torch"
        )
    elif cpp_extension.CUDA_HOME is None:
        problems.append("no CUDA toolkit found; set CUDA_HOME or put nvcc on PATH")
    elif not _has_cuda_headers(_resolve_cuda_home()):
        problems.append(
            f"the CUDA toolkit at {cpp_extension.CUDA_HOME} has no include/cuda_runtime_api.h; "
            "set CUDA_HOME to a full CUDA toolkit"
        )
    if not problems:
        return True
    if FORCE_CUDA:
        raise RuntimeError("L2C_FORCE_CUDA_BUILD=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
    if torch.version.cuda is not None:  # a CUDA torch without a usable toolkit: say why
        _warn("building without the CUDA kernels: " + "; ".join(problems))
    return False


def _openmp_flags() -> list[str]:
    """-fopenmp when torch's intra-op backend is OpenMP, so at::parallel_for runs on torch's thread
    pool (the extension then links libgomp.so.1, which resolves to the copy torch has loaded).
    Without it at::parallel_for runs serially."""
    if sys.platform != "linux":
        return []
    info = torch.__config__.parallel_info()
    return ["-fopenmp"] if "parallel backend: OpenMP" in info else []


def _write_if_changed(path: str, text: str) -> None:
    """Rewriting an unchanged header would make ninja rebuild everything."""
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _extensions():
    if torch is None:
        return [], {}
    with_cuda = _want_cuda()
    arch_list = ""
    if with_cuda:
        # Never let torch fall back to probing the visible GPUs for their architectures.
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_CUDA_ARCH_LIST
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list

    # Facts of this build, compiled into l2c_kernels._C (see csrc/module.cpp).
    generated = os.path.join("build", "l2c_generated")
    _write_if_changed(
        os.path.join(ROOT, generated, "l2c_build_config.h"),
        "// Written by setup.py.\n#pragma once\n"
        f"#define L2C_BUILD_TORCH_VERSION {_c_string(torch.__version__)}\n"
        f"#define L2C_BUILD_CUDA_ARCHS {_c_string(arch_list)}\n",
    )

    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    # -ffp-contract=off: no FMA contraction, so the default and AVX2 variants of the CPU kernels
    # (csrc/cpu/cpu_common.h) give bit-identical results. No -march: the binary must run on any
    # x86-64 / arm64 CPU torch runs on; AVX2 code is selected at run time.
    openmp = _openmp_flags()
    if sys.platform == "win32":  # MSVC: /fp:precise (the default) does not contract
        cxx_flags = ["/Od", "/Zi"] if DEBUG else ["/O2"]
    else:
        opt = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
        cxx_flags = opt + ["-ffp-contract=off", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"] + openmp
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = [("L2C_WITH_CUDA", "1" if with_cuda else "0")]
    include_dirs = [os.path.join(ROOT, d) for d in ("csrc", "csrc/include", generated)]

    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT)) + ["csrc/cuda_bindings.cpp"]
        extra_compile_args["nvcc"] = (["-O0", "-g"] if DEBUG else ["-O3"]) + ["-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension

    ext = ext_cls(
        name="l2c_kernels._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": _build_ext_class()}


def _build_ext_class():
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """BuildExtension that, with L2C_ALLOW_NO_EXT=1, lets a failed build install without _C."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - compiler errors surface as many types
                if not ALLOW_NO_EXT:
                    raise
                _warn(
                    f"building l2c_kernels._C failed ({type(exc).__name__}: {exc}); installing "
                    "without it because L2C_ALLOW_NO_EXT=1. l2c_kernels.build_info() will report "
                    "the missing extension."
                )

    return BuildExt


def _readme() -> str:
    try:
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


ext_modules, cmdclass = _extensions()

setup(
    name="l2c_kernels",
    version="0.1.0",
    description=(
        "Faster sampling for diffusion transformers with learned static cache schedules, "
        "run by fused C++/CUDA/Triton kernels"
    ),
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["l2c_kernels", "l2c_kernels.*"]),
    package_data={"l2c_kernels": ["models/weights/*.safetensors", "models/weights/*.json"]},
    install_requires=[
        "torch>=2.4",
        "diffusers==0.42.1",
        # run time: diffusers' PixArt / SD3 / Flux / Wan pipelines (``l2c learn --pipeline``,
        # ``flux_digits.flux_pipeline``) build their text encoders and tokenizers with it
        "transformers",
        "safetensors",
        "scikit-learn",
        "tqdm",
        "matplotlib",
        "pillow",
        "numpy",
    ],
    extras_require={
        # cache-dit and tgate: the dynamic-cache and T-GATE packages the comparison tests and benchmarks run against
        "test": ["pytest", "pytest-benchmark", "hypothesis", "triton", "cache-dit", "tgate"],
        "bench": ["pytest-benchmark", "cache-dit", "tgate"],
    },
    entry_points={"console_scripts": ["l2c = l2c_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
