"""Cost of tier 3's encrypted aggregation (privacy/secure_agg.py) for the embedded model's adapter.

For each adapter layout — r=8 on q/v (the default: 460,800 floats) and r=1 on all seven linear layers — with
the parameter counts computed from the base's config (hidden, intermediate, KV heads, layers): ciphertext bytes
per device, seconds to encrypt (per device), to add (the aggregator, per round), to decrypt (the person, per
round), for 2 and 10 devices, CKKS N=8192 (60-40-40-60, scale 2^40), one CPU thread (TenSEAL's default here).
Also the decrypted sum's largest error against the plaintext sum, and the pairwise masking alternative
(shared models) per device and round.

    .venv/bin/python bench/secure_agg.py [--devices 2 10] [--config path/to/config.json] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ownlm.privacy import secure_agg as sa  # noqa: E402

# SmolLM2-135M-Instruct (the embedded base), as its config.json says; --config reads another.
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3}


def lora_floats(cfg: dict, r: int, modules: list[str]) -> int:
    """LoRA parameters: r x (in + out) per module and layer."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return cfg["num_hidden_layers"] * sum(r * (shapes[m][0] + shapes[m][1]) for m in modules)


def run(n: int, devices: int, keys: sa.Keys) -> dict:
    rng = np.random.default_rng(0)
    xs = [rng.normal(0, 0.02, n).astype(np.float32) for _ in range(devices)]
    t = time.perf_counter()
    cts = [sa.encrypt(keys.public, x) for x in xs]
    enc = (time.perf_counter() - t) / devices
    t = time.perf_counter()
    agg = sa.SecureSum(keys.public, dim=n)
    for c in cts:
        agg.add(c, 1.0)
    total, _ = agg.total()
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    out = sa.decrypt(keys.secret, total, n)
    dec = time.perf_counter() - t
    err = float(np.abs(out - np.sum(xs, axis=0)).max())
    pairs = [sa.mask_keypair() for _ in range(devices)]
    publics = {k: p for k, (_, p) in enumerate(pairs)}
    t = time.perf_counter()
    masked = {k: sa.masked(x, k, pairs[k][0], publics, "bench") for k, x in enumerate(xs)}
    mask_s = (time.perf_counter() - t) / devices
    t = time.perf_counter()
    msum = sa.unmask_sum(masked, set(publics))
    unmask_s = time.perf_counter() - t
    return {"floats": n, "devices": devices, "ciphertexts_per_device": sa._unpack(cts[0])[0]["chunks"],
            "ciphertext_bytes_per_device": len(cts[0]), "sum_bytes": len(total), "plaintext_bytes": 4 * n,
            "encrypt_s_per_device": round(enc, 3), "add_s_per_round": round(add_s, 3), "decrypt_s_per_round": round(dec, 3),
            "max_abs_error": err, "mask_s_per_device": round(mask_s, 3), "masked_bytes_per_device": masked[0].nbytes,
            "unmask_sum_s_per_round": round(unmask_s, 3), "mask_max_abs_error": float(np.abs(msum - np.sum(xs, axis=0)).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[2, 10])
    ap.add_argument("--config", type=Path, help="a Hugging Face config.json (default: SmolLM2-135M's numbers)")
    ap.add_argument("--json", type=Path, help="write the rows here too")
    args = ap.parse_args()
    cfg = {**SMOLLM2, **(json.loads(args.config.read_text()) if args.config else {})}
    layouts = {"q/v r=8": lora_floats(cfg, 8, ["q_proj", "v_proj"]),
               "all 7 r=1": lora_floats(cfg, 1, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}
    t = time.perf_counter()
    keys = sa.new_keys()
    print(f"keys: {time.perf_counter() - t:.2f} s; public context {len(keys.public):,} B, secret {len(keys.secret):,} B")
    rows = []
    head = ("layout", "floats", "devices", "ct MB/device", "x plaintext", "enc s/device", "add s/round", "dec s/round",
            "max err", "mask s/device", "unmask s/round")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for name, n in layouts.items():
        for d in args.devices:
            r = {"layout": name, **run(n, d, keys)}
            rows.append(r)
            print(" | ".join(str(v) for v in (
                name, f"{n:,}", d, f"{r['ciphertext_bytes_per_device'] / 1e6:.1f}",
                f"{r['ciphertext_bytes_per_device'] / r['plaintext_bytes']:.0f}", r["encrypt_s_per_device"],
                r["add_s_per_round"], r["decrypt_s_per_round"], f"{r['max_abs_error']:.1e}", r["mask_s_per_device"],
                r["unmask_sum_s_per_round"])), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
