"""examples/encode_corpus.py on 1 and 2 processes, a killed run resumed, and examples/search.py on the demo data."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.conftest import REPO_ROOT
from training.demo.data import build_demo_dataset
from training.demo.tiny_models import tiny_unime

ENCODE = str(REPO_ROOT / "examples" / "encode_corpus.py")
SEARCH = str(REPO_ROOT / "examples" / "search.py")
NUM_ROWS, SHARD_SIZE = 23, 5  # 5 shards, the last one short


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
    if loopback:
        env.setdefault("GLOO_SOCKET_IFNAME", loopback)
    return env


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stdout_lines(result):
    # deepspeed (installed for the ZeRO configs) logs its CPU fallback on import; that line is not ours.
    return [line for line in result.stdout.splitlines() if "real_accelerator.py" not in line]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny saved UniME checkpoint and a JSONL corpus from the demo scenes: text, image and image+text rows."""
    root = tmp_path_factory.mktemp("corpus")
    demo = build_demo_dataset(root / "demo", num_train_scenes=40, num_eval_scenes=10)
    scenes = [json.loads(line) for line in demo.scenes.read_text().splitlines()][:NUM_ROWS]
    rows = []
    for number, scene in enumerate(scenes):
        row = {"id": f"scene-{scene['scene_id']}"}
        if number % 3 != 1:
            row["text"] = scene["captions"][0]
        if number % 3 != 0:
            row["image"] = scene["image_path"]
        rows.append(row)
    (root / "corpus.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model, processor = tiny_unime("llava", seed=5)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return {"root": root, "rows": rows, "image_root": demo.image_root, "model": model, "processor": processor}


def encode_command(corpus, output, *extra):
    return [ENCODE, "--model", str(corpus["root"] / "model"), "--jsonl", str(corpus["root"] / "corpus.jsonl"),
            "--image-root", str(corpus["image_root"]), "--id-column", "id", "--output", str(output),
            "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--dtype", "float32", *extra]


def run(command, cwd, **kwargs):
    return subprocess.run(command, cwd=cwd, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, **kwargs)


def read_shards(output):
    tables = [pq.read_table(path) for path in sorted(output.glob("shard-*.parquet"))]
    rows = [r for t in tables for r in t.column("row").to_pylist()]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    embeddings = np.concatenate([np.stack(t.column("embedding").to_numpy(zero_copy_only=False)) for t in tables])
    return rows, ids, embeddings


@pytest.fixture(scope="module")
def one_process(corpus):
    output = corpus["root"] / "one"
    result = run([sys.executable, *encode_command(corpus, output)], cwd=corpus["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_one_process_writes_every_row_once_with_our_embeddings(corpus, one_process):
    output, result = one_process
    lines = _stdout_lines(result)
    assert len(lines) == 1 and lines[0].startswith("encoded 23 rows in 5 shards on 1 process(es) in ")
    assert lines[0].endswith(f"items/s); skipped 0 complete shards; 5/5 shards (23 rows) in {output}")
    assert "item/s" in result.stderr or "it/s" in result.stderr  # the progress bar
    rows, ids, embeddings = read_shards(output)
    assert rows == list(range(NUM_ROWS)) and ids == [row["id"] for row in corpus["rows"]]
    items = []
    for row in corpus["rows"]:
        image = Image.open(corpus["image_root"] / row["image"]).convert("RGB") if "image" in row else None
        items.append({"image": image, "text": row["text"]} if image and "text" in row else (row.get("text") or image))
    expected = corpus["model"].encode(items, processor=corpus["processor"])
    torch.testing.assert_close(torch.from_numpy(embeddings), expected, atol=1e-5, rtol=0)


def test_two_processes_give_exactly_the_one_process_embeddings(corpus, one_process):
    output = corpus["root"] / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *encode_command(corpus, output)]
    result = run(command, cwd=corpus["root"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in _stdout_lines(result) if line.startswith("encoded")][0].startswith(
        "encoded 23 rows in 5 shards on 2 process(es)")
    rows, ids, embeddings = read_shards(output)
    rows_1, ids_1, embeddings_1 = read_shards(one_process[0])
    assert rows == rows_1 == list(range(NUM_ROWS)) and ids == ids_1
    assert np.array_equal(embeddings, embeddings_1)


def test_killed_run_resumes_without_duplicates_or_gaps(corpus, one_process, tmp_path):
    # Row 13's image is a named pipe: opening it blocks, so the run is stuck inside shard 2 (rows 10-14)
    # after writing shards 0 and 1, and is killed there.
    image_root = tmp_path / "images"
    shutil.copytree(corpus["image_root"], image_root)
    blocked = image_root / corpus["rows"][13]["image"]
    blocked.unlink()
    os.mkfifo(blocked)
    command = [arg if arg != str(corpus["image_root"]) else str(image_root) for arg in encode_command(corpus, tmp_path / "out")]
    process = subprocess.Popen([sys.executable, *command], cwd=tmp_path, env=_env(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "out" / "shard-00001.parquet").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before reaching the pipe"
        time.sleep(0.2)
    time.sleep(1.0)
    assert process.poll() is None  # still blocked on row 13
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.parquet")) == ["shard-00000.parquet",
                                                                                 "shard-00001.parquet"]
    blocked.unlink()
    shutil.copy(corpus["image_root"] / corpus["rows"][13]["image"], blocked)

    result = run([sys.executable, *command], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoded 13 rows in 3 shards on 1 process(es)" in result.stdout
    assert "skipped 2 complete shards; 5/5 shards (23 rows)" in result.stdout
    rows, ids, embeddings = read_shards(tmp_path / "out")
    rows_1, ids_1, embeddings_1 = read_shards(one_process[0])
    assert rows == rows_1 and ids == ids_1 and np.array_equal(embeddings, embeddings_1)

    changed = run([sys.executable, *command[:-6], "--shard-size", "4", *command[-4:]], cwd=tmp_path)
    assert changed.returncode != 0
    assert "holds embeddings made with other settings (shard_size: [5] there, [4] now)" in changed.stderr


def test_search_returns_the_expected_neighbours(corpus, one_process):
    output = one_process[0]
    text_row, image_row = corpus["rows"][3], corpus["rows"][4]
    assert "image" not in text_row and "text" not in image_row
    for query in ([text_row["text"]], ["--image", str(corpus["image_root"] / image_row["image"])]):
        result = run([sys.executable, SEARCH, *query, "--index", str(output), "--model", str(corpus["root"] / "model"),
                      "--top-k", "3"], cwd=corpus["root"])
        assert result.returncode == 0, result.stderr[-3000:]
        lines = _stdout_lines(result)
        assert len(lines) == 3 and [line.split()[0] for line in lines] == ["1", "2", "3"]
        expected = text_row["id"] if query[0] != "--image" else image_row["id"]
        assert lines[0].split()[2] == expected and abs(float(lines[0].split()[1]) - 1.0) < 1e-4, lines
    assert (output / "faiss.index").is_file()
