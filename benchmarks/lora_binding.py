"""Issue #20: why LoRA barely binds the toy subject, one change at a time from the old "LoRA, prior" recipe.

Each variant trains the bundled subject (`sks star`, 4 photos on white) with `toy_dreambooth_config` and the
variant's overrides, in segments of `--eval_every` steps that resume the previous segment's checkpoint, and after each
segment the toy checker judges it as `reproduce_dreambooth.py` does (its judging functions, imported): binding
("a photo of sks star" judged the subject), drift ("a photo of a star" judged the subject), prior kept (all-three
accuracy on the 144 full prompts over the base model's), recontextualization ("... on a green background": subject /
green); the paper's DINO ... DIV at the last step.

The base variant is the old default of `benchmarks/RESULTS.md` ("LoRA, prior": rank 8 = alpha, lr 1e-3, attention
layers only, text encoder frozen, AdamW); every other variant changes one thing. rsLoRA is not an option of the
trainer: its scale alpha/sqrt(rank) is the plain scale alpha'/rank with alpha' = alpha*sqrt(rank), so "rank 16, alpha
64" is rsLoRA's rank 16, alpha 16. `text_encoder_lora_targets` is this script's key: it sets the family's text-encoder
LoRA targets, which no option sets.

Every (variant, seed) runs in its own process with one torch thread (`--workers` at once, the longest first); a
variant that fails or crashes is recorded as failed and the sweep goes on; `--time_limit` stops what is still running
and keeps its judged points. On one CPU thread a variant of 1,000 steps takes about 4 minutes judged every 100 steps
(85 s training, 15 s per judged step, 60% of it the prior's 144 images), about 3 with `--prior_every 500`:

    python benchmarks/lora_binding.py --seeds 0 --workers 16 --device cpu --prior_every 500 --output_dir lora-sweep
    python benchmarks/lora_binding.py --variants "base: LoRA, prior (rank 8, lr 1e-3)" "lr 1e-2" --seeds 0 1 2
    python benchmarks/lora_binding.py --define "lr 1e-2, TE lr 1e-3" '{"learning_rate": 1e-2,
        "train_text_encoder": true, "text_encoder_lr": 1e-3}' --variants "lr 1e-2, TE lr 1e-3"

It writes `results.json`, `table.md` (printed too), `binding_drift.png` (binding and drift against steps: the old
default, the reference full fine-tune and the best LoRA variants) and `all_curves.png` (one panel per variant) into
`--output_dir`; checkpoints, class images and per-run logs go to `--work_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from reproduce_dreambooth import JUDGED_COLUMNS, LORA, PIVOTAL, mean_spread, slug  # noqa: E402

#: The old default of RESULTS.md's ablation, "LoRA, prior": rank 8 (alpha 8), lr 1e-3, attention only, TE frozen.
BASE = {**LORA, "train_text_encoder": False}
BASE_NAME = "base: LoRA, prior (rank 8, lr 1e-3)"
REFERENCE_NAME = "reference: full + TE, prior"
ATTENTION = "to_k,to_q,to_v,to_out.0"
FEED_FORWARD = "proj_in,proj_out,ff.net.0.proj,ff.net.2"
CONVOLUTIONS = "conv1,conv2,conv_shortcut,time_emb_proj"
IDENTIFIER_PROMPT = "a photo of {identifier} star"

#: name -> all overrides of `toy_dreambooth_config` (plus this script's and reproduce_dreambooth's own keys).
VARIANTS: dict[str, dict] = {
    BASE_NAME: BASE,
    # The learning rate (the full fine-tune's is 1e-4).
    "lr 1e-4": {**BASE, "learning_rate": 1e-4},
    "lr 3e-3": {**BASE, "learning_rate": 3e-3},
    "lr 1e-2": {**BASE, "learning_rate": 1e-2},
    # Rank, with alpha = rank (scale 1) and alpha = 2 * rank (scale 2); rsLoRA's scale; DoRA.
    "rank 4": {**BASE, "rank": 4},
    "rank 16": {**BASE, "rank": 16},
    "rank 32": {**BASE, "rank": 32},
    "rank 4, alpha 8": {**BASE, "rank": 4, "lora_alpha": 8},
    "rank 8, alpha 16": {**BASE, "lora_alpha": 16},
    "rank 16, alpha 32": {**BASE, "rank": 16, "lora_alpha": 32},
    "rank 32, alpha 64": {**BASE, "rank": 32, "lora_alpha": 64},
    "rank 16, alpha 64 (rsLoRA scale)": {**BASE, "rank": 16, "lora_alpha": 64},
    "DoRA": {**BASE, "use_dora": True},
    # The denoiser's layers: attention (the default) + transformer feed-forward and projections, + resnet convolutions.
    "targets: attention + ff": {**BASE, "lora_target_modules": f"{ATTENTION},{FEED_FORWARD}"},
    "targets: attention + ff + conv": {**BASE, "lora_target_modules": f"{ATTENTION},{FEED_FORWARD},{CONVOLUTIONS}"},
    # A text-encoder LoRA (attention: q, k, v, out) at its own learning rate; 1e-3 is RESULTS.md's "LoRA + TE, prior".
    "TE LoRA, TE lr 1e-4": {**BASE, "train_text_encoder": True, "text_encoder_lr": 1e-4},
    "TE LoRA, TE lr 1e-3": {**BASE, "train_text_encoder": True, "text_encoder_lr": 1e-3},
    "TE LoRA, TE lr 1e-2": {**BASE, "train_text_encoder": True, "text_encoder_lr": 1e-2},
    "TE LoRA + MLP, TE lr 1e-3": {
        **BASE,
        "train_text_encoder": True,
        "text_encoder_lr": 1e-3,
        "text_encoder_lora_targets": "q_proj,k_proj,v_proj,out_proj,fc1,fc2",
    },
    # The identifier: the rarest token (`ack`), or pivotal tuning's new token `<s0>` with a trained embedding.
    "identifier auto": {**BASE, "identifier": "auto", "instance_prompt": IDENTIFIER_PROMPT},
    "pivotal <s0>, embedding lr 1e-3": {**BASE, **PIVOTAL},
    "pivotal <s0>, embedding lr 1e-2": {**BASE, **PIVOTAL, "text_encoder_lr": 1e-2},
    # Prodigy sets its own step size; lr 1.0 as diffusers' README advises (`pip install prodigyopt`).
    "Prodigy (lr 1.0)": {**BASE, "optimizer": "prodigy", "learning_rate": 1.0},
    # The main recipe (full fine-tune + text encoder, lr 1e-4), the binding to reach.
    REFERENCE_NAME: {"train_text_encoder": True},
}

#: The second round: no single change binds (round one), so combine what gives the identifier a trainable signal
#: (pivotal embeddings, a text-encoder LoRA with its MLP) with more of the denoiser adapted, a lighter prior loss,
#: and the runs without the prior that show how fast each adapter learns the subject at all.
ALL_TARGETS = f"{ATTENTION},{FEED_FORWARD},{CONVOLUTIONS}"
TE_MLP = {"train_text_encoder": True, "text_encoder_lora_targets": "q_proj,k_proj,v_proj,out_proj,fc1,fc2"}
PIVOTAL_1E2 = {**PIVOTAL, "text_encoder_lr": 1e-2}
COMBINATIONS: dict[str, dict] = {
    "all targets, pivotal 1e-2": {**BASE, "lora_target_modules": ALL_TARGETS, **PIVOTAL_1E2},
    "all targets, pivotal 1e-2, rank 32": {**BASE, "lora_target_modules": ALL_TARGETS, **PIVOTAL_1E2, "rank": 32},
    "all targets, pivotal 1e-2, lr 3e-3": {
        **BASE,
        "lora_target_modules": ALL_TARGETS,
        **PIVOTAL_1E2,
        "learning_rate": 3e-3,
    },
    "all targets, pivotal 1e-2, alpha 16": {
        **BASE,
        "lora_target_modules": ALL_TARGETS,
        **PIVOTAL_1E2,
        "lora_alpha": 16,
    },
    "pivotal 3e-2": {**BASE, **PIVOTAL, "text_encoder_lr": 3e-2},
    "all targets, TE LoRA + MLP 1e-3": {**BASE, "lora_target_modules": ALL_TARGETS, **TE_MLP, "text_encoder_lr": 1e-3},
    "all targets, TE LoRA + MLP 3e-3": {**BASE, "lora_target_modules": ALL_TARGETS, **TE_MLP, "text_encoder_lr": 3e-3},
    "all targets, rank 16, TE LoRA + MLP 1e-3": {
        **BASE,
        "lora_target_modules": ALL_TARGETS,
        **TE_MLP,
        "text_encoder_lr": 1e-3,
        "rank": 16,
    },
    "all targets, TE LoRA + MLP 1e-3, prior weight 0.5": {
        **BASE,
        "lora_target_modules": ALL_TARGETS,
        **TE_MLP,
        "text_encoder_lr": 1e-3,
        "prior_loss_weight": 0.5,
    },
    "all targets, pivotal 1e-2, prior weight 0.5": {
        **BASE,
        "lora_target_modules": ALL_TARGETS,
        **PIVOTAL_1E2,
        "prior_loss_weight": 0.5,
    },
    "all targets, pivotal 1e-2, prior weight 0.25": {
        **BASE,
        "lora_target_modules": ALL_TARGETS,
        **PIVOTAL_1E2,
        "prior_loss_weight": 0.25,
    },
    "no prior": {**BASE, "with_prior_preservation": False},
    "no prior, all targets": {**BASE, "lora_target_modules": ALL_TARGETS, "with_prior_preservation": False},
    "no prior, all targets, pivotal 1e-2": {
        **BASE,
        "lora_target_modules": ALL_TARGETS,
        **PIVOTAL_1E2,
        "with_prior_preservation": False,
    },
    "full, pivotal 1e-2": {"adapter": "full", "train_text_encoder": False, **PIVOTAL_1E2},
    "full, no TE": {"adapter": "full", "train_text_encoder": False},
}
VARIANTS.update(COMBINATIONS)

#: Keys of each run's record in results.json and the table's columns; `prior_kept` is prior over the base model's.
COLUMNS = [*JUDGED_COLUMNS, ("train_seconds", "train s"), ("seconds", "run s")]
BASE_FIGURES = "base model (no training)"


# One run, in its own process


def run_variant(task: dict) -> None:
    """Train one (variant, seed) in segments and judge after each, rewriting `task["result_path"]` as points come."""
    result = dict(
        name=task["name"],
        seed=task["seed"],
        overrides=task["overrides"],
        status="running",
        curve=[],
        final={},
        error=None,
        seconds=0.0,
        train_seconds=0.0,
        identifier=None,
        device=task["device"],
    )
    start = time.perf_counter()
    try:
        _write_json(task["result_path"], result)
        if task["name"] == BASE_FIGURES:
            result["final"] = _base_model_figures(task)
        else:
            _train_and_judge(task, result)
        result["status"] = "done"
    except Exception:
        result["status"] = "failed"
        result["error"] = traceback.format_exc()[-4000:]
    result["seconds"] = time.perf_counter() - start
    _write_json(task["result_path"], result)


def _set_up_device(device: str) -> None:
    """One torch thread; refuse `cuda` without a GPU rather than train on the CPU unnoticed."""
    import torch

    torch.set_num_threads(1)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("`--device cuda`, but torch sees no GPU.")


def _base_model_figures(task: dict) -> dict:
    """The untouched base model's binding, drift and all-three accuracy: the denominator of "prior kept"."""
    from reproduce_dreambooth import base_model_figures

    _set_up_device(task["device"])
    return base_model_figures(task["seed"], task["base_model"])


def _train_and_judge(task: dict, result: dict) -> None:
    """Train in segments of `eval_every` steps, each resuming the last checkpoint; judge after each into `result`."""
    _set_up_device(task["device"])
    from reproduce_dreambooth import (
        judge_binding_and_drift,
        judge_paper_metrics,
        judge_prior,
        judge_recontext,
        segment_config,
        write_subject_photos_for_run,
    )

    from diffusers_dreambooth import DreamBoothTrainer
    from diffusers_dreambooth.families.stable_diffusion import StableDiffusionFamily
    from diffusers_dreambooth.toy import CHECKER_DIR, SUBJECT_PROMPT
    from diffusers_dreambooth.toy.checker import ToyChecker

    overrides = dict(task["overrides"])
    text_encoder_targets = overrides.pop("text_encoder_lora_targets", None)
    if text_encoder_targets:  # this process trains one run: the class attribute is its setting alone
        StableDiffusionFamily.text_encoder_lora_target_modules = tuple(text_encoder_targets.split(","))
    run_dir = Path(task["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    data, instance_images = write_subject_photos_for_run(run_dir, overrides)
    checker = ToyChecker.from_pretrained(CHECKER_DIR).eval()
    steps, every, seed = task["steps"], task["eval_every"], task["seed"]
    pipeline = None
    for step in [*range(every, steps, every), steps]:
        config = segment_config(run_dir, task["base_model"], data, overrides, seed, step, every, last=step == steps)
        trainer = DreamBoothTrainer(config)
        train_start = time.perf_counter()
        pipeline = trainer.train()
        segment_seconds = time.perf_counter() - train_start
        result["train_seconds"] += segment_seconds
        identifier = trainer.config.identifier or "sks"
        subject_prompt = SUBJECT_PROMPT.replace("sks", identifier)
        judge_start = time.perf_counter()
        point = dict(step=step, **judge_binding_and_drift(pipeline, checker, subject_prompt, seed))
        if step == steps or step % task["prior_every"] == 0:  # 144 images: 60% of the judging
            point["prior"] = judge_prior(pipeline, checker, seed)
        point.update(judge_recontext(pipeline, checker, subject_prompt, seed))
        point.update(train_seconds=segment_seconds, judge_seconds=time.perf_counter() - judge_start)
        result["identifier"] = identifier
        result["curve"].append(point)
        _write_json(task["result_path"], result)
    result["final"] = dict(
        result["curve"][-1], **judge_paper_metrics(pipeline, checker, instance_images, result["identifier"], seed)
    )


def _write_json(path: str | Path, value: dict) -> None:
    """Write atomically, so the parent never reads half a file."""
    path = Path(path)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    temporary.replace(path)


# The sweep: one process per run, `workers` at once


def worker_environment(device: str) -> dict[str, str]:
    """One thread per process; `cpu` hides the GPU so that accelerate trains on the CPU."""
    environment = dict(os.environ)
    environment.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    if device == "cpu":
        environment.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    return environment


def expected_cost(task: dict) -> float:
    """A run's rough cost relative to the base variant's (CPU, one thread), to start the longest runs first."""
    overrides = task["overrides"]
    if task["name"] == BASE_FIGURES:  # short, and every run's "prior kept" needs it
        return 10.0
    if overrides.get("adapter", "full") == "full":
        return 1.5
    cost = 1.0 + 0.15 * bool(overrides.get("train_text_encoder")) + 0.3 * bool(overrides.get("use_dora"))
    cost += 0.3 * ("conv" in (overrides.get("lora_target_modules") or "")) + 0.1 * (overrides.get("rank", 8) >= 32)
    return cost


def run_sweep(tasks: list[dict], workers: int, device: str, time_limit: float | None) -> list[dict]:
    """Run `tasks` as separate processes, the longest first; return one record per task, failed or timed out ones
    included, in the order of `tasks`."""
    environment = worker_environment(device)
    start = time.perf_counter()
    pending, running, records = sorted(tasks, key=expected_cost, reverse=True), {}, []
    while pending or running:
        while pending and len(running) < workers:
            task = pending.pop(0)
            Path(task["log_path"]).parent.mkdir(parents=True, exist_ok=True)
            Path(task["task_path"]).write_text(json.dumps(task, indent=2), encoding="utf-8")
            with open(task["log_path"], "w", encoding="utf-8") as log:
                command = [sys.executable, str(Path(__file__).resolve()), "--run_task", task["task_path"]]
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
            running[process] = (task, time.perf_counter())
        time.sleep(0.5)
        out_of_time = time_limit is not None and time.perf_counter() - start > time_limit
        for process, (task, started) in list(running.items()):
            if process.poll() is None and not out_of_time:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
            del running[process]
            record = _collect(task, process.returncode, time.perf_counter() - started, out_of_time)
            records.append(record)
            _print_progress(record, len(records), len(tasks), time.perf_counter() - start)
        if out_of_time:
            for task in pending:
                records.append(_record_of(task, status="not started", error="`--time_limit` reached"))
            pending = []
    order = {(task["name"], task["seed"]): index for index, task in enumerate(tasks)}
    return sorted(records, key=lambda record: order[record["name"], record["seed"]])


def _record_of(task: dict, **fields) -> dict:
    record = dict(name=task["name"], seed=task["seed"], overrides=task["overrides"], curve=[], final={})
    record.update(fields)
    return record


def _collect(task: dict, returncode: int, seconds: float, out_of_time: bool) -> dict:
    """The run's own record, or one that says how its process ended (killed, crashed) with its log's tail."""
    path = Path(task["result_path"])
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else _record_of(task)
    if record.get("status") in (None, "running"):
        log_tail = Path(task["log_path"]).read_text(encoding="utf-8", errors="replace")[-3000:]
        reason = "timed out (`--time_limit`)" if out_of_time else f"process exited with code {returncode}"
        record.update(status="timed out" if out_of_time else "failed", error=f"{reason}\n{log_tail}")
        record["seconds"] = seconds
    return record


def _print_progress(record: dict, done: int, total: int, elapsed: float) -> None:
    last = record["curve"][-1] if record.get("curve") else record.get("final", {})
    figures = ", ".join(f"{key} {last[key]:.2f}" for key in ("binding", "drift", "prior") if key in last)
    step = f" at step {last['step']}" if "step" in last else ""
    print(
        f"[{elapsed:5.0f} s] {done}/{total} {record['name']} seed {record['seed']}: {record['status']}"
        f" ({record.get('seconds', 0):.0f} s){step} {figures}",
        flush=True,
    )
    if record["status"] != "done" and record.get("error"):
        print("    " + record["error"].strip().splitlines()[-1][:300], flush=True)


# Tables and plots


def base_priors(records: list[dict]) -> dict[int, float]:
    """The base model's all-three accuracy per seed, the denominator of "prior kept"."""
    return {r["seed"]: r["final"]["prior"] for r in records if r["name"] == BASE_FIGURES and r["status"] == "done"}


def with_prior_kept(point: dict, seed: int, priors: dict[int, float]) -> dict:
    base = priors.get(seed) or (statistics.mean(priors.values()) if priors else None)
    return dict(point, prior_kept=point["prior"] / base if base and "prior" in point else None)


def variant_names(records: list[dict]) -> list[str]:
    """Variants in `VARIANTS` order, then any others (`--define`, merged files) in the order first seen."""
    seen = list(dict.fromkeys(r["name"] for r in records if r["name"] != BASE_FIGURES))
    return [name for name in VARIANTS if name in seen] + [name for name in seen if name not in VARIANTS]


def table(records: list[dict]) -> str:
    """One row per variant: the last judged step's figures, mean ± standard deviation over the seeds that finished."""
    priors = base_priors(records)
    lines = [
        "| variant | seeds | steps | " + " | ".join(label for _, label in COLUMNS) + " |",
        "| --- | --- | --- |" + " --- |" * len(COLUMNS),
    ]
    base = [r for r in records if r["name"] == BASE_FIGURES and r["status"] == "done"]
    if base:
        cells = {"binding": [r["final"]["binding"] for r in base], "drift": [r["final"]["drift"] for r in base]}
        cells["prior_kept"] = [1.0] * len(base)
        row = " | ".join(mean_spread(cells[key]) if key in cells else "" for key, _ in COLUMNS)
        lines.append(f"| {BASE_FIGURES} | {len(base)} | 0 | {row} |")
    for name in variant_names(records):
        runs = [r for r in records if r["name"] == name]
        judged = [r for r in runs if r.get("curve")]
        statuses = ", ".join(f"{r['seed']}: {r['status']}" for r in runs if r["status"] != "done")
        if not judged:
            lines.append(f"| {name} | {statuses} | | " + " | ".join("" for _ in COLUMNS) + " |")
            continue
        finals = [with_prior_kept({**r["curve"][-1], **r["final"]}, r["seed"], priors) for r in judged]
        for final, run in zip(finals, judged):
            final.update(train_seconds=run.get("train_seconds"), seconds=run.get("seconds"))
        cells = []
        for key, _ in COLUMNS:
            values = [final[key] for final in finals if final.get(key) is not None]
            cells.append(mean_spread(values) if values else "")
        seeds = f"{len([r for r in runs if r['status'] == 'done'])} of {len(runs)}" + (
            f" ({statuses})" if statuses else ""
        )
        steps = sorted({r["curve"][-1]["step"] for r in judged})
        lines.append(f"| {name} | {seeds} | {'/'.join(map(str, steps))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(records: list[dict], metric: str) -> str:
    """`metric` (mean over seeds) at each judged step, one row per variant."""
    priors = base_priors(records)
    names = [name for name in variant_names(records) if any(r["name"] == name and r.get("curve") for r in records)]
    if not names:
        return ""
    steps = sorted({p["step"] for r in records if r["name"] in names for p in r["curve"]})
    lines = [f"| {metric} at step | " + " | ".join(map(str, steps)) + " |", "| --- |" + " --- |" * len(steps)]
    for name in names:
        curves = [r for r in records if r["name"] == name and r.get("curve")]
        cells = []
        for step in steps:
            values = [
                with_prior_kept(p, r["seed"], priors)[metric] for r in curves for p in r["curve"] if p["step"] == step
            ]
            values = [v for v in values if v is not None]
            cells.append(f"{statistics.mean(values):.2f}" if values else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curve(records: list[dict], name: str, metric: str) -> tuple[list[int], list[float]]:
    """Steps where `metric` was judged, and its mean over seeds there."""
    points = [p for r in records if r["name"] == name for p in r.get("curve", []) if p.get(metric) is not None]
    steps = sorted({p["step"] for p in points})
    return steps, [statistics.mean(p[metric] for p in points if p["step"] == step) for step in steps]


def best_variants(records: list[dict], count: int) -> list[str]:
    """LoRA variants with the highest final binding (mean over seeds) among those whose drift stays <= 0.1."""
    scores = {}
    for name in variant_names(records):
        if name in (BASE_NAME, REFERENCE_NAME):
            continue
        finals = [r["curve"][-1] for r in records if r["name"] == name and r.get("curve")]
        if finals and statistics.mean(f["drift"] for f in finals) <= 0.1:
            scores[name] = statistics.mean(f["binding"] for f in finals)
    return sorted(scores, key=scores.get, reverse=True)[:count]


def plot(records: list[dict], names: list[str], path: Path) -> None:
    """Binding and drift against training steps for `names`, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, metric, title in (
        (axes[0], "binding", 'binding: "a photo of [V] star" judged the subject'),
        (axes[1], "drift", 'drift: "a photo of a star" judged the subject'),
    ):
        for name in names:
            steps, means = mean_curve(records, name, metric)
            if steps:
                style = "--" if name in (BASE_NAME, REFERENCE_NAME) else "-"
                axis.plot(steps, means, style, marker="o", markersize=3, label=name)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("training steps")
        axis.set_ylim(-0.05, 1.05)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_all(records: list[dict], path: Path) -> None:
    """One small panel per variant: binding, drift and prior kept against steps, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    priors = base_priors(records)
    names = [name for name in variant_names(records) if any(r["name"] == name and r.get("curve") for r in records)]
    if not names:
        return
    columns = 5
    rows = (len(names) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), sharex=True, sharey=True)
    axes = [axes] if rows * columns == 1 else list(getattr(axes, "flat", axes))
    for axis, name in zip(axes, names):
        kept = [dict(r, curve=[with_prior_kept(p, r["seed"], priors) for p in r["curve"]]) for r in records]
        for metric, colour in (("binding", "tab:blue"), ("drift", "tab:red"), ("prior_kept", "tab:green")):
            if metric == "prior_kept" and not priors:
                continue
            steps, means = mean_curve(kept, name, metric)
            axis.plot(steps, means, color=colour, marker="o", markersize=2, label=metric)
        axis.set_title(name, fontsize=7)
        axis.set_ylim(-0.05, 1.05)
        axis.grid(alpha=0.3)
    for axis in axes[len(names) :]:
        axis.set_visible(False)
    axes[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# Command line


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="Default: all of VARIANTS and --define.")
    parser.add_argument(
        "--define",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "JSON"),
        help="A further variant: JSON overrides on top of the base variant's (repeatable).",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument(
        "--prior_every",
        type=int,
        help="Judge the prior (144 images) every N steps and at the end only. Default: at every judged step.",
    )
    parser.add_argument("--workers", type=int, default=1, help="Runs at once, each a process of one torch thread.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--time_limit", type=float, help="Seconds; then stop what runs and keep its judged points.")
    parser.add_argument("--output_dir", default="benchmarks/results/lora-binding")
    parser.add_argument("--work_dir", help="Checkpoints, class images, logs. Default: <output_dir>/runs.")
    parser.add_argument("--base_model", help="Default: the bundled toy base model.")
    parser.add_argument("--merge", nargs="+", default=[], metavar="RESULTS_JSON", help="Earlier results to add.")
    parser.add_argument("--plot_variants", nargs="+", metavar="NAME", help="Default: old default, reference, best 3.")
    parser.add_argument("--run_task", help=argparse.SUPPRESS)  # a worker process: the task file to run
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    if args.run_task:
        run_variant(json.loads(Path(args.run_task).read_text(encoding="utf-8")))
        return
    variants = dict(VARIANTS)
    for name, overrides in args.define:
        variants[name] = {**BASE, **json.loads(overrides)}
    names = args.variants or list(variants)
    unknown = [name for name in names if name not in variants]
    if unknown:
        raise SystemExit(f"Unknown variants {unknown}; known: {list(variants)}")
    if args.eval_every < 1 or args.steps < 1:
        raise SystemExit("`--steps` and `--eval_every` must be positive.")
    if args.base_model is None:
        from diffusers_dreambooth.toy import BASE_MODEL_DIR

        args.base_model = str(BASE_MODEL_DIR)
    output_dir = Path(args.output_dir)
    work_dir = Path(args.work_dir) if args.work_dir else output_dir / "runs"
    output_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for seed in args.seeds:  # every variant's first seed first, so a first look at the log comes early
        for name in [BASE_FIGURES, *names]:
            run_name = f"{slug(name)}-seed{seed}"
            tasks.append(
                dict(
                    name=name,
                    seed=seed,
                    overrides=variants.get(name, {}),
                    steps=args.steps,
                    eval_every=args.eval_every,
                    prior_every=args.prior_every or args.eval_every,
                    device=args.device,
                    base_model=args.base_model,
                    run_dir=str(work_dir / run_name),
                    task_path=str(work_dir / "tasks" / f"{run_name}.json"),
                    result_path=str(work_dir / "tasks" / f"{run_name}-result.json"),
                    log_path=str(work_dir / "logs" / f"{run_name}.log"),
                )
            )
    (work_dir / "tasks").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = run_sweep(tasks, args.workers, args.device, args.time_limit)
    elapsed = time.perf_counter() - start
    command = f"python {shlex.join(sys.argv)}"
    for path in args.merge:
        records += json.loads(Path(path).read_text(encoding="utf-8"))["runs"]
    summary = dict(command=command, seconds=elapsed, workers=args.workers, device=args.device, runs=records)
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    markdown = "\n\n".join(
        part for part in (table(records), curve_table(records, "binding"), curve_table(records, "drift")) if part
    )
    (output_dir / "table.md").write_text(markdown + "\n", encoding="utf-8")
    plotted = args.plot_variants or [BASE_NAME, REFERENCE_NAME, *best_variants(records, 3)]
    try:
        plot(records, plotted, output_dir / "binding_drift.png")
        plot_all(records, output_dir / "all_curves.png")
    except ImportError as error:  # matplotlib: the `bench` extra
        print(f"No plots ({error}); `pip install matplotlib`.")
    print(markdown)
    done = sum(r["status"] == "done" for r in records)
    print(f"\n{done} of {len(records)} runs done, {elapsed:.0f} s ({args.workers} workers, {args.device}); {command}")


if __name__ == "__main__":
    main()
