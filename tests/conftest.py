import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def qwen_tiny():
    from tiny import tiny_pair

    from personascope.adapter import ModelAdapter

    model, tok = tiny_pair("qwen2")
    return ModelAdapter(model, tok)
