"""A wheel of zoom (what `pip install .` installs) carries the bundled configs, prompt sets, the trained
world and the report templates: an installed zoom needs no checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_wheel_carries_configs_prompts_world_and_templates(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("zoom-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for kind in ("configs", "prompts", "vocabularies"):
        shipped = {p.name for p in (ROOT / "zoom" / "data" / kind).glob("*.yaml")}
        assert shipped and {f"zoom/data/{kind}/{n}" for n in shipped} <= names
    world = {str(p.relative_to(ROOT)) for p in (ROOT / "zoom" / "data" / "world").rglob("*") if p.is_file()}
    assert world and world <= names
    assert "zoom/report/templates/report.html.j2" in names
    assert any(n.endswith("licenses/LICENSE") or n.endswith("LICENSE") for n in names)
