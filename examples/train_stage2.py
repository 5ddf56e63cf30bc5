"""UniME stage 2: hard-negative-enhanced instruction tuning on MMEB-train (DESIGN.md §4.2).

    # tiny offline run on CPU (seconds)
    python examples/train_stage2.py --config examples/configs/stage2_tiny.yaml

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
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from trl import TrlParser  # noqa: E402

from modeling_unime import UniMEModel, UniMEProcessor  # noqa: E402
from training.hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer  # noqa: E402
from training.mmeb_data import MMEBCollator, load_mmeb_train, missing_image_files  # noqa: E402

TINY_PREFIX = "tiny:"
logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    dataset: str = field(metadata={"help": "MMEB-train pairs: Hub id (TIGER-Lab/MMEB-train), a folder of subset "
                                           "tables, a table file or a save_to_disk folder."})
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
    dtype: str | None = field(default=None, metadata={"help": "Weight dtype: float32, bfloat16, float16 (default: "
                                                               "the checkpoint's / float32)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa or flash_attention_2."})


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
                            num_sample_per_subset=script_args.num_sample_per_subset, seed=script_args.sample_seed)
    if script_args.check_image_files:
        check_images(train, script_args)
    collator = MMEBCollator(processor, image_root=script_args.image_root, image_size=training_args.image_size,
                            chunk_size=training_args.gradcache_chunk_size, skip_bad_images=script_args.skip_bad_images,
                            max_length=training_args.max_length, max_tokens_per_chunk=training_args.gradcache_max_tokens)
    trainer = UniMEHardNegativeTrainer(model=model, args=training_args, processor=processor, train_dataset=train,
                                       data_collator=collator)
    trainer.train()  # also writes the merged model to <output_dir>/merged (save_merged_model)
    trainer.save_model(training_args.output_dir)  # LoRA adapters + processor
    if trainer.num_skipped_pairs:
        logger.warning("skipped %d pairs with bad images on this process", trainer.num_skipped_pairs)
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, HardNegativeConfig))
    main(*parser.parse_args_and_config())
