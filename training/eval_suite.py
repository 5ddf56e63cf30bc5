"""Run several evaluation tasks on one model: what `examples/evaluate.py`, the demo and the
training callback share."""

from .evaluation import (
    ReplayEncoder,
    encoder_from_model,
    evaluate_compositional,
    evaluate_mmeb,
    evaluate_retrieval,
    read_rows,
)

TASKS = ("mmeb", "retrieval", "compositional")


def evaluate_suite(model, processor, mmeb=None, retrieval=None, compositional=None, image_root=None,
                   image_size=None, batch_size=32, show_progress_bar=False, instructions=None, truncate_dims=None):
    """Evaluate `model` on the tasks given, at full dimension and at each Matryoshka dimension.

    Args:
        mmeb: anything `training.evaluation.load_mmeb_datasets` accepts (dir, file(s), or name -> rows).
        retrieval: rows `{"image_path", "captions"}` or a jsonl/parquet path.
        compositional: rows `{"image_path", "caption", "negative_caption", "group"}` or a path.
        image_root: directory the rows' image paths are relative to.
        image_size: resize images to this square size (e.g. 336) before encoding.
        instructions: `None` for the paper's summary prompts in retrieval and compositional tasks,
            or MMEB-style `{"image_query", "text_query", "image_target"}` (see `evaluate_retrieval`).
        truncate_dims: embedding sizes to score again, each as the first d dimensions re-normalised;
            default: the dims the model was trained at (`model.config.matryoshka_dims`), `()` for none.
            The full dimension is always scored; the embeddings are computed once.

    Returns:
        `{task: {metric: fraction}}` for the tasks given (fractions in [0, 1]) at full dimension,
        plus `{f"{task}@{d}": {metric: fraction}}` for every d in `truncate_dims` below it.
    """
    if mmeb is None and retrieval is None and compositional is None:
        raise ValueError("evaluate_suite needs at least one of mmeb=, retrieval=, compositional=")
    if truncate_dims is None:
        truncate_dims = getattr(getattr(model, "config", None), "matryoshka_dims", None) or ()
    encode_fn = ReplayEncoder(encoder_from_model(model, processor, batch_size=batch_size,
                                                 show_progress_bar=show_progress_bar))
    tasks = dict(mmeb=mmeb, retrieval=retrieval, compositional=compositional, image_root=image_root,
                 image_size=image_size, instructions=instructions)
    results = _run_tasks(encode_fn, **tasks)
    for dim in truncate_dims:
        if dim > encode_fn.dim:
            raise ValueError(f"truncate_dims: {dim} exceeds the embedding dimension {encode_fn.dim}")
        if dim < encode_fn.dim:
            for task, metrics in _run_tasks(encode_fn.at_dim(dim), **tasks).items():
                results[f"{task}@{dim}"] = metrics
    return results


def _run_tasks(encode_fn, mmeb, retrieval, compositional, image_root, image_size, instructions):
    results = {}
    if mmeb is not None:
        results["mmeb"] = evaluate_mmeb(mmeb, encode_fn, image_root=image_root, image_size=image_size)
    if retrieval is not None:
        rows = read_rows(retrieval) if not isinstance(retrieval, list) else retrieval
        results["retrieval"] = evaluate_retrieval(rows, encode_fn, image_root=image_root, image_size=image_size,
                                                  instructions=instructions)
    if compositional is not None:
        rows = read_rows(compositional) if not isinstance(compositional, list) else compositional
        image_instruction = None if instructions is None else instructions["image_query"]
        results["compositional"] = evaluate_compositional(rows, encode_fn, image_root=image_root,
                                                          image_size=image_size, image_instruction=image_instruction)
    return results
