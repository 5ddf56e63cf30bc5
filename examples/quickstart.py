"""Quickstart: encode text and an image with UniME and print their similarity.

Runs offline on a tiny random Qwen2-VL backbone by default; pass `--backbone PATH_OR_ID` to wrap a
real checkpoint (e.g. DeepGlint-AI/UniME-LLaVA-OneVision-7B) instead.
"""

import argparse

from PIL import Image
from sklearn.datasets import load_sample_images

from modeling_unime import UniMEModel, UniMEProcessor


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default=None, help="backbone checkpoint (local dir or Hub id)")
    args = parser.parse_args()
    if args.backbone:
        model = UniMEModel.from_backbone(args.backbone)
        processor = UniMEProcessor.from_backbone(args.backbone)
    else:
        from training.demo.tiny_models import tiny_unime

        model, processor = tiny_unime("qwen2_vl")
    photo = Image.fromarray(load_sample_images().images[0]).resize((112, 84))
    texts = ["a Chinese temple", "a flower"]
    text_embeddings = model.encode(texts, processor=processor)
    image_embeddings = model.encode([photo], processor=processor)
    scores = model.similarity(text_embeddings, image_embeddings)
    for text, score in zip(texts, scores[:, 0].tolist()):
        print(f"similarity(image, {text!r}) = {score:+.4f}")


if __name__ == "__main__":
    main()
