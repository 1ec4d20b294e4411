"""bench/gpu.py, the GPU check, run on a CPU with the tiny shape: every figure present, the table written."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def test_gpu_check_runs_on_cpu_with_a_tiny_config(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    assert spec and spec.loader
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    out = tmp_path / "gpu.json"
    res = gpu.main(["--sizes", "tiny", "--device", "cpu", "--dtype", "fp32", "--n", "4", "--prompt-len", "8",
                    "--response-len", "8", "--new-tokens", "3", "--batches", "1,2", "--repeat", "1", "--no-record",
                    "--out", str(out)])
    tiny = json.loads(out.read_text())["models"]["tiny"]
    assert res["dtype"] == "float32" and tiny["forward_tok_s"] > 0 and tiny["extract_tok_s"] > 0
    assert set(tiny["generate"]) == {"1", "2"}
    assert all(g["new_tok_s"] > 0 and g["steered_new_tok_s"] > 0 for g in tiny["generate"].values())
    assert tiny["peak_rss_gib"] > 0
    table = gpu.lines_for(res)
    assert any(line.startswith("| tiny |") for line in table)
    # the real shapes are Qwen2.5's
    assert gpu.SHAPES["7b"]["hidden_size"] == 3584 and gpu.SHAPES["1.5b"]["num_hidden_layers"] == 28
