"""Sharing checkpoints on the Hub: the real huggingface_hub client against the test Hub on loopback (hub_server.py).

Every client runs in a subprocess, as a user's would, with `HF_ENDPOINT` at the test Hub and a fresh `HF_HOME`.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import BLOCK_MG2_PIPELINE, ROOT, accelerate, run
from hub_server import MiniHub
from test_train_mg2 import TRAIN, tiny_args

TOKEN = "hf_test_write_token"
# Repos on the loopback test Hub (hub_env points HF_ENDPOINT there; nothing reaches huggingface.co).
REPO = "tester/mg2-tiny"
CLMP_REPO = "tester/clmp-tiny"
SAVED_REPO = "tester/saved"

# Loads each (name, route, model, revision) and saves what it generates for one seed into an .npz file.
GENERATE = """
import json, sys
import numpy as np, torch
from diffusers import DiffusionPipeline
outputs = {}
for name, route, model, revision in json.loads(sys.argv[1]):
    kwargs = {"revision": revision} if revision else {}
    if route == "diffusers":
        pipe = DiffusionPipeline.from_pretrained(model, trust_remote_code=True, **kwargs)
    elif route == "diffusers-cache":
        from huggingface_hub import snapshot_download
        pipe = DiffusionPipeline.from_pretrained(snapshot_download(model, **kwargs), trust_remote_code=True)
    else:
        from mg2_pipeline import MG2Pipeline
        pipe = MG2Pipeline.from_pretrained(model, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    outputs[name] = pipe("a jig on fiddle", num_inference_steps=2, audio_length_in_s=1.28,
                         generator=torch.Generator().manual_seed(0)).audios
np.savez(sys.argv[2], **outputs)
"""


def hub_env(hub: MiniHub | None, home, token: str | None = TOKEN, offline: bool = False) -> dict:
    env = {
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": token or "",
    }
    if hub is not None:
        assert hub.url.startswith("http://127.0.0.1:")
        env["HF_ENDPOINT"] = hub.url
    return env


def generate(tmp_path, jobs: list, env: dict, without_package: bool = False) -> dict:
    """Run GENERATE in a subprocess; with `without_package`, `import mg2_pipeline` fails there (remote code only)."""
    output = tmp_path / f"outputs-{len(list(tmp_path.glob('outputs-*')))}.npz"
    script = (BLOCK_MG2_PIPELINE if without_package else "") + GENERATE
    run([sys.executable, "-c", script, json.dumps(jobs), str(output)], **env)
    return dict(np.load(output))


def mg2_cli(*arguments: str, **env):
    return run([sys.executable, "-m", "mg2_pipeline", *arguments], **env)


@pytest.fixture
def saved_tiny_pipeline(tmp_path):
    from mg2_pipeline.presets import build_pipeline

    folder = tmp_path / "mg2-tiny"
    build_pipeline("tiny").save_pretrained(folder)
    return folder


def test_push_pull_and_load_by_repo_id_with_revisions_and_offline(tiny_dataset, tiny_generator_parts, tmp_path):
    home, output_dir = tmp_path / "hf_home", tmp_path / "mg2"
    with MiniHub(token=TOKEN) as hub:
        # 1. Train a tiny pipeline and push it at the end, as diffusers' examples do.
        env = hub_env(hub, home)
        accelerate(
            TRAIN,
            *tiny_args(
                tiny_dataset,
                tiny_generator_parts,
                output_dir,
                "--max_train_steps",
                "4",
                "--checkpointing_steps",
                "2",
                "--push_to_hub",
                "--hub_model_id",
                REPO,
                "--hub_token",
                TOKEN,
            ),
            **{**env, "HF_TOKEN": ""},
        )
        repo = hub.repos[REPO]
        first = repo.branches["main"]
        files = set(repo.commits[first].files)
        assert {
            "model_index.json",
            "pipeline_mg2.py",
            "README.md",
            "retriever/index.bin",
            "retriever/melodies.parquet",
            "retriever/retrieval.py",
            "unet/diffusion_pytorch_model.safetensors",
        } <= files
        assert os.path.isdir(output_dir / "checkpoint-4") and os.path.isdir(output_dir / "logs")
        assert not [path for path in files if path.startswith(("checkpoint-", "logs/"))]
        card = repo.commits[first].files["README.md"].decode()
        assert card.startswith("---\n") and "library_name: diffusers" in card and "## Training data" in card
        assert "trained 4 steps on 8 clips of 1.28 s" in card and f'from_pretrained("{REPO}"' in card

        # 2. Loaded by repo id through the HF cache, it generates what the trained folder generates.
        original = generate(tmp_path, [["local", "mg2", str(output_dir), None], ["hub", "mg2", REPO, None]], env)
        np.testing.assert_array_equal(original["hub"], original["local"])

        # 3. A second push is a new revision; the first stays loadable by its commit id, by both routes (the
        #    diffusers one runs only the code shipped in the repo).
        pushed = run(
            [
                sys.executable,
                "-c",
                f"""
import torch
from mg2_pipeline import MG2Pipeline
pipe = MG2Pipeline.from_pretrained({str(output_dir)!r})
with torch.no_grad():
    pipe.unet.conv_out.bias += 0.5
print(pipe.push_to_hub({REPO!r}, commit_message="Shift the output").oid)
""",
            ],
            **env,
        ).stdout.split()[-1]
        assert pushed == repo.branches["main"] != first and len(repo.commits) == 3
        second = generate(tmp_path, [["main", "mg2", REPO, None], ["first", "mg2", REPO, first]], env)
        assert not np.array_equal(second["main"], original["local"])
        np.testing.assert_array_equal(second["first"], original["local"])
        remote = generate(
            tmp_path,
            [["main", "diffusers", REPO, None], ["first", "diffusers", REPO, first]],
            env,
            without_package=True,
        )
        np.testing.assert_array_equal(remote["main"], second["main"])
        np.testing.assert_array_equal(remote["first"], original["local"])
        pulled = mg2_cli("pull", REPO, "--revision", first, **env).stdout.strip().splitlines()[-1]
        assert pulled.endswith(first) and os.path.isfile(os.path.join(pulled, "model_index.json"))

    # 4. The server is gone: everything loads from the cache offline. (diffusers 0.42 itself cannot load a repo id's
    #    custom pipeline offline: its get_cached_module_file always asks the Hub for the commit; the cached
    #    snapshot folder, which snapshot_download returns offline, loads.)
    offline = hub_env(None, home, offline=True)
    cached = generate(tmp_path, [["main", "mg2", REPO, None], ["first", "mg2", REPO, first]], offline)
    np.testing.assert_array_equal(cached["main"], second["main"])
    np.testing.assert_array_equal(cached["first"], original["local"])
    remote = generate(
        tmp_path,
        [["main", "diffusers-cache", REPO, None], ["first", "diffusers-cache", REPO, first]],
        offline,
        without_package=True,
    )
    np.testing.assert_array_equal(remote["main"], second["main"])
    np.testing.assert_array_equal(remote["first"], original["local"])


def test_cli_push_to_a_private_branch_and_pull_it(saved_tiny_pipeline, tmp_path):
    with MiniHub(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path / "hf_home")
        printed = mg2_cli(
            "push", str(saved_tiny_pipeline), "tester/private-tiny", "--private", "--revision", "dev", **env
        ).stdout
        repo = hub.repos["tester/private-tiny"]
        assert repo.private and repo.branches["dev"] in printed
        assert set(repo.commits[repo.branches["main"]].files) == {".gitattributes"}
        assert "model_index.json" in repo.commits[repo.branches["dev"]].files
        folder = mg2_cli("pull", "tester/private-tiny", "--revision", "dev", **env).stdout.strip().splitlines()[-1]
        assert json.loads(open(os.path.join(folder, "model_index.json")).read())["_class_name"] == [
            "pipeline_mg2",
            "MG2Pipeline",
        ]
        anonymous = hub_env(hub, tmp_path / "anonymous", token=None)
        command = [sys.executable, "-m", "mg2_pipeline", "pull", "tester/private-tiny", "--revision", "dev"]
        refused = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, **anonymous},
        )
        assert refused.returncode != 0 and "could not pull tester/private-tiny" in refused.stderr
        assert "Repository Not Found" in refused.stderr


def test_pushing_without_a_token_fails_clearly(saved_tiny_pipeline, tmp_path):
    with MiniHub(token=TOKEN) as hub:
        env = {**os.environ, **hub_env(hub, tmp_path / "hf_home", token=None)}
        result = subprocess.run(
            [sys.executable, "-m", "mg2_pipeline", "push", str(saved_tiny_pipeline), "tester/x"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        assert result.returncode != 0
        assert "a write token is needed" in result.stderr and "HF_TOKEN" in result.stderr
        assert "tester/x" not in hub.repos


def test_clmp_push_to_hub_loads_as_remote_code(tmp_path):
    expected = tmp_path / "expected.npz"
    with MiniHub(token=TOKEN) as hub:
        env = hub_env(hub, tmp_path / "hf_home")
        run(
            [
                sys.executable,
                "-c",
                f"""
import numpy as np, torch
from mg2_pipeline import CLMPModel, Melody
from mg2_pipeline.presets import clmp_config
torch.manual_seed(0)
model = CLMPModel(clmp_config("tiny")).eval()
model.push_to_hub({CLMP_REPO!r})
ids = torch.tensor(Melody.from_string("G4:0.5 A4:0.5 B4:1").encode(max_length=16)["input_ids"])[None]
np.savez({str(expected)!r}, ids=ids.numpy(), embeds=model.get_melody_features(ids, torch.ones_like(ids)).detach().numpy())
""",
            ],
            **env,
        )
        repo = hub.repos[CLMP_REPO]
        assert {"config.json", "model.safetensors", "modeling_clmp.py", "configuration_clmp.py", "melody.py"} <= set(
            repo.commits[repo.branches["main"]].files
        )
        run(
            [
                sys.executable,
                "-c",
                BLOCK_MG2_PIPELINE
                + f"""
import numpy as np, torch
from transformers import AutoModel
model = AutoModel.from_pretrained({CLMP_REPO!r}, trust_remote_code=True).eval()
assert type(model).__name__ == "CLMPModel" and not type(model).__module__.startswith("mg2_pipeline")
expected = np.load({str(expected)!r})
ids = torch.from_numpy(expected["ids"])
np.testing.assert_allclose(model.get_melody_features(ids, torch.ones_like(ids)).detach().numpy(), expected["embeds"], atol=1e-6)
""",
            ],
            **env,
        )


def test_save_pretrained_with_push_to_hub_uploads_the_folder_and_a_card_naming_the_repo(tmp_path):
    with MiniHub(token=TOKEN) as hub:
        run(
            [
                sys.executable,
                "-c",
                f"""
from mg2_pipeline.presets import build_pipeline
build_pipeline("tiny").save_pretrained({str(tmp_path / "saved")!r}, push_to_hub=True, repo_id={SAVED_REPO!r}, private=True)
""",
            ],
            **hub_env(hub, tmp_path / "hf_home"),
        )
        repo = hub.repos[SAVED_REPO]
        files = repo.commits[repo.branches["main"]].files
        assert repo.private and files["README.md"] == (tmp_path / "saved" / "README.md").read_bytes()
        assert f'from_pretrained("{SAVED_REPO}", trust_remote_code=True)' in files["README.md"].decode()
        assert files["retriever/index.bin"] == (tmp_path / "saved" / "retriever" / "index.bin").read_bytes()


def test_the_test_hub_answers_huggingface_hub_as_the_hub_does(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest makes this process offline
    with MiniHub(token=TOKEN) as hub:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo("tester/files")
        first = api.upload_file(path_or_fileobj=b"{}", path_in_repo="a/config.json", repo_id="tester/files").oid
        api.upload_file(path_or_fileobj=b"x", path_in_repo="b.txt", repo_id="tester/files")
        assert sorted(f.path for f in api.list_repo_tree("tester/files", recursive=True)) == [
            ".gitattributes",
            "a",
            "a/config.json",
            "b.txt",
        ]
        assert sorted(f.path for f in api.list_repo_tree("tester/files")) == [".gitattributes", "a", "b.txt"]
        assert [e.path for e in api.get_paths_info("tester/files", ["a", "b.txt", "nothing"], revision=first)] == ["a"]
        assert api.model_info("tester/files", revision=first).sha == first != api.model_info("tester/files").sha
        assert [branch.name for branch in api.list_repo_refs("tester/files").branches] == ["main"]
        path = hf_hub_download("tester/files", "a/config.json", revision=first, cache_dir=tmp_path, endpoint=hub.url)
        assert open(path).read() == "{}" and first in path
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("tester/nothing")
        with pytest.raises(RevisionNotFoundError):
            api.model_info("tester/files", revision="no-such-branch")
        with pytest.raises(RemoteEntryNotFoundError):
            hf_hub_download("tester/files", "nothing.txt", cache_dir=tmp_path, endpoint=hub.url)
