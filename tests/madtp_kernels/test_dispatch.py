"""Backend table, forced and automatic selection."""
import pytest
import torch

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
