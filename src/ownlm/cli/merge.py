"""`ownlm merge`: personal models combined into one new signed version (node/merge.py)."""

from __future__ import annotations

import click

from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option
from ownlm.errors import MergeConfigError
from ownlm.node.merge import METHODS, NEEDS_DENSITY


def _weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise MergeConfigError(f"--weights {text!r} is not a comma-separated list of numbers",
                               hint="pass e.g. --weights 0.5,0.5") from None


@cli.command()
@click.argument("models", nargs=-1, required=True, metavar="MODEL_A MODEL_B [MODEL...]")
@click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True,
              help="peft's combination: linear (weighted sums of A and B), cat (stacked: the exact weighted sum, cut back "
                   "to --rank by SVD), svd (the weighted sum by SVD at --rank), ties, dare_linear, dare_ties "
                   f"({', '.join(NEEDS_DENSITY)} need --density).")
@click.option("--weights", metavar="W1,W2,...", help="One weight per model (default: equal, summing to 1).")
@click.option("--density", type=float, help=f"Share of each delta kept, in (0, 1] ({', '.join(NEEDS_DENSITY)} only).")
@click.option("--rank", type=click.IntRange(1), help="Rank of the merged model (default: the largest source rank; "
              "it must fit the 64 KB artifact budget).")
@click.option("--into", "into", metavar="NAME", help="The user who gets the merged model as their next version "
              "(default: --user). Created if missing, e.g. a new user starting from two others' models.")
@click.option("--distill-steps", type=click.IntRange(0), default=8, show_default=True,
              help="Scale-distillation steps after the 1-bit compression (0: none; each step is tens of seconds on a "
                   "CPU for the 135M base, take 100 or more on a GPU).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds dare's random drops and distillation.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to run (default auto).")
@user_option
@pass_ctx
def merge(ctx: Context, models, method, weights, density, rank, into, distill_steps, seed, device, user) -> None:
    """Merge personal MODELs (ids or version numbers of --user; USER:MODEL for another user's) into one signed
    model, installed as the next version of --into (default --user) and served to them."""
    from ownlm.cli.bitdelta import _load_fp32
    from ownlm.node.merge import MergeConfig, merge_models

    config = MergeConfig(method=method, weights=_weights(weights), density=density, rank=rank,
                         distill_steps=distill_steps, seed=seed)
    config.weights_for(len(models))
    settings = ctx.settings(user=user, device=device)
    with cli_store(settings) as store:
        owner = ctx.user(store, settings)
        target = owner if into is None else store.resolve_user(into, settings.personalization.privacy_tier)
        base = _load_fp32(settings)
        with console.status(f"merging {len(models)} models ({method})…", spinner="dots"):
            done = merge_models(store, settings, list(models), owner, config, into=target, base=base)
    r, res = done.report, done.installed
    sources = ", ".join(f"{s.user.name}:{s.model['id']} (v{s.model['version']})" for s in done.sources)
    console.print(f"merged {sources} with {r['method']} (weights {', '.join(f'{w:g}' for w in r['weights'])}"
                  + (f", density {r['density']:g}" if r["density"] is not None else "") + ")", highlight=False, markup=False)
    cut = f", cut from rank {r['merged_rank']} by SVD" if r["merged_rank"] > r["rank"] else ""
    d = r["distill"]
    dist = (f"; scales distilled {d['steps']} steps, logit {d['loss']} {d['before']:.4g} -> {d['after']:.4g}"
            if d.get("steps") else "")
    console.print(f"rank {r['rank']}{cut}; lora1 payload {r['payload_bytes']:,} bytes{dist}; {r['seconds']:.1f} s",
                  highlight=False, markup=False)
    console.print(f"installed {res.model_id} (v{res.version}) for {target.name}; it serves them now", highlight=False,
                  markup=False)
