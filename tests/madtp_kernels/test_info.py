import json
import subprocess
import sys

import torch

from madtp_kernels.tools import info


def test_info_reports_backends_and_extension():
    data = info.collect()
    assert data["torch"] == torch.__version__
    assert data["backends"]["torch"]["available"] is True
    assert "prune_tokens" in data["backends"]["torch"]["ops"]
    assert (data["cusparselt"] is not None) == data["cuda_extension_built"]


def test_info_cli_reports_the_installed_package():
    # -P: from a checkout, the source tree (no compiled _C) must not shadow what was installed.
    out = subprocess.run([sys.executable, "-P", "-m", "madtp_kernels.tools.info", "--json"], capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["cuda_extension_built"] == info.collect()["cuda_extension_built"]
