"""Tables, plot and reload check of the demo run (kept apart from the training steps)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

HEADLINE_COLUMNS = ("MMEB avg P@1", "t2i R@1", "i2t R@1", "compositional acc")


def markdown_table(rows, columns=HEADLINE_COLUMNS, label="model"):
    """`{row name: {column: value or (mean, std)}}` -> a Markdown table (values in %)."""
    lines = [f"| {label} | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, values in rows.items():
        cells = []
        for column in columns:
            value = values[column]
            cells.append(f"{value[0]:.1f} ± {value[1]:.1f}" if isinstance(value, tuple) else f"{value:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_run(histories, phase_results, path):
    """PNG: stage-1 KD loss and teacher correlation, stage-2 loss and similarities, metrics per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    _curves(axes[0], histories.get("stage 1", []), ["loss", "kd_similarity_pearson"], "Stage 1: distillation")
    _curves(axes[1], histories.get("stage 2", []),
            ["loss", "mean_positive_similarity", "mean_hard_negative_similarity"], "Stage 2: hard negatives")
    names = list(phase_results)
    width = 0.8 / max(len(names), 1)
    for offset, name in enumerate(names):
        values = [phase_results[name][column] for column in HEADLINE_COLUMNS]
        axes[2].bar([i + offset * width for i in range(len(HEADLINE_COLUMNS))], values, width, label=name)
    axes[2].set_xticks([i + 0.4 - width / 2 for i in range(len(HEADLINE_COLUMNS))])
    axes[2].set_xticklabels(HEADLINE_COLUMNS, rotation=15, fontsize=8)
    axes[2].set_ylabel("%")
    axes[2].set_title("Held-out evaluation")
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _curves(axis, history, keys, title):
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, label=key)
    axis.set_xlabel("step")
    axis.set_title(title)
    axis.legend(fontsize=8)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    for _name in ("modeling_unime", "training"):  # as if this project were not installed
        sys.modules[_name] = None
    from transformers import AutoModel, AutoProcessor
    directory, items_file, out = sys.argv[1:4]

    def item(entry):
        if "image" not in entry:
            return entry["text"]
        return {"image": Path(entry["image"]), "text": entry["text"]} if "text" in entry else Path(entry["image"])

    items = [item(entry) for entry in json.loads(open(items_file).read())]
    model = AutoModel.from_pretrained(directory, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    torch.save(model.encode(items, processor=processor), out)
    """
)


def _item_record(item):
    """A JSON-able record of an encode item given as str, Path or {"image": Path, "text": str}."""
    if isinstance(item, str):
        return {"text": item}
    if isinstance(item, dict):
        return {"image": str(Path(item["image"]).resolve()), "text": item["text"]}
    return {"image": str(Path(item).resolve())}


def reload_in_fresh_process(checkpoint, items, expected, work_dir):
    """Load `checkpoint` with `AutoModel.from_pretrained(..., trust_remote_code=True)` in a new Python
    process that cannot import this project, embed `items` (texts, image paths, or
    `{"image": path, "text": str}`), and return the max abs difference to `expected`."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    script, items_file, out = work_dir / "reload.py", work_dir / "items.json", work_dir / "reloaded.pt"
    script.write_text(RELOAD_SCRIPT)
    items_file.write_text(json.dumps([_item_record(item) for item in items]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work_dir / "modules"),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run([sys.executable, str(script), str(Path(checkpoint).resolve()), str(items_file), str(out)],
                            cwd=work_dir, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"reloading {checkpoint} in a fresh process failed:\n{result.stderr[-3000:]}")
    return (torch.load(out, weights_only=True) - expected).abs().max().item()


def write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
