"""Model cards for UniME checkpoints (`README.md`), and pushing a checkpoint with its card to the Hub.

The card is rendered from the config alone, so it always describes the files next to it:

* metadata (`huggingface_hub.ModelCardData`): `library_name: transformers`, `pipeline_tag:
  feature-extraction`, tags (`unime`, `embeddings`, `multimodal`, the backbone's `model_type`,
  `sentence-transformers`), `base_model`, `datasets`, `license` and a `model-index` of the evaluation
  results, each only when known;
* what the model is, copy-paste usage for transformers and sentence-transformers, the input
  formatting, training details and evaluation results.

Training and evaluation information are plain JSON data in the config, filled in by the training
code (`training/publishing.py`) and carried from stage to stage by `save_pretrained`:

* `config.unime_training = {"base_model": str, "license": str, "stages": [stage, ...]}`, each stage a
  dict with `stage` (`"distillation"` or `"hard_negative"`, or any name) and optionally `datasets`
  (list of Hub ids or paths), `steps`, `epochs`, `num_examples`, `teacher`, `hyperparameters` (dict)
  and further keys, rendered as they are.
* `config.unime_eval_results = {task: {metric: fraction}}`, the format of `training.evaluation.write_results`.

Why `feature-extraction`: the model's output is an embedding for text, image or image+text inputs,
and text is always part of its input (the prompt template). `image-feature-extraction` would
advertise image-only inputs, and `sentence-similarity` is the tag for `library_name:
sentence-transformers` models.

A README.md is generated only where none was written by a person: a file is regenerated when it
carries `GENERATED_MARKER` (our cards) or is transformers' placeholder card; any other README.md, in
a local directory or already on the Hub, is kept. Delete the marker line from a generated card to
keep your edits.
"""

import re
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_unime import UniMEConfig

GENERATED_MARKER = "<!-- unime: generated model card; delete this line to keep your edits on the next save -->"
# First sentence of the card transformers' `push_to_hub` creates when a repo has none.
TRANSFORMERS_PLACEHOLDER_CARD = "This is the model card of a 🤗 transformers model that has been pushed on the Hub."
LOCAL_MODEL_ID = "path/to/this/checkpoint"
PIPELINE_TAG = "feature-extraction"
TRAINING_ATTRIBUTE = "unime_training"
EVAL_ATTRIBUTE = "unime_eval_results"
PAPER_URL = "https://arxiv.org/abs/2504.17432"

FAMILY_NAMES = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
}
STAGE_TITLES = {
    "distillation": "Stage 1: textual discriminative knowledge distillation",
    "hard_negative": "Stage 2: hard-negative-enhanced instruction tuning",
}
STAGE_FIELDS = ("stage", "datasets", "teacher", "num_examples", "steps", "epochs", "hyperparameters")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

CITATION = """@article{gu2025unime,
  title   = {Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs},
  author  = {Gu, Tiancheng and Yang, Kaicheng and Feng, Ziyong and Wang, Xingjun and Zhang, Yanzhao and
             Long, Dingkun and Chen, Yingda and Cai, Weidong and Deng, Jiankang},
  journal = {arXiv preprint arXiv:2504.17432},
  year    = {2025}
}"""


def is_hub_id(name):
    """`True` for `owner/name` strings that are not local paths (only those go into card metadata)."""
    return isinstance(name, str) and bool(_HUB_ID.match(name)) and not Path(name).exists()


def is_generated_card(text):
    """`True` if a README.md was generated (by us or transformers) and may be replaced."""
    return GENERATED_MARKER in text or TRANSFORMERS_PLACEHOLDER_CARD in text


def training_record(config):
    """`config.unime_training` checked for shape: `{"stages": [...], ...}` (empty when absent)."""
    record = getattr(config, TRAINING_ATTRIBUTE, None) or {}
    where = f"config.{TRAINING_ATTRIBUTE}"
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a dict like {{'stages': [...]}}, got {type(record).__name__}")
    stages = record.get("stages", [])
    if not isinstance(stages, list):
        raise ValueError(f"{where}['stages'] must be a list of dicts, got {type(stages).__name__}")
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("stage"), str):
            raise ValueError(f"{where}['stages'][{index}] must be a dict with a 'stage' name, got {stage!r}")
    return record


def eval_results(config):
    """`config.unime_eval_results` checked for shape: `{task: {metric: number}}` (empty when absent)."""
    results = getattr(config, EVAL_ATTRIBUTE, None) or {}
    where = f"config.{EVAL_ATTRIBUTE}"
    if not isinstance(results, dict):
        raise ValueError(f"{where} must be a dict {{task: {{metric: value}}}}, got {type(results).__name__}")
    for task, metrics in results.items():
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
            raise ValueError(f"{where}[{task!r}] must map metric names to numbers, got {metrics!r}")
    return results


def base_model_of(config):
    """The backbone's Hub id: `unime_training["base_model"]`, else the backbone config's `name_or_path`."""
    candidates = [training_record(config).get("base_model")]
    if config.backbone_config is not None:
        candidates.append(getattr(config.backbone_config, "_name_or_path", None))
    return next((name for name in candidates if is_hub_id(name)), None)


def card_data(config, model_id=None):
    """The card's YAML metadata as `ModelCardData`."""
    record = training_record(config)
    datasets = [name for stage in record.get("stages", []) for name in stage.get("datasets", []) or []]
    datasets = list(dict.fromkeys(name for name in datasets if is_hub_id(name)))
    base_model = base_model_of(config)
    model_name = _model_name(model_id)
    results = [
        EvalResult(task_type=PIPELINE_TAG, task_name=task, dataset_type=task, dataset_name=task,
                   metric_type=metric, metric_name=metric, metric_value=value)
        for task, metrics in eval_results(config).items() for metric, value in metrics.items()
    ]
    backbone_type = config.backbone_config.model_type if config.backbone_config is not None else None
    tags = ["unime", "embeddings", "multimodal", backbone_type, "sentence-transformers"]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=[tag for tag in tags if tag],
        base_model=base_model if base_model != model_id else None,
        datasets=datasets or None,
        license=record.get("license"),
        model_name=model_name if results else None,  # `model-index` needs a name; nothing else does
        eval_results=results or None,
    )


def _model_name(model_id):
    return model_id.rstrip("/").split("/")[-1] if model_id and model_id != LOCAL_MODEL_ID else "UniME embedding model"


def build_model_card(config, model_id=None):
    """Render the model card of a UniME checkpoint.

    Args:
        config ([`UniMEConfig`]): the checkpoint's config (training and evaluation records included).
        model_id (`str`, *optional*): Hub id or path used in the usage snippets; `LOCAL_MODEL_ID`
            (a placeholder to replace) when not known, as for a local save.

    Returns:
        `huggingface_hub.ModelCard`.
    """
    model_id = model_id or LOCAL_MODEL_ID
    data = card_data(config, model_id)
    sections = [
        GENERATED_MARKER,
        f"# {_model_name(model_id)}",
        _introduction(config),
        _usage(config, model_id),
        _model_details(config),
        _training(config),
        _evaluation(config),
        "## Citation\n\n```bibtex\n" + CITATION + "\n```",
    ]
    body = "\n\n".join(section for section in sections if section) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_model_card(config, directory, model_id=None):
    """Write `build_model_card(config, model_id)` to `directory/README.md` unless a person wrote that file.

    Returns:
        The path written, or `None` when an existing hand-written README.md was kept.
    """
    path = Path(directory) / "README.md"
    if path.exists() and not is_generated_card(path.read_text(encoding="utf-8")):
        return None
    build_model_card(config, model_id).save(path)
    return path


def load_checkpoint_config(folder):
    """The `UniMEConfig` of a saved checkpoint folder."""
    return UniMEConfig.from_pretrained(folder)


def _introduction(config):
    family = FAMILY_NAMES.get(config.backbone_family, config.backbone_family)
    base = base_model_of(config)
    backbone = f"[{base}](https://huggingface.co/{base}) ({family})" if base else f"a {family} backbone"
    return (
        f"A [UniME]({PAPER_URL}) universal multimodal embedding model built on {backbone}. It maps text, "
        f"images and interleaved image+text inputs into one {config.text_hidden_size}-dimensional space, "
        "so any of them can be compared with cosine similarity (text-to-image and image-to-text retrieval, "
        "composed image+text queries, MMEB-style instruction tasks).\n\n"
        "UniME (Gu et al., 2025) trains a multimodal LLM in two stages: textual discriminative knowledge "
        "distillation from a strong text-embedding teacher, then hard-negative-enhanced instruction tuning. "
        "The embedding is the final hidden state of the last token of a prompt template that asks the "
        "model to summarise its input in one word."
    )


def _usage(config, model_id):
    dim = config.text_hidden_size
    transformers_snippet = f'''```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

model_id = "{model_id}"
model = AutoModel.from_pretrained(model_id, trust_remote_code=True)  # dtype="bfloat16" on a GPU
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)

image = Image.new("RGB", (336, 336), "red")  # or Image.open("photo.jpg")
embeddings = model.encode(
    ["a red square", image, {{"image": image, "text": "What colour is this?"}}],
    processor=processor,
)
print(embeddings.shape)  # torch.Size([3, {dim}]), L2-normalised
print(model.similarity(embeddings[:1], embeddings[1:]))  # cosine similarity of the text to the others
```'''
    st_snippet = f'''```python
from PIL import Image
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{model_id}", trust_remote_code=True)
image = Image.new("RGB", (336, 336), "red")
embeddings = model.encode(["a red square", image, {{"image": image, "text": "What colour is this?"}}])
print(model.similarity(embeddings[:1], embeddings[1:]))
```'''
    return (
        "## Usage\n\n"
        "`trust_remote_code=True` runs the modeling code stored in this repository (`modeling_unime.py` and "
        "the files it imports); it needs only `torch`, `transformers` and `pillow`.\n\n"
        f"{transformers_snippet}\n\n"
        "`encode` takes any mix of texts, images (`PIL.Image` or `pathlib.Path`) and `{\"image\": ..., "
        "\"text\": ...}` dicts, batches them (`batch_size=32`) and returns a `[N, D]` float tensor in input "
        "order. For MMEB-style tasks pass the task instruction: `model.encode(queries, processor=processor, "
        "instruction=\"Find an image that matches the given caption.\")`.\n\n"
        "### sentence-transformers\n\n"
        "With `pip install \"sentence-transformers>=6\"` the same checkpoint gives the same embeddings:\n\n"
        f"{st_snippet}"
    )


def _model_details(config):
    family = FAMILY_NAMES.get(config.backbone_family, config.backbone_family)
    backbone_type = config.backbone_config.model_type if config.backbone_config is not None else "unknown"
    lines = [
        "## Model details",
        "",
        # A local or tiny base model is not a Hub id (so not in the metadata) but is still what was trained.
        f"- **Backbone:** {base_model_of(config) or training_record(config).get('base_model') or 'not recorded'} "
        f"({family}, `model_type: {backbone_type}`)",
        f"- **Embedding dimension:** {config.text_hidden_size}",
        "- **Pooling:** final hidden state of the last real token (the end of the prompt template)"
        + (", L2-normalised" if config.normalize else ", not normalised"),
        f"- **Maximum input length:** {config.max_sequence_length} tokens after formatting",
    ]
    templates = config.prompt_templates or {}
    for kind, label in (("text", "Text"), ("image", "Image"), ("fused", "Image+text")):
        if templates.get(kind):
            lines += ["", f"{label} prompt template{' (`<sent>` is the text)' if kind != 'image' else ''}:", "",
                      "```text", templates[kind], "```"]
    return "\n".join(lines)


def _training(config):
    stages = training_record(config).get("stages", [])
    if not stages:
        return ("## Training\n\nThis checkpoint records no UniME training (for example a released checkpoint "
                "wrapped with `UniMEModel.from_backbone`, or a model built from a config).")
    parts = ["## Training\n\nUniME training stages recorded for this checkpoint, in the order they ran:"]
    for number, stage in enumerate(stages, start=1):
        parts.append(_stage_section(number, stage))
    return "\n\n".join(parts)


def _stage_section(number, stage):
    title = STAGE_TITLES.get(stage["stage"], stage["stage"])
    lines = [f"### {number}. {title} (`{stage['stage']}`)", ""]
    if stage.get("datasets"):
        lines.append("- **Data:** " + ", ".join(_dataset_link(name) for name in stage["datasets"]))
    for key, label in (("teacher", "Teacher"), ("num_examples", "Training examples"), ("steps", "Optimizer steps"),
                       ("epochs", "Epochs")):
        if stage.get(key) is not None:
            lines.append(f"- **{label}:** {_format_value(stage[key])}")
    for key, value in stage.items():
        if key not in STAGE_FIELDS:
            lines.append(f"- **{key}:** {_format_value(value)}")
    hyperparameters = stage.get("hyperparameters") or {}
    if hyperparameters:
        lines += ["", "| hyper-parameter | value |", "| --- | --- |"]
        lines += [f"| {name} | {_format_value(value)} |" for name, value in hyperparameters.items()]
    return "\n".join(lines)


def _evaluation(config):
    results = eval_results(config)
    if not results:
        return ""
    lines = ["## Evaluation", "", "Scores from this project's evaluation harness (`training/evaluation.py`), in %."]
    for task, metrics in results.items():
        lines += ["", f"### {task}", "", "| metric | score (%) |", "| --- | ---: |"]
        lines += [f"| {metric} | {100 * value:.2f} |" for metric, value in metrics.items()]
    return "\n".join(lines)


def _dataset_link(name):
    return f"[{name}](https://huggingface.co/datasets/{name})" if is_hub_id(name) else f"`{name}`"


def _format_value(value):
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value).replace("|", "\\|")
