"""What a trained subject is: identifier, class noun, prompts and how it was trained, kept in `dreambooth.json`.

The file sits beside the weights (a full pipeline folder or a LoRA file) and is all `DreamBoothPipeline` needs to
know which base model to load, how to apply the weights, and what `{subject}` in a prompt stands for.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

SUBJECT_FILE_NAME = "dreambooth.json"
#: The sub-folder of a cascade's subject (DeepFloyd IF) that holds its trained super-resolution stage.
SUPER_RESOLUTION_FOLDER = "stage_2"
SUBJECT_PLACEHOLDER = "{subject}"
#: `{subject_1}`, `{subject_2}`, ...: a subject by its place in `--concepts_list`.
NUMBERED_SUBJECT = re.compile(r"\{subject_(\d+)\}")


@dataclass
class Subject:
    """One trained subject: `identifier` ("sks") and `class_noun` ("dog") as they appear in `instance_prompt`."""

    identifier: str
    class_noun: str | None
    instance_prompt: str
    class_prompt: str | None = None

    @property
    def phrase(self) -> str:
        """How prompts name the subject: "sks dog" (the identifier alone when there is no class noun)."""
        return f"{self.identifier} {self.class_noun}" if self.class_noun else self.identifier

    @classmethod
    def from_prompts(
        cls, instance_prompt: str, class_prompt: str | None = None, identifier: str | None = None
    ) -> Subject:
        """Find identifier and class noun in the prompts, as DreamBooth writes them ("a [V] [class noun]").

        With `identifier` known (`--identifier`), the class noun is the word after it. Otherwise the identifier is the
        first word of `instance_prompt` that `class_prompt` lacks, and the class noun the word after it; without a
        class prompt, the identifier is the second-to-last word and the class noun the last.
        """
        words = instance_prompt.split()
        if not words:
            raise ValueError("The instance prompt is empty; write it as `a photo of <identifier> <class noun>`.")
        class_words = {w.lower() for w in prompt_words(class_prompt or "")}
        index = next((i for i, w in enumerate(words) if _strip(w).lower() not in class_words), None)
        if identifier is not None:  # compared without punctuation, kept as given (pivotal tuning's `<s0>`)
            index = next((i for i, w in enumerate(words) if _strip(w) == _strip(identifier)), None)
            if index is None:
                return cls(identifier, None, instance_prompt, class_prompt)
            class_noun = _strip(words[index + 1]) if index + 1 < len(words) else None
            return cls(identifier, class_noun or None, instance_prompt, class_prompt)
        elif class_prompt is None or index is None:
            index = max(len(words) - 2, 0)
        identifier = _strip(words[index])
        class_noun = _strip(words[index + 1]) if index + 1 < len(words) else None
        return cls(identifier, class_noun or None, instance_prompt, class_prompt)


@dataclass
class SubjectMetadata:
    """Everything `dreambooth.json` records about a trained subject."""

    subjects: list[Subject]
    adapter: str  # "full" or "lora"
    family: str
    pipeline_class: str
    base_model: str | None = None
    base_model_revision: str | None = None
    base_model_variant: str | None = None
    lora_weight_name: str | None = None
    #: Pivotal tuning (`--train_text_encoder_ti`): the embeddings file and the new tokens it holds, in order.
    textual_inversion_weight_name: str | None = None
    textual_inversion_tokens: list[str] = field(default_factory=list)
    sample_prompt: str | None = None
    sample_images: list[str] = field(default_factory=list)  # paths relative to the subject folder
    sample_grid: str | None = None  # path of the grid image, one row per prompt of `sample_grid_prompts`
    sample_grid_prompts: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The file names come from a `dreambooth.json` that may have been downloaded: they must stay in its folder.
        for name in [self.lora_weight_name, self.textual_inversion_weight_name, self.sample_grid, *self.sample_images]:
            check_relative_path(name, SUBJECT_FILE_NAME)

    def to_json_file(self, directory: str | os.PathLike) -> str:
        """Write `directory/dreambooth.json` atomically: a crash leaves the old record or the new, never half."""
        path = os.path.join(directory, SUBJECT_FILE_NAME)
        partial = f"{path}.partial"
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(partial, path)
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SubjectMetadata:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        values["subjects"] = [Subject(**subject) for subject in values.get("subjects", [])]
        return cls(**values)


def check_relative_path(name: str | None, source: str) -> None:
    """Raise if `name` (a file name read from `source`) is absolute or climbs out of its folder with `..`."""
    if name is None:
        return
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or PureWindowsPath(name).drive or not path.parts:
        raise ValueError(
            f"`{source}` names the file `{name}`, which is outside its folder; only relative paths inside it are"
            " allowed. The file was edited or comes from an untrusted source."
        )


def fill_subject(prompt: str, subjects: list[Subject], subject: Subject | None = None) -> str:
    """Replace `{subject}` with `subject`'s phrase (default: the first subject's), `{subject_N}` with the N-th
    subject's (from 1, in `--concepts_list` order: for identifiers `--identifier auto` picks), and `{name}` with a
    named subject's."""
    if not subjects or "{" not in prompt:
        return prompt
    prompt = prompt.replace(SUBJECT_PLACEHOLDER, (subject or subjects[0]).phrase)
    by_number = {str(number): named.phrase for number, named in enumerate(subjects, start=1)}
    prompt = NUMBERED_SUBJECT.sub(lambda match: by_number.get(match.group(1), match.group(0)), prompt)
    for named in subjects:
        prompt = prompt.replace("{" + named.identifier + "}", named.phrase)
    return prompt


def prompt_words(text: str) -> list[str]:
    """The words of a prompt with surrounding punctuation removed ("dog," -> "dog")."""
    return [_strip(w) for w in text.split()]


def _strip(word: str) -> str:
    return re.sub(r"^[^\w]+|[^\w]+$", "", word)
