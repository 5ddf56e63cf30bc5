"""Export a UniME model as its backbone's native checkpoint, for vLLM, sentence-transformers or transformers.

    python examples/export_for_serving.py --model my-unime --output my-unime-serving
    python examples/export_for_serving.py --backbone DeepGlint-AI/UniME-Qwen2-VL-2B --output unime-qwen2vl-serving
    python examples/export_for_serving.py --model my-unime --output out --push-to-hub me/my-unime-serving

The output loads with `AutoModelForImageTextToText`, `SentenceTransformer(out)` and
`vllm serve out --runner pooling` without remote code; see docs/serving.md.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from modeling_unime import UniMEModel, UniMEProcessor  # noqa: E402


def load_model(args):
    """(model, processor) from `--model` (a saved UniME checkpoint) or `--backbone` (a `*ForConditionalGeneration` one)."""
    dtype = getattr(torch, args.dtype)
    if args.backbone:
        return UniMEModel.from_backbone(args.backbone, dtype=dtype), UniMEProcessor.from_backbone(args.backbone)
    return UniMEModel.from_pretrained(args.model, dtype=dtype), UniMEProcessor.from_pretrained(args.model)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="saved UniME checkpoint (directory or Hub id)")
    source.add_argument("--backbone", help="released UniME / backbone *ForConditionalGeneration checkpoint")
    parser.add_argument("--output", required=True, help="directory to write (replaced once complete)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights")
    parser.add_argument("--push-to-hub", "--push_to_hub", metavar="REPO", help="also upload the export to this Hub repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    args = parser.parse_args(argv)

    model, processor = load_model(args)
    push = {"push_to_hub": True, "repo_id": args.push_to_hub, "private": args.private} if args.push_to_hub else {}
    output = model.save_for_serving(args.output, processor=processor, **push)
    config = json.loads((output / "config.json").read_text(encoding="utf-8"))
    print(f"wrote {output}: {config['architectures'][0]}, embedding dimension {model.config.text_hidden_size}"
          + (f", Matryoshka {config['matryoshka_dimensions']}" if config.get("is_matryoshka") else ""))
    for name in sorted(path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file()):
        print(f"  {name}")
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}")
    print(f"serve with: vllm serve {output} --runner pooling --convert embed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
