"""Evaluate a UniME model: MMEB Precision@1, image-text Recall@K, compositional accuracy.

    python examples/evaluate.py --model my-unime --mmeb mmeb_eval/ --image-root images/ --output-dir results/
    python examples/evaluate.py --backbone DeepGlint-AI/UniME-LLaVA-OneVision-7B --retrieval flickr.jsonl ...
    python examples/evaluate.py --demo   # tiny random model on the built-in demo data (offline)
    python examples/evaluate.py --model outputs/unime-stage2-tiny/merged --mmeb ... --push-to-hub me/my-unime

Writes `results.json` and `results.md` to `--output-dir` and prints the Markdown table. With
`--push-to-hub REPO`, the results are recorded in the model's config (so its model card shows them
next to the training stages the trainers recorded) and the model (LoRA merged) is pushed, once.
"""

import argparse

import torch
from transformers import AutoModel, AutoProcessor

from modeling_unime import UniMEModel, UniMEProcessor
from training.demo.data import demo_suite_inputs
from training.eval_suite import evaluate_suite
from training.evaluation import write_results
from training.publishing import push_merged_model, record_eval_results


def load_model(args):
    dtype = getattr(torch, args.dtype)
    if args.backbone:
        return UniMEModel.from_backbone(args.backbone, dtype=dtype), UniMEProcessor.from_backbone(args.backbone)
    if args.model:
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=dtype)
        return model, AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    from training.demo.tiny_models import tiny_unime

    return tiny_unime("qwen2_vl")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="saved UniME checkpoint (dir or Hub id; loaded with trust_remote_code)")
    parser.add_argument("--backbone", help="backbone / released UniME *ForConditionalGeneration checkpoint")
    parser.add_argument("--demo", action="store_true", help="evaluate on the built-in demo data's eval split")
    parser.add_argument("--demo-dir", default="demo_output/data", help="where the demo data is built")
    parser.add_argument("--mmeb", help="MMEB-format dir or file (jsonl/parquet)")
    parser.add_argument("--retrieval", help="rows {image_path, captions[]} (jsonl/parquet)")
    parser.add_argument("--compositional", help="rows {image_path, caption, negative_caption, group}")
    parser.add_argument("--image-root", help="directory the image paths are relative to")
    parser.add_argument("--image-size", type=int, help="resize images to this square size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output-dir", default="eval_results")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="record the results in the model card and push "
                        "the model (LoRA merged) to this Hub repo")
    parser.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)

    model, processor = load_model(args)
    model.to(args.device)
    inputs = {"mmeb": args.mmeb, "retrieval": args.retrieval, "compositional": args.compositional,
              "image_root": args.image_root}
    if args.demo:
        from training.demo.data import build_demo_dataset

        inputs = demo_suite_inputs(build_demo_dataset(args.demo_dir))
    results = evaluate_suite(model, processor, image_size=args.image_size, batch_size=args.batch_size,
                             show_progress_bar=True, **inputs)
    _, markdown = write_results(results, args.output_dir)
    print(markdown.read_text())
    if args.push_to_hub:
        record_eval_results(model, results)
        commit = push_merged_model(model, processor, args.push_to_hub, private=args.hub_private or None,
                                   commit_message="Upload UniME model with evaluation results")
        print(f"pushed to {args.push_to_hub}: {getattr(commit, 'commit_url', commit)}")


if __name__ == "__main__":
    main()
