import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run
from conftest import accelerate as accelerate_script
from safetensors.torch import load_file

from mg2_pipeline import CLMPModel

sys.path.insert(0, os.path.join(ROOT, "training"))
from evaluate_clmp import retrieval_metrics  # noqa: E402

TRAIN = os.path.join(ROOT, "training", "train_clmp.py")
EVALUATE = os.path.join(ROOT, "training", "evaluate_clmp.py")


def accelerate(*arguments: str, processes: int = 1, **env):
    return accelerate_script(TRAIN, *arguments, processes=processes, **env)


TINY_ARGS = [
    "--preset",
    "tiny",
    "--clip_seconds",
    "4",
    "--max_text_length",
    "16",
    "--init_text_encoder",
    "none",
    "--train_batch_size",
    "2",
    "--report_to",
    "tensorboard",
]


def test_retrieval_metrics():
    queries = torch.eye(4)
    targets = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    # Queries 0 and 3 find their positive first; 1 and 2 rank it second (behind the other's target).
    metrics = retrieval_metrics(queries, targets)
    assert (
        metrics["R@1"] == 0.5 and metrics["R@5"] == 1.0 and metrics["mAP@10"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    )


def test_train_checkpoint_resume_and_evaluate(tiny_dataset, tmp_path):
    output_dir = str(tmp_path / "clmp")
    common = [
        "--dataset",
        tiny_dataset,
        "--output_dir",
        output_dir,
        *TINY_ARGS,
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "2",
    ]
    accelerate(*common, "--max_train_steps", "6", "--checkpoints_total_limit", "3")
    assert sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    uninterrupted = load_file(os.path.join(output_dir, "model.safetensors"))
    assert json.load(open(os.path.join(output_dir, "training_summary.json")))["steps"] == 6

    # Stopped after step 4 and resumed: the same weights as the uninterrupted run, bit for bit (optimizer, learning
    # rate schedule, random state and data position all come back).
    stopped = str(tmp_path / "stopped")
    shutil.copytree(os.path.join(output_dir, "checkpoint-4"), os.path.join(stopped, "checkpoint-4"))
    resumed = accelerate(
        *[stopped if value == output_dir else value for value in common],
        "--max_train_steps",
        "6",
        "--resume_from_checkpoint",
        "latest",
    )
    assert "Resumed from" in resumed.stdout + resumed.stderr
    assert sorted(d for d in os.listdir(stopped) if d.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-6"]
    resumed_weights = load_file(os.path.join(stopped, "model.safetensors"))
    assert resumed_weights.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed_weights[name], value), name
    assert any(
        name.startswith("events.out.tfevents")
        for _, _, files in os.walk(os.path.join(output_dir, "logs"))
        for name in files
    )

    results_path = str(tmp_path / "results.json")
    printed = run(
        [
            sys.executable,
            EVALUATE,
            "--model",
            output_dir,
            "--dataset",
            tiny_dataset,
            "--batch_size",
            "4",
            "--match_prompt_facts",
            "--output_json",
            results_path,
        ]
    ).stdout
    results = json.load(open(results_path))
    assert list(results) == ["W2T", "T2W", "W2M", "M2W", "T2M", "M2T", "T2M+facts"]
    for metrics in results.values():
        assert set(metrics) == {"R@1", "R@5", "R@10", "mAP@10"}
        assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 1
    assert "W2T" in printed and "mAP@10" in printed


def test_two_processes_read_disjoint_data_and_end_with_rank_zero_weights(tiny_dataset, tmp_path):
    output_dir = str(tmp_path / "ddp")
    accelerate(
        "--dataset",
        tiny_dataset,
        "--output_dir",
        output_dir,
        *TINY_ARGS,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--record_data_order",
        processes=2,
    )
    order = {rank: open(os.path.join(output_dir, "data_order", f"rank{rank}.txt")).read().split() for rank in (0, 1)}
    assert len(order[0]) == len(order[1]) == 4
    assert not set(order[0]) & set(order[1])
    summary = json.load(open(os.path.join(output_dir, "training_summary.json")))
    assert summary["processes"] == 2
    rank0, rank1 = summary["weight_fingerprint_per_process"]
    saved = sum(p.double().sum().item() for p in CLMPModel.from_pretrained(output_dir).parameters())
    assert rank0 == rank1 and saved == pytest.approx(rank0, rel=1e-9)


def test_clap_baseline_trains_with_the_same_script(tiny_dataset, tmp_path):
    output_dir = str(tmp_path / "clap")
    accelerate(
        "--dataset",
        tiny_dataset,
        "--output_dir",
        output_dir,
        *TINY_ARGS,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--modalities",
        "text,audio",
    )
    config = json.load(open(os.path.join(output_dir, "config.json")))
    assert config["modalities"] == ["text", "audio"]
    assert not any(key.startswith("melody") for key in load_file(os.path.join(output_dir, "model.safetensors")))
    results_path = str(tmp_path / "results.json")
    run([sys.executable, EVALUATE, "--model", output_dir, "--dataset", tiny_dataset, "--output_json", results_path])
    assert list(json.load(open(results_path))) == ["W2T", "T2W"]


def test_text_trainable_layers_freeze_the_lower_text_tower(tiny_dataset, tmp_path):
    output_dir = str(tmp_path / "clmp")
    accelerate(
        "--dataset",
        tiny_dataset,
        "--output_dir",
        output_dir,
        *TINY_ARGS,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--text_trainable_layers",
        "1",
        "--text_melody_loss_weight",
        "3",
    )
    first, second = (load_file(os.path.join(output_dir, f"checkpoint-{step}", "model.safetensors")) for step in (1, 2))
    frozen = [
        k for k in first if k.startswith("text_model.embeddings.") or k.startswith("text_model.encoder.layer.0.")
    ]
    trained = [k for k in first if k.startswith("text_model.encoder.layer.1.")]
    assert frozen and trained
    assert all(torch.equal(first[k], second[k]) for k in frozen)
    assert any(not torch.equal(first[k], second[k]) for k in trained)
    refused = subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--dataset",
            tiny_dataset,
            "--output_dir",
            str(tmp_path / "bad"),
            *TINY_ARGS,
            "--text_trainable_layers",
            "7",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert refused.returncode != 0 and "--text_trainable_layers must be in [0, 2]" in refused.stderr
