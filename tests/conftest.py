import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models run fastest on one thread (and do not fight other work for the cores)."""
    if request.node.get_closest_marker("model"):
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def qwen_tiny():
    from tiny import tiny_pair

    from personascope.model.adapter import ModelAdapter

    model, tok = tiny_pair("qwen2")
    return ModelAdapter(model, tok)
