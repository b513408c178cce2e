"""`tests/hub_server.LocalHub` driven by the real, unmodified `huggingface_hub` client.

`huggingface_hub` reads `HF_ENDPOINT` when it is imported and this session has imported it already (with
`HF_HUB_OFFLINE=1`, see conftest.py), so every client-side step runs in a fresh interpreter (`run_client`).
"""

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest
from hub_server import LocalHub, run_client

from diffusers_dreambooth.testing_utils import save_dummy_pipeline

LFS_THRESHOLD = 4096  # small enough to send `weights/model.dat` (64 KiB, no LFS suffix) through LFS


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub_storage", lfs_threshold=LFS_THRESHOLD) as hub:
        yield hub


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A small text file, a nested one and a 64 KiB binary that goes through LFS."""
    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 8}\n')
    (folder / "weights" / "notes.txt").write_text("nested file\n")
    (folder / "weights" / "model.dat").write_bytes(os.urandom(64 * 1024))
    return folder


def folder_hashes(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): sha256_of(path) for path in folder.rglob("*") if path.is_file()}


def test_server_binds_loopback_and_stops(tmp_path):
    with LocalHub(tmp_path / "hub_storage") as hub:
        assert hub.endpoint.startswith("http://127.0.0.1:")
        port = int(hub.endpoint.rsplit(":", 1)[1])
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        threads = [thread for thread in threading.enumerate() if thread.name == "LocalHub"]
    assert threads and not any(thread.is_alive() for thread in threads)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_whoami_and_create_repo(hub, tmp_path):
    result = run_client(
        hub,
        tmp_path / "home",
        """
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        api = HfApi()
        public = api.create_repo("user/public")
        again = api.create_repo("user/public", exist_ok=True)
        try:
            api.create_repo("user/public")
        except HfHubHTTPError as error:
            conflict = error.response.status_code
        private = api.create_repo("user/secret", private=True)
        result = {
            "whoami": api.whoami()["name"],
            "urls": [public, again, private],
            "repo_ids": [public.repo_id, private.repo_id],
            "conflict": conflict,
            "private": [api.model_info(repo).private for repo in ("user/public", "user/secret")],
            "files": api.list_repo_files("user/public"),
        }
        """,
    )
    assert result["whoami"] == "user"
    assert result["urls"] == [f"{hub.endpoint}/user/public"] * 2 + [f"{hub.endpoint}/user/secret"]
    assert result["repo_ids"] == ["user/public", "user/secret"]
    assert result["conflict"] == 409
    assert result["private"] == [False, True]
    assert result["files"] == [".gitattributes"]  # the Hub's initial commit
    assert sum(hub.commits.values()) == 0


def test_upload_folder_then_download_in_a_fresh_cache(hub, tmp_path, model_folder):
    uploaded = run_client(
        hub,
        tmp_path / "uploader",
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("user/subject")
        commit = api.upload_folder(repo_id="user/subject", folder_path={str(model_folder)!r})
        info = api.model_info("user/subject", files_metadata=True)
        result = {{
            "commit": commit.oid,
            "sha": info.sha,
            "files": api.list_repo_files("user/subject"),
            "siblings": {{s.rfilename: [s.size, s.lfs.sha256 if s.lfs else None] for s in info.siblings}},
            "tree": [entry.path for entry in api.list_repo_tree("user/subject", path_in_repo="weights")],
        }}
        """,
    )
    local = folder_hashes(model_folder)
    sizes = {name: (model_folder / name).stat().st_size for name in local}
    assert uploaded["sha"] == uploaded["commit"] and len(uploaded["commit"]) == 40
    assert uploaded["files"] == sorted([".gitattributes", *local])
    assert uploaded["siblings"]["weights/model.dat"] == [sizes["weights/model.dat"], local["weights/model.dat"]]
    assert uploaded["siblings"]["weights/notes.txt"] == [sizes["weights/notes.txt"], None]
    assert uploaded["tree"] == ["weights/model.dat", "weights/notes.txt"]
    assert (hub.lfs_uploads, hub.regular_uploads, hub.commits["user/subject"]) == (1, 2, 1)
    assert hub.uploaded_bytes == sum(sizes.values())

    downloaded = run_client(
        hub,
        tmp_path / "downloader",
        f"""
        import hashlib, os
        from huggingface_hub import HfFileSystem, hf_hub_download, snapshot_download
        from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

        def sha256(path):
            with open(path, "rb") as file:
                return hashlib.sha256(file.read()).hexdigest()

        single = {{name: sha256(hf_hub_download("user/subject", name)) for name in {sorted(local)!r}}}
        pinned = sha256(hf_hub_download("user/subject", "weights/model.dat", revision={uploaded["commit"]!r}))
        snapshot = snapshot_download("user/subject")
        errors = []
        for kwargs in ({{"filename": "missing.txt"}}, {{"filename": "config.json", "revision": "nope"}}):
            try:
                hf_hub_download("user/subject", **kwargs)
            except (EntryNotFoundError, RevisionNotFoundError) as error:
                errors.append(type(error).__name__)
        with HfFileSystem().open("user/subject/weights/model.dat", block_size=1024) as file:
            file.seek(40000)
            ranged = file.read(16).hex()
        result = {{
            "single": single,
            "pinned": pinned,
            "snapshot": {{
                os.path.relpath(path, snapshot).replace(os.sep, "/"): sha256(path)
                for path in (os.path.join(root, name) for root, _, names in os.walk(snapshot) for name in names)
            }},
            "snapshot_dir": os.path.basename(snapshot),
            "errors": errors,
            "ranged": ranged,
        }}
        """,
        disable_xet=False,
    )
    assert downloaded["single"] == local
    assert downloaded["pinned"] == local["weights/model.dat"]
    assert {name: digest for name, digest in downloaded["snapshot"].items() if name != ".gitattributes"} == local
    assert downloaded["snapshot_dir"] == uploaded["commit"]
    assert downloaded["errors"] == ["RemoteEntryNotFoundError", "RevisionNotFoundError"]
    assert downloaded["ranged"] == (model_folder / "weights" / "model.dat").read_bytes()[40000:40016].hex()
    assert not [request for request in hub.requests if "xet" in request.lower()]


def test_second_upload_sends_only_what_changed_and_deletes_work(hub, tmp_path, model_folder):
    first_upload = sum(path.stat().st_size for path in model_folder.rglob("*") if path.is_file())
    result = run_client(
        hub,
        tmp_path / "home",
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("user/subject")
        first = api.upload_folder(repo_id="user/subject", folder_path={str(model_folder)!r}).oid
        second = api.upload_folder(repo_id="user/subject", folder_path={str(model_folder)!r}).oid
        with open({str(model_folder / "config.json")!r}, "w") as file:
            file.write('{{"hidden_size": 16}}\\n')
        third = api.upload_folder(repo_id="user/subject", folder_path={str(model_folder)!r}).oid
        api.delete_file("config.json", repo_id="user/subject")
        api.delete_folder("weights", repo_id="user/subject")
        result = [first, second, third, api.list_repo_files("user/subject")]
        """,
    )
    first, second, third, files = result
    assert second == first  # nothing changed: no commit at all
    assert third != first
    assert files == [".gitattributes"]
    # The first upload sends everything, the second nothing, the third config.json only; deletions send no content.
    assert (hub.lfs_uploads, hub.regular_uploads, hub.commits["user/subject"]) == (1, 3, 4)
    assert hub.uploaded_bytes == first_upload + (model_folder / "config.json").stat().st_size


def test_private_repo_needs_the_token(hub, tmp_path, model_folder):
    run_client(
        hub,
        tmp_path / "owner",
        f"""
        from huggingface_hub import HfApi
        HfApi().create_repo("user/secret", private=True)
        HfApi().upload_folder(repo_id="user/secret", folder_path={str(model_folder)!r})
        """,
    )
    code = """
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
        result = []
        for call in (
            lambda: HfApi().model_info("user/secret").private,
            lambda: HfApi().list_repo_files("user/secret"),
            lambda: open(hf_hub_download("user/secret", "config.json")).read(),
            lambda: bool(snapshot_download("user/secret")),
            lambda: HfApi().create_repo("user/other"),
        ):
            try:
                result.append(call())
            except HfHubHTTPError as error:
                result.append(f"{type(error).__name__} {error.response.status_code}")
        """
    anonymous = run_client(hub, tmp_path / "anonymous", code, token=False)
    assert anonymous == ["RepositoryNotFoundError 404"] * 4 + ["HfHubHTTPError 401"]
    files = sorted([".gitattributes", *folder_hashes(model_folder)])
    config = (model_folder / "config.json").read_text()
    assert run_client(hub, tmp_path / "owner", code) == [True, files, config, True, f"{hub.endpoint}/user/other"]


def test_readme_front_matter_is_card_data(hub, tmp_path):
    readme = (
        "---\nlicense: openrail\nlibrary_name: diffusers\nbase_model: user/base\ninstance_prompt: a photo of sks dog\n"
        "inference: true\ntags:\n- text-to-image\n- dreambooth\n---\n\n# DreamBooth - user/card\n"
    )
    result = run_client(
        hub,
        tmp_path / "home",
        f"""
        from huggingface_hub import HfApi, ModelCard
        api = HfApi()
        api.create_repo("user/card")
        api.upload_file(path_or_fileobj={readme.encode()!r}, path_in_repo="README.md", repo_id="user/card")
        info = api.model_info("user/card")
        result = {{
            "card_data": info.card_data.to_dict(),
            "tags": info.tags,
            "library_name": info.library_name,
            "card": ModelCard.load("user/card").data.to_dict(),
        }}
        """,
    )
    expected = {
        "license": "openrail",
        "library_name": "diffusers",
        "base_model": "user/base",
        "instance_prompt": "a photo of sks dog",
        "inference": True,
        "tags": ["text-to-image", "dreambooth"],
    }
    assert result["card_data"] == result["card"] == expected
    assert result["tags"] == ["text-to-image", "dreambooth", "diffusers"]
    assert result["library_name"] == "diffusers"


def test_tiny_pipeline_round_trips_through_the_hub(hub, tmp_path):
    pipeline_dir = save_dummy_pipeline("sd", tmp_path / "tiny-sd")
    run_client(
        hub,
        tmp_path / "uploader",
        f"""
        from huggingface_hub import HfApi
        HfApi().create_repo("user/tiny-sd")
        HfApi().upload_folder(repo_id="user/tiny-sd", folder_path={pipeline_dir!r})
        """,
    )
    files = [path for path in Path(pipeline_dir).rglob("*") if path.is_file()]
    large = [path for path in files if path.suffix == ".safetensors" or path.stat().st_size >= LFS_THRESHOLD]
    assert hub.lfs_uploads == len({sha256_of(path) for path in large})  # LFS objects are stored once per content
    assert hub.regular_uploads == len(files) - len(large)
    result = run_client(
        hub,
        tmp_path / "empty_home",
        f"""
        import numpy as np
        import torch
        from diffusers import DiffusionPipeline

        def generate(source):
            pipe = DiffusionPipeline.from_pretrained(source)
            pipe.set_progress_bar_config(disable=True)
            generator = torch.Generator().manual_seed(0)
            return pipe("a photo of sks dog", num_inference_steps=2, generator=generator, output_type="np").images

        from_hub, from_folder = generate("user/tiny-sd"), generate({pipeline_dir!r})
        result = {{"shape": list(from_hub.shape), "equal": bool(np.array_equal(from_hub, from_folder))}}
        """,
        disable_xet=False,
    )
    assert result["equal"]
    assert result["shape"][0] == 1 and result["shape"][-1] == 3
    assert (tmp_path / "empty_home" / "hub" / "models--user--tiny-sd" / "snapshots").is_dir()
    assert any(request.startswith("GET /user/tiny-sd/resolve/") for request in hub.requests)
