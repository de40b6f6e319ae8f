"""Everything the node writes under the home is private to its user: directories 0700, files 0600.

Each test runs under umask 022 (the common default, which leaves new files 0644 and directories 0755) so that
only modes the code sets itself can pass.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx
import pytest
import torch

from ownlm.api.app import create_app
from ownlm.bitdelta.format import load_delta, save_delta
from ownlm.learn.continual import Lineage, keep_adapter
from ownlm.settings import load_settings
from ownlm.store import Store
from ownlm.learn.steps import save_checkpoint
from tests.servers import ThreadServer
from tests.test_node import make


@pytest.fixture(autouse=True)
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def not_private(root: Path) -> list[str]:
    """Every path under `root` (and root) whose mode is not 0700 (directory) or 0600 (file), as 'mode path'."""
    bad = []
    for p in [root, *sorted(root.rglob("*"))]:
        if p.is_symlink():
            bad.append(f"symlink {p.relative_to(root)}")
            continue
        mode, want = stat.S_IMODE(p.stat().st_mode), 0o700 if p.is_dir() else 0o600
        if mode != want:
            bad.append(f"{mode:o} {p.relative_to(root) if p != root else '.'}")
    return bad


def test_a_model_deployed_over_http_is_private_and_so_is_the_whole_home(home, tiny_base, tiny_delta):
    settings = load_settings(base=str(tiny_base))
    store = Store(home)
    user = store.create_user("alice")
    data, manifest = make(store, user, tiny_delta, 1)
    try:
        with ThreadServer(create_app(settings, store, None)) as server:
            r = httpx.post(server.url + "/api/personalization/deploy", content=data, timeout=60,
                           headers={"Authorization": f"Bearer {store.create_token(user.id)}"})
            assert r.status_code == 200, r.text
        installed = home / "models" / user.id / manifest["model"]["id"]
        assert sorted(p.name for p in installed.iterdir()) == ["delta.json", "delta.safetensors", "manifest.json"]
        assert not_private(home) == []  # the store, its WAL, the key, the cache of hashes, models/ and its lock
    finally:
        store.close()


def test_training_checkpoints_deltas_and_kept_adapters_are_private(home, tiny_delta, tmp_path):
    job = home / "jobs" / "job-1"
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p])
    p.sum().backward()
    opt.step()
    save_checkpoint(job / "train" / "checkpoints", 1, {"w": p}, opt, {"epoch": 0})
    save_delta(load_delta(tiny_delta / "delta"), job / "delta")

    # an adapter as a library left it: world-readable files (what peft's save_pretrained writes under umask 022)
    loose = tmp_path / "loose-adapter"
    loose.mkdir()
    (loose / "adapter_model.safetensors").write_bytes(b"weights")
    (loose / "adapter_config.json").write_text(json.dumps({"r": 8}))
    assert stat.S_IMODE((loose / "adapter_config.json").stat().st_mode) == 0o644
    keep_adapter(home, "u1", loose, Lineage("pm_x", "ds_x", "ab" * 32, {"r": 8}, 0))

    assert sorted(p.name for p in (job / "train" / "checkpoints").iterdir()) == ["LATEST", "step-00000001"]
    assert not_private(home) == []
