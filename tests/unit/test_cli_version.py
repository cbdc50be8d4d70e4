"""`fanout --version`, and the licence as the package metadata states it."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from fanout.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_version_prints_the_projects_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out == f"fanout {project['version']}\n"


def test_the_licence_is_mit_in_the_file_and_the_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    assert metadata.metadata("feed-fanout")["License-Expression"] == "MIT"
