"""UniME stage 2: hard-negative-enhanced instruction tuning on MMEB-train (DESIGN.md §4.2).

    # tiny offline run on CPU (seconds), from stage 1's output (examples/configs/stage1_tiny.yaml)
    python examples/train_stage2.py --config examples/configs/stage2_tiny.yaml

    # your own pairs: a caption retrieving its image, paths relative to --image_root
    python examples/train_stage2.py --config examples/configs/stage2_tiny.yaml --dataset pairs.csv \
        --image_root images --query_text_column caption --positive_image_column image_file

    # continue an interrupted run from its latest checkpoint (or --resume_from_checkpoint <dir>/checkpoint-N)
    python examples/train_stage2.py --config examples/configs/stage2_tiny.yaml --resume_from_checkpoint true

    # the paper's recipe on 8 GPUs, starting from the merged stage-1 model
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml \
        examples/train_stage2.py --config examples/configs/stage2_paper_llava.yaml

Flow: load the model (the merged stage-1 checkpoint when given, else the backbone), load and mix
the MMEB-train subsets (capped per subset), check that the image files exist, train LoRA with the
hard-negative InfoNCE loss (GradCache when `gradcache_chunk_size` is set), save the adapters
(`<output_dir>`) and the merged model (`<output_dir>/merged`, loads with
`AutoModel.from_pretrained(..., trust_remote_code=True)`).
"""

import logging
from dataclasses import dataclass, field

import torch
from trl import TrlParser

from modeling_unime import UniMEModel, UniMEProcessor
from training.cli import absolute_if_local, parse_args_and_config
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from training.mmeb_data import MMEBCollator, load_mmeb_train, missing_image_files

TINY_PREFIX = "tiny:"
logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    dataset: str = field(metadata={"help": "Training pairs: Hub id (TIGER-Lab/MMEB-train), a folder of subset "
                                           "tables, a jsonl/json/csv/parquet file or a save_to_disk folder."})
    backbone: str | None = field(
        default=None, metadata={"help": "Backbone checkpoint (path or Hub id), or `tiny:<family>` for a tiny random "
                                        "offline model (e.g. tiny:qwen2_vl). Not needed with stage1_model."})
    stage1_model: str | None = field(
        default=None, metadata={"help": "Merged stage-1 UniME checkpoint (e.g. <stage-1 output_dir>/merged) to start "
                                        "from; the paper merges the stage-1 LoRA before stage 2."})
    image_root: str | None = field(default=None, metadata={"help": "Folder the record image paths are relative to."})
    subsets: list[str] | None = field(default=None, metadata={"help": "Subsets to mix (default: all in the source)."})
    dataset_split: str = field(default="train", metadata={"help": "MMEB-train: original or diverse_instruction."})
    num_sample_per_subset: int | None = field(
        default=None, metadata={"help": "Cap per subset (VLM2Vec; 50000 on the 20 subsets = the paper's 662k pairs)."}
    )
    sample_seed: int | None = field(default=0, metadata={"help": "Seed of the capped sample (None: first rows)."})
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "Skip (and count) pairs with a missing or unreadable image instead of failing."},
    )
    check_image_files: bool = field(
        default=True, metadata={"help": "Check before training that every referenced image file exists."}
    )
    query_text_column: str | None = field(default=None, metadata={"help": "Your table's query text column "
                                                                           "(MMEB: qry)."})
    query_image_column: str | None = field(default=None, metadata={"help": "Query image path column "
                                                                            "(MMEB: qry_image_path)."})
    positive_text_column: str | None = field(default=None, metadata={"help": "Positive text column (MMEB: pos_text)."})
    positive_image_column: str | None = field(default=None, metadata={"help": "Positive image path column "
                                                                               "(MMEB: pos_image_path)."})
    negative_text_column: str | None = field(default=None, metadata={"help": "Negative text column (accepted, not "
                                                                              "used: negatives are mined in the batch)."})
    negative_image_column: str | None = field(default=None, metadata={"help": "Negative image path column "
                                                                               "(accepted, not used)."})
    dtype: str | None = field(default=None, metadata={"help": "Weight dtype: float32, bfloat16, float16 (default: "
                                                               "the checkpoint's / float32)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa or flash_attention_2."})

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected one of {WEIGHT_DTYPES} or None")


WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


def load_model(args):
    """`(UniMEModel, UniMEProcessor)` from the stage-1 checkpoint, a backbone, or a tiny family."""
    kwargs = {key: value for key, value in (("dtype", getattr(torch, args.dtype) if args.dtype else None),
                                            ("attn_implementation", args.attn_implementation)) if value}
    if args.stage1_model:
        model = UniMEModel.from_pretrained(args.stage1_model, **kwargs)
        return model, UniMEProcessor.from_pretrained(args.stage1_model)
    if not args.backbone:
        raise ValueError("give --backbone (path, Hub id or tiny:<family>) or --stage1_model")
    if args.backbone.startswith(TINY_PREFIX):
        from training.demo.tiny_models import tiny_unime

        return tiny_unime(args.backbone[len(TINY_PREFIX):])
    return UniMEModel.from_backbone(args.backbone, **kwargs), UniMEProcessor.from_backbone(args.backbone)


COLUMN_ARGUMENTS = {"query_text_column": "qry", "query_image_column": "qry_image_path",
                    "positive_text_column": "pos_text", "positive_image_column": "pos_image_path",
                    "negative_text_column": "neg_text", "negative_image_column": "neg_image_path"}


def column_mapping(args):
    """`{MMEB field: column}` from the `--*_column` arguments; None when none is given (MMEB names)."""
    mapping = {field: getattr(args, name) for name, field in COLUMN_ARGUMENTS.items() if getattr(args, name)}
    return mapping or None


def check_images(train, args):
    missing = missing_image_files(train, args.image_root, limit=None if args.skip_bad_images else 5)
    if missing and not args.skip_bad_images:
        listed = "; ".join(f"{row}: {path}" for row, path in missing)
        raise ValueError(f"missing image files (first {len(missing)}): {listed}. Fix --image_root, or pass "
                         "--skip_bad_images to skip these pairs")
    if missing:
        logger.warning("%d image files are missing; their pairs will be skipped", len(missing))


def main(script_args, training_args):
    model, processor = load_model(script_args)
    train = load_mmeb_train(script_args.dataset, subsets=script_args.subsets, split=script_args.dataset_split,
                            num_sample_per_subset=script_args.num_sample_per_subset, seed=script_args.sample_seed,
                            columns=column_mapping(script_args))
    if script_args.check_image_files:
        check_images(train, script_args)
    collator = MMEBCollator(processor, image_root=script_args.image_root, image_size=training_args.image_size,
                            chunk_size=training_args.gradcache_chunk_size, skip_bad_images=script_args.skip_bad_images,
                            max_length=training_args.max_length, max_tokens_per_chunk=training_args.gradcache_max_tokens)
    trainer = UniMEHardNegativeTrainer(model=model, args=training_args, processor=processor, train_dataset=train,
                                       data_collator=collator)
    trainer.record_stage("hard_negative", datasets=[absolute_if_local(script_args.dataset)],
                         base_model=None if script_args.stage1_model else absolute_if_local(script_args.backbone),
                         start_model=absolute_if_local(script_args.stage1_model), subsets=script_args.subsets,
                         columns=column_mapping(script_args))
    # Records the stage in the model's config, then writes the merged model to <output_dir>/merged.
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # LoRA adapters + processor; with --push_to_hub, Trainer.save_model also pushes (the merged model, once).
    trainer.save_model(training_args.output_dir)
    if trainer.num_skipped_pairs:
        logger.warning("skipped %d pairs with bad images on this process", trainer.num_skipped_pairs)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, HardNegativeConfig))
    main(*parse_args_and_config(parser))
