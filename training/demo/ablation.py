"""The demo's ablation: the shape of the paper's Table 3 (stages) and Tables 4-5 (false-negative
margin beta, number of hard negatives k) at toy scale, plus Matryoshka training off/on scored at
truncated sizes, every row over several seeds (mean ± std)."""

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
    ("stage 1 + 2, Matryoshka [16, 32, 64]", True, {"matryoshka_dims": [16, 32, 64]}),
)
REFERENCE_ROW = "stage 1 + 2 (k=8, β=0.1)"
# Matryoshka off (the reference row) against on, both scored at truncated sizes of the 64-dim embedding.
MATRYOSHKA_ROWS = (REFERENCE_ROW, "stage 1 + 2, Matryoshka [16, 32, 64]")
TRUNCATED_DIMS = (16, 32)
MATRYOSHKA_METRICS = ("MMEB avg P@1", "t2i R@1", "compositional acc")
# 24 stage-2 runs (8 rows x 3 seeds) must fit in about half an hour on 2 cores.
ABLATION_OVERRIDES = {"stage2_steps": 300}
FALSE_NEGATIVE_COLUMN = "FalseNeg%"


def _false_negative_share(history):
    """Mean share of queries with at least one filtered candidate over training (paper Table 4)."""
    values = [entry["rows_with_false_negatives_fraction"] for entry in history
              if "rows_with_false_negatives_fraction" in entry]
    return 100 * statistics.fmean(values) if values else 0.0


def run_seed(out_dir, settings, rows=ABLATION_ROWS):
    """All rows for one seed: `{row name: headline metrics (+ FalseNeg%, + metrics at TRUNCATED_DIMS)}`;
    stage 1 runs once per stage-1 setting (with or without Matryoshka) and is reused."""
    data, cache = prepare_data(out_dir, settings)
    stage1_states = {}
    results = {}
    for name, stage1, overrides in rows:
        row_settings = dataclasses.replace(settings, **(overrides or {}))
        model, processor = new_model(settings)
        if stage1:
            key = tuple(row_settings.matryoshka_dims or ())
            if key not in stage1_states:
                model, _ = run_stage1(model, processor, data, cache, out_dir / "stage1", row_settings)
                stage1_states[key] = copy.deepcopy(model.state_dict())
            model.load_state_dict(stage1_states[key])
        metrics = {}
        if overrides is not None:
            model, history = run_stage2(model, processor, data, out_dir / "stage2", row_settings)
            metrics[FALSE_NEGATIVE_COLUMN] = _false_negative_share(history)
        results_all = evaluate(model, processor, data, settings, truncate_dims=TRUNCATED_DIMS)
        metrics.update(headline(results_all))
        for dim in TRUNCATED_DIMS:
            metrics.update({truncated_column(column, dim): value
                            for column, value in headline(results_all, dim).items()})
        results[name] = metrics
        print(f"[seed {settings.seed}] {name}: {metrics}", flush=True)
    return results


def truncated_column(column, dim):
    """Table column of a headline metric scored on the first `dim` dimensions."""
    return f"{column} @{dim}"


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


def seed_results(out_dir, settings, rows=ABLATION_ROWS):
    """One seed's rows, computed once and kept in `<out_dir>/results.json` (so seeds can run as
    separate processes, e.g. one per core, and a later call only summarises)."""
    cached = out_dir / "results.json"
    if cached.is_file():
        stored = json.loads(cached.read_text())
        if stored["settings"] == dataclasses.asdict(settings) and list(stored["rows"]) == [r[0] for r in rows]:
            return stored["rows"]
    results = run_seed(out_dir, settings, rows)
    write_json(cached, {"settings": dataclasses.asdict(settings), "rows": results})
    return results


def run_ablation(out_dir, settings, seeds, rows=ABLATION_ROWS, overrides=ABLATION_OVERRIDES):
    """Run `rows` (default: all) for every seed, with `overrides` of `settings` (default: 300 stage-2
    steps); with 2+ seeds write `ablation.md` and `ablation.json` under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    # GradCache gives the same gradients (tests/test_gradcache.py), so the ablation skips it for speed.
    ablation_settings = dataclasses.replace(settings, gradcache_chunk_size=None, **overrides)
    per_seed = {seed: seed_results(out_dir / f"seed_{seed}", dataclasses.replace(ablation_settings, seed=seed), rows)
                for seed in seeds}
    if len(seeds) < 2:
        print(f"seed {seeds[0]} done; run again with all seeds (>= 2, 3 recommended) to get the table")
        return None
    summary = summarize(per_seed)
    columns = (*HEADLINE_COLUMNS, FALSE_NEGATIVE_COLUMN)
    for metrics in summary.values():
        metrics.setdefault(FALSE_NEGATIVE_COLUMN, (0.0, 0.0))
    label = f"row (mean ± std over seeds {list(seeds)})"
    table = markdown_table(summary, columns=columns, label=label)
    matryoshka = {row: summary[row] for row in MATRYOSHKA_ROWS if row in summary}
    if matryoshka:
        dims = (*TRUNCATED_DIMS, settings.hidden_size)
        for metrics in matryoshka.values():
            for column in MATRYOSHKA_METRICS:
                metrics[truncated_column(column, settings.hidden_size)] = metrics[column]
        matryoshka_columns = [truncated_column(column, dim) for column in MATRYOSHKA_METRICS for dim in dims]
        table += "\n\nMatryoshka off / on, scored on the first d dimensions re-normalised:\n\n" + markdown_table(
            matryoshka, columns=matryoshka_columns, label=label)
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
