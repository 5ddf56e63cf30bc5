"""The demo's ablation: the shape of the paper's Table 3 (stages) and Tables 4-5 (false-negative
margin beta, number of hard negatives k) at toy scale, every row over several seeds (mean ± std)."""

import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

from .pipeline import (
    evaluate,
    headline,
    new_model,
    prepare_data,
    run_stage1,
    run_stage2,
)
from .report import HEADLINE_COLUMNS, markdown_table, write_json

# (row name, run stage 1, stage-2 overrides or None for no stage 2)
ABLATION_ROWS = (
    ("no training", False, None),
    ("stage 1 only", True, None),
    ("stage 2 only (k=8, β=0.1)", False, {}),
    ("stage 1 + 2 (k=8, β=0.1)", True, {}),
    ("stage 1 + 2, in-batch InfoNCE (all negatives, no filter)", True,
     {"num_hard_negatives": None, "false_negative_margin": None}),
    ("stage 1 + 2, k=8, no false-negative filter", True, {"false_negative_margin": None}),
    ("stage 1 + 2, k=2", True, {"num_hard_negatives": 2}),
    ("stage 1 + 2, k=32", True, {"num_hard_negatives": 32}),
    ("stage 1 + 2, β=0.0", True, {"false_negative_margin": 0.0}),
    ("stage 1 + 2, β=0.3", True, {"false_negative_margin": 0.3}),
)
REFERENCE_ROW = "stage 1 + 2 (k=8, β=0.1)"
# 24 stage-2 runs (8 rows x 3 seeds) must fit in about half an hour on 2 cores.
ABLATION_OVERRIDES = {"stage2_steps": 300}
FALSE_NEGATIVE_COLUMN = "FalseNeg%"


def _false_negative_share(history):
    """Mean share of queries with at least one filtered candidate over training (paper Table 4)."""
    values = [entry["rows_with_false_negatives_fraction"] for entry in history
              if "rows_with_false_negatives_fraction" in entry]
    return 100 * statistics.fmean(values) if values else 0.0


def run_seed(out_dir, settings, rows=ABLATION_ROWS):
    """All rows for one seed: `{row name: headline metrics (+ FalseNeg%)}`; stage 1 runs once and is reused."""
    data, cache = prepare_data(out_dir, settings)
    stage1_state = None
    if any(stage1 for _, stage1, _ in rows):
        model, processor = new_model(settings)
        model, _ = run_stage1(model, processor, data, cache, out_dir / "stage1", settings)
        stage1_state = copy.deepcopy(model.state_dict())
    results = {}
    for name, stage1, overrides in rows:
        model, processor = new_model(settings)
        if stage1:
            model.load_state_dict(stage1_state)
        metrics = {}
        if overrides is not None:
            row_settings = dataclasses.replace(settings, **overrides)
            model, history = run_stage2(model, processor, data, out_dir / "stage2", row_settings)
            metrics[FALSE_NEGATIVE_COLUMN] = _false_negative_share(history)
        metrics.update(headline(evaluate(model, processor, data, settings)))
        results[name] = metrics
        print(f"[seed {settings.seed}] {name}: {metrics}", flush=True)
    return results


def summarize(per_seed):
    """`{seed: {row: metrics}}` -> `{row: {metric: (mean, std)}}` (sample std over seeds)."""
    rows = next(iter(per_seed.values()))
    summary = {}
    for row, metrics in rows.items():
        summary[row] = {}
        for metric in metrics:
            values = [per_seed[seed][row][metric] for seed in per_seed]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[row][metric] = (statistics.fmean(values), spread)
    return summary


def seed_results(out_dir, settings):
    """One seed's rows, computed once and kept in `<out_dir>/results.json` (so seeds can run as
    separate processes, e.g. one per core, and a later call only summarises)."""
    cached = out_dir / "results.json"
    if cached.is_file():
        stored = json.loads(cached.read_text())
        if stored["settings"] == dataclasses.asdict(settings):
            return stored["rows"]
    rows = run_seed(out_dir, settings)
    write_json(cached, {"settings": dataclasses.asdict(settings), "rows": rows})
    return rows


def run_ablation(out_dir, settings, seeds):
    """Run every row for every seed; with 2+ seeds write `ablation.md` and `ablation.json` under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # GradCache gives the same gradients (tests/test_gradcache.py), so the ablation skips it for speed.
    ablation_settings = dataclasses.replace(settings, gradcache_chunk_size=None, **ABLATION_OVERRIDES)
    per_seed = {seed: seed_results(out_dir / f"seed_{seed}", dataclasses.replace(ablation_settings, seed=seed))
                for seed in seeds}
    if len(seeds) < 2:
        print(f"seed {seeds[0]} done; run again with all seeds (>= 2, 3 recommended) to get the table")
        return None
    summary = summarize(per_seed)
    columns = (*HEADLINE_COLUMNS, FALSE_NEGATIVE_COLUMN)
    for metrics in summary.values():
        metrics.setdefault(FALSE_NEGATIVE_COLUMN, (0.0, 0.0))
    table = markdown_table(summary, columns=columns, label=f"row (mean ± std over seeds {list(seeds)})")
    minutes = (time.time() - started) / 60
    text = "\n\n".join([
        "# UniME demo ablation",
        "Tiny random Qwen2-VL, demo data, held-out scenes; values in % as mean ± sample std over seeds. "
        "A difference between two rows smaller than their stds is not a real difference at this scale.",
        table, f"Total time {minutes:.1f} min.",
    ])
    (out_dir / "ablation.md").write_text(text + "\n", encoding="utf-8")
    write_json(out_dir / "ablation.json", {"per_seed": per_seed, "summary": summary,
                                           "settings": dataclasses.asdict(ablation_settings)})
    print("\n" + table)
    return summary
