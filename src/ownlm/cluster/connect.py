"""One connection to the Ray cluster per process (`ray.init`), made on the first cluster round."""

from __future__ import annotations

import threading

from ownlm.errors import ConfigError
from ownlm.settings import Settings

NAMESPACE = "ownlm"  # the agents' names live here, apart from other Ray applications on the same cluster
_lock = threading.Lock()


def ray_module():
    """The ray package, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("cluster.ray_address is set but the ray package is not installed",
                          hint="pip install 'ownlm[cluster]', or unset cluster.ray_address to train on this node") from None
    return ray


def connect(settings: Settings):
    """ray, connected to settings.cluster.ray_address (once; later calls reuse the connection)."""
    ray = ray_module()
    with _lock:
        if ray.is_initialized():
            return ray
        cfg = settings.cluster
        kw = {"_node_ip_address": cfg.node_ip} if cfg.node_ip else {}
        try:
            # log_to_driver off: the workers' logs stay on the workers (they never hold content, but the node's
            # own log is not the place for other machines' training chatter)
            ray.init(address=cfg.ray_address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False, **kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot connect to the Ray cluster at {cfg.ray_address} ({e})",
                              hint="check cluster.ray_address (`ray status` on the head shows it) and, on a machine "
                                   "with several addresses, cluster.node_ip") from None
    return ray
