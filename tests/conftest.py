import os
import subprocess
import sys

import pytest

# Tests never reach a hub: everything they load is built here or shipped inside a package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE_DATA = os.path.join(ROOT, "training", "prepare_data.py")


def run_prepare_data(*arguments: str) -> subprocess.CompletedProcess:
    """Run training/prepare_data.py as a user would; fails the test with its output on error."""
    result = subprocess.run([sys.executable, PREPARE_DATA, *arguments], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TINY_BUILD_ARGS = (
    "--max_tunes", "12", "--clips_per_tune", "2", "--clip_seconds", "4", "--tunes_per_shard", "3",
    "--validation_fraction", "0.25", "--test_fraction", "0.25", "--seed", "2", "--num_workers", "2",
)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A few real corpus tunes rendered into a complete MG2 dataset (all three splits)."""
    output_dir = str(tmp_path_factory.mktemp("datasets") / "tiny-folk")
    run_prepare_data("--output_dir", output_dir, *TINY_BUILD_ARGS)
    return output_dir
