"""The web app's functions (#18): the option list generated from the config, form values to options and back, path
checks, photo review with the trainer's reasons, the one-run-at-a-time rule, Stop and Resume, and the token."""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusers_dreambooth import DreamBoothConfig
from diffusers_dreambooth.app import runs as app_runs
from diffusers_dreambooth.app.__main__ import parse_args
from diffusers_dreambooth.app.options import (
    MAIN_FORM_OPTIONS,
    changed_options,
    form_values,
    from_form_value,
    option_fields,
)
from diffusers_dreambooth.app.runs import (
    PATH_OPTIONS,
    AppInputError,
    Runs,
    ServerBusy,
    check_path_options,
    inside,
    review_photos,
    safe_name,
)
from diffusers_dreambooth.checkpoints import list_checkpoints
from diffusers_dreambooth.config import SECRET_FIELDS
from diffusers_dreambooth.toy import (
    BASE_MODEL_DIR,
    CHECKER_DIR,
    SUBJECT_PHOTOS_DIR,
    sample_scene,
    subject_scene,
    toy_dreambooth_config,
)

# The option list


def test_every_option_but_the_main_forms_and_the_token_is_in_the_advanced_section():
    names = [field.name for field in option_fields()]
    expected = [
        f.name for f in dataclasses.fields(DreamBoothConfig) if f.name not in MAIN_FORM_OPTIONS + SECRET_FIELDS
    ]
    assert names == expected and "hub_token" not in names
    fields = {field.name: field for field in option_fields()}
    assert fields["max_train_steps"].kind == "integer" and fields["max_train_steps"].optional
    assert fields["mixed_precision"].choices == ("no", "fp16", "bf16")
    assert fields["sample_prompts"].kind == "list" and fields["concepts_list"].kind == "json"
    assert (
        fields["learning_rate"].help
        == dataclasses.fields(DreamBoothConfig)[
            [f.name for f in dataclasses.fields(DreamBoothConfig)].index("learning_rate")
        ].metadata["help"]
    )


def test_a_new_option_appears_by_itself():
    @dataclasses.dataclass
    class NewerConfig(DreamBoothConfig):
        sharpness: float = dataclasses.field(default=0.5, metadata={"help": "How sharp the subject comes out."})

    field = option_fields(NewerConfig)[-1]
    assert (field.name, field.kind, field.default, field.help) == (
        "sharpness",
        "number",
        0.5,
        "How sharp the subject comes out.",
    )


def test_form_values_and_options_round_trip():
    config = toy_dreambooth_config("out", adapter="lora", mixed_precision="bf16", max_train_steps=30)
    fields = option_fields()
    changed = changed_options(fields, form_values(fields, config))
    assert changed["sample_prompts"] == config.sample_prompts  # prompts keep their spaces: one a line
    assert changed["mixed_precision"] == "bf16" and changed["max_train_steps"] == 30
    assert "rank" in changed and "num_train_epochs" not in changed  # only what differs from the defaults
    rebuilt = DreamBoothConfig(**{**{name: getattr(config, name) for name in MAIN_FORM_OPTIONS}, **changed})
    assert rebuilt.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("max_train_steps", "1.5", "`max_train_steps`: 1.5 is not a whole number."),
        ("learning_rate", "fast", "`learning_rate`:"),
        ("mixed_precision", "fp8", "`mixed_precision`: 'fp8' is not one of no, fp16, bf16."),
        ("train_batch_size", None, "`train_batch_size`: it needs a value."),
    ],
)
def test_a_value_that_cannot_be_its_option_names_it(name, value, message):
    field = next(field for field in option_fields() if field.name == name)
    with pytest.raises(ValueError) as raised:
        from_form_value(field, value)
    assert str(raised.value).startswith(message)


def test_empty_optional_boxes_are_none():
    fields = {field.name: field for field in option_fields()}
    assert from_form_value(fields["max_train_steps"], "") is None
    assert from_form_value(fields["validation_prompt"], " ") is None
    assert from_form_value(fields["concepts_list"], '[{"instance_prompt": "a"}]') == [{"instance_prompt": "a"}]


# Paths


@pytest.mark.parametrize("name", ["../x", "..", "/etc", "a/b", "a\\b", ".hidden", "", "x" * 200, "a\0b"])
def test_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(AppInputError, match="is not a plain name"):
        safe_name(name, "Run")


def test_paths_stay_inside_the_work_folder(tmp_path):
    work = tmp_path / "work"
    (work / "models" / "base").mkdir(parents=True)
    (work / "link").symlink_to(tmp_path)
    assert inside(work, "models/base", "x") == (work / "models" / "base").resolve()
    for path in ("../outside", str(tmp_path), "link/anything", "models/../../outside"):
        with pytest.raises(AppInputError, match="is outside the work folder"):
            inside(work, path, "x")


def test_path_options_are_checked_and_hub_ids_pass(tmp_path):
    work = tmp_path / "work"
    (work / "models" / "base").mkdir(parents=True)
    checked = check_path_options(
        {
            "pretrained_model_name_or_path": "models/base",
            "pretrained_vae_model_name_or_path": "madebyollin/sdxl-vae-fp16-fix",
            "evaluation_dino_model": str(CHECKER_DIR),  # the bundled checker is read where it is
        },
        work,
    )
    assert checked["pretrained_model_name_or_path"] == str((work / "models" / "base").resolve())
    assert checked["pretrained_vae_model_name_or_path"] == "madebyollin/sdxl-vae-fp16-fix"
    for options, option in [
        ({"pretrained_model_name_or_path": "/etc"}, "`pretrained_model_name_or_path`"),
        ({"cache_dir": str(CHECKER_DIR)}, "`cache_dir`"),  # written: only in the work folder
        ({"validation_images": ["ok.png", "../../x.png"]}, "`validation_images`"),
        ({"dataset_name": "../data"}, "`dataset_name`"),
        ({"logging_dir": "../logs"}, "`logging_dir`"),
        ({"resume_from_checkpoint": "/tmp/checkpoint-5"}, "`resume_from_checkpoint`"),
    ]:
        with pytest.raises(AppInputError, match=option):
            check_path_options(options, work)


def test_every_option_naming_a_path_is_checked():
    """A new option whose name says it holds a path must join `PATH_OPTIONS` (or be one the app sets)."""
    names = [field.name for field in dataclasses.fields(DreamBoothConfig)]
    assert set(PATH_OPTIONS) <= set(names)
    path_like = [n for n in names if n.endswith(("_dir", "_path", "_name_or_path", "_file")) or "model" == n[-5:]]
    exempt = {"instance_data_dir", "class_data_dir", "output_dir", "logging_dir", "pretrained_model_name_or_path"}
    assert [n for n in path_like if n not in PATH_OPTIONS and n not in exempt] == []


# Photos


def test_photos_are_reviewed_with_the_trainers_reasons(tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    scan = np.random.default_rng(0).integers(0, 65535, (40, 48), dtype=np.uint16)
    Image.fromarray(scan).save(photos / "scan.png")  # 16-bit grayscale, as microscopes write
    Image.new("RGB", (40, 40), "red").save(photos / "red.jpg")
    (photos / "notes.txt").write_text("not a photo")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (photos / "big.png").write_bytes((photos / "scan.png").read_bytes())
    names = ["scan.png", "red.jpg", "notes.txt", "broken.png", "big.png", "../../escape.png"]
    paths = [photos / name for name in names[:5]] + [photos / "red.jpg"]
    monkeypatch.setattr(app_runs, "MAX_UPLOAD_BYTES", (photos / "red.jpg").stat().st_size + 10)
    review = review_photos(paths, names)
    assert [path.name for path in review.accepted] == ["red.jpg"]
    reasons = dict(review.rejected)
    assert "the trainer reads .jpg" in reasons["notes.txt"]
    assert "`broken.png` is not a readable image" in reasons["broken.png"]
    assert "larger than" in reasons["big.png"] and "larger than" in reasons["scan.png"]
    assert "is not a plain name" in reasons["../../escape.png"]
    monkeypatch.undo()
    assert [path.name for path in review_photos([photos / "scan.png"]).accepted] == ["scan.png"]


def test_more_than_twenty_photos_are_left_out_by_name(tmp_path):
    paths = []
    for index in range(22):
        paths.append(tmp_path / f"photo_{index:02}.png")
        Image.new("RGB", (8, 8), (index, 0, 0)).save(paths[-1])
    review = review_photos(paths)
    assert len(review.accepted) == 20 and [name for name, _ in review.rejected] == ["photo_20.png", "photo_21.png"]


# Runs


def toy_run_options(steps: int) -> dict:
    options = toy_dreambooth_config(
        "unused",
        max_train_steps=steps,
        num_class_images=4,
        checkpointing_steps=5,
        evaluate=False,
        sample_prompts=None,
        num_validation_images=0,
    ).to_dict()
    return {key: value for key, value in options.items() if value is not None}


def wait_for_step(runs: Runs, name: str, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while runs.status(name).step < step:
        assert time.time() < deadline and runs.running == name, runs.status(name).log_tail
        time.sleep(0.2)


@pytest.mark.slow
def test_one_run_at_a_time_stop_saves_a_checkpoint_and_resume_finishes(tmp_path):
    runs = Runs(tmp_path / "work")
    options = toy_run_options(steps=400)
    options["instance_data_dir"] = str(SUBJECT_PHOTOS_DIR)
    runs.start("first", options, token="hf_secrettokenXXXXXXXXXXXXXXXX")
    with pytest.raises(ServerBusy, match="The server is busy training `first`"):
        runs.start("second", options)
    wait_for_step(runs, "first", 7)
    assert runs.stop() == "first"
    assert runs.wait(120) != 0  # ended as Ctrl-C ends it
    status = runs.status("first")
    assert status.state == "stopped" and runs.running is None
    saved = list_checkpoints(runs.output_dir("first"))[-1]
    assert int(saved.name.split("-")[1]) >= 7

    runs.start("first", runs.options("first") | {"max_train_steps": 12}, resume=True)
    assert runs.wait(240) == 0
    status = runs.status("first")
    assert status.state == "finished" and status.step == 12 and status.total == 12
    assert [record["step"] for record in status.steps] == list(range(1, 13))
    written = json.loads((runs.folder("first") / "options.json").read_text())
    assert "hub_token" not in written and written["resume_from_checkpoint"] == "latest"
    for path in runs.folder("first").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".log", ".jsonl", ".md"):
            assert "hf_secrettoken" not in path.read_text(errors="replace"), path


def test_runs_refuse_names_outside_and_options_the_trainer_refuses(tmp_path):
    runs = Runs(tmp_path / "work")
    with pytest.raises(AppInputError, match="is not a plain name"):
        runs.start("../escape", toy_run_options(2))
    with pytest.raises(ValueError, match="max_train_steps"):
        runs.start("bad", {**toy_run_options(2), "max_train_steps": 0})
    assert runs.running is None and not (tmp_path / "escape").exists()


def test_base_model_folder_of_the_toy_world_is_readable_from_any_work_folder(tmp_path):
    checked = check_path_options({"pretrained_model_name_or_path": str(BASE_MODEL_DIR)}, tmp_path)
    assert Path(checked["pretrained_model_name_or_path"]) == Path(BASE_MODEL_DIR).resolve()


# Serving


def test_binding_beyond_localhost_needs_auth(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--host", "0.0.0.0"])
    assert "pass `--auth user:password`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--share"])
    assert parse_args(["--host", "0.0.0.0", "--auth", "me:pw"]).auth == "me:pw"
    assert parse_args([]).host == "127.0.0.1"


def test_the_binding_curve_judges_each_validation_step_with_the_toy_checker(tmp_path):
    """Runs evaluated by the toy world's checker show when the subject was learnt: per validation step, the share of
    images the checker calls the subject."""
    runs = Runs(tmp_path / "work")
    folder = runs.folder("toy")
    folder.mkdir()
    (folder / "options.json").write_text(json.dumps({"evaluation_dino_model": str(CHECKER_DIR)}))
    rng = np.random.default_rng(0)
    validation = folder / "output" / "validation"
    for step, scenes in {
        10: [sample_scene(rng) for _ in range(4)],
        20: [subject_scene(rng) for _ in range(4)],
    }.items():
        (validation / f"step-{step}").mkdir(parents=True)
        for index, scene in enumerate(scenes):
            scene.render().save(validation / f"step-{step}" / f"{index}.png")
    curve = runs.binding_curve("toy", runs.status("toy").validation_images)
    assert [point["step"] for point in curve] == [10, 20]
    assert curve[0]["binding"] <= 0.25 and curve[1]["binding"] == 1.0
    (folder / "options.json").write_text(json.dumps({}))  # no checker: no curve
    assert runs.binding_curve("toy", runs.status("toy").validation_images) == []
