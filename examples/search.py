"""Search embeddings written by examples/encode_corpus.py with a FAISS index.

    python examples/search.py "a red square" --index embeddings/ --model my-unime
    python examples/search.py --image query.png --index embeddings/ --model my-unime --top-k 10
    python examples/search.py "what colour is it?" --image query.png --index embeddings/ --model my-unime

The index (exact inner product over the L2-normalised embeddings, i.e. cosine similarity) is built from
the shards on first use and saved as `INDEX/faiss.index` with the row ids in `INDEX/faiss_ids.json`; it
is rebuilt when the shards change. Prints one line per hit: rank, score, row id.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_unime import UniMEModel, UniMEProcessor  # noqa: E402


def load_index(folder):
    """`(faiss.IndexFlatIP, ids)` for the shards in `folder`, cached next to them."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"--index {folder}: no manifest.json; run examples/encode_corpus.py first")
    settings = json.loads(manifest.read_text(encoding="utf-8"))
    shards = sorted(folder.glob("shard-*.parquet"))
    expected = -(-settings["num_rows"] // settings["shard_size"])
    if len(shards) != expected:
        raise ValueError(f"{folder} has {len(shards)} of {expected} shards; finish the run with encode_corpus.py")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in shards]
    index_file, ids_file = folder / "faiss.index", folder / "faiss_ids.json"
    if index_file.is_file() and ids_file.is_file():
        cached = json.loads(ids_file.read_text(encoding="utf-8"))
        if cached["shards"] == stamp:
            return faiss.read_index(str(index_file)), cached["ids"]
    tables = [pq.read_table(p) for p in shards]
    embeddings = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    faiss.write_index(index, str(index_file))
    ids_file.write_text(json.dumps({"shards": stamp, "ids": ids}), encoding="utf-8")
    return index, ids


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="?", help="query text")
    parser.add_argument("--image", help="query image (with a query text: an image+text query)")
    parser.add_argument("--index", required=True, help="folder written by encode_corpus.py")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="saved UniME checkpoint (the one that encoded the corpus)")
    model.add_argument("--backbone", help="released UniME / backbone *ForConditionalGeneration checkpoint")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if not args.query and not args.image:
        parser.error("give a query text, --image, or both")

    index, ids = load_index(args.index)
    dtype = getattr(torch, args.dtype)
    if args.backbone:
        model, processor = UniMEModel.from_backbone(args.backbone, dtype=dtype), UniMEProcessor.from_backbone(args.backbone)
    else:
        model, processor = UniMEModel.from_pretrained(args.model, dtype=dtype), UniMEProcessor.from_pretrained(args.model)
    image = None
    if args.image:
        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        image = Image.open(args.image).convert("RGB")
    item = {"image": image, "text": args.query} if image is not None and args.query else (args.query or image)
    query = model.encode([item], processor=processor).numpy().astype(np.float32)
    if query.shape[1] != index.d:
        raise ValueError(f"the model embeds in {query.shape[1]} dimensions but the index holds {index.d}")
    scores, positions = index.search(query, min(args.top_k, index.ntotal))
    for rank, (score, position) in enumerate(zip(scores[0], positions[0]), 1):
        print(f"{rank:>3}  {score:.4f}  {ids[position]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
