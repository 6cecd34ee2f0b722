"""The text prefix the released UCF-101 generators are conditioned on, one per class.

The authors turn a class folder name into words by putting a space wherever a lower-case letter is followed
by a capital, and lower-casing ("ApplyEyeMakeup" -> "apply eye makeup"); the Llama-2 tokenizer then gives
BOS + the pieces, cut to 8 tokens and padded with EOS on the right (Hugging Face's slow LlamaTokenizer with
``padding="max_length", max_length=8, truncation=True`` and EOS as the padding token). Here the same ids
come from the tokenizer's sentencepiece model (``tokenizer.model``), read from a path the user gives:
nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nbp_ds.official.files import ConversionError

PREFIX_LENGTH = 8


def class_text(name: str) -> str:
    """A class folder name as the words the released models saw: "ApplyEyeMakeup" -> "apply eye makeup"."""
    return re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()


def class_prefixes(names: list[str], sentencepiece_model: str | Path,
                   length: int = PREFIX_LENGTH) -> tuple[list[list[int]], int]:
    """Token ids [BOS, pieces..., EOS padding] of length ``length`` per class name, and the text vocabulary
    size, from a sentencepiece model file (the Llama-2 ``tokenizer.model``)."""
    try:
        import sentencepiece  # local: an optional dependency
    except ImportError as exc:  # an optional dependency: pip install 'nbp_ds[official]'
        raise ConversionError("class prefixes need the sentencepiece package: pip install 'nbp_ds[official]' "
                              "(or sentencepiece)") from exc
    path = Path(sentencepiece_model)
    if not path.is_file():
        raise ConversionError(f"{path}: no such sentencepiece model (the Llama-2 tokenizer.model)")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise ConversionError(f"{path}: not a sentencepiece model ({exc})") from exc
    bos, eos = processor.bos_id(), processor.eos_id()
    if bos < 0 or eos < 0:
        raise ConversionError(f"{path}: the sentencepiece model has no BOS or EOS piece (bos_id {bos}, eos_id {eos}); "
                         f"the Llama-2 tokenizer has both")
    prefixes = []
    for name in names:
        ids = [bos] + processor.EncodeAsIds(class_text(name))[: length - 1]
        prefixes.append(ids + [eos] * (length - len(ids)))
    return prefixes, processor.GetPieceSize()


def read_class_names(source: str | Path) -> list[str]:
    """Class names in label order from a classes.json (name -> id, as nbp-tokenize writes) or a
    folder of class sub-folders (ids by sorted name, as nbp-tokenize assigns them)."""
    source = Path(source)
    if source.is_dir():
        names = sorted(p.name for p in source.iterdir() if p.is_dir())
        if not names:
            raise ConversionError(f"{source}: no class sub-folders")
        return names
    try:
        mapping = {str(k): int(v) for k, v in json.loads(source.read_text()).items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ConversionError(f"{source}: not a JSON object of class name -> id ({exc})") from exc
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ConversionError(f"{source}: class ids must be 0..{len(mapping) - 1}, each once; got "
                         f"{sorted(mapping.values())[:10]}...")
    return [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]
