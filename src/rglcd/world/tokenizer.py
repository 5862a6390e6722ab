"""A real CLIPTokenizer, built offline from the CLIP BPE vocabulary that ships inside open_clip's wheel."""

from __future__ import annotations

import gzip

# CLIP's vocabulary: 256 byte symbols, the same with "</w>", 48,894 merges, then the two special tokens.
NUM_MERGES = 49152 - 256 - 2


def clip_tokenizer(model_max_length: int = 77):
    """transformers' CLIPTokenizer with OpenAI CLIP's 49,408-token vocabulary (ids equal open_clip.tokenize's)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(vocab)}, merges=merges, model_max_length=model_max_length
    )
