import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """The distillation tests' tiny student and teacher (helpers.tiny_pair; test modules may define their own)."""
    from helpers import tiny_pair
    return tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """20 bundled questions with 3 rationales each (helpers.many_rationale_corpus)."""
    from helpers import many_rationale_corpus
    return many_rationale_corpus(tmp_path_factory.mktemp("corpus") / "many.jsonl")
