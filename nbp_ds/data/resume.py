"""The training loader's saved state, and how it continues on another number of slots.

A rank's loader state (:meth:`nbp_ds.data.loader.TokenLoader.state_dict`) is a small JSON record:

    {"format", "rank", "world_size", "num_workers", "shuffle_buffer", "seed", "fingerprint",
     "batches",   # batches this rank has consumed: which worker role delivers the next one
     "slots",     # per worker role, the slot stream's state after its last consumed batch (None: none yet)
     "stats"}     # the loader's counters so far, so TensorBoard's data/* figures continue

Its size depends on the shuffle buffer and the shard count, never on how far the run is.

**Another layout** (another number of ranks or DataLoader workers, or another shuffle buffer size):
:func:`reshard` turns the states of all the old ranks into states for the new ones. What it guarantees,
per source: every sample an old slot had not yet yielded in its current epoch (the rest of its current
shard, its remaining shards, the samples in its shuffle buffer) is yielded exactly once by the new
slots, and none it had yielded in that epoch is yielded again, before the new slots start their next
epoch with the new layout. Samples in flight (prefetched by a worker but not consumed) count as not
yielded. The new slots deal the old slots' remaining items between them round-robin; their shuffle
buffers and RNGs start afresh, so the order differs from what the old layout would have produced.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from nbp_ds.data.sources import Source
from nbp_ds.data.stream import fresh_cursor_state, regular_plan

FORMAT = 1


def to_json(obj: Any) -> Any:
    """A state with arrays (numpy's, or torch's: the DataLoader converts what workers send) and tuples (RNG
    states) as lists, ready for ``json.dumps``."""
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def same_layout(state: dict[str, Any], world_size: int, roles: int, shuffle_buffer: int) -> bool:
    return (state["world_size"], state["num_workers"], state["shuffle_buffer"]) == (world_size, roles, shuffle_buffer)


def reshard(states: list[dict[str, Any]], sources: list[Source], world_size: int, roles: int,
            shuffle_buffer: int) -> list[dict[str, Any]]:
    """States for ``world_size`` ranks of ``roles`` worker roles each that continue the saved ``states``
    (one per old rank, all of them) as the module docstring says."""
    old_world = states[0]["world_size"]
    if sorted(s["rank"] for s in states) != list(range(old_world)):
        raise ValueError(f"loader states of ranks {sorted(s['rank'] for s in states)} cannot continue a stream "
                         f"read by {old_world} ranks: some are missing")
    old_roles, seed = states[0]["num_workers"], states[0]["seed"]
    old_nslots = old_world * old_roles
    slot_states: list[dict | None] = [None] * old_nslots
    for state in states:
        for role, slot_state in enumerate(state["slots"]):
            slot_states[state["rank"] * old_roles + role] = slot_state

    new_nslots = world_size * roles
    remaining: list[list[dict]] = [[] for _ in sources]  # per source: items still to read in the epoch
    buffered: list[list[dict]] = [[] for _ in sources]
    epochs = [0] * len(sources)
    generation = 0
    for slot, slot_state in enumerate(slot_states):
        if slot_state is not None:
            generation = max(generation, slot_state.get("generation", 0))
        cursors = slot_state["sources"] if slot_state is not None else [fresh_cursor_state() for _ in sources]
        for i, (source, cursor) in enumerate(zip(sources, cursors, strict=True)):
            epochs[i] = max(epochs[i], cursor["epoch"])
            remaining[i] += _rest_of_epoch(cursor, source, i, slot, old_nslots, seed)
        buffered_refs: dict[tuple[int, int], list[int]] = defaultdict(list)
        for source, shard, ordinal in (slot_state or {}).get("buffer", []):
            buffered_refs[(source, shard)].append(int(ordinal))
        for (source, shard), ordinals in sorted(buffered_refs.items()):
            buffered[source].append({"shard": shard, "only": sorted(ordinals)})

    stats: Counter = Counter()
    for state in states:
        stats.update(state.get("stats", {}))
    fingerprint = states[0]["fingerprint"]
    # the buffered samples first: the old slots were about to yield them
    work = [buffered[i] + remaining[i] for i in range(len(sources))]
    out = []
    for rank in range(world_size):
        slots = []
        for role in range(roles):
            slot = rank * roles + role
            cursors = [{**fresh_cursor_state(), "epoch": epochs[i], "plan": work[i][slot::new_nslots]}
                       for i in range(len(sources))]
            slots.append({"slot": slot, "nslots": new_nslots, "generation": generation + 1, "sources": cursors,
                          "mix_rng": None, "buffer_rng": None, "buffer": []})
        out.append({"format": FORMAT, "rank": rank, "world_size": world_size, "num_workers": roles,
                    "shuffle_buffer": shuffle_buffer, "seed": seed, "fingerprint": fingerprint, "batches": 0,
                    "slots": slots, "stats": dict(stats) if rank == 0 else {}})
    return out


def _rest_of_epoch(cursor: dict, source: Source, index: int, slot: int, nslots: int, seed: int) -> list[dict]:
    """The items of a cursor's current epoch it has not read yet (the current one from its next sample)."""
    items = cursor["plan"] if cursor["plan"] is not None else regular_plan(
        len(source.shards), index, slot, nslots, seed, cursor["epoch"])
    pos = cursor["pos"]
    if pos >= len(items):
        return []
    current = items[pos]
    if "only" in current:
        left = [o for o in current["only"] if o >= cursor["next"]]
        head = [{"shard": current["shard"], "only": left}] if left else []
    else:
        head = [{"shard": current["shard"], "from": max(current["from"], cursor["next"])}]
    return head + [dict(item) for item in items[pos + 1:]]
