"""`ownlm demo`: the whole loop on the embedded model, from an empty home to a deployed personal model.

Imports a persona's chat history (a fictional user shipped with ownlm), runs one learning round
(dataset → LoRA training → BitDelta compression → quality gate → signed, sealed bundle → verified install),
then asks base and personal model questions that were never in the training data and checks the answers
against the persona's facts and style.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ownlm.settings import Settings

console = Console()


def reset_home(home: Path) -> None:
    """Empty the home but keep cache/ (the converted base model): the demo starts with no data."""
    if home.exists():
        for entry in home.iterdir():
            if entry.name != "cache":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def run(settings: Settings, persona: str = "bram", probes_per_kind: int = 3, max_tokens: int | None = None) -> dict:
    """max_tokens: per probe answer; None = evaluate.metrics.PROBE_TOKENS (the benchmark's limit)."""
    from ownlm.basemodel import load_base
    from ownlm.capture.importers import parse_file
    from ownlm.store.imports import import_into
    from ownlm.engine import GenerationParams
    from ownlm.engine.personal import PersonalEngine
    from ownlm.loop import STAGES, run_job
    from ownlm.store.jobs import PROCESS_OWNER
    from ownlm.evaluate.habits import degenerate
    from ownlm.evaluate.metrics import PROBE_TOKENS
    from ownlm.evaluate.personas.fixtures import DATA_DIR, PERSONAS, check_answer, probes
    from ownlm.store import Store

    t_start = time.perf_counter()
    reset_home(settings.home)
    settings = settings.model_copy(update={"user": persona})
    with Store(settings.home) as store:
        user = store.create_user(persona)
        history = DATA_DIR / f"{persona}.jsonl"
        counts = import_into(store, user.id, parse_file(history), history.name)
        console.print(f"[bold]1. captured[/] {counts['messages_new']} messages in {counts['conversations_new']} "
                      f"conversations of [bold]{persona}[/] (a fictional user) into an encrypted store")
        job_id = store.enqueue_job(user.id, "ownlm demo", owner=PROCESS_OWNER)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(run_job(store, settings, job_id)))
        columns = (TextColumn("[bold]2. learning[/] {task.description:<26}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("dataset", total=len(STAGES))
            worker.start()
            while worker.is_alive():
                j = store.job(job_id)
                if j["stage"] in STAGES:
                    live = (j.get("result") or {}).get("live") if j["stage"] == "train" else None
                    what = j["stage"]
                    if live and live.get("eta_s") is not None:  # training is most of the round: say how long
                        what = f"train {live['step']}/{live['total_steps']}, ETA {live['eta_s']:.0f} s"
                    bar.update(task, description=what, completed=STAGES.index(j["stage"]) + j["progress"])
                worker.join(0.5)
            bar.update(task, completed=len(STAGES), description="done")
        r = result.get("result") or {}
        _figures(result, r)
        if result.get("state") != "deployed":
            console.print(f"[red]the quality gate kept the base model:[/] {result.get('reason')}")
            return result

        base = load_base(settings)
        engine = PersonalEngine(base, store)
        params = GenerationParams(max_tokens=max_tokens or PROBE_TOKENS, temperature=0, repetition_penalty=settings.repetition_penalty)
        chosen = []
        for kind in ("style", "fact"):
            chosen += [p for p in probes(PERSONAS[persona]) if p.kind == kind][:probes_per_kind]
        table = Table(title="3. questions never seen in training (greedy answers)", show_lines=True)
        table.add_column("question", ratio=2)
        table.add_column("base model", ratio=3)
        table.add_column("personal model", ratio=3)
        passed = {"base": 0, "personal": 0}
        for p in chosen:
            q = [{"role": "user", "content": p.question}]
            answers = {use: engine.stream(q, params, user_id=user.id, use=use).text() for use in ("base", "personal")}
            marks = {}
            for use, a in answers.items():
                ok = check_answer(p.check, a) and not degenerate(a)  # a looping answer passes nothing
                passed[use] += ok
                loops = " (the answer repeats itself)" if degenerate(a) else ""
                marks[use] = f"{a}\n[{'green' if ok else 'dim'}]{'✓' if ok else '✗'} {p.kind}: {p.description}{loops}[/]"
            table.add_row(p.question, marks["base"], marks["personal"])
        console.print(table)
        console.print(f"probe checks passed: base {passed['base']}/{len(chosen)}, personal {passed['personal']}/{len(chosen)}")
        console.print(f"whole demo: {time.perf_counter() - t_start:.0f} s. Try it: `OWNLM_HOME={settings.home} ownlm chat` "
                      f"(as {persona}, the home's only user; --base-model to compare), or OWNLM_HOME={settings.home} ownlm "
                      f"serve, then `OWNLM_HOME={settings.home} ownlm token create {persona}` and open "
                      f"http://127.0.0.1:{settings.port}/")
        result["probes"] = passed
        return result


def _figures(job: dict, r: dict) -> None:
    t = Table(title=f"round {job.get('id')}: {job.get('state')}", show_header=False)
    rows = [
        ("training examples (held-out)", f"{r.get('train_examples')} ({r.get('heldout_examples')})"),
        ("training time", f"{r.get('train_seconds', 0):.0f} s, {r.get('tokens_per_s', 0):.0f} tokens/s, {r.get('steps')} steps"),
        ("held-out NLL base → LoRA → 1-bit", "{:.3f} → {:.3f} → {:.3f}".format(
            r.get("heldout_loss_base") or 0, r.get("heldout_loss_lora") or 0, r.get("heldout_loss_compressed") or 0)),
        ("personalization score", f"{(r.get('personalization_score') or 0) * 100:.1f}% lower held-out NLL than the base"),
        ("gain kept by the 1-bit delta", f"{(r.get('fidelity') or 0) * 100:.0f}%"),
        ("drift KL(base‖personal), generic prompts", f"{r.get('kl_drift', 0):.4f} nats/token"),
        ("personal artifact (delta + manifest)", f"{(r.get('artifact_bytes') or 0) / 1000:.1f} KB; sealed bundle "
                                                 f"{(r.get('bundle_bytes') or 0) / 1000:.1f} KB"),
        ("quality gate", job.get("reason") or ""),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
