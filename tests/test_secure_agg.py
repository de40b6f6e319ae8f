"""Tier 3 (privacy/secure_agg.py, privacy/tiers.py): CKKS sums of updates computed by an aggregator process that
holds no secret key, what that aggregator saw, the person's keys in the store, pairwise masking for shared models.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ownlm.errors import CorruptArtifact, InvalidInput, PrivacyViolation
from ownlm.privacy import secure_agg as sa
from ownlm.privacy.tiers import check_may_send, check_update_form

N = 10_000  # three ciphertexts of 4096 slots, the last one partly filled


@pytest.fixture(scope="module")
def keys() -> sa.Keys:
    return sa.new_keys()


def updates(k: int, n: int = N, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, n).astype(np.float32) for _ in range(k)]


def test_encrypt_decrypt_round_trip_is_chunked_and_close(keys):
    x = updates(1)[0]
    data = sa.encrypt(keys.public, x)
    header, chunks = sa._unpack(data)
    assert header["n"] == N and header["chunks"] == 3 == len(chunks) and header["slots"] == 4096
    assert np.abs(sa.decrypt(keys.secret, data, N) - x).max() < 1e-6
    with pytest.raises(InvalidInput, match="10000 values"):
        sa.decrypt(keys.secret, data, N + 1)


def test_sum_and_weighted_sum_match_the_plaintext_within_1e_4(keys):
    xs = updates(3)
    cts = [sa.encrypt(keys.public, x) for x in xs]
    total = sa.decrypt(keys.secret, sa.add(cts, keys.public), N)
    assert np.abs(total - np.sum(xs, axis=0)).max() < 1e-4  # measured ~1e-7
    w = [3.0, 1.0, 0.5]
    weighted = sa.decrypt(keys.secret, sa.add(cts, keys.public, weights=w), N)
    assert np.abs(weighted - sum(wi * x for wi, x in zip(w, xs))).max() < 1e-4
    # the PlainSum-shaped interface: devices send weight x vector, the aggregator sums and keeps the weight
    agg = sa.SecureSum(keys.public, dim=N)
    for wi, x in zip(w, xs):
        agg.add(sa.encrypt(keys.public, wi * x), wi)
    enc, weight = agg.total()
    assert weight == 4.5
    mean = sa.decrypt_mean(keys.secret, enc, weight, N)
    assert np.abs(mean - sum(wi * x for wi, x in zip(w, xs)) / 4.5).max() < 1e-4


AGGREGATOR = textwrap.dedent("""
    import pathlib, sys
    from ownlm.errors import PrivacyViolation
    from ownlm.privacy import secure_agg as sa
    import tenseal as ts
    d = pathlib.Path(sys.argv[1])
    public = (d / "public.ctx").read_bytes()
    assert not ts.context_from(public).is_private() and not ts.context_from(public).has_secret_key()
    agg = sa.SecureSum(public)
    for f in sorted(d.glob("update-*.ckks")):
        agg.add(f.read_bytes(), 1.0)
    total, weight = agg.total()
    (d / "sum.ckks").write_bytes(total)
    try:
        sa.decrypt(public, total, agg.dim)
    except PrivacyViolation as e:
        print("cannot decrypt:", e.message)
    try:  # TenSEAL itself refuses too
        ts.ckks_vector_from(ts.context_from(public), sa._unpack(total)[1][0]).decrypt()
    except ValueError as e:
        print("tenseal:", e)
""")


def test_an_aggregator_process_without_the_secret_key_sums_and_cannot_decrypt(keys, tmp_path):
    """The aggregator is another process that gets only the public context and the devices' payloads; the test
    checks every byte it was given: no plaintext float of any update, no secret key; it cannot decrypt."""
    xs = updates(2, seed=1)
    inbox = tmp_path / "aggregator"
    inbox.mkdir()
    (inbox / "public.ctx").write_bytes(keys.public)
    for i, x in enumerate(xs):
        (inbox / f"update-{i}.ckks").write_bytes(sa.update_for_aggregator(3, x, keys.public))
    seen = b"".join(f.read_bytes() for f in sorted(inbox.iterdir()))
    for x in xs:  # no run of 2 consecutive float32 values (8 bytes) of a plaintext update is in what it got
        raw = x.tobytes()
        assert not any(raw[i:i + 8] in seen for i in range(0, 4000, 4))
    assert keys.secret[-4096:] not in seen
    r = subprocess.run([sys.executable, "-c", AGGREGATOR, str(inbox)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cannot decrypt: this context has no secret key" in r.stdout and "secret_key" in r.stdout.split("tenseal:")[1]
    total = sa.decrypt(keys.secret, (inbox / "sum.ckks").read_bytes(), N)  # the person, with their key
    assert np.abs(total - (xs[0] + xs[1])).max() < 1e-4


def test_contexts_and_payloads_are_checked(keys):
    with pytest.raises(PrivacyViolation, match="holds the secret key"):
        sa.encrypt(keys.secret, np.zeros(3))  # the secret context never serves as the public one
    with pytest.raises(PrivacyViolation, match="no secret key"):
        sa.decrypt(keys.public, sa.encrypt(keys.public, np.zeros(3)), 3)
    other = sa.new_keys()
    with pytest.raises(InvalidInput, match="encrypted under key"):
        sa.add([sa.encrypt(keys.public, np.zeros(3)), sa.encrypt(other.public, np.zeros(3))], keys.public)
    good = sa.encrypt(keys.public, np.ones(5))
    for bad in (good[:-10], b"junk", good + b"x"):
        with pytest.raises(CorruptArtifact):
            sa.decrypt(keys.secret, bad, 5)
    with pytest.raises(InvalidInput, match="non-finite"):
        sa.encrypt(keys.public, np.array([1.0, np.nan]))
    with pytest.raises(Exception, match="coeff_mod_bit_sizes"):
        sa.CKKSParams(coeff_mod_bit_sizes=(60, 60, 60, 60))  # 240 bits: below 128-bit security at N=8192


def test_the_persons_keys_live_encrypted_in_the_store(home):
    from ownlm.store import Store

    with Store(home) as store:
        user = store.create_user("alice")
        keys = sa.person_keys(store, user.id)
        assert sa.person_keys(store, user.id) == keys  # created once, then read back
        assert [a["action"] for a in store.audit_log(user.id)].count("he_key_created") == 1
    on_disk = b"".join(p.read_bytes() for p in home.rglob("*") if p.is_file())
    assert keys.secret[1000:1064] not in on_disk  # SQLCipher: no window of the secret context in the clear
    x = updates(1, n=50)[0]
    assert np.abs(sa.decrypt(keys.secret, sa.encrypt(keys.public, x), 50) - x).max() < 1e-6


def test_tier_3_refuses_every_plaintext_path():
    with pytest.raises(PrivacyViolation, match="tier 3"):
        check_update_form(3, "plaintext")
    with pytest.raises(PrivacyViolation, match="tier 3"):
        sa.update_for_aggregator(3, np.zeros(4), None)  # no public context: it would be plaintext
    with pytest.raises(PrivacyViolation, match="masked update for your own model"):
        check_update_form(3, "masked")
    check_update_form(3, "masked", shared=True)
    check_update_form(3, "ckks")
    for tier in (0, 1, 2):
        check_update_form(tier, "plaintext")  # where it may go is check_may_send_update's business
    for where in ("a remote trainer", "the Ray cluster"):  # remote rounds and the cluster never get the data
        with pytest.raises(PrivacyViolation, match="tier 3"):
            check_may_send(3, where)
    assert isinstance(sa.update_for_aggregator(1, np.zeros(4), None), np.ndarray)


def test_flatten_is_sorted_by_name_and_row_major():
    t = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7.0, 8.0])}
    vec, layout = sa.flatten(t)
    assert vec.tolist() == [7, 8, 0, 1, 2, 3, 4, 5] and layout == [("a", [2]), ("b", [2, 3])]
    back = sa.unflatten(vec, layout)
    assert all(np.array_equal(back[k], t[k]) for k in t)


def test_pairwise_masks_cancel_in_the_sum_and_hide_each_update():
    xs = updates(4, n=1000, seed=2)
    pairs = [sa.mask_keypair() for _ in xs]
    publics = {i: pub for i, (_, pub) in enumerate(pairs)}
    masked = {i: sa.masked(x, i, pairs[i][0], publics, "round-1") for i, x in enumerate(xs)}
    total = sa.unmask_sum(masked, set(publics))
    assert np.abs(total - np.sum(xs, axis=0)).max() < 4 * 2.0 ** -24 + 1e-7
    for i, x in enumerate(xs):  # a masked vector alone says nothing: its values look uniform over 2^64
        as_float = sa.from_fixed(masked[i])
        assert np.abs(as_float - x).mean() > 1e6
        top = (masked[i] >> np.uint64(63)).mean()
        assert 0.4 < top < 0.6
    other_round = sa.masked(xs[0], 0, pairs[0][0], publics, "round-2")
    assert not np.array_equal(other_round, masked[0])  # fresh masks each round
    with pytest.raises(InvalidInput, match=r"participants \[3\] did not report"):
        sa.unmask_sum({i: masked[i] for i in range(3)}, set(publics))
