"""The wheel carries the presets and the image recipe."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_contains_presets_and_containerfile(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel, = tmp_path.glob("mino_jupyter-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in sorted((ROOT / "presets").glob("*.toml")):
        assert f"mino_jupyter/presets/{preset.name}" in names
    assert "mino_jupyter/presets/dev.toml" in names and "mino_jupyter/presets/registries.toml" in names
    assert "mino_jupyter/image/Containerfile" in names
