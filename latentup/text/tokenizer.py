r"""CLIP byte-level BPE tokenizer that gives the ids of transformers' ``CLIPTokenizer`` (SPEC §1.4, §3.3).

prompt → split out the literal special tokens ``<|startoftext|>`` / ``<|endoftext|>`` (they keep their ids)
→ NFC → per-character lower-case → words ``'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+``
(whitespace dropped) → UTF-8 bytes as printable characters → BPE (merge the lowest-rank adjacent pair
until none is left; the last symbol of a word carries ``</w>``) → vocabulary ids.

A row is ``[BOS, ids[:n-2], EOT]`` padded with **EOT** (49407) to n = 77, as the released pipeline's
tokenizer does (open_clip's own ``tokenize`` pads with 0). The keep-mask is True over BOS … EOT, i.e. the
transformers ``attention_mask``; the original model masks everything after it in cross-attention (SPEC §4.5).
The vocabulary comes from open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz`` or from a HF ``tokenizer/``
folder (vocab.json + merges.txt).
"""

import gzip
import json
import unicodedata
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import regex
import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe

from latentup.atomic import write_text_atomic
from latentup.errors import WeightsNotFoundError

BOS, EOT = "<|startoftext|>", "<|endoftext|>"
SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
WORDS = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+")
BUNDLED_MERGES = 49152 - 256 - 2  # merges in CLIP's vocabulary: 49408 ids = 2 * 256 bytes + merges + 2 specials


class CLIPTokenizer:
    """Prompts → (ids [B, n] int64, keep-mask [B, n] bool) with CLIP's BPE, truncated and EOT-padded to n."""

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], context_length: int = 77):
        self.vocab = dict(vocab)
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.context_length = context_length
        self.bos_id, self.eot_id = self.vocab[BOS], self.vocab[EOT]
        self.byte_chars = bytes_to_unicode()
        self._words: dict[str, list[int]] = {}

    @classmethod
    def bundled(cls, context_length: int = 77) -> "CLIPTokenizer":
        """The OpenAI CLIP vocabulary shipped with open_clip (identical ids to openai/clip-vit-large-patch14)."""
        return _bundled(context_length)

    @classmethod
    def from_hf(cls, folder: str | Path, context_length: int = 77) -> "CLIPTokenizer":
        """Read a HF tokenizer folder: ``vocab.json`` + ``merges.txt``, or the fast tokenizer's ``tokenizer.json``."""
        folder = Path(folder)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab = model["vocab"]
            merges = [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
        else:
            raise WeightsNotFoundError(f"no vocab.json + merges.txt or tokenizer.json in {folder}: pass a HF tokenizer folder")
        return cls(vocab, merges, context_length)

    def _bpe(self, word: str) -> list[int]:
        """Byte-level BPE of one word → ids."""
        if word not in self._words:
            symbols = [self.byte_chars[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            while len(symbols) > 1:
                best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(symbols):
                    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                        merged.append(symbols[i] + symbols[i + 1])
                        i += 2
                    else:
                        merged.append(symbols[i])
                        i += 1
                symbols = merged
            self._words[word] = [self.vocab.get(symbol, self.eot_id) for symbol in symbols]
        return self._words[word]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOT and without truncation."""
        ids = []
        for part in SPECIAL.split(text):
            if part in (BOS, EOT):
                ids.append(self.vocab[part])
                continue
            normal = "".join(char.lower() for char in unicodedata.normalize("NFC", part))
            for word in WORDS.findall(normal):
                ids += self._bpe(word)
        return ids

    def __call__(self, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → ids [B, n] (BOS, ≤ n-2 tokens, EOT, EOT padding) and mask [B, n] (True over BOS … EOT)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = self.context_length
        ids = torch.full((len(prompts), n), self.eot_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), n, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            tokens = [self.bos_id, *self.encode(prompt)[: n - 2], self.eot_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        return ids, mask


@cache
def _bundled(context_length: int) -> CLIPTokenizer:
    vocab, merges = bundled_vocab()
    return CLIPTokenizer(vocab, merges, context_length)


def bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary from open_clip's BPE file: 256 byte chars, the same with ``</w>``, merges, BOS, EOT."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + BUNDLED_MERGES]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in merges] + [BOS, EOT]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_hf_tokenizer_files(folder: str | Path, context_length: int = 77) -> Path:
    """Write the bundled vocabulary as a HF ``CLIPTokenizer`` folder (loads offline with ``from_pretrained``)."""
    folder = Path(folder)
    vocab, merges = bundled_vocab()
    specials = {"bos_token": BOS, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, **specials}
    write_text_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text_atomic(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(p) for p in merges) + "\n")
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    write_text_atomic(folder / "special_tokens_map.json", json.dumps(specials, indent=2))
    return folder
