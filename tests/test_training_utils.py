"""The checkpoint helpers every training script shares (training/training_utils.py)."""

import os
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, accelerate

sys.path.insert(0, os.path.join(ROOT, "training"))
from training_utils import checkpoint_dirs, resume, save_checkpoint  # noqa: E402

# Two processes end a run while one of them has an all-reduce in flight on the group its DDP model uses. If the model
# still held the group after `finish_run`, the group would be destroyed when the model dies, and gloo would join its
# worker threads holding the GIL, which a worker releasing that tensor needs (a hang that depends on timing). So each
# process reports, with no clock involved, which of DDP's three holders of the group remain.
LEAVE_WITH_WORK_IN_FLIGHT = """
import sys
sys.path.insert(0, {training!r})
import torch
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel
from training_utils import finish_run


def main():
    accelerator = Accelerator()
    group = torch.distributed.new_group(backend="gloo")  # its Python object outlives finish_run, as it may in a script
    model = DistributedDataParallel(torch.nn.Linear(3, 2), process_group=group)
    torch.distributed.all_reduce(torch.ones(1), group=group, async_op=True)
    finish_run(accelerator, model)
    held = [name for name in ("process_group", "reducer", "logger") if hasattr(model, name)]
    sys.stdout.write(f"holds {{held}}\\n")  # one write: the two processes share the pipe
    sys.stdout.flush()


main()
print("exited", flush=True)
"""


class Killed(BaseException):
    """Stands for SIGKILL arriving while a checkpoint is being written."""


def prepared_model(accelerator):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    return accelerator.prepare(model, optimizer)


def train_step(model, optimizer):
    model(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_a_kill_while_the_next_checkpoint_is_written_leaves_the_last_one_to_resume_from(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared_model(accelerator)
    train_step(model, optimizer)
    save_checkpoint(accelerator, str(tmp_path), 1, 1, epoch=0)
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    train_step(model, optimizer)

    write_state = accelerator.save_state

    def killed_mid_write(path):
        write_state(path)
        raise Killed

    monkeypatch.setattr(accelerator, "save_state", killed_mid_write)
    with pytest.raises(Killed):
        save_checkpoint(accelerator, str(tmp_path), 1, 2, epoch=0)
    assert [os.path.basename(d) for d in checkpoint_dirs(str(tmp_path))] == ["checkpoint-1"]

    state = resume(accelerator, str(tmp_path), "latest")
    assert state["global_step"] == 1 and state["checkpoint"].endswith("checkpoint-1")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)


def test_the_newest_checkpoints_are_kept_and_a_rewritten_step_replaces_its_folder(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared_model(accelerator)
    for step in (1, 2, 3):
        train_step(model, optimizer)
        save_checkpoint(accelerator, str(tmp_path), 2, step)
    assert [os.path.basename(d) for d in checkpoint_dirs(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    save_checkpoint(accelerator, str(tmp_path), 2, 3, note="again")
    assert resume(accelerator, str(tmp_path), "latest")["note"] == "again"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]


def test_a_resumed_run_must_have_trained_by_the_checkpoints_step_what_the_checkpoint_saved(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared_model(accelerator)
    train_step(model, optimizer)
    save_checkpoint(accelerator, str(tmp_path), 2, 2, decoded_spectral=None)  # a term that starts after step 2
    save_checkpoint(accelerator, str(tmp_path), 2, 3, decoded_spectral=[0.3, 2])

    def trained(start):
        return lambda step: {"decoded_spectral": [0.3, start] if step > start else None}

    assert resume(accelerator, str(tmp_path), "latest", trained(2))["global_step"] == 3
    # A longer run starts the term later: checkpoint-2, from before it, still fits; checkpoint-3 does not.
    assert resume(accelerator, str(tmp_path), str(tmp_path / "checkpoint-2"), trained(6))["global_step"] == 2
    with pytest.raises(
        SystemExit, match=r"checkpoint-3 was trained with decoded_spectral=\[0.3, 2\], this run has None"
    ):
        resume(accelerator, str(tmp_path), "latest", trained(6))


def test_a_checkpoint_holds_every_process_state_when_another_process_writes_late(tmp_path, monkeypatch):
    """Another process writes its random state into the checkpoint folder at its own pace; all a process may count on
    is that it has done so by the barrier. Modelled here: process 1's file is written when the barrier is reached."""
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared_model(accelerator)
    temporary = tmp_path / "run" / "checkpoint-1.tmp"
    barrier, written = accelerator.wait_for_everyone, []

    def process_one_arrives():
        if not written:  # fails if the folder was already renamed, as process 1 did
            torch.save({"process": 1}, temporary / "random_states_1.pkl")
            written.append(True)
        barrier()

    monkeypatch.setattr(accelerator, "wait_for_everyone", process_one_arrives)
    save_checkpoint(accelerator, str(tmp_path / "run"), 1, 1)
    assert os.listdir(tmp_path / "run") == ["checkpoint-1"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(tmp_path / "run" / "checkpoint-1"))


def test_every_process_exits_when_a_run_ends_with_gloo_still_releasing_a_tensor(tmp_path):
    """`finish_run` frees the process group from every DDP model before destroying it: left to the model's end, gloo
    waits for its threads holding the GIL, which a thread releasing a tensor needs, and a process can hang."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVE_WITH_WORK_IN_FLIGHT.format(training=os.path.join(ROOT, "training")))
    result = accelerate(str(script), processes=2)
    assert result.stdout.count("holds []") == 2
    assert result.stdout.count("exited") == 2
