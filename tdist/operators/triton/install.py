"""Where Triton lives on this machine: the server binary, the python backend, the models' Python.

Route measured on these machines (docs/triton.md): PyPI `nvidia-pytriton` ships a real
`tritonserver` (Triton 2.51), the python backend (`libtriton_python.so`) and backend stubs
for Python 3.8–3.13. This module finds them and arranges a per-worker backend directory:

- `python/` holds the backend library, `triton_python_backend_utils.py` and the stub built
  for *this* Python (the stub links `libpython3.X.so.1.0`: we put this interpreter's LIBDIR
  first on LD_LIBRARY_PATH so the stub embeds the same Python as the worker).
- The stub's embedded Python finds its prefix through `python3` on PATH (it runs isolated,
  ignoring PYTHONPATH). Triton 2.51's stub is built against numpy 1.x and misreads numpy 2
  arrays, so the models run in a small venv with numpy<2 ("models' Python env", created by
  `python -m tdist.operators.triton.install` / scripts/setup.d/30-triton.sh) whose `bin/`
  we put first on the server's PATH. When this interpreter already has numpy<2, its own
  environment is used.

Overrides: TDIST_TRITONSERVER (binary), TDIST_TRITON_BACKENDS (a backend directory holding
`python/`), TDIST_TRITON_PYTHON_ENV (the models' venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from tdist.errors import OperatorLoadError

INSTALL_HINT = (
    "pip install 'tdist[triton]' && pip install --no-deps 'nvidia-pytriton>=0.7' "
    "&& python -m tdist.operators.triton.install (scripts/setup.d/30-triton.sh does all three; "
    "nvidia-pytriton ships the tritonserver binary but pins numpy<2, hence --no-deps)"
)
ENV_HINT = "python -m tdist.operators.triton.install (or scripts/setup.d/30-triton.sh)"
STUB = "triton_python_backend_stub"


class TritonNotAvailable(OperatorLoadError):
    """No usable Triton (server binary, python backend, or models' Python) on this machine."""


def pytriton_root() -> Path | None:
    """`<site-packages>/pytriton/tritonserver` of nvidia-pytriton, without importing pytriton."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        root = Path(loc) / "tritonserver"
        if root.is_dir():
            return root
    return None


def find_tritonserver() -> Path:
    """The tritonserver binary: $TDIST_TRITONSERVER, else nvidia-pytriton's, else PATH."""
    explicit = os.environ.get("TDIST_TRITONSERVER")
    if explicit is not None:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        raise TritonNotAvailable(
            f"TDIST_TRITONSERVER={explicit!r} is not an executable tritonserver; unset it or install: {INSTALL_HINT}"
        )
    root = pytriton_root()
    if root is not None and (root / "bin" / "tritonserver").is_file():
        return root / "bin" / "tritonserver"
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    raise TritonNotAvailable(
        "no Triton server found: the in-process `tritonserver` module does not load here and no "
        f"`tritonserver` binary is installed (nvidia-pytriton, PATH, TDIST_TRITONSERVER); install: {INSTALL_HINT}"
    )


def source_backend_dir(binary: Path) -> Path:
    """The backend directory holding `python/` that goes with `binary`."""
    explicit = os.environ.get("TDIST_TRITON_BACKENDS")
    candidates = [Path(explicit)] if explicit else []
    candidates += [binary.parent.parent / "backends", Path("/opt/tritonserver/backends")]
    for c in candidates:
        if (c / "python" / "libtriton_python.so").is_file():
            return c
    raise TritonNotAvailable(
        f"no Triton python backend next to {binary} (looked in {', '.join(map(str, candidates))}); install: {INSTALL_HINT}"
    )


def find_stub(backend_dir: Path, version: tuple[int, int] | None = None) -> Path:
    """The python backend stub for this Python (pytriton ships one per minor version)."""
    major, minor = version or sys.version_info[:2]
    for candidate in (
        backend_dir.parent / "python_backend_stubs" / f"{major}.{minor}" / STUB,
        backend_dir / "python" / STUB,
    ):
        if candidate.is_file():
            return candidate
    raise TritonNotAvailable(
        f"no Triton python backend stub for Python {major}.{minor} under {backend_dir.parent}; "
        f"use Python 3.8–3.13 with nvidia-pytriton ({INSTALL_HINT})"
    )


def default_python_env() -> Path:
    return Path(os.environ.get("TDIST_TRITON_PYTHON_ENV") or Path(sys.prefix) / "tdist-triton-env")


def _numpy_major() -> int:
    try:
        from importlib.metadata import version

        return int(version("numpy").split(".")[0])
    except Exception:
        return 0


def python_env_bin() -> Path:
    """The `bin/` whose python3 the stub embeds (see module doc); errors name the fix."""
    env = default_python_env()
    if (env / "pyvenv.cfg").is_file() and (env / "bin" / "python3").exists():
        return env / "bin"
    if _numpy_major() < 2 and (Path(sys.prefix) / "pyvenv.cfg").is_file():
        return Path(sys.executable).parent
    raise TritonNotAvailable(
        f"Triton 2.51's python backend needs numpy<2 in the models' Python, and {env} does not exist "
        f"(this Python has numpy {_numpy_major()}.x); create it: {ENV_HINT}"
    )


def create_python_env(env: Path | None = None, numpy_spec: str = "numpy<2") -> Path:
    """Create the models' venv (no pip inside; numpy installed with this Python's pip --target)."""
    env = env or default_python_env()
    if not (env / "pyvenv.cfg").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = Path(
        subprocess.run(
            [str(env / "bin" / "python3"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    probe = subprocess.run(
        [str(env / "bin" / "python3"), "-c", "import numpy, sys; sys.exit(numpy.__version__[0] != '1')"],
        stderr=subprocess.DEVNULL,
    )
    if probe.returncode != 0:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(site), numpy_spec],
            check=True,
        )
    return env


@dataclass
class TritonInstall:
    """Everything needed to run `tritonserver` with python-backend models from this worker."""

    binary: Path
    backend_dir: Path  # the source backend directory (holds python/)
    stub: Path
    env_bin: Path
    lib_dirs: list[Path] = field(default_factory=list)

    def make_backend_dir(self, dest: Path) -> Path:
        """dest/python/ with links to the backend library and utils plus this Python's stub."""
        py = dest / "python"
        py.mkdir(parents=True, exist_ok=True)
        for entry in (self.backend_dir / "python").iterdir():
            if entry.name == STUB or entry.name == "__pycache__":
                continue
            link = py / entry.name
            if not link.exists():
                link.symlink_to(entry)
        if not (py / STUB).exists():
            (py / STUB).symlink_to(self.stub)  # a link keeps the stub's $ORIGIN rpath working
        for other in self.backend_dir.iterdir():  # other backends (onnxruntime, ...) when present
            if other.name != "python" and other.is_dir() and not (dest / other.name).exists():
                (dest / other.name).symlink_to(other, target_is_directory=True)
        return dest

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([str(self.env_bin), env.get("PATH", "")])
        libs = [str(p) for p in self.lib_dirs]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        env.pop("PYTHONPATH", None)
        return env


def locate_triton() -> TritonInstall:
    """Find every piece, or raise TritonNotAvailable naming what to install."""
    binary = find_tritonserver()
    backends = source_backend_dir(binary)
    stub = find_stub(backends)
    env_bin = python_env_bin()
    lib_dirs = []
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and (Path(libdir) / f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0").exists():
        lib_dirs.append(Path(libdir))
    return TritonInstall(binary=binary, backend_dir=backends, stub=stub, env_bin=env_bin, lib_dirs=lib_dirs)


def main() -> int:  # pragma: no cover - thin CLI
    """`python -m tdist.operators.triton.install`: create the models' Python env and check Triton."""
    env = create_python_env()
    print(f"models' Python env: {env}")
    install = locate_triton()
    print(f"tritonserver: {install.binary}\npython backend: {install.backend_dir}\nstub: {install.stub}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
