"""The installed package is the whole package: a wheel built from the repository holds every module, and
building it says nothing deprecated.

(Found on a real systemd host: ``packages = ["hl7bridge"]`` left ``hl7bridge.store`` out of the wheel, so
``pip install /path/to/hl7bridge`` gave a service that could not start. Editable installs hid it.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_of_the_package(tmp_path: Path) -> None:
    # A clean copy: a build/ folder left in the work tree would hide a module missing from the package list.
    source = tmp_path / "source"
    shutil.copytree(ROOT / "hl7bridge", source / "hl7bridge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path), str(source)],
        check=True,
        timeout=300,
        capture_output=True,
        text=True,
    )
    # An operator installing it met setuptools' licence deprecation warnings: the metadata is current.
    said = build.stdout + build.stderr
    assert "deprecated" not in said.lower() and "BuildBackendWarning" not in said, said
    (wheel,) = tmp_path.glob("hl7bridge-*.whl")
    packed = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("hl7bridge/")}
    expected = {path.relative_to(ROOT).as_posix() for path in (ROOT / "hl7bridge").rglob("*.py")}
    assert expected, "no modules found in the source tree"
    # The console's templates and static files are data, not modules: a wheel without them serves no page.
    console = ROOT / "hl7bridge" / "api" / "console"
    data = {p.relative_to(ROOT).as_posix() for d in ("templates", "static") for p in (console / d).iterdir()}
    assert data, "no console templates or static files found"
    expected |= data
    assert expected - packed == set(), f"missing from the wheel: {sorted(expected - packed)}"
    # `pip install 'hl7bridge[postgres]'` brings the PostgreSQL driver (docs/install.md).
    (metadata,) = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")]
    lines = zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
    assert "Provides-Extra: postgres" in lines
    assert any(line.startswith("Requires-Dist: psycopg[binary]") and 'extra == "postgres"' in line for line in lines)
