"""What test_linmu.py's builders and CI share: the tiny decoder every tiny model starts from, the
test-only oracles' import, the `slow` marker and one CPU thread. test_linmu.py stays the specification."""

import importlib
import os

import pytest
import torch

from smolvlm import TextConfig

# The tiny decoder: 32 wide, 4 query heads of 8 sharing 2 key-value heads, an MLP of 64, one layer, 50 tokens.
TINY_TEXT = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2)


def tiny_text_config(**changes) -> TextConfig:
    """The tiny decoder's TextConfig, with `changes` (more layers, another vocabulary, ...)."""
    return TextConfig(**{**TINY_TEXT, **changes})


def tiny_text_dict(**changes) -> dict:
    """The tiny decoder as a transformers text_config (a Llama), with `changes`."""
    return {"model_type": "llama", **TINY_TEXT, **changes}


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def oracle(module: str, reason: str | None = None):
    """Import a test-only oracle (transformers, num2words). Where it is not installed the test is
    skipped, except in CI (CI=true, as .ci/run and CI services set it): CI installs
    requirements-test.txt, so there a missing oracle is an error, never a test that silently did not run."""
    if in_ci():
        try:
            return importlib.import_module(module)
        except ImportError as error:
            pytest.fail(f"CI=true but the test oracle {module} cannot be imported ({error}): "
                        "pip install -r requirements-test.txt", pytrace=False)
    return pytest.importorskip(module, reason=reason or f"{module} is a test-only oracle (requirements-test.txt)")


def pytest_configure(config):
    """One intra-op thread unless OMP_NUM_THREADS says otherwise: the tiny models' operations are too small
    to share among threads, and where other processes hold the cores, threads that wait on each other at
    every operation make the suite many times slower."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "slow: one of the longest checks; `python -m pytest -q` runs it too "
                                       "(-m 'not slow' leaves it out of a quick run)")
