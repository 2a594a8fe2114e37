"""Bad settings fail early with an error that names the value and the fix."""

import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_prepare_import_defines_no_flags():
    script = (
        "from absl import flags\n"
        "from vismae_jax.data import prepare\n"
        "print(sorted(name for name in ('image_size', 'output_dir', 'input', 'demo') "
        "if name in flags.FLAGS))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "[]"
