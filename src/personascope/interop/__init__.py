"""Exchange with other tools: GGUF / repeng / EasySteer control vectors and lm-evaluation-harness."""

from .formats import ControlVectorError, GgufExport, choose_coefs, export_gguf, import_gguf, model_type_of, parse_layers
from .lmeval import LmEvalExport, export_lmeval

__all__ = [
    "ControlVectorError", "GgufExport", "LmEvalExport", "choose_coefs", "export_gguf", "export_lmeval",
    "import_gguf", "model_type_of", "parse_layers",
]
