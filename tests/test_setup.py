"""`make setup` where users are: Python 3.10 to 3.13, torch from PyPI, from PyTorch's index for
another CUDA (TORCH_CUDA), or the machine's own (SYSTEM_TORCH), and one line for what is missing."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_env

REQUIREMENTS = (ROOT / "requirements.txt").read_text()
PINS = dict(re.findall(r"^(torch|torchvision)==(\S+)", REQUIREMENTS, re.M))
UNREACHABLE = ("NewConnectionError", "Failed to establish", "Temporary failure in name resolution",
               "Could not fetch URL", "Network is unreachable")


def make(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                          env=make_env(), timeout=timeout)


@pytest.mark.parametrize("python", ["3.10", "3.12"])
def test_requirements_resolve_on_pythons_users_have(python, tmp_path):
    """Every pin (ffcv aside: it builds from source) has a wheel for Ubuntu 22.04's and 24.04's Python,
    as the registry answers today. --no-deps: what pip chooses for unpinned dependencies fits by itself,
    and resolving torch's CUDA packages too would cost the suite 20 CPU-seconds a Python."""
    rest = tmp_path / "requirements.txt"
    rest.write_text("\n".join(line for line in REQUIREMENTS.splitlines() if not line.startswith("ffcv")))
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                             "--no-deps", "--python-version", python, "--only-binary=:all:",
                             "--target", str(tmp_path / "t"), "-r", str(rest)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode and any(word in result.stderr for word in UNREACHABLE):
        pytest.skip("the package registry cannot be reached from here")
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert result.returncode == 0, "\n".join(errors)


def test_torch_cuda_takes_the_pinned_versions_from_pytorchs_index_for_that_cuda(tmp_path):
    result = make("-n", "setup", "TORCH_CUDA=cu126", f"VENV={tmp_path / 'v'}")
    assert result.returncode == 0, result.stderr
    expected = (f"pip install -q torch=={PINS['torch']} torchvision=={PINS['torchvision']} "
                "--index-url https://download.pytorch.org/whl/cu126")
    assert expected in result.stdout
    rest = [line for line in result.stdout.splitlines() if "-r /dev/stdin" in line]
    assert rest and "torch==" not in rest[0]  # PyPI's build is not installed over it
    assert f"{tmp_path / 'v'}/.installed-cu126" in result.stdout


def test_a_torch_cuda_build_that_is_not_there_fails_in_one_line(tmp_path):
    empty = tmp_path / "index"
    empty.mkdir()
    result = make("setup", "TORCH_CUDA=cu999", f"TORCH_INDEX=file://{empty}", f"VENV={tmp_path / 'v'}",
                  f"PYTHON_BASE={sys.base_prefix}/bin/python3")
    assert result.returncode != 0
    last = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert last and "TORCH_CUDA=cu999" in last[-1] and "SYSTEM_TORCH=1" in last[-1], result.stdout + result.stderr
    assert not (tmp_path / "v" / ".installed-cu999").exists()


def test_system_torch_keeps_the_base_interpreters_torch(tmp_path):
    """The base is this suite's own venv, which has torch: the new venv imports that torch and has none
    of its own, and the rest of the requirements are there."""
    venv = tmp_path / "v"
    result = make("setup", "SYSTEM_TORCH=1", f"PYTHON_BASE={sys.executable}", f"VENV={venv}", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (venv / ".installed-system-torch").exists()
    found = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, torchvision, ffcv, numpy; "
                            "print(torch.__file__, torchvision.__version__)"],
                           capture_output=True, text=True, check=True).stdout
    import torch
    assert found.split()[0] == torch.__file__
    assert not list(venv.glob("lib/python*/site-packages/torch"))


def test_system_torch_without_torch_in_the_base_is_one_line(tmp_path):
    result = make("setup", "SYSTEM_TORCH=1", f"PYTHON_BASE={sys.base_prefix}/bin/python3", f"VENV={tmp_path / 'v'}")
    assert result.returncode != 0
    assert result.stdout.splitlines()[-1].startswith("error: SYSTEM_TORCH=1 but"), result.stdout
    assert "PYTHON_BASE=" in result.stdout.splitlines()[-1]


def test_a_python_outside_3_10_to_3_13_is_named_in_one_line(tmp_path):
    old = Path("/root/.pyenv/versions/3.9.18/bin/python3")
    if not old.exists():
        pytest.skip("no Python 3.9 interpreter here")
    result = make("setup", f"PYTHON_BASE={old}", f"VENV={tmp_path / 'v'}")
    assert result.returncode != 0
    assert result.stdout.strip() == (f"error: {old} is Python 3.9.18; this project needs Python 3.10 to 3.13: "
                                     "pass PYTHON_BASE=python3.12 (or another)")
    assert not (tmp_path / "v").exists()


def test_missing_build_tools_are_named_with_the_command_that_installs_them(tmp_path):
    """A minimal image without g++, as a user without root: one line with the apt-get command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("pkg-config", "grep", "sed", "cat"):
        real = subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        (bin_dir / tool).symlink_to(real)
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    make_path = subprocess.run(["sh", "-c", "command -v make"], capture_output=True, text=True).stdout.strip()
    result = subprocess.run([make_path, "--no-print-directory", "-C", str(ROOT), "system-deps",
                             f"PYTHON_BASE={sys.base_prefix}/bin/python3"], capture_output=True, text=True,
                            env=make_env(PATH=str(bin_dir)))
    assert result.returncode != 0
    assert result.stdout.strip().startswith("error: FFCV's build needs system packages: "
                                            "run 'sudo apt-get install -y g++'"), result.stdout + result.stderr
