"""Backend table, forced and automatic selection."""
import pytest
import torch
from backend_params import backend_dtype_params, backend_params, refusal, run_or_refused, supported_dtypes

import madtp_kernels as mk
from madtp_kernels import _dispatch


def test_backends_are_declared_as_data():
    assert set(_dispatch.BACKENDS) == {"cuda", "triton", "torch"}
    torch_backend = _dispatch.BACKENDS["torch"]
    assert {"cpu", "cuda"} <= torch_backend.devices and torch.float64 in torch_backend.dtypes
    assert "torch" in mk.available_backends()
    for op in ("pack", "unpack", "prune_tokens"):
        assert {"torch", "triton"} <= set(_dispatch.implementations(op))


def test_cpu_tensors_go_to_torch_automatically():
    assert _dispatch.select("prune_tokens", torch.device("cpu"), torch.float32) is \
        _dispatch.implementations("prune_tokens")["torch"]


def test_use_backend_nests_and_restores():
    assert _dispatch.forced_backend() is None
    with mk.use_backend("triton"):
        assert _dispatch.forced_backend() == "triton"
        with mk.use_backend("torch"):
            assert _dispatch.forced_backend() == "torch"
        assert _dispatch.forced_backend() == "triton"
    assert _dispatch.forced_backend() is None


def test_unknown_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"use_backend\(name\): expected one of .*got 'cudnn'"):
        with mk.use_backend("cudnn"):
            pass
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "tpu")
    with pytest.raises(ValueError, match="MADTP_KERNELS_BACKEND: expected one of"):
        mk.pack(torch.randn(1, 2, 3), torch.tensor([1]))


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "cuda")
    with pytest.raises(TypeError, match="backend 'cuda'"):
        mk.pack(torch.randn(1, 2, 3), torch.tensor([1]))
    with mk.use_backend("torch"):  # the context manager wins over the environment
        packed, _ = mk.pack(torch.randn(1, 2, 3), torch.tensor([1]))
    assert packed.shape == (1, 3)


def test_triton_on_cpu_only_under_the_interpreter():
    expected = {"cuda", "cpu"} if _dispatch.triton_interpret() else {"cuda"}
    assert _dispatch.BACKENDS["triton"].devices == expected


def test_non_strict_selection_falls_back_when_the_forced_backend_lacks_the_op():
    cpu = torch.device("cpu")
    with mk.use_backend("cuda"):
        with pytest.raises(TypeError, match="backend 'cuda'"):
            _dispatch.select("varlen_attention_backward", cpu, torch.float32)
        chosen = _dispatch.select("varlen_attention_backward", cpu, torch.float32, strict=False)
    assert chosen is _dispatch.implementations("varlen_attention_backward")["torch"]


def test_per_op_limits_narrow_a_backend():
    cuda = _dispatch.BACKENDS["cuda"]
    limits = cuda.limits["varlen_attention"]
    assert torch.float32 not in limits.dtypes and limits.head_dims == {32, 64, 128}
    assert "prune_tokens" not in cuda.limits  # the token ops take every float dtype of the backend
    reason = _dispatch._beyond_limits(_dispatch.BACKENDS["triton"], "varlen_attention", (torch.float16,), 256)
    assert reason is not None and "up to 128" in reason


def test_gemm_limits_declare_the_cusparselt_crossover_and_alignment():
    limits = _dispatch.BACKENDS["cuda"].limits["sparse_linear"]
    assert limits.auto_min_rows and limits.feature_multiple == 16
    cuda = _dispatch.BACKENDS["cuda"]
    assert _dispatch._beyond_limits(cuda, "sparse_linear", (torch.float16,), None, (768, 3072)) is None
    assert "multiples of 16" in _dispatch._beyond_limits(cuda, "sparse_linear", (torch.float16,), None, (24, 40))


# ---- each backend is tested on what it declares (backend_params.run_or_refused) --------------------------------


# The 11 cases of issue 14 that forced the cuda backend onto inputs it refuses (HEAD~ test_attention.py and
# test_sparse.py): (where, op, dtype, head_dim, features, reason it is refused with).
ISSUE_14_CASES = [
    ("test_attention.py:31 head dim 40", "varlen_attention", torch.float16, 40, (), "head dims [32, 64, 128], got 40"),
    ("test_attention.py:31 head dim 80", "varlen_attention", torch.bfloat16, 80, (), "head dims [32, 64, 128], got 80"),
    ("test_attention.py:60 test_matches_oracle fp32", "varlen_attention", torch.float32, 64, (), "got torch.float32"),
    ("test_attention.py:73 test_causal_cross_edges fp32", "varlen_attention", torch.float32, 64, (),
     "got torch.float32"),
    ("test_attention.py:79 test_repeated_kv_rows fp32", "varlen_attention", torch.float32, 32, (), "got torch.float32"),
    ("test_attention.py:105 test_gradients_match_oracle fp32", "varlen_attention", torch.float32, 32, (),
     "got torch.float32"),
    ("test_attention.py:132 the CUDA attention backward", "varlen_attention_backward", torch.float16, 64, (),
     "does not implement varlen_attention_backward"),
    ("test_sparse.py:79 test_matches_float64 fp32", "sparse_linear", torch.float32, None, (64, 128),
     "got torch.float32"),
    ("test_sparse.py:82 feature sizes not multiples of 16", "sparse_linear", torch.float16, None, (24, 40),
     "multiples of 16, got (24, 40)"),
    ("test_sparse.py:101 test_gradients_match_dense fp32 24x40", "sparse_linear", torch.float32, None, (24, 40),
     "got torch.float32"),
    ("test_sparse.py:117 test_opcheck fp32 24x40", "sparse_linear", torch.float32, None, (24, 40),
     "got torch.float32"),
]
# What the cuda backend declares it takes, one case per op: run, never refused.
CUDA_SUPPORTED = [("varlen_attention", dt, d, ()) for dt in (torch.float16, torch.bfloat16) for d in (32, 64, 128)] + [
    ("sparse_linear", dt, None, f) for dt in (torch.float16, torch.bfloat16) for f in ((16, 16), (768, 3072))] + [
    ("prune_tokens", dt, None, ()) for dt in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.fixture
def hopper(monkeypatch):
    """A CUDA device as select sees it (capability 9.0, _C holding sm_90a code), without a GPU."""
    cuda = _dispatch.BACKENDS["cuda"]  # frozen: patched past the dataclass, restored below
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    object.__setattr__(cuda, "archs", lambda: ("sm_80", "sm_90a", "compute_90"))
    yield torch.device("cuda")
    object.__setattr__(cuda, "archs", _dispatch.cuda_archs)


def _select(op, device, dtype, head_dim, features):
    if op == "sparse_linear":
        return _dispatch.select(op, device, dtype, features=features, rows=4096)
    return _dispatch.select(op, device, dtype, head_dim=head_dim)


@pytest.mark.parametrize("where,op,dtype,head_dim,features,reason", ISSUE_14_CASES, ids=[c[0] for c in ISSUE_14_CASES])
def test_issue_14_cases_are_asserted_refused_with_the_declared_reason(hopper, where, op, dtype, head_dim, features,
                                                                      reason):
    declared = refusal("cuda", op, dtype, device="cuda", head_dim=head_dim, features=features)
    assert declared is not None and reason in declared, declared
    with mk.use_backend("cuda"):
        with run_or_refused("cuda", "cuda", op, dtype, head_dim=head_dim, features=features) as supported:
            assert not supported
            _select(op, hopper, dtype, head_dim, features)


@pytest.mark.parametrize("op,dtype,head_dim,features", CUDA_SUPPORTED)
def test_declared_cuda_cases_run(hopper, op, dtype, head_dim, features):
    if op not in _dispatch.ops() or "cuda" not in _dispatch.implementations(op):
        pytest.skip("madtp_kernels._C not built here")
    with mk.use_backend("cuda"):
        with run_or_refused("cuda", "cuda", op, dtype, head_dim=head_dim, features=features) as supported:
            assert supported
            assert _select(op, hopper, dtype, head_dim, features) is _dispatch.implementations(op)["cuda"]


def test_run_or_refused_fails_a_body_that_runs_a_refused_case_or_raises_something_else():
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        with run_or_refused("cuda", "cuda", "varlen_attention", torch.float32, head_dim=64):
            pass
    with pytest.raises(ValueError):
        with run_or_refused("cuda", "cuda", "varlen_attention", torch.float32, head_dim=64):
            raise ValueError("a different failure is not the declared refusal")
    with pytest.raises(AssertionError, match="Regex pattern did not match"):
        with run_or_refused("cuda", "cuda", "varlen_attention", torch.float32, head_dim=64):
            raise _dispatch.UnsupportedInputs("refused for another reason")


def test_params_follow_the_declarations():
    ids = {p.id for p in backend_params("varlen_attention_backward")}
    assert not any(i.startswith("cuda") for i in ids)  # no CUDA backward: no cuda param to pretend with
    assert {"cuda-cuda"} <= {p.id for p in backend_params("varlen_attention")}
    for p in backend_params("varlen_attention") + backend_params("sparse_linear"):
        assert (p.values[1] == "cuda") == any(m.name == "cuda" for m in p.marks), p.id
    triples = backend_dtype_params("varlen_attention", (torch.float32, torch.float16))
    assert {(p.values[0], p.values[2]) for p in triples} >= {("cuda", torch.bfloat16), ("torch", torch.bfloat16)}
    assert supported_dtypes("cuda", "cuda", "varlen_attention") == [torch.float16, torch.bfloat16]
    assert supported_dtypes("cuda", "cuda", "sparse_linear", features=(24, 40)) == []
    assert supported_dtypes("torch", "cpu", "sparse_linear") == [torch.float32, torch.float16, torch.bfloat16]


def test_declared_cuda_ops_are_the_ones_the_extension_registers():
    if not _dispatch.BACKENDS["cuda"].is_available():
        pytest.skip("madtp_kernels._C not built here")
    registered = {op for op in _dispatch.ops() if "cuda" in _dispatch.implementations(op)}
    assert registered == _dispatch.BACKENDS["cuda"].ops


@pytest.mark.parametrize("arch,capability,runs", [
    ("sm_80", (8, 0), True), ("sm_80", (8, 6), True), ("sm_80", (8, 9), True), ("sm_80", (9, 0), False),
    ("sm_86", (8, 0), False), ("sm_90a", (9, 0), True), ("sm_90a", (10, 0), False), ("sm_90", (12, 0), False),
    ("compute_90", (9, 0), True), ("compute_90", (10, 0), True), ("compute_90", (12, 0), True),
    ("compute_90", (8, 9), False), ("compute_90a", (10, 0), False), ("compute_80", (9, 0), True),
    ("sm_100a", (10, 3), False), ("sm_100", (10, 3), True), ("compute_100a", (10, 3), False)])
def test_arch_compatibility_rules(arch, capability, runs):
    assert _dispatch.arch_runs_on(arch, capability) is runs


@pytest.mark.parametrize("archs,capability,picked", [
    (("sm_80", "sm_90a"), (10, 0), False), (("sm_80", "sm_90a"), (12, 0), False),
    (("sm_80", "sm_90a", "compute_90"), (10, 0), True), (("sm_80", "sm_90a", "compute_90"), (12, 0), True),
    (("sm_80", "sm_90a"), (8, 6), True), (("sm_80", "sm_90a"), (9, 0), True)])
def test_cuda_is_picked_only_where_its_binary_holds_code(monkeypatch, archs, capability, picked):
    cuda = _dispatch.BACKENDS["cuda"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    object.__setattr__(cuda, "archs", lambda: archs)
    try:
        reason = cuda.device_refusal(torch.device("cuda"))
    finally:
        object.__setattr__(cuda, "archs", _dispatch.cuda_archs)
    assert (reason is None) is picked
    if not picked:
        assert f"holds no code for compute capability {capability}" in reason and str(list(archs)) in reason


def _build_archs():
    import ast
    import pathlib
    import re

    root = pathlib.Path(__file__).parents[2]
    setup = ast.parse((root / "setup.py").read_text())
    gencode = next(ast.literal_eval(node.value) for node in ast.walk(setup) if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "gencode")
    cmake = re.search(r'set\(MADTP_CUDA_ARCHS "([^"]+)"\)', (root / "CMakeLists.txt").read_text()).group(1)
    return gencode, cmake.split(",")


def test_setup_and_cmake_embed_ptx_of_the_newest_arch():
    gencode, cmake = _build_archs()
    codes = [code for _, code in gencode]
    assert codes == cmake
    sass = [c for c in codes if c.startswith("sm_")]
    ptx = [c for c in codes if c.startswith("compute_")]
    assert ptx and not any(p.endswith("a") for p in ptx), "arch-specific PTX loads only on its own GPU"
    newest = max(int(s[3:].rstrip("a")) for s in sass)
    assert max(int(p[8:]) for p in ptx) == newest
    for capability in ((8, 0), (8, 6), (9, 0), (10, 0), (12, 0)):  # every GPU from sm_80 on gets code
        assert any(_dispatch.arch_runs_on(c, capability) for c in codes), capability
