"""The compiled extension: it is built and imported, registers torch.ops.l2c with the expected
schemas, reports its build facts, and the CUDA sources compile (when nvcc is available)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2c_kernels._build import OPS, build_info, has_cpu_kernels, has_cuda_kernels, load_extension

ROOT = Path(__file__).resolve().parents[1]

SCHEMAS = {
    "gated_residual_": "l2c::gated_residual_(Tensor(a!) x, Tensor y, Tensor? gate, Tensor(b!)? cache) -> ()",
    "cfg_mean_store_": "l2c::cfg_mean_store_(Tensor(a!) x, Tensor y, Tensor(b!) cache) -> ()",
    "residual_delta_store_": "l2c::residual_delta_store_(Tensor(a!) cache, Tensor out, Tensor inp) -> ()",
    "residual_apply_": "l2c::residual_apply_(Tensor(a!) out, Tensor inp, Tensor cache) -> ()",
    "forecast_residual_": ("l2c::forecast_residual_(Tensor(a!) x, Tensor y0, Tensor y1, Tensor? y2, Tensor? gate, "
                           "float c0, float c1, float c2) -> ()"),
    "adaln_modulate": "l2c::adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor",
}


@pytest.fixture(scope="module")
def info():
    info = build_info()
    assert info["extension_loaded"], f"l2c_kernels._C did not import: {info['extension_error']}"
    return info


def test_extension_imported(info):
    assert info["extension_error"] is None
    assert load_extension() is not None
    assert has_cpu_kernels()
    assert has_cuda_kernels() == info["cuda_kernels"]


def test_ops_registered_with_schemas(info):
    assert set(OPS) == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.l2c, name).default._schema) == schema


def test_kernels_registered_per_backend(info):
    for name in OPS:
        assert info["ops"][name] == (["CPU", "CUDA"] if info["cuda_kernels"] else ["CPU"]), name


def test_build_info_fields(info):
    assert info["torch_version_built"] == torch.__version__, "extension built against another torch"
    assert info["torch_version"] == torch.__version__
    assert info["cpu_vectorization"] in info["cpu_variants"]
    assert "default" in info["cpu_variants"]
    assert info["cpu_parallel"] in ("openmp", "serial")
    assert isinstance(info["cuda_available"], bool)
    assert isinstance(info["triton_available"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and info["cuda_version"]
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_ops_smoke(info, dtype):
    """One call of each op on an odd row length; float32 arithmetic, one rounding per store."""
    g = torch.Generator().manual_seed(0)
    B, N, C = 2, 3, 37
    x, y = (torch.randn(B, N, C, generator=g).to(dtype) for _ in range(2))
    gate, shift, scale = (torch.randn(B, C, generator=g).to(dtype) for _ in range(3))
    f = lambda t: t.float()  # noqa: E731

    xx, cache = x.clone(), torch.empty_like(y)
    torch.ops.l2c.gated_residual_(xx, y, gate, cache)
    assert torch.equal(xx, (f(x) + f(gate)[:, None] * f(y)).to(dtype)) and torch.equal(cache, y)

    xx, half = x.clone(), torch.empty(B // 2, N, C, dtype=dtype)
    torch.ops.l2c.cfg_mean_store_(xx, y, half)
    assert torch.equal(xx, (f(x) + f(y)).to(dtype))
    assert torch.equal(half, ((f(y)[:1] + f(y)[1:]) / 2).to(dtype))

    delta = torch.empty_like(x)
    torch.ops.l2c.residual_delta_store_(delta, x, y)
    assert torch.equal(delta, (f(x) - f(y)).to(dtype))
    out = torch.empty_like(x)
    torch.ops.l2c.residual_apply_(out, y, delta)
    assert torch.equal(out, (f(y) + f(delta)).to(dtype))

    got = torch.ops.l2c.adaln_modulate(x, shift, scale, 1e-6)
    ref = torch.nn.functional.layer_norm(x.double(), (C,), eps=1e-6) * (1 + scale.double()[:, None]) + shift.double()[:, None]
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    assert got.dtype == dtype and got.shape == x.shape
    assert ((got.double() - ref).abs() <= tol * ref.abs() + 1e-4).all()


def test_cpu_argument_checks_name_the_argument(info):
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="'gate' must have shape"):
        torch.ops.l2c.gated_residual_(x, torch.randn(2, 3, 8), torch.randn(3, 8), None)
    with pytest.raises(RuntimeError, match="'y' has dtype"):
        torch.ops.l2c.gated_residual_(x, torch.randn(2, 3, 8, dtype=torch.bfloat16), None, None)
    with pytest.raises(RuntimeError, match="'x' must be contiguous"):
        torch.ops.l2c.adaln_modulate(torch.randn(2, 8, 3).transpose(1, 2), torch.randn(2, 8), torch.randn(2, 8), 1e-6)
    with pytest.raises(RuntimeError, match="batch of 'x' must be even"):
        torch.ops.l2c.cfg_mean_store_(torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.empty(1, 2, 4))
    with pytest.raises(RuntimeError, match="'cache' must not share memory with 'x'"):
        torch.ops.l2c.gated_residual_(x, torch.randn(2, 3, 8), None, x)


_VARIANT_SCRIPT = """
import sys
import torch
from l2c_kernels._build import build_info, load_extension
assert load_extension() is not None
x, y, s, t = torch.load(sys.argv[1])
outs = []
for dtype in (torch.float32, torch.bfloat16):
    xx = x.to(dtype).clone()
    torch.ops.l2c.gated_residual_(xx, y.to(dtype), s.to(dtype), None)
    outs += [xx, torch.ops.l2c.adaln_modulate(x.to(dtype), s.to(dtype), t.to(dtype), 1e-6)]
torch.save({"variant": build_info()["cpu_vectorization"], "outs": outs}, sys.argv[2])
"""


def test_cpu_variants_bit_identical(info, tmp_path):
    """The avx2 and default CPU kernels give the same bits (ATEN_CPU_CAPABILITY=default forces
    the default ones)."""
    if info["cpu_variants"] == ["default"] or info["cpu_vectorization"] == "default":
        pytest.skip("only the default CPU kernels run on this machine")
    # Inputs made here: torch's own random kernels differ between CPU capabilities.
    g = torch.Generator().manual_seed(0)
    inputs = tmp_path / "inputs.pt"
    torch.save([torch.randn(3, 5, 1153, generator=g) for _ in range(2)] + [torch.randn(3, 1153, generator=g) for _ in range(2)], inputs)
    results = {}
    for capability in ("default", None):
        env = dict(os.environ)
        env.pop("ATEN_CPU_CAPABILITY", None)
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability
        path = tmp_path / f"{capability}.pt"
        subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT, str(inputs), str(path)], env=env, check=True, cwd=tmp_path)
        results[capability] = torch.load(path)
    assert results["default"]["variant"] == "default"
    assert results[None]["variant"] == info["cpu_vectorization"]
    for a, b in zip(results["default"]["outs"], results[None]["outs"]):
        assert torch.equal(a, b)


def test_package_works_without_extension(tmp_path):
    """With l2c_kernels._C unavailable, the package imports and build_info reports why."""
    script = (
        "import sys; sys.modules['l2c_kernels._C'] = None\n"
        "import l2c_kernels\n"
        "from l2c_kernels._build import build_info, has_cpu_kernels, has_cuda_kernels\n"
        "info = build_info()\n"
        "assert not info['extension_loaded'] and 'l2c_kernels._C' in info['extension_error'], info\n"
        "assert not has_cpu_kernels() and not has_cuda_kernels()\n"
        "assert not info['cuda_kernels'] and info['ops']['adaln_modulate'] == []\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)


def test_cuda_sources_compile():
    """Every csrc/**/*.cu compiles with nvcc for sm_80 and sm_90 (no GPU needed)."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if shutil.which("nvcc") is None and not (cuda_home and Path(cuda_home, "bin", "nvcc").exists()):
        pytest.skip("nvcc not found (CUDA toolkit not installed)")
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "compile_cuda.sh")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compile_cuda: OK" in proc.stdout
