"""Privacy tiers as enforced policy: where may a user's raw conversations go?

- 0 cloud: to a configured remote trainer over verified TLS, redacted.
- 1 edge (default): nowhere; every remote path refuses.
- 2 TEE: only to a trainer whose attestation verifies against the node's policy.
- 3 homomorphic: no party but the user computes on plaintext; not available on these machines (see docs).
Every code path that would send conversation data off the machine calls `check_may_send` first.

Federated rounds (privacy/federation.py) send no conversation data at all, only a device's adapter update
(a float vector, signed); every such send calls `check_may_send_update` first:
- 0 cloud: to the configured federation server, wherever it is;
- 1 edge: only between the person's own devices at home: the server's address must be loopback (this
  machine) or a private LAN address (RFC 1918 / link-local / IPv6 ULA), every address a name resolves to
  included. An update is derived from the conversations, so it never crosses the internet at tier 1;
- 2 TEE: refused (no attested aggregator exists yet);
- 3 homomorphic: only to a secure aggregator that sums encrypted updates (privacy/secure_agg.py); a
  plaintext update never leaves the device.

Memory (store/memory.py, api/memory.py) never leaves the node, whatever the tier: its passages go only into
the prompt the local engine reads, and that prompt is never stored, so no dataset, and therefore no remote
trainer at tier 0 or 2, ever receives them (tests/test_memory_api.py checks it). Inference always runs here.
"""

from __future__ import annotations

from ownlm.errors import InvalidInput, PrivacyViolation

TIERS = {
    0: "cloud: training data may go to your configured remote trainer over verified TLS, redacted",
    1: "edge: nothing leaves this machine; training runs here",
    2: "TEE: training data goes only to a trainer whose hardware attestation verifies",
    3: "homomorphic: nobody computes on your plaintext (not available yet: training stays local)",
}


def check_may_send(tier: int, destination: str, attested: bool = False) -> None:
    """Raise PrivacyViolation unless conversation data may go to `destination` under `tier`."""
    if tier == 0:
        return
    if tier == 2 and attested:
        return
    what = {1: "tier 1 (edge) keeps all conversation data on this machine",
            2: "tier 2 (TEE) sends data only to an attested trainer",
            3: "tier 3 (homomorphic) never sends plaintext"}[tier]
    raise PrivacyViolation(f"refused to send training data to {destination}: {what}",
                           hint="train on this node, or change the tier with `ownlm privacy set` (lowering needs --confirm)")


def _lan_only(destination: str) -> str | None:
    """None when every address of `destination` ('host:port' or 'host') is loopback or private, else why not."""
    import ipaddress
    import socket

    host = destination.rsplit(":", 1)[0] if destination.count(":") == 1 else destination
    host = host.strip("[]")
    if not host:
        return "no server address was given"
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError as e:
        return f"{host} does not resolve ({e})"
    home = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]
    for a in sorted(addrs):
        ip = ipaddress.ip_address(a.split("%", 1)[0])
        if not (ip.is_loopback or ip.is_link_local or any(ip in n for n in home if n.version == ip.version)):
            return f"{host} resolves to {a}, which is not on this machine or the local network"
    return None


def check_may_send_update(tier: int, destination: str | None, *, secure: bool = False) -> None:
    """Raise PrivacyViolation unless a federated adapter update (never conversations) may go to `destination`
    (the federation server, 'host:port') under `tier`; `secure`: the server only sums encrypted updates."""
    if tier == 0:
        return
    if tier == 1:
        why = _lan_only(destination or "")
        if why is None:
            return
        raise PrivacyViolation(f"refused to send a federated update to {destination}: tier 1 (edge) shares updates "
                               f"only between your own devices on this machine or your local network ({why})",
                               hint="run the federation server on one of your devices at home (a LAN or 127.0.0.1 "
                                    "address), or change the tier with `ownlm privacy set 0 --confirm`")
    if tier == 3 and secure:
        return
    what = {2: "tier 2 (TEE) has no attested aggregator for federated rounds",
            3: "tier 3 (homomorphic) sends updates only to a secure aggregator that sums them encrypted"}[tier]
    raise PrivacyViolation(f"refused to send a federated update to {destination}: {what}",
                           hint="use a secure aggregator (tier 3), or change the tier with `ownlm privacy set`")


def set_tier(store, user, tier: int, confirm: bool) -> dict:
    if tier not in TIERS:
        raise InvalidInput(f"privacy tier {tier} does not exist", hint="use 0, 1, 2 or 3")
    if tier < user.privacy_tier and not confirm:
        raise PrivacyViolation(
            f"lowering the privacy tier from {user.privacy_tier} to {tier} lets data go where it could not before",
            hint="confirm it explicitly (confirm=true, or --confirm on the CLI)",
        )
    with store.tx() as db:
        db.execute("UPDATE users SET privacy_tier = ? WHERE id = ?", (tier, user.id))
        store.audit(db, user.id, "privacy_tier_changed", old=user.privacy_tier, new=tier)
    return {"tier": tier, "previous": user.privacy_tier, "meaning": TIERS[tier]}


# --- tier 3: what form an adapter update may take when it leaves the device ----------------------------------

UPDATE_FORMS = {
    "plaintext": "the update's float values as they are",
    "ckks": "CKKS ciphertexts under the person's own key (privacy/secure_agg.py): only the person can decrypt",
    "masked": "pairwise-masked fixed-point values (privacy/secure_agg.py): only the sum over all participants "
              "can be read, for a model shared by several people",
}


def check_update_form(tier: int, form: str, shared: bool = False) -> None:
    """Raise PrivacyViolation unless an adapter update in `form` may go to another machine under `tier`.

    Tier 3 lets an update out only encrypted under the person's key ('ckks'), or, for a model shared with other
    people (`shared`, opt-in), pairwise-masked ('masked'); never as plaintext. The other tiers' rules on where an
    update may go are `check_may_send_update`'s (federation); this function only judges its form.
    """
    if form not in UPDATE_FORMS:
        raise InvalidInput(f"update form {form!r} does not exist", hint=f"use one of {', '.join(UPDATE_FORMS)}")
    if tier != 3 or form == "ckks" or (form == "masked" and shared):
        return
    why = ("a plaintext update" if form == "plaintext" else
           "a masked update for your own model (masking is for shared models; your own is encrypted to your key)")
    raise PrivacyViolation(f"refused to let {why} leave this device: tier 3 (homomorphic) sends updates only "
                           "encrypted, and no other machine ever computes on your plaintext",
                           hint="aggregate with privacy/secure_agg.py (a secure round), or train locally only")
