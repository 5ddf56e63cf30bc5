"""`EmbeddingEvalCallback`: embedding evaluations (MMEB, retrieval, compositional) during training."""

from collections.abc import Mapping

import torch
from transformers import TrainerCallback


class EmbeddingEvalCallback(TrainerCallback):
    """Run an embedding evaluation every `eval_steps` optimizer steps and at the end of training,
    logging `{metric_prefix}{name}` through the trainer.

    Transformers hands callbacks the model but not the trainer, and only `Trainer.log` both appends
    to `trainer.state.log_history` and forwards to the other callbacks' `on_log` (the `report_to`
    integrations, progress bars). So the callback is bound to its trainer with `attach`, which also
    registers it; a callback that was never attached fails at `on_train_begin` instead of silently
    dropping its metrics::

        evaluate = model_evaluation(evaluate_retrieval, processor, rows=rows, image_root=root)
        EmbeddingEvalCallback(evaluate, eval_steps=50, metric_prefix="eval_retrieval/").attach(trainer)
        trainer.train()   # log_history gets {"eval_retrieval/t2i_R@1": ..., "step": 50, ...}

    The evaluation runs with the model in eval mode under `torch.no_grad()`, and train mode is
    restored after. It runs on every process, because a sharded model (ZeRO-3, FSDP) needs all
    ranks for a forward pass; `Trainer.log` reports from the main process only.

    Args:
        eval_fn: `(model) -> {metric name: number}`, e.g. `model_evaluation(evaluate_mmeb, ...)`.
        eval_steps: evaluate when `global_step` is a multiple of this, and on the last step.
        metric_prefix: prepended to every metric name.
    """

    def __init__(self, eval_fn, eval_steps, metric_prefix="eval/"):
        if not callable(eval_fn):
            raise TypeError(f"eval_fn must be callable (model) -> dict, got {type(eval_fn).__name__}")
        if not isinstance(eval_steps, int) or eval_steps < 1:
            raise ValueError(f"eval_steps must be a positive int, got {eval_steps!r}")
        self.eval_fn, self.eval_steps, self.metric_prefix = eval_fn, eval_steps, metric_prefix
        self.trainer = None
        self._last_evaluated_step = None

    def attach(self, trainer):
        """Register on `trainer` and log through it; returns self."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError("EmbeddingEvalCallback was not attached: call callback.attach(trainer) "
                               "instead of passing it in Trainer(callbacks=...)")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # DefaultFlowCallback runs first and sets should_training_stop on the last step.
        if state.global_step % self.eval_steps == 0 or control.should_training_stop:
            # Trainer.log resets control.should_log through on_log; keep the Trainer's own pending
            # loss log of this step.
            should_log = control.should_log
            self._evaluate(state, model)
            control.should_log = should_log

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._evaluate(state, model)  # in case a later callback stopped training

    def _evaluate(self, state, model):
        if state.global_step == self._last_evaluated_step:
            return
        self._last_evaluated_step = state.global_step
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = self.eval_fn(model)
        finally:
            model.train(was_training)
        if not isinstance(metrics, Mapping) or any(not isinstance(v, (int, float)) for v in metrics.values()):
            raise ValueError(f"eval_fn must return {{metric name: number}}, got {metrics!r}")
        self.trainer.log({f"{self.metric_prefix}{name}": float(value) for name, value in metrics.items()})
