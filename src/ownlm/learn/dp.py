"""Differentially private training of the personal adapter: DP-SGD with Opacus on the LoRA parameters only.

    TrainConfig(dp=True, dp_epsilon=8)            # or dp_noise_multiplier=1.0; train() does the rest

What a "sample" is. batching.py never packs two examples into one row (one row = one example), but one
conversation can give several training examples (augmented variants and paraphrases share its
conversation_id), so the privacy unit here is the *conversation*: every step draws each conversation
independently with probability q = dp_batch_size / conversations (Poisson sampling, what the RDP and PRV
accountants assume), takes all the training examples of the drawn ones, and the gradient of one conversation
(the mean over its examples of each example's mean target-token loss) is clipped to dp_max_grad_norm before
the sum gets Gaussian noise of std dp_noise_multiplier x dp_max_grad_norm and is divided by the expected
number of conversations per step. The (epsilon, delta) reported is for adding or removing one whole
conversation. Length-grouped batches (the fast non-DP path) are not used: under DP the drawn examples are
split into physical batches under batch_tokens only to bound memory, and one optimizer step follows all of them.

How per-conversation gradients are computed. Opacus' GradSampleModule hooks every LoRA factor (an nn.Linear
inside peft's layers) and gets per-row gradients from its einsum grad sampler; rows of one conversation are
then summed. Under quantization-aware training (learn/qat.py) the factor's weight is a torch parametrization:
the Linear has no parameter of its own, and the stock GradSampleModule, in hooks as in functorch mode, hooks
the ParametrizationList instead, whose forward takes no input (it fails in `_get_batch_size`). `_LoraGradSample`
hooks the parametrized Linear as one unit and lets Opacus' functorch sampler vmap the whole layer, so the
per-row gradients of the latent weight and the scale go through SignTimesScale's straight-through rule
(tests/test_dp.py checks them against one-row backward passes). "ew" (expanded weights) does not know
parametrizations either.

Clipping, noise and the step are Opacus' DPOptimizer around the project's AdamW (post-processing keeps the
guarantee); the accountant is Opacus' RDP (default) or PRV one. The noise and the Poisson draws come from a
torch generator seeded from the OS's randomness, never from `seed`, and never written to a checkpoint: a
published seed would let anyone subtract the noise. So a DP run is not bit-reproducible, and a resumed run
continues with fresh randomness (its accounting counts every step taken, before and after the crash).
Opacus' secure_mode (torchcsprng) is not used. What the budget covers: the adapter's weights. The losses in
the training report (and the manifest's loss fields) are computed without noise and stay on this machine.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ownlm.learn.batching import collate, plan_batches
from ownlm.learn.steps import repeat_candidates, target_logits
from ownlm.learn.tokens import IGNORE, TokenizedExample

UNIT = "conversation"
ACCOUNTANTS = ("rdp", "prv")


@dataclass
class Budget:
    """What the manifest's `training.dp` records."""

    epsilon: float  # spent over `steps` (for adding or removing one `unit`); inf without noise
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    accountant: str
    steps: int
    sample_rate: float  # q: probability that a unit is in a step
    expected_batch_size: float  # q x units
    units: int  # conversations in the training data
    unit: str = UNIT
    target_epsilon: float | None = None
    covers: str = "adapter weights"

    def to_dict(self) -> dict:
        """JSON-safe: an unbounded epsilon (no noise) is None, since canonical JSON has no Infinity."""
        d = asdict(self)
        d["epsilon"] = None if math.isinf(self.epsilon) else self.epsilon
        return d


def validate(config, bad) -> None:
    """The dp_* fields of a TrainConfig; `bad(name, why)` builds the ConfigError."""
    if not isinstance(config.dp, bool):
        raise bad("dp", "must be true or false")
    if config.dp_noise_multiplier is not None and (isinstance(config.dp_noise_multiplier, bool)
                                                   or not config.dp_noise_multiplier >= 0):
        raise bad("dp_noise_multiplier", "must be a number >= 0 or None")
    if config.dp_epsilon is not None and not (isinstance(config.dp_epsilon, (int, float)) and config.dp_epsilon > 0):
        raise bad("dp_epsilon", "must be a positive number or None")
    if config.dp_delta is not None and not 0 < config.dp_delta < 1:
        raise bad("dp_delta", "must be in (0, 1) or None")
    if not config.dp_max_grad_norm > 0:
        raise bad("dp_max_grad_norm", "must be positive")
    if not isinstance(config.dp_batch_size, int) or isinstance(config.dp_batch_size, bool) or config.dp_batch_size < 1:
        raise bad("dp_batch_size", "must be a positive integer")
    if config.dp_accountant not in ACCOUNTANTS:
        raise bad("dp_accountant", f"must be one of {', '.join(ACCOUNTANTS)}")
    if config.dp:
        if (config.dp_noise_multiplier is None) == (config.dp_epsilon is None):
            raise bad("dp_epsilon", "with dp on, set exactly one of dp_epsilon (a target) and dp_noise_multiplier")
        if config.dropout:
            raise bad("dropout", "must be 0 with dp (dropout draws are not part of the accounting; keep it simple)")


def units_of(examples: list[TokenizedExample]) -> list[list[int]]:
    """Example indices grouped by conversation (an example without a conversation id is its own unit)."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.conversation_id or f"#example-{i}", []).append(i)
    return list(groups.values())


def steps_per_epoch(examples: list[TokenizedExample], config) -> int:
    """Expected steps for each unit to be drawn once: ceil(units / dp_batch_size)."""
    return max(1, math.ceil(len(units_of(examples)) / config.dp_batch_size))


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """(epsilon, delta)-DP of `steps` Poisson-sampled Gaussian steps, by Opacus' accountant (inf without noise)."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]  # what `steps` calls of acc.step() would build
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the RDP accountant warns about its order grid at huge epsilons
        return float(acc.get_epsilon(delta=delta))


def noise_for(target_epsilon: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """The noise multiplier that spends `target_epsilon` in `steps` steps (Opacus' binary search)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                          steps=max(1, steps), accountant=accountant))


def _grad_sample_module():
    from opacus.grad_sample import GradSampleModule

    class _LoraGradSample(GradSampleModule):
        """GradSampleModule that treats a parametrized LoRA factor (QAT) as one layer, see the module doc."""

        def iterate_submodules(self, module):
            if parametrize.is_parametrized(module) and any(p.requires_grad for p in module.parameters()):
                yield module  # not a registered layer type: Opacus' functorch sampler vmaps the whole layer
                return
            yield from super().iterate_submodules(module)

        def capture_activations_hook(self, module, forward_input, _forward_output):
            # Opacus checks trainable parameters of the module itself; a parametrized one keeps them one level down.
            trainable = [p for p in module.parameters() if p.requires_grad]
            if not (trainable and module.training and torch.is_grad_enabled() and self.hooks_enabled):
                return
            if not hasattr(module, "activations"):
                module.activations = []
            module.activations.append([t.detach() for t in forward_input])
            for p in trainable:
                p._forward_counter += 1

    return _LoraGradSample


class DPTrainer:
    """One DP-SGD step per call of `step`; train() keeps the schedule, checkpoints, evaluation and saving."""

    def __init__(self, peft_model, causal_lm, optimizer, examples: list[TokenizedExample], config, pad_id: int,
                 total_steps: int, device: torch.device):
        from opacus.optimizers import DPOptimizer

        self.model, self.causal_lm, self.config, self.pad_id, self.device = peft_model, causal_lm, config, pad_id, device
        self.examples = examples
        self.units = units_of(examples)
        n = len(self.units)
        self.sample_rate = min(1.0, config.dp_batch_size / n)
        self.expected = self.sample_rate * n
        self.delta = config.dp_delta if config.dp_delta is not None else min(1e-5, 1.0 / n)
        if config.dp_noise_multiplier is not None:
            self.sigma = float(config.dp_noise_multiplier)
        else:
            self.sigma = noise_for(config.dp_epsilon, self.sample_rate, total_steps, self.delta, config.dp_accountant)
        # Secret randomness for the noise and the draws (see the module doc); on the model's device.
        self.generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        self.draws = torch.Generator().manual_seed(secrets.randbits(63))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus warns that the base's modules are not validated (they are frozen)
            self.gsm = _grad_sample_module()(causal_lm, batch_first=True, loss_reduction="sum", strict=False)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.sigma, max_grad_norm=config.dp_max_grad_norm,
                                     expected_batch_size=self.expected, loss_reduction="mean", generator=self.generator)

    def draw(self) -> list[int]:
        """Poisson sampling: each unit independently with probability q. Returns unit indices."""
        mask = torch.rand(len(self.units), generator=self.draws) < self.sample_rate
        return torch.nonzero(mask).flatten().tolist()

    def per_unit_grads(self, drawn: list[int]) -> tuple[list[torch.Tensor], float, int, int]:
        """Per-unit gradients (one (len(drawn), *p.shape) tensor per parameter), the batch's mean NLL, tokens, targets."""
        rows = [(u, i) for u, unit in enumerate(drawn) for i in self.units[unit]]  # (position in drawn, example index)
        grads = [torch.zeros((len(drawn), *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        nll_sum, n_tokens, n_loss = 0.0, 0, 0
        plan = plan_batches([len(self.examples[i]) for _, i in rows], self.config.batch_tokens, secrets.randbits(32))
        for chunk in plan:
            batch = collate(self.examples, [rows[k][1] for k in chunk], self.pad_id)
            owner = torch.tensor([rows[k][0] for k in chunk], device=self.device)  # (B,) unit of each row
            per_unit = torch.tensor([len(self.units[drawn[rows[k][0]]]) for k in chunk], device=self.device)
            row_targets = (batch.labels[:, 1:] != IGNORE).sum(1).to(self.device)  # (B,)
            weight = 1.0 / (row_targets * per_unit).float()  # each unit's loss: mean over its examples of mean NLL
            objective, nll = self._objective(batch, weight)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook")  # the frozen base's inputs need no grad
                objective.backward()
            for g, p in zip(grads, self.params):
                g.index_add_(0, owner, p.grad_sample.to(g.dtype))  # rows -> their unit
                p.grad_sample = None
                p.grad = None  # the plain (unclipped) gradient is never used
            nll_sum += float(nll)
            n_tokens += batch.n_tokens
            n_loss += batch.n_loss_tokens
        return grads, nll_sum / max(1, n_loss), n_tokens, n_loss

    def _objective(self, batch, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sum over rows of weight[row] x (NLL + the configured extra terms) at the row's target positions."""
        cfg = self.config
        logits, targets, rows = target_logits(self.causal_lm, batch, self.device)
        w = weight[rows]  # (N,)
        nll = F.cross_entropy(logits, targets, reduction="none")  # (N,)
        objective = (nll * w).sum()
        if cfg.unlikelihood:
            pos, tok = repeat_candidates(targets, rows)
            if pos.numel():
                p = torch.softmax(logits, dim=-1)[pos, tok]
                objective = objective + cfg.unlikelihood * (-torch.log(torch.clamp(1.0 - p, min=1e-5)) * w[pos]).sum()
        if cfg.anchor_kl:
            with torch.no_grad(), self.model.disable_adapter():
                reference, _, _ = target_logits(self.causal_lm, batch, self.device)
            kl = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(reference, -1), log_target=True,
                          reduction="none").sum(-1)
            objective = objective + cfg.anchor_kl * (kl * w).sum()
        return objective, nll.detach().sum()

    def step(self) -> tuple[float | None, int, int, float]:
        """Draw, compute per-unit gradients, clip + noise + AdamW step. Returns (mean NLL or None, tokens, targets,
        the largest per-unit gradient norm before clipping)."""
        drawn = self.draw()
        if drawn:
            grads, loss, n_tokens, n_loss = self.per_unit_grads(drawn)
        else:  # an empty draw still takes a (noise-only) step: the accountant counts it
            grads, loss, n_tokens, n_loss = [torch.zeros((0, *p.shape), device=p.device) for p in self.params], None, 0, 0
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in grads], 1).norm(dim=1) if drawn else None
        for g, p in zip(grads, self.params):
            p.grad_sample = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, n_tokens, n_loss, float(norms.max()) if norms is not None else 0.0

    def budget(self, steps: int) -> Budget:
        return Budget(
            epsilon=epsilon_for(self.sigma, self.sample_rate, steps, self.delta, self.config.dp_accountant),
            delta=self.delta, noise_multiplier=self.sigma, max_grad_norm=self.config.dp_max_grad_norm,
            accountant=self.config.dp_accountant, steps=steps, sample_rate=self.sample_rate,
            expected_batch_size=self.expected, units=len(self.units), target_epsilon=self.config.dp_epsilon,
        )

    def close(self) -> None:
        self.gsm.remove_hooks()
        for p in self.params:
            for attr in ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
