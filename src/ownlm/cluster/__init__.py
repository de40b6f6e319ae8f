"""Rounds as Ray tasks on a cluster (`[cluster] ray_address`; ray is the optional extra `ownlm[cluster]`).

    connect      ray.init once per process, with errors that say what to fix
    agent        the worker side: a small actor pinned to each Ray node (its trainer's public keys, attestation
                 evidence) and the round task, which runs `privacy.trainer.Trainer` (a sealed job in, a sealed
                 signed bundle out, the work directory erased)
    placement    which worker may take a user's round under their privacy tier, checked before anything is sent
    round        the node side of one round: redacted dataset → seal to the chosen worker → Ray task → verify,
                 gate, install exactly as for a remote trainer's bundle (privacy/remote.py)

Nothing here is imported unless `ray_address` is set (loop.py imports it lazily), so the embedded default never
imports ray.
"""
