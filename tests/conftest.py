"""Shared test setup: 8 simulated CPU devices, a compilation cache and the golden tensors."""

import os
import pathlib

# Must be set before JAX is imported anywhere in the test process. The lowest LLVM optimisation
# level halves CPU compile time; the tests' tiny steps then run about 2x slower, a net gain.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_PATH = REPO_ROOT.parent / "shared" / "golden" / "swin_mae_small_224.npz"

jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".cache" / "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """Reference weights, inputs, mask and outputs computed by the public PyTorch SwinMAE."""
    if not GOLDEN_PATH.exists():
        pytest.fail(
            f"Golden tensors not found at {GOLDEN_PATH}; "
            "the shared/ folder must sit beside the checkout."
        )
    with np.load(GOLDEN_PATH) as data:
        return {key: data[key] for key in data.files}
