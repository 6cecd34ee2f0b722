"""Class names of token shards: the ``classes.json`` (name -> id) nbp-tokenize writes beside them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from nbp_ds.data.sources import Source

log = logging.getLogger(__name__)

CLASSES_FILE = "classes.json"


def shard_class_names(sources: list[Source]) -> dict[int, str]:
    """``{id: name}`` from the classes.json in the folder of the first local shard that has one (an empty mapping
    when none does: remote shards, or shards written without labels)."""
    for source in sources:
        for shard in source.shards:
            path = Path(shard).parent / CLASSES_FILE
            if "://" in str(shard) or str(shard).startswith("pipe:") or not path.is_file():
                continue
            try:
                return {int(i): str(name) for name, i in json.loads(path.read_text()).items()}
            except (ValueError, AttributeError, TypeError) as exc:
                log.warning("%s: not a JSON object of class name -> id (%s): classes shown by number", path, exc)
                return {}
    return {}
