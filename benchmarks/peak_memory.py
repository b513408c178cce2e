"""Peak memory of a whole DreamBooth run, per phase (issue #21): which phase holds the run's peak, and what it holds.

Each job is one `examples/train.py` run (`diffusers_dreambooth.cli.main` with the job's flags) in a fresh process,
whose trainer phases are wrapped to read, at every phase boundary, the peak since the last boundary and the memory
held then:

- on CPU, the resident set: the kernel's high-water mark `VmHWM`, reset at each boundary through Linux
  `/proc/self/clear_refs` (as `train_speed.py` does), and `VmRSS`;
- on CUDA, `torch.cuda.max_memory_allocated` (reset at each boundary) and `torch.cuda.memory_allocated`.

Phases nest (saving runs the samples, evaluation and card stages): each stretch of time counts toward the innermost
phase running, so a phase's peak is its own. The phases: `import` (Python, torch, diffusers and this package),
`load` (the base pipeline), `class_images`, `images`, `trainable` (freezing, LoRA adapters), `caching` (latents,
text embeddings), `set_aside` (idle modules), `optimizer`, `training` (the loop), `saving` (the final weights),
`samples`, `evaluation`, `card`, and `floor`: after the run, three bare steps of the trained modules on random
inputs of the step's shapes (`train_speed.FloorStep`: forward, MSE, backward, the run's optimizer), which is the
least a training step can hold with the run's caches and modules resident.

Usage:

    python benchmarks/peak_memory.py --output_json peak.json
    python benchmarks/peak_memory.py --adapters lora --prior off --steps 10   # one job
    python benchmarks/peak_memory.py --reference_dir /tmp/diffusers_reference  # and diffusers' scripts beside
    python benchmarks/peak_memory.py --prior on --our_flags="--prior_backward separate"  # with more of our flags

With `--reference_dir` (a folder holding diffusers' `examples/dreambooth/train_dreambooth.py` and
`train_dreambooth_lora.py`, which this repository does not ship), each job is also run by diffusers' script for its
adapter, in its own process, with the flags both take (`shared_flags`: same model, photos, resolution, batch, steps,
learning rate, rank, prior preservation, validation prompt and count), its own class images and output folder, and
`benchmarks/reference_stand_in/` on its `PYTHONPATH`: a benchmark-only `torchvision` with just the transforms they
use (no CPU torchvision is installable here). Its peak is `ru_maxrss` of its process (`os.wait4`), the same kernel
high-water mark as `VmHWM`; it has no phases, so its import peak is measured apart, from `script --help`. A run
counts only if it exits 0, writes its weights and prints a loss.

The model (`--model sd35m`, built once into `--cache_dir`) is a randomly initialised SD-format pipeline with a 36M
parameter UNet (SD 1.5's blocks at a fifth of the width), a 6M parameter VAE and a 12M parameter CLIP text encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusers_dreambooth"
INSTANCE_PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
PHASE_ORDER = (
    "import",
    "load",
    "class_images",
    "images",
    "trainable",
    "caching",
    "set_aside",
    "optimizer",
    "training",
    "saving",
    "samples",
    "evaluation",
    "card",
    "other",
    "floor",
)
#: Trainer methods wrapped as phases.
TRAINER_PHASES = {
    "_generate_class_images": "class_images",
    "_load_images": "images",
    "_set_up_trainable_modules": "trainable",
    "_build_caches": "caching",
    "_set_aside_idle_modules": "set_aside",
    "_set_up_optimization": "optimizer",
    "_run_loop": "training",
    "_save_final": "saving",
}
FINISHING_PHASES = {"write_samples": "samples", "write_evaluation": "evaluation", "write_card": "card"}

#: The SD-format model: SD 1.5's UNet blocks at a fifth of the width (36M parameters), a small VAE and CLIP.
SD35M_UNET = {
    "sample_size": 32,
    "block_out_channels": (64, 128, 256, 256),
    "layers_per_block": 2,
    "cross_attention_dim": 512,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
SD35M_VAE = {
    "sample_size": 256,
    "block_out_channels": (32, 64, 128, 128),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "scaling_factor": 0.18215,
}
SD35M_TEXT_ENCODER = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 512,
}


# Measuring (in the job's process)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


class PhaseMeter:
    """The peak and the held memory of each phase, read at every boundary; nested phases count as the inner one."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.stack = ["import"]
        self.peak_mib: dict[str, float] = {}
        self.end_mib: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()
        self.process_peak_mib = 0.0
        if not self.cuda:
            Path("/proc/self/clear_refs").write_text("5")  # fails loudly where the per-phase peak cannot be read
            self.process_peak_mib = _status_kib("VmHWM") / 1024  # the imports, before any reset

    def _read(self) -> tuple[float, float]:
        """(peak since the last boundary, held now) in MiB, then reset the peak."""
        if self.cuda:
            import torch

            peak, held = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return peak / 2**20, held / 2**20
        peak, held = _status_kib("VmHWM") / 1024, _status_kib("VmRSS") / 1024
        Path("/proc/self/clear_refs").write_text("5")
        return peak, held

    def boundary(self) -> None:
        """Close the stretch since the last boundary: it belongs to the innermost running phase."""
        phase = self.stack[-1]
        peak, held = self._read()
        self.peak_mib[phase] = max(self.peak_mib.get(phase, 0.0), peak)
        self.end_mib[phase] = held
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now
        self.process_peak_mib = max(self.process_peak_mib, peak)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.boundary()
        self.stack.append(name)
        try:
            yield
        finally:
            self.boundary()
            self.stack.pop()

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        method = getattr(owner, attribute)

        @functools.wraps(method)
        def measured(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return method(*args, **kwargs)

        setattr(owner, attribute, measured)


def run_job(args: argparse.Namespace) -> dict:
    """One `examples/train.py` job in this process, its phases measured; then the floor step."""
    meter = PhaseMeter(args.device)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    import torch

    from diffusers_dreambooth import cli, finishing
    from diffusers_dreambooth import trainer as trainer_module

    sys.path.insert(0, str(BENCHMARKS))
    from train_speed import FloorStep

    meter.boundary()  # the imports done; what follows outside any phase is `other`
    meter.stack = ["other"]
    if args.threads:
        torch.set_num_threads(args.threads)
    trainers = []
    original_init = trainer_module.DreamBoothTrainer.__init__

    def remember(self, *a, **k):
        original_init(self, *a, **k)
        trainers.append(self)

    trainer_module.DreamBoothTrainer.__init__ = remember
    for attribute, name in TRAINER_PHASES.items():
        meter.wrap(trainer_module.DreamBoothTrainer, attribute, name)
    meter.wrap(trainer_module, "load_base_pipeline", "load")
    for attribute, name in FINISHING_PHASES.items():  # `finish_subject` looks the stages up per call
        meter.wrap(finishing, attribute, name)
    logging.disable(logging.WARNING)
    start = time.perf_counter()
    cli.main(job_flags(args))
    seconds = time.perf_counter() - start
    meter.boundary()
    gc.collect()
    trainer = trainers[0]
    with meter.phase("floor"):
        floor = FloorStep(trainer, args.seed)
        for _ in range(3):
            floor(False)
    least = least_training_mib(trainer, floor.optimizer, meter.peak_mib["import"])
    return {
        "job": job_name(args),
        "flags": shlex.join(job_flags(args)),
        "device": args.device,
        "steps": args.steps,
        "seconds": seconds,
        "process_peak_mib": meter.process_peak_mib,
        "run_peak_mib": max(v for k, v in meter.peak_mib.items() if k != "floor"),
        "peak_mib": meter.peak_mib,
        "end_mib": meter.end_mib,
        "phase_seconds": meter.seconds,
        "unet_parameters": sum(p.numel() for p in trainer.family.denoiser.parameters()),
        "least_training_mib": least,
    }


def least_training_mib(trainer: Any, optimizer: Any, import_mib: float) -> float:
    """The least any training step of the job can hold, in MiB: the import, the denoiser's weights, and the gradients
    and optimizer state of the trained parameters (read from the optimizer after the floor steps; its 0-dim step
    counters left out). No activations, no other component, no allocator overhead: a bound, not an estimate."""
    import torch

    def size(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    weights = size(trainer.family.denoiser.parameters())
    gradients = size(trainer.trained_parameters)
    state = size(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    return import_mib + (weights + gradients + state) / 2**20


def job_flags(args: argparse.Namespace) -> list[str]:
    """The `examples/train.py` flags of the job (diffusers' flag names)."""
    return shared_flags(args) + our_flags(args)


def shared_flags(args: argparse.Namespace, outputs: Path | None = None) -> list[str]:
    """The job's flags that diffusers' `train_dreambooth(_lora).py` take too; `outputs`: where its writes go."""
    work = Path(args.work_dir)
    outputs = outputs or work
    flags = [
        f"--pretrained_model_name_or_path={args.model_dir}",
        f"--instance_data_dir={work / 'instance'}",
        f"--instance_prompt={INSTANCE_PROMPT}",
        f"--output_dir={outputs / 'output'}",
        f"--resolution={args.resolution}",
        "--train_batch_size=1",
        f"--max_train_steps={args.steps}",
        "--checkpointing_steps=500",
        f"--learning_rate={1e-4 if args.adapter == 'lora' else 5e-6}",
        f"--seed={args.seed}",
        "--mixed_precision=no",
    ]
    if args.adapter == "lora":
        flags.append("--rank=4")
    if args.with_prior_preservation:
        flags += [
            "--with_prior_preservation",
            f"--class_data_dir={outputs / 'class_images'}",
            f"--class_prompt={CLASS_PROMPT}",
            f"--num_class_images={args.num_class_images}",
            "--sample_batch_size=2",
        ]
    if args.samples:
        flags += [f"--validation_prompt={INSTANCE_PROMPT} on the beach", f"--num_validation_images={args.samples}"]
    else:
        flags.append("--num_validation_images=0")
    return flags


def our_flags(args: argparse.Namespace) -> list[str]:
    """The job's flags that only `examples/train.py` has: the adapter, sampling steps, the evaluation stage."""
    flags = [f"--adapter={args.adapter}", "--report_to=none", *shlex.split(args.our_flags)]
    if args.with_prior_preservation:
        flags.append(f"--prior_generation_steps={args.inference_steps}")
    if args.samples:
        flags.append(f"--validation_inference_steps={args.inference_steps}")
    if args.evaluate:
        from diffusers_dreambooth.toy import CHECKER_DIR

        flags += [
            "--evaluate",
            *([] if args.with_prior_preservation else [f"--class_prompt={CLASS_PROMPT}"]),  # PRES needs it
            f"--evaluation_dino_model={CHECKER_DIR}",
            f"--evaluation_clip_model={CHECKER_DIR}",
            "--evaluation_prompts",
            "a {subject} on the beach",
            "a red {subject}",
            "--evaluation_images_per_prompt=2",
        ]
    return flags


def job_name(args: argparse.Namespace) -> str:
    prior = "prior" if args.with_prior_preservation else "no prior"
    return f"{args.adapter}, {prior}, {args.steps} steps" + (f", {args.our_flags}" if args.our_flags else "")


# The jobs (in the parent process)


def sd35m_pipeline_dir(cache_dir: Path) -> Path:
    """The random `sd35m` pipeline, saved once under `cache_dir` and reused."""
    from train_speed import random_sd_pipeline_dir

    scheduler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return random_sd_pipeline_dir(
        cache_dir / "sd35m-random-init", SD35M_UNET, SD35M_VAE, SD35M_TEXT_ENCODER, scheduler, "about 200 MB"
    )


def write_photos(directory: Path, size: int, count: int = 4) -> None:
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(directory / f"photo_{index}.png")


def run_all(args: argparse.Namespace) -> list[dict]:
    """Every job in its own process; with `--reference_dir`, each followed by diffusers' script on the same job."""
    model = args.model_dir or str(sd35m_pipeline_dir(Path(args.cache_dir)))
    results = []
    with tempfile.TemporaryDirectory(prefix="peak_memory-") as tmp:
        for adapter in args.adapters:
            for prior in args.prior:
                for steps in args.steps_list:
                    work = Path(tmp) / f"{adapter}-{prior}-{steps}"
                    write_photos(work / "instance", args.resolution)
                    job = argparse.Namespace(**{**vars(args), "model_dir": model, "work_dir": str(work)})
                    job.adapter, job.steps, job.with_prior_preservation = adapter, steps, prior == "on"
                    result = run_our_job(job, work)
                    if args.reference_dir:
                        result["reference"] = run_reference_job(job, work / "reference")
                    results.append(result)
                    shutil.rmtree(work, ignore_errors=True)
    return results


def run_our_job(job: argparse.Namespace, work: Path) -> dict:
    """One `examples/train.py` job in a fresh `--job` process; its per-phase result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--job", f"--model_dir={job.model_dir}"]
    command += [f"--work_dir={work}", f"--adapter={job.adapter}", f"--steps={job.steps}"]
    command += [f"--{name}={getattr(job, name)}" for name in PASSED]
    command += ["--with_prior_preservation"] if job.with_prior_preservation else []
    command += ["--evaluate"] if job.evaluate else []
    output = work / "result.json"
    command.append(f"--output_json={output}")
    logging.warning("Running %s", shlex.join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode or not output.is_file():
        raise SystemExit(f"Job failed ({done.returncode}):\n" + _tail(done.stdout + done.stderr))
    return json.loads(output.read_text())


def _tail(text: str, lines: int = 15) -> str:
    """The last `lines` lines of a run's output, for its error."""
    return "\n".join(text.strip().splitlines()[-lines:])


# diffusers' own scripts on the same job (`--reference_dir`)


def reference_script(job: argparse.Namespace) -> Path:
    """diffusers' script for the job's adapter, in `--reference_dir`."""
    path = Path(job.reference_dir) / REFERENCE_SCRIPTS[job.adapter]
    if not path.is_file():
        raise SystemExit(f"`--reference_dir` has no {path.name} (diffusers' examples/dreambooth/{path.name}): {path}")
    return path


def reference_environment(device: str) -> dict[str, str]:
    """The environment of a reference run: the torchvision stand-in on `PYTHONPATH`, offline, on the job's device."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REFERENCE_STAND_IN), env.get("PYTHONPATH")) if p)
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def measured_run(command: list[str], env: dict[str, str]) -> tuple[int, float, float, str]:
    """Run `command` to its end: (exit code, peak RSS MiB of it and its waited-for children, seconds, output)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # ru_maxrss: the process's (and its children's) VmHWM, KiB
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        log.seek(0)
        return process.returncode, usage.ru_maxrss / 1024, seconds, log.read()


@functools.cache
def reference_import_mib(script: Path, device: str) -> float:
    """Peak RSS of `script --help`: Python and the script's imports, before any work."""
    code, peak, _, output = measured_run([sys.executable, str(script), "--help"], reference_environment(device))
    if code:
        raise SystemExit(f"{script.name} --help failed ({code}):\n" + _tail(output))
    return peak


def run_reference_job(job: argparse.Namespace, work: Path) -> dict:
    """diffusers' script on the job (same model, photos and flags; its own class images), in a fresh process."""
    script = reference_script(job)
    # --report_to: their default; accelerate skips it where tensorboard is not installed (here), as our `none`
    command = [sys.executable, str(script), *shared_flags(job, work), "--report_to=tensorboard"]
    logging.warning("Running %s", shlex.join(command))
    code, peak, seconds, output = measured_run(command, reference_environment(job.device))
    weights = work / "output" / REFERENCE_WEIGHTS[job.adapter]
    losses = re.findall(r"loss=([-+0-9.e]+)", output)
    if code or not weights.is_file() or not losses:
        raise SystemExit(f"{script.name} failed ({code}; weights written: {weights.is_file()}):\n" + _tail(output))
    return {
        "script": script.name,
        "command": shlex.join(command),
        "run_peak_mib": peak,
        "import_mib": reference_import_mib(script, job.device),
        "seconds": seconds,
        "last_loss": float(losses[-1]),
        "weights": str(weights.relative_to(work)),
    }


REFERENCE_SCRIPTS = {"lora": "train_dreambooth_lora.py", "full": "train_dreambooth.py"}
#: What each script writes at its end, the proof that it trained to the end.
REFERENCE_WEIGHTS = {"lora": "pytorch_lora_weights.safetensors", "full": "unet/diffusion_pytorch_model.safetensors"}
REFERENCE_STAND_IN = BENCHMARKS / "reference_stand_in"
PASSED = ("resolution", "device", "seed", "num_class_images", "inference_steps", "samples", "threads", "our_flags")


def table(results: list[dict]) -> str:
    """Per job: the whole run's peak, then each phase's peak / memory held at its end (MiB)."""
    phases = [p for p in PHASE_ORDER if any(p in r["peak_mib"] for r in results)]
    kind = "GPU MiB allocated" if results[0]["device"] == "cuda" else "RSS MiB"
    lines = [
        f"| job | run peak | {' | '.join(phases)} |",
        "|---|---|" + "---|" * len(phases),
    ]
    for r in results:
        cells = [f"{r['peak_mib'][p]:,.0f} / {r['end_mib'][p]:,.0f}" if p in r["peak_mib"] else "" for p in phases]
        lines.append(f"| {r['job']} | **{r['run_peak_mib']:,.0f}** | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"{kind}: each phase's peak / held at its end; run peak: every phase but `floor`.")
    return "\n".join(lines)


def side_by_side(results: list[dict]) -> str:
    """Per job: our whole-run peak against diffusers' script's, the ratio, and where each spends it (RSS MiB)."""
    lines = [
        "| job | ours: run peak | diffusers: run peak | ours / diffusers | ours: import | diffusers: import"
        " | ours: training | ours: after training | least training | least / diffusers | diffusers: last loss"
        " | ours / diffusers: seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = r["reference"]
        after = max(r["peak_mib"].get(p, 0.0) for p in ("saving", "samples", "evaluation", "card"))
        lines.append(
            f"| {r['job']} | {r['run_peak_mib']:,.0f} | {ref['run_peak_mib']:,.0f}"
            f" | **{r['run_peak_mib'] / ref['run_peak_mib']:.2f}x** | {r['peak_mib']['import']:,.0f}"
            f" | {ref['import_mib']:,.0f} | {r['peak_mib']['training']:,.0f} | {after:,.0f}"
            f" | {r['least_training_mib']:,.0f} | {r['least_training_mib'] / ref['run_peak_mib']:.2f}x"
            f" | {ref['last_loss']:.4f}"
            f" | {r['seconds']:.0f} / {ref['seconds']:.0f} |"
        )
    lines.append("")
    lines.append(
        "Ours: the `--job` process's VmHWM (reset per phase; `floor` left out). diffusers: `ru_maxrss` of the"
        " script's process (`os.wait4`); its import: the same of `script --help`. Least training: our import plus the"
        " denoiser's weights and the trained parameters' gradients and optimizer state (`least_training_mib`), which"
        " every step of either script holds at once."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", help="A pipeline folder; default: the random sd35m pipeline.")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--adapters", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    parser.add_argument("--prior", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--steps", dest="steps_list", nargs="+", type=int, default=[10, 30])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_class_images", type=int, default=4)
    parser.add_argument("--inference_steps", type=int, default=5, help="Of class images, samples and evaluation.")
    parser.add_argument("--samples", type=int, default=2, help="Card sample images (0: none).")
    parser.add_argument("--evaluate", action="store_true", help="Also the evaluation stage (the toy checker).")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default).")
    parser.add_argument(
        "--our_flags", default="", help="More examples/train.py flags for our runs, e.g. '--prior_backward separate'."
    )
    parser.add_argument(
        "--reference_dir",
        help="A folder with diffusers' examples/dreambooth/train_dreambooth.py and train_dreambooth_lora.py: run each"
        " job with them too (torchvision.transforms from benchmarks/reference_stand_in) and print the side by side.",
    )
    parser.add_argument("--output_json")
    # One job (the child process):
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", choices=("lora", "full"), help=argparse.SUPPRESS)
    parser.add_argument("--with_prior_preservation", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = parse_args(argv)
    if args.job:
        args.steps = args.steps_list[0]
        result = run_job(args)
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
        return
    results = run_all(args)
    print(table(results))
    if args.reference_dir:
        print()
        print(side_by_side(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
