"""container/build.sh and container/run.sh: golden dry runs for every framework, error handling,
and proof that --dry-run prints exactly the command that runs (a fake `docker` records its argv).
No Docker engine runs here: nothing is built or started.

Golden files live in tests/golden/container/; after a reviewed change regenerate them with
    TDIST_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_container_scripts.py
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINER = REPO / "container"
GOLDEN = REPO / "tests" / "golden" / "container"
BASH = shutil.which("bash") or "/bin/bash"

# Environment variables the scripts read; cleared so that the caller's shell cannot leak in.
SCRIPT_ENV_VARS = ("HF_TOKEN", "NATS_SERVER", "ETCD_ENDPOINTS")


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def script_env(extra: dict[str, str] | None = None, path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV_VARS}
    env["LC_ALL"] = "C"
    if path is not None:
        env["PATH"] = path
    env.update(extra or {})
    return env


def run_script(
    name: str, args: list[str], env: dict[str, str] | None = None, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(CONTAINER / name), *args],
        capture_output=True,
        text=True,
        env=script_env(env, path),
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def normalise(text: str) -> str:
    """Machine-independent text: the checkout path and the project version become placeholders."""
    return text.replace(str(REPO), "<REPO>").replace(f"tdist:{project_version()}-", "tdist:<VERSION>-")


def check_golden(name: str, actual: str) -> None:
    """Compare with tests/golden/container/NAME; TDIST_REGEN_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("TDIST_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
        return
    assert path.exists(), f"no golden file {path}; create it with TDIST_REGEN_GOLDEN=1"
    expected = path.read_text()
    assert actual == expected, (
        f"{name} differs from its golden file (after review, regenerate with TDIST_REGEN_GOLDEN=1)\n"
        f"expected: {expected!r}\nactual:   {actual!r}"
    )


def with_dry_run(args: list[str]) -> list[str]:
    """The same arguments with --dry-run added before any '-- COMMAND'."""
    if "--" in args:
        cut = args.index("--")
        return [*args[:cut], "--dry-run", *args[cut:]]
    return [*args, "--dry-run"]


BUILD_CASES = {
    "build_standard": ["--framework", "STANDARD"],
    "build_vllm": ["--framework", "VLLM"],
    "build_tensorrtllm": ["--framework", "TENSORRTLLM"],
    "build_default": [],
    "build_custom": [
        "--framework=vllm",
        "--base-image", "registry.example.com/mirror/tritonserver",
        "--base-image-tag", "26.09-py3",
        "--tag", "me/tdist:dev",
        "--build-arg", "VLLM_VERSION=0.32.0",
        "--build-arg", "TDIST_UID=1234",
        "--no-cache",
        "--platform", "linux/arm64",
    ],
}

SECRET = "hf_not_a_real_token_123"
RUN_CASES = {
    "run_default": ([], {}),
    "run_vllm_workspace_gpus": (
        ["-it", "--mount-workspace", "--gpus", "--framework", "VLLM", "--",
         "tdist", "deploy", "graphs/llm_vllm_monolith.yaml"],
        {"HF_TOKEN": SECRET, "NATS_SERVER": "nats://127.0.0.1:4222",
         "ETCD_ENDPOINTS": "http://127.0.0.1:2379"},
    ),
    "run_tensorrtllm_devices": (
        ["--framework", "tensorrtllm", "--gpus", "device=0,1", "--", "nvidia-smi"],
        {"NATS_SERVER": ""},
    ),
    "run_custom": (
        ["--image", "me/tdist:dev", "--gpus=2", "--name", "worker-0", "--network", "bridge",
         "--user", "1000:1000", "-e", "TDIST_LOG_LEVEL=debug", "--env", "CUDA_VISIBLE_DEVICES",
         "-v", "/models:/models:ro", "--", "python", "-c", "print(\"it's ok\")"],
        {},
    ),
}


@pytest.mark.parametrize("case", sorted(BUILD_CASES))
def test_build_dry_run_golden(case: str) -> None:
    result = run_script("build.sh", with_dry_run(BUILD_CASES[case]))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    check_golden(f"{case}.txt", normalise(result.stdout))


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_dry_run_golden(case: str) -> None:
    args, env = RUN_CASES[case]
    result = run_script("run.sh", with_dry_run(args), env=env)
    assert result.returncode == 0, result.stderr
    check_golden(f"{case}.txt", normalise(result.stdout))


@pytest.mark.parametrize("framework,base_tag", [
    ("STANDARD", "26.10-py3"),
    ("VLLM", "26.10-py3"),
    ("TENSORRTLLM", "26.10-trtllm-python-py3"),
])
def test_build_picks_the_framework_base_image(framework: str, base_tag: str) -> None:
    argv = shlex.split(run_script("build.sh", ["--framework", framework.lower(), "--dry-run"]).stdout)
    assert argv[:2] == ["docker", "build"]
    assert f"BASE_IMAGE_TAG={base_tag}" in argv
    assert f"FRAMEWORK={framework}" in argv
    assert argv[argv.index("--file") + 1] == str(REPO / "container" / "Dockerfile")
    assert argv[argv.index("--target") + 1] == "runtime"
    assert argv[argv.index("--tag") + 1] == f"tdist:{project_version()}-{framework.lower()}"
    assert argv[-1] == str(REPO), "the build context is the repository root"


def test_run_default_image_matches_build_default_tag() -> None:
    for framework in ("STANDARD", "VLLM", "TENSORRTLLM"):
        built = shlex.split(run_script("build.sh", ["--framework", framework, "--dry-run"]).stdout)
        ran = shlex.split(run_script("run.sh", ["--framework", framework, "--dry-run"]).stdout)
        assert built[built.index("--tag") + 1] == ran[-1]


def test_run_passes_secrets_by_name_only() -> None:
    result = run_script("run.sh", ["--dry-run"], env={"HF_TOKEN": SECRET})
    argv = shlex.split(result.stdout)
    assert SECRET not in result.stdout
    assert argv[argv.index("-e") + 1] == "HF_TOKEN"


def test_run_without_passthrough_env_sets_none() -> None:
    argv = shlex.split(run_script("run.sh", ["--dry-run"]).stdout)
    for name in ("HF_TOKEN", "NATS_SERVER", "ETCD_ENDPOINTS"):
        assert name not in argv


def test_run_mount_workspace_mounts_repo_and_tmp() -> None:
    argv = shlex.split(run_script("run.sh", ["--mount-workspace", "--dry-run"]).stdout)
    volumes = [argv[i + 1] for i, word in enumerate(argv) if word == "-v"]
    assert volumes == [f"{REPO}:/workspace", "/tmp:/tmp"]
    assert argv[argv.index("-w") + 1] == "/workspace"


@pytest.mark.parametrize("script", ["build.sh", "run.sh"])
def test_help(script: str) -> None:
    result = run_script(script, ["--help"])
    assert result.returncode == 0
    assert result.stdout.startswith(f"Usage: container/{script}")
    assert "--dry-run" in result.stdout
    assert run_script(script, ["-h"]).stdout == result.stdout


ERROR_CASES = [
    ("build.sh", ["--framework", "SGLANG"], "unknown framework 'SGLANG'; choose one of: STANDARD VLLM TENSORRTLLM"),
    ("build.sh", ["--framework"], "option '--framework' needs a value"),
    ("build.sh", ["--tag", "--dry-run"], "option '--tag' needs a value"),
    ("build.sh", ["--tag="], "option '--tag' needs a non-empty value"),
    ("build.sh", ["--frobnicate"], "unknown option '--frobnicate'"),
    ("build.sh", ["VLLM"], "unknown option 'VLLM'"),
    ("build.sh", ["--build-arg", "NOVALUE"], "--build-arg wants KEY=VALUE"),
    ("build.sh", ["--build-arg", "FRAMEWORK=VLLM"], "set the framework with --framework"),
    ("build.sh", ["--base-image", "nvcr.io/nvidia/tritonserver:26.10-py3"], "give the tag with --base-image-tag"),
    ("build.sh", ["--tag", "a b"], "cannot hold whitespace"),
    ("build.sh", ["--dry-run=yes"], "option '--dry-run' takes no value"),
    ("run.sh", ["--framework", "sglang"], "unknown framework 'sglang'"),
    ("run.sh", ["--image"], "option '--image' needs a value"),
    ("run.sh", ["bash"], "put the command after '--'"),
    ("run.sh", ["--"], "'--' must be followed by a command"),
    ("run.sh", ["-i"], "use '-it'"),
    ("run.sh", ["--env", "1BAD=x"], "--env wants KEY or KEY=VALUE"),
    ("run.sh", ["--volume", "/only-one-side"], "--volume wants SRC:DST"),
    ("run.sh", ["--frobnicate"], "unknown option '--frobnicate'"),
]


@pytest.mark.parametrize("script,args,message", ERROR_CASES)
def test_bad_input_is_a_clear_usage_error(script: str, args: list[str], message: str) -> None:
    result = run_script(script, with_dry_run(args))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert message in result.stderr
    assert f"Run 'container/{script} --help' for usage." in result.stderr


def _fake_docker(tmp_path: Path) -> tuple[str, Path]:
    """A `docker` that answers `buildx version` and records any other call's argv, NUL-separated."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "argv"
    docker = bindir / "docker"
    docker.write_text(
        f"#!{BASH}\n"
        'if [ "$1" = buildx ] && [ "$2" = version ]; then echo "github.com/docker/buildx v0.99"; exit 0; fi\n'
        f'printf "%s\\0" docker "$@" > {shlex.quote(str(record))}\n'
    )
    docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
    return f"{bindir}{os.pathsep}{os.environ['PATH']}", record


@pytest.mark.parametrize("script,args", [
    *[("build.sh", args) for args in BUILD_CASES.values()],
    *[("run.sh", args) for args, _ in RUN_CASES.values()],
])
def test_dry_run_prints_exactly_what_runs(tmp_path: Path, script: str, args: list[str]) -> None:
    path, record = _fake_docker(tmp_path)
    env = {"HF_TOKEN": SECRET, "NATS_SERVER": "nats://127.0.0.1:4222"}
    printed = run_script(script, with_dry_run(args), env=env, path=path)
    assert printed.returncode == 0, printed.stderr
    ran = run_script(script, args, env=env, path=path)
    assert ran.returncode == 0, ran.stderr
    executed = record.read_text().split("\0")[:-1]
    assert executed == shlex.split(printed.stdout)


def test_missing_docker_is_a_clear_error(tmp_path: Path) -> None:
    # A PATH holding only the tools the scripts use, and no docker.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("dirname", "sed", "head"):
        found = shutil.which(tool)
        assert found, tool
        (bindir / tool).symlink_to(found)
    for script in ("build.sh", "run.sh"):
        result = run_script(script, [], path=str(bindir))
        assert result.returncode == 127, result.stderr
        assert "'docker' not found on PATH" in result.stderr
        assert "--dry-run" in result.stderr


def test_build_needs_buildx(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    docker = bindir / "docker"
    docker.write_text(f"#!{BASH}\necho 'docker: unknown command: docker buildx' >&2\nexit 1\n")
    docker.chmod(0o755)
    result = run_script("build.sh", [], path=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    assert result.returncode == 1
    assert "needs BuildKit" in result.stderr
