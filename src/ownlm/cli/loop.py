"""`ownlm train` (one learning round now), `ownlm status`, `ownlm privacy`."""

from __future__ import annotations

import json
import time
from datetime import datetime

import click
from rich.table import Table

from ownlm.cli.base import Context, cli, cli_store, console, pass_ctx, user_option


@cli.command("train")
@user_option
@click.option("--max-steps", type=int, help="Cap on optimizer steps.")
@click.option("--time-budget", type=float, help="Cap on training seconds.")
@click.option("--epochs", type=int, help="Passes over the data.")
@click.option("--remote", is_flag=True,
              help="Train on the remote trainer (remote.trainer_url); only tiers 0 and 2 allow it, tier 1 refuses.")
@pass_ctx
def train_cmd(ctx: Context, user, max_steps, time_budget, epochs, remote) -> None:
    """Run one learning round now: dataset → train → compress → quality gate → sign → seal → deploy."""
    import threading

    from ownlm.loop import run_job
    from ownlm.store.jobs import PROCESS_OWNER

    settings = ctx.settings(user=user)
    overrides = {k: v for k, v in {"max_steps": max_steps, "time_budget_s": time_budget, "epochs": epochs}.items() if v}
    settings = settings.model_copy(update={"personalization": settings.personalization.model_copy(update=overrides)})
    if remote:
        from ownlm.privacy.remote import remote_round

        with cli_store(settings) as store:
            built, res = remote_round(store, settings, ctx.user(store, settings))
        console.print(f"remote round: {len(built.examples)} redacted examples sent; installed {res.model_id} "
                      f"(version {res.version}, signed by {res.signer}) after it passed the quality gate on this node.")
        return
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        # reserved for this process: a node serving the same home must not start it too
        job_id = store.enqueue_job(u.id, "requested on the command line", owner=PROCESS_OWNER)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(run_job(store, settings, job_id)))
        worker.start()
        with console.status("starting…") as status:
            while worker.is_alive():
                j = store.job(job_id)
                text = f"{j['stage'] or j['state']}: {j['progress'] * 100:.0f}%"
                live = (j.get("result") or {}).get("live") if j["stage"] == "train" else None
                if live and live.get("loss") is not None:
                    eta = f", ETA {live['eta_s']:.0f} s" if live.get("eta_s") is not None else ""
                    text += (f" — step {live['step']}/{live['total_steps']}, loss {live['loss']:.3f}, "
                             f"{live['tokens_per_s']:.0f} tokens/s{eta}")
                status.update(text)
                worker.join(0.5)
    _print_result(result)


def _print_result(job: dict) -> None:
    r = job.get("result") or {}
    table = Table(title=f"round {job['id']}: {job['state']}", show_header=False)
    table.add_row("outcome", job["reason"] or "")
    for key in ("train_examples", "heldout_examples", "steps", "train_seconds", "tokens_per_s", "heldout_loss_base",
                "heldout_loss_lora", "heldout_loss_compressed", "personalization_score", "fidelity", "kl_drift",
                "artifact_bytes", "model_id"):
        if r.get(key) is not None:
            v = r[key]
            table.add_row(key.replace("_", " "), f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    if job["state"] != "deployed":
        raise SystemExit(2)


@cli.command()
@user_option
@pass_ctx
def status(ctx: Context, user) -> None:
    """Samples since the last model, the next check, the running or last round and why it ended."""
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        since, nxt, jobs, active = store.samples_since(u.id), store.next_run_at(u.id), store.jobs(u.id, 5), store.active_model(u.id)
    cfg = settings.personalization
    console.print(f"user {u.name}: privacy tier {u.privacy_tier}; serving {active['id'] if active else 'the base model'}")
    console.print(f"{since} new samples since the last model (a round needs {cfg.min_samples}); next check "
                  + (datetime.fromtimestamp(nxt).isoformat(' ', 'seconds') if nxt else "when the node runs"))
    for j in jobs:
        when = datetime.fromtimestamp(j["created_at"]).isoformat(" ", "seconds")
        console.print(f"  {when} {j['id']} {j['state']}{' (' + j['stage'] + ')' if j['stage'] else ''}: {j['reason']}")


@cli.group()
def privacy() -> None:
    """Where your conversations may go (tiers 0-3)."""


@privacy.command("show")
@user_option
@pass_ctx
def privacy_show(ctx: Context, user) -> None:
    """Show the tier and what each tier means."""
    from ownlm.loop import round_epsilon
    from ownlm.privacy.tiers import TIERS

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        store_choice = store.dp_epsilon(u.id)
        eps = round_epsilon(store, settings, u.id)
    for tier, meaning in TIERS.items():
        console.print(f"{'●' if tier == u.privacy_tier else ' '} {tier}  {meaning}")
    console.print(f"differential privacy for local rounds: {f'on, ε = {eps:g} per round' if eps else 'off'}"
                  f" ({'your choice' if store_choice is not None else 'the node default'}; `ownlm privacy dp`)")


@privacy.command("set")
@click.argument("tier", type=click.IntRange(0, 3))
@click.option("--confirm", is_flag=True, help="Required to lower the tier (let data go further).")
@user_option
@pass_ctx
def privacy_set(ctx: Context, tier: int, confirm: bool, user) -> None:
    """Set the privacy tier (recorded in the audit log)."""
    from ownlm.privacy.tiers import set_tier

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        res = set_tier(store, ctx.user(store, settings), tier, confirm)
    console.print(f"privacy tier {res['previous']} → {res['tier']}: {res['meaning']}")


@privacy.command("dp")
@click.argument("epsilon")
@user_option
@pass_ctx
def privacy_dp(ctx: Context, epsilon: str, user) -> None:
    """Differential privacy for your local rounds: EPSILON (e.g. 8; smaller is more private and costs more
    utility), 'off', or 'default' (the node's personalization.dp_epsilon). Recorded in the audit log."""
    from ownlm.errors import InvalidInput

    words = {"off": 0.0, "default": None}
    if epsilon.lower() in words:
        value = words[epsilon.lower()]
    else:
        try:
            value = float(epsilon)
        except ValueError:
            raise InvalidInput(f"epsilon {epsilon!r} is not a number", hint="give e.g. 8, 'off' or 'default'") from None
    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        store.set_dp_epsilon(ctx.user(store, settings).id, value)
    console.print("differential privacy: " + ("the node default" if value is None else "off" if value == 0
                                              else f"ε = {value:g} per round (δ = min(1e-5, 1/conversations))"))


@cli.command()
@click.option("--persona", type=click.Choice(["bram", "mira", "chiara"]), default="bram", show_default=True,
              help="Which fictional user's history to learn from.")
@click.option("--steps", type=int, default=None,
              help="Optimizer steps of the round (default: the node's personalization.max_steps): a fixed number, "
                   "so a busy machine trains the same model, only later.")
@click.option("--lr", type=float, default=None, help="LoRA learning rate (default: the node's personalization.lr).")
@click.option("--qat/--no-qat", default=None,
              help="Train the 1-bit factors quantization-aware (default: the node's personalization.qat).")
@pass_ctx
def demo(ctx: Context, persona: str, steps: int | None, lr: float | None, qat: bool | None) -> None:
    """The whole loop from an EMPTY home (keeps only the model cache): import, learn, gate, deploy, compare."""
    from ownlm import demo as demo_mod

    settings = ctx.settings()
    chosen = {k: v for k, v in (("max_steps", steps), ("lr", lr), ("qat", qat)) if v is not None}
    settings = settings.model_copy(update={"personalization": settings.personalization.model_copy(
        update={"time_budget_s": None, **chosen})})
    result = demo_mod.run(settings, persona)
    if result.get("state") == "failed":  # a refusal is a result the demo shows (in red, with the gate's reason)
        raise SystemExit(2)


@cli.command("eval")
@click.option("--model", "model", help="Version or id of the model (default: the active one).")
@user_option
@click.option("--quick", is_flag=True, help="Skip the general-ability benchmarks (WikiText-2, ARC-Easy).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON only.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of held-out loss per version.")
@pass_ctx
def eval_cmd(ctx: Context, model, user, quick, as_json, plot) -> None:
    """Measure the personal model against the base: personalization, behaviour, drift, compression, speed."""
    from ownlm.evaluate.run import evaluate_user, plot_versions, to_json

    settings = ctx.settings(user=user)
    with cli_store(settings) as store:
        u = ctx.user(store, settings)
        report, extras = evaluate_user(store, settings, u, model, quick,
                                       progress=(lambda s: None) if as_json else (lambda s: console.print(f"[dim]{s}[/]")))
    if plot:
        plot_versions(extras, plot)
    if as_json:
        click.echo(to_json(report, extras))
        return
    columns, rows = report.to_table()
    table = Table(*columns, title=f"{u.name}: {extras['model']} vs base")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print(f"speed rows: the {report.notes['speed_engine']} engine, as `ownlm serve` would serve")
    for label, kinds in extras["probes"].items():
        console.print(f"{label} probes: " + ", ".join(
            f"{kind} {v['passed']}/{v['total']} (95% CI {v['ci95'][0]:.0%}–{v['ci95'][1]:.0%})" for kind, v in kinds.items()))
    def share(rate):  # None: no answer ended within the budget, so an ending habit could not be judged
        return "none finished" if rate is None else f"{rate:.0%}"

    for h in extras["habits"]:
        console.print(f"reply habit, {h['habit']}: in {share(h['personal'])} of the personal model's held-out "
                      f"answers, {share(h['base'])} of the base's")
    console.print(f"artifact {extras['artifact_bytes']:,} B on disk (1-bit payload {extras['delta_payload_bytes']:,} B: "
                  f"{extras['ratio_to_fp16_lora']:.0f}x smaller than the fp16 LoRA, {extras['ratio_to_fp16_base']:,.0f}x "
                  f"smaller than the fp16 base)")
