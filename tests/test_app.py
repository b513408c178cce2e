"""The web app's functions (#18): the option list generated from the config, form values to options and back, path
checks, photo review with the trainer's reasons, the one-run-at-a-time rule, Stop and Resume, the token, and the
curves of validation images against steps (binding, drift, DINO, CLIP-I, CLIP-T)."""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_evaluation_models
from diffusers import DiffusionPipeline
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
    RunStatus,
    ServerBusy,
    check_path_options,
    inside,
    review_photos,
    safe_name,
)
from diffusers_dreambooth.checkpoints import list_checkpoints
from diffusers_dreambooth.config import SECRET_FIELDS
from diffusers_dreambooth.evaluation import load_evaluation_models, prompt_fidelity, subject_fidelity
from diffusers_dreambooth.toy import (
    BASE_MODEL_DIR,
    CHECKER_DIR,
    SUBJECT_PHOTOS_DIR,
    sample_scene,
    subject_scene,
    toy_dreambooth_config,
)
from diffusers_dreambooth.validation import run_validation, save_validation_images

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
        ({"allow_pickle": True}, "`allow_pickle`: the app loads safetensors weights only"),
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


# Curves


def write_validation_step(run: Path, step: int, scenes: list, prompt: str, prefix: str = "") -> list[Path]:
    """`scenes` rendered as the trainer saves validation images of `step` (its own `save_validation_images`)."""
    folder = run / "output" / "validation" / f"step-{step}"
    return save_validation_images([scene.render() for scene in scenes], prompt, folder, prefix)


def test_validation_draws_class_prompt_images_beside_its_own_when_asked(tmp_path):
    """`--num_validation_class_images` adds `class-{i}.png` of the class prompt, same seed; every image holds its
    prompt; default runs draw none."""
    pipeline = DiffusionPipeline.from_pretrained(BASE_MODEL_DIR)
    pipeline.set_progress_bar_config(disable=True)
    options = dict(validation_prompt="a photo of sks star", num_validation_images=2, validation_inference_steps=2)
    config = toy_dreambooth_config(tmp_path / "out", num_validation_class_images=2, **options)
    paths = run_validation(pipeline, config, step=5, seed=0, trackers=[])
    assert [path.name for path in paths] == ["0.png", "1.png", "class-0.png", "class-1.png"]
    assert sorted(path.name for path in paths[0].parent.iterdir()) == [path.name for path in paths]  # no partial
    prompts = [Image.open(path).info["prompt"] for path in paths]
    assert prompts == ["a photo of sks star"] * 2 + [config.class_prompt] * 2
    assert not np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[2])))
    default = toy_dreambooth_config(tmp_path / "default", **options)
    assert [path.name for path in run_validation(pipeline, default, 5, 0, [])] == ["0.png", "1.png"]


def test_class_prompt_images_need_a_class_prompt():
    with pytest.raises(ValueError, match="`--num_validation_class_images` draws images of `--class_prompt`"):
        toy_dreambooth_config("out", with_prior_preservation=False, class_prompt=None, num_validation_class_images=2)
    with pytest.raises(ValueError, match="must be 0 or more, got -1"):
        toy_dreambooth_config("out", num_validation_class_images=-1)


def test_binding_and_drift_curves_judge_each_validation_step_with_the_toy_checker(tmp_path):
    """Runs evaluated by the toy world's checker show when the subject was learnt (binding: images of the subject's
    prompt it calls the subject) and whether the class drifted (drift: images of the class prompt it calls so)."""
    runs = Runs(tmp_path / "work")
    folder = runs.folder("toy")
    folder.mkdir()
    (folder / "options.json").write_text(json.dumps({"evaluation_dino_model": str(CHECKER_DIR)}))
    rng = np.random.default_rng(0)
    for step, subject in [(10, sample_scene), (20, subject_scene)]:
        write_validation_step(folder, step, [subject(rng) for _ in range(4)], "a photo of sks star")
    write_validation_step(folder, 10, [sample_scene(rng) for _ in range(4)], "a photo of a star", "class-")
    write_validation_step(folder, 20, [subject_scene(rng) for _ in range(4)], "a photo of a star", "class-")
    status = runs.status("toy")
    assert [path.name for path in status.validation_images] == ["0.png", "1.png", "2.png", "3.png"] * 2
    assert [path.name for path in status.class_images] == [
        "class-0.png",
        "class-1.png",
        "class-2.png",
        "class-3.png",
    ] * 2
    curves = {(row["curve"], row["step"]): row["share"] for row in runs.checker_curves("toy", status)}
    assert set(curves) == {("binding", 10), ("binding", 20), ("drift", 10), ("drift", 20)}
    assert curves["binding", 10] <= 0.25 and curves["binding", 20] == 1.0
    assert curves["drift", 10] <= 0.25 and curves["drift", 20] == 1.0  # the class turned into the subject
    (folder / "options.json").write_text(json.dumps({}))  # no checker: no curve
    assert runs.checker_curves("toy", runs.status("toy")) == []


@pytest.mark.parametrize("models", ["toy checker", "tiny ViT and CLIP"])
def test_dino_clip_curves_score_each_validation_step_as_the_final_evaluation(tmp_path, models):
    """For runs with `--evaluate`: each step's DINO, CLIP-I, CLIP-T (and PRES of its class images) equal the
    evaluation's own functions on that step's images, against the run's photos; CLIP-T without the identifier."""
    if models == "toy checker":
        dino_model = clip_model = str(CHECKER_DIR)
    else:
        saved = save_tiny_evaluation_models(tmp_path / "models")
        dino_model, clip_model = saved["dino"], saved["clip"]
    runs = Runs(tmp_path / "work")
    folder = runs.folder("scored")
    options = {
        **toy_run_options(10),
        "instance_data_dir": str(SUBJECT_PHOTOS_DIR),
        "evaluate": True,
        "evaluation_dino_model": dino_model,
        "evaluation_clip_model": clip_model,
    }
    (folder / "output" / "logs").mkdir(parents=True)
    (folder / "options.json").write_text(json.dumps(options))
    config_line = {"config": {"instance_prompt": "a photo of sks star", "class_prompt": "a photo of a star"}}
    (folder / "output" / "logs" / "progress.jsonl").write_text(json.dumps(config_line) + "\n")
    rng = np.random.default_rng(0)
    images = {
        10: write_validation_step(folder, 10, [sample_scene(rng) for _ in range(3)], "a photo of sks star"),
        20: write_validation_step(folder, 20, [subject_scene(rng) for _ in range(3)], "a photo of sks star"),
    }
    class_images = write_validation_step(
        folder, 20, [sample_scene(rng) for _ in range(2)], "a photo of a star", "class-"
    )
    unprompted = folder / "output" / "validation" / "step-30" / "0.png"  # saved without its prompt: no CLIP-T
    unprompted.parent.mkdir()
    subject_scene(rng).render().save(unprompted)
    status = runs.status("scored")
    assert status.identifier == "sks"
    rows = runs.metric_curves("scored", status, wait=True)
    scores = {(row["metric"], row["step"]): row["score"] for row in rows}
    expected = {(m, s) for m in ("DINO", "CLIP-I", "CLIP-T") for s in (10, 20)} | {("PRES", 20)}
    assert set(scores) == expected | {("DINO", 30), ("CLIP-I", 30)}

    dino, clip = load_evaluation_models(dino_model, clip_model)
    photos = [Image.open(path).convert("RGB") for path in sorted(SUBJECT_PHOTOS_DIR.iterdir())]
    for step, paths in images.items():
        drawn = [Image.open(path).convert("RGB") for path in paths]
        assert scores["DINO", step] == pytest.approx(subject_fidelity(drawn, photos, dino), abs=1e-5)
        assert scores["CLIP-I", step] == pytest.approx(subject_fidelity(drawn, photos, clip), abs=1e-5)
        clip_t = prompt_fidelity(drawn, ["a photo of star"] * len(drawn), clip)
        assert scores["CLIP-T", step] == pytest.approx(clip_t, abs=1e-5)
    drawn = [Image.open(path).convert("RGB") for path in class_images]
    assert scores["PRES", 20] == pytest.approx(subject_fidelity(drawn, photos, dino), abs=1e-5)
    if models == "toy checker":  # the checker's features: the subject's images are the subject's
        assert scores["DINO", 20] > scores["DINO", 10] + 0.2 and scores["CLIP-T", 20] > scores["CLIP-T", 10]


def test_dino_clip_curves_are_absent_without_evaluate_or_with_models_that_do_not_load(tmp_path):
    runs = Runs(tmp_path / "work")
    folder = runs.folder("plain")
    options = {**toy_run_options(10), "instance_data_dir": str(SUBJECT_PHOTOS_DIR)}
    (folder / "output").mkdir(parents=True)
    (folder / "options.json").write_text(json.dumps(options))
    write_validation_step(folder, 10, [subject_scene(np.random.default_rng(0))], "a photo of sks star")
    assert runs.metric_curves("plain", runs.status("plain"), wait=True) == []
    missing = {"evaluate": True, "evaluation_dino_model": str(tmp_path / "no-dino"), "evaluation_clip_model": "x/y"}
    (folder / "options.json").write_text(json.dumps({**options, **missing}))
    status = runs.status("plain")
    assert runs.metric_curves("plain", status, wait=True) == []
    assert runs.metric_error("plain", status)  # said once in the server's log, never raised into the page


@pytest.mark.slow
def test_a_finished_lora_run_shows_its_progress_losses_metrics_weights_and_kohya_export(tmp_path):
    """The Result tab's pieces on a real LoRA run with prior preservation and `--evaluate`: the progress line, both
    loss curves, the evaluation table, the LoRA download and its kohya export; the run is listed for a new page."""
    from diffusers_dreambooth.app.ui import TOY_MODEL, App, progress_line

    app = App(tmp_path / "work")
    options = toy_dreambooth_config(
        "unused",
        adapter="lora",
        max_train_steps=4,
        num_class_images=4,
        checkpointing_steps=100,
        sample_prompts=None,
        num_validation_images=0,
        evaluation_prompts=["a photo of {subject} on a green background"],
        evaluation_images_per_prompt=2,
    ).to_dict()
    options = {key: value for key, value in options.items() if value is not None}
    app.runs.start("lora-run", options)
    assert app.runs.wait(300) == 0, app.runs.status("lora-run").log_tail

    line, losses, *_ = app.watch("lora-run")
    assert line == "**lora-run**: finished, step 4/4"
    assert set(losses["curve"]) == {"instance_loss", "prior_loss", "loss"}
    assert sorted(set(losses["step"])) == [1, 2, 3, 4]
    running = RunStatus("lora-run", "running", step=1, total=4, seconds_per_step=2.0)  # speed, time left
    assert progress_line(running) == "**lora-run**: running, step 1/4 · 0.50 steps/s · 00:06 left"

    grid, table, card, weights = app.result("lora-run")
    assert grid is None and "# DreamBooth LoRA" in card
    assert {"DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"} <= set(table["metric"])
    assert weights == str(app.runs.output_dir("lora-run") / "pytorch_lora_weights.safetensors")
    exported = Path(app.export_kohya("lora-run"))
    assert exported.is_file() and exported.suffix == ".safetensors" and exported.parent == Path(weights).parent
    assert App(tmp_path / "work").runs.names() == ["lora-run"]  # a new page lists the earlier run
    assert app.candidates(TOY_MODEL).startswith("Rare-token candidates (`auto` takes the first): `")
