"""The offline demo: a deterministic data set of drawn scenes, tiny random backbones, the end-to-end
pipeline (teacher cache, stage 1, stage 2, evaluation), the ablation and the report. It uses the
library (`training/`), never the reverse."""
