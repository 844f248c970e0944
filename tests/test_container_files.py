"""The container files are checked without a container engine: hadolint on the Dockerfiles, the Compose
specification (vendored in check-jsonschema, so offline) on the compose files, and .env.example against what
the compose files read. `make test-container` builds and runs them for real."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "tests/container/Containerfile.python-slim"]
COMPOSE_FILES = ["compose.yaml", "compose.cpu.yaml", "tests/container/compose.test.yaml"]


def tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return found


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: `!reset` and `!override` (Compose 2.24+) are tags on an ordinary value."""


ComposeLoader.add_multi_constructor("!", lambda loader, tag, node: (
    loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
    else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_scalar(node)))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_is_hadolint_clean(dockerfile):
    done = subprocess.run([tool("hadolint"), "--no-color", dockerfile], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_file_follows_the_compose_specification(compose_file, tmp_path):
    # As JSON, since check-jsonschema's YAML reader refuses Compose's own tags.
    data = yaml.load((ROOT / compose_file).read_text(encoding="utf-8"), Loader=ComposeLoader)
    as_json = tmp_path / (Path(compose_file).stem + ".json")
    as_json.write_text(json.dumps(data), encoding="utf-8")
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(as_json)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_env_example_documents_every_variable_the_compose_files_read():
    read = set()
    for compose_file in COMPOSE_FILES[:2]:  # the test override's variables are the test's own
        read |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / compose_file).read_text(encoding="utf-8")))
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    assert read - documented == set()
