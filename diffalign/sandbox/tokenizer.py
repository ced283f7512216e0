"""The sandbox's text tokenizer: a transformers ``CLIPTokenizer`` built offline from open_clip's shipped BPE file.

open_clip ships OpenAI CLIP's byte-pair-encoding merges as ``open_clip/bpe_simple_vocab_16e6.txt.gz``. Its
``SimpleTokenizer`` builds the vocabulary as (49,408 entries in all)::

    256 byte characters  (bytes_to_unicode(), in its order)            ids 0 ... 255
    the same 256 with "</w>" appended                                  ids 256 ... 511
    "".join(merge) for merge in lines[1 : 49152 - 256 - 2 + 1]         ids 512 ... 49405   (48,894 merges)
    "<|startoftext|>", "<|endoftext|>"                                  ids 49406, 49407

which is exactly the vocabulary of OpenAI's CLIP tokenizer (the one Stable Diffusion ships as ``vocab.json`` +
``merges.txt``). open_clip names the two special tokens ``<start_of_text>``/``<end_of_text>``; the ids are the same.

The sandbox's captions are short (at most ~16 tokens), so ``model_max_length`` is 32 instead of CLIP's 77: every
caption fits, and the text encoder's position table has 32 rows.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

MODEL_MAX_LENGTH = 32  # context length of the sandbox text encoder (captions are <= ~16 tokens)
VOCAB_SIZE = 49408  # 256 + 256 + 48,894 merges + 2 special tokens
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def open_clip_bpe_path() -> Path:
    """Path of open_clip's shipped BPE merges file (``bpe_simple_vocab_16e6.txt.gz``)."""
    import open_clip.tokenizer

    path = Path(open_clip.tokenizer.default_bpe())
    if not path.is_file():
        raise FileNotFoundError(
            f"open_clip's BPE vocabulary {path} is missing; reinstall open-clip-torch (pip install open-clip-torch)"
        )
    return path


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode character table (same order as open_clip's)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's vocabulary (token -> id, 49,408 entries) and merge list (pairs, 48,894) from the BPE
    file, in exactly the order open_clip's ``SimpleTokenizer`` uses."""
    bpe_path = bpe_path or open_clip_bpe_path()
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"{bpe_path} gave {len(vocab)} vocabulary entries, expected {VOCAB_SIZE}")
    return vocab, merges


def build_clip_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A transformers ``CLIPTokenizer`` with OpenAI CLIP's vocabulary, built offline (nothing is downloaded).

    Padding token is ``<|endoftext|>`` (as in Stable Diffusion 1.x's tokenizer); ids before padding equal
    open_clip's ``SimpleTokenizer`` ids: ``[49406, ..., 49407]``.
    """
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def save_clip_tokenizer(tokenizer: CLIPTokenizer, directory: str | Path) -> Path:
    """Save ``tokenizer`` as ``vocab.json`` + ``merges.txt`` + ``tokenizer_config.json`` (the files Stable
    Diffusion's tokenizer folder has, loadable by transformers 4.x and 5.x ``CLIPTokenizer.from_pretrained``).

    transformers 5's ``save_pretrained`` writes a 3.6 MB ``tokenizer.json`` instead; it is replaced by the two
    classic files (1.5 MB), which rebuild the same tokenizer (tested)."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    (directory / "tokenizer.json").unlink(missing_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory
