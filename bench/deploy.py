"""Deploy latency: a sealed bundle received → the personal model serving, on the embedded model.

The node already serves the base (loaded once, as `ownlm serve` does). Each round takes the bundle bytes and
runs what the node runs: open (HPKE + AES-GCM), verify the signature and every hash, check base and version,
install atomically (fsync + rename + registry commit), load the delta and merge it into the served weights.
The delta is a lora1 BitDelta of a LoRA r=8 on q/v (random factors: speed does not depend on their values).

    .venv/bin/python bench/deploy.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ownlm.artifact.bundle import make_bundle  # noqa: E402
from ownlm.basemodel import load_base  # noqa: E402
from ownlm.bitdelta import CompressConfig, apply, compress_lora, load_delta, read_adapter, save_delta, unapply  # noqa: E402
from ownlm.node.install import install  # noqa: E402
from ownlm.settings import load_settings  # noqa: E402
from ownlm.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--home", help="ownlm home holding the base cache (default: $OWNLM_HOME)")
    args = ap.parse_args()
    settings = load_settings(home=args.home)
    base = load_base(settings)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        peft_model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft_model.save_pretrained(tmp / "adapter")
        peft_model.unload()  # back to the plain base, unchanged
        save_delta(compress_lora(read_adapter(tmp / "adapter"), CompressConfig(mode="lora1"), base.sha256), tmp / "delta")
        node_settings = load_settings(home=str(tmp / "node"), base=settings.base)
        # the node shares the base cache: link it so the node does not convert the GGUF again
        (tmp / "node" / "cache").mkdir(parents=True)
        (tmp / "node" / "cache" / "base").symlink_to(settings.home / "cache" / "base")
        times, stages = [], []
        with Store(node_settings.home) as store:
            user = store.create_user("me")
            key, pub = store.signing_key(user.id), store.node_key().public_json()
            bundles = [make_bundle(delta_dir=tmp / "delta", report={}, user_name="me", signing_key=key, recipient=pub,
                                   base_name=base.source.name, version=v + 1, previous=None)[0] for v in range(args.rounds)]
            for data in bundles:
                t0 = time.perf_counter()
                res = install(store, node_settings, data, keep=3)
                t1 = time.perf_counter()
                delta = load_delta(res.path, expect_base_sha256=base.sha256)
                apply(base.model, delta, base.sha256)
                t2 = time.perf_counter()
                times.append(t2 - t0)
                stages.append((t1 - t0, t2 - t1))
                unapply(base.model, delta, base.sha256)  # restore the base for the next round (not timed)
    print(f"bundle size: {len(bundles[0]):,} bytes; base {base.source.name}; {args.rounds} rounds on {base.device.describe()}")
    print(f"verify+install median: {statistics.median(s[0] for s in stages) * 1000:.1f} ms")
    print(f"load+merge median:     {statistics.median(s[1] for s in stages) * 1000:.1f} ms")
    print(f"bundle received -> personal model serving: median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms (goal < 300 ms, seed claims < 1 s)")


if __name__ == "__main__":
    main()
