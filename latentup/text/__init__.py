"""Text conditioning: CLIP tokenizer and text tower (open_clip) → context, pooled and keep-mask."""

from latentup.text.clip import CLIPTextConditioner, TextCond, TextTowerConfig, hf_to_open_clip, open_clip_text_state
from latentup.text.tokenizer import CLIPTokenizer, write_hf_tokenizer_files

__all__ = [
    "CLIPTextConditioner",
    "CLIPTokenizer",
    "TextCond",
    "TextTowerConfig",
    "hf_to_open_clip",
    "open_clip_text_state",
    "write_hf_tokenizer_files",
]
