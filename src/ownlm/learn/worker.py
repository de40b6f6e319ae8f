"""Run `ownlm.learn.train.train` from files, in its own process, and a rich progress renderer for the CLI.

    python -m ownlm.learn.worker --base DIR_OR_embedded --train train.jsonl [--heldout heldout.jsonl] \
        --out OUT_DIR [--config '{"lr": 1e-4, "epochs": 2}'] [--dataset '{"merkle_root": "..."}'] \
        [--device cpu] [--threads N] [--no-resume] [--quiet]

Examples files are JSONL, one TokenizedExample per line: {"input_ids": [...], "labels": [...],
"conversation_id": "...", "sha256": "..."}. Running the same command again after a crash (even kill -9)
resumes from out_dir/checkpoint/. Exit status 0 on success, 1 with one `error: ...` line on an OwnlmError.
`run_training` is the same thing in process (`ownlm train` runs a whole learning round instead, see
ownlm.loop, which calls `ownlm.learn.train.train` directly).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ownlm.errors import InvalidInput, OwnlmError
from ownlm.learn.tokens import TokenizedExample
from ownlm.learn.train import TrainConfig, TrainProgress, TrainReport, train


def write_examples(path: Path, examples: list[TokenizedExample]) -> None:
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels,
                                "conversation_id": e.conversation_id, "sha256": e.sha256}) + "\n")


def read_examples(path: Path) -> list[TokenizedExample]:
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise InvalidInput(f"cannot read examples file {path}: {e.strerror}", hint="check the --train/--heldout path") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(TokenizedExample(list(d["input_ids"]), list(d["labels"]), d.get("conversation_id", ""), d.get("sha256", "")))
        except (ValueError, KeyError, TypeError) as e:
            raise InvalidInput(f"{path} line {n} is not a tokenized example: {e}",
                               hint="each line needs input_ids and labels lists") from None
    return out


@contextmanager
def rich_progress(console=None) -> Iterator[Callable[[TrainProgress], None]]:
    """A `progress` callback drawing a rich bar with loss, tokens/s and ETA; use as a context manager."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
                   TimeRemainingColumn(), console=console, transient=False)
    task = bar.add_task("train", total=None, loss="-", rate="-")

    def update(p: TrainProgress) -> None:
        names = {"eval_base": "held-out (base)", "train": f"train epoch {p.epoch + 1}", "eval_personal": "held-out (personal)"}
        bar.update(task, description=names.get(p.phase, p.phase), total=p.total_steps, completed=p.step,
                   loss=f"{p.loss:.3f}" if p.loss is not None else "-",
                   rate=f"{p.tokens_per_s:,.0f}" if p.tokens_per_s else "-")

    with bar:
        yield update


def run_training(settings, train_examples, heldout, config: TrainConfig, out_dir: Path, *, resume: bool = True,
                 dataset: dict | None = None, show_progress: bool = True) -> TrainReport:
    """Load the base of `settings` and train, with a progress bar on the terminal: what `ownlm train` calls."""
    from ownlm.basemodel import load_base

    base = load_base(settings)
    if not show_progress:
        return train(base, train_examples, heldout, config, out_dir, resume=resume, dataset=dataset)
    with rich_progress() as cb:
        return train(base, train_examples, heldout, config, out_dir, progress=cb, resume=resume, dataset=dataset)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ownlm.learn.worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="'embedded', a .gguf file or a checkpoint directory")
    ap.add_argument("--train", required=True, type=Path, help="JSONL of tokenized training examples")
    ap.add_argument("--heldout", type=Path, help="JSONL of tokenized held-out examples")
    ap.add_argument("--out", required=True, type=Path, help="output directory (adapter/, report.json, checkpoint/)")
    ap.add_argument("--config", default="{}", help="TrainConfig fields as JSON")
    ap.add_argument("--dataset", default="null", help="JSON recorded as the report's dataset field")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        from ownlm.settings import load_settings

        try:
            config = TrainConfig.from_dict(json.loads(args.config))
            dataset = json.loads(args.dataset)
        except ValueError as e:
            raise InvalidInput(f"--config/--dataset is not JSON: {e}", hint="pass a JSON object") from None
        settings = load_settings(base=args.base, device=args.device, threads=args.threads)
        train_ex = read_examples(args.train)
        held = read_examples(args.heldout) if args.heldout else []
        report = run_training(settings, train_ex, held, config, args.out, resume=not args.no_resume,
                              dataset=dataset, show_progress=not args.quiet)
    except OwnlmError as e:
        print(f"error: {e.message}" + (f" — {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1
    print(json.dumps({k: getattr(report, k) for k in ("steps", "tokens", "tokens_per_s", "heldout_loss_base",
                                                       "heldout_loss_personal", "stopped", "resumed_from_step")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
