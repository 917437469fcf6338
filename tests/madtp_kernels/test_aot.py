"""The AOT tool compiles every Triton kernel for sm_80 and sm_90 without a GPU, and fails loudly when it should.

The tool runs in a child process without TRITON_INTERPRET (conftest sets it for the rest of the session), with
the same madtp_kernels on its path as these tests import.
"""
import importlib
import json
import os
import pathlib
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import madtp_kernels
import madtp_kernels.triton

pytest.importorskip("triton")

ARCHS = (80, 90)


def _run_tool(*args: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = [str(pathlib.Path(madtp_kernels.__file__).parents[1])] + ([extra_path] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(path + [env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-P", "-m", "madtp_kernels.tools.aot", *args], env=env,
                          capture_output=True, text=True, timeout=900)


def _jit_kernels_by_module() -> dict[str, set[str]]:
    """Every launched kernel (a @triton.jit function named *_kernel; the others are device functions that kernels
    inline) defined in each madtp_kernels.triton module, compiled or interpreted."""
    kernels = {}
    for info in pkgutil.iter_modules(madtp_kernels.triton.__path__):
        module = importlib.import_module(f"madtp_kernels.triton.{info.name}")
        kernels[module.__name__] = {
            name for name, obj in vars(module).items()
            if name.endswith("_kernel") and hasattr(obj, "arg_names")
            and getattr(getattr(obj, "fn", None), "__module__", None) == module.__name__}
    return kernels


@pytest.fixture(scope="module")
def package_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = _run_tool("--arch", *map(str, ARCHS), "--json", str(out))
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_package_compiles_for_both_archs_without_spills(package_report):
    proc, rows = package_report
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rows, "the tool compiled nothing"
    for row in rows:
        assert row["error"] is None, row
        assert row["stack_bytes"] == 0 and row["spill_ops"] == 0, row
        assert row["registers"] and row["registers"] <= 255, row
    specs = {(r["kernel"], r["spec"]) for r in rows}
    assert {(r["kernel"], r["spec"], r["arch"]) for r in rows} == {(k, s, a) for k, s in specs for a in ARCHS}


def test_every_kernel_has_an_aot_spec(package_report):
    _, rows = package_report
    reported = {r["kernel"] for r in rows}
    for module, kernels in _jit_kernels_by_module().items():
        assert kernels <= reported, f"{module}: kernels without AOT_SPECS: {sorted(kernels - reported)}"
    assert {"_count_rows_kernel", "_compact_kernel", "_unpack_kernel"} <= reported


_FIXTURE_KERNELS = '''
import triton
import triton.language as tl
from madtp_kernels.triton import AotSpec

@triton.jit
def bad_arange_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)  # BLOCK=3 is not a power of two: compile error

@triton.jit
def spill_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    v = tl.load(x_ptr + tl.arange(0, BLOCK))  # 16384 fp32 live across a reduction in one warp
    tl.store(y_ptr + tl.arange(0, BLOCK), v * tl.sum(v, axis=0))

@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))
'''

_FIXTURE_SPECS = {
    "aot_broken": 'AOT_SPECS = [AotSpec(bad_arange_kernel, {"x_ptr": "*fp32"}, {"BLOCK": 3}, label="BLOCK=3")]',
    "aot_missing_arg": 'AOT_SPECS = [AotSpec(spill_kernel, {"x_ptr": "*fp32"}, {"BLOCK": 16}, label="no y_ptr")]',
    "aot_spill": ('AOT_SPECS = [AotSpec(spill_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, {"BLOCK": 16384}, '
                  'num_warps=1, label="BLOCK=16384")]'),
    "aot_dot": ('AOT_SPECS = [AotSpec(dot_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"}, '
                '{"M": 64, "N": 64, "K": 32}, divisible_by_16=("a_ptr", "b_ptr", "c_ptr"), label="fp16 64x64x32")]'),
}


@pytest.fixture(scope="module")
def fixture_modules(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot_modules")
    for name, specs in _FIXTURE_SPECS.items():
        (root / f"{name}.py").write_text(textwrap.dedent(_FIXTURE_KERNELS) + "\n" + specs + "\n")
    return str(root)


@pytest.mark.parametrize("module, expect", [
    ("aot_broken", "CompilationError"),
    ("aot_missing_arg", "no type for arguments ['y_ptr']"),
    ("aot_spill", "SPILLS"),
])
def test_failing_spec_makes_the_tool_exit_nonzero(fixture_modules, module, expect):
    proc = _run_tool("--arch", "80", "--module", module, extra_path=fixture_modules)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expect in proc.stdout, proc.stdout


def test_tensor_core_instructions_are_counted(fixture_modules, tmp_path):
    out = tmp_path / "dot.json"
    proc = _run_tool("--arch", *map(str, ARCHS), "--module", "aot_dot", "--json", str(out),
                     extra_path=fixture_modules)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mma = {row["arch"]: row["mma"] for row in json.loads(out.read_text())}
    assert mma[80].get("HMMA", 0) > 0, mma  # Ampere: mma.sync
    assert mma[90].get("HGMMA", 0) > 0, mma  # Hopper: wgmma


def test_every_fp16_specialisation_has_a_bf16_twin():
    # bf16 Triton kernels cannot be checked under the interpreter (its bf16 tl.dot is wrong), so the AOT build is
    # where they compile on CPU: every fp16 specialisation a launcher uses needs its bf16 twin there (declared in
    # the module's AOT_SPECS, or added by the tool).
    from madtp_kernels.tools import aot

    specs = aot.discover()
    bf16 = {aot._bf16_key(s) for s in specs if any("bf16" in v for v in s.signature.values())}
    fp16 = [s for s in specs if any("fp16" in v for v in s.signature.values())]
    assert fp16 and len(specs) == len({(s.name, s.label) for s in specs}), "specs must be told apart by label"
    missing = [f"{s.name} [{s.label}]" for s in fp16 if aot._bf16_key(s) not in bf16]
    assert not missing, f"fp16 specialisations without a bf16 twin: {missing}"
    for twin in (s for s in specs if s.label.endswith("(bf16 twin)")):
        assert not any("fp16" in v for v in twin.signature.values()), twin.label
