"""Embed a corpus of texts, images and image+text items on 1 or N processes, in resumable shards.

    accelerate launch examples/encode_corpus.py --model my-unime --jsonl corpus.jsonl --output embeddings/
    accelerate launch --num_processes 8 examples/encode_corpus.py --model my-unime --dataset my/dataset \\
        --split train --image-column image --text-column caption --output embeddings/
    python examples/encode_corpus.py --model my-unime --folder photos/ --output embeddings/     # one process

Rows are cut into fixed shards of `--shard-size` consecutive rows; shard k is written, complete or not at
all, to `OUTPUT/shard-0000k.parquet` (columns `row`, `id`, `embedding`), and the processes share the
shards still missing. A re-run with the same arguments skips complete shards, so a crashed or killed run
resumes without encoding a row twice or losing one, and the embeddings do not depend on the number of
processes. `OUTPUT/manifest.json` records what was encoded; a re-run that would mix settings is refused.

Inputs: `--jsonl` (one JSON object per line; `--text-column`, `--image-column` paths relative to
`--image-root`, default the file's folder), `--folder` (every image file, sorted; a `.txt` file with the
same name adds text), or `--dataset` (a `datasets` Hub id / local dataset folder; image columns may hold
images or paths). `--id-column` names the rows (default: the row number).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from modeling_unime import UniMEModel, UniMEProcessor  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class Corpus:
    """Rows of `(id, text or None, image or None)`, read lazily by row range."""

    def __init__(self, args):
        self.text_column, self.image_column = args.text_column, args.image_column
        if args.jsonl:
            path = Path(args.jsonl)
            if not path.is_file():
                raise FileNotFoundError(f"--jsonl {path}: no such file")
            self.rows = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
            self.image_root = Path(args.image_root) if args.image_root else path.parent
        elif args.folder:
            folder = Path(args.folder)
            if not folder.is_dir():
                raise FileNotFoundError(f"--folder {folder}: no such directory")
            files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            self.rows = [{"id": p.relative_to(folder).as_posix(), "image": p.relative_to(folder).as_posix(),
                          "text": p.with_suffix(".txt").read_text(encoding="utf-8").strip()
                          if p.with_suffix(".txt").is_file() else None} for p in files]
            self.text_column, self.image_column, args.id_column = "text", "image", "id"
            self.image_root = folder
        else:
            import datasets

            source = Path(args.dataset)
            self.rows = (datasets.load_from_disk(str(source)) if (source / "dataset_info.json").is_file()
                         or (source / "state.json").is_file() else datasets.load_dataset(args.dataset, split=args.split))
            self.image_root = Path(args.image_root) if args.image_root else Path.cwd()
        self.id_column = args.id_column
        if not len(self.rows):
            raise ValueError("the corpus has no rows")
        columns = (self.rows.column_names if hasattr(self.rows, "column_names")
                   else set().union(*(row.keys() for row in self.rows)))
        for flag, column in (("--text-column", self.text_column), ("--image-column", self.image_column),
                             ("--id-column", self.id_column)):
            if column and column not in columns:
                raise ValueError(f"{flag} {column!r} is not a column of the corpus (columns: {sorted(columns)})")

    def __len__(self):
        return len(self.rows)

    def items(self, start, stop):
        """`(ids, items)` of rows `[start, stop)`: items are `encode` inputs (str, PIL.Image or dict)."""
        ids, items = [], []
        for row_number in range(start, stop):
            row = self.rows[row_number]
            text = row.get(self.text_column) if self.text_column else None
            image = row.get(self.image_column) if self.image_column else None
            if isinstance(image, str):
                path = self.image_root / image
                if not path.exists():
                    raise FileNotFoundError(f"row {row_number}: image {path} not found")
                with Image.open(path) as opened:
                    image = opened.convert("RGB")
            if not text and image is None:
                raise ValueError(f"row {row_number} has neither text ({self.text_column!r}) nor image "
                                 f"({self.image_column!r})")
            items.append({"image": image, "text": text} if text and image is not None else (text or image))
            ids.append(str(row[self.id_column]) if self.id_column else str(row_number))
        return ids, items


def shard_path(output, index):
    return output / f"shard-{index:05d}.parquet"


def write_shard(path, start, ids, embeddings):
    """Write one shard to a temp file and rename it: a shard file is complete or absent."""
    dimension = embeddings.shape[1]
    table = pa.table({
        "row": pa.array(range(start, start + len(ids)), pa.int64()),
        "id": pa.array(ids, pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), pa.float32()), dimension),
    })
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def check_manifest(output, settings, accelerator):
    """Write `manifest.json` on the first run; refuse a re-run whose settings differ."""
    manifest = output / "manifest.json"
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            manifest.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    recorded = json.loads(manifest.read_text(encoding="utf-8"))
    changed = sorted(key for key in settings.keys() | recorded.keys() if settings.get(key) != recorded.get(key))
    if changed:
        raise ValueError(f"{output} holds embeddings made with other settings ({', '.join(changed)}: "
                         f"{[recorded.get(k) for k in changed]} there, {[settings.get(k) for k in changed]} now); "
                         "use another --output or delete it")


def load_model(args, device):
    dtype = getattr(torch, args.dtype)
    if args.backbone:
        model, processor = UniMEModel.from_backbone(args.backbone, dtype=dtype), UniMEProcessor.from_backbone(args.backbone)
    else:
        model, processor = UniMEModel.from_pretrained(args.model, dtype=dtype), UniMEProcessor.from_pretrained(args.model)
    return model.to(device).eval(), processor


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="saved UniME checkpoint (directory or Hub id)")
    model.add_argument("--backbone", help="released UniME / backbone *ForConditionalGeneration checkpoint")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--jsonl", help="JSON-lines file, one row per line")
    data.add_argument("--folder", help="folder of images (a same-name .txt adds text)")
    data.add_argument("--dataset", help="datasets Hub id or local dataset folder")
    parser.add_argument("--split", default="train", help="split of --dataset")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--id-column", help="column naming each row (default: the row number)")
    parser.add_argument("--image-root", help="folder image paths are relative to")
    parser.add_argument("--output", required=True, help="folder of the shards")
    parser.add_argument("--shard-size", type=int, default=10_000, help="rows per shard file")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompt-style", default="summary", choices=["summary", "instruction"])
    parser.add_argument("--instruction", help="MMEB-style instruction put before every item")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.shard_size < 1 or args.batch_size < 1:
        parser.error("--shard-size and --batch-size must be positive")
    if args.text_column == "":
        args.text_column = None
    if args.image_column == "":
        args.image_column = None
    return args


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    corpus = Corpus(args)
    output = Path(args.output)
    settings = {"model": args.model or args.backbone, "source": args.jsonl or args.folder or args.dataset,
                "split": args.split if args.dataset else None, "num_rows": len(corpus), "shard_size": args.shard_size,
                "text_column": corpus.text_column, "image_column": corpus.image_column, "id_column": corpus.id_column,
                "prompt_style": args.prompt_style, "instruction": args.instruction, "dtype": args.dtype}
    check_manifest(output, settings, accelerator)
    num_shards = -(-len(corpus) // args.shard_size)
    missing = [k for k in range(num_shards) if not shard_path(output, k).exists()]
    accelerator.wait_for_everyone()  # every process lists the missing shards before any is written
    mine = missing[accelerator.process_index::accelerator.num_processes]
    model, processor = load_model(args, accelerator.device)

    rows_mine = sum(min(args.shard_size, len(corpus) - k * args.shard_size) for k in mine)
    started = time.perf_counter()
    with tqdm(total=rows_mine, unit="item", desc=f"encode (process {accelerator.process_index})",
              disable=not accelerator.is_local_main_process) as progress:
        for k in mine:
            start = k * args.shard_size
            ids, items = corpus.items(start, min(start + args.shard_size, len(corpus)))
            embeddings = model.encode(items, processor=processor, batch_size=args.batch_size, show_progress_bar=False,
                                      prompt_style=args.prompt_style, instruction=args.instruction, device="cpu")
            write_shard(shard_path(output, k), start, ids, embeddings.numpy())
            progress.update(len(items))
    elapsed = time.perf_counter() - started
    totals = accelerator.reduce(torch.tensor([rows_mine, len(mine)], device=accelerator.device), reduction="sum")
    elapsed = accelerator.gather(torch.tensor([elapsed], device=accelerator.device)).max().item()  # the slowest
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rows, shards = (int(x) for x in totals.tolist())
        complete = sum(shard_path(output, k).exists() for k in range(num_shards))
        print(f"encoded {rows} rows in {shards} shards on {accelerator.num_processes} process(es) in {elapsed:.1f} s "
              f"({rows / max(elapsed, 1e-9):.1f} items/s); skipped {num_shards - len(missing)} complete shards; "
              f"{complete}/{num_shards} shards ({len(corpus)} rows) in {output}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
