"""What `pip install -e .` does for a user.

* It says what it built where pip shows it: in the version it prints ("Successfully installed
  tinyvllm-0.1.0+cu130.sm90" / "...+nokernels"), and as one sentence on the terminal while
  building (setup.py's `_notice`; pip captures stderr, not /dev/tty).
* The editable install is a path entry, so a folder named `tinyvllm` (a clone) in the current
  directory cannot shadow it as an empty namespace package.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from tinyvllm import __version__

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("tinyvllm_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the functions; setup() runs only as __main__
    return module


@pytest.mark.parametrize(
    "cuda, targets, label",
    [(None, [], "nokernels"), ("13.0", ["9.0"], "cu130.sm90"), ("12.8", ["8.0", "9.0+PTX", "9.0a"], "cu128.sm80.sm90ptx.sm90a")],
)
def test_version_label_says_what_was_built(setup_py, cuda, targets, label):
    assert setup_py.version_label(cuda, targets) == label
    assert Version(f"{__version__}+{label}").local == label.lower()  # a valid PEP 440 local version
    assert setup_py.base_version() == __version__


def test_notice_is_said_while_building_only(setup_py, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["setup.py", "dist_info"])  # pip's metadata step: quiet
    setup_py._notice("hello")
    monkeypatch.setattr(sys, "argv", ["setup.py", "editable_wheel", "--dist-dir", "x"])
    setup_py._notice("hello")
    assert capsys.readouterr().err == "tinyvllm setup: hello\n"


def expected_label(setup_py) -> str:
    """What this machine's build decides: the kernels when torch is a CUDA build and nvcc is found."""
    import torch

    if os.environ.get("TINYVLLM_NO_EXTENSION") == "1" or torch.version.cuda is None or setup_py.find_cuda_home() is None:
        return "nokernels"
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        return setup_py.version_label(torch.version.cuda, ["9.0"])
    return setup_py.version_label(torch.version.cuda, setup_py.cuda_targets())


def copy_project(tmp_path: Path) -> Path:
    """setup.py, pyproject.toml and the package's sources (no built extension), in a folder named tinyvllm."""
    project = tmp_path / "tinyvllm"
    shutil.copytree(ROOT / "tinyvllm", project / "tinyvllm", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(ROOT / name, project / name)
    return project


@pytest.mark.parametrize("no_extension", [True, False])
def test_pip_prints_the_label(setup_py, tmp_path, no_extension):
    """pip's own output (no -v) names what would be built; --dry-run runs setup.py's metadata step only."""
    project = copy_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "TINYVLLM_NO_EXTENSION"}
    if no_extension:
        env["TINYVLLM_NO_EXTENSION"] = "1"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--dry-run", "-e",
                        str(project)], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    label = "nokernels" if no_extension else expected_label(setup_py)
    assert f"Would install tinyvllm-{__version__}+{label}" in r.stdout, r.stdout


def test_editable_install_is_a_path_entry_that_a_clone_folder_cannot_shadow(tmp_path):
    """The editable wheel holds a .pth naming the project folder (no import hook), and with that
    folder on sys.path the real package wins over a `tinyvllm` folder in the current directory."""
    project = copy_project(tmp_path)
    script = "import sys; from setuptools import build_meta as b; sys.stdout.write(b.build_editable(sys.argv[1]))"
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "wheel")], cwd=project, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "TINYVLLM_NO_EXTENSION": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(tmp_path / "wheel" / r.stdout.strip().splitlines()[-1]) as wheel:
        pth = [n for n in wheel.namelist() if n.endswith(".pth")]
        assert len(pth) == 1 and not [n for n in wheel.namelist() if n.endswith("_finder.py")], wheel.namelist()
        assert wheel.read(pth[0]).decode().strip() == str(project)
    # The user's situation: the current folder holds the clone (a folder named tinyvllm, no
    # __init__.py), and the install's path entry comes later on sys.path.
    check = f"import sys; sys.path.append({str(project)!r}); from tinyvllm import SamplingParams; print('ok')"
    r = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert r.stdout.strip() == "ok", r.stderr
