"""Shared fixtures: tiny offline backbones, processors, checkpoints and images."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tests run on 2 pytest-xdist workers on 2 cores: one intra-op thread each avoids oversubscription,
# which slows tiny-model training by an order of magnitude on a loaded machine.
torch.set_num_threads(1)

from training.demo.tiny_models import FAMILIES, save_tiny_backbone, tiny_unime  # noqa: E402


def drawn_image(seed, size=(48, 40)):
    """A procedurally drawn RGB image (coloured shapes on a noisy background)."""
    rng = np.random.default_rng(seed)
    background = (rng.random((size[1], size[0], 3)) * 60).astype("uint8")
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        x1, y1 = x0 + rng.integers(8, size[0] // 2), y0 + rng.integers(8, size[1] // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image


@pytest.fixture(scope="session")
def photos():
    """Two real photos (scikit-learn's sample images), downscaled to keep the tiny models fast."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array).resize((64, 43)) for array in load_sample_images().images]


@pytest.fixture(scope="session")
def images(photos):
    return photos + [drawn_image(seed, size=(40 + 8 * seed, 32 + 4 * seed)) for seed in range(4)]


@pytest.fixture(scope="session")
def backbone_checkpoints(tmp_path_factory):
    """Factory: family -> directory of a tiny checkpoint in the official *ForConditionalGeneration layout."""
    cache = {}

    def make(family):
        if family not in cache:
            cache[family] = save_tiny_backbone(family, tmp_path_factory.mktemp(f"backbone_{family}"))
        return cache[family]

    return make


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="session")
def qwen2_vl_model():
    return tiny_unime("qwen2_vl")
