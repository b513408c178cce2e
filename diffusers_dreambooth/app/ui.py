"""The Gradio page: photos and subject in, a run trained with live progress, then samples, metrics, generation and a
push to the Hub. Everything it does goes through `Runs` (the work folder) and the library; the page only shows it."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from ..config import DreamBoothConfig, read_options_file
from ..families import family_class_named
from ..toy import BASE_MODEL_DIR, SUBJECT_PHOTOS_DIR, toy_dreambooth_config
from .curves import validation_step
from .options import OptionField, changed_options, form_values, option_fields
from .runs import AppInputError, Runs, RunStatus, check_path_options, is_hub_id, review_photos

#: What the base-model box holds for the bundled toy model.
TOY_MODEL = "toy"
#: The repo's ready-made configs (present in a checkout or a Space, not in an installed wheel).
PRESETS_DIR = Path(__file__).resolve().parents[2] / "examples" / "configs"
NO_PRESET = "(none)"
#: Fixed colours of the curves, which their plots' labels name (the plots' own legends fall below their frame).
CURVE_COLORS = {"binding": "#1f77b4", "drift": "#ff7f0e"}
METRIC_COLORS = {"DINO": "#1f77b4", "CLIP-I": "#2ca02c", "CLIP-T": "#ff7f0e", "PRES": "#d62728"}


def toy_defaults(adapter: str = "full") -> DreamBoothConfig:
    """The app's defaults: the bundled subject on the toy model, with validation images to watch as it trains, and
    images of the class prompt beside them for the drift curve."""
    return toy_dreambooth_config(
        "output",
        adapter=adapter,
        validation_prompt="a photo of {subject}",
        validation_steps=100,
        num_validation_class_images=4,
    )


def presets() -> list[str]:
    return [NO_PRESET, *sorted(path.name for path in PRESETS_DIR.glob("*.yaml"))] if PRESETS_DIR.is_dir() else []


def base_model_source(base_model: str, work_dir: Path) -> str:
    """What the base-model box names: the bundled toy model, a Hub id, or a folder checked to be in the work folder."""
    base = base_model.strip()
    if base in ("", TOY_MODEL):
        return str(BASE_MODEL_DIR)
    return check_path_options({"pretrained_model_name_or_path": base}, work_dir)["pretrained_model_name_or_path"]


def detected_family(base_model: str, work_dir: Path) -> str:
    """The family of the base model in the box, as a line for the page."""
    try:
        source = base_model_source(base_model, work_dir)
        if is_hub_id("pretrained_model_name_or_path", source, work_dir):
            return f"Family: read from `{source}` on the Hub when training starts"
        index = read_options_file(Path(source) / "model_index.json", "model index")
    except (AppInputError, FileNotFoundError, ValueError) as error:
        return f"Family: unknown ({error})"
    family = family_class_named(index.get("_class_name"))
    name = "the bundled toy model" if source == str(BASE_MODEL_DIR) else f"`{index.get('_class_name')}`"
    return f"Family: {family.__name__ if family else 'not supported'} ({name})"


def not_started(error: Exception) -> tuple[str, Any]:
    """Why Start or Resume did nothing, in the status line and a toast, the token field emptied. Not `gr.Error`, whose
    red badge would stay on the status and token field until they next change (a second Start while busy, say)."""
    gr.Warning(str(error), duration=10)
    return f"Not started: {error}", gr.update(value="")


class App:
    """The page's handlers, on one work folder."""

    def __init__(self, work_dir: str | Path) -> None:
        self.runs = Runs(work_dir)
        self.fields: list[OptionField] = option_fields()
        self._pipelines: dict[str, Any] = {}
        self._generate_lock = threading.Lock()

    # Training

    def run_options(
        self, base_model: str, adapter: str, instance_prompt: str, class_prompt: str, identifier: str, advanced: list
    ) -> dict[str, Any]:
        """The run's options from the form: the advanced values that differ from the defaults, the main form's, and
        the paths the app owns; every path the browser named checked to stay in the work folder."""
        options = check_path_options(changed_options(self.fields, advanced), self.runs.work_dir)
        options["pretrained_model_name_or_path"] = base_model_source(base_model, self.runs.work_dir)
        options.update(adapter=adapter, instance_prompt=instance_prompt, identifier=identifier.strip() or None)
        if options.get("with_prior_preservation") or options.get("num_validation_class_images"):
            options["class_prompt"] = class_prompt
        return options

    def start(self, name, photos, base_model, adapter, instance_prompt, class_prompt, identifier, token, *advanced):
        try:
            options = self.run_options(base_model, adapter, instance_prompt, class_prompt, identifier, list(advanced))
            folder = self.runs.folder(name)
            if photos:
                review = self.runs.add_photos(name, [(Path(path).name, Path(path)) for path in photos])
                if review.rejected:
                    gr.Warning("Left out: " + "; ".join(f"{n}: {reason}" for n, reason in review.rejected))
            elif not (folder / "photos").is_dir():  # no photos given: the bundled subject
                shutil.copytree(SUBJECT_PHOTOS_DIR, folder / "photos")
            options.update(instance_data_dir=str(folder / "photos"), class_data_dir=str(folder / "class_images"))
            self.runs.start(name, options, token=token or None)
        except (AppInputError, ValueError) as error:
            return not_started(error)
        return f"Started `{name}`.", gr.update(value="")  # the token field is emptied, never shown back

    def resume(self, name: str, token: str):
        try:
            options = self.runs.options(name)
            if not options:
                raise AppInputError(f"Run `{name}` has not started yet; press Start.")
            self.runs.start(name, options, token=token or None, resume=True)
        except (AppInputError, ValueError) as error:
            return not_started(error)
        return f"Resumed `{name}` from its latest checkpoint.", gr.update(value="")

    def stop(self) -> str:
        stopped = self.runs.stop()
        return f"Stopping `{stopped}`: it saves a checkpoint, then ends." if stopped else "No run is training."

    def review(self, photos) -> tuple[list[str], str]:
        """The photos' preview and, before training, the files the trainer would skip or refuse and why."""
        if not photos:
            return sorted(str(p) for p in SUBJECT_PHOTOS_DIR.iterdir()), "No photos: the bundled subject is trained."
        review = review_photos([Path(p) for p in photos])
        lines = [f"{len(review.accepted)} photo(s) to train on."]
        if len(review.accepted) < 3:
            lines[0] += " DreamBooth learns a subject from 3-5 photos; add more if you have them."
        lines += [
            f"- {reason}" if f"`{name}`" in reason else f"- `{name}`: {reason}" for name, reason in review.rejected
        ]
        return [str(p) for p in review.accepted], "\n".join(lines)

    # Live status

    def candidates(self, base_model: str) -> str:
        """The base model's rare single-token words, for `auto` or to pick one (`rare_token_identifiers`)."""
        from transformers import AutoTokenizer

        from ..identifiers import rare_token_identifiers

        try:
            base = base_model_source(base_model, self.runs.work_dir)
            words = rare_token_identifiers([AutoTokenizer.from_pretrained(base, subfolder="tokenizer")], count=8)
        except Exception as error:  # no tokenizer folder, not on the Hub, ...
            message = f"No tokenizer read from `{base_model}`: {str(error).splitlines()[0]}"
            raise gr.Error(message, print_exception=False, duration=10) from None
        return "Rare-token candidates (`auto` takes the first): " + ", ".join(f"`{word}`" for word in words)

    def watch(self, name: str):
        """The progress line, the loss curves, the binding and drift curves, the DINO/CLIP curves, validation images
        (class-prompt ones captioned so) and the log's tail of run `name`."""
        try:
            status = self.runs.status(name)
        except AppInputError:
            return "", None, None, None, [], ""
        shares = self.runs.checker_curves(name, status)
        scores = self.runs.metric_curves(name, status)
        images = [(str(p), f"step {validation_step(p)}") for p in status.validation_images]
        images += [(str(p), f"step {validation_step(p)}: class prompt") for p in status.class_images]
        return (
            progress_line(status),
            loss_frame(status),
            pd.DataFrame(shares) if shares else None,
            pd.DataFrame(scores) if scores else None,
            images,
            status.log_tail,
        )

    def current_run(self):
        """The run the page shows on (re)load: the one training, else the run name as it is."""
        return self.runs.running or gr.update()

    # Results

    def result(self, name: str):
        """Grid, evaluation table, card and trained weights of run `name`."""
        try:
            output = self.runs.output_dir(name)
        except AppInputError:
            return None, None, "", None
        metadata = self.runs.metadata(name)
        grid = output / "samples" / "grid.png"
        card = output / "README.md"
        evaluation = metadata.evaluation if metadata else {}
        rows = [{"metric": k, "value": round(v, 3) if isinstance(v, float) else v} for k, v in evaluation.items()]
        table = pd.DataFrame(rows) if rows else None
        weights = output / "pytorch_lora_weights.safetensors"
        return (
            str(grid) if grid.is_file() else None,
            table,
            card_for_page(card.read_text(encoding="utf-8"), output) if card.is_file() else "",
            str(weights) if weights.is_file() else None,
        )

    def generate(self, name: str, prompt: str, seed: float):
        from ..pipeline import DreamBoothPipeline

        metadata = self.runs.metadata(name)
        if metadata is None:
            raise gr.Error(f"Run `{name}` has no trained subject yet.", print_exception=False, duration=10)
        options = self.runs.options(name)
        with self._generate_lock:
            if name not in self._pipelines:
                self._pipelines[name] = DreamBoothPipeline.from_pretrained(str(self.runs.output_dir(name)))
            pipe = self._pipelines[name]
            import torch

            image = pipe(
                prompt,
                num_inference_steps=options.get("validation_inference_steps", 25),
                guidance_scale=options.get("guidance_scale") or 7.5,
                generator=torch.Generator().manual_seed(int(seed)),
            ).images[0]
        return shown_large(image), pipe.fill_prompt(prompt)

    def export_kohya(self, name: str) -> str:
        from ..kohya import export_kohya_lora

        weights = self.runs.output_dir(name) / "pytorch_lora_weights.safetensors"
        if not weights.is_file():
            raise gr.Error(f"Run `{name}` trained no LoRA to export.", print_exception=False, duration=10)
        return export_kohya_lora(weights)

    def push(self, name: str, repo_id: str, private: bool, token: str):
        from ..hub import push_subject_folder

        if self.runs.metadata(name) is None:
            raise gr.Error(f"Run `{name}` has no trained subject to push.", print_exception=False, duration=10)
        try:
            commit = push_subject_folder(
                self.runs.output_dir(name), repo_id.strip(), private=private, token=token or None
            )
        except Exception as error:  # the Hub's answer, in one line, never the token
            raise gr.Error(
                f"Push to `{repo_id}` failed: {str(error).splitlines()[0]}", print_exception=False
            ) from None
        url = commit.commit_url.split("/commit/")[0]
        return f"Pushed to [{url}]({url}).", gr.update(value="")

    def open_preset(self, preset: str, adapter: str) -> list:
        """The advanced values of a preset from `examples/configs/` on the toy defaults (those alone for none)."""
        if preset in (NO_PRESET, None, ""):
            return form_values(self.fields, toy_defaults(adapter))
        values = read_options_file(PRESETS_DIR / Path(preset).name, "preset")
        return form_values(self.fields, DreamBoothConfig(**{**toy_defaults(adapter).to_dict(), **values}))


def progress_line(status: RunStatus) -> str:
    total = f"/{status.total}" if status.total else ""
    parts = [f"**{status.name}**: {status.state}, step {status.step}{total}"]
    if status.seconds_per_step:
        parts.append(f"{1 / status.seconds_per_step:.2f} steps/s")
    if status.state == "running" and status.seconds_left is not None:
        parts.append(f"{time.strftime('%M:%S', time.gmtime(status.seconds_left))} left")
    if status.exit_code not in (None, 0):
        parts.append(f"exit code {status.exit_code} (see the log)")
    return " · ".join(parts)


def loss_frame(status: RunStatus) -> pd.DataFrame | None:
    rows = [
        {"step": record["step"], "loss": record[key], "curve": key}
        for record in status.steps
        for key in ("instance_loss", "prior_loss", "loss")
        if key in record
    ]
    return pd.DataFrame(rows) if rows else None


def advanced_component(field: OptionField, value: Any):
    label, info, elem_id = field.name, field.help, f"option-{field.name}"
    if field.kind == "checkbox":
        return gr.Checkbox(value=value, label=label, info=info, elem_id=elem_id)
    if field.kind in ("number", "integer") and not field.optional:  # gr.Number cannot be empty: optional ones are text
        return gr.Number(
            value=value, label=label, info=info, precision=0 if field.kind == "integer" else None, elem_id=elem_id
        )
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=value, label=label, info=info, elem_id=elem_id)
    return gr.Textbox(value=value, label=label, info=info, lines=3 if field.kind == "list" else 1, elem_id=elem_id)


def advanced_section(fields: list[OptionField], values: list, columns: int = 3) -> list:
    """The advanced options in `columns` columns, in the config's order; their components, in that order."""
    components: list = [None] * len(fields)
    per_column = -(-len(fields) // columns)
    with gr.Row():
        for start in range(0, len(fields), per_column):
            with gr.Column():
                for index in range(start, min(start + per_column, len(fields))):
                    components[index] = advanced_component(fields[index], values[index])
    return components


def shown_large(image: Image.Image, size: int = 256) -> Image.Image:
    """A small image (the toy model draws 32 px) enlarged without blur for the page; larger ones as they are."""
    scale = max(1, size // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def card_for_page(card: str, output: Path) -> str:
    """The model card without its metadata header, its relative image links served from the run's folder."""
    body = card.split("---", 2)[-1] if card.startswith("---") else card
    return re.sub(r"\]\((?!https?://)([^)]+\.png)\)", lambda m: f"](/gradio_api/file={output / m.group(1)})", body)


def build_app(work_dir: str | Path) -> gr.Blocks:
    """The page, on the work folder `work_dir`."""
    app = App(work_dir)
    defaults = form_values(app.fields, toy_defaults())
    with gr.Blocks(title="DreamBooth") as page:
        gr.Markdown("# DreamBooth\nTeach a diffusion model your subject from a few photos.")
        with gr.Row():
            name = gr.Textbox(value="my-subject", label="Run name", elem_id="run-name")
            message = gr.Markdown(elem_id="message")
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column():
                    photos = gr.File(label="Photos (3-20)", file_count="multiple", elem_id="photos")
                    review = gr.Markdown(elem_id="review")
                    preview = gr.Gallery(label="Preview", columns=5, height=160)
                with gr.Column():
                    class_noun = gr.Textbox(value="star", label="Class noun")
                    with gr.Row():
                        identifier = gr.Textbox(value="sks", label="Identifier (a rare word, or `auto`)", scale=3)
                        suggest = gr.Button("Rare tokens", scale=1)
                    candidates = gr.Markdown()
                    instance_prompt = gr.Textbox(value="a photo of sks star", label="Instance prompt")
                    class_prompt = gr.Textbox(value="a photo of a star", label="Class prompt")
                    base_model = gr.Textbox(
                        value=TOY_MODEL, label="Base model (`toy`, a folder in the work folder, or a Hub id)"
                    )
                    family = gr.Markdown(detected_family(TOY_MODEL, app.runs.work_dir))
                    adapter = gr.Radio(["full", "lora"], value="full", label="Mode")
                    preset = gr.Dropdown(presets(), value=NO_PRESET, label="Preset")
            with gr.Accordion(f"Advanced: every other option ({len(app.fields)})", open=False):
                advanced = advanced_section(app.fields, defaults)
            train_token = gr.Textbox(label="Hub token (only for --push_to_hub; never stored)", type="password")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="start")
                stop = gr.Button("Stop", elem_id="stop")
                resume = gr.Button("Resume", elem_id="resume")
            progress = gr.Markdown(elem_id="progress")
            with gr.Row():
                losses = gr.LinePlot(x="step", y="loss", color="curve", label="Losses", height=300)
                binding = gr.LinePlot(
                    x="step",
                    y="share",
                    color="curve",
                    color_map=CURVE_COLORS,
                    y_lim=[0, 1],
                    label="Binding (blue) and drift (orange): subject- and class-prompt images the toy checker calls"
                    " the subject",
                    height=300,
                    elem_id="binding",
                )
                metrics = gr.LinePlot(
                    x="step",
                    y="score",
                    color="metric",
                    color_map=METRIC_COLORS,
                    label="DINO (blue), CLIP-I (green), CLIP-T (orange), PRES (red, lower is better) of the validation"
                    " images",
                    height=300,
                    elem_id="metrics",
                )
            validation = gr.Gallery(label="Validation images", columns=8, height=160)
            log = gr.Textbox(label="Log", lines=10, max_lines=10, autoscroll=True, elem_id="log")
        with gr.Tab("Result"):
            with gr.Row():
                runs = gr.Dropdown(app.runs.names(), label="Earlier runs", allow_custom_value=True)
                refresh = gr.Button("Show", elem_id="show-result")
            with gr.Row():
                grid = gr.Image(label="Samples", type="filepath", elem_id="grid")
                evaluation = gr.Dataframe(label="Evaluation")
            with gr.Row():
                prompt = gr.Textbox(
                    value="a photo of {subject} on a green background", label="Prompt", elem_id="prompt"
                )
                seed = gr.Number(value=0, label="Seed", precision=0)
                generate = gr.Button("Generate", elem_id="generate")
            generated = gr.Image(label="Generated", elem_id="generated")
            filled = gr.Markdown()
            with gr.Row():
                weights = gr.File(label="LoRA weights")
                kohya = gr.Button("Export for kohya / ComfyUI")
            with gr.Row():
                repo_id = gr.Textbox(label="Hub repo id", elem_id="repo-id")
                private = gr.Checkbox(label="Private", value=True)
                push_token = gr.Textbox(label="Hub token (never stored)", type="password", elem_id="push-token")
                push = gr.Button("Push to the Hub", elem_id="push")
            pushed = gr.Markdown(elem_id="pushed")
            card = gr.Markdown(label="Model card", elem_id="card")

        def fill_prompts(noun: str, word: str):
            word = word.strip() or "sks"
            return f"a photo of {word} {noun}", f"a photo of a {noun}"

        for box in (class_noun, identifier):
            box.change(fill_prompts, [class_noun, identifier], [instance_prompt, class_prompt])
        photos.change(app.review, photos, [preview, review])
        suggest.click(app.candidates, base_model, candidates)
        base_model.change(lambda base: detected_family(base, app.runs.work_dir), base_model, family)
        preset.change(app.open_preset, [preset, adapter], advanced)
        adapter.change(app.open_preset, [preset, adapter], advanced)
        form = [name, photos, base_model, adapter, instance_prompt, class_prompt, identifier, train_token, *advanced]
        start.click(app.start, form, [message, train_token], concurrency_limit=1)
        stop.click(app.stop, None, message)
        resume.click(app.resume, [name, train_token], [message, train_token], concurrency_limit=1)
        watched = [progress, losses, binding, metrics, validation, log]
        gr.Timer(1.0).tick(app.watch, name, watched, show_progress="hidden")
        page.load(app.current_run, None, name)
        page.load(app.review, photos, [preview, review])
        result = [grid, evaluation, card, weights]
        refresh.click(lambda run: app.result(run), runs, result)
        runs.focus(lambda: gr.update(choices=app.runs.names()), None, runs)
        name.change(lambda run: gr.update(value=run), name, runs)
        generate.click(app.generate, [runs, prompt, seed], [generated, filled], concurrency_limit=1)
        kohya.click(app.export_kohya, runs, weights)
        push.click(app.push, [runs, repo_id, private, push_token], [pushed, push_token], concurrency_limit=1)
    return page
