"""Federated rounds across a person's devices over Flower's deployment engine (flwr 1.42), all real processes.

    server device:  flower-superlink --ssl-certfile ... --host 127.0.0.1 --port 9091   (start_superlink)
    every device:   flower-supernode --root-certificates ca.pem --superlink HOST:9091 --port 9094 \\
                        --node-config 'home="..." user="..." superlink="HOST:9091"'      (start_supernode)
    one round:      flwr run <app dir> ownlm --run-config 'home="..." user="..." ...'   (run_round)

The SuperLink starts this module's `server_app` (ServerApp, in a `flwr-serverapp` subprocess) for the run; each
SuperNode starts `client_app` (ClientApp, `flwr-clientapp`) per message. The Flower App is a generated
pyproject.toml (`write_app`) whose components name these objects: the code is the installed ownlm package, and
the SuperLink is told not to install dependencies. Over Flower travel only what privacy/fedupdate.py makes:
the round's settings (server → device), a signed update header and one float32 vector (device → server), and
a sealed, signed bundle (server → device); no conversation text, ever.

One round (`server_round`):
1. the server records the round id as started (a later update naming it is a replay), waits for `devices`
   SuperNodes, and sends each a train message with the RoundSpec;
2. each device checks its user's tier (tiers.check_may_send_update), trains on its own store's conversations
   and replies with its update (fedupdate.make_update);
3. the server checks each update (fedupdate.verify_update: refusals are audited), sums the accepted ones
   (aggregate.PlainSum), averages, re-quantizes, and makes one bundle per device (fedupdate.aggregate_bundles);
4. each device installs its bundle (fedupdate.install_aggregate, with the device's own gate unless told not to)
   and replies with the installed model id; the server writes home/federation/rounds/<round>/result.json.

A secure round (tier 3, `secure`): in 2 each device encrypts its update to the person's CKKS key and sends the
ciphertexts with the public context; in 3 the server adds ciphertexts (secure_agg.SecureSum: no secret key, so
it cannot read an update or the sum) and sends every device the encrypted sum; in 4 each device decrypts it, builds
the same model and installs it (privacy/securefed.py).

Transport security: TLS by default (privacy/fedtls.py: the server home's own CA, whose ca.pem every device is
given; `flwr run` and the SuperNodes verify the SuperLink against it). On top of it, updates are signed and
bundles signed and sealed end to end (ML-KEM + X25519 HPKE), so plain HTTP (`--insecure`, an explicit choice)
exposes metadata and DP-noised vectors to the network, not conversations; tier 1 keeps the server on the LAN.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ownlm.privacy.fedtls import ServerTLS

log = logging.getLogger(__name__)

APP_NAME = "ownlm-federation"
FEDERATION = "ownlm"
INSTALL = "query.install"
# run_config keys (and their defaults) the ServerApp accepts; `flwr run --run-config` may override only these
RUN_CONFIG = {"home": "", "user": "", "round": "", "devices": 2, "min_devices": 0, "method": "latent", "lr": 1e-3,
              "max_steps": 48, "epochs": 20, "qat": True, "r": 1, "alpha": 2.0, "anchor_kl": 1.0, "dp_epsilon": 0.0, "wait_s": 120.0,
              "timeout_s": 1800.0, "keep_received": False, "secure": False}


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string is a JSON string for what we pass (paths, names)


def config_string(values: dict) -> str:
    """'k1="v1" k2=3' as Flower's --node-config and --run-config take it."""
    return " ".join(f"{k}={_toml(v)}" for k, v in values.items())


def write_app(directory: Path) -> Path:
    """The Flower App (a pyproject.toml only): its components are this module's server_app and client_app."""
    directory.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {_toml(v)}" for k, v in RUN_CONFIG.items())
    (directory / "pyproject.toml").write_text(f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "ownlm: federated rounds of a person's adapter across their devices"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "ownlm"

[tool.flwr.app.components]
serverapp = "ownlm.privacy.federation:server_app"
clientapp = "ownlm.privacy.federation:client_app"

[tool.flwr.app.config]
{config}
""")
    return directory


# --- processes --------------------------------------------------------------------------------------------------


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        from ownlm.errors import ConfigError

        raise ConfigError(f"{name} is not installed next to {sys.executable}",
                          hint="install the federation extra: pip install 'ownlm[federation]' (flwr 1.42)")
    return str(path)


def _env(flwr_home: Path) -> dict:
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # flwr-serverapp/-clientapp
    return env


@dataclass
class FlowerProcess:
    """A Flower process this module started (stopped by its own pid only)."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _spawn(name: str, cmd: list[str], env: dict, log_path: Path) -> FlowerProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return FlowerProcess(name, proc, log_path)


def federation_dir(home: Path) -> Path:
    return Path(home) / "federation"


def start_superlink(home: Path, host: str = "127.0.0.1", port: int = 9091, tls: "ServerTLS | None" = None) -> FlowerProcess:
    """The SuperLink of the server device (Fleet, Control and runtime APIs on one port): over TLS with `tls`
    (privacy/fedtls.py: the home's CA and a certificate for `host`), plain HTTP (`--insecure`) only without."""
    fed = federation_dir(home)
    security = ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key), "--ssl-ca-certfile", str(tls.ca)] \
        if tls is not None else ["--insecure"]
    cmd = [_bin("flower-superlink"), *security, "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--isolation", "subprocess"]
    return _spawn("superlink", cmd, _env(fed / "flwr" / "superlink"), fed / "logs" / "superlink.log")


def start_supernode(home: Path, superlink: str, user: str, port: int = 9094, gate: bool = True,
                    ca: Path | None = None) -> FlowerProcess:
    """A device's SuperNode; its ClientApp opens the store in `home` and acts for `user`. With `ca` (the server's
    federation CA certificate) it connects over TLS and verifies the SuperLink against it; without, plain HTTP."""
    fed = federation_dir(home)
    node_config = config_string({"home": str(Path(home).resolve()), "user": user, "superlink": superlink, "gate": gate})
    security = ["--root-certificates", str(ca)] if ca is not None else ["--insecure"]
    cmd = [_bin("flower-supernode"), *security, "--superlink", superlink, "--host", "127.0.0.1", "--port", str(port),
           "--node-config", node_config]
    return _spawn(f"supernode:{port}", cmd, _env(fed / "flwr" / f"supernode-{port}"), fed / "logs" / f"supernode-{port}.log")


def wait_port(host: str, port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    from ownlm.errors import ConfigError

    raise ConfigError(f"nothing listens on {host}:{port} after {timeout:.0f} s", hint="see home/federation/logs/")


def round_dir(home: Path, round_id: str) -> Path:
    return federation_dir(home) / "rounds" / round_id


def run_round(home: Path, superlink: str, run_config: dict, timeout_s: float = 1800, ca: Path | None = None) -> dict:
    """Submit one round to the SuperLink with `flwr run` (over TLS verified with `ca`, else plain HTTP) and wait
    for the ServerApp's result.json."""
    from ownlm.errors import ConfigError

    fed = federation_dir(home)
    flwr_home = fed / "flwr" / "cli"
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{Path(ca).resolve()}"\n' if ca is not None else "insecure = true\n"
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\naddress = "{superlink}"\n{security}')
    app = write_app(fed / "app")
    cfg = {**run_config, "home": str(Path(run_config["home"]).resolve())}
    result_path = round_dir(home, cfg["round"]) / "result.json"
    log_path = fed / "logs" / f"run-{cfg['round']}.log"
    proc = _spawn("flwr run", [_bin("flwr"), "run", str(app), FEDERATION, "--run-config", config_string(cfg), "--stream"],
                  _env(flwr_home), log_path)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if result_path.exists():
                return json.loads(result_path.read_text())
            if proc.proc.poll() is not None and not result_path.exists():
                time.sleep(1.0)  # the stream can end a moment before the file is renamed into place
                if result_path.exists():
                    continue
                raise ConfigError(f"the federated round ended without a result ({proc.log_tail(1500)})",
                                  hint=f"see {log_path} and home/federation/logs/superlink.log")
            time.sleep(0.3)
        raise ConfigError(f"the federated round took longer than {timeout_s:.0f} s", hint=f"see {log_path}")
    finally:
        proc.stop()


# --- the Flower apps --------------------------------------------------------------------------------------------


def secure_aggregator(spec, dim: int, public: bytes | None = None):
    """The sum aggregator for a round: PlainSum of float vectors, or (spec.secure) secure_agg.SecureSum of CKKS
    ciphertexts under the person's `public` context, which holds no secret key: the server cannot decrypt."""
    from ownlm.privacy.aggregate import PlainSum

    if not spec.secure:
        return PlainSum(dim)
    from ownlm.errors import ConfigError
    from ownlm.privacy.secure_agg import SecureSum

    if public is None:
        raise ConfigError("a secure round needs the person's public CKKS context to add ciphertexts",
                          hint="the devices send it with their updates (ownlm federate key import on each)")
    return SecureSum(public, dim)


def _open(home: str):
    from ownlm.settings import load_settings
    from ownlm.store import Store

    settings = load_settings(home=home)
    return settings, Store(settings.home, os.environ.get("OWNLM_PASSPHRASE"))


def _write_private_json(path: Path, doc: dict) -> None:
    from ownlm.fsutil import atomic_write

    atomic_write(path, json.dumps(doc, indent=1, default=str))


def server_round(grid, cfg: dict) -> dict:
    """The ServerApp's body for one round (see the module doc); returns and writes the result."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from ownlm.basemodel import base_sha256, resolve_base
    from ownlm.errors import OwnlmError, UpdateRefused
    from ownlm.privacy import fedupdate as fu
    from ownlm.privacy.aggregate import finish

    settings, store = _open(cfg["home"])
    user = store.get_user(cfg["user"])
    source = resolve_base(settings.base)
    spec = fu.RoundSpec(round_id=cfg["round"] or fu.new_round_id(), user=user.name,
                        base_sha256=base_sha256(source, settings.home), method=cfg["method"], lr=float(cfg["lr"]),
                        max_steps=int(cfg["max_steps"]) or None, epochs=int(cfg["epochs"]), qat=bool(cfg["qat"]),
                        r=int(cfg["r"]), alpha=float(cfg["alpha"]), anchor_kl=float(cfg["anchor_kl"]), secure=bool(cfg["secure"]),
                        dp_epsilon=float(cfg["dp_epsilon"]) or None)  # TOML has no null: 0 asks for no DP
    out_dir = round_dir(settings.home, spec.round_id)
    result: dict = {"round": spec.round_id, "method": spec.method, "user": user.name, "refused": [], "failed": [],
                    "installed": {}, "state": "failed"}
    t0 = time.time()
    try:
        state = fu.start_round(store, user, spec, int(cfg["devices"]))
        deadline = time.time() + float(cfg["wait_s"])
        while len(list(grid.get_node_ids())) < int(cfg["devices"]) and time.time() < deadline:
            time.sleep(0.5)
        nodes = list(grid.get_node_ids())
        result["nodes"] = len(nodes)
        content = RecordDict({"spec": ConfigRecord({"json": spec.to_json()})})
        replies = list(grid.send_and_receive(
            [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes], timeout=float(cfg["timeout_s"])))
        summer, node_of, carried = None, {}, []
        for i, reply in enumerate(replies):
            if reply.has_error():
                result["failed"].append({"node": str(reply.metadata.src_node_id), "error": reply.error.reason[:500]})
                continue
            try:
                header = json.loads(reply.content["update"]["header"])
                payload, public = _received_payload(reply.content["payload"])
            except (KeyError, TypeError, ValueError) as e:  # not what an ownlm device sends: refuse it, go on
                result["refused"].append({"node": str(reply.metadata.src_node_id), "reason": f"malformed reply ({e!r})"[:300]})
                continue
            if cfg["keep_received"]:  # what the server received, byte for byte (tests look for plaintext in it)
                _keep_received(out_dir / "received", i, reply.content["update"]["header"], payload, public)
            try:
                fu.verify_update(store, user, state, header, payload, public_context=public)
            except OwnlmError as e:  # UpdateRefused, or a malformed layout
                result["refused"].append({"node": str(reply.metadata.src_node_id), "reason": e.message})
                continue
            if summer is None:
                summer = secure_aggregator(spec, header["dim"], public)
            summer.add(payload, header["weight"])
            node_of[header["device"]] = reply.metadata.src_node_id
            if "retire" in reply.content:  # deletes made on that device (privacy/fedretire.py), for every device
                carried += json.loads(reply.content["retire"]["json"])
        need = int(cfg["min_devices"]) or int(cfg["devices"])
        if len(state.accepted) < need:
            raise UpdateRefused(f"{len(state.accepted)} of {need} devices sent a valid update; nothing was aggregated",
                                hint="see the refused and failed devices in the result and the audit log")
        if spec.secure:  # the encrypted sum goes back; each device decrypts and builds the same model itself
            records, figures = _secure_installs(state, *summer.total())
        else:
            work = out_dir / "work"
            bundles, figures = fu.aggregate_bundles(store, settings, user, state, finish(*summer.total()), work,
                                                    source.name)
            shutil.rmtree(work, ignore_errors=True)
            records = {d: {"round": spec.round_id, "bundle": b} for d, b in bundles.items()}
        result.update(figures)
        from ownlm.privacy.fedretire import apply_carried

        notices, result["retired_here"] = apply_carried(store, user, carried)  # this node's copies go first
        for rec in {id(r): r for r in records.values()}.values():  # a secure round shares one record
            rec["retire"] = json.dumps(notices)
        installs = [Message(RecordDict({"install": ConfigRecord(records[d])}), dst_node_id=node_of[d],
                            message_type=INSTALL) for d in records]
        device_of = {v: k for k, v in node_of.items()}
        for reply in grid.send_and_receive(installs, timeout=float(cfg["timeout_s"])):
            dev = device_of.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
            if reply.has_error():
                result["failed"].append({"device": dev, "error": reply.error.reason[:500]})
            else:
                result["installed"][dev] = json.loads(reply.content["result"]["json"])
        result["state"] = "installed" if len(result["installed"]) == len(records) else "partly installed"
    except OwnlmError as e:
        result["error"] = e.message
    except Exception as e:  # a bug: keep the traceback in the server's log, the reason in the result
        log.error("federated round %s: %s", spec.round_id, traceback.format_exc())
        result["error"] = f"internal error: {e!r}"
    finally:
        result["seconds"] = round(time.time() - t0, 2)
        with store.tx() as db:
            store.audit(db, user.id, fu.FINISHED, round=spec.round_id, state=result["state"],
                        accepted=sorted(result.get("weights") or {}), refused=len(result["refused"]),
                        failed=len(result["failed"]), model=result.get("model"))
        _write_private_json(out_dir / "result.json", result)
        store.close()
    return result


def _received_payload(record) -> tuple[np.ndarray | bytes, bytes | None]:
    """(payload, public context) of a device's reply: a float32 Array, or (secure) CKKS bytes and the context."""
    from flwr.app import ConfigRecord

    if isinstance(record, ConfigRecord):
        return bytes(record["ckks"]), bytes(record["public"])
    return record["v"].numpy(), None


def _keep_received(directory: Path, i: int, header_text: str, payload, public: bytes | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{i}.header.json").write_text(header_text)
    if public is None:
        (directory / f"{i}.payload.f32").write_bytes(np.ascontiguousarray(payload).tobytes())
    else:
        (directory / f"{i}.payload.ckks").write_bytes(payload)
        (directory / f"{i}.public.ctx").write_bytes(public)


def _secure_installs(state, total: bytes, weight: float) -> tuple[dict[str, dict], dict]:
    """What each device of a secure round gets back: the encrypted sum, the summed weight and the round's
    description (the same for all, so every device builds the same model), and the round's figures."""
    from ownlm.artifact.manifest import model_id

    spec, headers = state.spec, list(state.accepted.values())
    created = time.time()
    weights = {h["device"]: h["weight"] for h in headers}
    fed = {"layout": headers[0]["layout"], "version": max(h["max_version"] for h in headers) + 1, "created": created,
           "devices": sorted(weights), "weights": weights, "dp": {h["device"]: h["dp"] for h in headers}}
    record = {"round": spec.round_id, "sum": total, "weight": float(weight), "fed": json.dumps(fed)}
    figures = {"round": spec.round_id, "method": spec.method, "secure": True, "model": f"{model_id(created)}_v{fed['version']}",
               "version": fed["version"], "devices": sorted(weights), "weights": weights, "sum_bytes": len(total),
               "key_id": state.key_id}
    return {d: record for d in weights}, figures


def client_train(msg, context):
    """The ClientApp's train handler: this device's update for the round in `msg` (see fedupdate.make_update)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    from ownlm.errors import OwnlmError
    from ownlm.privacy import fedupdate as fu

    node = dict(context.node_config)
    settings, store = _open(node["home"])
    try:
        user = store.get_user(node["user"])
        spec = fu.RoundSpec.from_json(msg.content["spec"]["json"])
        work = federation_dir(settings.home) / "work" / spec.round_id
        try:
            update, _built = fu.make_update(store, settings, user, spec, work, destination=node.get("superlink"))
        except OwnlmError as e:
            with store.tx() as db:
                store.audit(db, user.id, "federated_update_withheld", round=spec.round_id, reason=e.message)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if spec.secure:
            payload = ConfigRecord({"ckks": update.payload, "public": update.public_context})
        else:
            payload = ArrayRecord({"v": Array(update.payload)})
        from ownlm.privacy.fedretire import pending_notices

        return Message(RecordDict({"update": ConfigRecord({"header": fu.header_text(update.header)}), "payload": payload,
                                   "retire": ConfigRecord({"json": json.dumps(pending_notices(store, settings, user))})}),
                       reply_to=msg)
    finally:
        store.close()


def client_install(msg, context):
    """The ClientApp's install handler: verify, (judge,) install the round's aggregate on this device."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from ownlm.privacy import fedupdate as fu

    node = dict(context.node_config)
    settings, store = _open(node["home"])
    try:
        user = store.get_user(node["user"])
        rec = msg.content["install"]
        gate = bool(node.get("gate", True))
        from ownlm.privacy.fedretire import apply_carried

        _, retired = apply_carried(store, user, json.loads(rec["retire"]) if "retire" in rec else [])
        if "sum" in rec:  # a secure round: decrypt the sum here and build the model (privacy/securefed.py)
            from ownlm.basemodel import resolve_base
            from ownlm.privacy.securefed import install_secure_sum

            work = federation_dir(settings.home) / "work" / f"{rec['round']}-install"
            try:
                res = install_secure_sum(store, settings, user, str(rec["round"]), bytes(rec["sum"]), float(rec["weight"]),
                                         json.loads(rec["fed"]), work, resolve_base(settings.base).name, gate=gate)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        else:
            res = fu.install_aggregate(store, settings, user, bytes(rec["bundle"]), str(rec["round"]), gate=gate)
        doc = {"model": res.model_id, "version": res.version, "signer": res.signer, "retired": retired}
        return Message(RecordDict({"result": ConfigRecord({"json": json.dumps(doc)})}), reply_to=msg)
    finally:
        store.close()


def _apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    server, client = ServerApp(), ClientApp()

    @server.main()
    def _main(grid, context) -> None:
        server_round(grid, {**RUN_CONFIG, **dict(context.run_config)})

    client.train()(client_train)
    client.query("install")(client_install)
    return server, client


try:  # flwr is the optional `federation` extra: without it this module still imports (the CLI says what to install)
    server_app, client_app = _apps()
except ImportError:  # pragma: no cover
    server_app = client_app = None
