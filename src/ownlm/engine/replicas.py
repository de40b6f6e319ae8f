"""Which llama.cpp replica holds which users' adapters (pure: no llama.cpp, no I/O).

llama.cpp loads LoRA adapters only when a server starts, so installing one user's new version means building a
server again with every adapter it holds: with all users in one server, a deploy reads and loads every user's
adapter, and its cost grows with the node's users (bench/replicas.py measures it). The llama engine therefore
spreads the routed models over replicas of at most `capacity` adapters each (settings.max_adapters_per_replica);
a request goes to the replica that holds its model, and a deploy rebuilds only that replica.

    plan = assign(current=[[a1, b1], [c1]], wanted=[a2, b1, c1], capacity=2, group=user_of)
    # [[b1, a2], [c1]]: a's new version takes the place of its old one, the second replica is left alone
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

Key = Hashable


def assign(current: Sequence[Sequence[Key]], wanted: Iterable[Key], capacity: int | None,
           group: Callable[[Key], Hashable] = lambda k: k) -> list[list[Key]]:
    """The replicas' adapter lists after a change of the routed models, moving as little as possible.

    current: each replica's adapter keys now, in load order. wanted: every key to serve. capacity: most keys per
    replica (None: unbounded, one replica). group: a key's owner (a user): a user's new version goes to the
    replica that held their old one when it has room, so that one deploy rebuilds one replica.
    Keys that stay keep their replica and order (new keys are appended); replicas left empty are dropped, but
    there is always at least one (it serves the base). Returns the new lists; a list equal to one of `current`
    is a replica that need not be rebuilt (`rebuilt`).
    """
    if capacity is not None and capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    want = set(wanted)
    replicas = [[k for k in keys if k in want] for keys in current]
    placed = {k for keys in replicas for k in keys}
    home_of = {group(k): i for i, keys in enumerate(current) for k in keys}  # where each user was
    for key in sorted(want - placed, key=repr):  # repr: keys of mixed types still sort deterministically
        room = [i for i, keys in enumerate(replicas) if capacity is None or len(keys) < capacity]
        home = home_of.get(group(key))
        if home is not None and home in room:
            target = home
        elif room:
            target = room[0]
        else:
            replicas.append([])
            target = len(replicas) - 1
        replicas[target].append(key)
        home_of.setdefault(group(key), target)
    kept = [keys for keys in replicas if keys]
    return kept or [[]]


def rebuilt(current: Sequence[Sequence[Key]], plan: Sequence[Sequence[Key]]) -> list[int]:
    """Positions in `plan` whose replica must be built: no current replica holds exactly its keys, in its order."""
    now = {tuple(keys) for keys in current}
    return [i for i, keys in enumerate(plan) if tuple(keys) not in now]
