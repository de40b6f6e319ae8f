#!/usr/bin/env python3
"""Regenerate the persona fixtures: src/ownlm/data/personas/<name>.jsonl and <name>.probes.json.

    python scripts/make_personas.py                 # rewrite the shipped files
    python scripts/make_personas.py --out /tmp/p    # write elsewhere (tests compare the bytes)

Same code and seed, same bytes: tests/test_personas.py fails if the committed files drift from this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing: the sources come first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ownlm.evaluate.personas.fixtures import DATA_DIR, DEFAULT_CONVERSATIONS, DEFAULT_SEED, write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="directory to write into")
    parser.add_argument("--n", type=int, default=DEFAULT_CONVERSATIONS, help="conversations per persona")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generation seed")
    args = parser.parse_args(argv)
    for path in write(args.out, n_conversations=args.n, seed=args.seed):
        print(f"{path}  {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
