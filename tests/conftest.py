import contextlib
import os
import signal
import subprocess
import sys
import tempfile

import psutil
import pytest
from hypothesis import HealthCheck, settings

# Tests never reach a hub: everything they load is built here or shipped inside a package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The tests' own Hub on loopback (hub_server.py) gets a day, in effect no time limit: huggingface_hub's downloads and
# metadata requests otherwise give up after 10 s, a bound on time that a slow machine would fail.
os.environ["HF_HUB_ETAG_TIMEOUT"] = os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = str(24 * 3600)
# `make test` runs 2 workers on 2 cores: one compute thread each (and in the processes they start). Two threads per
# worker make the tiny models' many small ops wait on each other's spinning threads.
# Each worker also keeps its own numba cache: two processes compiling librosa's cached gufuncs at once can write
# mismatched cache files and segfault (numba/numba#10128), as on a fresh machine where no cache exists yet.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), "mg2-numba-cache", os.environ["PYTEST_XDIST_WORKER"]
    )
    import torch

    torch.set_num_threads(1)

# Tests put no bound on time: property tests have no per-example deadline (Hypothesis's default fails an example after
# 200 ms) and no "too slow" health check (which fails a test whose inputs take long to generate).
settings.register_profile("mg2", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mg2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE_DATA = os.path.join(ROOT, "training", "prepare_data.py")


def run_prepare_data(*arguments: str) -> subprocess.CompletedProcess:
    """Run training/prepare_data.py as a user would; fails the test with its output on error."""
    return run([sys.executable, PREPARE_DATA, *arguments])


# Prepended to a `python -c` script: makes `import mg2_pipeline` fail, as on a machine without the package.
BLOCK_MG2_PIPELINE = """import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "mg2_pipeline" or name.startswith("mg2_pipeline."):
            raise ImportError("mg2_pipeline is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def run(command: list[str], **env) -> subprocess.CompletedProcess:
    """Run a command from the repository root; fails the test with its output on error. Tests put no bound on time;
    when a run is interrupted (Ctrl-C, or the CI job's own limit), every process the command started is aborted and
    its Python stacks shown (torchrun's workers run in sessions of their own, so killing the command alone would leave
    them behind)."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONFAULTHANDLER": "1", **env},
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:  # an interrupt
        command_process = psutil.Process(process.pid)
        tree = [command_process, *command_process.children(recursive=True)]
        for member in tree:  # the faulthandler prints each one's stacks as it aborts (and writes no core file)
            with contextlib.suppress(psutil.NoSuchProcess):
                member.rlimit(psutil.RLIMIT_CORE, (0, 0))
                member.send_signal(signal.SIGABRT)
        psutil.wait_procs(tree)
        stdout, stderr = process.communicate()
        stacks = "\n".join(line for line in stderr.splitlines() if not line.startswith("Extension modules:"))
        pytest.fail(f"{command} was stopped; its output and stacks:\n{stdout[-2000:]}\n{stacks[-12000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def accelerate_command(script: str, *arguments: str, processes: int = 1) -> tuple[list[str], dict]:
    """`accelerate launch` on CPU with 1 or N processes (N > 1: `--multi_gpu` with ACCELERATE_USE_CPU, on a port the
    system chooses: two tests launched at once by `pytest -n 2` would otherwise both take 29500, and the second fail)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        return launcher + [
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--main_process_port",
            "0",
            script,
            *arguments,
        ], {"ACCELERATE_USE_CPU": "true"}
    return launcher + ["--cpu", "--num_processes", "1", script, *arguments], {}


def accelerate(script: str, *arguments: str, processes: int = 1, **env) -> subprocess.CompletedProcess:
    command, launch_env = accelerate_command(script, *arguments, processes=processes)
    return run(command, **launch_env, **env)


TINY_BUILD_ARGS = (
    "--max_tunes",
    "12",
    "--clips_per_tune",
    "2",
    "--clip_seconds",
    "4",
    "--tunes_per_shard",
    "3",
    "--validation_fraction",
    "0.25",
    "--test_fraction",
    "0.25",
    "--seed",
    "2",
    "--num_workers",
    "2",
)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """A few real corpus tunes rendered into a complete MG2 dataset (all three splits)."""
    output_dir = str(tmp_path_factory.mktemp("datasets") / "tiny-folk")
    run_prepare_data("--output_dir", output_dir, *TINY_BUILD_ARGS)
    return output_dir


@pytest.fixture(scope="session")
def tiny_generator_parts(tiny_dataset, tmp_path_factory) -> dict[str, str]:
    """A tiny random CLMP (with processor) and the melody index it builds over the tiny dataset."""
    import torch
    from transformers import AutoTokenizer

    from mg2_pipeline import CLMPFeatureExtractor, CLMPModel, CLMPProcessor
    from mg2_pipeline.presets import clmp_config, minilm_path

    folder = tmp_path_factory.mktemp("generator-parts")
    torch.manual_seed(0)
    CLMPModel(clmp_config("tiny")).save_pretrained(folder / "clmp")
    CLMPProcessor(
        CLMPFeatureExtractor(max_length_s=4.0), AutoTokenizer.from_pretrained(minilm_path()), max_text_length=16
    ).save_pretrained(folder / "clmp")
    run(
        [
            sys.executable,
            os.path.join(ROOT, "training", "build_index.py"),
            "--clmp",
            str(folder / "clmp"),
            "--dataset",
            tiny_dataset,
            "--output_dir",
            str(folder / "index"),
            "--M",
            "8",
            "--ef_construction",
            "50",
        ]
    )
    return {"clmp": str(folder / "clmp"), "retriever": str(folder / "index")}
