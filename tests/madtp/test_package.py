"""The model-layer package imports, and dependencies point one way: madtp -> madtp_kernels -> torch/triton/_C."""
import ast
import pathlib

import madtp
import pytest

import madtp_kernels


def test_config_validates():
    assert not madtp.MADTPConfig().prunes_tokens
    assert madtp.MADTPConfig(temperature=0.1).prunes_tokens
    with pytest.raises(ValueError, match="execution: expected one of"):
        madtp.MADTPConfig(execution="dense")
    with pytest.raises(ValueError, match="num_alignment_tokens"):
        madtp.MADTPConfig(num_alignment_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        madtp.MADTPConfig(temperature=-1.0)


def _imported_roots(package_dir: pathlib.Path) -> set[str]:
    roots = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots


def test_kernels_know_nothing_of_models():
    roots = _imported_roots(pathlib.Path(madtp_kernels.__file__).parent)
    assert not roots & {"madtp", "transformers"}, roots


def test_public_names_resolve_and_data_needs_no_transformers():
    import subprocess
    import sys

    for name in madtp.__all__:
        assert callable(getattr(madtp, name)), name
    code = "import sys, madtp.data.shapes; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out
