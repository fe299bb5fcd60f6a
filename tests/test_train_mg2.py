import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, accelerate, accelerate_command
from safetensors.torch import load_file

from mg2_pipeline import MG2Pipeline
from mg2_pipeline.audio import LOG_FLOOR
from mg2_pipeline.data import LatentCrop, load_mg2_dataset

sys.path.insert(0, os.path.join(ROOT, "training"))
from training_utils import NonFiniteLossGuard, checkpoint_dirs, load_ema_weights  # noqa: E402

TRAIN = os.path.join(ROOT, "training", "train_mg2.py")


def tiny_args(dataset: str, parts: dict, output_dir, *extra: str) -> list[str]:
    return [
        "--pipeline",
        "preset:tiny",
        "--clmp",
        parts["clmp"],
        "--retriever",
        parts["retriever"],
        "--dataset",
        dataset,
        "--output_dir",
        str(output_dir),
        "--clip_seconds",
        "1.28",
        "--train_batch_size",
        "2",
        "--shuffle_buffer_size",
        "8",
        "--validation_inference_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--lr_warmup_steps",
        "1",
        *extra,
    ]


def unet_weights(folder) -> dict:
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_training_learns_checkpoints_validates_and_saves_a_loadable_pipeline(
    tiny_dataset, tiny_generator_parts, tmp_path
):
    output_dir = tmp_path / "mg2"
    accelerate(
        TRAIN,
        *tiny_args(
            tiny_dataset,
            tiny_generator_parts,
            output_dir,
            "--max_train_steps",
            "12",
            "--checkpointing_steps",
            "4",
            "--checkpoints_total_limit",
            "2",
            "--validation_steps",
            "6",
        ),
    )
    assert [os.path.basename(d) for d in checkpoint_dirs(str(output_dir))] == ["checkpoint-8", "checkpoint-12"]
    assert sorted(os.listdir(output_dir / "validation")) == ["step-12.wav", "step-6.wav"]
    assert any(
        name.startswith("events.out.tfevents") for _, _, files in os.walk(output_dir / "logs") for name in files
    )
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["steps"] == 12 and summary["skipped_steps"] == 0
    assert summary["loss_last_10"] < summary["loss_first_10"]

    pipe = MG2Pipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    assert (
        pipe.config.condition == "text_melody" and pipe.config.aligned_melody == "sketch" and len(pipe.retriever) > 1
    )
    out = pipe(
        "a jig on fiddle", num_inference_steps=2, audio_length_in_s=1.28, generator=torch.Generator().manual_seed(0)
    )
    assert out.audios.shape == (1, 20480) and np.all(np.isfinite(out.audios)) and out.melodies[0].metadata["title"]

    # A checkpoint's EMA weights (what the benchmarks measure per checkpoint): the last one's are the saved UNet's.
    saved = unet_weights(output_dir)
    for checkpoint, equal in (("checkpoint-8", False), ("checkpoint-12", True)):
        load_ema_weights(pipe.unet, output_dir / checkpoint)
        loaded = {name: parameter.detach() for name, parameter in pipe.unet.named_parameters()}
        assert all(torch.equal(loaded[name], saved[name]) for name in loaded) == equal

    # Guidance distillation from it: the student learns the teacher's guided prediction and generates in one pass.
    distilled_dir = tmp_path / "mg2-distilled"
    accelerate(
        TRAIN,
        *tiny_args(tiny_dataset, tiny_generator_parts, distilled_dir, "--max_train_steps", "20"),
        *("--pipeline", str(output_dir), "--distill_guidance", "3"),
        *("--condition_dropout", "0", "--text_dropout", "0", "--melody_dropout", "0", "--validation_steps", "20"),
    )
    summary = json.loads((distilled_dir / "training_summary.json").read_text())
    assert summary["distilled_guidance_scale"] == 3 and summary["loss_last_10"] < summary["loss_first_10"]
    student = MG2Pipeline.from_pretrained(distilled_dir)
    assert student.config.distilled_guidance_scale == 3 and student.default_guidance_scales == (1.0, 1.0)
    assert not all(torch.equal(saved[name], weight) for name, weight in unet_weights(distilled_dir).items())
    passes = []
    student.unet.register_forward_hook(lambda module, inputs, output: passes.append(len(inputs[0])))
    student("a jig on fiddle", num_inference_steps=2, audio_length_in_s=1.28, generator=torch.Generator())
    assert passes and set(passes) == {1}  # one row per UNet call: no guidance batch (a guided model stacks 2)


def logged_steps(output_dir, tag: str) -> list[int]:
    """The steps at which a run's tensorboard logs hold a scalar `tag`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for path in glob.glob(os.path.join(output_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        if tag in events.Tags()["scalars"]:
            steps += [event.step for event in events.Scalars(tag)]
    return sorted(steps)


def test_text_attention_and_random_sketch_timbre_train_and_follow_the_prompt(
    tiny_dataset, tiny_generator_parts, tmp_path
):
    import pyarrow.parquet as pq

    cache_root = tmp_path / "cache"
    common = ["--max_train_steps", "4", "--validation_steps", "100", "--latent_cache", str(cache_root)]
    # The plain run adds the decoded-mel term in the learning-rate decay only: the second of its two steps.
    plain = ("--max_train_steps", "2", "--prediction_type", "sample", "--decoded_spectral_weight", "1")
    decay = (
        "--lr_scheduler",
        "warmup_stable_decay",
        "--lr_decay_fraction",
        "0.5",
        "--decoded_spectral_steps",
        "decay",
    )
    accelerate(TRAIN, *tiny_args(tiny_dataset, tiny_generator_parts, tmp_path / "plain", *common, *plain, *decay))
    assert logged_steps(tmp_path / "plain", "loss") == [1, 2]
    assert logged_steps(tmp_path / "plain", "decoded_spectral_convergence") == [2]
    assert "in steps 2–2, plus 1.0 × the spectral convergence" in (tmp_path / "plain" / "README.md").read_text()
    state = json.loads((tmp_path / "plain" / "checkpoint-2" / "training_state.json").read_text())
    assert state["decoded_spectral"] == [1.0, 1]  # what a run resuming from it must have trained with
    accelerate(
        TRAIN,
        *tiny_args(
            tiny_dataset,
            tiny_generator_parts,
            tmp_path / "mg2",
            *common,
            "--text_attention",
            "on",
            "--sketch_timbre",
            "random",
        ),
    )
    summary = json.loads((tmp_path / "mg2" / "training_summary.json").read_text())
    assert summary["text_attention"] is True and summary["sketch_timbre"] == "random"

    # The random-timbre cache has the same latents and captions as the plain one, and other melody frames.
    def cache_rows(folder):
        rows = [
            row for path in glob.glob(os.path.join(folder, "*.parquet")) for row in pq.read_table(path).to_pylist()
        ]
        return sorted(rows, key=lambda row: row["clip_id"])

    plain = cache_rows(json.loads((tmp_path / "plain" / "training_summary.json").read_text())["latent_cache"])
    random = cache_rows(summary["latent_cache"])
    assert [row["caption"] for row in plain] == [row["caption"] for row in random] and all(
        row["caption"] for row in plain
    )
    assert len(plain) == len(random) > 0
    assert all(a["latents"] == b["latents"] for a, b in zip(plain, random))
    assert all(a["melody_frames"] != b["melody_frames"] for a, b in zip(plain, random))

    pipe = MG2Pipeline.from_pretrained(tmp_path / "mg2")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.text_attention and pipe.unet.config.cross_attention_dim == pipe.clmp.text_hidden_size
    # The caption's token states are cached (not in the plain run's cache: it has no text attention), so that training
    # never runs the text tower: the pipeline's own, to float16, zero-padded beside their mask.
    states, mask = pipe.encode_text_states([random[0]["caption"]], "cpu")
    crop = LatentCrop(8, 0.02, max_text_length=pipe.processor.max_text_length)(random[0])
    torch.testing.assert_close(crop["text_mask"], mask[0])
    torch.testing.assert_close(
        crop["text_states"] * mask[0, :, None], states[0] * mask[0, :, None], atol=2e-2, rtol=1e-3
    )
    longer = LatentCrop(8, 0.02, max_text_length=int(mask.sum()) + 4)(random[0])
    assert longer["text_mask"][-4:].sum() == 0 and longer["text_states"][-4:].abs().sum() == 0
    assert all(row["text_states"] is None for row in plain)

    def generate(prompt):
        return pipe(
            prompt,
            melody="G4:0.5 A4:0.5 B4:1",
            num_inference_steps=2,
            audio_length_in_s=1.28,
            generator=torch.Generator().manual_seed(0),
        ).audios[0]

    fiddle, piano = generate("a jig on fiddle"), generate("a jig on piano")
    assert np.all(np.isfinite(fiddle)) and not np.allclose(fiddle, piano, atol=1e-4)
    # The token states reach the UNet: with the empty text's states in their place (the pooled embedding unchanged),
    # the same prompt, melody and seed sound different.
    encode_text_outputs = pipe.encode_text_outputs

    def empty_states(texts, device):
        embeds, _, _ = encode_text_outputs(texts, device)
        return embeds, *encode_text_outputs([""] * len(texts), device)[1:]

    pipe.encode_text_outputs = empty_states
    assert not np.allclose(generate("a jig on fiddle"), fiddle, atol=1e-4)
    with pytest.raises(ValueError, match="prompt_embeds"):
        pipe(prompt_embeds=pipe.encode_text(["a jig"], pipe.device), melody="G4:0.5", num_inference_steps=2)


def test_a_cache_of_plain_sketches_is_keyed_on_their_envelope(tmp_path, monkeypatch):
    import train_mg2

    from mg2_pipeline.presets import build_pipeline

    pipe = build_pipeline("tiny")
    plain, random = (
        train_mg2.parse_args(["--dataset", "user/tunes", "--output_dir", str(tmp_path), "--sketch_timbre", timbre])
        for timbre in ("plain", "random")
    )
    keys = [train_mg2.latent_cache_dir(pipe, args) for args in (plain, random)]
    monkeypatch.setattr(train_mg2, "PLAIN_SKETCH_RELEASE_S", 0.01)
    # Sketches rendered with another envelope are another cache; random sketches do not use the plain envelope.
    assert train_mg2.latent_cache_dir(pipe, plain) != keys[0] and train_mg2.latent_cache_dir(pipe, random) == keys[1]


def test_a_cache_for_text_attention_holds_each_captions_own_token_states(tiny_dataset, tiny_generator_parts):
    import train_mg2

    from mg2_pipeline import CLMPModel, CLMPProcessor, MelodyRetriever
    from mg2_pipeline.presets import build_pipeline

    preset = build_pipeline("tiny", text_attention=True)
    parts = dict(preset.components)
    parts.update(
        clmp=CLMPModel.from_pretrained(tiny_generator_parts["clmp"]).eval(),
        processor=CLMPProcessor.from_pretrained(tiny_generator_parts["clmp"]),
        retriever=MelodyRetriever.from_pretrained(tiny_generator_parts["retriever"]),
    )
    pipe = MG2Pipeline(**parts, aligned_melody=preset.config.aligned_melody, text_attention=True)
    captions = ["a jig", "a slow air on a wooden flute", "reel"]
    rows = [dict(row, caption=caption) for row, caption in zip(load_mg2_dataset(tiny_dataset, "train"), captions)]
    cached = train_mg2.cache_rows(pipe, rows, "cpu")
    states, mask = pipe.encode_text_states(captions, "cpu")
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == 3 and lengths.max() < pipe.processor.max_text_length
    for row, row_states, row_mask, length in zip(cached, states, mask, lengths):
        crop = LatentCrop(8, 0.02, max_text_length=pipe.processor.max_text_length)(row)
        assert row["text_states_shape"] == [length, pipe.clmp.text_hidden_size]
        torch.testing.assert_close(crop["text_mask"], row_mask)
        torch.testing.assert_close(crop["text_states"][:length], row_states[:length], atol=2e-2, rtol=1e-3)
        assert crop["text_states"][length:].abs().sum() == 0
    # Only a cache for text attention holds token states, and it has its own key.
    without = MG2Pipeline(
        **dict(parts, unet=build_pipeline("tiny", text_attention=False).unet),
        aligned_melody=pipe.config.aligned_melody,
    )
    assert all(row["text_states"] is None for row in train_mg2.cache_rows(without, rows[:1], "cpu"))
    args = train_mg2.parse_args(["--dataset", "user/tunes", "--output_dir", "unused"])
    assert train_mg2.latent_cache_dir(pipe, args) != train_mg2.latent_cache_dir(without, args)


def test_the_latent_cache_is_built_once_per_key_and_holds_whole_clips(tiny_dataset, tiny_generator_parts, tmp_path):
    import pyarrow.parquet as pq

    def cache_table(output_dir):
        folder = json.loads((output_dir / "training_summary.json").read_text())["latent_cache"]
        info = json.loads(open(os.path.join(folder, "cache_info.json")).read())
        rows = [
            row for path in glob.glob(os.path.join(folder, "*.parquet")) for row in pq.read_table(path).to_pylist()
        ]
        return sorted(rows, key=lambda row: row["clip_id"]), info

    cache_root = tmp_path / "cache"
    common = ["--max_train_steps", "1", "--validation_steps", "100", "--latent_cache", str(cache_root)]
    first = accelerate(
        TRAIN, *tiny_args(tiny_dataset, tiny_generator_parts, tmp_path / "a", *common, "--latent_cache_workers", "2")
    )
    again = accelerate(TRAIN, *tiny_args(tiny_dataset, tiny_generator_parts, tmp_path / "b", *common))
    pooled = accelerate(
        TRAIN, *tiny_args(tiny_dataset, tiny_generator_parts, tmp_path / "c", *common, "--aligned_melody", "none")
    )
    assert "part 2/2" in first.stderr and "Latent cache" not in again.stderr and "Latent cache" in pooled.stderr
    keys = sorted(os.listdir(cache_root))
    assert len(keys) == 2  # the pooled-only model has no melody frames: its own key
    assert MG2Pipeline.from_pretrained(tmp_path / "c").config.aligned_melody is None
    # Built again by one process elsewhere: the same rows as the two forked workers cached, each once.
    accelerate(
        TRAIN, *tiny_args(tiny_dataset, tiny_generator_parts, tmp_path / "d", *common[:-1], str(tmp_path / "cache-1"))
    )
    table, info = cache_table(tmp_path / "d")
    in_parts, parts_info = cache_table(tmp_path / "a")
    clips = sum(1 for _ in load_mg2_dataset(tiny_dataset, "train"))
    assert info["rows"] == len(table) == clips and info["skipped_rows"] == 0 and parts_info["workers"] == 2
    assert [row["clip_id"] for row in in_parts] == [row["clip_id"] for row in table]
    for one, two in zip(table, in_parts):
        for key in ("latents", "melody_frames"):
            np.testing.assert_allclose(
                np.frombuffer(one[key], np.float16), np.frombuffer(two[key], np.float16), atol=1e-3
            )
    row = table[0]
    assert row["latents_shape"] == [4, 200, 32] and row["melody_frames_shape"] == [
        4,
        200,
        32,
    ]  # 4 s at ×2: whole clips
    assert len(np.frombuffer(row["latents"], np.float16)) == 4 * 200 * 32 and len(row["text_embeds"]) == 32


def test_text_only_ablation_trains_with_the_same_script(tiny_dataset, tiny_generator_parts, tmp_path):
    output_dir = tmp_path / "text-only"
    accelerate(
        TRAIN,
        *tiny_args(
            tiny_dataset,
            tiny_generator_parts,
            output_dir,
            "--max_train_steps",
            "2",
            "--condition",
            "text",
            "--validation_steps",
            "2",
            "--checkpointing_steps",
            "2",
        ),
    )
    pipe = MG2Pipeline.from_pretrained(output_dir)
    assert pipe.config.condition == "text" and pipe.config.aligned_melody is None
    out = pipe("a jig", num_inference_steps=2, audio_length_in_s=1.28, generator=torch.Generator().manual_seed(0))
    assert out.melodies == [None]
    with pytest.raises(ValueError, match="text-only model"):
        pipe("a jig", melody="G4:1")


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint_with_identical_state(
    tiny_dataset, tiny_generator_parts, tmp_path
):
    common = [
        "--max_train_steps",
        "8",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "10",
        "--validation_steps",
        "100",
    ]
    reference = tmp_path / "uninterrupted"
    accelerate(TRAIN, *tiny_args(tiny_dataset, tiny_generator_parts, reference, *common))

    killed = tmp_path / "killed"
    command, env = accelerate_command(TRAIN, *tiny_args(tiny_dataset, tiny_generator_parts, killed, *common))
    # Killed as soon as the run says step 4's checkpoint is complete: nothing here waits on the clock. Its process
    # group is killed however the read loop ends (an interrupt included).
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in process.stdout:
            if f"Saved checkpoint {killed / 'checkpoint-4'}" in line:
                break
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert os.path.isdir(killed / "checkpoint-4") and not os.path.isfile(killed / "training_summary.json")
    # a checkpoint interrupted while being written is never taken for the latest
    os.makedirs(killed / "checkpoint-7.tmp")
    last_complete = checkpoint_dirs(str(killed))[-1]

    resumed = accelerate(
        TRAIN, *tiny_args(tiny_dataset, tiny_generator_parts, killed, *common, "--resume_from_checkpoint", "latest")
    )
    assert (
        f"Resumed from {last_complete} at step {int(last_complete.rsplit('-', 1)[1])}"
        in resumed.stdout + resumed.stderr
    )
    assert json.loads((killed / "training_summary.json").read_text())["steps"] == 8
    # same weights, optimizer and EMA as the run that was never interrupted
    for name in ("model.safetensors",):
        a, b = load_file(reference / "checkpoint-8" / name), load_file(killed / "checkpoint-8" / name)
        assert all(torch.equal(a[key], b[key]) for key in a)
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl"):
        a = torch.load(reference / "checkpoint-8" / name, weights_only=False)
        b = torch.load(killed / "checkpoint-8" / name, weights_only=False)
        flat_a, flat_b = _tensors(a), _tensors(b)
        assert len(flat_a) == len(flat_b) > 0 and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), name
    a, b = unet_weights(reference), unet_weights(killed)
    assert all(torch.equal(a[key], b[key]) for key in a)


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []


def test_non_finite_losses_are_skipped_and_abort_after_k_in_a_row():
    guard = NonFiniteLossGuard(Accelerator(cpu=True), patience=3)
    assert not guard.should_skip(torch.tensor(1.0))
    assert guard.should_skip(torch.tensor(float("nan")))
    assert guard.should_skip(torch.tensor(float("inf")))
    assert not guard.should_skip(torch.tensor(0.5))
    assert guard.skipped == 2 and guard.in_a_row == 0
    guard.should_skip(torch.tensor(float("nan")))
    guard.should_skip(torch.tensor(float("nan")))
    with pytest.raises(RuntimeError, match="NaN or infinite for 3 steps in a row"):
        guard.should_skip(torch.tensor(float("nan")))


def test_a_diverging_run_stops_with_a_clear_message_and_finite_checkpoints(
    tiny_dataset, tiny_generator_parts, tmp_path
):
    output_dir = tmp_path / "diverged"
    command, env = accelerate_command(
        TRAIN,
        *tiny_args(
            tiny_dataset,
            tiny_generator_parts,
            output_dir,
            "--max_train_steps",
            "30",
            "--checkpointing_steps",
            "1",
            "--validation_steps",
            "100",
            "--max_nonfinite_steps",
            "2",
            "--max_grad_norm",
            "1e30",
        ),
    )
    command[command.index("--learning_rate") + 1] = "1e30"
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    assert result.returncode != 0
    assert "NaN or infinite for 2 steps in a row" in result.stderr
    for checkpoint in checkpoint_dirs(str(output_dir)):
        weights = load_file(os.path.join(checkpoint, "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values())


def test_two_processes_train_and_save_the_same_pipeline(tiny_dataset, tiny_generator_parts, tmp_path):
    output_dir = tmp_path / "ddp"
    accelerate(
        TRAIN,
        *tiny_args(
            tiny_dataset,
            tiny_generator_parts,
            output_dir,
            "--max_train_steps",
            "2",
            "--checkpointing_steps",
            "2",
            "--validation_steps",
            "2",
        ),
        processes=2,
    )
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2 and summary["samples"] == 8
    pipe = MG2Pipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a jig", num_inference_steps=2, audio_length_in_s=1.28, generator=torch.Generator().manual_seed(0))
    assert out.audios.shape == (1, 20480) and np.all(np.isfinite(out.audios)) and np.abs(out.audios).max() > 0


def test_a_corrupt_row_is_skipped_and_counted(tiny_dataset, tiny_generator_parts, tmp_path):
    from mg2_pipeline.data import write_shard

    rows = list(load_mg2_dataset(tiny_dataset, "train", streaming=False))
    rows[0] = dict(rows[0], audio={"bytes": b"not audio at all", "path": "broken.flac"})
    write_shard(rows, str(tmp_path / "corrupt" / "data" / "train-00000-of-00001.parquet"))
    output_dir = tmp_path / "mg2"
    result = accelerate(
        TRAIN,
        *tiny_args(
            str(tmp_path / "corrupt"),
            tiny_generator_parts,
            output_dir,
            "--max_train_steps",
            "3",
            "--train_batch_size",
            "4",
            "--shuffle_buffer_size",
            "0",
            "--validation_steps",
            "100",
        ),
    )
    assert "corrupt rows skipped" in result.stderr
    assert json.loads((output_dir / "training_summary.json").read_text())["skipped_rows_latent_cache"] == 1


def test_lora_adapter_changes_the_output_and_reloads_exactly(tiny_dataset, tiny_generator_parts, tmp_path):
    from mg2_pipeline import CLMPModel, CLMPProcessor, MelodyRetriever
    from mg2_pipeline.presets import build_pipeline

    base = build_pipeline("tiny")
    base = MG2Pipeline(
        **{
            **base.components,
            "clmp": CLMPModel.from_pretrained(tiny_generator_parts["clmp"]),
            "processor": CLMPProcessor.from_pretrained(tiny_generator_parts["clmp"]),
            "retriever": MelodyRetriever.from_pretrained(tiny_generator_parts["retriever"]),
        },
        aligned_melody=base.config.aligned_melody,
    )
    base.save_pretrained(tmp_path / "base")
    adapter_dir = tmp_path / "lora"
    args = tiny_args(
        tiny_dataset,
        tiny_generator_parts,
        adapter_dir,
        "--max_train_steps",
        "3",
        "--use_lora",
        "--rank",
        "4",
        "--validation_steps",
        "100",
        "--learning_rate",
        "1e-2",
        "--checkpointing_steps",
        "2",
    )
    args[args.index("--pipeline") + 1] = str(tmp_path / "base")
    accelerate(TRAIN, *args)
    # Stopped after step 2 and resumed: the uninterrupted run's adapter, bit for bit.
    resumed = resume_from(adapter_dir / "checkpoint-2", tmp_path / "lora-resumed", TRAIN, *args)
    assert_same_weights(adapter_dir, resumed, "pytorch_lora_weights.safetensors")
    assert os.path.isfile(adapter_dir / "pytorch_lora_weights.safetensors")
    assert not os.path.isdir(adapter_dir / "unet")  # only the adapter is saved
    adapter = load_file(adapter_dir / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora" in key for key in adapter)

    def sample(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            "a jig", num_inference_steps=3, audio_length_in_s=1.28, generator=torch.Generator().manual_seed(0)
        ).audios

    pipe = MG2Pipeline.from_pretrained(tmp_path / "base")
    before = sample(pipe)
    pipe.load_lora_weights(adapter_dir)
    after = sample(pipe)
    assert not np.allclose(before, after)
    again = MG2Pipeline.from_pretrained(tmp_path / "base")
    again.load_lora_weights(adapter_dir)
    np.testing.assert_array_equal(sample(again), after)


def resume_from(checkpoint, output_dir, script: str, *arguments: str):
    """A run stopped at `checkpoint`: that checkpoint alone in a fresh `output_dir`, resumed with `arguments`."""
    shutil.copytree(checkpoint, output_dir / os.path.basename(checkpoint))
    result = accelerate(script, *arguments, "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest")
    assert "Resumed from" in result.stdout + result.stderr
    return output_dir


def assert_same_weights(expected_dir, actual_dir, filename: str) -> None:
    expected, actual = load_file(os.path.join(expected_dir, filename)), load_file(os.path.join(actual_dir, filename))
    assert expected.keys() == actual.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


def test_vae_training_learns_stores_its_scaling_factor_and_plugs_in(tiny_dataset, tmp_path):
    from mg2_pipeline import MelAutoencoderKL
    from mg2_pipeline.presets import load_vae

    output_dir = tmp_path / "vae"
    arguments = [
        "--preset",
        "tiny",
        "--dataset",
        tiny_dataset,
        "--clip_seconds",
        "1.28",
        "--train_batch_size",
        "4",
        "--max_train_steps",
        "16",
        "--learning_rate",
        "3e-3",
        "--disc_start",
        "8",
        "--checkpointing_steps",
        "8",
        "--scaling_batches",
        "2",
        "--shuffle_buffer_size",
        "8",
        "--latent_fold",
        "2",
        "--lr_scheduler",
        "warmup_stable_decay",
        "--silence_probability",
        "0.5",
    ]
    accelerate(os.path.join(ROOT, "training", "train_vae.py"), *arguments, "--output_dir", str(output_dir))
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["l1_last_10"] < summary["l1_first_10"]
    vae = load_vae(str(output_dir))
    assert isinstance(vae, MelAutoencoderKL) and vae.config.latent_fold == 2 and vae.config.latent_channels == 4
    assert vae.config.scaling_factor == pytest.approx(summary["scaling_factor"]) and vae.config.scaling_factor != 1.0
    assert [os.path.basename(d) for d in checkpoint_dirs(str(output_dir))] == ["checkpoint-8", "checkpoint-16"]

    # Stopped after step 8 (as the discriminator starts) and resumed: the uninterrupted run's weights, bit for bit.
    resumed = resume_from(
        output_dir / "checkpoint-8",
        tmp_path / "vae-resumed",
        os.path.join(ROOT, "training", "train_vae.py"),
        *arguments,
    )
    assert_same_weights(output_dir, resumed, "diffusion_pytorch_model.safetensors")


def test_vae_crops_get_a_span_of_digital_silence_and_nothing_else_changes():
    from train_vae import insert_silence

    mel = torch.randn(6, 64, 8)
    assert torch.equal(insert_silence(mel, 0.0), mel)
    silenced = insert_silence(mel, 1.0)
    floor = math.log(LOG_FLOOR)
    for before, after in zip(mel, silenced):
        changed = (after != before).any(1)
        span = torch.nonzero(changed).flatten()
        assert 8 <= len(span) <= 32 and torch.equal(span, torch.arange(span[0], span[-1] + 1))
        assert (after[changed] == floor).all()
    assert not (mel == floor).any()  # the batch itself is left alone
    torch.manual_seed(0)
    silenced_crops = (insert_silence(torch.randn(64, 64, 8), 0.25) == floor).any(2).any(1).sum().item()
    assert 4 <= silenced_crops <= 32  # about a quarter of the crops


def test_vae_training_refuses_silence_it_cannot_insert_and_a_decay_outside_the_run(capsys):
    import train_vae

    base = ["--dataset", "-", "--output_dir", "-"]
    for flags, message in [
        (["--silence_probability", "1.5"], "--silence_probability must be in [0, 1], got 1.5"),
        (["--silence_probability", "0.5", "--clip_seconds", "0.08"], "needs crops of at least 0.16 s (16 frames)"),
        (["--lr_scheduler", "warmup_stable_decay", "--lr_decay_fraction", "0"], "must be in (0, 1], got 0.0"),
    ]:
        with pytest.raises(SystemExit):
            train_vae.parse_args(base + flags)
        assert message in capsys.readouterr().err
    assert train_vae.parse_args(base + ["--silence_probability", "0.5", "--clip_seconds", "0.16"]).latent_fold == 2


def test_the_vaes_adversarial_term_is_weighed_by_the_gradient_norms_at_the_decoders_last_layer():
    from train_vae import adaptive_weight

    last_layer = torch.nn.Parameter(torch.ones(3))
    reconstruction_loss = (3 * last_layer).sum()  # gradient 3 per weight
    generator_loss = (last_layer**2).sum() / 2  # gradient 1 per weight
    weight = adaptive_weight(reconstruction_loss, generator_loss, last_layer)
    assert weight.item() == pytest.approx(3.0, rel=1e-3) and not weight.requires_grad
    # an adversarial term whose gradient vanishes is weighed at the clamp, not at infinity
    assert adaptive_weight(reconstruction_loss, 0 * last_layer.sum(), last_layer).item() == pytest.approx(1e4)


@pytest.mark.parametrize(
    "architecture, losses",
    [("vocos", ["--stft_weight", "1", "--adversarial_weight", "0"]), ("hifigan", [])],
)
def test_vocoder_training_resumes_and_the_result_is_a_pipeline_vocoder(tiny_dataset, tmp_path, architecture, losses):
    from mg2_pipeline import MG2Pipeline, VocosVocoder
    from mg2_pipeline.presets import build_pipeline, load_vocoder

    script = os.path.join(ROOT, "training", "train_vocoder.py")
    output_dir = tmp_path / "vocoder"
    common = [
        "--preset",
        "tiny",
        "--architecture",
        architecture,
        *losses,
        "--dataset",
        tiny_dataset,
        "--segment_seconds",
        "0.32",
        "--train_batch_size",
        "2",
        "--checkpointing_steps",
        "2",
        "--shuffle_buffer_size",
        "8",
    ]
    accelerate(script, *common, "--max_train_steps", "4", "--output_dir", str(output_dir))
    # Stopped after step 2 and resumed: the uninterrupted run's weights, bit for bit.
    resumed = resume_from(output_dir / "checkpoint-2", tmp_path / "resumed", script, *common, "--max_train_steps", "4")
    assert json.loads((resumed / "training_summary.json").read_text())["steps"] == 4
    weights = "diffusion_pytorch_model.safetensors" if architecture == "vocos" else "model.safetensors"
    assert_same_weights(output_dir, resumed, weights)
    # Resumed with the discriminators switched (on for the Vocos run, off for the HiFi-GAN's): refused by name.
    switched = "1" if architecture == "vocos" else "0"
    command, env = accelerate_command(
        script,
        *common,
        "--max_train_steps",
        "4",
        "--output_dir",
        str(resumed),
        "--resume_from_checkpoint",
        "latest",
        "--adversarial_weight",
        switched,
    )
    refused = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    assert refused.returncode != 0 and "adversarial" in refused.stdout + refused.stderr

    vocoder = load_vocoder(str(output_dir))
    assert isinstance(vocoder, VocosVocoder) == (architecture == "vocos")
    assert vocoder.config.model_in_dim == 64 and vocoder.config.sampling_rate == 16000
    pipe = build_pipeline("tiny", vocoder=vocoder)
    pipe.save_pretrained(tmp_path / "pipeline")
    reloaded = MG2Pipeline.from_pretrained(tmp_path / "pipeline")
    assert type(reloaded.vocoder) is type(vocoder)
    audio = reloaded("a tune", num_inference_steps=2, audio_length_in_s=1.0, output_type="np").audios
    assert audio.shape == (1, 16000) and np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_guidance_distillation_refuses_a_fresh_model_lora_and_dropped_conditions(capsys):
    import train_mg2

    no_dropout = ["--condition_dropout", "0", "--text_dropout", "0", "--melody_dropout", "0"]
    for argv, message in (
        (["--distill_guidance", "3", *no_dropout], "--distill_guidance trains a saved pipeline"),
        (["--pipeline", "x", "--use_lora", "--distill_guidance", "3", *no_dropout], "no --use_lora"),
        (["--pipeline", "x", "--distill_guidance", "1", *no_dropout], "--distill_guidance must be in (1, 100]"),
        (["--pipeline", "x", "--distill_guidance", "3"], "pass --condition_dropout 0"),
    ):
        with pytest.raises(SystemExit):
            train_mg2.parse_args(["--dataset", "d", "--output_dir", "o", *argv])
        assert message in capsys.readouterr().err
    args = train_mg2.parse_args(
        ["--dataset", "d", "--output_dir", "o", "--pipeline", "x", "--distill_guidance", "3", *no_dropout]
    )
    assert args.distill_guidance == 3


def test_the_decoded_spectral_loss_compares_the_vaes_decodings_and_trains_only_the_prediction(capsys):
    import train_mg2
    from training_utils import spectral_convergence

    from mg2_pipeline.presets import build_vae, vae_config

    torch.manual_seed(0)
    vae = build_vae(vae_config("tiny")).requires_grad_(False).eval()
    vae.register_to_config(scaling_factor=0.5)
    target = torch.randn(2, 4, 8, 32).requires_grad_()  # the tiny VAE's ×2 latent of 16 frames × 64 mels
    prediction = (target.detach() + 0.3 * torch.randn_like(target)).requires_grad_()
    loss = train_mg2.decoded_spectral_convergence(vae, prediction, target)
    # The UNet's latents are scaled: both are decoded as the pipeline decodes them.
    expected = spectral_convergence(vae.decode(prediction / 0.5).sample, vae.decode(target / 0.5).sample)
    torch.testing.assert_close(loss, expected)
    assert loss > 0 and train_mg2.decoded_spectral_convergence(vae, target, target) == 0
    loss.backward()
    assert prediction.grad.abs().sum() > 0 and target.grad is None

    for argv, message in (
        (["--decoded_spectral_weight", "-1"], "--decoded_spectral_weight must be >= 0"),
        (["--decoded_spectral_weight", "1", "--prediction_type", "epsilon"], "needs --prediction_type sample"),
        (
            ["--decoded_spectral_weight", "1", "--decoded_spectral_steps", "decay", "--lr_scheduler", "constant"],
            "needs --lr_scheduler warmup_stable",
        ),
    ):
        with pytest.raises(SystemExit):
            train_mg2.parse_args(["--dataset", "d", "--output_dir", "o", *argv])
        assert message in capsys.readouterr().err
    args = ["--dataset", "d", "--output_dir", "o", "--decoded_spectral_weight", "1", "--prediction_type", "sample"]
    assert train_mg2.parse_args(args).decoded_spectral_weight == 1


def test_preset_config_files_set_defaults_and_flags_win(tmp_path):
    config = tmp_path / "preset.yaml"
    config.write_text("train_vae:\n  max_train_steps: 7\n  kl_weight: 0.5\ntrain_mg2:\n  max_train_steps: 9\n")
    import train_vae

    args = train_vae.parse_args(["--config", str(config), "--kl_weight", "0.25"])
    assert args.max_train_steps == 7 and args.kl_weight == 0.25
    config.write_text("train_vae:\n  no_such_setting: 1\n")
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--config", str(config)])


def wsd_args(*flags: str):
    import train_mg2

    base = ["--pipeline", "preset:tiny", "--dataset", "-", "--output_dir", "-", "--learning_rate", "1e-3"]
    return train_mg2.parse_args([*base, "--lr_warmup_steps", "2", "--lr_scheduler", "warmup_stable_decay", *flags])


def stepped_schedule(args, steps: int, num_processes: int = 1):
    """The learning rate before each of `steps` optimizer steps, and the schedule after them, stepped as a prepared
    scheduler is: once per process per optimizer step."""
    from training_utils import learning_rate_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    schedule = learning_rate_schedule(args, optimizer, num_processes)
    rates = []
    for _ in range(steps):
        rates.append(schedule.get_last_lr()[0])
        for _ in range(num_processes):
            optimizer.step()
            schedule.step()
    return rates + [schedule.get_last_lr()[0]], schedule


@pytest.mark.parametrize("num_processes", [1, 2])
def test_warmup_stable_decay_holds_the_learning_rate_then_decays_it_to_zero_over_the_last_steps(num_processes, capsys):
    args = wsd_args("--max_train_steps", "10", "--lr_decay_fraction", "0.4")
    rates, _ = stepped_schedule(args, 10, num_processes)
    assert rates[:2] == pytest.approx([0, 5e-4])  # warmup
    assert rates[2:7] == pytest.approx([1e-3] * 5)  # stable
    assert rates[6:] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0])  # linear decay over the last 4 steps
    # a short run of the same preset still decays over its own last share
    rates, _ = stepped_schedule(wsd_args("--max_train_steps", "20", "--lr_decay_fraction", "0.4"), 20)
    assert rates[12:] == pytest.approx([1e-3 * (8 - i) / 8 for i in range(9)])
    for fraction in ("0", "1.5"):
        with pytest.raises(SystemExit):
            wsd_args("--max_train_steps", "10", "--lr_decay_fraction", fraction)
        assert f"--lr_decay_fraction must be in (0, 1], got {float(fraction)}" in capsys.readouterr().err


def test_a_resumed_run_must_continue_its_checkpoints_learning_rate_schedule():
    sys.path.insert(0, os.path.join(ROOT, "training"))
    import train_mg2
    from training_utils import check_schedule_continues

    constant = train_mg2.parse_args(
        ["--pipeline", "preset:tiny", "--dataset", "-", "--output_dir", "-", "--max_train_steps", "10"]
    )
    _, checkpoint = stepped_schedule(wsd_args("--max_train_steps", "10", "--lr_decay_fraction", "0.4"), 8)
    _, before_the_decay = stepped_schedule(wsd_args("--max_train_steps", "10", "--lr_decay_fraction", "0.4"), 5)
    cases = [
        (wsd_args("--max_train_steps", "10", "--lr_decay_fraction", "0.4"), checkpoint, True),  # the same run
        (wsd_args("--max_train_steps", "20", "--lr_decay_fraction", "0.4"), checkpoint, False),  # the decay moved
        (constant, checkpoint, False),  # another schedule
        (wsd_args("--max_train_steps", "20", "--lr_decay_fraction", "0.4"), before_the_decay, True),  # train further
    ]
    for args, saved, continues in cases:
        _, resumed = stepped_schedule(args, 0)
        resumed.load_state_dict(saved.state_dict())
        if continues:
            check_schedule_continues(resumed, "checkpoint-N")
        else:
            with pytest.raises(SystemExit, match="checkpoint-N trained at learning rate"):
                check_schedule_continues(resumed, "checkpoint-N")


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_every_preset_file_is_valid_for_every_script(preset):
    import train_clmp
    import train_mg2
    import train_vae
    import train_vocoder

    config = os.path.join(ROOT, "training", "configs", f"{preset}.yaml")
    for script in (train_clmp, train_vae, train_vocoder, train_mg2):
        args = script.parse_args(["--config", config])
        assert args.config == config
    assert train_mg2.parse_args(["--config", config]).pipeline == f"preset:{preset}"


def test_accelerate_config_files_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        name: load_config_from_file(
            os.path.join(ROOT, "training", "configs", "accelerate", f"{name}.yaml")
        ).distributed_type
        for name in ("cpu", "multi_gpu", "fsdp")
    }
    assert {name: kind.value for name, kind in kinds.items()} == {
        "cpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "fsdp": "FSDP",
    }


@pytest.mark.parametrize("cuda", ["", "yes"])
def test_make_demo_trains_on_the_gpu_when_there_is_one_else_on_every_core(cuda):
    dry_run = subprocess.run(
        ["make", "-n", "-B", f"CUDA={cuda}", "checkpoints/mg2-small/model_index.json"],  # -B: even after `make demo`
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert dry_run.returncode == 0, dry_run.stderr
    launches = [line for line in dry_run.stdout.splitlines() if "accelerate launch" in line]
    (train_mg2,) = [line for line in launches if "train_mg2.py" in line]
    assert launches and not any("--cpu" in line or "ACCELERATE_USE_CPU" in line for line in launches)
    # accelerate would otherwise set OMP_NUM_THREADS=1: one compute thread on a CPU.
    cores = len(os.sched_getaffinity(0))
    assert all(f"--num_cpu_threads_per_process {cores}" in line for line in launches)
    if cuda:
        assert "--mixed_precision bf16" in train_mg2 and "--latent_cache_workers 1 " in train_mg2
    else:
        assert (
            "--mixed_precision" not in train_mg2
            and f"--latent_cache_workers {len(os.sched_getaffinity(0))} " in train_mg2
        )
