"""The compiled extension's kernels, read from its fatbin: both architectures, no spills, tensor cores."""
import pytest

from madtp_kernels import _dispatch
from madtp_kernels.tools import cuda_report

# cuda: gpu.sh (-m cuda) runs these on the binary it has just built.
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _dispatch.BACKENDS["cuda"].is_available(), reason="madtp_kernels._C not built")]


def test_every_kernel_built_for_sm80_and_sm90a_without_spills():
    import madtp_kernels._C as extension

    rows = cuda_report.inspect(extension.__file__)
    assert {r.arch for r in rows} == {"sm_80", "sm_90a"}
    by_arch = {arch: {r.kernel for r in rows if r.arch == arch} for arch in ("sm_80", "sm_90a")}
    assert by_arch["sm_80"] == by_arch["sm_90a"]
    assert not [r for r in rows if r.spills]
    attention = [r for r in rows if "varlen_attention" in r.kernel]
    assert attention and all(r.mma.get("HMMA", 0) > 0 for r in attention)
    assert any("compact_rows_kernel" in r.kernel for r in rows)


def test_cli_exits_zero(capsys):
    assert cuda_report.main(["--require"]) == 0
    assert "0 spilling" in capsys.readouterr().out


def test_binary_holds_the_archs_it_declares():
    # The dispatcher trusts cuda_archs (or, from an older build, sm_80 + sm_90a): the fatbin must agree with it,
    # PTX included, or cuda would be picked on a GPU that gets "no kernel image".
    import madtp_kernels._C as extension

    assert sorted(cuda_report.held_archs(extension.__file__)) == sorted(_dispatch.cuda_archs())
