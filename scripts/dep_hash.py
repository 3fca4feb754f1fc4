"""Print a short hash of the dependency spec in pyproject.toml (keys the cached environment)."""

import hashlib
import json
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
spec = [project.get("requires-python"), project.get("dependencies"),
        project.get("optional-dependencies"), sys.version_info[:2]]
print(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16])
