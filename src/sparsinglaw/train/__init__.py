"""Training small µP Transformers (MiniCPM style) with any activation and width/depth.

Public API: `train(TrainConfig(...), resume=..., on_checkpoint=...)`, `list_checkpoints(run_dir)`,
`PRESETS`, `ModelConfig` / `MuPTransformer`, `save_hf` (plain LlamaForCausalLM export).
"""

from sparsinglaw.train.checkpoint import Checkpoint, list_checkpoints
from sparsinglaw.train.export import save_hf
from sparsinglaw.train.model import ACTIVATIONS, ModelConfig, MuPTransformer
from sparsinglaw.train.presets import PRESETS, Preset, get_preset
from sparsinglaw.train.trainer import TrainConfig, TrainResult, parse_tokens, train

__all__ = ["ACTIVATIONS", "PRESETS", "Checkpoint", "ModelConfig", "MuPTransformer", "Preset", "TrainConfig",
           "TrainResult", "get_preset", "list_checkpoints", "parse_tokens", "save_hf", "train"]
