"""Shared test set-up: the repository root, offline hub, a project-local tiny-model cache, W&B offline in a temp dir."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root: the one definition every test file imports
# Set before any test imports transformers or starts a subprocess, so every CLI run inherits them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLM_REGRESSION_CACHE", str(ROOT / ".cache"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_processor():
    import model_vlm_regression as mvr

    return mvr.load_processor("tiny-random")
